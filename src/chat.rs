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
//! Version 0.6 adds types 16 to 26, which a v0.5 peer skips: a negotiated
//! [`Hello`](ChatMessage::Hello) / [`Welcome`](ChatMessage::Welcome), acked
//! chats ([`Say`](ChatMessage::Say)), direct messages, presence, history
//! and server notices. `docs/PROTOCOL.md` has every field, with bytes.
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

/// The largest payload a chat message with fields of bounded size encodes
/// to: a v0.6 Direct with the longest nickname and the longest text
/// (4 + 16 + 1 + 255 + 2 + 65,535 = 65,813 bytes); a v0.5 Broadcast is at
/// most 65,797. The default frame limit of a chat connection is this.
/// Messages that carry lists (Hello, Welcome, Members) are kept under it
/// by whoever makes them.
pub const MAX_PAYLOAD_LEN: usize = 4 + 16 + 1 + SHORT_STRING_MAX + 2 + LONG_STRING_MAX;

/// The longest long string (a chat text, a Nak's message), in bytes.
pub const LONG_STRING_MAX: usize = u16::MAX as usize;

/// Message type numbers on the wire.
const CHAT: u32 = 0;
const BROADCAST: u32 = 1;
const KEEPALIVE: u32 = 2;
const SET_NICKNAME: u32 = 3;
const ACK: u32 = 4;
const NAK: u32 = 5;
// v0.6: 16 and up, clear of v0.5's types and of the unknown types the
// tests send (6, 9, 0x10000, 0xffffffff).
const HELLO: u32 = 16;
const WELCOME: u32 = 17;
const NOTICE: u32 = 18;
const SAY: u32 = 19;
const DIRECT: u32 = 20;
const PRIVATE: u32 = 21;
const WHO: u32 = 22;
const MEMBERS: u32 = 23;
const PRESENCE: u32 = 24;
const HISTORY: u32 = 25;
const LOGIN: u32 = 26;

/// Protocol versions as they go on the wire (`major << 8 | minor`).
pub const V0_5: u16 = 0x0005;
/// Protocol version 0.6: Hello and Welcome, then the capabilities granted.
pub const V0_6: u16 = 0x0006;

/// The capabilities of v0.6 by name, as a Hello asks for them and a
/// Welcome grants them. Unknown names are ignored.
pub mod capability {
    /// Each chat is a [`Say`](super::ChatMessage::Say) request, acked once
    /// it is in the room or refused with a reason.
    pub const ACK: &str = "ack";
    /// [`Direct`](super::ChatMessage::Direct) messages to one nickname.
    pub const DIRECT: &str = "direct";
    /// [`Presence`](super::ChatMessage::Presence) announcements and
    /// [`Who`](super::ChatMessage::Who).
    pub const PRESENCE: &str = "presence";
    /// The last room messages as [`History`](super::ChatMessage::History)
    /// on joining.
    pub const HISTORY: &str = "history";
    /// Accounts: [`Credentials`](super::Credentials) in a Hello or a
    /// [`Login`](super::ChatMessage::Login). Granted by a server that keeps
    /// accounts.
    pub const ACCOUNT: &str = "account";
}

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
    /// Type 16 (v0.6), client to server, first: the versions the client
    /// speaks and the capabilities it wants. Answered by a
    /// [`Welcome`](ChatMessage::Welcome), or by a [`Nak`](ChatMessage::Nak)
    /// with the reason, after which the server closes. A v0.5 server
    /// skips it.
    Hello {
        /// Pairs the request with its response.
        request_id: RequestId,
        /// Versions spoken ([`V0_5`], [`V0_6`]); at most 255.
        versions: Vec<u16>,
        /// Capabilities wanted ([`capability`]); at most 255 short strings.
        capabilities: Vec<String>,
        /// Credentials for a login; empty for none. At most
        /// [`LONG_STRING_MAX`] bytes.
        credentials: String,
    },
    /// Type 17 (v0.6), server to client: the answer to a Hello.
    Welcome {
        /// The Hello's id.
        request_id: RequestId,
        /// The version chosen.
        version: u16,
        /// The capabilities granted; at most 255 short strings.
        capabilities: Vec<String>,
        /// Limits the client must respect.
        limits: Limits,
    },
    /// Type 18 (v0.6), server to client: something the server says, for
    /// example why it is about to close the connection.
    Notice {
        /// At most [`LONG_STRING_MAX`] bytes.
        text: String,
    },
    /// Type 19 (v0.6, capability `ack`), client to server: a chat that is
    /// answered with an Ack once it is in the room, or a Nak saying why not.
    Say {
        /// Pairs the request with its response.
        request_id: RequestId,
        /// At most [`LONG_STRING_MAX`] bytes.
        text: String,
    },
    /// Type 20 (v0.6, capability `direct`), client to server: a message
    /// for one member only. Ack once delivered to the room's member, Nak
    /// if there is none by that name.
    Direct {
        /// Pairs the request with its response.
        request_id: RequestId,
        /// The recipient's nickname. At most [`SHORT_STRING_MAX`] bytes.
        to: String,
        /// At most [`LONG_STRING_MAX`] bytes.
        text: String,
    },
    /// Type 21 (v0.6), server to client: a direct message to you.
    Private {
        /// Who sent it. At most [`SHORT_STRING_MAX`] bytes.
        from: String,
        /// At most [`LONG_STRING_MAX`] bytes.
        text: String,
    },
    /// Type 22 (v0.6, capability `presence`), client to server: who is in
    /// the room? Answered by [`Members`](ChatMessage::Members).
    Who {
        /// Pairs the request with its response.
        request_id: RequestId,
    },
    /// Type 23 (v0.6), server to client: the answer to a Who.
    Members {
        /// The Who's id.
        request_id: RequestId,
        /// How many members the room has.
        total: u32,
        /// Their names, as many as fit in one frame; at most 65,535 short
        /// strings.
        names: Vec<String>,
    },
    /// Type 24 (v0.6, capability `presence`), server to client: someone
    /// joined, left or changed their name.
    Presence {
        /// What happened.
        change: PresenceChange,
        /// Who. At most [`SHORT_STRING_MAX`] bytes.
        nickname: String,
        /// The new name, for [`PresenceChange::Renamed`]; empty otherwise.
        /// At most [`SHORT_STRING_MAX`] bytes.
        new_nickname: String,
    },
    /// Type 25 (v0.6, capability `history`), server to client: a room
    /// message from before you joined, oldest first, before live traffic.
    History {
        /// When it was said: milliseconds since the Unix epoch.
        at_ms: u64,
        /// Who said it. At most [`SHORT_STRING_MAX`] bytes.
        from: String,
        /// At most [`LONG_STRING_MAX`] bytes.
        text: String,
    },
    /// Type 26 (v0.6, capability `account`), client to server: log in to
    /// an account, or register one, after the handshake. Answered by an
    /// Ack, or a Nak saying why.
    Login {
        /// Pairs the request with its response.
        request_id: RequestId,
        /// [`Credentials::encode`]d. At most [`LONG_STRING_MAX`] bytes.
        credentials: String,
    },
}

/// What a client proves or asks for with a password, in a
/// [`Hello`](ChatMessage::Hello)'s `credentials` or a
/// [`Login`](ChatMessage::Login). On the wire, a long string of three
/// fields separated by NUL bytes: the scheme (`login` or `register`), the
/// nickname, the password.
///
/// ```text
/// l o g i n 00 a n a 00 s e c r e t     log in to ana's account
/// ```
///
/// `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Log in to the account that owns `nickname`, and take the nickname.
    Login {
        /// 1 to [`SHORT_STRING_MAX`] bytes, no NUL.
        nickname: String,
        /// 1 to [`Credentials::MAX_PASSWORD`] bytes, no NUL.
        password: String,
    },
    /// Make `nickname` an account with `password`, then log in to it. The
    /// nickname must be free, or held by whoever registers it.
    Register {
        /// 1 to [`SHORT_STRING_MAX`] bytes, no NUL.
        nickname: String,
        /// 1 to [`Credentials::MAX_PASSWORD`] bytes, no NUL.
        password: String,
    },
}

/// Why a credentials string is not [`Credentials`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// Not `scheme NUL nickname NUL password`, or an unknown scheme.
    #[error("credentials are not `login` or `register`, a nickname and a password")]
    Malformed,
    /// The nickname is empty or longer than a short string.
    #[error("the nickname must be 1 to 255 bytes")]
    Nickname,
    /// The password is empty, too long, or has a NUL byte.
    #[error("the password must be 1 to 1,024 bytes, without NUL")]
    Password,
}

impl Credentials {
    /// The longest password, in bytes.
    pub const MAX_PASSWORD: usize = 1024;

    /// The nickname they are for.
    pub fn nickname(&self) -> &str {
        match self {
            Credentials::Login { nickname, .. } | Credentials::Register { nickname, .. } => {
                nickname
            }
        }
    }

    /// The password.
    pub fn password(&self) -> &str {
        match self {
            Credentials::Login { password, .. } | Credentials::Register { password, .. } => {
                password
            }
        }
    }

    /// Checks the fields' limits: what [`parse`](Credentials::parse) would
    /// refuse.
    pub fn validate(&self) -> Result<(), CredentialsError> {
        let (nickname, password) = (self.nickname(), self.password());
        if nickname.is_empty() || nickname.len() > SHORT_STRING_MAX || nickname.contains('\0') {
            return Err(CredentialsError::Nickname);
        }
        if password.is_empty() || password.len() > Self::MAX_PASSWORD || password.contains('\0') {
            return Err(CredentialsError::Password);
        }
        Ok(())
    }

    /// The string that goes in a Hello's or a Login's `credentials`.
    pub fn encode(&self) -> String {
        let scheme = match self {
            Credentials::Login { .. } => "login",
            Credentials::Register { .. } => "register",
        };
        format!("{scheme}\0{}\0{}", self.nickname(), self.password())
    }

    /// Reads a `credentials` string: `Ok(None)` for the empty one (a guest).
    pub fn parse(s: &str) -> Result<Option<Credentials>, CredentialsError> {
        if s.is_empty() {
            return Ok(None);
        }
        let mut fields = s.splitn(3, '\0');
        let (Some(scheme), Some(nickname), Some(password)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(CredentialsError::Malformed);
        };
        let (nickname, password) = (nickname.to_owned(), password.to_owned());
        let credentials = match scheme {
            "login" => Credentials::Login { nickname, password },
            "register" => Credentials::Register { nickname, password },
            _ => return Err(CredentialsError::Malformed),
        };
        credentials.validate()?;
        Ok(Some(credentials))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self {
            Credentials::Login { .. } => "Login",
            Credentials::Register { .. } => "Register",
        };
        f.debug_struct(scheme)
            .field("nickname", &self.nickname())
            .field("password", &"<hidden>")
            .finish()
    }
}

/// What a v0.6 client must respect, from the [`Welcome`](ChatMessage::Welcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// The largest payload the server accepts, in bytes.
    pub max_frame: u32,
    /// Messages per 1,000 seconds on average (10 per second is 10,000);
    /// 0 for no limit. Over it, the server reads more slowly.
    pub rate_per_1000s: u32,
    /// Messages at once before the rate applies.
    pub burst: u32,
    /// The server's keepalive interval, in milliseconds.
    pub keepalive_ms: u32,
}

/// What a [`Presence`](ChatMessage::Presence) announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// Byte 0: joined the room (or set a first nickname).
    Joined,
    /// Byte 1: left the room.
    Left,
    /// Byte 2: changed nickname.
    Renamed,
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

/// Logs in or registers after the handshake with
/// [`Sender::call`](crate::Sender::call) (a server that granted
/// [`capability::ACCOUNT`]): `Ok(())` on an Ack, `Err(reason)` with a
/// Nak's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login(pub Credentials);

impl Call<Chat> for Login {
    type Output = Result<(), String>;

    fn into_request(self, request_id: RequestId) -> ChatMessage {
        ChatMessage::Login {
            request_id,
            credentials: self.0.encode(),
        }
    }

    fn from_response(response: ChatMessage) -> Result<Self::Output, ChatMessage> {
        Nickname::from_response(response)
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
            ChatMessage::Hello {
                request_id,
                versions,
                capabilities,
                credentials,
            } => {
                check_count("versions", versions.len(), u8::MAX as usize)?;
                check_list("capabilities", capabilities, u8::MAX as usize)?;
                check("credentials", credentials, LONG_STRING_MAX)?;
                dst.put_u32(HELLO);
                dst.put_slice(&request_id.0);
                dst.put_u8(versions.len() as u8);
                versions.iter().for_each(|v| dst.put_u16(*v));
                dst.put_u8(capabilities.len() as u8);
                capabilities.iter().for_each(|c| put_short(dst, c));
                put_long(dst, credentials);
            }
            ChatMessage::Welcome {
                request_id,
                version,
                capabilities,
                limits,
            } => {
                check_list("capabilities", capabilities, u8::MAX as usize)?;
                dst.put_u32(WELCOME);
                dst.put_slice(&request_id.0);
                dst.put_u16(*version);
                dst.put_u8(capabilities.len() as u8);
                capabilities.iter().for_each(|c| put_short(dst, c));
                dst.put_u32(limits.max_frame);
                dst.put_u32(limits.rate_per_1000s);
                dst.put_u32(limits.burst);
                dst.put_u32(limits.keepalive_ms);
            }
            ChatMessage::Notice { text } => {
                check("text", text, LONG_STRING_MAX)?;
                dst.put_u32(NOTICE);
                put_long(dst, text);
            }
            ChatMessage::Say { request_id, text } => {
                check("text", text, LONG_STRING_MAX)?;
                dst.put_u32(SAY);
                dst.put_slice(&request_id.0);
                put_long(dst, text);
            }
            ChatMessage::Direct {
                request_id,
                to,
                text,
            } => {
                check("to", to, SHORT_STRING_MAX)?;
                check("text", text, LONG_STRING_MAX)?;
                dst.put_u32(DIRECT);
                dst.put_slice(&request_id.0);
                put_short(dst, to);
                put_long(dst, text);
            }
            ChatMessage::Private { from, text } => {
                check("from", from, SHORT_STRING_MAX)?;
                check("text", text, LONG_STRING_MAX)?;
                dst.put_u32(PRIVATE);
                put_short(dst, from);
                put_long(dst, text);
            }
            ChatMessage::Who { request_id } => {
                dst.put_u32(WHO);
                dst.put_slice(&request_id.0);
            }
            ChatMessage::Members {
                request_id,
                total,
                names,
            } => {
                check_list("names", names, u16::MAX as usize)?;
                dst.put_u32(MEMBERS);
                dst.put_slice(&request_id.0);
                dst.put_u32(*total);
                dst.put_u16(names.len() as u16);
                names.iter().for_each(|n| put_short(dst, n));
            }
            ChatMessage::Presence {
                change,
                nickname,
                new_nickname,
            } => {
                check("nickname", nickname, SHORT_STRING_MAX)?;
                check("new_nickname", new_nickname, SHORT_STRING_MAX)?;
                dst.put_u32(PRESENCE);
                dst.put_u8(match change {
                    PresenceChange::Joined => 0,
                    PresenceChange::Left => 1,
                    PresenceChange::Renamed => 2,
                });
                put_short(dst, nickname);
                put_short(dst, new_nickname);
            }
            ChatMessage::History { at_ms, from, text } => {
                check("from", from, SHORT_STRING_MAX)?;
                check("text", text, LONG_STRING_MAX)?;
                dst.put_u32(HISTORY);
                dst.put_u64(*at_ms);
                put_short(dst, from);
                put_long(dst, text);
            }
            ChatMessage::Login {
                request_id,
                credentials,
            } => {
                check("credentials", credentials, LONG_STRING_MAX)?;
                dst.put_u32(LOGIN);
                dst.put_slice(&request_id.0);
                put_long(dst, credentials);
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
            HELLO => ChatMessage::Hello {
                request_id: r.request_id()?,
                versions: {
                    let n = r.take("versions", 1)?.get_u8();
                    (0..n)
                        .map(|_| Ok(r.take("versions", 2)?.get_u16()))
                        .collect::<Result<_, ChatError>>()?
                },
                capabilities: r.short_strings("capabilities", false)?,
                credentials: r.long_string("credentials")?,
            },
            WELCOME => ChatMessage::Welcome {
                request_id: r.request_id()?,
                version: r.take("version", 2)?.get_u16(),
                capabilities: r.short_strings("capabilities", false)?,
                limits: Limits {
                    max_frame: r.u32("max_frame")?,
                    rate_per_1000s: r.u32("rate_per_1000s")?,
                    burst: r.u32("burst")?,
                    keepalive_ms: r.u32("keepalive_ms")?,
                },
            },
            NOTICE => ChatMessage::Notice {
                text: r.long_string("text")?,
            },
            SAY => ChatMessage::Say {
                request_id: r.request_id()?,
                text: r.long_string("text")?,
            },
            DIRECT => ChatMessage::Direct {
                request_id: r.request_id()?,
                to: r.short_string("to")?,
                text: r.long_string("text")?,
            },
            PRIVATE => ChatMessage::Private {
                from: r.short_string("from")?,
                text: r.long_string("text")?,
            },
            WHO => ChatMessage::Who {
                request_id: r.request_id()?,
            },
            MEMBERS => ChatMessage::Members {
                request_id: r.request_id()?,
                total: r.u32("total")?,
                names: r.short_strings("names", true)?,
            },
            PRESENCE => ChatMessage::Presence {
                change: match r.take("change", 1)?.get_u8() {
                    0 => PresenceChange::Joined,
                    1 => PresenceChange::Left,
                    2 => PresenceChange::Renamed,
                    // A change this version does not know: skip it.
                    _ => return Ok(None),
                },
                nickname: r.short_string("nickname")?,
                new_nickname: r.short_string("new_nickname")?,
            },
            HISTORY => ChatMessage::History {
                at_ms: r.u64("at_ms")?,
                from: r.short_string("from")?,
                text: r.long_string("text")?,
            },
            LOGIN => ChatMessage::Login {
                request_id: r.request_id()?,
                credentials: r.long_string("credentials")?,
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

    /// [`MAX_PAYLOAD_LEN`].
    fn max_payload_len(&self) -> Option<usize> {
        Some(MAX_PAYLOAD_LEN)
    }

    fn kind(&self, msg: &ChatMessage) -> Kind<RequestId> {
        match msg {
            ChatMessage::Chat { .. }
            | ChatMessage::Broadcast { .. }
            | ChatMessage::Notice { .. }
            | ChatMessage::Private { .. }
            | ChatMessage::Presence { .. }
            | ChatMessage::History { .. } => Kind::Message,
            ChatMessage::Keepalive => Kind::Keepalive,
            ChatMessage::SetNickname { request_id, .. }
            | ChatMessage::Hello { request_id, .. }
            | ChatMessage::Say { request_id, .. }
            | ChatMessage::Direct { request_id, .. }
            | ChatMessage::Who { request_id }
            | ChatMessage::Login { request_id, .. } => Kind::Request(*request_id),
            ChatMessage::Ack { request_id }
            | ChatMessage::Nak { request_id, .. }
            | ChatMessage::Welcome { request_id, .. }
            | ChatMessage::Members { request_id, .. } => Kind::Response(*request_id),
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

fn check_count(field: &'static str, n: usize, max: usize) -> Result<(), ChatError> {
    if n > max {
        return Err(ChatError::TooLong { field, len: n, max });
    }
    Ok(())
}

/// A list of short strings: the count, then each string.
fn check_list(field: &'static str, list: &[String], max: usize) -> Result<(), ChatError> {
    check_count(field, list.len(), max)?;
    list.iter()
        .try_for_each(|s| check(field, s, SHORT_STRING_MAX))
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

    fn u64(&mut self, field: &'static str) -> Result<u64, ChatError> {
        Ok(self.take(field, 8)?.get_u64())
    }

    /// A count (`u16` if `wide`, else `u8`), then that many short strings.
    fn short_strings(&mut self, field: &'static str, wide: bool) -> Result<Vec<String>, ChatError> {
        let n = match wide {
            true => usize::from(self.take(field, 2)?.get_u16()),
            false => usize::from(self.take(field, 1)?.get_u8()),
        };
        // Each string takes at least a byte: a count the payload cannot
        // hold fails before anything is reserved for it.
        if n > self.0.len() {
            return Err(ChatError::Truncated { field });
        }
        (0..n).map(|_| self.short_string(field)).collect()
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

    /// The v0.6 examples of docs/PROTOCOL.md, byte for byte, both ways.
    #[test]
    fn protocol_md_v0_6_examples() {
        let examples: Vec<(ChatMessage, Vec<u8>)> = vec![
            (
                ChatMessage::Hello {
                    request_id: ID,
                    versions: vec![V0_5, V0_6],
                    capabilities: vec!["ack".into(), "presence".into()],
                    credentials: String::new(),
                },
                vec![
                    0, 0, 0, 41, 0, 0, 0, 16, 0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187,
                    204, 221, 238, 255, 2, 0, 5, 0, 6, 2, 3, 97, 99, 107, 8, 112, 114, 101, 115,
                    101, 110, 99, 101, 0, 0,
                ],
            ),
            (
                ChatMessage::Welcome {
                    request_id: ID,
                    version: V0_6,
                    capabilities: vec!["ack".into()],
                    limits: Limits {
                        max_frame: 65_813,
                        rate_per_1000s: 10_000,
                        burst: 20,
                        keepalive_ms: 5_000,
                    },
                },
                vec![
                    0, 0, 0, 43, 0, 0, 0, 17, 0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187,
                    204, 221, 238, 255, 0, 6, 1, 3, 97, 99, 107, 0, 1, 1, 21, 0, 0, 39, 16, 0, 0,
                    0, 20, 0, 0, 19, 136,
                ],
            ),
            (
                ChatMessage::Notice { text: "bye".into() },
                vec![0, 0, 0, 9, 0, 0, 0, 18, 0, 3, 98, 121, 101],
            ),
            (
                ChatMessage::Say {
                    request_id: ID,
                    text: "Hi".into(),
                },
                vec![
                    0, 0, 0, 24, 0, 0, 0, 19, 0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187,
                    204, 221, 238, 255, 0, 2, 72, 105,
                ],
            ),
            (
                ChatMessage::Direct {
                    request_id: ID,
                    to: "bo".into(),
                    text: "psst".into(),
                },
                vec![
                    0, 0, 0, 29, 0, 0, 0, 20, 0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187,
                    204, 221, 238, 255, 2, 98, 111, 0, 4, 112, 115, 115, 116,
                ],
            ),
            (
                ChatMessage::Private {
                    from: "ana".into(),
                    text: "psst".into(),
                },
                vec![
                    0, 0, 0, 14, 0, 0, 0, 21, 3, 97, 110, 97, 0, 4, 112, 115, 115, 116,
                ],
            ),
            (
                ChatMessage::Who { request_id: ID },
                vec![
                    0, 0, 0, 20, 0, 0, 0, 22, 0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187,
                    204, 221, 238, 255,
                ],
            ),
            (
                ChatMessage::Members {
                    request_id: ID,
                    total: 2,
                    names: vec!["ana".into(), "bo".into()],
                },
                vec![
                    0, 0, 0, 33, 0, 0, 0, 23, 0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187,
                    204, 221, 238, 255, 0, 0, 0, 2, 0, 2, 3, 97, 110, 97, 2, 98, 111,
                ],
            ),
            (
                ChatMessage::Presence {
                    change: PresenceChange::Renamed,
                    nickname: "ana".into(),
                    new_nickname: "anna".into(),
                },
                vec![
                    0, 0, 0, 14, 0, 0, 0, 24, 2, 3, 97, 110, 97, 4, 97, 110, 110, 97,
                ],
            ),
            (
                ChatMessage::History {
                    at_ms: 1_700_000_000_000,
                    from: "ana".into(),
                    text: "Hi".into(),
                },
                vec![
                    0, 0, 0, 20, 0, 0, 0, 25, 0, 0, 1, 139, 207, 229, 104, 0, 3, 97, 110, 97, 0, 2,
                    72, 105,
                ],
            ),
            (
                ChatMessage::Login {
                    request_id: ID,
                    credentials: "login\0ana\0pw".into(),
                },
                vec![
                    0, 0, 0, 34, 0, 0, 0, 26, 0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187,
                    204, 221, 238, 255, 0, 12, 108, 111, 103, 105, 110, 0, 97, 110, 97, 0, 112,
                    119,
                ],
            ),
            (
                ChatMessage::Nak {
                    request_id: ID,
                    message: "wrong nickname or password".into(),
                },
                [
                    &[0, 0, 0, 0x30, 0, 0, 0, 5][..],
                    &ID.0,
                    &[0, 26],
                    b"wrong nickname or password",
                ]
                .concat(),
            ),
        ];
        for (msg, bytes) in examples {
            assert_eq!(frame_of(&msg), bytes, "{msg:?}");
            assert_eq!(unframe(&bytes), Ok(Some(msg)));
        }
    }

    #[test]
    fn credentials_round_trip_and_refuse_what_is_malformed() {
        let login = Credentials::Login {
            nickname: "ana".into(),
            password: "pw with spaces\n".into(),
        };
        assert_eq!(login.encode(), "login\0ana\0pw with spaces\n");
        assert_eq!(Credentials::parse(&login.encode()), Ok(Some(login.clone())));
        let register = Credentials::Register {
            nickname: "bo".into(),
            password: "p".into(),
        };
        assert_eq!(Credentials::parse("register\0bo\0p"), Ok(Some(register)));
        assert_eq!(Credentials::parse(""), Ok(None));
        for (s, error) in [
            ("login", CredentialsError::Malformed),
            ("login\0ana", CredentialsError::Malformed),
            ("token\0ana\0pw", CredentialsError::Malformed),
            ("login\0\0pw", CredentialsError::Nickname),
            ("login\0ana\0", CredentialsError::Password),
            ("login\0ana\0a\0b", CredentialsError::Password),
        ] {
            assert_eq!(Credentials::parse(s), Err(error), "{s:?}");
        }
        let long = format!("login\0{}\0pw", "n".repeat(SHORT_STRING_MAX + 1));
        assert_eq!(Credentials::parse(&long), Err(CredentialsError::Nickname));
        let long = format!("login\0ana\0{}", "p".repeat(Credentials::MAX_PASSWORD + 1));
        assert_eq!(Credentials::parse(&long), Err(CredentialsError::Password));
        // Never in a log line.
        let shown = format!("{login:?}");
        assert!(
            shown.contains("ana") && !shown.contains("spaces"),
            "{shown}"
        );
    }

    #[test]
    fn v0_6_kinds_and_limits() {
        let say = ChatMessage::Say {
            request_id: ID,
            text: "x".into(),
        };
        assert_eq!(Chat.kind(&say), Kind::Request(ID));
        let welcome = ChatMessage::Welcome {
            request_id: ID,
            version: V0_6,
            capabilities: vec![],
            limits: Limits::default(),
        };
        assert_eq!(Chat.kind(&welcome), Kind::Response(ID));
        let private = ChatMessage::Private {
            from: "a".into(),
            text: "b".into(),
        };
        assert_eq!(Chat.kind(&private), Kind::Message);
        // The largest bounded message fits the protocol's own limit.
        let direct = ChatMessage::Direct {
            request_id: ID,
            to: "n".repeat(SHORT_STRING_MAX),
            text: "t".repeat(LONG_STRING_MAX),
        };
        let mut buf = BytesMut::new();
        Chat.encode(&direct, &mut buf).unwrap();
        assert_eq!(buf.len(), MAX_PAYLOAD_LEN);
        // Lists are counted: 256 capabilities do not fit a u8 count.
        let hello = ChatMessage::Hello {
            request_id: ID,
            versions: vec![V0_6],
            capabilities: vec!["c".into(); 256],
            credentials: String::new(),
        };
        assert!(matches!(
            Chat.encode(&hello, &mut BytesMut::new()),
            Err(ChatError::TooLong {
                field: "capabilities",
                ..
            })
        ));
        // A count the payload cannot hold is refused before any allocation.
        let mut lying = vec![0, 0, 0, 23];
        lying.extend_from_slice(&ID.0);
        lying.extend_from_slice(&[0, 0, 0, 1, 0xff, 0xff]);
        assert_eq!(
            Chat.decode(Bytes::from(lying)),
            Err(ChatError::Truncated { field: "names" })
        );
        // A presence change this version does not know is skipped.
        let future = Bytes::from_static(&[0, 0, 0, 24, 9, 1, b'a', 0]);
        assert_eq!(Chat.decode(future), Ok(None));
    }

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
