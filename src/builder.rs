//! [`Builder`]: every setting of a connection, with its default.

use std::sync::Arc;
use std::time::Duration;

use futures_io::{AsyncRead, AsyncWrite};

use crate::connection::{Connection, Shared};
use crate::frame;
use crate::incoming::Incoming;
use crate::outbox::Outbox;
use crate::queue::Queue;
use crate::sender::Sender;
use crate::state::Timeouts;
use crate::timer::Timer;
use crate::Protocol;

/// Configures and sets up connections. Every setting has a default, listed
/// on its setter; a `Builder` can set up any number of connections.
///
/// ```no_run
/// # use std::time::Duration;
/// # fn f<P: chatpipe::Protocol>(stream: smol::net::TcpStream, protocol: P) {
/// let (sender, incoming, conn) = chatpipe::Builder::new()
///     .keepalive_interval(Some(Duration::from_secs(10)))
///     .max_frame_len(1 << 20)
///     .build(stream, protocol);
/// smol::spawn(conn).detach();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    max_frame_len: Option<usize>,
    send_capacity: usize,
    receive_capacity: usize,
    keepalive_interval: Option<Duration>,
    idle_timeout: Option<Option<Duration>>,
    request_timeout: Duration,
    frame_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    label: Option<Arc<str>>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            max_frame_len: None,
            send_capacity: 1024,
            receive_capacity: 1024,
            keepalive_interval: Some(Duration::from_secs(5)),
            idle_timeout: None,
            request_timeout: Duration::from_secs(30),
            frame_timeout: Some(Duration::from_secs(30)),
            write_timeout: Some(Duration::from_secs(30)),
            label: None,
        }
    }
}

impl Builder {
    /// The defaults, listed on each setter.
    ///
    /// ```
    /// let builder = chatpipe::Builder::new();
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest payload accepted from the peer or sent, in bytes.
    /// Clamped to `u32::MAX`, the most the length prefix can say.
    ///
    /// Default: 65,536, or the protocol's
    /// [`max_payload_len`](Protocol::max_payload_len) if that is larger, so
    /// that every message the protocol can make fits in a frame. A peer
    /// can make a connection hold at most about this much memory for one
    /// frame, so it stays small unless your messages need more.
    ///
    /// ```
    /// let builder = chatpipe::Builder::new().max_frame_len(1 << 20); // 1 MiB
    /// ```
    pub fn max_frame_len(mut self, n: usize) -> Self {
        self.max_frame_len = Some(n.min(u32::MAX as usize));
        self
    }

    /// How many messages may wait in the queue before `send` waits and
    /// `try_send` fails with `Full`. Default: 1,024. At least 1.
    ///
    /// The driver takes the queue in one batch, so up to twice this many
    /// may be accepted and not yet in the write buffer (itself bounded at
    /// 256 KiB). The queue's memory grows with what is in it and is given
    /// back when it drains.
    ///
    /// ```
    /// let builder = chatpipe::Builder::new().send_capacity(64);
    /// ```
    pub fn send_capacity(mut self, n: usize) -> Self {
        self.send_capacity = n.max(1);
        self
    }

    /// How many received messages may wait for the application before the
    /// connection stops reading (backpressure). Default: 1,024. At least 1.
    ///
    /// ```
    /// let builder = chatpipe::Builder::new().receive_capacity(64);
    /// ```
    pub fn receive_capacity(mut self, n: usize) -> Self {
        self.receive_capacity = n.max(1);
        self
    }

    /// Send the protocol's [`keepalive`](Protocol::keepalive) whenever
    /// nothing was sent for this long; `None` sends none. Default: 5 s.
    /// A protocol without a keepalive message sends none either way.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = chatpipe::Builder::new().keepalive_interval(Some(Duration::from_secs(10)));
    /// ```
    pub fn keepalive_interval(mut self, d: Option<Duration>) -> Self {
        self.keepalive_interval = d;
        self
    }

    /// Close with [`Error::IdleTimeout`](crate::Error::IdleTimeout) when
    /// nothing at all arrived for this long (while the application is
    /// taking messages); `None` never does. Default: 3 x the keepalive
    /// interval if the protocol has keepalives, otherwise none.
    ///
    /// It measures what the *peer* sends: if you shorten your keepalive
    /// interval below the peer's, set this to a few of the peer's
    /// intervals.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = chatpipe::Builder::new().idle_timeout(Some(Duration::from_secs(60)));
    /// ```
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.idle_timeout = Some(d);
        self
    }

    /// How long [`Sender::request`] and [`Sender::call`] wait for the
    /// response. Default: 30 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = chatpipe::Builder::new().request_timeout(Duration::from_secs(5));
    /// ```
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// Once a frame's first byte is in, the whole frame must arrive within
    /// this long, or the connection closes with
    /// [`Error::FrameTimeout`](crate::Error::FrameTimeout) (slow senders).
    /// `None` disables it. Default: 30 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = chatpipe::Builder::new().frame_timeout(Some(Duration::from_secs(10)));
    /// ```
    pub fn frame_timeout(mut self, d: Option<Duration>) -> Self {
        self.frame_timeout = d;
        self
    }

    /// A write that makes no progress for this long closes the connection
    /// with [`Error::WriteTimeout`](crate::Error::WriteTimeout) (peers that
    /// do not read). `None` disables it. Default: 30 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = chatpipe::Builder::new().write_timeout(Some(Duration::from_secs(10)));
    /// ```
    pub fn write_timeout(mut self, d: Option<Duration>) -> Self {
        self.write_timeout = d;
        self
    }

    /// A name for the connection in its `tracing` span (feature `tracing`),
    /// for example the peer's address. Default: none.
    ///
    /// ```
    /// let builder = chatpipe::Builder::new().label("127.0.0.1:33333");
    /// ```
    pub fn label(mut self, label: impl Into<Arc<str>>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Sets up a connection over `io` with the default timer
    /// ([`AsyncIoTimer`](crate::AsyncIoTimer)).
    ///
    /// Returns the sending handle, the stream of incoming messages, and the
    /// driver future, which does all the work: spawn it on any executor.
    /// Nothing happens on the wire until the driver is polled.
    ///
    /// ```no_run
    /// # async fn f() -> std::io::Result<()> {
    /// let stream = smol::net::TcpStream::connect("127.0.0.1:33333").await?;
    /// let (sender, incoming, conn) = chatpipe::Builder::new().build(stream, chatpipe::raw::Raw);
    /// smol::spawn(conn).detach();
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "async-io")]
    pub fn build<T, P>(
        &self,
        io: T,
        protocol: P,
    ) -> (
        Sender<P>,
        Incoming<P>,
        Connection<T, P, crate::AsyncIoTimer>,
    )
    where
        T: AsyncRead + AsyncWrite + Unpin,
        P: Protocol,
    {
        self.build_with_timer(io, protocol, crate::AsyncIoTimer::default())
    }

    /// Sets up a connection over a tokio stream (`tokio::net::TcpStream`,
    /// `tokio::io::DuplexStream`, a `tokio_rustls` stream...) with tokio's
    /// timer. Feature `tokio`.
    ///
    /// The driver must be polled inside a tokio runtime, as `tokio::spawn`
    /// does; building needs none.
    ///
    /// ```no_run
    /// # async fn f() -> std::io::Result<()> {
    /// let stream = tokio::net::TcpStream::connect("127.0.0.1:33333").await?;
    /// let (sender, incoming, conn) =
    ///     chatpipe::Builder::new().build_tokio(stream, chatpipe::raw::Raw);
    /// tokio::spawn(conn);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "tokio")]
    pub fn build_tokio<T, P>(
        &self,
        io: T,
        protocol: P,
    ) -> (Sender<P>, Incoming<P>, crate::TokioConnection<T, P>)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        P: Protocol,
    {
        self.build_with_timer(crate::TokioIo(io), protocol, crate::TokioTimer::default())
    }

    /// Like [`Builder::build`], with a timer of your choosing: another
    /// runtime's, or a virtual clock in tests.
    pub fn build_with_timer<T, P, Tm>(
        &self,
        io: T,
        protocol: P,
        timer: Tm,
    ) -> (Sender<P>, Incoming<P>, Connection<T, P, Tm>)
    where
        T: AsyncRead + AsyncWrite + Unpin,
        P: Protocol,
        Tm: Timer,
    {
        self.build_shared(io, Arc::new(protocol), timer)
    }

    /// The largest payload a connection built by this builder accepts and
    /// sends with `protocol`.
    pub(crate) fn frame_limit<P: Protocol>(&self, protocol: &P) -> usize {
        self.max_frame_len.unwrap_or_else(|| {
            let own = protocol.max_payload_len().unwrap_or(0);
            own.clamp(frame::DEFAULT_MAX_FRAME_LEN, u32::MAX as usize)
        })
    }

    /// [`Builder::build_with_timer`] with a protocol already shared, as the
    /// session does for each connection it makes.
    pub(crate) fn build_shared<T, P, Tm>(
        &self,
        io: T,
        protocol: Arc<P>,
        timer: Tm,
    ) -> (Sender<P>, Incoming<P>, Connection<T, P, Tm>)
    where
        T: AsyncRead + AsyncWrite + Unpin,
        P: Protocol,
        Tm: Timer,
    {
        let has_keepalive = protocol.keepalive().is_some();
        let keepalive_interval = self.keepalive_interval.filter(|_| has_keepalive);
        let timeouts = Timeouts {
            keepalive_interval,
            idle_timeout: self
                .idle_timeout
                .unwrap_or_else(|| keepalive_interval.map(|i| i * 3)),
            request_timeout: self.request_timeout,
            frame_timeout: self.frame_timeout,
            write_timeout: self.write_timeout,
        };
        let max_frame_len = self.frame_limit(&*protocol);
        let now = timer.now();
        let shared = Arc::new(Shared::new(now));
        let outbox = Arc::new(Outbox::new(self.send_capacity, max_frame_len));
        let inbound = Arc::new(Queue::new(self.receive_capacity));
        let sender = Sender::new(outbox.clone(), protocol.clone(), shared.clone());
        let incoming = Incoming::new(inbound.clone(), shared.clone());
        let conn = Connection::new(crate::connection::Parts {
            io,
            protocol,
            shared,
            outbox,
            inbound,
            timer,
            now,
            timeouts,
            max_frame_len,
            receive_capacity: self.receive_capacity,
            label: self.label.clone(),
        });
        (sender, incoming, conn)
    }
}
