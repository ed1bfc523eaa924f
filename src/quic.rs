//! Feature `quic`: a QUIC bidirectional stream as the byte pipe under a
//! connection (quinn, TLS 1.3 by rustls with ring).
//!
//! Nothing of the connection changes: [`QuicStream`] is an `AsyncRead +
//! AsyncWrite` like a TCP stream, and the frames, keepalives and requests
//! run on it exactly as over TCP. On smol (or any executor with
//! async-io's timer) build with [`Builder::build`](crate::Builder::build);
//! on tokio with [`Builder::build_with_timer`](crate::Builder::build_with_timer)
//! and [`TokioTimer`](crate::TokioTimer) (the stream is futures-io
//! already).
//!
//! # The mapping
//!
//! One chatpipe connection is one QUIC connection (ALPN [`ALPN`]) and its
//! first bidirectional stream, opened by the client ([`connect`]) and
//! taken by the server ([`accept`]). The client writes [`PREAMBLE`]
//! first: QUIC tells the peer about a stream only with its first bytes, so
//! without it a server would not see the stream of a client that waits to
//! be spoken to; and a peer that is not chatpipe is refused at once
//! ([`QuicError::NotChatpipe`]) rather than read as frames. Then the
//! frames, byte for byte as over TCP. Closing finishes the stream (the
//! QUIC FIN, as TCP's shutdown) and waits until the peer has acknowledged
//! everything written. The side that closes second (it read the peer's
//! FIN first) then waits for the peer to close the QUIC connection, which
//! the peer does once it has read everything (dropping its stream): a
//! QUIC close discards what the receiver's stack acknowledged but its
//! application has not read yet, so the last reader closes it.
//!
//! # Timeouts: chatpipe's and QUIC's
//!
//! Both ends have two idle timeouts, and the earlier one ends the
//! connection:
//!
//! - chatpipe's `idle_timeout` (15 s by default, kept alive by chatpipe's
//!   keepalive messages every `keepalive_interval`, 5 s): nothing *read*
//!   for that long ends the connection with
//!   [`Error::IdleTimeout`](crate::Error::IdleTimeout). It sees a peer
//!   whose QUIC stack still acknowledges packets but whose application is
//!   stuck.
//! - QUIC's idle timeout ([`transport_config`] sets it; quinn's `max_idle_timeout`,
//!   the smaller of the two ends' is used): no packet *received* for that
//!   long closes the QUIC connection; the connection then ends with an
//!   [`Error::Io`](crate::Error::Io) whose source is
//!   `quinn::ReadError::ConnectionLost(quinn::ConnectionError::TimedOut)`
//!   ([`timed_out`] tells).
//!
//! The choice here: **no QUIC keepalive, and QUIC's idle timeout equal to
//! chatpipe's** (pass the connection's idle timeout to
//! [`transport_config`]). chatpipe's keepalives are ack-eliciting packets
//! every 5 s, so they keep QUIC's idle timer from firing on a healthy
//! connection; a QUIC PING would only hide an application that stopped
//! writing from QUIC's own timer, which then could not see it. Against a
//! black-holed peer (nothing gets through) the two fire at about the same
//! time, whichever is earlier; set either lower and that one decides. A
//! QUIC connection that is lost is seen at once (QUIC's CONNECTION_CLOSE
//! or a stateless reset), without waiting for either.
//!
//! Runtimes: this module picks none. Make the `quinn::Endpoint` with the
//! runtime you use (`quinn::Endpoint::new(.., Arc::new(quinn::SmolRuntime))`,
//! or `quinn::Endpoint::client`/`server` inside tokio with quinn's
//! `runtime-tokio`). [`connect`] and [`accept`] only await; bound them with
//! your runtime's timer (QUIC's idle timeout bounds a handshake that never
//! answers).
//!
//! Where quinn's tasks run matters for speed: `quinn::SmolRuntime` spawns
//! them on smol's global executor. Run the connection's driver there too,
//! or give the endpoint a `quinn::Runtime` whose `spawn` uses the executor
//! the connection runs on; otherwise every packet is a wake across
//! threads. The bench's QUIC row moved from about 0.09x to 0.22x of TLS's
//! 1 KiB rate by that change alone (docs/BENCHMARKS.md).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_io::{AsyncRead, AsyncWrite};

pub use quinn;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls;

/// The ALPN protocol name both ends offer: a QUIC peer of another
/// protocol fails the handshake instead of talking past us.
pub const ALPN: &[u8] = b"chatpipe";

/// What the client writes first on the stream, before any frame.
pub const PREAMBLE: [u8; 4] = *b"cpq1";

/// Why a QUIC connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The TLS configuration cannot do QUIC (no TLS 1.3 suite QUIC can
    /// start with).
    #[error("this TLS configuration cannot be used for QUIC: {0}")]
    Config(String),
    /// Connecting could not start (an invalid server name, say).
    #[error("{0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed, or the connection was lost or closed before
    /// the stream was open (a certificate refused, a timeout).
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer's stream failed before the preamble was through.
    #[error("the stream failed before it started: {0}")]
    Stream(String),
    /// The peer's stream did not start with [`PREAMBLE`].
    #[error("the peer's stream does not start with chatpipe's preamble (it started {0:02x?})")]
    NotChatpipe(Vec<u8>),
}

/// A transport configuration for chatpipe: QUIC's idle timeout
/// `idle_timeout` (the connection's own, see [the module docs](self)),
/// no QUIC keepalive.
pub fn transport_config(idle_timeout: Duration) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // Over QUIC's largest idle timeout (2^62 ms), none: never in practice.
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    transport.keep_alive_interval(None);
    transport
}

/// A server configuration: `tls` (a certificate and its key; TLS 1.3 is
/// what QUIC uses of it) with [`ALPN`], and [`transport_config`]`(idle_timeout)`.
pub fn server_config(
    tls: &rustls::ServerConfig,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, QuicError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        QuicServerConfig::try_from(Arc::new(tls)).map_err(|e| QuicError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(idle_timeout)));
    Ok(config)
}

/// A client configuration: `tls` (the roots it trusts) with [`ALPN`], and
/// [`transport_config`]`(idle_timeout)`.
pub fn client_config(
    tls: &rustls::ClientConfig,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, QuicError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        QuicClientConfig::try_from(Arc::new(tls)).map_err(|e| QuicError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(idle_timeout)));
    Ok(config)
}

/// Connects to `addr` from `endpoint`, verifying its certificate for
/// `server_name`, and opens the connection's stream: a byte stream for
/// [`Builder::build`](crate::Builder::build). The stream keeps a handle
/// on `endpoint`, which lives as long as it does.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<QuicStream, QuicError> {
    let conn = endpoint.connect_with(config, addr, server_name)?.await?;
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(&PREAMBLE).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(e) => QuicError::Connection(e),
        other => QuicError::Stream(other.to_string()),
    })?;
    let mut stream = QuicStream::new(conn, send, recv);
    stream.endpoint = Some(endpoint.clone());
    Ok(stream)
}

/// Takes the stream of a connection accepted by a server (the handshake
/// over: `incoming.await`), once its [`PREAMBLE`] is in.
pub async fn accept(conn: quinn::Connection) -> Result<QuicStream, QuicError> {
    let (send, mut recv) = conn.accept_bi().await?;
    let mut first = [0; PREAMBLE.len()];
    match recv.read_exact(&mut first).await {
        Ok(()) if first == PREAMBLE => Ok(QuicStream::new(conn, send, recv)),
        Ok(()) => Err(QuicError::NotChatpipe(first.to_vec())),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => {
            Err(QuicError::Connection(e))
        }
        Err(e) => Err(QuicError::Stream(e.to_string())),
    }
}

/// Whether `error` ended a connection because QUIC's idle timeout fired
/// (no packet from the peer within it), rather than chatpipe's.
pub fn timed_out(error: &crate::Error) -> bool {
    let crate::Error::Io(e) = error else {
        return false;
    };
    let lost = |c: &quinn::ConnectionError| matches!(c, quinn::ConnectionError::TimedOut);
    match e.get_ref() {
        Some(inner) => {
            if let Some(quinn::ReadError::ConnectionLost(c)) = inner.downcast_ref() {
                lost(c)
            } else if let Some(quinn::WriteError::ConnectionLost(c)) = inner.downcast_ref() {
                lost(c)
            } else {
                matches!(inner.downcast_ref(), Some(quinn::ConnectionError::TimedOut))
            }
        }
        None => false,
    }
}

type Stopped =
    Pin<Box<dyn Future<Output = Result<Option<quinn::VarInt>, quinn::StoppedError>> + Send + Sync>>;

/// One bidirectional QUIC stream as a byte stream (futures-io), holding
/// its connection open.
pub struct QuicStream {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Closing: finished, waiting for the peer's acknowledgement.
    acked: Option<Stopped>,
    /// Closing second (the peer's FIN read first): waiting for the peer
    /// to close the connection, which it does once it has read ours.
    peer_closed: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    /// A client's endpoint, kept as long as its only connection.
    endpoint: Option<quinn::Endpoint>,
    /// The peer's FIN was read: quinn then forgets the stream, and would
    /// answer another read with an error where TCP gives EOF again.
    eof: bool,
}

impl QuicStream {
    /// A stream of `conn` already open (no preamble is read or written):
    /// for your own mapping.
    pub fn new(conn: quinn::Connection, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        QuicStream {
            conn,
            send,
            recv,
            acked: None,
            peer_closed: None,
            endpoint: None,
            eof: false,
        }
    }

    /// The QUIC connection (its peer's address, RTT, statistics).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The endpoint [`connect`] made it from. A program about to exit
    /// after its connection ended should await `wait_idle()` on it
    /// (bounded): the QUIC close then reaches the peer, which otherwise
    /// waits for its idle timeout to learn that we are gone.
    pub fn endpoint(&self) -> Option<&quinn::Endpoint> {
        self.endpoint.as_ref()
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }
}

impl fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicStream")
            .field("remote", &self.conn.remote_address())
            .field("stream", &self.send.id())
            .finish_non_exhaustive()
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.eof {
            return Poll::Ready(Ok(0));
        }
        let n = std::task::ready!(AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf))?;
        self.eof = n == 0 && !buf.is_empty();
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // quinn sends what is written without being asked.
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.acked.is_none() {
            // Already finished (a second close) is harmless.
            let _ = this.send.finish();
            this.acked = Some(Box::pin(this.send.stopped()));
        }
        if let Some(peer_closed) = this.peer_closed.as_mut() {
            std::task::ready!(peer_closed.as_mut().poll(cx));
            return Poll::Ready(Ok(()));
        }
        let Some(acked) = this.acked.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match std::task::ready!(acked.as_mut().poll(cx)) {
            // Everything acknowledged, or the peer stopped reading (it is
            // closing too).
            Ok(_) => {
                if !this.eof {
                    // The peer closes after us: it reads our FIN first.
                    return Poll::Ready(Ok(()));
                }
                // We close second. Closing the QUIC connection now (as
                // dropping us does) would discard what the peer's stack
                // acknowledged but its application has not read yet (our
                // last messages, our FIN): wait for the peer to close it,
                // once it has read them (bounded by QUIC's idle timeout).
                let conn = this.conn.clone();
                let mut closed: Pin<Box<dyn Future<Output = ()> + Send + Sync>> =
                    Box::pin(async move {
                        conn.closed().await;
                    });
                if closed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
                this.peer_closed = Some(closed);
                Poll::Pending
            }
            // The peer closed the connection after reading our FIN (its
            // acknowledgement may ride on its CONNECTION_CLOSE), or we did.
            Err(quinn::StoppedError::ConnectionLost(
                quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::LocallyClosed,
            )) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}
