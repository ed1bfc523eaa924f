//! A correct message connection over any async byte stream.
//!
//! chatpipe turns an `AsyncRead + AsyncWrite` (TCP, Unix socket, TLS,
//! in-memory pipe) into a connection that exchanges *messages* of your own
//! [`Protocol`], with everything a real TCP application needs:
//!
//! - **framing**: a 4-byte big-endian length prefix, refused from the header
//!   alone when over the maximum, never allocating on a peer's say-so;
//! - **always reading**, so EOF and errors are seen at once, with a bounded
//!   buffer so a slow consumer applies backpressure;
//! - **write coalescing**: `send` queues, the driver writes everything queued
//!   in as few (vectored) writes as it can;
//! - **closing both directions together**, with the one reason reported to
//!   every handle;
//! - **keepalives** and an **idle timeout**, to detect half-open connections;
//! - **request/response**: `request(msg).await` resolves with the response
//!   that carries the same id, with a timeout.
//!
//! The library spawns nothing and depends on no executor: [`Builder::build`]
//! returns a [`Sender`], an [`Incoming`] stream and a [`Connection`] driver
//! future that you spawn on smol, tokio or anything else.
//!
//! # Example
//!
//! A request/response round trip over loopback TCP with the ready-made
//! [`raw`] protocol, on smol; see [`Protocol`] to put your own messages on
//! the wire.
//!
//! ```
//! use bytes::Bytes;
//! use chatpipe::raw::{Raw, RawMessage};
//! use chatpipe::Builder;
//! use futures::StreamExt;
//! use smol::net::{TcpListener, TcpStream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! smol::block_on(async {
//!     let listener = TcpListener::bind("127.0.0.1:0").await?;
//!     let client_io = TcpStream::connect(listener.local_addr()?).await?;
//!     let (server_io, _) = listener.accept().await?;
//!
//!     // Server: answer every request with its body reversed.
//!     let (server, mut requests, conn) = Builder::new().build(server_io, Raw);
//!     smol::spawn(conn).detach();
//!     smol::spawn(async move {
//!         while let Some(Ok(RawMessage::Request { id, body })) = requests.next().await {
//!             let body = body.iter().rev().copied().collect::<Vec<u8>>().into();
//!             let _ = server.send(RawMessage::Response { id, body }).await;
//!         }
//!     })
//!     .detach();
//!
//!     // Client: the driver future runs on any executor; here, smol's.
//!     let (client, _incoming, conn) = Builder::new().build(client_io, Raw);
//!     let driver = smol::spawn(conn);
//!     // `call` picks the request id; the answer is the response's body.
//!     let answer = client.call(Bytes::from("abc")).await?;
//!     assert_eq!(answer, "cba");
//!
//!     client.close(); // write what is queued, then shut down; the peer follows
//!     driver.await?;
//!     Ok(())
//! })
//! # }
//! ```
//!
//! # Staying connected
//!
//! A [`Connection`] that fails is gone. A [`Session`] stays connected: give
//! it a connector (an async function making a fresh byte stream), the
//! [`Builder`] settings, the protocol, and a setup step run on every new
//! connection before anything queued is sent (log in, claim a nickname).
//! It reconnects with exponential [`Backoff`] and full jitter, keeps one
//! sending handle and one incoming stream across reconnects, buffers what
//! is sent while it is down (bounded; a send past it fails at once with the
//! message handed back), and reports its [`SessionState`] with typed
//! causes. The desired state ([`Desired`]) can change at any time, from any
//! clone of the handle. Delivery is in order, at most once across a
//! reconnect: see [`Session`]. Like the connection, it spawns nothing: the
//! [`SessionDriver`] is one future to spawn on any executor.
//!
//! ```
//! use chatpipe::raw::{Raw, RawMessage};
//! use chatpipe::{Link, SessionBuilder};
//! use futures::StreamExt;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! smol::block_on(async {
//!     let listener = smol::net::TcpListener::bind("127.0.0.1:0").await?;
//!     let addr = listener.local_addr()?;
//!     smol::spawn(async move {
//!         // An echo server.
//!         while let Ok((io, _)) = listener.accept().await {
//!             let (tx, rx, conn) = chatpipe::Builder::new().build(io, Raw);
//!             smol::spawn(conn).detach();
//!             smol::spawn(rx.filter_map(|m| async { m.ok() }).map(Ok).forward(tx)).detach();
//!         }
//!     })
//!     .detach();
//!
//!     let (session, mut incoming, driver) = SessionBuilder::new().build(
//!         Raw,
//!         move || smol::net::TcpStream::connect(addr), // a fresh stream per attempt
//!         |link: Link<Raw>| async move {
//!             // Runs on every (re)connect, before anything buffered goes out.
//!             link.sender.send(RawMessage::Message("hello".into())).await?;
//!             Ok::<_, chatpipe::SendError<RawMessage>>(link)
//!         },
//!     );
//!     smol::spawn(driver).detach();
//!
//!     // Sent before the session is up: it waits in the buffer.
//!     session.send(RawMessage::Message("queued".into())).await?;
//!     let mut states = session.states();
//!     while let Some(state) = states.next().await {
//!         eprintln!("* {state}"); // "connecting (attempt 1)", "connected"...
//!         if state.is_connected() {
//!             break;
//!         }
//!     }
//!     assert_eq!(incoming.next().await, Some(RawMessage::Message("hello".into())));
//!     assert_eq!(incoming.next().await, Some(RawMessage::Message("queued".into())));
//!     session.disconnect(); // writes what was accepted, then closes
//!     Ok(())
//! })
//! # }
//! ```
//!
//! # Runtimes and features
//!
//! The core needs no executor. What differs between runtimes is the timer
//! (and, for tokio, its I/O traits), chosen by cargo features:
//!
//! | feature | gives | default |
//! |---|---|---|
//! | `async-io` | [`Builder::build`] with [`AsyncIoTimer`]: smol, async-std, or any executor (async-io runs its own timer thread if the executor is not smol) | on |
//! | `tokio` | [`Builder::build_tokio`] for `tokio::io::AsyncRead + AsyncWrite` streams with `TokioTimer`: no compat layer, no extra thread | off |
//! | `tracing` | a span per connection ([`Builder::label`]) and events for closes, timeouts, keepalives and refused frames; nothing is logged without it | off |
//! | `test-util` | `test_util`: a virtual clock and scripted mock I/O for your tests | off |
//! | `quic` | `quic`: a QUIC stream (quinn, rustls with ring) as the byte pipe, on the runtime you give quinn; how QUIC's idle timeout and chatpipe's work together | off |
//!
//! Neither camp pays for the other's runtime: smol users keep the default;
//! tokio users turn it off:
//!
//! ```toml
//! chatpipe = { version = "0.2", default-features = false, features = ["tokio"] }
//! ```
//!
//! On tokio, the driver uses tokio's timer, so it must be polled inside a
//! tokio runtime (`tokio::spawn` does that); building a connection needs
//! none. With tokio's paused clock (`#[tokio::test(start_paused = true)]`)
//! connections run on virtual time.
//!
//! ```
//! # #[cfg(feature = "tokio")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use bytes::Bytes;
//! use chatpipe::raw::{Raw, RawMessage};
//! use futures::StreamExt;
//! use tokio::net::{TcpListener, TcpStream};
//!
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! let client = TcpStream::connect(listener.local_addr()?).await?;
//! let (server, _) = listener.accept().await?;
//!
//! let (server, mut requests, conn) = chatpipe::Builder::new().build_tokio(server, Raw);
//! tokio::spawn(conn);
//! tokio::spawn(async move {
//!     while let Some(Ok(RawMessage::Request { id, body })) = requests.next().await {
//!         let _ = server.send(RawMessage::Response { id, body }).await; // echo
//!     }
//! });
//!
//! let (client, _incoming, conn) = chatpipe::Builder::new().build_tokio(client, Raw);
//! tokio::spawn(conn);
//! assert_eq!(client.call(Bytes::from("ping")).await?, "ping");
//! # Ok(()) })
//! # }
//! # #[cfg(not(feature = "tokio"))]
//! # fn main() {}
//! ```
//!
//! # TLS
//!
//! A TLS stream is a byte stream like any other: do the handshake with
//! your TLS library, then give chatpipe the stream. chatpipe has no TLS
//! code and no TLS dependency. With rustls on smol (futures-rustls; on
//! tokio, tokio-rustls and [`Builder::build_tokio`] the same way), a server
//! and a client on loopback, with a certificate made by rcgen:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use chatpipe::raw::{Raw, RawMessage};
//! use chatpipe::Builder;
//! use futures::StreamExt;
//! use futures_rustls::rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
//! use futures_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
//! use futures_rustls::{TlsAcceptor, TlsConnector};
//! use smol::future::FutureExt;
//! use smol::net::{TcpListener, TcpStream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! smol::block_on(async {
//!     // A certificate for localhost; a real server loads its own from PEM
//!     // files (rustls-pki-types' `PemObject`).
//!     let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
//!     let cert = made.cert.der().clone();
//!     let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
//!     let server_config = ServerConfig::builder()
//!         .with_no_client_auth()
//!         .with_single_cert(vec![cert.clone()], key.into())?;
//!     let acceptor = TlsAcceptor::from(Arc::new(server_config));
//!
//!     let listener = TcpListener::bind("127.0.0.1:0").await?;
//!     let addr = listener.local_addr()?;
//!
//!     // Server: the handshake, bounded in time (a peer that never finishes
//!     // it must not hold the connection), then chatpipe on the TLS stream.
//!     let server = smol::spawn(async move {
//!         let (tcp, _) = listener.accept().await?;
//!         let handshake = async { Some(acceptor.accept(tcp).await) };
//!         let timeout = async {
//!             smol::Timer::after(Duration::from_secs(10)).await;
//!             None
//!         };
//!         let Some(tls) = handshake.or(timeout).await else {
//!             return Ok(()); // no handshake within 10 s: dropped
//!         };
//!         let (replies, mut requests, conn) = Builder::new().build(tls?, Raw);
//!         let driver = smol::spawn(conn);
//!         while let Some(Ok(RawMessage::Request { id, body })) = requests.next().await {
//!             let _ = replies.send(RawMessage::Response { id, body }).await; // echo
//!         }
//!         drop(replies);
//!         driver.await.map_err(std::io::Error::from)
//!     });
//!
//!     // Client: trusts that certificate, checks the name "localhost".
//!     let mut roots = RootCertStore::empty();
//!     roots.add(cert)?;
//!     let client_config = ClientConfig::builder()
//!         .with_root_certificates(roots)
//!         .with_no_client_auth();
//!     let connector = TlsConnector::from(Arc::new(client_config));
//!     let tcp = TcpStream::connect(addr).await?;
//!     let tls = connector.connect(ServerName::try_from("localhost")?, tcp).await?;
//!
//!     let (client, _incoming, conn) = Builder::new().build(tls, Raw);
//!     let driver = smol::spawn(conn);
//!     assert_eq!(client.call(Bytes::from("secret")).await?, "secret");
//!     client.close(); // close_notify, then the TCP shutdown
//!     driver.await?;
//!     server.await?;
//!     Ok(())
//! })
//! # }
//! ```
//!
//! The handshake timeout is your runtime's timer around the handshake, as
//! above (`tokio::time::timeout` on tokio): chatpipe's own timeouts start
//! once it has the stream. `chatpipe-chat` (the example chat room) serves
//! TLS this way, with the handshake counted against its connection limits.
//!
//! # The handles
//!
//! - [`Sender`] (clone it freely): [`send`](Sender::send) waits for room,
//!   [`try_send`](Sender::try_send) does not, [`reserve`](Sender::reserve)
//!   holds room for a message you make later; it is a `futures::Sink` too.
//!   [`flush`](Sender::flush) waits until what you sent is on the wire,
//!   and [`accepted`](Sender::accepted) against
//!   [`flushed`](Sender::flushed) tells it without waiting;
//!   [`request`](Sender::request) and [`call`](Sender::call) wait for the
//!   answer; [`close`](Sender::close) closes gracefully;
//!   [`stats`](Sender::stats) reads counters for metrics.
//! - [`Incoming`]: a `Stream` (and `FusedStream`) of received messages,
//!   ending with `None` after a clean close or with the error that ended
//!   the connection.
//! - [`Connection`]: the driver future. Spawn it; it resolves when the
//!   connection ends. Dropping it closes the connection at once, and every
//!   pending request fails.
//!
//! - [`Session`], [`SessionIncoming`], [`SessionDriver`]: the same, kept
//!   connected across failures ([`SessionBuilder`]).
//!
//! Errors are one type, [`Error`]. [`Error::is_fatal`] tells "this message
//! failed, the connection lives" from "the connection is gone", and every
//! error converts into `std::io::Error`. [`SendError`] and
//! [`TrySendError`] hand the message back.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod backoff;
mod builder;
pub mod chat;
mod connection;
mod error;
pub mod frame;
mod incoming;
mod outbox;
mod pipe;
mod protocol;
mod queue;
#[cfg(feature = "quic")]
pub mod quic;
pub mod raw;
mod reply;
mod sender;
pub mod session;
mod state;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
mod timer;
#[cfg(feature = "tokio")]
mod tokio;

pub use backoff::Backoff;
pub use builder::Builder;
pub use connection::Connection;
pub use error::{BoxError, Error, SendError, TrySendError};
pub use incoming::Incoming;
pub use protocol::{Call, Kind, Protocol};
pub use sender::{Permit, Sender, Stats};
pub use session::{
    Desired, Link, Session, SessionBuilder, SessionDriver, SessionError, SessionIncoming,
    SessionSendError, SessionState, SessionStates,
};
#[cfg(feature = "async-io")]
pub use timer::AsyncIoTimer;
pub use timer::Timer;
#[cfg(feature = "tokio")]
pub use tokio::{TokioConnection, TokioIo, TokioTimer};
