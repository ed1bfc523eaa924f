//! The chat room behind `examples/chat_server.rs`.
//!
//! It lives in its own file so the end-to-end tests run the very same
//! server in-process (`tests/chat_e2e.rs` includes it with `#[path]`).
//!
//! Each client has a task that drives its connection, handles what it
//! sends, and feeds it the broadcasts waiting in its backlog. Broadcasting
//! never waits for anyone: a message goes into each other client's backlog
//! at once. A client that stops taking messages (its connection's queue
//! stays full for `stall`) or falls too far behind (its backlog grows over
//! `backlog` bytes) is disconnected, never silently skipped.
//!
//! Limits on what clients may do, and what an offender gets (each logged):
//!
//! | limit | default | offender |
//! |---|---|---|
//! | connections in all (`max_connections`) | 10,000 | the new connection is closed at once |
//! | connections per remote IP (`max_per_ip`) | 64 | the new connection is closed at once |
//! | messages per client (`rate`: token bucket) | 10/s, bursts of 20 | Chat over the rate is dropped; a nickname request over it gets a Nak. Drops are logged at most once a second per client, with a count. |
//! | a client that does not read (`stall`, `backlog`) | 5 s, 4 MiB | disconnected |

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::{Builder, Error, Sender, TrySendError};
use futures::StreamExt;
use smol::channel;
use smol::future::FutureExt;
use smol::net::{TcpListener, TcpStream};

/// Where log lines go.
pub type Log = Arc<dyn Fn(String) + Send + Sync>;

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
    /// Connections, disconnections and errors are reported here.
    pub log: Log,
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
            log: Arc::new(|line| eprintln!("{line}")),
        }
    }
}

/// A token bucket: `burst` messages at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Messages per second, on average.
    pub per_second: f64,
    /// Messages at once.
    pub burst: f64,
}

/// One client's bucket, and what it has dropped since it last said so.
struct Bucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
    dropped: u64,
    reported: Option<Instant>,
}

impl Bucket {
    fn new(rate: Rate) -> Self {
        Bucket {
            rate,
            tokens: rate.burst,
            last: Instant::now(),
            dropped: 0,
            reported: None,
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate.per_second;
        self.tokens = (self.tokens + refill).min(self.rate.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.dropped += 1;
        false
    }

    /// How many were dropped since the last report, at most once a second.
    fn report(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.dropped == 0
            || self
                .reported
                .is_some_and(|t| now - t < Duration::from_secs(1))
        {
            return None;
        }
        self.reported = Some(now);
        Some(std::mem::take(&mut self.dropped))
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
                    if let Err(why) = room.admit(addr) {
                        room.log(format_args!("{addr} refused: {why}"));
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
                    room.log(format_args!("accept failed: {e}"));
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
        let n = members.len();
        room.log(format_args!("shutting down: closing {n} connection(s)"));
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
            let _ = m.kick.try_send("did not close in time at shutdown".into());
        }
        let _ = all_gone.recv().await;
    }
    room.log(format_args!("stopped"));
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
    kick: channel::Sender<String>,
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

    fn log(&self, args: fmt::Arguments<'_>) {
        (self.config.log)(args.to_string());
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
                let reason = format!(
                    "too slow: over {} bytes of broadcasts wait for it",
                    self.config.backlog
                );
                let _ = m.kick.try_send(reason);
            } else {
                // Unbounded, as `waiting` bounds it; fails only when the
                // member is leaving.
                let _ = m.outbox.try_send(msg.clone());
            }
        }
    }

    /// Whether a new connection from `addr` is within the limits.
    fn admit(&self, addr: SocketAddr) -> Result<(), String> {
        let members = self.lock();
        let max = self.config.max_connections;
        if members.len() >= max {
            return Err(format!("server full ({max} connections)"));
        }
        let max = self.config.max_per_ip;
        let from_ip = members
            .values()
            .filter(|m| m.addr.ip() == addr.ip())
            .count();
        if from_ip >= max {
            return Err(format!("too many connections from {} ({max})", addr.ip()));
        }
        Ok(())
    }

    /// Gives member `id` the nickname unless another member holds it.
    fn set_nickname(&self, id: u64, nickname: &str) -> Result<(), String> {
        let mut members = self.lock();
        if members
            .iter()
            .any(|(&other, m)| other != id && m.nickname.as_deref() == Some(nickname))
        {
            return Err(format!(
                "nickname {nickname:?} is already taken by another client"
            ));
        }
        match members.get_mut(&id) {
            Some(m) => {
                m.nickname = Some(nickname.to_owned());
                Ok(())
            }
            None => Err("you are being disconnected".into()),
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
        self.log(format_args!("{addr} connected"));
        let room = self.clone();

        async move {
            // The driver, unless the room drops the connection first
            // (dropping the driver closes it at once).
            let driver = async {
                match conn.await {
                    Ok(()) => "closed cleanly".to_owned(),
                    Err(e) => format!("error: {e}"),
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
            let mut bucket = room.config.rate.map(Bucket::new);
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
            let name = match nickname {
                Some(n) => format!("{addr} ({n})"),
                None => addr.to_string(),
            };
            room.log(format_args!("{name} disconnected: {reason}"));
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
) -> String {
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
                let since = *full_since.get_or_insert_with(Instant::now);
                let send = async { Some(sender.send(msg).await) };
                let give_up = async {
                    smol::Timer::at(since + stall).await;
                    None
                };
                match send.or(give_up).await {
                    Some(sent) => sent.map_err(|e| e.error),
                    None => {
                        return format!("too slow: its queue stayed full for {stall:?}");
                    }
                }
            }
            Err(TrySendError::Failed(e)) => Err(e.error),
        };
        match sent {
            Ok(()) => {}
            // This message cannot go out (too large for a frame); the next
            // ones can.
            Err(e @ (Error::MessageTooLarge { .. } | Error::Encode(_))) => {
                room.log(format_args!("broadcast to {addr} not sent: {e}"));
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
        if !bucket.take() {
            if let Some(n) = bucket.report() {
                let r = bucket.rate;
                room.log(format_args!(
                    "{addr} rate-limited: dropped {n} message(s) over {}/s (bursts of {})",
                    r.per_second, r.burst
                ));
            }
            // Requests deserve an answer; anything else is dropped.
            if let ChatMessage::SetNickname { request_id, .. } = msg {
                let message = "rate limited: slow down".to_owned();
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
                    room.log(format_args!("{addr} is now known as {nickname:?}"));
                    ChatMessage::Ack { request_id }
                }
                Err(message) => {
                    room.log(format_args!("{addr} refused {nickname:?}: {message}"));
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
            room.log(format_args!("{addr} sent a Broadcast; ignored"));
        }
        // Keepalives and responses never reach the application.
        ChatMessage::Keepalive | ChatMessage::Ack { .. } | ChatMessage::Nak { .. } => {}
    }
}
