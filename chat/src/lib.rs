//! The chat room behind `examples/chat_server.rs`: [`serve`] runs it on a
//! listener, with a [`Config`]. The binary only parses arguments and catches
//! signals; the chat tests and the bench run the very same room in-process.
//! What the room does is reported as typed [`Event`]s (displayed, they are
//! the server's log lines), so tests match on them.
//!
//! Each client has a task that drives its connection, handles what it
//! sends, and feeds it the broadcasts waiting in its backlog. Broadcasting
//! never waits for anyone: a message goes into each other client's backlog
//! at once. A client that stops taking messages (its connection's queue
//! stays full for `stall`) or falls too far behind (its backlog grows over
//! `backlog` bytes) is disconnected, never silently skipped.
//!
//! Limits on what clients may do, and what an offender gets (each an
//! [`Event`]):
//!
//! | limit | default | offender |
//! |---|---|---|
//! | connections in all (`max_connections`) | 10,000 | the new connection is closed at once |
//! | connections per remote IP (`max_per_ip`) | 64 | the new connection is closed at once |
//! | messages per client (`rate`: token bucket) | 10/s, bursts of 20 | Chat over the rate is dropped; a nickname request over it gets a Nak. Drops are reported at most once a second per client, with a count. |
//! | a client that does not read (`stall`, `backlog`) | 5 s, 4 MiB | disconnected |

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::{Builder, Sender, TrySendError};
use smol::channel;
use smol::future::FutureExt;
use smol::net::{TcpListener, TcpStream};
use smol::stream::StreamExt;

mod bucket;
pub mod client;
mod event;

use bucket::Bucket;
pub use bucket::Rate;
pub use event::{Disconnect, Event, NicknameRefusal, Refusal};

/// How the server runs.
#[derive(Clone)]
pub struct Config {
    /// Keepalive interval of every connection. Silence for three of them
    /// disconnects a client.
    pub keepalive: Duration,
    /// A client whose connection takes no message for this long while
    /// broadcasts wait for it (it does not read) is disconnected.
    pub stall: Duration,
    /// A client with more than this many bytes of broadcasts waiting for
    /// it, beyond its connection's own queue, is disconnected: memory for a
    /// client that cannot keep up is bounded.
    pub backlog: usize,
    /// How long shutdown waits for clients to close cleanly before
    /// dropping them.
    pub grace: Duration,
    /// How many messages a client may send: `None` for no limit.
    pub rate: Option<Rate>,
    /// Connections at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections at once from one IP address; more are closed as soon as
    /// they are accepted.
    pub max_per_ip: usize,
    /// Where connections, disconnections, refusals and errors are
    /// reported; by default each is printed on stderr.
    pub events: Arc<dyn Fn(Event) + Send + Sync>,
    /// The time (by default `Instant::now`) for what the room measures: the
    /// rate limit, and how long a client's queue has stayed full. Waits are
    /// real timers.
    pub clock: Arc<dyn Fn() -> Instant + Send + Sync>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keepalive: Duration::from_secs(5),
            stall: Duration::from_secs(5),
            backlog: 4 << 20,
            grace: Duration::from_secs(5),
            rate: Some(Rate {
                per_second: 10.0,
                burst: 20.0,
            }),
            max_connections: 10_000,
            max_per_ip: 64,
            events: Arc::new(|event| eprintln!("{event}")),
            clock: Arc::new(Instant::now),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("keepalive", &self.keepalive)
            .field("stall", &self.stall)
            .field("backlog", &self.backlog)
            .field("grace", &self.grace)
            .field("rate", &self.rate)
            .field("max_connections", &self.max_connections)
            .field("max_per_ip", &self.max_per_ip)
            .finish_non_exhaustive()
    }
}

/// Serves the chat room on `listener` until `shutdown` resolves; then stops
/// accepting, closes every connection gracefully and returns once they are
/// all gone (or `grace` has passed and the rest were dropped).
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let room = Arc::new(Room {
        config,
        members: Mutex::new(HashMap::new()),
    });
    // Every client task holds a clone, to tell when they have all ended.
    let (alive, all_gone) = channel::bounded::<()>(1);

    let accept = async {
        let mut next_id = 0;
        loop {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    if let Err(reason) = room.admit(addr) {
                        room.emit(Event::Refused { addr, reason });
                        drop(stream);
                        continue;
                    }
                    next_id += 1;
                    // Joined here, not in the task, so that shutdown sees
                    // every connection it must close.
                    let task = room.join(next_id, stream, addr);
                    let alive = alive.clone();
                    smol::spawn(async move {
                        task.await;
                        drop(alive);
                    })
                    .detach();
                }
                Err(e) => {
                    room.emit(Event::AcceptFailed(e));
                    // Out of file descriptors, say: do not spin.
                    smol::Timer::after(Duration::from_millis(100)).await;
                }
            }
        }
    };
    accept.or(shutdown).await;
    drop(listener);
    drop(alive);

    // Each member's task sends what waits for it, then closes.
    {
        let members = room.lock();
        let connections = members.len();
        room.emit(Event::ShuttingDown { connections });
        for m in members.values() {
            m.outbox.close();
        }
    }
    // Nothing is ever sent on `alive`: `recv` fails once every client task
    // has ended, or gives `Ok` here when the grace period is over first.
    let grace = async {
        smol::Timer::after(room.config.grace).await;
        Ok(())
    };
    if all_gone.recv().or(grace).await.is_ok() {
        // Still open after the grace period: drop them.
        for m in room.lock().values() {
            let _ = m.kick.try_send(Disconnect::ShutdownTimeout);
        }
        let _ = all_gone.recv().await;
    }
    room.emit(Event::Stopped);
}

struct Room {
    config: Config,
    members: Mutex<HashMap<u64, Member>>,
}

struct Member {
    addr: SocketAddr,
    nickname: Option<String>,
    /// Broadcasts on their way to this member's connection.
    outbox: channel::Sender<ChatMessage>,
    /// Bytes of text in `outbox`.
    waiting: Arc<AtomicUsize>,
    /// Tells the member's task to drop its connection, and why.
    kick: channel::Sender<Disconnect>,
}

impl Member {
    /// The name others see: the nickname, or the address until one is set.
    fn name(&self) -> String {
        match &self.nickname {
            Some(nick) => nick.clone(),
            None => self.addr.to_string(),
        }
    }
}

/// What a broadcast weighs in a backlog.
fn weight(msg: &ChatMessage) -> usize {
    match msg {
        ChatMessage::Broadcast { from, text } => from.len() + text.len(),
        _ => 0,
    }
}

impl Room {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Member>> {
        // The map stays consistent even if a holder panicked.
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: Event) {
        (self.config.events)(event);
    }

    fn now(&self) -> Instant {
        (self.config.clock)()
    }

    /// Sends `text` from member `id` to every other member, without ever
    /// waiting.
    fn broadcast(&self, id: u64, text: String) {
        let members = self.lock();
        let Some(from) = members.get(&id).map(Member::name) else {
            return;
        };
        let msg = ChatMessage::Broadcast { from, text };
        let size = weight(&msg);
        for (_, m) in members.iter().filter(|(&other, _)| other != id) {
            if m.waiting.fetch_add(size, Ordering::Relaxed) + size > self.config.backlog {
                // Its task drops the connection; until then, further kicks
                // are no-ops.
                let backlog = self.config.backlog;
                let _ = m.kick.try_send(Disconnect::TooFarBehind { backlog });
            } else {
                // Unbounded, as `waiting` bounds it; fails only when the
                // member is leaving.
                let _ = m.outbox.try_send(msg.clone());
            }
        }
    }

    /// Whether a new connection from `addr` is within the limits.
    fn admit(&self, addr: SocketAddr) -> Result<(), Refusal> {
        let members = self.lock();
        let max = self.config.max_connections;
        if members.len() >= max {
            return Err(Refusal::ServerFull { max });
        }
        let (ip, max) = (addr.ip(), self.config.max_per_ip);
        if members.values().filter(|m| m.addr.ip() == ip).count() >= max {
            return Err(Refusal::TooManyFromIp { ip, max });
        }
        Ok(())
    }

    /// Gives member `id` the nickname unless another member holds it.
    fn set_nickname(&self, id: u64, nickname: &str) -> Result<(), NicknameRefusal> {
        let mut members = self.lock();
        if members
            .iter()
            .any(|(&other, m)| other != id && m.nickname.as_deref() == Some(nickname))
        {
            let nickname = nickname.to_owned();
            return Err(NicknameRefusal::Taken { nickname });
        }
        match members.get_mut(&id) {
            Some(m) => {
                m.nickname = Some(nickname.to_owned());
                Ok(())
            }
            None => Err(NicknameRefusal::Leaving),
        }
    }

    /// Adds a connection to the room; the returned future serves it until
    /// it ends, then takes it out.
    fn join(
        self: &Arc<Self>,
        id: u64,
        stream: TcpStream,
        addr: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        // Chat lines are small and latency matters more than packet count;
        // the connection coalesces writes anyway.
        let _ = stream.set_nodelay(true);
        let (sender, incoming, conn) = Builder::new()
            .keepalive_interval(Some(self.config.keepalive))
            .build(stream, Chat);
        let (outbox, broadcasts) = channel::unbounded();
        let waiting = Arc::new(AtomicUsize::new(0));
        let (kick, kicked) = channel::bounded(1);
        let member = Member {
            addr,
            nickname: None,
            outbox,
            waiting: waiting.clone(),
            kick,
        };
        self.lock().insert(id, member);
        self.emit(Event::Connected { addr });
        let room = self.clone();

        async move {
            // The driver, unless the room drops the connection first
            // (dropping the driver closes it at once).
            let driver = async {
                match conn.await {
                    Ok(()) => Disconnect::Closed,
                    Err(e) => Disconnect::Error(e),
                }
            };
            let kicked = async {
                match kicked.recv().await {
                    Ok(reason) => reason,
                    Err(_) => std::future::pending().await,
                }
            };
            let stalled = forward(&room, addr, broadcasts, &waiting, &sender);
            let mut incoming = incoming;
            let mut bucket = room.config.rate.map(|r| Bucket::new(r, room.now()));
            let reading = async {
                let mut handled = 0u32;
                while let Some(Ok(msg)) = incoming.next().await {
                    handle(&room, id, addr, &sender, msg, bucket.as_mut()).await;
                    // Messages that arrived together are all ready at once:
                    // let the other members' tasks run now and then, but not
                    // after every message, or each broadcast becomes a
                    // write of its own instead of being coalesced.
                    handled = handled.wrapping_add(1);
                    if handled % 32 == 0 {
                        smol::future::yield_now().await;
                    }
                }
            };
            let ended = driver.or(kicked).or(stalled);
            let (reason, ()) = smol::future::zip(ended, reading).await;

            let nickname = room.lock().remove(&id).and_then(|m| m.nickname);
            room.emit(Event::Disconnected {
                addr,
                nickname,
                reason,
            });
        }
    }
}

/// Moves broadcasts from a member's backlog to its connection. Resolves,
/// with the reason, only if the connection's queue stays full for `stall`;
/// once the backlog is closed and empty (at shutdown), closes the
/// connection.
async fn forward(
    room: &Room,
    addr: SocketAddr,
    broadcasts: channel::Receiver<ChatMessage>,
    waiting: &AtomicUsize,
    sender: &Sender<Chat>,
) -> Disconnect {
    let stall = room.config.stall;
    // When the queue was first found full, since it last had room.
    let mut full_since = None;
    while let Ok(msg) = broadcasts.recv().await {
        waiting.fetch_sub(weight(&msg), Ordering::Relaxed);
        let sent = match sender.try_send(msg) {
            Ok(()) => {
                full_since = None;
                Ok(())
            }
            Err(TrySendError::Full(msg)) => {
                // Wait for room, but only until the queue has been full for
                // `stall`: a slot freed now and then is not catching up.
                let since = *full_since.get_or_insert_with(|| room.now());
                let left = stall.saturating_sub(room.now().saturating_duration_since(since));
                let room_made = async { Some(sender.reserve().await) };
                let give_up = async {
                    smol::Timer::after(left).await;
                    None
                };
                match room_made.or(give_up).await {
                    Some(Ok(permit)) => permit.send(msg).map_err(|e| e.error),
                    Some(Err(e)) => Err(e),
                    None => return Disconnect::Stalled { stall },
                }
            }
            Err(TrySendError::Failed(e)) => Err(e.error),
        };
        match sent {
            Ok(()) => {}
            // This message cannot go out (too large for a frame); the next
            // ones can.
            Err(error) if !error.is_fatal() => {
                room.emit(Event::BroadcastNotSent { addr, error });
            }
            // The connection is ending; its driver says why.
            Err(_) => break,
        }
    }
    sender.close();
    std::future::pending().await
}

async fn handle(
    room: &Room,
    id: u64,
    addr: SocketAddr,
    sender: &Sender<Chat>,
    msg: ChatMessage,
    bucket: Option<&mut Bucket>,
) {
    if let Some(bucket) = bucket {
        let now = room.now();
        if !bucket.take(now) {
            if let Some(dropped) = bucket.report(now) {
                let rate = bucket.rate;
                room.emit(Event::RateLimited {
                    addr,
                    dropped,
                    rate,
                });
            }
            // Requests deserve an answer; anything else is dropped.
            if let ChatMessage::SetNickname { request_id, .. } = msg {
                let message = NicknameRefusal::RateLimited.to_string();
                let _ = sender
                    .send(ChatMessage::Nak {
                        request_id,
                        message,
                    })
                    .await;
            }
            return;
        }
    }
    match msg {
        ChatMessage::Chat { text } => room.broadcast(id, text),
        ChatMessage::SetNickname {
            request_id,
            nickname,
        } => {
            let reply = match room.set_nickname(id, &nickname) {
                Ok(()) => {
                    room.emit(Event::Nickname { addr, nickname });
                    ChatMessage::Ack { request_id }
                }
                Err(reason) => {
                    let message = reason.to_string();
                    room.emit(Event::NicknameRefused {
                        addr,
                        nickname,
                        reason,
                    });
                    ChatMessage::Nak {
                        request_id,
                        message,
                    }
                }
            };
            // Waiting here slows only this client's own reading.
            let _ = sender.send(reply).await;
        }
        // A server-to-client message: meaningless here.
        ChatMessage::Broadcast { .. } => {
            room.emit(Event::UnexpectedBroadcast { addr });
        }
        // Keepalives and responses never reach the application.
        ChatMessage::Keepalive | ChatMessage::Ack { .. } | ChatMessage::Nak { .. } => {}
        // The v0.6 messages: this room speaks v0.5 only, and skips them as
        // a v0.5 peer skips unknown types.
        _ => {}
    }
}
