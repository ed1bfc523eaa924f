//! What the room reports, and why it refuses or drops a client: typed, so
//! that tests match on them; `Display` gives the server's log lines and the
//! text of its Naks.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chatpipe::chat::CredentialsError;

use crate::accounts::AccountError;
use crate::Rate;

/// Something the room did, given to [`Config::events`](crate::Config::events).
/// Displayed, it is the server's log line.
#[derive(Debug)]
pub enum Event {
    /// A client joined the room.
    Connected { addr: SocketAddr },
    /// A new connection was over a limit and closed at once.
    Refused { addr: SocketAddr, reason: Refusal },
    /// A client took a nickname.
    Nickname { addr: SocketAddr, nickname: String },
    /// A client asked for a nickname and got a Nak.
    NicknameRefused {
        addr: SocketAddr,
        nickname: String,
        reason: NicknameRefusal,
    },
    /// A client went over its rate: the room reads its messages more
    /// slowly (none is dropped), and says so at most once a second per
    /// client.
    Paced { addr: SocketAddr, rate: Rate },
    /// A paced client has `unread` of its messages (the flood limit)
    /// waiting to be read: it is disconnected as an excess flood
    /// ([`Disconnect::ExcessFlood`]) if that lasts `lasting`. Once per
    /// flood.
    Flooding {
        addr: SocketAddr,
        unread: usize,
        lasting: Duration,
    },
    /// A paced client's connection ended (or it was disconnected as a
    /// flood) with `unread` of its messages received but never read into
    /// the room.
    UnreadDiscarded { addr: SocketAddr, unread: usize },
    /// A broadcast could not go to `addr` (too large for a frame, say); the
    /// next ones can.
    BroadcastNotSent {
        addr: SocketAddr,
        error: chatpipe::Error,
    },
    /// A client sent a Broadcast, which only the server sends; ignored.
    UnexpectedBroadcast { addr: SocketAddr },
    /// A client said Hello and was welcomed to v0.6 with `capabilities`.
    Welcomed {
        addr: SocketAddr,
        capabilities: Vec<String>,
    },
    /// A client's Hello got a Nak. For
    /// [`NoCommonVersion`](HelloRefusal::NoCommonVersion) the room then
    /// closes the connection; for [`NotFirst`](HelloRefusal::NotFirst) the
    /// connection carries on as it was.
    HelloRefused {
        addr: SocketAddr,
        reason: HelloRefusal,
    },
    /// A client granted `history` was sent `sent` messages of history on
    /// joining; `skipped` older ones did not fit its backlog.
    HistorySent {
        addr: SocketAddr,
        sent: usize,
        skipped: usize,
    },
    /// A client's Direct went into the backlog of the member called `to`.
    DirectDelivered { addr: SocketAddr, to: String },
    /// A client's v0.6 request got a Nak saying why.
    RequestRefused {
        addr: SocketAddr,
        request: Request,
        reason: RequestRefusal,
    },
    /// A Notice went to a v0.6 client as its last message before the room
    /// closed the connection (too slow, or shutting down). Reported once
    /// it is queued on the connection, whose clean close writes it; when
    /// the room drops the connection instead (too slow), once it is
    /// written.
    NoticeSent { addr: SocketAddr, text: String },
    /// A Notice could not go to a v0.6 client before its connection
    /// closed.
    NoticeNotSent {
        addr: SocketAddr,
        text: String,
        reason: NoticeFailure,
    },
    /// A client left the room.
    Disconnected {
        addr: SocketAddr,
        nickname: Option<String>,
        reason: Disconnect,
    },
    /// Shutdown began: the room closes its `connections`.
    ShuttingDown { connections: usize },
    /// Shutdown is over: every connection is gone.
    Stopped,
    /// Accepting a connection failed; the room tries again shortly.
    AcceptFailed(io::Error),
    /// A client registered `nickname` and is logged in to it.
    Registered { addr: SocketAddr, nickname: String },
    /// A client logged in to the account of `nickname`.
    LoggedIn { addr: SocketAddr, nickname: String },
    /// A client's login or registration (in a Hello or a Login) failed:
    /// the address is logged with each failure, for whoever watches for
    /// guessing.
    LoginFailed {
        addr: SocketAddr,
        /// The nickname it was for (empty if the credentials were
        /// unreadable).
        nickname: String,
        reason: LoginRefusal,
    },
    /// A connection to a TLS listener did not finish its handshake, and
    /// was closed.
    TlsFailed {
        addr: SocketAddr,
        reason: TlsFailure,
    },
    /// A connection to a QUIC listener did not finish its handshake or
    /// open its stream, and was closed.
    QuicFailed {
        addr: SocketAddr,
        reason: QuicFailure,
    },
    /// A web listener answered an HTTP request that was not a WebSocket
    /// upgrade (the page, or an error status), and closed the connection.
    WebRequest {
        addr: SocketAddr,
        path: String,
        status: u16,
    },
    /// A connection to a web listener was closed before it joined: its
    /// HTTP request was missing, too slow, too large or not HTTP.
    WebFailed {
        addr: SocketAddr,
        reason: WebFailure,
    },
}

/// Why a connection to a QUIC listener was closed before it joined.
#[derive(Debug)]
pub enum QuicFailure {
    /// No handshake and stream within `handshake_timeout`.
    Timeout { after: Duration },
    /// The handshake failed (the client refused our certificate, say), or
    /// the stream did not start as chatpipe's.
    Failed(chatpipe::quic::QuicError),
}

/// Why a connection to a web listener was closed before it joined.
#[derive(Debug)]
pub enum WebFailure {
    /// No whole request head within `handshake_timeout` (a slowloris).
    Timeout { after: Duration },
    /// The head was over `max` bytes.
    HeadTooLarge { max: usize },
    /// What the peer sent is not HTTP (a chat client on the web port,
    /// say); `first` is what it started with (up to 8 bytes).
    NotHttp { error: String, first: Vec<u8> },
    /// The peer closed after `read` bytes, before its request was whole.
    ClosedEarly { read: usize },
    /// Reading the request or writing the answer failed.
    Io(io::Error),
}

/// Why a connection to a TLS listener was closed before it joined.
#[derive(Debug)]
pub enum TlsFailure {
    /// No handshake within `handshake_timeout`: a peer that opened the
    /// connection and sent too little (a slowloris), or a plaintext client
    /// that waits for the server to speak first.
    Timeout { after: Duration },
    /// What the peer sent is not TLS: a plaintext client on the TLS port.
    /// `first` is what it started with (up to 8 bytes).
    NotTls { first: Vec<u8> },
    /// The handshake failed (the client refused our certificate, say).
    Failed(io::Error),
}

impl TlsFailure {
    /// Why a handshake failed with `error`, after the peer sent `first`.
    pub(crate) fn from_handshake(error: io::Error, first: &[u8]) -> Self {
        // Every TLS connection starts with a handshake record, 0x16.
        match first.first() {
            Some(&byte) if byte != 0x16 => TlsFailure::NotTls {
                first: first.to_vec(),
            },
            _ => TlsFailure::Failed(error),
        }
    }
}

/// Why a login or registration failed; displayed, it is the Nak's message.
#[derive(Debug, Clone, PartialEq)]
pub enum LoginRefusal {
    /// The credentials are not `login`/`register`, a nickname, a password.
    Malformed(CredentialsError),
    /// They came over a connection that is not encrypted, and the server
    /// does not take passwords in plaintext.
    Plaintext,
    /// The server keeps no accounts.
    NoAccounts,
    /// Too many attempts from this address or for this account.
    RateLimited { retry_in: Duration },
    /// Wrong password, no such account, already registered, or the store
    /// failed.
    Account(AccountError),
    /// Registering: another client holds the nickname (only its holder
    /// may register it).
    InUse { nickname: String },
    /// Registering: another client is registering it right now.
    BeingRegistered { nickname: String },
    /// The client is being disconnected.
    Leaving,
}

/// Why a client left the room.
#[derive(Debug, Clone)]
pub enum Disconnect {
    /// The connection closed cleanly, by either side (at shutdown too).
    Closed,
    /// The connection failed.
    Error(chatpipe::Error),
    /// Over `backlog` bytes of broadcasts waited for it.
    TooFarBehind { backlog: usize },
    /// A slow consumer: what waits on all the members together reached the
    /// room's `budget` (`Config::max_memory`), and this one had been
    /// behind the longest (its connection held the oldest message not yet
    /// written), with `waiting` bytes waiting for it as the budget counts
    /// them. What waited for it was dropped.
    SlowConsumer { budget: usize, waiting: usize },
    /// Its connection's queue stayed full for `stall`.
    Stalled { stall: Duration },
    /// Still open when the grace period of shutdown ran out.
    ShutdownTimeout,
    /// While paced, `unread` or more of its messages waited to be read for
    /// `lasting`: it sends far more than its rate, for long.
    ExcessFlood { unread: usize, lasting: Duration },
    /// The server requires a login (`Config::require_login`) and the
    /// client did not log in: it spoke v0.5, or not at all within the join
    /// window.
    LoginRequired,
    /// Another connection logged in to the account of its nickname (the
    /// same person reconnecting, say) and took the nickname over.
    LoggedInElsewhere,
    /// On a plaintext port, its first bytes were a TLS ClientHello (read
    /// as a frame header, `16 03 0x ..`, far too large): a TLS client on
    /// the wrong port.
    TlsClientHello,
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `max` connections were open already.
    ServerFull { max: usize },
    /// `max` connections from `ip` were open already.
    TooManyFromIp { ip: IpAddr, max: usize },
}

/// Why a Hello got a Nak; displayed, it is the Nak's message.
#[derive(Debug, Clone, PartialEq)]
pub enum HelloRefusal {
    /// The client does not speak 0.6 (it offered `offered`): the room
    /// closes the connection after the Nak.
    NoCommonVersion { offered: Vec<u16> },
    /// The Hello was not the client's first message; the connection
    /// carries on with what it had.
    NotFirst,
    /// The server requires a login and the Hello carried no credentials:
    /// the room closes the connection after the Nak.
    LoginRequired,
    /// Its credentials were refused: the room closes the connection after
    /// the Nak.
    Login(LoginRefusal),
}

/// A v0.6 request, as [`Event::RequestRefused`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Say,
    Direct,
    Who,
    Login,
}

/// Why a v0.6 request (Say, Direct, Who) got a Nak; displayed, it is the
/// Nak's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestRefusal {
    /// The request needs a capability the client was not granted (it did
    /// not ask for it in a Hello).
    NotGranted { capability: &'static str },
    /// No member holds the nickname a Direct was for.
    NoSuchMember { nickname: String },
    /// The member called `nickname` was not granted `direct`: its client
    /// would skip a Private.
    CannotReceive { nickname: String },
    /// The member called `nickname` is so far behind that it is being
    /// disconnected: the Direct was not queued for it.
    RecipientTooFarBehind { nickname: String },
    /// The member called `nickname` is leaving the room.
    RecipientLeaving { nickname: String },
    /// The client itself is being disconnected.
    Leaving,
}

/// Why a [`Notice`](chatpipe::chat::ChatMessage::Notice) could not go to
/// a client before the room closed its connection.
#[derive(Debug, Clone)]
pub enum NoticeFailure {
    /// Its connection's queue was full: the client was not reading.
    QueueFull,
    /// Queued, but not written within `waited` (the room's `grace`).
    NotWritten { waited: Duration },
    /// The connection failed first.
    Failed(chatpipe::Error),
}

/// Why a nickname request got a Nak; displayed, it is the Nak's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicknameRefusal {
    /// Another client holds it.
    Taken { nickname: String },
    /// It has an account, and the client is not logged in to it.
    Registered { nickname: String },
    /// The server requires a login, and the client has none.
    LoginRequired,
    /// The client is being disconnected.
    Leaving,
}

impl Event {
    /// True for the events that mean something was discarded: a broadcast
    /// not sent, a client's messages never read, or a client dropped with
    /// what waited for it. In normal operation there are none.
    pub fn is_discard(&self) -> bool {
        match self {
            Event::BroadcastNotSent { .. } | Event::UnreadDiscarded { .. } => true,
            Event::Disconnected { reason, .. } => matches!(
                reason,
                Disconnect::TooFarBehind { .. }
                    | Disconnect::SlowConsumer { .. }
                    | Disconnect::Stalled { .. }
                    | Disconnect::ExcessFlood { .. }
                    | Disconnect::ShutdownTimeout
            ),
            _ => false,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Connected { addr } => write!(f, "{addr} connected"),
            Event::Refused { addr, reason } => write!(f, "{addr} refused: {reason}"),
            Event::Nickname { addr, nickname } => write!(f, "{addr} is now known as {nickname:?}"),
            Event::NicknameRefused {
                addr,
                nickname,
                reason,
            } => write!(f, "{addr} refused {nickname:?}: {reason}"),
            Event::UnreadDiscarded { addr, unread } => {
                write!(
                    f,
                    "{addr}: {unread} message(s) received but never read into the room"
                )
            }
            Event::Paced { addr, rate } => write!(
                f,
                "{addr} paced: over {}/s (bursts of {}), its messages are read more slowly",
                rate.per_second, rate.burst
            ),
            Event::Flooding {
                addr,
                unread,
                lasting,
            } => write!(
                f,
                "{addr} flooding: {unread} of its messages wait to be read; disconnected if that lasts {lasting:?}"
            ),
            Event::BroadcastNotSent { addr, error } => {
                write!(f, "broadcast to {addr} not sent: {error}")
            }
            Event::UnexpectedBroadcast { addr } => write!(f, "{addr} sent a Broadcast; ignored"),
            Event::Welcomed { addr, capabilities } => write!(
                f,
                "{addr} speaks 0.6, granted [{}]",
                capabilities.join(", ")
            ),
            Event::HelloRefused { addr, reason } => {
                write!(f, "{addr} Hello refused: {reason}")
            }
            Event::HistorySent {
                addr,
                sent,
                skipped: 0,
            } => write!(f, "{addr} was sent {sent} message(s) of history"),
            Event::HistorySent {
                addr,
                sent,
                skipped,
            } => write!(
                f,
                "{addr} was sent {sent} message(s) of history; {skipped} older one(s) did not fit its backlog"
            ),
            Event::DirectDelivered { addr, to } => {
                write!(f, "{addr} sent a direct message to {to:?}")
            }
            Event::RequestRefused {
                addr,
                request,
                reason,
            } => write!(f, "{addr} {request:?} refused: {reason}"),
            Event::NoticeSent { addr, text } => write!(f, "told {addr}: {text}"),
            Event::NoticeNotSent { addr, text, reason } => {
                write!(f, "could not tell {addr} {text:?}: {reason}")
            }
            Event::Disconnected {
                addr,
                nickname: Some(nickname),
                reason,
            } => write!(f, "{addr} ({nickname}) disconnected: {reason}"),
            Event::Disconnected {
                addr,
                nickname: None,
                reason,
            } => write!(f, "{addr} disconnected: {reason}"),
            Event::ShuttingDown { connections } => {
                write!(f, "shutting down: closing {connections} connection(s)")
            }
            Event::Stopped => f.write_str("stopped"),
            Event::AcceptFailed(e) => write!(f, "accept failed: {e}"),
            Event::Registered { addr, nickname } => {
                write!(f, "{addr} registered {nickname:?}")
            }
            Event::LoggedIn { addr, nickname } => write!(f, "{addr} logged in as {nickname:?}"),
            Event::LoginFailed {
                addr,
                nickname,
                reason,
            } => write!(f, "{addr} login as {nickname:?} failed: {reason}"),
            Event::TlsFailed { addr, reason } => write!(f, "{addr} TLS handshake failed: {reason}"),
            Event::QuicFailed { addr, reason } => {
                write!(f, "{addr} QUIC handshake failed: {reason}")
            }
            Event::WebRequest { addr, path, status } => write!(f, "{addr} GET {path:?}: {status}"),
            Event::WebFailed { addr, reason } => write!(f, "{addr} web request failed: {reason}"),
        }
    }
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disconnect::Closed => f.write_str("closed cleanly"),
            Disconnect::Error(e) => write!(f, "error: {e}"),
            Disconnect::TooFarBehind { backlog } => {
                write!(
                    f,
                    "too slow: over {backlog} bytes of broadcasts wait for it"
                )
            }
            Disconnect::SlowConsumer { budget, waiting } => write!(
                f,
                "slow consumer: what waits on clients reached the budget of {budget} bytes, \
                 and this one, with {waiting} bytes waiting, was the furthest behind"
            ),
            Disconnect::Stalled { stall } => {
                write!(f, "too slow: its queue stayed full for {stall:?}")
            }
            Disconnect::ShutdownTimeout => f.write_str("did not close in time at shutdown"),
            Disconnect::ExcessFlood { unread, lasting } => write!(
                f,
                "excess flood: {unread} or more messages waited to be read for {lasting:?}"
            ),
            Disconnect::LoginRequired => f.write_str("not logged in, and the server requires it"),
            Disconnect::LoggedInElsewhere => {
                f.write_str("its account logged in on another connection")
            }
            Disconnect::TlsClientHello => f.write_str(
                "it sent a TLS ClientHello on a plaintext port (a TLS client: \
                 serve TLS with --tls-cert/--tls-key, or --tls-listen)",
            ),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ServerFull { max } => write!(f, "server full ({max} connections)"),
            Refusal::TooManyFromIp { ip, max } => {
                write!(f, "too many connections from {ip} ({max})")
            }
        }
    }
}

impl Disconnect {
    /// What the room tells a v0.6 client it disconnects for this reason,
    /// in a Notice; `None` when it does not (the connection is gone, or
    /// the client was told at the start of shutdown).
    pub fn notice(&self) -> Option<String> {
        match self {
            Disconnect::TooFarBehind { backlog } => Some(format!(
                "disconnecting you: you are too slow, over {backlog} bytes of messages wait for you"
            )),
            Disconnect::SlowConsumer { waiting, .. } => Some(format!(
                "disconnecting you: you are too slow, the server's memory for messages waiting \
                 on clients is full, and you are the furthest behind ({waiting} bytes wait for you)"
            )),
            Disconnect::Stalled { stall } => Some(format!(
                "disconnecting you: you are too slow, you took no message for {stall:?}"
            )),
            Disconnect::ExcessFlood { unread, lasting } => Some(format!(
                "disconnecting you: excess flood, {unread} or more of your messages waited to be read for {lasting:?}"
            )),
            Disconnect::LoggedInElsewhere => Some(
                "disconnecting you: your account logged in on another connection".to_owned(),
            ),
            Disconnect::LoginRequired
            | Disconnect::Closed
            | Disconnect::Error(_)
            | Disconnect::ShutdownTimeout
            | Disconnect::TlsClientHello => None,
        }
    }

    /// This reason, or [`Disconnect::TlsClientHello`] if it is a frame too
    /// large that is really a TLS record on a plaintext (`!secure`)
    /// connection.
    pub(crate) fn on_plaintext(self, secure: bool) -> Self {
        match &self {
            Disconnect::Error(chatpipe::Error::FrameTooLarge { len, .. })
                if !secure
                    && crate::tls::tls_record(*len) == Some(crate::tls::TlsRecord::Handshake) =>
            {
                Disconnect::TlsClientHello
            }
            _ => self,
        }
    }

    /// This reason, with a WebSocket message that is not chat bytes (a
    /// [`BadMessage`](crate::web::BadMessage), which reaches the connection
    /// as an I/O error) made the malformed-message error a bad frame is.
    pub(crate) fn on_web(self) -> Self {
        match &self {
            Disconnect::Error(e @ chatpipe::Error::Io(_)) => match crate::web::BadMessage::of(e) {
                Some(bad) => Disconnect::Error(chatpipe::Error::Malformed(Arc::new(bad.clone()))),
                None => self,
            },
            _ => self,
        }
    }
}

impl fmt::Display for HelloRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelloRefusal::NoCommonVersion { .. } => {
                f.write_str("no common protocol version (this server speaks 0.5 and 0.6)")
            }
            HelloRefusal::NotFirst => {
                f.write_str("a Hello must be the first message of a connection")
            }
            HelloRefusal::LoginRequired => f.write_str(LOGIN_REQUIRED),
            HelloRefusal::Login(reason) => reason.fmt(f),
        }
    }
}

impl fmt::Display for RequestRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestRefusal::NotGranted { capability } => write!(
                f,
                "capability {capability:?} not granted: ask for it in your Hello"
            ),
            RequestRefusal::NoSuchMember { nickname } => {
                write!(f, "no member is called {nickname}")
            }
            RequestRefusal::CannotReceive { nickname } => {
                write!(f, "{nickname} cannot receive direct messages")
            }
            RequestRefusal::RecipientTooFarBehind { nickname } => {
                write!(f, "{nickname} is too far behind and is being disconnected")
            }
            RequestRefusal::RecipientLeaving { nickname } => {
                write!(f, "{nickname} is leaving the room")
            }
            RequestRefusal::Leaving => f.write_str("you are being disconnected"),
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsFailure::Timeout { after } => write!(f, "no handshake within {after:?}"),
            TlsFailure::NotTls { first } => {
                f.write_str("not TLS: it started")?;
                for byte in first {
                    write!(f, " {byte:02x}")?;
                }
                f.write_str(" (a plaintext client on the TLS port)")
            }
            TlsFailure::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for QuicFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuicFailure::Timeout { after } => {
                write!(f, "no handshake and stream within {after:?}")
            }
            QuicFailure::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for WebFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WebFailure::Timeout { after } => write!(f, "no request within {after:?}"),
            WebFailure::HeadTooLarge { max } => write!(f, "request head over {max} bytes"),
            WebFailure::NotHttp { error, first } => {
                write!(f, "not HTTP ({error}): it started")?;
                for byte in first {
                    write!(f, " {byte:02x}")?;
                }
                Ok(())
            }
            WebFailure::ClosedEarly { read } => {
                write!(f, "closed after {read} bytes, before its request was whole")
            }
            WebFailure::Io(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for NoticeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoticeFailure::QueueFull => f.write_str("its queue is full"),
            NoticeFailure::NotWritten { waited } => {
                write!(f, "not written within {waited:?}")
            }
            NoticeFailure::Failed(e) => write!(f, "the connection failed: {e}"),
        }
    }
}

impl fmt::Display for NicknameRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NicknameRefusal::Taken { nickname } => {
                write!(
                    f,
                    "nickname {nickname:?} is already taken by another client"
                )
            }
            NicknameRefusal::Registered { nickname } => {
                write!(f, "nickname {nickname:?} is registered: log in to use it")
            }
            NicknameRefusal::LoginRequired => f.write_str(LOGIN_REQUIRED),
            NicknameRefusal::Leaving => f.write_str("you are being disconnected"),
        }
    }
}

/// What a client that must log in and did not is told.
const LOGIN_REQUIRED: &str =
    "this server requires a login: log in or register with a v0.6 client over TLS";

impl fmt::Display for LoginRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoginRefusal::Malformed(e) => write!(f, "credentials refused: {e}"),
            LoginRefusal::Plaintext => f.write_str(
                "credentials refused: this connection is not encrypted, and a password sent \
                 over it can be read on the way; connect with TLS",
            ),
            LoginRefusal::NoAccounts => f.write_str("this server keeps no accounts"),
            LoginRefusal::RateLimited { retry_in } => write!(
                f,
                "too many login attempts: try again in {} s",
                retry_in.as_secs().max(1)
            ),
            LoginRefusal::Account(e) => e.fmt(f),
            LoginRefusal::InUse { nickname } => {
                write!(f, "{nickname} is in use by another client")
            }
            LoginRefusal::BeingRegistered { nickname } => {
                write!(f, "{nickname} is being registered by another client")
            }
            LoginRefusal::Leaving => f.write_str("you are being disconnected"),
        }
    }
}
