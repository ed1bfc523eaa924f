//! The client side of the chat protocol, for `examples/chat_client`: the
//! v0.6 handshake and its fallback to v0.5 ([`negotiate`]), the commands a
//! person types ([`Command`]) and the v0.6 requests they make ([`Say`],
//! [`Direct`], [`Who`]), how each message from the server reads as a line
//! ([`line_for`]), and what the terminal UI shows ([`View`]). None of
//! it draws or reads a terminal, so all of it is tested here.
//!
//! ```no_run
//! use chatpipe::chat::Chat;
//! use chatpipe::Builder;
//! use chatpipe_chat::client::{negotiate, Negotiated, DEFAULT_WAIT, WANTED};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! smol::block_on(async {
//!     let stream = smol::net::TcpStream::connect("127.0.0.1:33333").await?;
//!     let (sender, mut incoming, conn) = Builder::new().build(stream, Chat);
//!     let _driver = smol::spawn(conn);
//!     match negotiate(&sender, &mut incoming, WANTED, DEFAULT_WAIT).await? {
//!         Negotiated::Welcomed { capabilities, .. } => println!("v0.6: {capabilities:?}"),
//!         Negotiated::Fallback(fallback) => println!("v0.5 ({fallback:?})"),
//!     }
//!     Ok(())
//! })
//! # }
//! ```

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use chatpipe::chat::{
    capability, Chat, ChatMessage, Credentials, Limits, PresenceChange, RequestId, V0_5, V0_6,
};
use chatpipe::{Call, Error, Incoming, Sender};
use smol::future::FutureExt;
use smol::stream::StreamExt;
use smol::Timer;

/// How long [`negotiate`] waits for a Welcome before it takes the server
/// for a v0.5 one: `chat_client`'s wait, 2 s.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(2);

/// The capabilities `chat_client` asks for: all of v0.6's.
pub const WANTED: &[&str] = &[
    capability::ACK,
    capability::DIRECT,
    capability::PRESENCE,
    capability::HISTORY,
    capability::ACCOUNT,
];

/// What the handshake settled on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiated {
    /// The server answered the Hello with a Welcome.
    Welcomed {
        /// The version it chose.
        version: u16,
        /// The capabilities it granted.
        capabilities: Vec<String>,
        /// The limits to respect.
        limits: Limits,
    },
    /// No Welcome: the server speaks v0.5, which skips a Hello.
    Fallback(Fallback),
}

/// Why [`negotiate`] fell back to v0.5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// This message arrived before any Welcome (a v0.5 server's Broadcast,
    /// say). It was taken from the incoming stream: show it.
    Arrived(ChatMessage),
    /// Nothing came within the wait.
    Waited,
}

impl Negotiated {
    /// The version to speak: the Welcome's, or [`V0_5`].
    pub fn version(&self) -> u16 {
        match self {
            Negotiated::Welcomed { version, .. } => *version,
            Negotiated::Fallback(_) => V0_5,
        }
    }

    /// Whether the server granted `capability` (a v0.6 Welcome that names
    /// it).
    pub fn grants(&self, capability: &str) -> bool {
        match self {
            Negotiated::Welcomed {
                version,
                capabilities,
                ..
            } => *version >= V0_6 && capabilities.iter().any(|c| c == capability),
            Negotiated::Fallback(_) => false,
        }
    }

    /// The message that arrived first from a v0.5 server, taken out (it is
    /// the caller's to show); `None` after that, and in any other case.
    pub fn take_arrived(&mut self) -> Option<ChatMessage> {
        match self {
            Negotiated::Fallback(fallback @ Fallback::Arrived(_)) => {
                match std::mem::replace(fallback, Fallback::Waited) {
                    Fallback::Arrived(msg) => Some(msg),
                    Fallback::Waited => None,
                }
            }
            _ => None,
        }
    }
}

/// Why the handshake failed: the connection is of no use.
#[derive(Debug)]
pub enum NegotiateError {
    /// The server answered the Hello with a Nak, and closes.
    Refused(String),
    /// The connection failed or closed first.
    Connection(Error),
    /// The server answered the Hello with neither a Welcome nor a Nak.
    Unexpected(ChatMessage),
    /// Credentials were given, and the server speaks v0.5: it has no
    /// accounts.
    NoAccounts,
}

impl fmt::Display for NegotiateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NegotiateError::Refused(reason) => write!(f, "refused by the server: {reason}"),
            NegotiateError::Connection(Error::Closed) => {
                f.write_str("connection closed by the server")
            }
            NegotiateError::Connection(e) => write!(f, "connection lost: {e}"),
            NegotiateError::Unexpected(msg) => write!(f, "unexpected answer to Hello: {msg:?}"),
            NegotiateError::NoAccounts => {
                f.write_str("cannot log in: the server speaks v0.5, which has no accounts")
            }
        }
    }
}

impl std::error::Error for NegotiateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NegotiateError::Connection(e) => Some(e),
            _ => None,
        }
    }
}

/// Opens a connection as a v0.6 client: sends a Hello (versions 0.5 and
/// 0.6, the capabilities in `wants`, no credentials) as a request, and
/// waits for the Welcome. [`negotiate_as`] logs in as well.
///
/// A v0.5 server skips the Hello. So the client falls back to v0.5 at once
/// when anything but the Welcome arrives first (that message is handed
/// back in [`Fallback::Arrived`]; nothing is lost), or when `wait` passes
/// without a Welcome ([`Fallback::Waited`]; `chat_client` waits
/// [`DEFAULT_WAIT`]). Keepalives do not count: the connection keeps them
/// to itself. On a fallback the Hello is abandoned, so a late answer to it
/// is ignored.
///
/// A Nak is [`NegotiateError::Refused`], with the server's reason; the
/// connection ending first is [`NegotiateError::Connection`].
///
/// Call it first, before anything else is sent or read. If the Welcome
/// and the messages after it (History, say) arrive together, those stay in
/// `incoming`.
pub async fn negotiate(
    sender: &Sender<Chat>,
    incoming: &mut Incoming<Chat>,
    wants: &[&str],
    wait: Duration,
) -> Result<Negotiated, NegotiateError> {
    negotiate_as(sender, incoming, wants, None, wait).await
}

/// [`negotiate`], with `credentials` in the Hello: the Welcome then means
/// the client is logged in (or registered) and holds the account's
/// nickname; a refused login is a Nak ([`NegotiateError::Refused`], with
/// the server's reason). Send credentials over an encrypted connection
/// only: a server refuses them otherwise, but by then they have crossed
/// the network. A v0.5 server skips the Hello and has no accounts:
/// [`NegotiateError::NoAccounts`] instead of a fallback.
pub async fn negotiate_as(
    sender: &Sender<Chat>,
    incoming: &mut Incoming<Chat>,
    wants: &[&str],
    credentials: Option<&Credentials>,
    wait: Duration,
) -> Result<Negotiated, NegotiateError> {
    let negotiated = hello(sender, incoming, wants, credentials, wait).await?;
    if credentials.is_some() && matches!(negotiated, Negotiated::Fallback(_)) {
        return Err(NegotiateError::NoAccounts);
    }
    Ok(negotiated)
}

async fn hello(
    sender: &Sender<Chat>,
    incoming: &mut Incoming<Chat>,
    wants: &[&str],
    credentials: Option<&Credentials>,
    wait: Duration,
) -> Result<Negotiated, NegotiateError> {
    enum Step {
        Answer(Result<ChatMessage, Error>),
        Arrived(Option<Result<ChatMessage, Error>>),
        Waited,
    }
    let hello = ChatMessage::Hello {
        request_id: RequestId::random(),
        versions: vec![V0_5, V0_6],
        capabilities: wants.iter().map(|c| c.to_string()).collect(),
        credentials: credentials.map(Credentials::encode).unwrap_or_default(),
    };
    // The answer is polled first: a Welcome that came in with the messages
    // after it wins over them.
    let answer = async { Step::Answer(sender.request(hello).await) };
    let arrived = async { Step::Arrived(incoming.next().await) };
    let waited = async {
        Timer::after(wait).await;
        Step::Waited
    };
    match answer.or(arrived).or(waited).await {
        Step::Answer(Ok(ChatMessage::Welcome {
            version,
            capabilities,
            limits,
            ..
        })) => Ok(Negotiated::Welcomed {
            version,
            capabilities,
            limits,
        }),
        Step::Answer(Ok(ChatMessage::Nak { message, .. })) => Err(NegotiateError::Refused(message)),
        Step::Answer(Ok(other)) => Err(NegotiateError::Unexpected(other)),
        Step::Answer(Err(e)) | Step::Arrived(Some(Err(e))) => Err(NegotiateError::Connection(e)),
        Step::Arrived(None) => Err(NegotiateError::Connection(Error::Closed)),
        Step::Arrived(Some(Ok(msg))) => Ok(Negotiated::Fallback(Fallback::Arrived(msg))),
        Step::Waited => Ok(Negotiated::Fallback(Fallback::Waited)),
    }
}

/// A v0.6 chat to the room, for [`Sender::call`]: `Ok(())` once the
/// server acked it (it is in the room), `Err(reason)` if it refused it.
/// Needs the `ack` capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Say(pub String);

impl Call<Chat> for Say {
    type Output = Result<(), String>;

    fn into_request(self, request_id: RequestId) -> ChatMessage {
        ChatMessage::Say {
            request_id,
            text: self.0,
        }
    }

    fn from_response(response: ChatMessage) -> Result<Self::Output, ChatMessage> {
        ack_or_nak(response)
    }
}

/// A message for one member only, for [`Sender::call`]: `Ok(())` once
/// delivered, `Err(reason)` if refused (nobody by that name, say). Needs
/// the `direct` capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direct {
    /// The recipient's nickname.
    pub to: String,
    /// What to tell them.
    pub text: String,
}

impl Call<Chat> for Direct {
    type Output = Result<(), String>;

    fn into_request(self, request_id: RequestId) -> ChatMessage {
        ChatMessage::Direct {
            request_id,
            to: self.to,
            text: self.text,
        }
    }

    fn from_response(response: ChatMessage) -> Result<Self::Output, ChatMessage> {
        ack_or_nak(response)
    }
}

/// Who is in the room, for [`Sender::call`]: the total and the names that
/// fit in one frame, or the reason for a Nak. Needs the `presence`
/// capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Who;

impl Call<Chat> for Who {
    type Output = Result<(u32, Vec<String>), String>;

    fn into_request(self, request_id: RequestId) -> ChatMessage {
        ChatMessage::Who { request_id }
    }

    fn from_response(response: ChatMessage) -> Result<Self::Output, ChatMessage> {
        match response {
            ChatMessage::Members { total, names, .. } => Ok(Ok((total, names))),
            ChatMessage::Nak { message, .. } => Ok(Err(message)),
            other => Err(other),
        }
    }
}

fn ack_or_nak(response: ChatMessage) -> Result<Result<(), String>, ChatMessage> {
    match response {
        ChatMessage::Ack { .. } => Ok(Ok(())),
        ChatMessage::Nak { message, .. } => Ok(Err(message)),
        other => Err(other),
    }
}

/// A line typed by the person at the keyboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// Anything that is not a command: said to the room.
    Say(&'a str),
    /// `/nick NAME`.
    Nick(&'a str),
    /// `/msg NICK TEXT`: for NICK only.
    Msg {
        /// The recipient.
        to: &'a str,
        /// What to tell them.
        text: &'a str,
    },
    /// `/who`: who is in the room.
    Who,
    /// `/register`: make the current nickname an account (the password is
    /// asked for next).
    Register,
    /// `/login NAME`: log in to the account of NAME (the password is asked
    /// for next).
    Login(&'a str),
    /// `/quit`.
    Quit,
    /// A command without what it needs; the usage to show.
    Usage(&'static str),
    /// An empty line: nothing to do.
    Empty,
}

impl<'a> Command<'a> {
    /// Reads one line (without its line break). The commands are `/nick
    /// NAME`, `/msg NICK TEXT`, `/who`, `/register`, `/login NAME` and
    /// `/quit`; every other line, slashes and all, is said to the room.
    pub fn parse(line: &'a str) -> Self {
        /// `line` is `/name` alone or followed by a space: what follows.
        fn command<'a>(line: &'a str, name: &str) -> Option<&'a str> {
            let rest = line.strip_prefix(name)?;
            if rest.is_empty() {
                Some(rest)
            } else {
                rest.strip_prefix(' ')
            }
        }
        if line.is_empty() {
            Command::Empty
        } else if line == "/quit" {
            Command::Quit
        } else if let Some(rest) = command(line, "/nick") {
            match rest.trim() {
                "" => Command::Usage("usage: /nick NAME"),
                nick => Command::Nick(nick),
            }
        } else if let Some(rest) = command(line, "/msg") {
            let rest = rest.trim_start();
            match rest.split_once(char::is_whitespace) {
                Some((to, text)) if !text.trim().is_empty() => Command::Msg {
                    to,
                    text: text.trim_start(),
                },
                _ => Command::Usage("usage: /msg NICK TEXT"),
            }
        } else if line.trim_end() == "/who" {
            Command::Who
        } else if line.trim_end() == "/register" {
            Command::Register
        } else if let Some(rest) = command(line, "/login") {
            match rest.trim() {
                "" => Command::Usage("usage: /login NAME (the password is asked for next)"),
                nick => Command::Login(nick),
            }
        } else {
            Command::Say(line)
        }
    }
}

/// What a client has shown of the room lately, so that the history a
/// server sends again after a reconnect is not shown twice: the last
/// [`Shown::KEEP`] room messages (who, what), live or from history.
#[derive(Debug, Default)]
pub struct Shown {
    recent: VecDeque<(String, String)>,
}

impl Shown {
    /// Room messages remembered; a server's history is usually shorter.
    pub const KEEP: usize = 256;

    /// Whether to show `msg`: false for a History entry already shown.
    /// Remembers the room messages it lets through.
    pub fn fresh(&mut self, msg: &ChatMessage) -> bool {
        let (from, text, history) = match msg {
            ChatMessage::Broadcast { from, text } => (from, text, false),
            ChatMessage::History { from, text, .. } => (from, text, true),
            _ => return true,
        };
        if history && self.recent.iter().any(|(f, t)| f == from && t == text) {
            return false;
        }
        if self.recent.len() == Self::KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back((from.clone(), text.clone()));
        true
    }
}

/// How `chat_client` prints a message from the server in line mode: a
/// line, or `None` for messages it does not show (keepalives, responses).
///
/// | message | line |
/// |---|---|
/// | Broadcast | `FROM: TEXT` |
/// | Private | `[private] FROM: TEXT` |
/// | History | `[history] FROM: TEXT` |
/// | Presence | `* ana joined`, `* ana left`, `* ana is now anna` |
/// | Notice | `! server: TEXT` |
///
/// Control characters in what peers sent are escaped ([`one_line`]).
pub fn line_for(msg: &ChatMessage) -> Option<String> {
    let said = |from: &str, text: &str| format!("{}: {}", one_line(from), one_line(text));
    Some(match msg {
        ChatMessage::Broadcast { from, text } => said(from, text),
        ChatMessage::Private { from, text } => format!("[private] {}", said(from, text)),
        ChatMessage::History { from, text, .. } => format!("[history] {}", said(from, text)),
        ChatMessage::Presence {
            change,
            nickname,
            new_nickname,
        } => match change {
            PresenceChange::Joined => format!("* {} joined", one_line(nickname)),
            PresenceChange::Left => format!("* {} left", one_line(nickname)),
            PresenceChange::Renamed => {
                format!("* {} is now {}", one_line(nickname), one_line(new_nickname))
            }
        },
        ChatMessage::Notice { text } => format!("! server: {}", one_line(text)),
        _ => return None,
    })
}

/// The answer to `/who`: `* in the room (N): a, b, c`, N the room's
/// total, with `, and K more` when the names did not all fit the frame.
pub fn members_line(total: u32, names: &[String]) -> String {
    let mut line = format!("* in the room ({total}):");
    for (i, name) in names.iter().enumerate() {
        line.push_str(if i == 0 { " " } else { ", " });
        line.push_str(&one_line(name));
    }
    let more = (total as usize).saturating_sub(names.len());
    if more > 0 {
        line.push_str(&format!(", and {more} more"));
    }
    line
}

/// Keeps a peer's text on one line: control characters are escaped.
pub fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// What one of the lines in a [`View`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Someone said it to the room.
    Said,
    /// Someone said it to you alone.
    Private,
    /// Said before you joined.
    History,
    /// Someone joined, left or changed nickname.
    Presence,
    /// The server's own words.
    Notice,
    /// What the client tells you (your new nickname, `/who`'s answer).
    Info,
    /// Something went wrong here (a refused nickname, a lost connection).
    Problem,
    /// Your own line (to the room, or `/msg`).
    Own,
}

/// What became of one of your own lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    /// Nothing to tell: not yours, or sent over v0.5, which acks nothing.
    None,
    /// Sent, not acked yet (shown `…`).
    Pending,
    /// The server acked it (shown `✓`).
    Acked,
    /// The server refused it, for this reason (shown `✗ reason`).
    Refused(String),
}

/// One line of the message pane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When: milliseconds since the Unix epoch (for History, when it was
    /// said).
    pub at_ms: u64,
    /// What it is.
    pub kind: EntryKind,
    /// The text as shown, marks and time aside: `ana: hi`,
    /// `[private] bo: psst`, `* ana joined`.
    pub text: String,
    /// For your own lines, what became of them.
    pub mark: Mark,
}

/// Identifies one of your own lines in a [`View`], to settle its mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryId(u64);

/// What the terminal UI shows, apart from the input line: the messages,
/// oldest first (at most [`View::MAX_ENTRIES`]), and the members.
#[derive(Debug, Default)]
pub struct View {
    entries: VecDeque<Entry>,
    /// The id of `entries[0]`.
    first: u64,
    members: BTreeSet<String>,
}

impl View {
    /// The most lines kept; older ones are forgotten.
    pub const MAX_ENTRIES: usize = 10_000;

    /// An empty view.
    pub fn new() -> Self {
        View::default()
    }

    /// The lines, oldest first.
    pub fn entries(&self) -> impl DoubleEndedIterator<Item = &Entry> + ExactSizeIterator {
        self.entries.iter()
    }

    /// The members known, in order.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(String::as_str)
    }

    fn push(&mut self, at_ms: u64, kind: EntryKind, text: String, mark: Mark) -> EntryId {
        if self.entries.len() == Self::MAX_ENTRIES {
            self.entries.pop_front();
            self.first += 1;
        }
        self.entries.push_back(Entry {
            at_ms,
            kind,
            text,
            mark,
        });
        EntryId(self.first + self.entries.len() as u64 - 1)
    }

    /// Shows what the server sent (`now_ms`: when it arrived); updates the
    /// members on a Presence. Messages with nothing to show are ignored.
    pub fn receive(&mut self, msg: &ChatMessage, now_ms: u64) {
        let Some(text) = line_for(msg) else { return };
        let (at_ms, kind) = match msg {
            ChatMessage::Broadcast { .. } => (now_ms, EntryKind::Said),
            ChatMessage::Private { .. } => (now_ms, EntryKind::Private),
            ChatMessage::History { at_ms, .. } => (*at_ms, EntryKind::History),
            ChatMessage::Presence {
                change,
                nickname,
                new_nickname,
            } => {
                match change {
                    PresenceChange::Joined => {
                        self.members.insert(nickname.clone());
                    }
                    PresenceChange::Left => {
                        self.members.remove(nickname);
                    }
                    PresenceChange::Renamed => self.renamed(Some(nickname), new_nickname),
                }
                (now_ms, EntryKind::Presence)
            }
            ChatMessage::Notice { .. } => (now_ms, EntryKind::Notice),
            _ => (now_ms, EntryKind::Info),
        };
        self.push(at_ms, kind, text, Mark::None);
    }

    /// Shows a line of the client's own.
    pub fn info(&mut self, kind: EntryKind, text: impl Into<String>, now_ms: u64) {
        self.push(now_ms, kind, text.into(), Mark::None);
    }

    /// Shows one of your own lines, as `text` (`ana: hi`), with `mark`;
    /// settle it later with [`View::settle`].
    pub fn own(&mut self, text: impl Into<String>, mark: Mark, now_ms: u64) -> EntryId {
        self.push(now_ms, EntryKind::Own, text.into(), mark)
    }

    /// Marks your line acked (`Ok`) or refused with the reason. A line
    /// already forgotten is ignored.
    pub fn settle(&mut self, id: EntryId, outcome: Result<(), String>) {
        self.mark(
            id,
            match outcome {
                Ok(()) => Mark::Acked,
                Err(reason) => Mark::Refused(reason),
            },
        );
    }

    /// Gives your line another mark (a line typed while connecting, sent
    /// over v0.5 after all, has none). A line already forgotten is ignored.
    pub fn mark(&mut self, id: EntryId, mark: Mark) {
        let Some(i) = id.0.checked_sub(self.first) else {
            return;
        };
        if let Some(entry) = self.entries.get_mut(i as usize) {
            entry.mark = mark;
        }
    }

    /// Replaces the members with a Who's answer.
    pub fn set_members(&mut self, names: impl IntoIterator<Item = String>) {
        self.members = names.into_iter().collect();
    }

    /// Someone (you, say) is now `new`, and no longer `old`.
    pub fn renamed(&mut self, old: Option<&str>, new: &str) {
        if let Some(old) = old {
            self.members.remove(old);
        }
        self.members.insert(new.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;

    use bytes::{Bytes, BytesMut};
    use chatpipe::chat::ChatError;
    use chatpipe::{Builder, Kind, Protocol};
    use smol::net::{TcpListener, TcpStream};

    /// A v0.5-only peer: it knows the six types of v0.5 and skips every
    /// other one, as a v0.5 server does with a Hello.
    struct V05;

    impl Protocol for V05 {
        type Message = ChatMessage;
        type RequestId = RequestId;
        type Error = ChatError;

        fn encode(
            &self,
            msg: &ChatMessage,
            dst: &mut BytesMut,
        ) -> Result<Option<Bytes>, ChatError> {
            Chat.encode(msg, dst)
        }

        fn decode(&self, payload: Bytes) -> Result<Option<ChatMessage>, ChatError> {
            match payload.get(..4) {
                Some(t) if u32::from_be_bytes(t.try_into().unwrap()) > 5 => Ok(None),
                _ => Chat.decode(payload),
            }
        }

        fn keepalive(&self) -> Option<ChatMessage> {
            Chat.keepalive()
        }

        fn kind(&self, msg: &ChatMessage) -> Kind<RequestId> {
            Chat.kind(msg)
        }
    }

    /// A loopback connection: a chatpipe chat client, and the server's end
    /// of it as a bare socket for the script.
    async fn pair() -> (Sender<Chat>, Incoming<Chat>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (sender, incoming, conn) = Builder::new().build(client, Chat);
        smol::spawn(conn).detach();
        (sender, incoming, server)
    }

    fn run<T>(body: impl std::future::Future<Output = T>) -> T {
        smol::block_on(body.or(async {
            Timer::after(Duration::from_secs(20)).await;
            panic!("test timed out")
        }))
    }

    const WAIT: Duration = Duration::from_millis(200);

    /// (a) A v0.6 server answers the Hello with a Welcome; what it sends
    /// right after stays in the stream.
    #[test]
    fn a_v0_6_server_welcomes() {
        run(async {
            let (sender, mut incoming, io) = pair().await;
            let (server, mut requests, conn) = Builder::new().build(io, Chat);
            smol::spawn(conn).detach();
            let script = smol::spawn(async move {
                let Some(Ok(ChatMessage::Hello {
                    request_id,
                    versions,
                    capabilities,
                    credentials,
                })) = requests.next().await
                else {
                    panic!("expected a Hello first")
                };
                assert_eq!(versions, [V0_5, V0_6]);
                assert_eq!(capabilities, WANTED);
                assert_eq!(credentials, "");
                let limits = Limits {
                    max_frame: 65_813,
                    rate_per_1000s: 10_000,
                    burst: 20,
                    keepalive_ms: 5_000,
                };
                let welcome = ChatMessage::Welcome {
                    request_id,
                    version: V0_6,
                    capabilities: vec!["ack".into(), "history".into()],
                    limits,
                };
                let history = ChatMessage::History {
                    at_ms: 1_700_000_000_000,
                    from: "bo".into(),
                    text: "before".into(),
                };
                server.send(welcome).await.unwrap();
                server.send(history).await.unwrap();
                (server, requests)
            });
            let mut got = negotiate(&sender, &mut incoming, WANTED, DEFAULT_WAIT)
                .await
                .unwrap();
            assert_eq!(got.version(), V0_6);
            assert!(got.grants(capability::ACK));
            assert!(got.grants(capability::HISTORY));
            assert!(!got.grants(capability::DIRECT));
            assert_eq!(got.take_arrived(), None);
            let Negotiated::Welcomed { limits, .. } = got else {
                unreachable!()
            };
            assert_eq!(limits.burst, 20);
            let _server = script.await;
            assert!(matches!(
                incoming.next().await,
                Some(Ok(ChatMessage::History { .. }))
            ));
        })
    }

    /// (b) A v0.5-only server skips the Hello and says nothing: fall back
    /// once the wait is over (only that it does is checked, not when).
    #[test]
    fn a_silent_v0_5_server_is_waited_for() {
        run(async {
            let (sender, mut incoming, io) = pair().await;
            let (server, mut requests, conn) = Builder::new().build(io, V05);
            smol::spawn(conn).detach();
            let got = negotiate(&sender, &mut incoming, WANTED, WAIT)
                .await
                .unwrap();
            assert_eq!(got, Negotiated::Fallback(Fallback::Waited));
            assert_eq!(got.version(), V0_5);
            assert!(!got.grants(capability::ACK));
            // The connection goes on in v0.5; the Hello was skipped, so the
            // server's first message is the next one sent.
            let nick = ChatMessage::set_nickname("ana");
            let reply = smol::spawn(async move {
                let Some(Ok(ChatMessage::SetNickname { request_id, .. })) = requests.next().await
                else {
                    panic!("expected the nickname request first")
                };
                server.send(ChatMessage::Ack { request_id }).await.unwrap();
                server
            });
            assert!(matches!(
                sender.request(nick).await,
                Ok(ChatMessage::Ack { .. })
            ));
            let _server = reply.await;
        })
    }

    /// (c) A v0.5 server's Broadcast arrives first: fall back at once, and
    /// the Broadcast is handed back, not lost.
    #[test]
    fn a_v0_5_message_first_falls_back_at_once() {
        run(async {
            let (sender, mut incoming, io) = pair().await;
            let (server, _requests, conn) = Builder::new().build(io, V05);
            smol::spawn(conn).detach();
            let broadcast = ChatMessage::Broadcast {
                from: "bo".into(),
                text: "hi".into(),
            };
            server.send(broadcast.clone()).await.unwrap();
            // The wait is long: only the Broadcast can end it in time.
            let mut got = negotiate(&sender, &mut incoming, WANTED, Duration::from_secs(3600))
                .await
                .unwrap();
            assert_eq!(got.take_arrived(), Some(broadcast));
            assert_eq!(got.take_arrived(), None);
            assert_eq!(got.version(), V0_5);
            // Later messages follow in the stream.
            let next = ChatMessage::Broadcast {
                from: "cy".into(),
                text: "yo".into(),
            };
            server.send(next.clone()).await.unwrap();
            assert_eq!(incoming.next().await.unwrap().unwrap(), next);
        })
    }

    /// A Nak to the Hello is an error with the server's reason.
    #[test]
    fn a_nak_refuses() {
        run(async {
            let (sender, mut incoming, io) = pair().await;
            let (server, mut requests, conn) = Builder::new().build(io, Chat);
            let driver = smol::spawn(conn);
            smol::spawn(async move {
                let Some(Ok(ChatMessage::Hello { request_id, .. })) = requests.next().await else {
                    panic!("expected a Hello")
                };
                let message = "server full".to_owned();
                let nak = ChatMessage::Nak {
                    request_id,
                    message,
                };
                server.send(nak).await.unwrap();
                server.close();
                let _ = driver.await;
            })
            .detach();
            let err = negotiate(&sender, &mut incoming, WANTED, DEFAULT_WAIT)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, NegotiateError::Refused(r) if r == "server full"),
                "{err:?}"
            );
            assert_eq!(err.to_string(), "refused by the server: server full");
        })
    }

    /// The server closing before any answer is a connection error.
    #[test]
    fn a_close_first_is_an_error() {
        run(async {
            let (sender, mut incoming, io) = pair().await;
            drop(io);
            let err = negotiate(&sender, &mut incoming, WANTED, DEFAULT_WAIT)
                .await
                .unwrap_err();
            assert!(matches!(err, NegotiateError::Connection(_)), "{err:?}");
        })
    }

    /// Say, Direct and Who as calls: Ack, Nak and Members read back.
    #[test]
    fn v0_6_calls() {
        run(async {
            let (sender, _incoming, io) = pair().await;
            let (server, mut requests, conn) = Builder::new().build(io, Chat);
            smol::spawn(conn).detach();
            smol::spawn(async move {
                while let Some(Ok(msg)) = requests.next().await {
                    let reply = match msg {
                        ChatMessage::Say { request_id, .. } => ChatMessage::Ack { request_id },
                        ChatMessage::Direct { request_id, to, .. } => ChatMessage::Nak {
                            request_id,
                            message: format!("nobody is called {to}"),
                        },
                        ChatMessage::Who { request_id } => ChatMessage::Members {
                            request_id,
                            total: 3,
                            names: vec!["ana".into(), "bo".into()],
                        },
                        other => panic!("unexpected {other:?}"),
                    };
                    server.send(reply).await.unwrap();
                }
            })
            .detach();
            assert_eq!(sender.call(Say("hi".into())).await.unwrap(), Ok(()));
            let direct = Direct {
                to: "zed".into(),
                text: "psst".into(),
            };
            assert_eq!(
                sender.call(direct).await.unwrap(),
                Err("nobody is called zed".to_owned())
            );
            let (total, names) = sender.call(Who).await.unwrap().unwrap();
            assert_eq!(
                members_line(total, &names),
                "* in the room (3): ana, bo, and 1 more"
            );
        })
    }

    #[test]
    fn history_already_shown_is_not_shown_again() {
        let said = |text: &str| ChatMessage::Broadcast {
            from: "bo".into(),
            text: text.into(),
        };
        let history = |text: &str| ChatMessage::History {
            at_ms: 1,
            from: "bo".into(),
            text: text.into(),
        };
        let mut shown = Shown::default();
        assert!(shown.fresh(&history("old")));
        assert!(shown.fresh(&said("live")));
        // After a reconnect, the same history again: both skipped.
        assert!(!shown.fresh(&history("old")));
        assert!(!shown.fresh(&history("live")));
        // What was said while away is new.
        assert!(shown.fresh(&history("while away")));
        // Live messages are always shown, even when the text repeats.
        assert!(shown.fresh(&said("live")));
        // Bounded: the oldest are forgotten.
        for i in 0..Shown::KEEP {
            shown.fresh(&said(&i.to_string()));
        }
        assert!(shown.fresh(&history("old")));
    }

    #[test]
    fn commands() {
        use Command::*;
        let cases = [
            ("", Empty),
            ("hello", Say("hello")),
            ("/quit", Quit),
            ("/quit now", Say("/quit now")),
            ("/nick ana", Nick("ana")),
            ("/nick  ana ", Nick("ana")),
            ("/nick", Usage("usage: /nick NAME")),
            ("/nick ", Usage("usage: /nick NAME")),
            ("/nickname", Say("/nickname")),
            (
                "/msg bo hi there",
                Msg {
                    to: "bo",
                    text: "hi there",
                },
            ),
            (
                "/msg  bo  psst",
                Msg {
                    to: "bo",
                    text: "psst",
                },
            ),
            ("/msg bo", Usage("usage: /msg NICK TEXT")),
            ("/msg bo  ", Usage("usage: /msg NICK TEXT")),
            ("/msg", Usage("usage: /msg NICK TEXT")),
            ("/who", Who),
            ("/who ", Who),
            ("/whom", Say("/whom")),
            ("/me waves", Say("/me waves")),
            ("/register", Register),
            ("/registered", Say("/registered")),
            ("/login ana", Login("ana")),
            (
                "/login",
                Usage("usage: /login NAME (the password is asked for next)"),
            ),
        ];
        for (line, command) in cases {
            assert_eq!(Command::parse(line), command, "{line:?}");
        }
    }

    #[test]
    fn lines() {
        let cases = [
            (
                ChatMessage::Broadcast {
                    from: "bo".into(),
                    text: "two\nlines".into(),
                },
                r"bo: two\nlines",
            ),
            (
                ChatMessage::Private {
                    from: "bo".into(),
                    text: "psst".into(),
                },
                "[private] bo: psst",
            ),
            (
                ChatMessage::History {
                    at_ms: 0,
                    from: "ana".into(),
                    text: "earlier".into(),
                },
                "[history] ana: earlier",
            ),
            (
                ChatMessage::Presence {
                    change: PresenceChange::Joined,
                    nickname: "ana".into(),
                    new_nickname: String::new(),
                },
                "* ana joined",
            ),
            (
                ChatMessage::Presence {
                    change: PresenceChange::Left,
                    nickname: "ana".into(),
                    new_nickname: String::new(),
                },
                "* ana left",
            ),
            (
                ChatMessage::Presence {
                    change: PresenceChange::Renamed,
                    nickname: "ana".into(),
                    new_nickname: "anna".into(),
                },
                "* ana is now anna",
            ),
            (
                ChatMessage::Notice {
                    text: "closing soon".into(),
                },
                "! server: closing soon",
            ),
        ];
        for (msg, line) in cases {
            assert_eq!(line_for(&msg).as_deref(), Some(line));
        }
        assert_eq!(line_for(&ChatMessage::Keepalive), None);
        let names = ["ana".to_owned(), "bo".to_owned(), "cy".to_owned()];
        assert_eq!(members_line(3, &names), "* in the room (3): ana, bo, cy");
        assert_eq!(
            members_line(5, &names[..2]),
            "* in the room (5): ana, bo, and 3 more"
        );
        assert_eq!(members_line(0, &[]), "* in the room (0):");
    }

    #[test]
    fn the_view_tracks_marks_and_members() {
        let mut view = View::new();
        view.set_members(["bo".to_owned(), "ana".to_owned()]);
        let hi = view.own("ana: hi", Mark::Pending, 1);
        let psst = view.own("[private] ana → cy: psst", Mark::Pending, 2);
        view.receive(
            &ChatMessage::Presence {
                change: PresenceChange::Joined,
                nickname: "cy".into(),
                new_nickname: String::new(),
            },
            3,
        );
        view.receive(
            &ChatMessage::History {
                at_ms: 0,
                from: "bo".into(),
                text: "old".into(),
            },
            4,
        );
        view.receive(&ChatMessage::Keepalive, 5);
        view.settle(hi, Ok(()));
        view.settle(psst, Err("no such member".into()));
        let shown: Vec<_> = view
            .entries()
            .map(|e| (e.at_ms, e.kind, e.text.as_str(), e.mark.clone()))
            .collect();
        assert_eq!(
            shown,
            [
                (1, EntryKind::Own, "ana: hi", Mark::Acked),
                (
                    2,
                    EntryKind::Own,
                    "[private] ana → cy: psst",
                    Mark::Refused("no such member".into())
                ),
                (3, EntryKind::Presence, "* cy joined", Mark::None),
                (0, EntryKind::History, "[history] bo: old", Mark::None),
            ]
        );
        assert_eq!(view.members().collect::<Vec<_>>(), ["ana", "bo", "cy"]);
        view.receive(
            &ChatMessage::Presence {
                change: PresenceChange::Renamed,
                nickname: "cy".into(),
                new_nickname: "cyd".into(),
            },
            6,
        );
        view.receive(
            &ChatMessage::Presence {
                change: PresenceChange::Left,
                nickname: "bo".into(),
                new_nickname: String::new(),
            },
            7,
        );
        view.renamed(Some("ana"), "anna");
        assert_eq!(view.members().collect::<Vec<_>>(), ["anna", "cyd"]);
    }

    #[test]
    fn the_view_forgets_the_oldest_lines() {
        let mut view = View::new();
        let first = view.own("ana: 0", Mark::Pending, 0);
        for i in 1..View::MAX_ENTRIES {
            view.info(EntryKind::Info, format!("{i}"), 0);
        }
        let last = view.own("ana: last", Mark::Pending, 0);
        assert_eq!(view.entries().len(), View::MAX_ENTRIES);
        view.settle(first, Ok(())); // forgotten: nothing happens
        view.settle(last, Ok(()));
        assert_eq!(view.entries().next().unwrap().text, "1");
        assert_eq!(view.entries().last().unwrap().mark, Mark::Acked);
    }
}
