//! The chat protocol (v0.5 of the TcpChat application's), byte for byte.
//!
//! Six messages, each a payload that starts with a 4-byte big-endian type
//! (see `docs/PROTOCOL.md` in the repository for the whole wire format):
//!
//! ```text
//! type  message        fields after the type
//! 0     Chat           text: long string
//! 1     Broadcast      from: short string, text: long string
//! 2     Keepalive      -
//! 3     SetNickname    request_id: 16 bytes, nickname: short string
//! 4     Ack            request_id: 16 bytes
//! 5     Nak            request_id: 16 bytes, message: long string
//!
//! short string = len: u8, then len bytes of UTF-8
//! long string  = len: u16 BE, then len bytes of UTF-8
//! ```
//!
//! Unknown types are skipped, so the protocol can grow without breaking old
//! peers. Bytes after the last field of a known type are ignored for the
//! same reason.
//!
//! Strings over their field's limit are refused with
//! [`ChatError::TooLong`], never truncated; payloads whose fields run past
//! the end or whose strings are not UTF-8 are refused when decoded.
//!
//! ```
//! use chatpipe::chat::{Chat, ChatMessage};
//! use chatpipe::{Builder, Kind, Protocol};
//! use futures::StreamExt;
//! use smol::net::{TcpListener, TcpStream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! smol::block_on(async {
//!     let listener = TcpListener::bind("127.0.0.1:0").await?;
//!     let client_io = TcpStream::connect(listener.local_addr()?).await?;
//!     let (server_io, _) = listener.accept().await?;
//!
//!     // A server that accepts every nickname.
//!     let (server, mut requests, conn) = Builder::new().build(server_io, Chat);
//!     smol::spawn(conn).detach();
//!     smol::spawn(async move {
//!         while let Some(Ok(msg)) = requests.next().await {
//!             if let Kind::Request(request_id) = Chat.kind(&msg) {
//!                 let _ = server.send(ChatMessage::Ack { request_id }).await;
//!             }
//!         }
//!     })
//!     .detach();
//!
//!     let (client, _incoming, conn) = Builder::new().build(client_io, Chat);
//!     let driver = smol::spawn(conn);
//!     let request = ChatMessage::set_nickname("ferris");
//!     let answer = client.request(request).await?;
//!     assert!(matches!(answer, ChatMessage::Ack { .. }));
//!
//!     client.close();
//!     driver.await?;
//!     Ok(())
//! })
//! # }
//! ```

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::Utf8Error;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Call, Kind, Protocol};

/// The default TCP port of the chat protocol.
pub const DEFAULT_PORT: u16 = 33333;

/// The longest short string (a nickname, a broadcast's `from`), in bytes.
pub const SHORT_STRING_MAX: usize = u8::MAX as usize;

/// The largest payload any chat message encodes to: a Broadcast with the
/// longest `from` and the longest text (4 + 1 + 255 + 2 + 65,535 =
/// 65,797 bytes), so the default frame limit of a chat connection is this.
pub const MAX_PAYLOAD_LEN: usize = 4 + 1 + SHORT_STRING_MAX + 2 + LONG_STRING_MAX;

/// The longest long string (a chat text, a Nak's message), in bytes.
pub const LONG_STRING_MAX: usize = u16::MAX as usize;

/// Message type numbers on the wire.
const CHAT: u32 = 0;
const BROADCAST: u32 = 1;
const KEEPALIVE: u32 = 2;
const SET_NICKNAME: u32 = 3;
const ACK: u32 = 4;
const NAK: u32 = 5;

/// The 16-byte id that pairs a request with its response (a GUID on the
/// wire: opaque bytes, compared bytewise).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    /// A fresh random id.
    ///
    /// The randomness comes from the standard library's randomly keyed
    /// hasher (SipHash) fed a process-wide counter: ids do not repeat within
    /// a process and do not follow a visible sequence, which is all request
    /// ids need. They are not meant as secrets.
    pub fn random() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let keys = RandomState::new();
        let mut id = [0; 16];
        for (half, out) in id.chunks_exact_mut(8).enumerate() {
            let mut h = keys.build_hasher();
            h.write_u64(n);
            h.write_usize(half);
            out.copy_from_slice(&h.finish().to_be_bytes());
        }
        RequestId(id)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// One message of the chat protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatMessage {
    /// Type 0, client to server: something to say to the room.
    Chat {
        /// At most [`LONG_STRING_MAX`] bytes.
        text: String,
    },
    /// Type 1, server to client: what another client said.
    Broadcast {
        /// Who said it: their nickname, or their address while they have
        /// none. At most [`SHORT_STRING_MAX`] bytes.
        from: String,
        /// At most [`LONG_STRING_MAX`] bytes.
        text: String,
    },
    /// Type 2, both ways: proves the sender is alive; never delivered.
    Keepalive,
    /// Type 3, client to server: a request to be known as `nickname`,
    /// answered by an [`Ack`](ChatMessage::Ack) or a
    /// [`Nak`](ChatMessage::Nak) with the same id.
    SetNickname {
        /// Pairs the request with its response.
        request_id: RequestId,
        /// At most [`SHORT_STRING_MAX`] bytes.
        nickname: String,
    },
    /// Type 4, both ways: the request with this id is granted.
    Ack {
        /// The request's id.
        request_id: RequestId,
    },
    /// Type 5, both ways: the request with this id is refused.
    Nak {
        /// The request's id.
        request_id: RequestId,
        /// Why. At most [`LONG_STRING_MAX`] bytes.
        message: String,
    },
}

impl ChatMessage {
    /// A set-nickname request with a fresh random id.
    pub fn set_nickname(nickname: impl Into<String>) -> Self {
        ChatMessage::SetNickname {
            request_id: RequestId::random(),
            nickname: nickname.into(),
        }
    }
}

/// Why a chat message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// Encoding: a string is longer than its field allows.
    #[error("`{field}` is {len} bytes, over its limit of {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The string's length in bytes.
        len: usize,
        /// The field's limit.
        max: usize,
    },
    /// Decoding: a field runs past the end of the payload.
    #[error("`{field}` runs past the end of the message")]
    Truncated {
        /// The field (`type` when the payload is shorter than a type).
        field: &'static str,
    },
    /// Decoding: a string is not valid UTF-8.
    #[error("`{field}` is not valid UTF-8: {source}")]
    InvalidUtf8 {
        /// The field.
        field: &'static str,
        /// Where the bytes went wrong.
        source: Utf8Error,
    },
}

/// The chat protocol (see the [module docs](self)), for
/// [`Builder::build`](crate::Builder::build).
#[derive(Debug, Clone, Copy, Default)]
pub struct Chat;

/// Asks the server for a nickname with
/// [`Sender::call`](crate::Sender::call): `Ok(())` when it answers with an
/// Ack, `Err(reason)` with a Nak's message.
///
/// ```no_run
/// # async fn f(client: chatpipe::Sender<chatpipe::chat::Chat>) -> Result<(), chatpipe::Error> {
/// use chatpipe::chat::Nickname;
/// match client.call(Nickname("ferris".into())).await? {
///     Ok(()) => println!("you are ferris"),
///     Err(reason) => println!("refused: {reason}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nickname(pub String);

impl Call<Chat> for Nickname {
    type Output = Result<(), String>;

    fn into_request(self, request_id: RequestId) -> ChatMessage {
        ChatMessage::SetNickname {
            request_id,
            nickname: self.0,
        }
    }

    fn from_response(response: ChatMessage) -> Result<Self::Output, ChatMessage> {
        match response {
            ChatMessage::Ack { .. } => Ok(Ok(())),
            ChatMessage::Nak { message, .. } => Ok(Err(message)),
            other => Err(other),
        }
    }
}

impl Protocol for Chat {
    type Message = ChatMessage;
    type RequestId = RequestId;
    type Error = ChatError;

    fn encode(&self, msg: &ChatMessage, dst: &mut BytesMut) -> Result<Option<Bytes>, ChatError> {
        // Check every limit before writing, so a refused message leaves
        // `dst` as it was.
        match msg {
            ChatMessage::Chat { text } => {
                check("text", text, LONG_STRING_MAX)?;
                dst.put_u32(CHAT);
                put_long(dst, text);
            }
            ChatMessage::Broadcast { from, text } => {
                check("from", from, SHORT_STRING_MAX)?;
                check("text", text, LONG_STRING_MAX)?;
                dst.put_u32(BROADCAST);
                put_short(dst, from);
                put_long(dst, text);
            }
            ChatMessage::Keepalive => dst.put_u32(KEEPALIVE),
            ChatMessage::SetNickname {
                request_id,
                nickname,
            } => {
                check("nickname", nickname, SHORT_STRING_MAX)?;
                dst.put_u32(SET_NICKNAME);
                dst.put_slice(&request_id.0);
                put_short(dst, nickname);
            }
            ChatMessage::Ack { request_id } => {
                dst.put_u32(ACK);
                dst.put_slice(&request_id.0);
            }
            ChatMessage::Nak {
                request_id,
                message,
            } => {
                check("message", message, LONG_STRING_MAX)?;
                dst.put_u32(NAK);
                dst.put_slice(&request_id.0);
                put_long(dst, message);
            }
        }
        Ok(None)
    }

    fn decode(&self, payload: Bytes) -> Result<Option<ChatMessage>, ChatError> {
        let mut r = Reader(payload);
        let msg = match r.u32("type")? {
            CHAT => ChatMessage::Chat {
                text: r.long_string("text")?,
            },
            BROADCAST => ChatMessage::Broadcast {
                from: r.short_string("from")?,
                text: r.long_string("text")?,
            },
            KEEPALIVE => ChatMessage::Keepalive,
            SET_NICKNAME => ChatMessage::SetNickname {
                request_id: r.request_id()?,
                nickname: r.short_string("nickname")?,
            },
            ACK => ChatMessage::Ack {
                request_id: r.request_id()?,
            },
            NAK => ChatMessage::Nak {
                request_id: r.request_id()?,
                message: r.long_string("message")?,
            },
            _ => return Ok(None),
        };
        Ok(Some(msg))
    }

    fn keepalive(&self) -> Option<ChatMessage> {
        Some(ChatMessage::Keepalive)
    }

    /// Request ids are random GUIDs; the count is not needed.
    fn request_id(&self, _: u64) -> Option<RequestId> {
        Some(RequestId::random())
    }

    /// A Broadcast of the longest nickname and the longest text.
    fn max_payload_len(&self) -> Option<usize> {
        Some(MAX_PAYLOAD_LEN)
    }

    fn kind(&self, msg: &ChatMessage) -> Kind<RequestId> {
        match msg {
            ChatMessage::Chat { .. } | ChatMessage::Broadcast { .. } => Kind::Message,
            ChatMessage::Keepalive => Kind::Keepalive,
            ChatMessage::SetNickname { request_id, .. } => Kind::Request(*request_id),
            ChatMessage::Ack { request_id } | ChatMessage::Nak { request_id, .. } => {
                Kind::Response(*request_id)
            }
        }
    }
}

fn check(field: &'static str, s: &str, max: usize) -> Result<(), ChatError> {
    if s.len() > max {
        return Err(ChatError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// Callers check the length first.
fn put_short(dst: &mut BytesMut, s: &str) {
    dst.put_u8(s.len() as u8);
    dst.put_slice(s.as_bytes());
}

/// Callers check the length first.
fn put_long(dst: &mut BytesMut, s: &str) {
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
}

/// Reads fields off a payload, checking each fits in what is left.
struct Reader(Bytes);

impl Reader {
    fn take(&mut self, field: &'static str, n: usize) -> Result<Bytes, ChatError> {
        if self.0.len() < n {
            return Err(ChatError::Truncated { field });
        }
        Ok(self.0.split_to(n))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ChatError> {
        Ok(self.take(field, 4)?.get_u32())
    }

    fn request_id(&mut self) -> Result<RequestId, ChatError> {
        let mut id = [0; 16];
        self.take("request_id", 16)?.copy_to_slice(&mut id);
        Ok(RequestId(id))
    }

    fn short_string(&mut self, field: &'static str) -> Result<String, ChatError> {
        let len = self.take(field, 1)?.get_u8();
        self.string(field, usize::from(len))
    }

    fn long_string(&mut self, field: &'static str) -> Result<String, ChatError> {
        let len = self.take(field, 2)?.get_u16();
        self.string(field, usize::from(len))
    }

    fn string(&mut self, field: &'static str, len: usize) -> Result<String, ChatError> {
        let bytes = self.take(field, len)?;
        match std::str::from_utf8(&bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(source) => Err(ChatError::InvalidUtf8 { field, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use proptest::prelude::*;

    /// The whole frame, length prefix included, as the connection writes it.
    fn frame_of(msg: &ChatMessage) -> Vec<u8> {
        let mut payload = BytesMut::new();
        assert_eq!(Chat.encode(msg, &mut payload).unwrap(), None);
        let mut out = BytesMut::new();
        frame::encode(&payload, frame::DEFAULT_MAX_FRAME_LEN, &mut out).unwrap();
        out.to_vec()
    }

    /// Decodes a whole frame, length prefix included.
    fn unframe(bytes: &[u8]) -> Result<Option<ChatMessage>, ChatError> {
        let mut buf = BytesMut::from(bytes);
        let mut dec = frame::Decoder::new(frame::DEFAULT_MAX_FRAME_LEN);
        let payload = dec.decode(&mut buf).unwrap().expect("a whole frame");
        assert!(buf.is_empty(), "exactly one frame");
        Chat.decode(payload)
    }

    const ID: RequestId = RequestId([
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ]);

    #[test]
    fn protocol_md_chat_example() {
        let bytes = [0, 0, 0, 8, 0, 0, 0, 0, 0, 2, 0x48, 0x69];
        let msg = ChatMessage::Chat { text: "Hi".into() };
        assert_eq!(frame_of(&msg), bytes);
        assert_eq!(unframe(&bytes), Ok(Some(msg)));
    }

    #[test]
    fn protocol_md_keepalive_example() {
        let bytes = [0, 0, 0, 4, 0, 0, 0, 2];
        assert_eq!(frame_of(&ChatMessage::Keepalive), bytes);
        assert_eq!(frame_of(&ChatMessage::Keepalive), bytes);
        assert_eq!(unframe(&bytes), Ok(Some(ChatMessage::Keepalive)));
    }

    /// The two further examples of the repository's docs/PROTOCOL.md.
    #[test]
    fn docs_protocol_md_examples() {
        let broadcast = ChatMessage::Broadcast {
            from: "ana".into(),
            text: "yo".into(),
        };
        let bytes = [
            0, 0, 0, 0x0c, 0, 0, 0, 1, 3, 0x61, 0x6e, 0x61, 0, 2, 0x79, 0x6f,
        ];
        assert_eq!(frame_of(&broadcast), bytes);
        assert_eq!(unframe(&bytes), Ok(Some(broadcast)));

        let ack = ChatMessage::Ack { request_id: ID };
        let bytes = [&[0, 0, 0, 0x14, 0, 0, 0, 4][..], &ID.0].concat();
        assert_eq!(frame_of(&ack), bytes);
        assert_eq!(unframe(&bytes), Ok(Some(ack)));
    }

    /// Every type, both ways, against bytes written out by hand.
    #[test]
    fn every_type_byte_for_byte() {
        let id = ID.0.to_vec();
        let cases: Vec<(ChatMessage, Vec<u8>)> = vec![
            (
                ChatMessage::Broadcast {
                    from: "ana".into(),
                    text: "yo".into(),
                },
                [&[0, 0, 0, 1, 3][..], b"ana", &[0, 2], b"yo"].concat(),
            ),
            (
                ChatMessage::SetNickname {
                    request_id: ID,
                    nickname: "bo".into(),
                },
                [&[0, 0, 0, 3][..], &id, &[2], b"bo"].concat(),
            ),
            (
                ChatMessage::Ack { request_id: ID },
                [&[0, 0, 0, 4][..], &id].concat(),
            ),
            (
                ChatMessage::Nak {
                    request_id: ID,
                    message: "taken".into(),
                },
                [&[0, 0, 0, 5][..], &id, &[0, 5], b"taken"].concat(),
            ),
            // Empty strings are allowed; multi-byte UTF-8 counts bytes.
            (
                ChatMessage::Chat { text: "é".into() },
                vec![0, 0, 0, 0, 0, 2, 0xc3, 0xa9],
            ),
            (
                ChatMessage::Broadcast {
                    from: String::new(),
                    text: String::new(),
                },
                vec![0, 0, 0, 1, 0, 0, 0],
            ),
        ];
        for (msg, payload) in cases {
            let mut dst = BytesMut::new();
            Chat.encode(&msg, &mut dst).unwrap();
            assert_eq!(&dst[..], &payload[..], "{msg:?}");
            assert_eq!(Chat.decode(payload.into()), Ok(Some(msg)));
        }
    }

    #[test]
    fn kinds() {
        let req = ChatMessage::SetNickname {
            request_id: ID,
            nickname: "x".into(),
        };
        assert_eq!(Chat.kind(&req), Kind::Request(ID));
        assert_eq!(
            Chat.kind(&ChatMessage::Ack { request_id: ID }),
            Kind::Response(ID)
        );
        let nak = ChatMessage::Nak {
            request_id: ID,
            message: String::new(),
        };
        assert_eq!(Chat.kind(&nak), Kind::Response(ID));
        assert_eq!(Chat.kind(&ChatMessage::Keepalive), Kind::Keepalive);
        let chat = ChatMessage::Chat { text: "a".into() };
        assert_eq!(Chat.kind(&chat), Kind::Message);
    }

    #[test]
    fn strings_at_their_limits_encode() {
        let msg = ChatMessage::Broadcast {
            from: "f".repeat(SHORT_STRING_MAX),
            text: "t".repeat(LONG_STRING_MAX),
        };
        let mut dst = BytesMut::new();
        Chat.encode(&msg, &mut dst).unwrap();
        assert_eq!(dst.len(), 4 + 1 + 255 + 2 + 65_535);
        assert_eq!(dst[4], 255);
        assert_eq!(&dst[4 + 1 + 255..][..2], &[0xff, 0xff]);
        assert_eq!(Chat.decode(dst.freeze()), Ok(Some(msg)));
    }

    #[test]
    fn strings_over_their_limits_are_refused() {
        let long = "x".repeat(LONG_STRING_MAX + 1);
        let short = "é".repeat(128); // 256 bytes in 128 chars
        let cases = [
            (
                ChatMessage::Chat { text: long.clone() },
                "text",
                65_536,
                65_535,
            ),
            (
                ChatMessage::Broadcast {
                    from: short.clone(),
                    text: String::new(),
                },
                "from",
                256,
                255,
            ),
            (
                ChatMessage::Broadcast {
                    from: String::new(),
                    text: long.clone(),
                },
                "text",
                65_536,
                65_535,
            ),
            (
                ChatMessage::SetNickname {
                    request_id: ID,
                    nickname: short,
                },
                "nickname",
                256,
                255,
            ),
            (
                ChatMessage::Nak {
                    request_id: ID,
                    message: long,
                },
                "message",
                65_536,
                65_535,
            ),
        ];
        for (msg, field, len, max) in cases {
            let mut dst = BytesMut::from(&b"kept"[..]);
            assert_eq!(
                Chat.encode(&msg, &mut dst),
                Err(ChatError::TooLong { field, len, max })
            );
            assert_eq!(&dst[..], b"kept", "nothing written");
        }
    }

    #[test]
    fn unknown_types_are_skipped() {
        for payload in [
            &[0, 0, 0, 6][..],
            &[0, 0, 0, 6, 1, 2, 3],
            &[0xff, 0xff, 0xff, 0xff, 0],
            &[0, 1, 0, 0],
        ] {
            assert_eq!(Chat.decode(Bytes::copy_from_slice(payload)), Ok(None));
        }
    }

    #[test]
    fn trailing_bytes_after_known_fields_are_ignored() {
        let payload = Bytes::from_static(&[0, 0, 0, 2, 9, 9]);
        assert_eq!(Chat.decode(payload), Ok(Some(ChatMessage::Keepalive)));
        let payload = Bytes::from_static(&[0, 0, 0, 0, 0, 1, b'a', b'b']);
        let text = "a".to_owned();
        assert_eq!(Chat.decode(payload), Ok(Some(ChatMessage::Chat { text })));
    }

    #[test]
    fn truncated_fields_are_refused() {
        let id = &ID.0[..];
        let cases: [(Vec<u8>, &str); 12] = [
            (vec![], "type"),
            (vec![0, 0, 0], "type"),
            (vec![0, 0, 0, 0], "text"),
            (vec![0, 0, 0, 0, 0], "text"),
            (vec![0, 0, 0, 0, 0, 3, b'a', b'b'], "text"),
            (vec![0, 0, 0, 1], "from"),
            (vec![0, 0, 0, 1, 2, b'a'], "from"),
            (vec![0, 0, 0, 1, 1, b'a', 0, 1], "text"),
            ([&[0, 0, 0, 3][..], &id[..15]].concat(), "request_id"),
            ([&[0, 0, 0, 3][..], id].concat(), "nickname"),
            ([&[0, 0, 0, 4][..], &id[..1]].concat(), "request_id"),
            (
                [&[0, 0, 0, 5][..], id, &[0xff, 0xff, 0]].concat(),
                "message",
            ),
        ];
        for (payload, field) in cases {
            assert_eq!(
                Chat.decode(payload.clone().into()),
                Err(ChatError::Truncated { field }),
                "{payload:?}"
            );
        }
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let cases: [(&[u8], &str); 4] = [
            (&[0, 0, 0, 0, 0, 1, 0xff], "text"),
            (&[0, 0, 0, 1, 1, 0xc3, 0, 0], "from"),
            (&[0, 0, 0, 1, 0, 0, 2, 0xed, 0xa0], "text"),
            (
                &[
                    0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x80,
                ],
                "nickname",
            ),
        ];
        for (payload, field) in cases {
            match Chat.decode(Bytes::copy_from_slice(payload)) {
                Err(ChatError::InvalidUtf8 { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{payload:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = ChatError::TooLong {
            field: "nickname",
            len: 300,
            max: 255,
        };
        assert_eq!(
            e.to_string(),
            "`nickname` is 300 bytes, over its limit of 255"
        );
        let e = ChatError::Truncated { field: "text" };
        assert_eq!(e.to_string(), "`text` runs past the end of the message");
    }

    #[test]
    fn random_ids_differ() {
        let ids: std::collections::HashSet<RequestId> =
            (0..1000).map(|_| RequestId::random()).collect();
        assert_eq!(ids.len(), 1000);
        let id = RequestId::random();
        assert_ne!(id.0[..8], id.0[8..], "the two halves are hashed apart");
        let ChatMessage::SetNickname { request_id, .. } = ChatMessage::set_nickname("a") else {
            unreachable!()
        };
        assert!(!ids.contains(&request_id));
    }

    #[test]
    fn request_id_prints_as_hex() {
        assert_eq!(ID.to_string(), "00112233445566778899aabbccddeeff");
        assert_eq!(
            format!("{ID:?}"),
            "RequestId(00112233445566778899aabbccddeeff)"
        );
    }

    fn any_string(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..40)
            .prop_map(move |cs| cs.into_iter().collect::<String>())
            .prop_filter("fits its field", move |s| s.len() <= max)
    }

    fn any_message() -> impl Strategy<Value = ChatMessage> {
        let id = any::<[u8; 16]>().prop_map(RequestId);
        prop_oneof![
            any_string(LONG_STRING_MAX).prop_map(|text| ChatMessage::Chat { text }),
            (any_string(SHORT_STRING_MAX), any_string(LONG_STRING_MAX))
                .prop_map(|(from, text)| ChatMessage::Broadcast { from, text }),
            Just(ChatMessage::Keepalive),
            (id.clone(), any_string(SHORT_STRING_MAX)).prop_map(|(request_id, nickname)| {
                ChatMessage::SetNickname {
                    request_id,
                    nickname,
                }
            }),
            id.clone()
                .prop_map(|request_id| ChatMessage::Ack { request_id }),
            (id, any_string(LONG_STRING_MAX)).prop_map(|(request_id, message)| {
                ChatMessage::Nak {
                    request_id,
                    message,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn decode_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Chat.decode(payload.into());
        }

        /// Payloads that start with a known type and then go anywhere.
        #[test]
        fn decode_never_panics_on_known_types(
            kind in 0u32..6,
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let payload = [&kind.to_be_bytes()[..], &rest].concat();
            let _ = Chat.decode(payload.into());
        }

        #[test]
        fn round_trip(msg in any_message()) {
            let mut dst = BytesMut::new();
            Chat.encode(&msg, &mut dst).unwrap();
            prop_assert_eq!(Chat.decode(dst.freeze()), Ok(Some(msg)));
        }
    }
}
