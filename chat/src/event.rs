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
    /// While paced, `unread` or more of its messages waited to be read for
    /// `lasting`: it sends far more than its rate, for long.
    ExcessFlood { unread: usize, lasting: Duration },
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
            Disconnect::ExcessFlood { unread, lasting } => write!(
                f,
                "excess flood: {unread} or more messages waited to be read for {lasting:?}"
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

impl fmt::Display for NicknameRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NicknameRefusal::Taken { nickname } => {
                write!(
                    f,
                    "nickname {nickname:?} is already taken by another client"
                )
            }
            NicknameRefusal::Leaving => f.write_str("you are being disconnected"),
        }
    }
}
