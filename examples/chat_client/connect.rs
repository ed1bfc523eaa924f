//! Connecting, and connecting again: TCP, and TLS over it when asked
//! (`--tls`, `--tls-ca`), or QUIC (`--quic`), under a [`chatpipe::Session`] that reconnects with
//! backoff after a loss. On every new connection the setup step says Hello
//! (with the credentials, if any) and claims the nickname again, before
//! anything typed while the server was away goes out.
//!
//! Failures are said in words a user can act on. The first connection
//! failing is the end (a wrong address, a wrong certificate: retrying
//! would not help); so is a refusal by the server (a wrong password).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chatpipe::chat::{Chat, Credentials, Nickname};
use chatpipe::{
    Backoff, Builder, Link, Session, SessionBuilder, SessionError, SessionIncoming, SessionState,
};
use chatpipe_chat::client::{negotiate_as, NegotiateError, Negotiated, DEFAULT_WAIT, WANTED};
use chatpipe_chat::tls::{self, Trust};
use futures::future::Either;
use smol::channel;
use smol::net::TcpStream;
use smol::Task;

use crate::{Args, SERVER_KEEPALIVE};

/// A client's connection, across reconnects.
pub struct Client {
    pub session: Session<Chat>,
    pub incoming: SessionIncoming<Chat>,
    pub driver: Task<()>,
    /// What the setup step reports, in order.
    pub notes: channel::Receiver<Note>,
    /// Who we are, for the next reconnect.
    pub me: Arc<Me>,
    /// Over TLS: passwords may go over it.
    pub secure: bool,
    /// `connected to ADDR`, and how.
    pub connected_to: String,
}

/// What the setup step of a (re)connection tells the UI.
pub enum Note {
    /// The handshake's outcome (also after a reconnect).
    Negotiated(Negotiated),
    /// The Hello's credentials were taken: logged in, or registered.
    LoggedIn { nick: String, registered: bool },
    /// The nickname claimed again on reconnecting: granted, or refused
    /// and why (someone took it meanwhile).
    Nick {
        nick: String,
        answer: Result<(), String>,
    },
}

/// Who the client is, as the next connection must say: the nickname to
/// claim, the credentials to log in with, what the server granted.
#[derive(Default)]
pub struct Me {
    nick: Mutex<Option<String>>,
    credentials: Mutex<Option<Credentials>>,
    negotiated: Mutex<Option<Negotiated>>,
    /// Why the server refused us (a Nak to the Hello): not worth retrying.
    refused: Mutex<Option<String>>,
    /// A connection got through its setup once.
    connected: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Me {
    pub fn nick(&self) -> Option<String> {
        lock(&self.nick).clone()
    }

    pub fn set_nick(&self, nick: &str) {
        *lock(&self.nick) = Some(nick.to_owned());
    }

    /// Logged in (or registered) as `credentials` say: the next connection
    /// logs in with them, and holds that nickname.
    pub fn logged_in(&self, credentials: &Credentials) {
        let (nickname, password) = (credentials.nickname(), credentials.password());
        *lock(&self.credentials) = Some(Credentials::Login {
            nickname: nickname.to_owned(),
            password: password.to_owned(),
        });
        self.set_nick(nickname);
    }

    /// Whether we log in on connecting.
    pub fn has_credentials(&self) -> bool {
        lock(&self.credentials).is_some()
    }

    /// Whether the server granted `capability` on the latest connection.
    pub fn grants(&self, capability: &str) -> bool {
        lock(&self.negotiated)
            .as_ref()
            .is_some_and(|n| n.grants(capability))
    }

    /// Why the server refused us, if it did.
    pub fn refused(&self) -> Option<String> {
        lock(&self.refused).clone()
    }
}

/// A state change, as the UI treats it.
pub enum Change {
    /// Connected, the setup done; `again` after a loss.
    Connected { again: bool },
    /// Lost; trying again in `retry_in`. `undelivered`: messages the lost
    /// connection had taken but not written.
    Lost {
        reason: String,
        retry_in: Duration,
        undelivered: usize,
    },
    /// The end: the first connection failed, the server refused us, or
    /// (`--no-reconnect`) the connection was lost. Says why.
    Fatal(String),
    /// Nothing the UI shows (connecting, closing).
    Quiet,
}

/// What `state` means to a client that has `me` and was started with
/// `reconnect`.
pub fn change(state: &SessionState, me: &Me, reconnect: bool) -> Change {
    let connected = me.connected.load(Ordering::Relaxed);
    match state {
        SessionState::Connected => {
            let again = me.connected.swap(true, Ordering::Relaxed);
            Change::Connected { again }
        }
        SessionState::Error {
            cause,
            retry_in,
            undelivered,
        } => {
            let reason = reason(cause);
            if let Some(refusal) = me.refused() {
                return Change::Fatal(refusal);
            }
            // A TLS server read as plaintext: trying again will not help.
            let misread = match cause {
                SessionError::Lost(e) => tls::plaintext_hint(e).is_some(),
                _ => false,
            };
            if misread {
                return Change::Fatal(reason);
            }
            match retry_in {
                Some(retry_in) if connected && reconnect => Change::Lost {
                    reason,
                    retry_in: *retry_in,
                    undelivered: *undelivered,
                },
                // Down for good: we asked for it.
                None => Change::Quiet,
                _ => Change::Fatal(reason),
            }
        }
        _ => Change::Quiet,
    }
}

/// Why a connection failed, in a user's words.
fn reason(cause: &SessionError) -> String {
    match cause {
        // Our connector's own words: "cannot connect to ...", TLS.
        SessionError::Connect(e) => e.to_string(),
        SessionError::Lost(e) => lost(e),
        // The connection failed under the setup step.
        SessionError::Setup(e) => match e.downcast_ref::<chatpipe::Error>() {
            Some(e) => lost(e),
            None => cause.to_string(),
        },
        cause => cause.to_string(),
    }
}

fn lost(e: &chatpipe::Error) -> String {
    if let chatpipe::Error::Closed = e {
        return "connection closed by the server".into();
    }
    match tls::plaintext_hint(e) {
        Some(hint) => format!("connection lost: {e} ({hint})"),
        None => format!("connection lost: {e}"),
    }
}

/// How long the client waits for a TLS handshake to finish.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Starts the session `args` describe, logging in with `credentials`.
/// Errors (a bad CA file, a bad name) are said before connecting.
/// `offer`: say Hello (v0.6), else speak v0.5.
pub fn start(args: &Args, credentials: Option<Credentials>, offer: bool) -> Result<Client, String> {
    let trust = match (&args.tls_ca, args.tls || args.quic) {
        (Some(ca), _) => Some(Trust::File(ca.clone())),
        (None, true) => Some(Trust::System),
        (None, false) => None,
    };
    let tls = match trust {
        Some(trust) => {
            let config = tls::client_config(&trust).map_err(|e| format!("TLS: {e}"))?;
            let name = tls::server_name(&args.connect, args.tls_server_name.as_deref())
                .map_err(|e| format!("TLS: {e}"))?;
            Some((config, name))
        }
        None => None,
    };
    let secure = tls.is_some();
    let how = if args.quic { "QUIC" } else { "TLS" };
    let connected_to = match &tls {
        Some((_, name)) => format!("connected to {} ({how}, {})", args.connect, name.to_str()),
        None => format!("connected to {}", args.connect),
    };
    // The nickname is claimed by the UI on the first connection (and kept
    // here once granted), by the setup step on the next ones.
    let me = Arc::new(Me::default());
    *lock(&me.credentials) = credentials;
    let (notes_tx, notes) = channel::unbounded();

    let addr = args.connect.clone();
    let idle = 3 * args.keepalive.max(SERVER_KEEPALIVE);
    let quic = args.quic.then(QuicEnd::default);
    let connector = {
        let quic = quic.clone();
        move || {
            let (addr, tls, quic) = (addr.clone(), tls.clone(), quic.clone());
            async move {
                match (quic, tls) {
                    (Some(end), Some((config, name))) => {
                        open_quic(&addr, &config, &name, idle, &end).await
                    }
                    (_, tls) => open(&addr, tls).await.map(Either::Left),
                }
            }
        }
    };
    let setup = {
        let me = me.clone();
        move |link: Link<Chat>| setup(link, me.clone(), notes_tx.clone(), offer)
    };
    // Over QUIC, QUIC's idle timeout is this one too.
    let connection = Builder::new()
        .keepalive_interval(Some(args.keepalive))
        .idle_timeout(Some(idle));
    let (session, incoming, driver) = SessionBuilder::new()
        .connection(connection)
        .backoff(Backoff::new().max(Duration::from_secs(10)))
        .buffer_capacity(args.buffer)
        // Past the TLS handshake's own timeout, which says it better.
        .connect_timeout(Some(HANDSHAKE_TIMEOUT + Duration::from_secs(5)))
        .build(Chat, connector, setup);
    // Over QUIC, the close goes out before the process exits, so the
    // server sees a clean close rather than a silence.
    let driver = smol::spawn(async move {
        driver.await;
        if let Some(end) = quic {
            end.wait_idle().await;
        }
    });
    Ok(Client {
        session,
        incoming,
        driver,
        notes,
        me,
        secure,
        connected_to,
    })
}

/// A fresh stream to `addr`: TCP, then TLS over it if asked.
async fn open(
    addr: &str,
    tls: Option<(
        Arc<tls::rustls::ClientConfig>,
        tls::rustls::pki_types::ServerName<'static>,
    )>,
) -> io::Result<Either<TcpStream, tls::TlsStream<TcpStream>>> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let Some((config, name)) = tls else {
        return Ok(Either::Left(stream));
    };
    let connector = tls::TlsConnector::from(config);
    // The server closes a handshake it does not finish within its own
    // timeout (10 s for chat_server); this bounds one that never answers.
    let handshake = async { Some(connector.connect(name.clone(), stream).await) };
    let timeout = async {
        smol::Timer::after(HANDSHAKE_TIMEOUT).await;
        None
    };
    match smol::future::or(handshake, timeout).await {
        Some(Ok(stream)) => Ok(Either::Right(stream)),
        Some(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!(
                "TLS handshake with {addr} failed: {}",
                tls::explain_handshake(&e, &name)
            ),
        )),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "TLS handshake with {addr} failed: no answer within {} s (does the server speak TLS?)",
                HANDSHAKE_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// The QUIC endpoint of the latest connection, to wait for its close at
/// the end.
#[derive(Clone, Default)]
struct QuicEnd(Arc<Mutex<Option<chatpipe::quic::quinn::Endpoint>>>);

impl QuicEnd {
    /// Waits (2 s at most) until the last endpoint has sent its close.
    async fn wait_idle(&self) {
        let Some(endpoint) = lock(&self.0).take() else {
            return;
        };
        let bound = async {
            smol::Timer::after(Duration::from_secs(2)).await;
        };
        smol::future::or(endpoint.wait_idle(), bound).await;
    }
}

/// A fresh QUIC connection's stream to `addr`.
async fn open_quic(
    addr: &str,
    tls: &Arc<tls::rustls::ClientConfig>,
    name: &tls::rustls::pki_types::ServerName<'static>,
    idle: Duration,
    end: &QuicEnd,
) -> io::Result<Stream> {
    let stream = chatpipe_chat::quic::connect(addr, tls, name, idle)
        .await
        .map_err(|e| io::Error::other(format!("QUIC connection to {addr} failed: {e}")))?;
    *lock(&end.0) = stream.endpoint().cloned();
    Ok(Either::Right(stream))
}

/// TCP, TLS over TCP, or QUIC.
type Stream = Either<Either<TcpStream, tls::TlsStream<TcpStream>>, chatpipe_chat::quic::QuicStream>;

type SetupError = Box<dyn std::error::Error + Send + Sync>;

/// On every new connection: the Hello (logging in, if we have
/// credentials), then the nickname. A refusal is kept in `me`: fatal.
async fn setup(
    mut link: Link<Chat>,
    me: Arc<Me>,
    notes: channel::Sender<Note>,
    offer: bool,
) -> Result<Link<Chat>, SetupError> {
    let again = me.connected.load(Ordering::Relaxed);
    let credentials = lock(&me.credentials).clone();
    if offer {
        let hello = negotiate_as(
            &link.sender,
            &mut link.incoming,
            WANTED,
            credentials.as_ref(),
            DEFAULT_WAIT,
        );
        match hello.await {
            Ok(mut negotiated) => {
                let _ = notes.send(Note::Negotiated(negotiated.clone())).await;
                if let Some(first) = negotiated.take_arrived() {
                    // Not ours: the room's first message, for the UI.
                    let _ = link.pass_on(first);
                }
                *lock(&me.negotiated) = Some(negotiated);
                if let Some(c) = &credentials {
                    me.logged_in(c);
                    if !again {
                        let registered = matches!(c, Credentials::Register { .. });
                        let nick = c.nickname().to_owned();
                        let _ = notes.send(Note::LoggedIn { nick, registered }).await;
                    }
                }
            }
            Err(NegotiateError::Connection(e)) => return Err(e.into()),
            // Refused (or a v0.5 server when logging in): not worth retrying.
            Err(e) => {
                let refusal = e.to_string();
                *lock(&me.refused) = Some(refusal.clone());
                return Err(refusal.into());
            }
        }
    }
    // The nickname held before the loss, unless the login took it already.
    let account = credentials.as_ref().map(|c| c.nickname().to_owned());
    let nick = me.nick().filter(|n| again && Some(n) != account.as_ref());
    if let Some(nick) = nick {
        let answer = link.sender.call(Nickname(nick.clone())).await?;
        let _ = notes.send(Note::Nick { nick, answer }).await;
    }
    Ok(link)
}
