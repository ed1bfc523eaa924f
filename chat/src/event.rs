//! What the room reports, and why it refuses or drops a client: typed, so
//! that tests match on them; `Display` gives the server's log lines and the
//! text of its Naks.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

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
    /// A client asked for a nickname and got a Nak (not logged when over the
    /// rate: `RateLimited` counts those).
    NicknameRefused {
        addr: SocketAddr,
        nickname: String,
        reason: NicknameRefusal,
    },
    /// A client's messages over its rate were dropped: `dropped` of them
    /// since the last report, at most one report a second per client.
    RateLimited {
        addr: SocketAddr,
        dropped: u64,
        rate: Rate,
    },
    /// A broadcast could not go to `addr` (too large for a frame, say); the
    /// next ones can.
    BroadcastNotSent {
        addr: SocketAddr,
        error: chatpipe::Error,
    },
    /// A client sent a Broadcast, which only the server sends; ignored.
    UnexpectedBroadcast { addr: SocketAddr },
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
    /// Its connection's queue stayed full for `stall`.
    Stalled { stall: Duration },
    /// Still open when the grace period of shutdown ran out.
    ShutdownTimeout,
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `max` connections were open already.
    ServerFull { max: usize },
    /// `max` connections from `ip` were open already.
    TooManyFromIp { ip: IpAddr, max: usize },
}

/// Why a nickname request got a Nak; displayed, it is the Nak's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicknameRefusal {
    /// Another client holds it.
    Taken { nickname: String },
    /// The request was over the client's rate.
    RateLimited,
    /// The client is being disconnected.
    Leaving,
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
            Event::RateLimited {
                addr,
                dropped,
                rate,
            } => write!(
                f,
                "{addr} rate-limited: dropped {dropped} message(s) over {}/s (bursts of {})",
                rate.per_second, rate.burst
            ),
            Event::BroadcastNotSent { addr, error } => {
                write!(f, "broadcast to {addr} not sent: {error}")
            }
            Event::UnexpectedBroadcast { addr } => write!(f, "{addr} sent a Broadcast; ignored"),
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
            Disconnect::Stalled { stall } => {
                write!(f, "too slow: its queue stayed full for {stall:?}")
            }
            Disconnect::ShutdownTimeout => f.write_str("did not close in time at shutdown"),
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

impl fmt::Display for NicknameRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NicknameRefusal::Taken { nickname } => {
                write!(
                    f,
                    "nickname {nickname:?} is already taken by another client"
                )
            }
            NicknameRefusal::RateLimited => f.write_str("rate limited: slow down"),
            NicknameRefusal::Leaving => f.write_str("you are being disconnected"),
        }
    }
}
