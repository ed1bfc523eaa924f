//! The room's side of v0.6 (`docs/PROTOCOL.md`, "Version 0.6"): the
//! handshake, Say, Direct, Who, presence, history on joining, and the
//! Notice before the room closes a connection.
//!
//! Everything a member is sent besides the answers to its own requests
//! (the Welcome included) goes through its backlog, in order: the Welcome,
//! then its history, then live traffic.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use chatpipe::chat::{
    capability, ChatMessage, Credentials, CredentialsError, Limits, PresenceChange, RequestId,
    MAX_PAYLOAD_LEN, V0_6,
};
use chatpipe::{Sender, TrySendError};

use crate::wire::{Outgoing, Wire};
use smol::future::FutureExt;

use crate::{
    Config, Disconnect, Event, HelloRefusal, LoginRefusal, Member, NoticeFailure, Request,
    RequestRefusal, Room, State, Undelivered,
};

/// What a v0.6 client is told when the server shuts down.
pub(crate) const SHUTDOWN_NOTICE: &str = "the server is shutting down";

/// Bytes of a Members payload before its names: type, request id, total,
/// and the names' count.
const MEMBERS_HEADER: usize = 4 + 16 + 4 + 2;

/// The capabilities a member was granted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Caps {
    pub ack: bool,
    pub direct: bool,
    pub presence: bool,
    pub history: bool,
    pub account: bool,
}

impl Caps {
    /// What the room grants of the capabilities `wanted`: those it knows
    /// (others are ignored), and `history` or `account` only if it keeps
    /// any.
    pub fn grant(wanted: &[String], history: bool, accounts: bool) -> Caps {
        let asked = |name: &str| wanted.iter().any(|w| w == name);
        Caps {
            ack: asked(capability::ACK),
            direct: asked(capability::DIRECT),
            presence: asked(capability::PRESENCE),
            history: history && asked(capability::HISTORY),
            account: accounts && asked(capability::ACCOUNT),
        }
    }

    /// The names granted, in the order of `docs/PROTOCOL.md`.
    pub fn names(self) -> Vec<String> {
        [
            (self.ack, capability::ACK),
            (self.direct, capability::DIRECT),
            (self.presence, capability::PRESENCE),
            (self.history, capability::HISTORY),
            (self.account, capability::ACCOUNT),
        ]
        .into_iter()
        .filter(|&(granted, _)| granted)
        .map(|(_, name)| name.to_owned())
        .collect()
    }
}

/// A Hello, as the room handles it.
pub(crate) struct Hello {
    pub request_id: RequestId,
    pub versions: Vec<u16>,
    pub capabilities: Vec<String>,
    /// Empty, or [`Credentials`] encoded.
    pub credentials: String,
    /// Whether it is the member's first message.
    pub first: bool,
}

/// Answers a Hello: a Welcome (through the backlog, then the history), or
/// a Nak, after which the connection closes if the client does not speak
/// 0.6.
pub(crate) async fn hello(
    room: &Room,
    id: u64,
    addr: SocketAddr,
    sender: &Sender<Wire>,
    hello: Hello,
) {
    let Hello {
        request_id,
        versions,
        capabilities,
        credentials,
        first,
    } = hello;
    let reason = if !first {
        HelloRefusal::NotFirst
    } else if !versions.contains(&V0_6) {
        HelloRefusal::NoCommonVersion { offered: versions }
    } else {
        match authenticate(room, id, addr, &credentials).await {
            Ok(None) if room.config.require_login => HelloRefusal::LoginRequired,
            Ok(_) => {
                room.welcome(id, addr, request_id, &capabilities);
                return;
            }
            Err(reason) => HelloRefusal::Login(reason),
        }
    };
    let close = !matches!(reason, HelloRefusal::NotFirst);
    if close {
        // Nothing more for it, and nothing more from it.
        room.set_leaving(id);
    }
    let message = reason.to_string();
    room.emit(Event::HelloRefused { addr, reason });
    let _ = sender
        .send(
            ChatMessage::Nak {
                request_id,
                message,
            }
            .into(),
        )
        .await;
    if close {
        // The Nak is on the wire before the close begins (the close alone
        // would write it too); the driver then shuts our half and ends
        // once the client closes its own.
        let _ = sender.flush().await;
        sender.close();
    }
}

/// Checks credentials (a Hello's or a Login's) and logs member `id` in:
/// `Ok(Some(nickname))` once it holds the nickname of its account,
/// `Ok(None)` for none (a guest). Each failure is reported with the
/// address.
async fn authenticate(
    room: &Room,
    id: u64,
    addr: SocketAddr,
    credentials: &str,
) -> Result<Option<String>, LoginRefusal> {
    let parsed = Credentials::parse(credentials);
    let nickname = match &parsed {
        Ok(Some(c)) => c.nickname().to_owned(),
        Ok(None) => return Ok(None),
        // Whatever the nickname field held, for the log.
        Err(_) => credentials.split('\0').nth(1).unwrap_or("").to_owned(),
    };
    let result = log_in(room, id, addr, parsed).await;
    match &result {
        Ok(registered) => {
            let nickname = nickname.clone();
            room.emit(if *registered {
                Event::Registered { addr, nickname }
            } else {
                Event::LoggedIn { addr, nickname }
            });
        }
        Err(reason) => room.emit(Event::LoginFailed {
            addr,
            nickname: nickname.clone(),
            reason: reason.clone(),
        }),
    }
    result.map(|_| Some(nickname))
}

/// The steps of [`authenticate`]: `Ok(true)` for a registration.
async fn log_in(
    room: &Room,
    id: u64,
    addr: SocketAddr,
    parsed: Result<Option<Credentials>, CredentialsError>,
) -> Result<bool, LoginRefusal> {
    let credentials = match parsed {
        Ok(Some(c)) => c,
        Ok(None) => return Err(LoginRefusal::Malformed(CredentialsError::Malformed)),
        Err(e) => return Err(LoginRefusal::Malformed(e)),
    };
    let secure = room.lock().members.get(&id).is_some_and(|m| m.secure);
    if !secure && !room.config.plaintext_credentials {
        return Err(LoginRefusal::Plaintext);
    }
    let Some(accounts) = &room.config.accounts else {
        return Err(LoginRefusal::NoAccounts);
    };
    let (ip, nickname) = (addr.ip(), credentials.nickname());
    let now = room.now();
    let attempt = room.attempts().take(ip, nickname, now);
    attempt.map_err(|retry_in| LoginRefusal::RateLimited { retry_in })?;
    let registering = matches!(credentials, Credentials::Register { .. });
    if registering {
        let _registering = room.start_registering(id, nickname)?;
        let registered = accounts.register(nickname, credentials.password()).await;
        registered.map_err(LoginRefusal::Account)?;
    } else {
        let verified = accounts.verify(nickname, credentials.password()).await;
        verified.map_err(LoginRefusal::Account)?;
    }
    room.attempts().succeeded(ip, nickname);
    room.log_in(id, nickname)?;
    Ok(registering)
}

/// A registration under way: the nickname is free for others again when
/// it is over, however it ends.
pub(crate) struct Registering<'a> {
    room: &'a Room,
    nickname: String,
}

impl Drop for Registering<'_> {
    fn drop(&mut self) {
        self.room.lock().registering.remove(&self.nickname);
    }
}

/// Answers a Login: an Ack once logged in (or registered), or a Nak.
pub(crate) async fn login(
    room: &Room,
    id: u64,
    addr: SocketAddr,
    request_id: RequestId,
    credentials: &str,
) -> ChatMessage {
    let granted = room.caps(id).map(|c| c.account);
    let result = match granted {
        None => Err(LoginRefusal::Leaving),
        Some(false) => {
            let reason = RequestRefusal::NotGranted {
                capability: capability::ACCOUNT,
            };
            return room.answer(addr, Request::Login, request_id, Err(reason));
        }
        Some(true) => authenticate(room, id, addr, credentials).await,
    };
    match result {
        Ok(_) => ChatMessage::Ack { request_id },
        Err(reason) => ChatMessage::Nak {
            request_id,
            message: reason.to_string(),
        },
    }
}

/// Answers a Say: the text goes to the room as a Broadcast, then an Ack;
/// or a Nak.
pub(crate) fn say(
    room: &Room,
    id: u64,
    addr: SocketAddr,
    request_id: RequestId,
    text: String,
    straight: bool,
) -> ChatMessage {
    let result = match room.caps(id) {
        None => Err(RequestRefusal::Leaving),
        Some(caps) if !caps.ack => Err(RequestRefusal::NotGranted {
            capability: capability::ACK,
        }),
        Some(_) => room.broadcast(id, text, straight),
    };
    room.answer(addr, Request::Say, request_id, result)
}

/// Answers a Direct: a Private for the member called `to`, then an Ack;
/// or a Nak.
pub(crate) fn direct(
    room: &Room,
    id: u64,
    addr: SocketAddr,
    request_id: RequestId,
    to: String,
    text: String,
) -> ChatMessage {
    let result = room.direct(id, &to, text);
    if result.is_ok() {
        room.emit(Event::DirectDelivered { addr, to });
    }
    room.answer(addr, Request::Direct, request_id, result)
}

/// Answers a Who with Members, or a Nak.
pub(crate) fn who(room: &Room, id: u64, addr: SocketAddr, request_id: RequestId) -> ChatMessage {
    match room.members_list(id) {
        Ok((total, names)) => ChatMessage::Members {
            request_id,
            total,
            names,
        },
        Err(reason) => room.answer(addr, Request::Who, request_id, Err(reason)),
    }
}

/// Before the room drops a v0.6 client for being too slow: tells it why
/// with a Notice if its connection's queue has room (never waiting for
/// room), then gives the connection up to `grace` to write it. Reported
/// either way. A v0.5 client is dropped at once, as before.
pub(crate) async fn farewell<F: Future<Output = Disconnect>>(
    room: &Room,
    id: u64,
    addr: SocketAddr,
    sender: &Sender<Wire>,
    text: String,
    driver: Pin<&mut F>,
) {
    if !room.leaving_v06(id) {
        return;
    }
    let notice = ChatMessage::Notice { text: text.clone() };
    let failure = match sender.try_send(notice.into()) {
        Err(TrySendError::Full(_)) => Some(NoticeFailure::QueueFull),
        Err(TrySendError::Failed(e)) => Some(NoticeFailure::Failed(e.error)),
        Ok(()) => {
            // Dropping the connection would drop the Notice: let the driver
            // write what is queued, the Notice last, then shut our half.
            sender.close();
            let flushed = || async { sender.flush().await.err().map(NoticeFailure::Failed) };
            let written = flushed();
            let driven = async {
                // The driver ended: the flush now says whether it got there.
                let _ = driver.await;
                flushed().await
            };
            let waited = room.config.grace;
            let give_up = async {
                smol::Timer::after(waited).await;
                Some(NoticeFailure::NotWritten { waited })
            };
            written.or(driven).or(give_up).await
        }
    };
    room.emit(match failure {
        None => Event::NoticeSent { addr, text },
        Some(reason) => Event::NoticeNotSent { addr, text, reason },
    });
}

/// A Presence announcement.
pub(crate) fn presence(
    change: PresenceChange,
    nickname: String,
    new_nickname: String,
) -> ChatMessage {
    ChatMessage::Presence {
        change,
        nickname,
        new_nickname,
    }
}

/// Milliseconds since the Unix epoch, as History carries them (0 for a
/// clock set before 1970).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The limits a Welcome gives, from the room's configuration.
pub(crate) fn limits(config: &Config) -> Limits {
    // `as` saturates (and takes NaN to 0). A rate that rounds to 0 would
    // read as "no limit": it is at least 1 per 1,000 s.
    let (rate_per_1000s, burst) = config.rate.map_or((0, 0), |r| {
        let per_1000s = (r.per_second * 1000.0).round().max(1.0) as u32;
        // The bucket lets out whole messages: a burst of 20.5 is 20.
        (per_1000s, r.burst.floor() as u32)
    });
    Limits {
        max_frame: u32::try_from(MAX_PAYLOAD_LEN).unwrap_or(u32::MAX),
        rate_per_1000s,
        burst,
        keepalive_ms: u32::try_from(config.keepalive.as_millis()).unwrap_or(u32::MAX),
    }
}

/// The first of `names` that fit in one Members frame, in order.
pub(crate) fn fit_names(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut left = MAX_PAYLOAD_LEN - MEMBERS_HEADER;
    let mut fit = Vec::new();
    for name in names {
        let cost = 1 + name.len();
        if cost > left || fit.len() == usize::from(u16::MAX) {
            break;
        }
        left -= cost;
        fit.push(name);
    }
    fit
}

impl Member {
    /// Starts getting the room's traffic; what was said before came to it
    /// as history, if at all.
    fn listen(&mut self, said: u64) {
        if !self.listening {
            self.listening = true;
            self.said_at_join = said;
        }
    }
}

impl Room {
    /// Keeps a room message for the history: the newest `config.history`
    /// of them, oldest first. Called by `broadcast` only, with the state
    /// locked. The history store can back this and [`Room::recent`].
    pub(crate) fn remember(&self, at_ms: u64, from: &str, text: &str) {
        let max = self.config.history;
        if max == 0 {
            return;
        }
        if let Some(store) = &self.config.store {
            // Never waits for the disk: a slow one loses writes, counted.
            let (from, text) = (from.to_owned(), text.to_owned());
            return store.append(crate::store::Entry { at_ms, from, text });
        }
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        while history.len() >= max {
            history.pop_front();
        }
        history.push_back((at_ms, from.to_owned(), text.to_owned()));
    }

    /// The remembered messages, oldest first, as `(at_ms, from, text)`.
    pub(crate) fn recent(&self) -> Vec<(u64, String, String)> {
        if let Some(store) = &self.config.store {
            let recent = store.recent();
            let skip = recent.len().saturating_sub(self.config.history);
            return recent
                .into_iter()
                .skip(skip)
                .map(|e| (e.at_ms, e.from, e.text))
                .collect();
        }
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.iter().cloned().collect()
    }

    /// Whether this is member `id`'s first message; `None` if it is
    /// leaving, and what it sends is ignored. Any message but a Hello
    /// starts its listening (a Hello's Welcome does that).
    pub(crate) fn first_message(&self, id: u64, is_hello: bool) -> Option<bool> {
        let mut state = self.lock();
        let said = state.said;
        let m = state.members.get_mut(&id).filter(|m| !m.leaving)?;
        let first = !std::mem::replace(&mut m.spoke, true);
        // A guest where guests are refused never listens.
        let guest = self.config.require_login && m.account.is_none();
        if !is_hello && !guest {
            m.listen(said);
        }
        Some(first)
    }

    /// The join window is over: member `id` gets the room's traffic from
    /// now on. False if it must go instead: guests are refused and it has
    /// not said a word (a client that spoke is logging in, or was refused).
    pub(crate) fn start_listening(&self, id: u64) -> bool {
        let mut state = self.lock();
        let said = state.said;
        let require_login = self.config.require_login;
        match state.members.get_mut(&id) {
            Some(m) if require_login && m.account.is_none() => m.spoke,
            Some(m) => {
                m.listen(said);
                true
            }
            None => true,
        }
    }

    /// The login attempts, locked.
    pub(crate) fn attempts(&self) -> std::sync::MutexGuard<'_, crate::accounts::Attempts> {
        self.attempts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Member `id` starts registering `nickname`: no one else may take or
    /// register it until it is done. Only a nickname that is free, or its
    /// own, can be registered.
    pub(crate) fn start_registering(
        &self,
        id: u64,
        nickname: &str,
    ) -> Result<Registering<'_>, LoginRefusal> {
        let mut state = self.lock();
        let nickname = nickname.to_owned();
        if state
            .nicks
            .get(&nickname)
            .is_some_and(|&holder| holder != id)
        {
            return Err(LoginRefusal::InUse { nickname });
        }
        if !state.registering.insert(nickname.clone()) {
            return Err(LoginRefusal::BeingRegistered { nickname });
        }
        Ok(Registering {
            room: self,
            nickname,
        })
    }

    /// Whether member `id` is a guest where guests are refused.
    pub(crate) fn must_log_in(&self, id: u64) -> bool {
        self.config.require_login
            && self
                .lock()
                .members
                .get(&id)
                .is_some_and(|m| m.account.is_none())
    }

    /// Member `id` is leaving for `reason`: nothing more is sent to it or
    /// taken from it, and when its connection has closed cleanly (its
    /// task closes it after what it has sent) the reason is reported.
    pub(crate) fn close_for(&self, id: u64, reason: Disconnect) {
        if let Some(m) = self.lock().members.get_mut(&id) {
            m.leaving = true;
            m.closing = Some(reason);
        }
    }

    /// The capabilities of member `id`; `None` if it is leaving.
    fn caps(&self, id: u64) -> Option<Caps> {
        let state = self.lock();
        state
            .members
            .get(&id)
            .filter(|m| !m.leaving)
            .map(|m| m.caps)
    }

    /// Marks member `id` as leaving: no longer listed, sent to or heard.
    fn set_leaving(&self, id: u64) {
        if let Some(m) = self.lock().members.get_mut(&id) {
            m.leaving = true;
        }
    }

    /// Marks member `id` as leaving if it speaks v0.6; tells whether it
    /// does.
    fn leaving_v06(&self, id: u64) -> bool {
        match self.lock().members.get_mut(&id) {
            Some(m) if m.version == V0_6 => {
                m.leaving = true;
                true
            }
            _ => false,
        }
    }

    /// An Ack, or a Nak saying why (reported as an event).
    fn answer(
        &self,
        addr: SocketAddr,
        request: Request,
        request_id: RequestId,
        result: Result<(), RequestRefusal>,
    ) -> ChatMessage {
        match result {
            Ok(()) => ChatMessage::Ack { request_id },
            Err(reason) => {
                let message = reason.to_string();
                self.emit(Event::RequestRefused {
                    addr,
                    request,
                    reason,
                });
                ChatMessage::Nak {
                    request_id,
                    message,
                }
            }
        }
    }

    /// Welcomes member `id` to v0.6: queues the Welcome, then (if granted)
    /// the history from before it joined, in its backlog, all under the
    /// lock so that no live message comes between them.
    fn welcome(&self, id: u64, addr: SocketAddr, request_id: RequestId, wanted: &[String]) {
        let accounts = self.config.accounts.is_some();
        let caps = Caps::grant(wanted, self.config.history > 0, accounts);
        let capabilities = caps.names();
        let welcome = ChatMessage::Welcome {
            request_id,
            version: V0_6,
            capabilities: capabilities.clone(),
            limits: limits(&self.config),
        };
        let history = {
            let mut state = self.lock();
            let said = state.said;
            let Some(m) = state.members.get_mut(&id) else {
                return;
            };
            m.version = V0_6;
            m.caps = caps;
            m.listen(said);
            let state = &*state;
            let Some(m) = state.members.get(&id) else {
                return;
            };
            if self
                .deliver(state, m, Outgoing::new(welcome), false)
                .is_err()
            {
                // Too far behind already, or leaving: it is being
                // disconnected, which is reported.
                return;
            }
            // The newest `said - said_at_join` reached it live, as
            // Broadcasts, since it joined.
            let live = usize::try_from(said - m.said_at_join).unwrap_or(usize::MAX);
            caps.history.then(|| self.send_history(state, m, live))
        };
        self.emit(Event::Welcomed { addr, capabilities });
        if let Some((sent, skipped)) = history {
            self.emit(Event::HistorySent {
                addr,
                sent,
                skipped,
            });
        }
    }

    /// Queues the history, but for its `live` newest messages, as History
    /// in `m`'s backlog: the newest that fit under the backlog limit.
    /// Returns how many were sent and how many were not.
    fn send_history(&self, state: &State, m: &Member, live: usize) -> (usize, usize) {
        let mut old = self.recent();
        old.truncate(old.len().saturating_sub(live));
        let mut room_left = self
            .config
            .backlog
            .saturating_sub(m.queued.text.load(Ordering::Relaxed));
        let mut fit = 0;
        for (_, from, text) in old.iter().rev() {
            let size = from.len() + text.len();
            if size > room_left {
                break;
            }
            room_left -= size;
            fit += 1;
        }
        let total = old.len();
        let mut sent = 0;
        for (at_ms, from, text) in old.into_iter().skip(total - fit) {
            let history = Outgoing::new(ChatMessage::History { at_ms, from, text });
            if self.deliver(state, m, history, false).is_err() {
                break;
            }
            sent += 1;
        }
        (sent, total - sent)
    }

    /// Queues a Private from member `id` for the member called `to`.
    fn direct(&self, id: u64, to: &str, text: String) -> Result<(), RequestRefusal> {
        let state = self.lock();
        let from = match state.members.get(&id) {
            Some(m) if !m.leaving => m,
            _ => return Err(RequestRefusal::Leaving),
        };
        if !from.caps.direct {
            return Err(RequestRefusal::NotGranted {
                capability: capability::DIRECT,
            });
        }
        let nickname = || to.to_owned();
        let target = state
            .nicks
            .get(to)
            .and_then(|t| state.members.get(t))
            .ok_or_else(|| RequestRefusal::NoSuchMember {
                nickname: nickname(),
            })?;
        if target.leaving {
            return Err(RequestRefusal::RecipientLeaving {
                nickname: nickname(),
            });
        }
        if !target.caps.direct {
            return Err(RequestRefusal::CannotReceive {
                nickname: nickname(),
            });
        }
        let msg = ChatMessage::Private {
            from: from.name(),
            text,
        };
        self.deliver(&state, target, Outgoing::new(msg), false)
            .map_err(|e| match e {
                Undelivered::TooSlow => RequestRefusal::RecipientTooFarBehind {
                    nickname: nickname(),
                },
                Undelivered::Leaving => RequestRefusal::RecipientLeaving {
                    nickname: nickname(),
                },
            })
    }

    /// Who is in the room, for member `id`: how many, and the names of
    /// the first (in join order) that fit in one frame.
    fn members_list(&self, id: u64) -> Result<(u32, Vec<String>), RequestRefusal> {
        let mut present: Vec<(u64, String)> = {
            let state = self.lock();
            match state.members.get(&id) {
                Some(m) if m.leaving => return Err(RequestRefusal::Leaving),
                None => return Err(RequestRefusal::Leaving),
                Some(m) if !m.caps.presence => {
                    return Err(RequestRefusal::NotGranted {
                        capability: capability::PRESENCE,
                    })
                }
                Some(_) => {}
            }
            state
                .members
                .iter()
                .filter(|(_, m)| !m.leaving)
                .map(|(&id, m)| (id, m.name()))
                .collect()
        };
        present.sort_unstable_by_key(|&(id, _)| id);
        let total = u32::try_from(present.len()).unwrap_or(u32::MAX);
        Ok((total, fit_names(present.into_iter().map(|(_, name)| name))))
    }

    /// Queues `news` for every member granted `presence` but `except`.
    pub(crate) fn announce(&self, state: &State, except: u64, news: ChatMessage) {
        let news = Outgoing::new(news);
        for (&other, m) in &state.members {
            if other != except && m.caps.presence && !m.leaving && m.listening {
                let _ = self.deliver(state, m, news.clone(), false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_the_known_capabilities_only() {
        let wanted: Vec<String> = ["history", "bogus", "account", "ack", "presence", "ack"]
            .map(String::from)
            .into();
        let caps = Caps::grant(&wanted, true, true);
        assert_eq!(caps.names(), ["ack", "presence", "history", "account"]);
        let caps = Caps::grant(&wanted, false, false);
        assert_eq!(caps.names(), ["ack", "presence"]);
        assert!(Caps::grant(&[], true, true).names().is_empty());
    }

    #[test]
    fn limits_follow_the_config() {
        let limits = limits(&Config::default());
        assert_eq!(
            limits,
            Limits {
                max_frame: 65_813,
                rate_per_1000s: 10_000,
                burst: 20,
                keepalive_ms: 5_000,
            }
        );
        let none = Config {
            rate: None,
            ..Config::default()
        };
        assert_eq!(super::limits(&none).rate_per_1000s, 0);
        assert_eq!(super::limits(&none).burst, 0);
        let slow = Config {
            rate: Some(crate::Rate {
                per_second: 0.0001,
                burst: 1.5,
            }),
            ..Config::default()
        };
        let slow = super::limits(&slow);
        assert_eq!((slow.rate_per_1000s, slow.burst), (1, 1), "never 0 = none");
    }

    #[test]
    fn members_fit_in_one_frame() {
        // A Members payload is type (4), request id (16), total (4), count
        // (2), then each name's length (1) and bytes.
        let payload = |names: &[String]| 26 + names.iter().map(|n| 1 + n.len()).sum::<usize>();
        // 300 names of 255 bytes: 256 fit in 65,813 bytes.
        let names: Vec<String> = (0..300).map(|i| format!("{i:0>255}")).collect();
        let fit = fit_names(names.clone());
        assert_eq!(fit.len(), 256);
        assert_eq!(fit[..], names[..256], "the first, in order");
        assert!(payload(&fit) <= MAX_PAYLOAD_LEN);
        assert!(
            payload(&names[..257]) > MAX_PAYLOAD_LEN,
            "one more would not fit"
        );
        // Short names: the count's limit (a u16) comes first.
        let many = fit_names((0..70_000).map(|_| String::new()));
        assert_eq!(many.len(), usize::from(u16::MAX));
        assert!(fit_names(Vec::new()).is_empty());
    }
}
