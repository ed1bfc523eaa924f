//! The room's side of the Chat protocol: what it queues for members is
//! encoded once, and every member's connection writes that one encoding.
//!
//! A broadcast goes to every other member. Handing each member's connection
//! a [`ChatMessage`] of its own meant copying the message (two strings,
//! two allocations) per recipient and encoding it again per recipient.
//! Here a message the room queues is an [`Outgoing`]: the message, shared by
//! reference count, and its payload, encoded the first time a connection
//! takes it. Each connection's [`Protocol::encode`] then hands over that
//! payload: a large one as [`Bytes`] (a reference count: written to the
//! socket as it is, no copy, no allocation per recipient); a small one
//! (under 4 KiB, a chat line) as the bytes to put in the connection's write
//! batch, which is where the library would copy a small body anyway, to go
//! out in one write with the frames around it.

use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use chatpipe::chat::{Chat, ChatError, ChatMessage, RequestId};
use chatpipe::{Kind, Protocol};

/// A message the room queued for members, shared by all it is for.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) msg: ChatMessage,
    /// Its payload, once a connection asked (`None`: it does not encode,
    /// and each connection reports the error as it would any other).
    payload: OnceLock<Option<Bytes>>,
}

impl Outgoing {
    pub(crate) fn new(msg: ChatMessage) -> Arc<Outgoing> {
        Arc::new(Outgoing {
            msg,
            payload: OnceLock::new(),
        })
    }

    /// The payload, encoded by the first caller.
    fn payload(&self) -> Option<&Bytes> {
        self.payload
            .get_or_init(|| {
                let mut dst = BytesMut::new();
                match Chat.encode(&self.msg, &mut dst) {
                    Ok(None) => Some(dst.freeze()),
                    Ok(Some(body)) => {
                        dst.extend_from_slice(&body);
                        Some(dst.freeze())
                    }
                    Err(_) => None,
                }
            })
            .as_ref()
    }
}

/// What travels on a member's connection: a message of its own (a reply,
/// a keepalive, and every message received), or one the room shares.
#[derive(Debug)]
pub(crate) enum Frame {
    Own(ChatMessage),
    Shared(Arc<Outgoing>),
}

impl Frame {
    /// The message. What a connection receives is always its own
    /// (`Wire::decode`), so this takes it without a copy.
    pub(crate) fn into_message(self) -> ChatMessage {
        match self {
            Frame::Own(msg) => msg,
            Frame::Shared(shared) => {
                Arc::try_unwrap(shared).map_or_else(|s| s.msg.clone(), |s| s.msg)
            }
        }
    }
}

impl From<ChatMessage> for Frame {
    fn from(msg: ChatMessage) -> Self {
        Frame::Own(msg)
    }
}

/// Below this, the library copies a body the protocol hands back into the
/// connection's write batch (`COPY_BELOW` in chatpipe's src/pipe.rs); at
/// and above it, it writes the body as it is, without a copy.
const COPY_BELOW: usize = 4 * 1024;

/// [`Chat`], with shared messages written from their one encoding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wire;

impl Protocol for Wire {
    type Message = Frame;
    type RequestId = RequestId;
    type Error = ChatError;

    fn encode(&self, msg: &Frame, dst: &mut BytesMut) -> Result<Option<Bytes>, ChatError> {
        match msg {
            Frame::Own(msg) => Chat.encode(msg, dst),
            Frame::Shared(shared) => match shared.payload() {
                // What the connection does with a small body anyway: it
                // goes into the connection's batch, with the frames
                // around it, in one write. Written there directly, it
                // spares two atomic operations per recipient on a
                // reference count that every recipient's thread touches.
                Some(payload) if payload.len() < COPY_BELOW => {
                    dst.extend_from_slice(payload);
                    Ok(None)
                }
                Some(payload) => Ok(Some(payload.clone())),
                // The error, as the message itself gives it.
                None => Chat.encode(&shared.msg, dst),
            },
        }
    }

    fn decode(&self, payload: Bytes) -> Result<Option<Frame>, ChatError> {
        Ok(Chat.decode(payload)?.map(Frame::Own))
    }

    fn keepalive(&self) -> Option<Frame> {
        Chat.keepalive().map(Frame::Own)
    }

    fn request_id(&self, n: u64) -> Option<RequestId> {
        Chat.request_id(n)
    }

    fn max_payload_len(&self) -> Option<usize> {
        Chat.max_payload_len()
    }

    fn kind(&self, msg: &Frame) -> Kind<RequestId> {
        match msg {
            Frame::Own(msg) => Chat.kind(msg),
            Frame::Shared(shared) => Chat.kind(&shared.msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(msg: &Frame) -> Result<Vec<u8>, ChatError> {
        let mut dst = BytesMut::new();
        let body = Wire.encode(msg, &mut dst)?;
        dst.extend_from_slice(&body.unwrap_or_default());
        Ok(dst.to_vec())
    }

    #[test]
    fn a_shared_message_is_encoded_once_as_chat_encodes_it() {
        let msg = ChatMessage::Broadcast {
            from: "ann".into(),
            text: "hello".into(),
        };
        let mut plain = BytesMut::new();
        assert!(Chat.encode(&msg, &mut plain).unwrap().is_none());
        let shared = Outgoing::new(msg.clone());
        let first = encoded(&Frame::Shared(shared.clone())).unwrap();
        assert_eq!(first, plain.to_vec());
        assert_eq!(encoded(&Frame::Own(msg)).unwrap(), plain.to_vec());
        // Every later recipient gets the same encoding, not a new one.
        assert_eq!(encoded(&Frame::Shared(shared.clone())).unwrap(), first);
        let once = shared.payload().unwrap().as_ptr();
        assert_eq!(shared.payload().unwrap().as_ptr(), once);
    }

    #[test]
    fn a_large_shared_message_is_handed_to_every_connection_as_the_same_bytes() {
        let shared = Outgoing::new(ChatMessage::Broadcast {
            from: "ann".into(),
            text: "y".repeat(COPY_BELOW),
        });
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        let pa = Wire.encode(&Frame::Shared(shared.clone()), &mut a).unwrap();
        let pb = Wire.encode(&Frame::Shared(shared), &mut b).unwrap();
        assert!(a.is_empty() && b.is_empty());
        assert_eq!(pa.unwrap().as_ptr(), pb.unwrap().as_ptr());
    }

    #[test]
    fn a_shared_message_that_does_not_encode_fails_for_each_recipient() {
        let text = "x".repeat(chatpipe::chat::MAX_PAYLOAD_LEN + 1);
        let shared = Outgoing::new(ChatMessage::Notice { text });
        for _ in 0..2 {
            assert!(encoded(&Frame::Shared(shared.clone())).is_err());
        }
    }

    #[test]
    fn received_messages_decode_as_chat_does() {
        let msg = ChatMessage::Chat { text: "hi".into() };
        let payload = Bytes::from(encoded(&Frame::Own(msg.clone())).unwrap());
        match Wire.decode(payload).unwrap() {
            Some(Frame::Own(got)) => assert_eq!(got, msg),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Wire.keepalive(),
            Some(Frame::Own(ChatMessage::Keepalive))
        ));
    }
}
