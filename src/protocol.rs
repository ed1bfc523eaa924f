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

/// Your wire format: how messages become payloads and back and, if your
/// protocol has them, which messages are keepalives, requests and
/// responses.
///
/// Only [`encode`](Protocol::encode) and [`decode`](Protocol::decode) are
/// required. Keepalives ([`keepalive`](Protocol::keepalive)) and
/// request/response ([`kind`](Protocol::kind), and
/// [`request_id`](Protocol::request_id) for ids the connection assigns)
/// are opt-in. A protocol without requests sets `type RequestId = ();`.
///
/// The connection frames each payload with a 4-byte length prefix; the
/// protocol sees only payloads. Implementations are shared between the
/// senders and the driver, so methods take `&self`.
///
/// The smallest protocol, lines of text:
///
/// ```
/// use bytes::{Bytes, BytesMut};
/// use chatpipe::Protocol;
///
/// struct Lines;
///
/// impl Protocol for Lines {
///     type Message = String;
///     type RequestId = ();
///     type Error = std::string::FromUtf8Error;
///
///     fn encode(&self, msg: &String, dst: &mut BytesMut) -> Result<Option<Bytes>, Self::Error> {
///         dst.extend_from_slice(msg.as_bytes());
///         Ok(None)
///     }
///     fn decode(&self, payload: Bytes) -> Result<Option<String>, Self::Error> {
///         String::from_utf8(payload.to_vec()).map(Some)
///     }
/// }
/// ```
///
/// A complete one, with keepalives and requests whose ids the connection
/// assigns:
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
///     fn keepalive(&self) -> Option<Msg> { Some(Msg::Keepalive) }
///     fn kind(&self, msg: &Msg) -> Kind<u8> {
///         match msg {
///             Msg::Text(_) => Kind::Message,
///             Msg::Keepalive => Kind::Keepalive,
///             Msg::Ping(id) => Kind::Request(*id),
///             Msg::Pong(id) => Kind::Response(*id),
///         }
///     }
///     // Lets `Sender::call` number requests itself (ids wrap at 256).
///     fn request_id(&self, n: u64) -> Option<u8> { Some(n as u8) }
/// }
/// ```
pub trait Protocol: Send + Sync + 'static {
    /// The messages exchanged, both ways.
    type Message: Send + 'static;
    /// What correlates a request with its response; `()` for a protocol
    /// without requests.
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

    /// The keepalive message, sent whenever nothing else was sent for the
    /// keepalive interval. Default: `None`, no keepalives (and then no
    /// idle timeout unless you set one).
    fn keepalive(&self) -> Option<Self::Message> {
        None
    }

    /// What `msg` is: an ordinary message, a keepalive, a request or a
    /// response. Default: every message is [`Kind::Message`].
    fn kind(&self, msg: &Self::Message) -> Kind<Self::RequestId> {
        let _ = msg;
        Kind::Message
    }

    /// The id of the `n`th request that [`Sender::call`](crate::Sender::call)
    /// makes on a connection (`n` counts from 1). Default: `None`, the
    /// protocol has no ids the connection can make, and `call` fails with
    /// [`Error::InvalidRequest`](crate::Error::InvalidRequest).
    fn request_id(&self, n: u64) -> Option<Self::RequestId> {
        let _ = n;
        None
    }

    /// The largest payload this protocol's encoder can produce, if it has a
    /// bound. The default frame limit rises to it, so that every message
    /// the protocol can make fits in a frame.
    fn max_payload_len(&self) -> Option<usize> {
        None
    }
}

/// A request sent with [`Sender::call`](crate::Sender::call): the
/// connection gives it an id, and the response comes back as `Output`
/// rather than as a message to match again.
///
/// ```
/// use chatpipe::raw::{Raw, RawMessage};
/// use chatpipe::Call;
///
/// /// Asks for the length of a body; the answer is its decimal text.
/// struct Length(bytes::Bytes);
///
/// impl Call<Raw> for Length {
///     type Output = usize;
///     fn into_request(self, id: u64) -> RawMessage {
///         RawMessage::Request { id, body: self.0 }
///     }
///     fn from_response(response: RawMessage) -> Result<usize, RawMessage> {
///         match &response {
///             RawMessage::Response { body, .. } => std::str::from_utf8(body)
///                 .ok()
///                 .and_then(|s| s.parse().ok())
///                 .ok_or(response),
///             _ => Err(response),
///         }
///     }
/// }
/// ```
pub trait Call<P: Protocol> {
    /// What the response means.
    type Output;

    /// The request message, with the id the connection chose.
    fn into_request(self, id: P::RequestId) -> P::Message;

    /// Reads the response (its id already matched). A response of the
    /// wrong shape comes back as `Err`, and the call fails with
    /// [`Error::UnexpectedResponse`](crate::Error::UnexpectedResponse).
    fn from_response(response: P::Message) -> Result<Self::Output, P::Message>;
}
