//! A ready-made protocol: opaque byte messages with u64 request ids.
//!
//! ```text
//! payload = kind: u8, then
//!   0 Message   body...
//!   1 Keepalive
//!   2 Request   id: u64 BE, body...
//!   3 Response  id: u64 BE, body...
//! ```
//!
//! Bodies are handed out as [`Bytes`] slices of the read buffer and written
//! without copying, so this is also what the benchmarks measure.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Call, Kind, Protocol};

/// One message of the [`Raw`] protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawMessage {
    /// Opaque bytes.
    Message(Bytes),
    /// A keepalive.
    Keepalive,
    /// A request; the peer answers with a [`RawMessage::Response`] with the
    /// same id.
    Request {
        /// Correlates the response.
        id: u64,
        /// Opaque bytes.
        body: Bytes,
    },
    /// The answer to the request with this id.
    Response {
        /// The request's id.
        id: u64,
        /// Opaque bytes.
        body: Bytes,
    },
}

/// The [`Raw`] decoder's error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RawError {
    /// The payload was empty, or a request or response had no id.
    #[error("raw message truncated")]
    Truncated,
}

/// Opaque bytes with keepalives and request/response (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Protocol for Raw {
    type Message = RawMessage;
    type RequestId = u64;
    type Error = RawError;

    fn encode(&self, msg: &RawMessage, dst: &mut BytesMut) -> Result<Option<Bytes>, RawError> {
        let body = match msg {
            RawMessage::Message(body) => {
                dst.put_u8(0);
                body
            }
            RawMessage::Keepalive => {
                dst.put_u8(1);
                return Ok(None);
            }
            RawMessage::Request { id, body } => {
                dst.put_u8(2);
                dst.put_u64(*id);
                body
            }
            RawMessage::Response { id, body } => {
                dst.put_u8(3);
                dst.put_u64(*id);
                body
            }
        };
        // Small bodies are cheaper copied than queued as a separate piece.
        if body.len() < 512 {
            dst.put_slice(body);
            Ok(None)
        } else {
            Ok(Some(body.clone()))
        }
    }

    fn decode(&self, mut payload: Bytes) -> Result<Option<RawMessage>, RawError> {
        if payload.is_empty() {
            return Err(RawError::Truncated);
        }
        let kind = payload.get_u8();
        let mut id = || {
            if payload.len() < 8 {
                return Err(RawError::Truncated);
            }
            Ok(payload.get_u64())
        };
        Ok(Some(match kind {
            0 => RawMessage::Message(payload),
            1 => RawMessage::Keepalive,
            2 => {
                let id = id()?;
                RawMessage::Request { id, body: payload }
            }
            3 => {
                let id = id()?;
                RawMessage::Response { id, body: payload }
            }
            _ => return Ok(None),
        }))
    }

    fn keepalive(&self) -> Option<RawMessage> {
        Some(RawMessage::Keepalive)
    }

    fn request_id(&self, n: u64) -> Option<u64> {
        Some(n)
    }

    fn kind(&self, msg: &RawMessage) -> Kind<u64> {
        match msg {
            RawMessage::Message(_) => Kind::Message,
            RawMessage::Keepalive => Kind::Keepalive,
            RawMessage::Request { id, .. } => Kind::Request(*id),
            RawMessage::Response { id, .. } => Kind::Response(*id),
        }
    }
}

/// A body sent with [`Sender::call`](crate::Sender::call) is a
/// [`RawMessage::Request`] with an id the connection picks; the answer is
/// the response's body.
///
/// ```
/// # use chatpipe::raw::{Raw, RawMessage};
/// # async fn f(client: chatpipe::Sender<Raw>) -> Result<(), chatpipe::Error> {
/// let body: bytes::Bytes = client.call(bytes::Bytes::from("ping")).await?;
/// # Ok(()) }
/// ```
impl Call<Raw> for Bytes {
    type Output = Bytes;

    fn into_request(self, id: u64) -> RawMessage {
        RawMessage::Request { id, body: self }
    }

    fn from_response(response: RawMessage) -> Result<Bytes, RawMessage> {
        match response {
            RawMessage::Response { body, .. } => Ok(body),
            other => Err(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unknown() {
        let msgs = [
            RawMessage::Message(Bytes::from_static(b"hi")),
            RawMessage::Message(Bytes::from(vec![7; 4096])),
            RawMessage::Keepalive,
            RawMessage::Request {
                id: 9,
                body: Bytes::from_static(b"q"),
            },
            RawMessage::Response {
                id: u64::MAX,
                body: Bytes::new(),
            },
        ];
        for m in msgs {
            let mut buf = BytesMut::new();
            let body = Raw.encode(&m, &mut buf).unwrap();
            buf.extend_from_slice(&body.unwrap_or_default());
            assert_eq!(Raw.decode(buf.freeze()).unwrap(), Some(m));
        }
        assert_eq!(Raw.decode(Bytes::from_static(&[9, 1, 2])).unwrap(), None);
        assert!(Raw.decode(Bytes::new()).is_err());
        assert!(Raw.decode(Bytes::from_static(&[3, 0, 0])).is_err());
    }
}
