//! The chat room behind `examples/chat_server.rs`: [`serve`] runs it on a
//! listener, with a [`Config`]. The binary only parses arguments and catches
//! signals; the chat tests and the bench run the very same room in-process.
//! What the room does is reported as typed [`Event`]s (displayed, they are
//! the server's log lines), so tests match on them.
//!
//! Each client has a task that drives its connection, handles what it
//! sends, and feeds it the broadcasts waiting in its backlog. Broadcasting
//! never waits for anyone: a message goes into each other client's backlog
//! at once (one copy, shared by the backlogs). A client that stops taking
//! messages (its connection's queue stays full for `stall`) or falls too
//! far behind (its backlog grows over `backlog` bytes) is disconnected,
//! never silently skipped. What waits on all the clients together is
//! bounded too (`max_memory`): when it is reached, the client furthest
//! behind is disconnected, the slow-consumer rule, so memory stays bounded
//! however many clients lag.
//!
//! Joining, leaving, taking or changing a nickname and the per-IP check
//! cost the same whatever the number of members (maps kept up to date);
//! only what must reach many members walks them: a broadcast, presence
//! announcements, Who, shutdown, and picking the slowest member once the
//! budget is reached.
//!
//! Limits on what clients may do, and what an offender gets (each an
//! [`Event`]):
//!
//! | limit | default | offender |
//! |---|---|---|
//! | connections in all (`max_connections`) | 10,000 | the new connection is closed at once |
//! | connections per remote IP (`max_per_ip`) | 64 | the new connection is closed at once |
//! | messages per client (`rate`: token bucket) | 10/s, bursts of 20 | its messages are read more slowly: all arrive, late, in order, and TCP pushes back on its sends. Reported (`Paced`) at most once a second. |
//! | a paced client far over its rate (`flood_unread`, `flood_for`) | 1,000 messages waiting to be read, for 30 s | reported when it starts (`Flooding`), disconnected (`ExcessFlood`) |
//! | a client that does not read (`stall`, `backlog`) | 5 s, 4 MiB | disconnected (a v0.6 client is sent a Notice saying why, if its queue has room) |
//! | what waits on all clients together (`max_memory`) | a quarter of the machine's memory; 1 GiB if unknown | the client furthest behind (whose connection has held a message unwritten the longest) is disconnected (`SlowConsumer`; a v0.6 client is sent a Notice saying why, if its queue has room), again until the message fits; what waited for it is dropped |
//!
//! The room speaks v0.5 to every client, and v0.6 (see `docs/PROTOCOL.md`)
//! to a client whose first message is a Hello offering it: acked chats
//! (Say), direct messages, Who, presence announcements and the last
//! `history` messages on joining, each only to a client granted its
//! capability. Credentials in a Hello (or a Login) log in to an account
//! or register one ([`accounts`]), over TLS only unless
//! `plaintext_credentials`; a registered nickname is refused to anyone not
//! logged in to it.
//!
//! The room serves plaintext, TLS, or both side by side ([`serve_on`] with
//! a [`Listener`] each; [`tls`] makes the configurations). A TLS
//! connection joins once its handshake is over, within
//! `handshake_timeout` (10 s); until then it counts against
//! `max_connections` and `max_per_ip` like a member, so handshakes that
//! never finish cannot exhaust the server. Each failure is an
//! [`Event::TlsFailed`]; a TLS client on a plaintext port is disconnected
//! with [`Disconnect::TlsClientHello`].
//!
//! The room also serves QUIC ([`Listener::quic`], [`quic`]), with the same
//! certificate: each QUIC connection's one stream is the byte stream of a
//! chatpipe connection as over TCP, marked secure; its handshake and
//! stream count against the limits and `handshake_timeout` like TLS's, and
//! each failure is an [`Event::QuicFailed`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatpipe::chat::{ChatMessage, PresenceChange, MAX_PAYLOAD_LEN, V0_5};
use chatpipe::{Builder, Sender, TrySendError};
use smol::channel;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncWrite};
use smol::net::{TcpListener, TcpStream};
use smol::stream::StreamExt;

pub mod accounts;
mod backlog;
mod bucket;
pub mod client;
mod event;
pub mod memory;
pub mod quic;
pub mod store;
pub mod tls;
mod v06;
pub mod web;
mod wire;

use bucket::Bucket;
pub use bucket::Rate;
pub use event::{
    Disconnect, Event, HelloRefusal, LoginRefusal, NicknameRefusal, NoticeFailure, QuicFailure,
    Refusal, Request, RequestRefusal, TlsFailure, WebFailure,
};
pub use memory::Usage;
use memory::MESSAGE_OVERHEAD;
use v06::Caps;
use wire::{Frame, Outgoing, Wire};

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
    /// client that cannot keep up is bounded. ([`Config::max_memory`]
    /// bounds what waits on all of them.)
    pub backlog: usize,
    /// How long shutdown waits for clients to close cleanly before
    /// dropping them; and how long a v0.6 client disconnected for being too
    /// slow has to take the Notice that says why, if it could be queued.
    pub grace: Duration,
    /// How many messages a client may send: `None` for no limit. Over it,
    /// the room reads the client's messages more slowly (its socket, then
    /// its sends, wait); it drops none.
    pub rate: Option<Rate>,
    /// A paced client with this many messages or more waiting to be read,
    /// for [`Config::flood_for`] without a break, is disconnected
    /// ([`Disconnect::ExcessFlood`]). Far over any paste a person makes.
    pub flood_unread: usize,
    /// See [`Config::flood_unread`].
    pub flood_for: Duration,
    /// How many of the last room messages (broadcasts) the room keeps, to
    /// send a v0.6 client granted `history` on joining; 0 turns history
    /// off (and the capability is not granted).
    pub history: usize,
    /// A new connection gets the room's traffic from its first message on,
    /// or this long after connecting, whichever comes first: so a v0.6
    /// client, whose first message is a Hello, gets its Welcome before any
    /// v0.5 message, and can take a v0.5 message first as a sign of a v0.5
    /// server. Zero: from connecting on (a v0.6 client's Welcome may then
    /// come after v0.5 messages).
    pub join_window: Duration,
    /// Where the history is kept: a [`store::Store`] (SQLite, so it
    /// survives a restart), or `None` to keep it in memory only. Its own
    /// `keep` bounds what it holds; `history` bounds what a client gets.
    pub store: Option<Arc<store::Store>>,
    /// Connections at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections at once from one IP address; more are closed as soon as
    /// they are accepted.
    pub max_per_ip: usize,
    /// How long a connection to a TLS [`Listener`] has to finish its
    /// handshake before it is closed ([`TlsFailure::Timeout`]): a
    /// slowloris defence, like the frame timeout. Until it finishes, it
    /// counts against `max_connections` and `max_per_ip`. Default 10 s.
    pub handshake_timeout: Duration,
    /// The budget for what waits on slow members, all together, in bytes
    /// (as [`Usage`] counts them): what is queued for a member, in its
    /// backlog and in its connection's queue, until it is written to its
    /// socket. Each member's own share is bounded by `backlog`; this bounds
    /// their sum, whatever the number of members.
    ///
    /// When a message would take the sum over it, the room applies the
    /// slow-consumer rule: it disconnects the member furthest behind, the
    /// one whose connection has held a message unwritten the longest
    /// ([`Disconnect::SlowConsumer`]; a v0.6 client is sent a Notice saying
    /// why, if its queue has room), again until the message fits, and
    /// drops what waited for it. Nobody waits: the others carry on.
    ///
    /// The member furthest behind, rather than whom the message is for or
    /// whoever has the most waiting: a member that reads keeps nothing
    /// waiting for long, however much arrives for it at once, so only a
    /// slow consumer is picked. What members that keep up have in flight
    /// (queued, not yet taken by their tasks) stays a small part of the
    /// budget: a member's task lets the others run once the messages it
    /// handled have queued 1/1024 of it. Only when the budget is reached
    /// does the room look through its members. A budget too small for the
    /// room (below about 16 KiB per member) can pick members that keep up.
    ///
    /// Default: [`memory::default_max_memory`], a quarter of the machine's
    /// memory (or of its cgroup's limit), 1 GiB where that cannot be read.
    /// Never less than one largest message.
    pub max_memory: usize,
    /// Where the room counts what waits on its members against
    /// `max_memory`: keep a clone to watch it. One per room.
    pub usage: Arc<Usage>,
    /// Where connections, disconnections, refusals and errors are
    /// reported; by default each is printed on stderr.
    pub events: Arc<dyn Fn(Event) + Send + Sync>,
    /// The time (by default `Instant::now`) for what the room measures: the
    /// rate limit, and how long a client's queue has stayed full. Waits are
    /// real timers.
    pub clock: Arc<dyn Fn() -> Instant + Send + Sync>,
    /// Registered nicknames and their passwords ([`accounts`]): a
    /// registered nickname is refused to anyone not logged in to it. `None`
    /// (the default): no accounts; credentials are refused and the
    /// `account` capability is not granted.
    pub accounts: Option<Arc<accounts::Accounts>>,
    /// Refuse guests: a client must log in (or register) in its Hello, or
    /// it is closed; v0.5 clients, which cannot, are closed at their first
    /// message or at the end of the join window. Default: off, so v0.5
    /// clients and guests chat under any unregistered nickname.
    pub require_login: bool,
    /// Take credentials over connections that are not encrypted. Default:
    /// off, since a password sent in plaintext is readable by anyone on
    /// the path: they are refused, saying why, except over TLS.
    pub plaintext_credentials: bool,
    /// Login and registration attempts allowed per IP address and per
    /// account; see [`accounts::LoginRate`] for the defaults.
    pub login_rate: accounts::LoginRate,
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
            flood_unread: 1000,
            flood_for: Duration::from_secs(30),
            history: 50,
            store: None,
            join_window: Duration::from_millis(500),
            max_connections: 10_000,
            max_per_ip: 64,
            handshake_timeout: Duration::from_secs(10),
            max_memory: memory::default_max_memory(),
            usage: Arc::default(),
            events: Arc::new(|event| eprintln!("{event}")),
            clock: Arc::new(Instant::now),
            accounts: None,
            require_login: false,
            plaintext_credentials: false,
            login_rate: accounts::LoginRate::default(),
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
            .field("flood_unread", &self.flood_unread)
            .field("flood_for", &self.flood_for)
            .field("history", &self.history)
            .field("max_connections", &self.max_connections)
            .field("max_per_ip", &self.max_per_ip)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_memory", &self.max_memory)
            .field("usage", &self.usage)
            .field("accounts", &self.accounts)
            .field("require_login", &self.require_login)
            .field("plaintext_credentials", &self.plaintext_credentials)
            .field("login_rate", &self.login_rate)
            .finish_non_exhaustive()
    }
}

/// Where the room takes connections: a TCP listener, serving plaintext or
/// TLS (or the browser client, [`web`]), or a QUIC endpoint.
pub struct Listener(Kind);

enum Kind {
    Tcp {
        listener: TcpListener,
        tls: Option<tls::TlsAcceptor>,
        /// Serves the browser client: the page and its WebSocket ([`web`]).
        web: bool,
    },
    /// QUIC, with the TLS configuration the endpoint presents.
    Quic {
        endpoint: quinn::Endpoint,
        tls: Arc<tls::rustls::ServerConfig>,
    },
}

impl Listener {
    /// Plaintext connections.
    pub fn plain(listener: TcpListener) -> Self {
        Listener(Kind::Tcp {
            listener,
            tls: None,
            web: false,
        })
    }

    /// TLS connections, with this server configuration (see [`tls`]): each
    /// joins the room, marked secure, once its handshake is over.
    pub fn tls(listener: TcpListener, config: Arc<tls::rustls::ServerConfig>) -> Self {
        Listener(Kind::Tcp {
            listener,
            tls: Some(tls::TlsAcceptor::from(config)),
            web: false,
        })
    }

    /// The browser client ([`web`]): the page over HTTP, and WebSocket
    /// connections that join the room; over TLS (https, wss) with a
    /// server configuration, marked secure then.
    pub fn web(listener: TcpListener, tls: Option<Arc<tls::rustls::ServerConfig>>) -> Self {
        Listener(Kind::Tcp {
            listener,
            tls: tls.map(tls::TlsAcceptor::from),
            web: true,
        })
    }

    /// QUIC connections on the UDP `socket`, presenting the certificate of
    /// `config` (the same as for [`Listener::tls`]; see [`quic`]): each
    /// joins the room, marked secure, once its handshake is over and its
    /// stream open. Fails if the socket cannot be used, or QUIC cannot use
    /// the configuration.
    pub fn quic(
        socket: std::net::UdpSocket,
        config: Arc<tls::rustls::ServerConfig>,
    ) -> std::io::Result<Self> {
        let endpoint = quic::server_endpoint(socket, &config)?;
        Ok(Listener(Kind::Quic {
            endpoint,
            tls: config,
        }))
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Tcp { listener, tls, web } => f
                .debug_struct("Listener")
                .field("listener", listener)
                .field("tls", &tls.is_some())
                .field("web", web)
                .finish(),
            Kind::Quic { endpoint, .. } => f
                .debug_struct("Listener")
                .field("quic", &endpoint.local_addr().ok())
                .finish(),
        }
    }
}

/// Serves the chat room on `listener` until `shutdown` resolves; then stops
/// accepting, closes every connection gracefully and returns once they are
/// all gone (or `grace` has passed and the rest were dropped).
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    serve_on(vec![Listener::plain(listener)], config, shutdown).await
}

/// [`serve`] on several listeners at once, plaintext or TLS: one room for
/// all of them.
pub async fn serve_on(
    listeners: Vec<Listener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) {
    let room = Arc::new(Room {
        attempts: Mutex::new(accounts::Attempts::new(config.login_rate)),
        config,
        state: Mutex::new(State::default()),
        stamps: AtomicU64::new(0),
        queued_bytes: AtomicU64::new(0),
        history: Mutex::new(VecDeque::new()),
    });
    // Every client task holds a clone, to tell when they have all ended.
    let (alive, all_gone) = channel::bounded::<()>(1);
    // Closed at shutdown: TLS handshakes under way give up.
    let (stopping, stopped) = channel::bounded::<()>(1);
    let ids = Arc::new(AtomicU64::new(0));
    let accepting: Vec<smol::Task<()>> = listeners
        .into_iter()
        .map(|listener| match listener.0 {
            Kind::Tcp { listener, tls, web } => smol::spawn(accept(
                room.clone(),
                listener,
                tls,
                web,
                ids.clone(),
                alive.clone(),
                stopped.clone(),
            )),
            Kind::Quic { endpoint, tls } => smol::spawn(quic::accept(
                room.clone(),
                endpoint,
                tls,
                ids.clone(),
                alive.clone(),
                stopped.clone(),
            )),
        })
        .collect();
    shutdown.await;
    // Each listener goes with its task.
    for task in accepting {
        task.cancel().await;
    }
    drop((stopping, stopped));
    drop(alive);

    // Each member's task sends what waits for it, then closes.
    {
        let mut state = room.lock();
        state.stopping = true;
        let connections = state.members.len();
        room.emit(Event::ShuttingDown { connections });
        for m in state.members.values() {
            // A v0.6 client is told why, after what waits for it.
            if m.version != V0_5 && !m.leaving {
                // Past the limits: a few bytes per member, once.
                let text = v06::SHUTDOWN_NOTICE.to_owned();
                let notice = Outgoing::new(ChatMessage::Notice { text });
                let _ = room.queue(m, notice, false, room.next_stamp());
            }
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
        for m in room.lock().members.values() {
            let _ = m.kick.try_send(Disconnect::ShutdownTimeout);
        }
        let _ = all_gone.recv().await;
    }
    room.emit(Event::Stopped);
}

/// Takes connections on `listener` until cancelled: each within the limits
/// joins the room, a TLS one once its handshake is over.
async fn accept(
    room: Arc<Room>,
    listener: TcpListener,
    tls: Option<tls::TlsAcceptor>,
    web: bool,
    ids: Arc<AtomicU64>,
    alive: channel::Sender<()>,
    stopped: channel::Receiver<()>,
) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                room.emit(Event::AcceptFailed(e));
                // Out of file descriptors, say: do not spin.
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Chat lines are small and latency matters more than packet count;
        // the connection coalesces writes anyway.
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
        let alive = alive.clone();
        if web {
            web::accept(&room, tls.clone(), stream, addr, id, alive, &stopped);
            continue;
        }
        let Some(acceptor) = &tls else {
            if let Err(reason) = room.admit(addr) {
                room.emit(Event::Refused { addr, reason });
                continue;
            }
            // Joined here, not in the task, so that shutdown sees every
            // connection it must close.
            let task = room.join(id, stream, addr, false);
            smol::spawn(async move {
                task.await;
                drop(alive);
            })
            .detach();
            continue;
        };
        let handshaking = match room.admit_handshake(addr) {
            Ok(handshaking) => handshaking,
            Err(reason) => {
                room.emit(Event::Refused { addr, reason });
                continue;
            }
        };
        let (room, acceptor, stopped) = (room.clone(), acceptor.clone(), stopped.clone());
        smol::spawn(async move {
            match handshake(&room, &acceptor, stream, &stopped).await {
                Ok(stream) => {
                    let task = room.join(id, stream, addr, true);
                    // A member now, counted as one.
                    drop(handshaking);
                    task.await;
                }
                Err(failure) => {
                    // Uncounted before it is reported.
                    drop(handshaking);
                    if let Some(reason) = failure {
                        room.emit(Event::TlsFailed { addr, reason });
                    }
                }
            }
            drop(alive);
        })
        .detach();
    }
}

/// A TLS server stream as the room takes it.
type TlsStream = futures_rustls::server::TlsStream<tls::Sniff<TcpStream>>;

/// The server side of a TLS handshake, within `handshake_timeout`: why it
/// failed or ran out of time, or `None` if the room is shutting down.
async fn handshake(
    room: &Room,
    acceptor: &tls::TlsAcceptor,
    stream: TcpStream,
    stopped: &channel::Receiver<()>,
) -> Result<TlsStream, Option<TlsFailure>> {
    let after = room.config.handshake_timeout;
    let accepted = async {
        let stream = tls::Sniff::new(stream);
        Some(Some(acceptor.accept(stream).into_fallible().await))
    };
    let timeout = async {
        smol::Timer::after(after).await;
        Some(None)
    };
    let stop = async {
        let _ = stopped.recv().await;
        None
    };
    match accepted.or(timeout).or(stop).await {
        Some(Some(Ok(stream))) => Ok(stream),
        Some(Some(Err((error, stream)))) => {
            Err(Some(TlsFailure::from_handshake(error, stream.first())))
        }
        Some(None) => Err(Some(TlsFailure::Timeout { after })),
        None => Err(None),
    }
}

/// A connection counted against the limits while its TLS handshake runs;
/// uncounted when dropped.
struct Handshaking {
    room: Arc<Room>,
    ip: IpAddr,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut state = self.room.lock();
        state.handshakes -= 1;
        state.uncount(self.ip);
    }
}

struct Room {
    config: Config,
    state: Mutex<State>,
    /// The next message's stamp: the order in which the room queued what
    /// it queued for members (a broadcast's copies share one).
    stamps: AtomicU64,
    /// The bytes it has queued for members, as the budget counts them.
    queued_bytes: AtomicU64,
    /// The last `config.history` broadcasts, oldest first, as `(at_ms,
    /// from, text)`: see `Room::remember` and `Room::recent`. Locked only
    /// while `state` is (so it never changes between a broadcast and the
    /// history it leaves behind).
    history: Mutex<VecDeque<(u64, String, String)>>,
    /// Login attempts, for their rate limit.
    attempts: Mutex<accounts::Attempts>,
}

/// The room's members, behind its one lock.
#[derive(Default)]
struct State {
    /// By member id, which grows with each connection: in join order.
    members: HashMap<u64, Member>,
    /// Who holds each nickname: `members[&nicks[n]].nickname == Some(n)`,
    /// for every nickname held.
    nicks: HashMap<String, u64>,
    /// How many members each remote IP address has, and connections in a
    /// TLS handshake from it: the count `admit` checks, kept on joining and
    /// leaving so that checking it does not walk the members. No entry for
    /// an address without any.
    per_ip: HashMap<IpAddr, usize>,
    /// How many broadcasts the room has remembered in all: those since a
    /// member joined are the newest of `Room::recent`, and reached it live.
    said: u64,
    /// Nicknames being registered right now (hashing takes a while): no
    /// one else takes or registers them meanwhile.
    registering: HashSet<String>,
    /// Connections in a TLS handshake, not members yet (`Handshaking`):
    /// they count against the limits as members do, in `per_ip` too.
    handshakes: usize,
    /// Shutdown has begun: a member that joins now (its TLS handshake just
    /// ended) is closed at once, as the others are.
    stopping: bool,
}

impl State {
    /// Adds a member, counting it for its address.
    fn add(&mut self, id: u64, member: Member) {
        *self.per_ip.entry(member.addr.ip()).or_insert(0) += 1;
        if let Some(old) = self.members.insert(id, member) {
            // Ids are never reused; were one, the count stays right.
            self.uncount(old.addr.ip());
        }
    }

    /// Takes a member out, and out of its address's count.
    fn remove(&mut self, id: u64) -> Option<Member> {
        let member = self.members.remove(&id)?;
        self.uncount(member.addr.ip());
        Some(member)
    }

    fn uncount(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// How many members `ip` has.
    fn members_from(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }
}

struct Member {
    addr: SocketAddr,
    nickname: Option<String>,
    /// Broadcasts on their way to this member's connection: one copy of
    /// each, shared by every member it is for, with its stamp.
    outbox: backlog::Sender<Stamped>,
    /// How much waits for it.
    queued: Arc<Queued>,
    /// It is being disconnected for being too slow: nothing more is
    /// queued for it, and what waited for it no longer counts.
    evicted: AtomicBool,
    /// Tells the member's task to drop its connection, and why.
    kick: channel::Sender<Disconnect>,
    /// Its connection (`None` in unit tests, which have no connection):
    /// the way past the backlog for a broadcast when the member's task
    /// has nothing from the room in hand (parked on an empty backlog), so
    /// the message overtakes nothing; and what tells what was written.
    direct: Option<Sender<Wire>>,
    /// The protocol version it speaks: 0.5 until a Welcome.
    version: u16,
    /// What its Welcome granted (nothing before).
    caps: Caps,
    /// Whether it has sent a message: a Hello is valid only as the first.
    spoke: bool,
    /// It is being disconnected: what it sends is ignored, and it is no
    /// longer listed or sent to.
    leaving: bool,
    /// `State::said` when it started listening.
    said_at_join: u64,
    /// It gets the room's traffic: from its first message on (a Hello's
    /// Welcome first), or `join_window` after connecting, so that nothing
    /// of v0.5 reaches a v0.6 client before its Welcome.
    listening: bool,
    /// Its stream is encrypted (TLS): credentials may travel on it.
    secure: bool,
    /// The account it logged in to (or registered), if any.
    account: Option<String>,
    /// Why the room is closing its connection, cleanly: reported instead
    /// of [`Disconnect::Closed`].
    closing: Option<Disconnect>,
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

/// A message queued for a member, with its stamp (`Room::stamps`): the
/// order in which the room queued it.
type Stamped = (Arc<Outgoing>, u64);

/// No stamp: nothing old waits.
const NO_STAMP: u64 = u64::MAX;

/// What waits for a member, counted by the room (on queueing) and its task
/// (as messages move on and are written).
#[derive(Debug)]
struct Queued {
    /// Bytes of text in its backlog (`outbox`), which `Config::backlog`
    /// bounds.
    text: AtomicUsize,
    /// What waits for it as the budget counts it (`Usage`): messages in its
    /// backlog, and in its connection's queue until written, each its
    /// weight plus `MESSAGE_OVERHEAD`.
    cost: AtomicUsize,
    /// The stamp of the oldest message its connection took and has not
    /// written yet, as last settled (`NO_STAMP` for none): the smaller, the
    /// longer this member has been behind. A member that keeps up has none
    /// for long.
    oldest: AtomicU64,
    /// What was moved to its connection and may not be written yet, oldest
    /// first (`Queued::settle`).
    moved: Mutex<VecDeque<Moved>>,
}

/// A message in a member's connection's queue, still counted.
#[derive(Debug)]
struct Moved {
    /// Its place in the connection's order (`Sender::accepted` just after
    /// it was queued, or later): written once `Sender::flushed` reaches it.
    place: u64,
    cost: usize,
    stamp: u64,
}

impl Default for Queued {
    fn default() -> Self {
        Queued {
            text: AtomicUsize::new(0),
            cost: AtomicUsize::new(0),
            oldest: AtomicU64::new(NO_STAMP),
            moved: Mutex::new(VecDeque::new()),
        }
    }
}

impl Queued {
    fn lock_moved(&self) -> std::sync::MutexGuard<'_, VecDeque<Moved>> {
        // Nothing panics while it is held.
        self.moved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message that cost `cost`, stamped `stamp`, is in the connection's
    /// queue at `place` (`Sender::accepted` after it): counted until the
    /// connection has written it.
    fn moved(&self, place: u64, cost: usize, stamp: u64) {
        let mut moved = self.lock_moved();
        if moved.is_empty() {
            self.oldest.store(stamp, Ordering::Relaxed);
        }
        // Places only grow: a later read of `accepted` is no smaller.
        let place = moved.back().map_or(place, |m| m.place.max(place));
        moved.push_back(Moved { place, cost, stamp });
    }

    /// Takes out what the connection has written, `flushed` being its
    /// `Sender::flushed`, and returns what that cost. Settled by whoever
    /// looks next (the room as it queues for this member or looks for the
    /// slowest consumer, the member's task as it moves more), so no task
    /// wakes just to count a write.
    fn settle(&self, flushed: u64) -> usize {
        if self.oldest.load(Ordering::Relaxed) == NO_STAMP {
            // Nothing moved waits (the common case for a member that
            // keeps up): no lock.
            return 0;
        }
        let mut moved = self.lock_moved();
        let mut cost = 0;
        while moved.front().is_some_and(|m| m.place <= flushed) {
            cost += moved.pop_front().map_or(0, |m| m.cost);
        }
        if cost > 0 {
            let oldest = moved.front().map_or(NO_STAMP, |m| m.stamp);
            self.oldest.store(oldest, Ordering::Relaxed);
        }
        cost
    }
}

/// What a message weighs in a backlog: the bytes of its strings.
fn weight(msg: &ChatMessage) -> usize {
    match msg {
        ChatMessage::Broadcast { from, text }
        | ChatMessage::Private { from, text }
        | ChatMessage::History { from, text, .. } => from.len() + text.len(),
        ChatMessage::Presence {
            nickname,
            new_nickname,
            ..
        } => nickname.len() + new_nickname.len(),
        ChatMessage::Notice { text } => text.len(),
        _ => 0,
    }
}

/// Why a message could not go into a member's backlog.
enum Undelivered {
    /// It is too slow (its backlog is over the limit, or it is the furthest
    /// behind when the budget is full): it is being disconnected.
    TooSlow,
    /// Its backlog is closed: it is leaving.
    Leaving,
}

impl Room {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: nothing
        // here panics between two changes that belong together.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: Event) {
        (self.config.events)(event);
    }

    fn now(&self) -> Instant {
        (self.config.clock)()
    }

    fn usage(&self) -> &Usage {
        &self.config.usage
    }

    /// The budget for what waits on members: `max_memory`, but room for
    /// one largest message at least.
    fn budget(&self) -> usize {
        self.config
            .max_memory
            .max(MAX_PAYLOAD_LEN + MESSAGE_OVERHEAD)
    }

    /// Queues `msg` in member `m`'s backlog, without waiting, within its
    /// backlog limit and the room's budget. Over its backlog limit, it is
    /// disconnected instead; over the budget, the members furthest behind
    /// are (the slow-consumer rule), it too if it is one of them.
    /// Called with the state locked (`state`), as everything that queues
    /// for members is: so the budget holds (the count only falls
    /// meanwhile). `straight`: it may skip the backlog (`queue`); broadcasts only.
    fn deliver(
        &self,
        state: &State,
        m: &Member,
        msg: Arc<Outgoing>,
        straight: bool,
    ) -> Result<(), Undelivered> {
        self.deliver_stamped(state, m, msg, straight, self.next_stamp())
    }

    /// A new stamp: later than every one before.
    fn next_stamp(&self) -> u64 {
        self.stamps.fetch_add(1, Ordering::Relaxed)
    }

    /// [`Room::deliver`], stamped `stamp`.
    fn deliver_stamped(
        &self,
        state: &State,
        m: &Member,
        msg: Arc<Outgoing>,
        straight: bool,
        stamp: u64,
    ) -> Result<(), Undelivered> {
        if m.evicted.load(Ordering::Relaxed) {
            return Err(Undelivered::TooSlow);
        }
        let size = weight(&msg.msg);
        let backlog = self.config.backlog;
        if m.queued.text.load(Ordering::Relaxed) + size > backlog {
            self.evict(m, |_| Disconnect::TooFarBehind { backlog });
            return Err(Undelivered::TooSlow);
        }
        if !self.make_room(state, m, size + MESSAGE_OVERHEAD) {
            return Err(Undelivered::TooSlow);
        }
        self.queue(m, msg, straight, stamp)
    }

    /// Makes room under the budget for `cost` more bytes: while it does not
    /// fit, disconnects the slowest consumer, which frees its share at
    /// once. Returns false if that was `m`, whom the message is for. Each
    /// round disconnects one more member, so it ends.
    ///
    /// The slowest consumer is the member whose connection has held a
    /// message unwritten the longest (the oldest stamp); among members with
    /// none held (their connections write all they take), the one with the
    /// most waiting. A member that keeps up has nothing old waiting,
    /// however much arrives for it at once.
    fn make_room(&self, state: &State, m: &Member, cost: usize) -> bool {
        let budget = self.budget();
        if self.usage().waiting() + cost > budget {
            // What the connections wrote since it was last counted is no
            // longer waiting, and no stamp says otherwise.
            for v in state.members.values() {
                self.settle(v);
            }
        }
        while self.usage().waiting() + cost > budget {
            let slowest = state
                .members
                .values()
                .filter(|v| !v.evicted.load(Ordering::Relaxed))
                .filter(|v| v.queued.cost.load(Ordering::Relaxed) > 0)
                .min_by_key(|v| {
                    let oldest = v.queued.oldest.load(Ordering::Relaxed);
                    let cost = v.queued.cost.load(Ordering::Relaxed);
                    (oldest, std::cmp::Reverse(cost))
                });
            // Nobody else holds anything (only if the count went wrong):
            // the message does not fit, and whom it is for goes.
            let slowest = slowest.unwrap_or(m);
            self.evict(slowest, |waiting| Disconnect::SlowConsumer {
                budget,
                waiting,
            });
            if std::ptr::eq(slowest, m) {
                return false;
            }
        }
        true
    }

    /// Counts what member `m`'s connection has written as no longer
    /// waiting.
    fn settle(&self, m: &Member) {
        if let Some(conn) = &m.direct {
            let written = m.queued.settle(conn.flushed());
            if written > 0 {
                self.release(&m.queued, written);
            }
        }
    }

    /// Queues `msg`, stamped `stamp`, in member `m`'s backlog and counts
    /// it, past any limit (`deliver` checks them). Fails only when the
    /// member is leaving.
    fn queue(
        &self,
        m: &Member,
        msg: Arc<Outgoing>,
        straight: bool,
        stamp: u64,
    ) -> Result<(), Undelivered> {
        self.settle(m);
        let size = weight(&msg.msg);
        let cost = size + MESSAGE_OVERHEAD;
        m.queued.cost.fetch_add(cost, Ordering::Relaxed);
        self.usage().add(cost);
        self.queued_bytes.fetch_add(cost as u64, Ordering::Relaxed);
        // A `straight` message goes into the connection's queue itself
        // when the member's task has nothing in hand: one task's turn less
        // between a broadcast and its write. Only `broadcast` asks for it:
        // broadcasts come from other members, while what the room queues
        // for a member as it handles that member's own request (a Welcome,
        // the history after a login, a Notice the task reports) stays
        // behind the reply the task sends (the task moves it on after).
        // And not near the budget, where what waits in a backlog is what
        // the slow-consumer rule frees (a message in a connection's queue
        // is written even to a member then disconnected, before its
        // Notice).
        let roomy = || self.usage().waiting() <= self.budget() / 2;
        let direct = |(msg, stamp): Stamped| match &m.direct {
            Some(conn) if straight && roomy() => {
                match conn.try_send(Frame::Shared(msg)) {
                    Ok(()) => {
                        m.queued.moved(conn.accepted(), cost, stamp);
                        Ok(())
                    }
                    // Through the backlog then: its task waits for room, or
                    // reports why it cannot be sent.
                    Err(e) => match e.into_inner() {
                        Frame::Shared(msg) => Err((msg, stamp)),
                        Frame::Own(_) => unreachable!("sent as shared"),
                    },
                }
            }
            _ => Err((msg, stamp)),
        };
        // Its text counts in the backlog from before it is in it (under
        // the backlog's lock, which the member's task takes it under), so
        // the task never takes off more than was counted.
        let counted = || {
            m.queued.text.fetch_add(size, Ordering::Relaxed);
        };
        // Unbounded, as the counts bound it.
        m.outbox
            .send_or((msg, stamp), direct, counted)
            .map_err(|_| {
                self.release(&m.queued, cost);
                Undelivered::Leaving
            })
    }

    /// Counts `cost` less waiting for a member (`queued`) and in the room:
    /// no more than it has, as an eviction wrote off what it had.
    fn release(&self, queued: &Queued, cost: usize) {
        let had = queued
            .cost
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(cost))
            })
            .unwrap_or_else(|c| c);
        self.usage().sub(had.min(cost));
    }

    /// Disconnects member `m` for being too slow, for the reason `why`
    /// gives from what waited for it: its task drops the connection and
    /// what waits for it, moments later. From now on nothing more is
    /// queued for it, and what waited for it no longer counts against the
    /// budget. A second call does nothing.
    fn evict(&self, m: &Member, why: impl FnOnce(usize) -> Disconnect) {
        if m.evicted.swap(true, Ordering::Relaxed) {
            return;
        }
        let waiting = m.queued.cost.swap(0, Ordering::Relaxed);
        self.usage().sub(waiting);
        // A full kick channel: it is being disconnected already.
        let _ = m.kick.try_send(why(waiting));
    }

    /// Sends `text` from member `id` to every other member, without ever
    /// waiting, and remembers it for the history. Fails only if `id` is
    /// leaving. `straight`: no burst waits behind it, so it may skip the
    /// backlogs of members whose tasks hold nothing (`queue`).
    fn broadcast(&self, id: u64, text: String, straight: bool) -> Result<(), RequestRefusal> {
        let mut state = self.lock();
        let from = match state.members.get(&id) {
            Some(m) if !m.leaving => m.name(),
            _ => return Err(RequestRefusal::Leaving),
        };
        if self.config.history > 0 {
            self.remember(v06::now_ms(), &from, &text);
            state.said += 1;
        }
        let msg = Outgoing::new(ChatMessage::Broadcast { from, text });
        // One stamp for all: every copy is as old as the others.
        let stamp = self.next_stamp();
        for (_, m) in state.members.iter().filter(|(&other, _)| other != id) {
            if !m.leaving && m.listening {
                let _ = self.deliver_stamped(&state, m, msg.clone(), straight, stamp);
            }
        }
        Ok(())
    }

    /// Whether a new connection from `addr` is within the limits.
    fn admit(&self, addr: SocketAddr) -> Result<(), Refusal> {
        self.within_limits(&self.lock(), addr)
    }

    /// Admits a connection from `addr` that must finish a TLS handshake
    /// before it joins: it counts against the limits until it is dropped.
    fn admit_handshake(self: &Arc<Self>, addr: SocketAddr) -> Result<Handshaking, Refusal> {
        let mut state = self.lock();
        self.within_limits(&state, addr)?;
        state.handshakes += 1;
        *state.per_ip.entry(addr.ip()).or_insert(0) += 1;
        Ok(Handshaking {
            room: self.clone(),
            ip: addr.ip(),
        })
    }

    fn within_limits(&self, state: &State, addr: SocketAddr) -> Result<(), Refusal> {
        let max = self.config.max_connections;
        if state.members.len() + state.handshakes >= max {
            return Err(Refusal::ServerFull { max });
        }
        let (ip, max) = (addr.ip(), self.config.max_per_ip);
        if state.members_from(ip) >= max {
            return Err(Refusal::TooManyFromIp { ip, max });
        }
        Ok(())
    }

    /// Gives member `id` the nickname unless another member holds it, it
    /// is registered to an account the member is not logged in to, or
    /// being registered.
    fn set_nickname(&self, id: u64, nickname: &str) -> Result<(), NicknameRefusal> {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(m) = state.members.get(&id) else {
            return Err(NicknameRefusal::Leaving);
        };
        let owned = m.account.as_deref() == Some(nickname);
        if self.config.require_login && m.account.is_none() {
            return Err(NicknameRefusal::LoginRequired);
        }
        let registered = self
            .config
            .accounts
            .as_ref()
            .is_some_and(|a| a.is_registered(nickname));
        if !owned && (registered || state.registering.contains(nickname)) {
            let nickname = nickname.to_owned();
            return Err(NicknameRefusal::Registered { nickname });
        }
        if state
            .nicks
            .get(nickname)
            .is_some_and(|&holder| holder != id)
        {
            let nickname = nickname.to_owned();
            return Err(NicknameRefusal::Taken { nickname });
        }
        self.take_nickname(state, id, nickname);
        Ok(())
    }

    /// Gives member `id` the nickname, announcing it, once it may have it.
    fn take_nickname(&self, state: &mut State, id: u64, nickname: &str) {
        let Some(m) = state.members.get_mut(&id) else {
            return;
        };
        let old = m.nickname.replace(nickname.to_owned());
        if old.as_deref() == Some(nickname) {
            return;
        }
        if let Some(old) = &old {
            state.nicks.remove(old);
        }
        state.nicks.insert(nickname.to_owned(), id);
        let news = match old {
            None => v06::presence(PresenceChange::Joined, nickname.to_owned(), String::new()),
            Some(old) => v06::presence(PresenceChange::Renamed, old, nickname.to_owned()),
        };
        self.announce(state, id, news);
    }

    /// Member `id` logged in to (or registered) the account of `nickname`:
    /// it takes the nickname, from whoever holds it (another connection of
    /// the same account's: a client reconnecting before its old connection
    /// timed out), who is disconnected.
    fn log_in(&self, id: u64, nickname: &str) -> Result<(), LoginRefusal> {
        let mut state = self.lock();
        let state = &mut *state;
        match state.members.get_mut(&id) {
            Some(m) if !m.leaving => m.account = Some(nickname.to_owned()),
            _ => return Err(LoginRefusal::Leaving),
        }
        if let Some(&holder) = state.nicks.get(nickname).filter(|&&h| h != id) {
            state.nicks.remove(nickname);
            if let Some(old) = state.members.get_mut(&holder) {
                // It leaves without announcing a nickname that stays.
                old.nickname = None;
                let _ = old.kick.try_send(Disconnect::LoggedInElsewhere);
            }
            // Others saw no one leave: the newcomer takes the name quietly.
            if let Some(m) = state.members.get_mut(&id) {
                if m.nickname.is_none() {
                    m.nickname = Some(nickname.to_owned());
                    state.nicks.insert(nickname.to_owned(), id);
                    return Ok(());
                }
            }
        }
        self.take_nickname(state, id, nickname);
        Ok(())
    }

    /// Takes member `id` out of the room; returns its nickname, and why
    /// the room was closing it if it was.
    fn leave(&self, id: u64) -> (Option<String>, Option<Disconnect>) {
        let mut state = self.lock();
        let Some(member) = state.remove(id) else {
            return (None, None);
        };
        // What still waited for it goes with it.
        self.release(&member.queued, usize::MAX);
        let nickname = member.nickname;
        if let Some(nick) = &nickname {
            if state.nicks.get(nick) == Some(&id) {
                state.nicks.remove(nick);
            }
            let news = v06::presence(PresenceChange::Left, nick.clone(), String::new());
            self.announce(&state, id, news);
        }
        (nickname, member.closing)
    }

    /// Adds a connection to the room; the returned future serves it until
    /// it ends, then takes it out. `secure`: the stream is encrypted (TLS), so credentials may travel on it.
    fn join<S>(
        self: &Arc<Self>,
        id: u64,
        stream: S,
        addr: SocketAddr,
        secure: bool,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, incoming, conn) = Builder::new()
            .keepalive_interval(Some(self.config.keepalive))
            .build(stream, Wire);
        let (outbox, broadcasts) = backlog::unbounded();
        let queued = Arc::new(Queued::default());
        let (kick, kicked) = channel::bounded(1);
        let kick_self = kick.clone();
        {
            let mut state = self.lock();
            let member = Member {
                addr,
                nickname: None,
                outbox,
                queued: queued.clone(),
                evicted: AtomicBool::new(false),
                kick,
                direct: Some(sender.clone()),
                version: V0_5,
                caps: Caps::default(),
                spoke: false,
                leaving: false,
                said_at_join: state.said,
                listening: self.config.join_window.is_zero() && !self.config.require_login,
                secure,
                account: None,
                closing: None,
            };
            state.add(id, member);
            if state.stopping {
                // Shutdown began as its TLS handshake ended: it closes now,
                // as the others do.
                if let Some(m) = state.members.get(&id) {
                    m.outbox.close();
                }
            }
        }
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
            let stalled = forward(&room, addr, broadcasts, &queued, &sender);
            let mut incoming = incoming;
            let mut pace = room
                .config
                .rate
                .map(|r| Pace::new(Bucket::new(r, room.now())));
            let reading = async {
                // Since the task last let the others run: messages handled,
                // and bytes they queued for members.
                let (mut handled, mut queued) = (0u64, 0u64);
                let yield_bytes = room.budget() as u64 / YIELD_SHARE;
                while let Some(Ok(frame)) = incoming.next().await {
                    let msg = frame.into_message();
                    if let Some(pace) = &mut pace {
                        if let Err(reason) = pace.wait(&room, addr, &incoming).await {
                            if let Some(reason) = reason {
                                kick_self.try_send(reason).ok();
                            }
                            // Received, never read: counted, not lost silently.
                            let unread = incoming.buffered() + 1;
                            room.emit(Event::UnreadDiscarded { addr, unread });
                            break;
                        }
                    }
                    let before = room.queued_bytes.load(Ordering::Relaxed);
                    // With less than a turn's worth read behind it, a
                    // broadcast may go straight to idle members'
                    // connections (one task's turn less before its write).
                    // In a deeper burst it goes through their backlogs, and
                    // each member's task moves the burst on at once, to be
                    // written together.
                    let straight = incoming.buffered() < YIELD_MESSAGES as usize;
                    handle(&room, id, addr, &sender, msg, straight).await;
                    // Messages that arrived together are all ready at once:
                    // let the other members' tasks run now and then, but not
                    // after every message, or each broadcast becomes a
                    // write of its own instead of being coalesced. In a
                    // large room, after a few broadcasts already, so that
                    // what members that keep up have in flight (queued, not
                    // yet taken by their tasks) stays a small part of the
                    // budget.
                    handled += 1;
                    queued += room
                        .queued_bytes
                        .load(Ordering::Relaxed)
                        .wrapping_sub(before);
                    if handled >= YIELD_MESSAGES || queued >= yield_bytes {
                        (handled, queued) = (0, 0);
                        smol::future::yield_now().await;
                    }
                }
            };
            // Owns the driver: once it is over, the driver is dropped, which
            // ends `reading` too.
            let ended = async {
                let mut driver = std::pin::pin!(driver);
                let listen = async {
                    smol::Timer::after(room.config.join_window).await;
                    if room.start_listening(id) {
                        std::future::pending::<()>().await;
                    }
                    // Silent, where guests are refused.
                    Disconnect::LoginRequired
                };
                let reason = driver.as_mut().or(kicked).or(stalled).or(listen).await;
                // Too slow: a v0.6 client is told why, if there is room.
                if let Some(text) = reason.notice() {
                    v06::farewell(&room, id, addr, &sender, text, driver).await;
                }
                reason
            };
            let (reason, ()) = smol::future::zip(ended, reading).await;
            let reason = reason.on_plaintext(secure).on_web();

            let (nickname, closing) = room.leave(id);
            let reason = match (reason, closing) {
                (Disconnect::Closed, Some(why)) => why,
                (reason, _) => reason,
            };
            room.emit(Event::Disconnected {
                addr,
                nickname,
                reason,
            });
        }
    }
}

/// Flood control: a client over its rate is read more slowly, so its
/// messages arrive late but all of them, in order, and TCP pushes back on
/// its sends. Only one that keeps `flood_unread` messages waiting for
/// `flood_for` is disconnected.
struct Pace {
    bucket: Bucket,
    /// When the client was last reported paced.
    reported: Option<Instant>,
    /// Since when `flood_unread` or more of its messages have waited.
    flooding_since: Option<Instant>,
}

impl Pace {
    fn new(bucket: Bucket) -> Self {
        Pace {
            bucket,
            reported: None,
            flooding_since: None,
        }
    }

    /// Waits until the client may send one more message. `Err` says why
    /// it is disconnected instead, or `None` if its connection ended.
    async fn wait(
        &mut self,
        room: &Room,
        addr: SocketAddr,
        incoming: &chatpipe::Incoming<Wire>,
    ) -> Result<(), Option<Disconnect>> {
        let (unread, lasting) = (room.config.flood_unread, room.config.flood_for);
        // Each round waits a little, and ends with a token, the flood
        // limit, or the connection's end.
        loop {
            let now = room.now();
            let Err(ready) = self.bucket.take(now) else {
                if incoming.buffered() < unread {
                    self.flooding_since = None;
                }
                return Ok(());
            };
            if incoming.close_reason().is_some() {
                return Err(None);
            }
            if self
                .reported
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
            {
                self.reported = Some(now);
                let rate = self.bucket.rate;
                room.emit(Event::Paced { addr, rate });
            }
            if incoming.buffered() >= unread {
                let since = match self.flooding_since {
                    Some(since) => since,
                    None => {
                        room.emit(Event::Flooding {
                            addr,
                            unread,
                            lasting,
                        });
                        *self.flooding_since.insert(now)
                    }
                };
                if now.saturating_duration_since(since) >= lasting {
                    return Err(Some(Disconnect::ExcessFlood { unread, lasting }));
                }
            } else {
                self.flooding_since = None;
            }
            // Short waits, so a room whose clock is not the real one (tests)
            // notices when it moves.
            let wait = ready.saturating_duration_since(now);
            smol::Timer::after(wait.min(PACE_POLL)).await;
        }
    }
}

/// A member's task lets the others run after handling this many of its
/// messages...
const YIELD_MESSAGES: u64 = 32;
/// ...or fewer, once they queued this share of the budget for members (a
/// broadcast queues a copy's worth for each member; others' tasks, running
/// meanwhile on other threads, may add theirs, which only makes it yield
/// sooner).
const YIELD_SHARE: u64 = 1024;

/// The longest one wait of a paced client lasts before the room looks at
/// its clock again.
const PACE_POLL: Duration = Duration::from_millis(50);

/// Moves broadcasts from a member's backlog to its connection. Resolves,
/// with the reason, only if the connection's queue stays full for `stall`;
/// once the backlog is closed and empty (at shutdown), closes the
/// connection. What it moves still counts against the budget until the
/// connection has written it.
async fn forward(
    room: &Room,
    addr: SocketAddr,
    broadcasts: backlog::Receiver<Stamped>,
    queued: &Queued,
    sender: &Sender<Wire>,
) -> Disconnect {
    // What was moved to the connection and may not be written yet stays
    // counted in `queued` (`Queued::moved`) until settled: here as more is
    // moved, and by the room (`Room::settle`).
    let stall = room.config.stall;
    // When the queue was first found full, since it last had room.
    let mut full_since = None;
    // Taken from the backlog all at once, then moved one by one.
    let mut batch = VecDeque::new();
    'moving: while broadcasts.recv_all(&mut batch).await {
        let written = queued.settle(sender.flushed());
        if written > 0 {
            room.release(queued, written);
        }
        while let Some((shared, stamp)) = batch.pop_front() {
            let size = weight(&shared.msg);
            queued.text.fetch_sub(size, Ordering::Relaxed);
            let cost = size + MESSAGE_OVERHEAD;
            // A Notice is the last message before a close: reported either way.
            let notice = match &shared.msg {
                ChatMessage::Notice { text } => Some(text.clone()),
                _ => None,
            };
            // Not copied: every member it is for writes its one encoding.
            let msg = Frame::Shared(shared);
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
                        None => {
                            if let Some(text) = notice {
                                let reason = NoticeFailure::QueueFull;
                                room.emit(Event::NoticeNotSent { addr, text, reason });
                            }
                            return Disconnect::Stalled { stall };
                        }
                    }
                }
                Err(TrySendError::Failed(e)) => Err(e.error),
            };
            if sent.is_ok() {
                queued.moved(sender.accepted(), cost, stamp);
            } else {
                room.release(queued, cost);
            }
            match (sent, notice) {
                (Ok(()), None) => {}
                (Ok(()), Some(text)) => room.emit(Event::NoticeSent { addr, text }),
                (Err(error), Some(text)) => {
                    let fatal = error.is_fatal();
                    let reason = NoticeFailure::Failed(error);
                    room.emit(Event::NoticeNotSent { addr, text, reason });
                    if fatal {
                        break 'moving;
                    }
                }
                // This message cannot go out (too large for a frame); the next
                // ones can.
                (Err(error), None) if !error.is_fatal() => {
                    room.emit(Event::BroadcastNotSent { addr, error });
                }
                // The connection is ending; its driver says why.
                (Err(_), None) => break 'moving,
            }
        }
    }
    sender.close();
    std::future::pending().await
}

async fn handle(
    room: &Room,
    id: u64,
    addr: SocketAddr,
    sender: &Sender<Wire>,
    msg: ChatMessage,
    straight: bool,
) {
    // From a client being disconnected, nothing more is taken.
    let is_hello = matches!(msg, ChatMessage::Hello { .. });
    let Some(first) = room.first_message(id, is_hello) else {
        return;
    };
    if !is_hello && room.must_log_in(id) {
        // A guest where guests are refused: it said no Hello, so it cannot
        // log in. A v0.5 nickname request is told why; then it goes.
        if let ChatMessage::SetNickname {
            request_id,
            nickname,
        } = msg
        {
            let reason = NicknameRefusal::LoginRequired;
            let message = reason.to_string();
            room.emit(Event::NicknameRefused {
                addr,
                nickname,
                reason,
            });
            let nak = ChatMessage::Nak {
                request_id,
                message,
            };
            let _ = sender.send(nak.into()).await;
        }
        room.close_for(id, Disconnect::LoginRequired);
        let _ = sender.flush().await;
        sender.close();
        return;
    }
    match msg {
        ChatMessage::Chat { text } => {
            let _ = room.broadcast(id, text, straight);
        }
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
            let _ = sender.send(reply.into()).await;
        }
        // A server-to-client message: meaningless here.
        ChatMessage::Broadcast { .. } => {
            room.emit(Event::UnexpectedBroadcast { addr });
        }
        ChatMessage::Hello {
            request_id,
            versions,
            capabilities,
            credentials,
        } => {
            let hello = v06::Hello {
                request_id,
                versions,
                capabilities,
                credentials,
                first,
            };
            v06::hello(room, id, addr, sender, hello).await;
        }
        ChatMessage::Say { request_id, text } => {
            let reply = v06::say(room, id, addr, request_id, text, straight);
            let _ = sender.send(reply.into()).await;
        }
        ChatMessage::Direct {
            request_id,
            to,
            text,
        } => {
            let reply = v06::direct(room, id, addr, request_id, to, text);
            let _ = sender.send(reply.into()).await;
        }
        ChatMessage::Who { request_id } => {
            let reply = v06::who(room, id, addr, request_id);
            let _ = sender.send(reply.into()).await;
        }
        ChatMessage::Login {
            request_id,
            credentials,
        } => {
            let reply = v06::login(room, id, addr, request_id, &credentials).await;
            let _ = sender.send(reply.into()).await;
        }
        // Keepalives and responses never reach the application.
        ChatMessage::Keepalive | ChatMessage::Ack { .. } | ChatMessage::Nak { .. } => {}
        // Server-to-client messages of v0.6: meaningless here, skipped as a
        // v0.5 peer skips unknown types.
        ChatMessage::Welcome { .. }
        | ChatMessage::Notice { .. }
        | ChatMessage::Private { .. }
        | ChatMessage::Members { .. }
        | ChatMessage::Presence { .. }
        | ChatMessage::History { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member from `addr`, without a connection: its backlog and kick
    /// channels' receiving ends come with it.
    fn member(addr: &str) -> (Member, Receivers) {
        let (outbox, backlog) = backlog::unbounded();
        let (kick, kicked) = channel::bounded(1);
        let m = Member {
            addr: addr.parse().unwrap(),
            nickname: None,
            outbox,
            queued: Arc::default(),
            evicted: AtomicBool::new(false),
            kick,
            direct: None,
            version: V0_5,
            caps: Caps::default(),
            spoke: false,
            leaving: false,
            said_at_join: 0,
            listening: true,
            secure: false,
            account: None,
            closing: None,
        };
        (m, Receivers { backlog, kicked })
    }

    struct Receivers {
        backlog: backlog::Receiver<Stamped>,
        kicked: channel::Receiver<Disconnect>,
    }

    fn room(config: Config) -> Room {
        Room {
            config: Config {
                events: Arc::new(|_| {}),
                ..config
            },
            state: Mutex::new(State::default()),
            stamps: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            history: Mutex::new(VecDeque::new()),
            attempts: Mutex::new(accounts::Attempts::new(Default::default())),
        }
    }

    /// `per_ip` as counted from scratch.
    fn recount(state: &State) -> HashMap<IpAddr, usize> {
        let mut counts = HashMap::new();
        for m in state.members.values() {
            *counts.entry(m.addr.ip()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn per_ip_counts_follow_joins_and_leaves() {
        let mut state = State::default();
        let ips = ["10.0.0.1", "10.0.0.2", "[::1]", "192.168.1.9"];
        let mut ids = Vec::new();
        let mut kept = Vec::new();
        // A fixed pseudo-random walk of joins and leaves.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for id in 1..=2_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ip = ips[(x % 4) as usize];
            if x.is_multiple_of(3) && !ids.is_empty() {
                let gone: u64 = ids.swap_remove((x / 3) as usize % ids.len());
                assert!(state.remove(gone).is_some());
                assert!(state.remove(gone).is_none(), "removed twice");
            } else {
                let (m, r) = member(&format!("{ip}:{}", 1000 + id % 60_000));
                state.add(id, m);
                ids.push(id);
                kept.push(r);
            }
            assert_eq!(state.per_ip, recount(&state), "after step {id}");
        }
        assert!(state.per_ip.values().all(|&n| n > 0), "no empty entries");
        for id in ids {
            state.remove(id);
        }
        assert!(state.per_ip.is_empty());
        assert_eq!(state.members_from("10.0.0.1".parse().unwrap()), 0);
    }

    #[test]
    fn admit_counts_per_ip_without_walking_the_members() {
        let room = room(Config {
            max_per_ip: 2,
            max_connections: 3,
            ..Config::default()
        });
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let mut kept = Vec::new();
        for (id, addr) in [(1, a), (2, a)] {
            assert!(room.admit(addr).is_ok());
            let (m, r) = member(&addr.to_string());
            room.lock().add(id, m);
            kept.push(r);
        }
        let ip = a.ip();
        assert_eq!(room.admit(a), Err(Refusal::TooManyFromIp { ip, max: 2 }));
        assert!(room.admit(b).is_ok());
        assert!(room.leave(1).0.is_none(), "no nickname");
        assert!(room.admit(a).is_ok(), "room again once one left");
        let (m, r) = member("10.0.0.2:2");
        room.lock().add(3, m);
        kept.push(r);
        let (m, r) = member("10.0.0.1:2");
        room.lock().add(4, m);
        kept.push(r);
        assert_eq!(room.admit(b), Err(Refusal::ServerFull { max: 3 }));
    }

    fn text(n: usize) -> Arc<Outgoing> {
        Outgoing::new(ChatMessage::Broadcast {
            from: "x".into(),
            text: "y".repeat(n - 1),
        })
    }

    /// What waits for each member adds up to the room's count.
    fn assert_counts_add_up(room: &Room) {
        let state = room.lock();
        let sum: usize = state
            .members
            .values()
            .map(|m| m.queued.cost.load(Ordering::Relaxed))
            .sum();
        assert_eq!(sum, room.usage().waiting());
    }

    #[test]
    fn over_the_budget_the_member_furthest_behind_is_disconnected() {
        const SIZE: usize = 1000;
        const COST: usize = SIZE + MESSAGE_OVERHEAD;
        let budget = 100 * COST;
        let room = room(Config {
            max_memory: budget,
            backlog: 1 << 20,
            ..Config::default()
        });
        let mut rx = HashMap::new();
        for id in 1..=4 {
            let (m, r) = member(&format!("10.0.0.{id}:5"));
            room.lock().add(id, m);
            rx.insert(id, r);
        }
        let deliver = |id: u64| {
            let state = room.lock();
            room.deliver(&state, &state.members[&id], text(SIZE), false)
        };
        // What each member's connection holds unwritten since (a stamp),
        // as its task would say.
        let behind_since = |id: u64, stamp: u64| {
            let state = room.lock();
            state.members[&id]
                .queued
                .oldest
                .store(stamp, Ordering::Relaxed);
        };
        let kicked = |id: u64| rx[&id].kicked.try_recv().ok();
        // 2 has 60 waiting, all taken just now; 3 has 30, its connection
        // stuck on an old one; 1 has 10. The budget is full.
        for (id, n) in [(2, 60), (3, 30), (1, 10)] {
            for _ in 0..n {
                assert!(deliver(id).is_ok());
            }
        }
        behind_since(2, NO_STAMP);
        behind_since(3, 5);
        behind_since(1, 95);
        assert_eq!(room.usage().waiting(), budget);
        assert_counts_add_up(&room);
        // One more for 1: 3, the furthest behind, goes, though 2 has more
        // waiting; what 3 had is freed.
        assert!(deliver(1).is_ok());
        let why = kicked(3).unwrap();
        assert!(
            matches!(why, Disconnect::SlowConsumer { budget: b, waiting } if b == budget && waiting == 30 * COST),
            "{why:?}"
        );
        assert_eq!(room.usage().waiting(), 71 * COST);
        assert_eq!(room.usage().peak_waiting(), budget);
        assert_counts_add_up(&room);
        assert!(kicked(1).is_none() && kicked(2).is_none());
        // Nothing more is queued for it, and its task taking what its
        // backlog held, or leaving, changes no count.
        assert!(matches!(deliver(3), Err(Undelivered::TooSlow)));
        while let Some((msg, _)) = rx[&3].backlog.try_recv() {
            let cost = weight(&msg.msg) + MESSAGE_OVERHEAD;
            room.release(&room.lock().members[&3].queued, cost);
        }
        assert_eq!(room.usage().waiting(), 71 * COST);
        assert!(room.leave(3).0.is_none());
        assert_eq!(room.usage().waiting(), 71 * COST);
        assert_counts_add_up(&room);

        // 1 fills the budget itself: then, behind since 95, it is the one
        // to go (2 keeps up), and its message is not queued.
        for _ in 0..29 {
            assert!(deliver(1).is_ok());
        }
        assert!(matches!(deliver(1), Err(Undelivered::TooSlow)));
        let why = kicked(1).unwrap();
        assert!(
            matches!(why, Disconnect::SlowConsumer { waiting, .. } if waiting == 40 * COST),
            "{why:?}"
        );
        assert_eq!(room.usage().waiting(), 60 * COST);
        assert_counts_add_up(&room);

        // Nobody's connection holds anything old: the one with the most
        // waiting goes.
        for _ in 0..39 {
            assert!(deliver(4).is_ok());
        }
        assert_eq!(room.usage().waiting(), 99 * COST);
        assert!(deliver(4).is_ok());
        assert!(deliver(4).is_ok());
        assert!(
            matches!(kicked(2), Some(Disconnect::SlowConsumer { waiting, .. }) if waiting == 60 * COST)
        );
        assert!(kicked(4).is_none());
        assert_eq!(room.usage().waiting(), 41 * COST);
        assert!(room.usage().peak_waiting() <= budget);

        // What a connection writes counts as gone; and leaving takes the
        // rest off.
        room.release(&room.lock().members[&4].queued, COST);
        assert_eq!(room.usage().waiting(), 40 * COST);
        for id in [1, 2, 4] {
            room.leave(id);
        }
        assert_eq!(room.usage().waiting(), 0);
        assert!(room.usage().peak_waiting() <= budget);
    }

    #[test]
    fn over_its_backlog_a_member_is_disconnected_and_its_share_freed() {
        let room = room(Config {
            backlog: 4000,
            ..Config::default()
        });
        let (m, rx) = member("10.0.0.1:5");
        room.lock().add(1, m);
        let deliver = || {
            let state = room.lock();
            room.deliver(&state, &state.members[&1], text(1000), false)
        };
        for _ in 0..4 {
            assert!(deliver().is_ok());
        }
        assert!(matches!(deliver(), Err(Undelivered::TooSlow)));
        assert!(matches!(
            rx.kicked.try_recv(),
            Ok(Disconnect::TooFarBehind { backlog: 4000 })
        ));
        assert_eq!(room.usage().waiting(), 0, "written off");
        assert!(matches!(deliver(), Err(Undelivered::TooSlow)));
        assert!(rx.kicked.is_empty(), "kicked once");
        assert_counts_add_up(&room);
    }

    #[test]
    fn the_budget_always_fits_one_largest_message() {
        let room = room(Config {
            max_memory: 0,
            ..Config::default()
        });
        let (m, rx) = member("10.0.0.1:5");
        room.lock().add(1, m);
        let state = room.lock();
        let m = &state.members[&1];
        assert!(room.deliver(&state, m, text(60_000), false).is_ok());
        // A second does not fit: it has the most, so it goes.
        assert!(room.deliver(&state, m, text(60_000), false).is_err());
        assert!(matches!(
            rx.kicked.try_recv(),
            Ok(Disconnect::SlowConsumer { budget, .. }) if budget == MAX_PAYLOAD_LEN + MESSAGE_OVERHEAD
        ));
    }
}
