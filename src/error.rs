//! The one error type, and the per-operation errors that hand a message back.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error from a [`Protocol`](crate::Protocol)'s encoder or decoder.
pub type BoxError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why a connection, or one operation on it, failed.
///
/// Cheap to clone: the one reason a connection ended is reported to every
/// handle (senders, the incoming stream, pending requests, the driver).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading from or writing to the byte stream failed.
    #[error("i/o error: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The peer announced a frame over the maximum: the connection closes,
    /// detected from the 4 header bytes alone.
    #[error("the peer sent a frame of {len} bytes, over the maximum of {max}")]
    FrameTooLarge {
        /// The length announced.
        len: u64,
        /// The configured maximum.
        max: usize,
    },
    /// A message to send encodes to a payload over the maximum: it fails
    /// alone, and the connection carries on.
    #[error("message of {len} bytes is over the maximum frame of {max}")]
    MessageTooLarge {
        /// The encoded payload's length.
        len: u64,
        /// The configured maximum.
        max: usize,
    },
    /// The peer sent a payload the protocol could not decode.
    #[error("malformed message: {0}")]
    Malformed(#[source] BoxError),
    /// The protocol could not encode an outgoing message (for that message
    /// only; the connection carries on).
    #[error("cannot encode message: {0}")]
    Encode(#[source] BoxError),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({missing} bytes missing)")]
    UnexpectedEof {
        /// Bytes the unfinished frame still lacked.
        missing: usize,
    },
    /// Nothing at all arrived from the peer for this long.
    #[error("idle timeout: nothing received for {0:?}")]
    IdleTimeout(Duration),
    /// No response arrived for a request within its timeout.
    #[error("request timed out after {0:?}")]
    RequestTimeout(Duration),
    /// A frame was started but not completed within this long (slow sender).
    #[error("frame timeout: a frame took longer than {0:?} to arrive")]
    FrameTimeout(Duration),
    /// A write made no progress for this long (the peer does not read).
    #[error("write timeout: no progress for {0:?}")]
    WriteTimeout(Duration),
    /// The connection was closed cleanly (by either side) before the
    /// operation could complete.
    #[error("connection closed")]
    Closed,
    /// The peer broke the protocol's rules, e.g. answered a request that was
    /// never made.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A request could not be issued: the message is not a request, its id
    /// is already outstanding, or the protocol makes no ids for
    /// [`Sender::call`](crate::Sender::call).
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// The response to a [`Sender::call`](crate::Sender::call) did not have
    /// the form the call expects.
    #[error("the response does not answer the call")]
    UnexpectedResponse,
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

impl Error {
    /// True for the clean end of a connection, as opposed to a failure.
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed)
    }

    /// True if the connection is gone; false if only the one operation
    /// failed and the connection carries on.
    ///
    /// Only these concern one operation: [`Error::MessageTooLarge`],
    /// [`Error::Encode`], [`Error::RequestTimeout`],
    /// [`Error::InvalidRequest`] and [`Error::UnexpectedResponse`].
    ///
    /// ```
    /// # async fn f(sender: &chatpipe::Sender<chatpipe::raw::Raw>, msg: chatpipe::raw::RawMessage) {
    /// match sender.send(msg).await {
    ///     Ok(()) => {}
    ///     Err(e) if !e.is_fatal() => eprintln!("skipped one message: {e}"),
    ///     Err(e) => return eprintln!("connection lost: {e}"),
    /// }
    /// # }
    /// ```
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Error::MessageTooLarge { .. }
                | Error::Encode(_)
                | Error::RequestTimeout(_)
                | Error::InvalidRequest(_)
                | Error::UnexpectedResponse
        )
    }

    /// The [`io::ErrorKind`] this error converts to: an I/O error's own
    /// kind, otherwise the nearest one.
    pub fn io_kind(&self) -> io::ErrorKind {
        use io::ErrorKind as K;
        match self {
            Error::Io(e) => e.kind(),
            Error::FrameTooLarge { .. } | Error::Malformed(_) | Error::Protocol(_) => {
                K::InvalidData
            }
            Error::UnexpectedResponse => K::InvalidData,
            Error::MessageTooLarge { .. } | Error::Encode(_) | Error::InvalidRequest(_) => {
                K::InvalidInput
            }
            Error::UnexpectedEof { .. } => K::UnexpectedEof,
            Error::IdleTimeout(_)
            | Error::RequestTimeout(_)
            | Error::FrameTimeout(_)
            | Error::WriteTimeout(_) => K::TimedOut,
            Error::Closed => K::NotConnected,
        }
    }
}

/// An I/O error comes back as it was (if no other handle holds it, else
/// one of the same kind). Any other becomes an `io::Error` of the nearest
/// kind ([`Error::io_kind`]) that wraps it: `get_ref()` and `into_inner()`
/// give it back.
impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(inner) => match Arc::try_unwrap(inner) {
                Ok(original) => original,
                Err(shared) => io::Error::new(shared.kind(), Error::Io(shared)),
            },
            e => io::Error::new(e.io_kind(), e),
        }
    }
}

impl<M> From<SendError<M>> for io::Error {
    fn from(e: SendError<M>) -> Self {
        e.error.into()
    }
}

/// A full queue is [`io::ErrorKind::WouldBlock`].
impl<M> From<TrySendError<M>> for io::Error {
    fn from(e: TrySendError<M>) -> Self {
        match e {
            TrySendError::Full(_) => io::ErrorKind::WouldBlock.into(),
            TrySendError::Failed(e) => e.into(),
        }
    }
}

/// An error from [`Sender::send`](crate::Sender::send): the message comes back.
#[derive(Clone)]
pub struct SendError<M> {
    /// The message that was not sent.
    pub message: M,
    /// Why: [`Error::MessageTooLarge`] or [`Error::Encode`] for this message
    /// alone, otherwise the reason the connection ended.
    pub error: Error,
}

impl<M> SendError<M> {
    /// The message that was not sent.
    pub fn into_inner(self) -> M {
        self.message
    }

    /// True if the connection is gone ([`Error::is_fatal`]); false if only
    /// this message could not be sent.
    pub fn is_fatal(&self) -> bool {
        self.error.is_fatal()
    }
}

impl<M> fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message not sent: {}", self.error)
    }
}

impl<M> std::error::Error for SendError<M> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// An error from [`Sender::try_send`](crate::Sender::try_send): the message
/// comes back.
#[derive(Clone)]
pub enum TrySendError<M> {
    /// The outbound queue is full: the peer is not keeping up.
    Full(M),
    /// The message cannot be sent at all (see [`SendError`]).
    Failed(SendError<M>),
}

impl<M> TrySendError<M> {
    /// The message that was not sent.
    pub fn into_inner(self) -> M {
        match self {
            TrySendError::Full(m) => m,
            TrySendError::Failed(e) => e.message,
        }
    }

    /// True if the queue was full.
    pub fn is_full(&self) -> bool {
        matches!(self, TrySendError::Full(_))
    }

    /// True if the connection is gone; false for a full queue or a message
    /// that cannot be sent alone.
    pub fn is_fatal(&self) -> bool {
        matches!(self, TrySendError::Failed(e) if e.is_fatal())
    }
}

impl<M> fmt::Debug for TrySendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("Full(..)"),
            TrySendError::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

impl<M> fmt::Display for TrySendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("outbound queue is full"),
            TrySendError::Failed(e) => e.fmt(f),
        }
    }
}

impl<M> std::error::Error for TrySendError<M> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TrySendError::Full(_) => None,
            TrySendError::Failed(e) => Some(&e.error),
        }
    }
}
