//! The trait a user implements to put chatpipe under their own messages.

use std::fmt::Debug;
use std::hash::Hash;

use bytes::{Bytes, BytesMut};

/// What a message is, as far as the connection cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind<Id> {
    /// An ordinary message: delivered to the application.
    Message,
    /// A keepalive: never delivered, only proves the peer is alive.
    Keepalive,
    /// A request carrying this id; the peer answers with a response carrying
    /// the same id.
    Request(Id),
    /// A response to the request with this id.
    Response(Id),
}

/// Your wire format: how messages become payloads and back, and which of
/// them are keepalives, requests and responses.
///
/// The connection frames each payload with a 4-byte length prefix; the
/// protocol sees only payloads. Implementations are shared between the
/// senders and the driver, so methods take `&self`.
///
/// ```
/// use bytes::{BufMut, Bytes, BytesMut};
/// use chatpipe::{Kind, Protocol};
///
/// /// Byte 0: 0 = text, 1 = keepalive, 2 = ping(id), 3 = pong(id).
/// #[derive(Debug, Clone, PartialEq)]
/// enum Msg { Text(Bytes), Keepalive, Ping(u8), Pong(u8) }
///
/// #[derive(Debug)]
/// struct Mine;
///
/// impl Protocol for Mine {
///     type Message = Msg;
///     type RequestId = u8;
///     type Error = std::io::Error;
///
///     fn encode(&self, msg: &Msg, dst: &mut BytesMut) -> Result<Option<Bytes>, Self::Error> {
///         match msg {
///             // Large bodies go out without being copied.
///             Msg::Text(body) => { dst.put_u8(0); return Ok(Some(body.clone())) }
///             Msg::Keepalive => dst.put_u8(1),
///             Msg::Ping(id) => dst.put_slice(&[2, *id]),
///             Msg::Pong(id) => dst.put_slice(&[3, *id]),
///         }
///         Ok(None)
///     }
///     fn decode(&self, payload: Bytes) -> Result<Option<Msg>, Self::Error> {
///         let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad message");
///         Ok(Some(match (payload.first(), payload.get(1)) {
///             (Some(0), _) => Msg::Text(payload.slice(1..)),
///             (Some(1), _) => Msg::Keepalive,
///             (Some(2), Some(id)) => Msg::Ping(*id),
///             (Some(3), Some(id)) => Msg::Pong(*id),
///             (Some(_), _) => return Ok(None), // unknown type: skip it
///             (None, _) => return Err(bad()),
///         }))
///     }
///     fn keepalive(&self) -> Msg { Msg::Keepalive }
///     fn kind(&self, msg: &Msg) -> Kind<u8> {
///         match msg {
///             Msg::Text(_) => Kind::Message,
///             Msg::Keepalive => Kind::Keepalive,
///             Msg::Ping(id) => Kind::Request(*id),
///             Msg::Pong(id) => Kind::Response(*id),
///         }
///     }
/// }
/// ```
pub trait Protocol: Send + Sync + 'static {
    /// The messages exchanged, both ways.
    type Message: Send + 'static;
    /// What correlates a request with its response.
    type RequestId: Eq + Hash + Clone + Debug + Send + 'static;
    /// The encoder's and decoder's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Writes `msg`'s payload into `dst` (the length prefix is added for
    /// you).
    ///
    /// If the message ends in a large body that is already [`Bytes`], return
    /// it instead of copying it into `dst`: the payload is then what was
    /// written to `dst` followed by that body, which is written to the
    /// socket as it is (vectored, without a copy).
    ///
    /// An error fails this one message; the connection carries on.
    fn encode(&self, msg: &Self::Message, dst: &mut BytesMut)
        -> Result<Option<Bytes>, Self::Error>;

    /// Turns one payload into a message.
    ///
    /// `Ok(None)` skips the payload (an unknown message type, for example,
    /// so the protocol can be extended without breaking old peers). An error
    /// is [`Error::Malformed`](crate::Error::Malformed) and closes the
    /// connection.
    fn decode(&self, payload: Bytes) -> Result<Option<Self::Message>, Self::Error>;

    /// A keepalive message, sent whenever nothing else was sent for the
    /// keepalive interval.
    fn keepalive(&self) -> Self::Message;

    /// What `msg` is: an ordinary message, a keepalive, a request or a
    /// response.
    fn kind(&self, msg: &Self::Message) -> Kind<Self::RequestId>;
}
