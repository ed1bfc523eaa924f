//! The public handles, the builder, and the driver future that joins the
//! pipe, the state machine, the channels and the timer.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use event_listener::EventListener;
use futures_channel::oneshot;
use futures_core::Stream;
use futures_io::{AsyncRead, AsyncWrite};

use crate::error::{SendError, TrySendError};
use crate::frame::{self, HEADER_LEN};
use crate::outbox::{encode_frame, Outbox, Piece, PushError, Reply};
use crate::pipe::Pipe;
use crate::queue::Queue;
use crate::state::{Event, Matched, State, Timeouts};
use crate::timer::Timer;
use crate::{Error, Kind, Protocol};

/// Configures and sets up connections. Every setting has a default.
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
    max_frame_len: usize,
    send_capacity: usize,
    receive_capacity: usize,
    keepalive_interval: Option<Duration>,
    idle_timeout: Option<Option<Duration>>,
    request_timeout: Duration,
    frame_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            max_frame_len: frame::DEFAULT_MAX_FRAME_LEN,
            send_capacity: 1024,
            receive_capacity: 1024,
            keepalive_interval: Some(Duration::from_secs(5)),
            idle_timeout: None,
            request_timeout: Duration::from_secs(30),
            frame_timeout: Some(Duration::from_secs(30)),
            write_timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl Builder {
    /// The defaults, listed on each setter.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest payload accepted or sent, in bytes. Default: 65,536.
    /// Clamped to `u32::MAX`, the most the length prefix can say.
    pub fn max_frame_len(mut self, n: usize) -> Self {
        self.max_frame_len = n.min(u32::MAX as usize);
        self
    }

    /// How many messages may wait in the queue before `send` waits and
    /// `try_send` fails with `Full`. Default: 1,024. At least 1.
    ///
    /// The driver takes the queue in one batch, so up to twice this many
    /// may be accepted and not yet in the write buffer (itself bounded at
    /// 256 KiB). The queue's memory grows with what is in it and is given
    /// back when it drains.
    pub fn send_capacity(mut self, n: usize) -> Self {
        self.send_capacity = n.max(1);
        self
    }

    /// How many received messages may wait for the application before the
    /// connection stops reading (backpressure). Default: 1,024. At least 1.
    pub fn receive_capacity(mut self, n: usize) -> Self {
        self.receive_capacity = n.max(1);
        self
    }

    /// Send a keepalive whenever nothing was sent for this long; `None`
    /// sends none. Default: 5 s, as in the reference.
    pub fn keepalive_interval(mut self, d: Option<Duration>) -> Self {
        self.keepalive_interval = d;
        self
    }

    /// Close with [`Error::IdleTimeout`] when nothing at all arrived for this
    /// long (while the application is taking messages); `None` never does.
    /// Default: 3 x the keepalive interval, or none without keepalives.
    ///
    /// It measures what the *peer* sends: if you shorten your keepalive
    /// interval below the peer's, set this to a few of the peer's intervals
    /// (the chat client uses 3 x the larger of the two).
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.idle_timeout = Some(d);
        self
    }

    /// How long `request` waits for its response. Default: 30 s.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// Once a frame's first byte is in, the whole frame must arrive within
    /// this long, or the connection closes with [`Error::FrameTimeout`]
    /// (slow senders). `None` disables it. Default: 30 s.
    pub fn frame_timeout(mut self, d: Option<Duration>) -> Self {
        self.frame_timeout = d;
        self
    }

    /// A write that makes no progress for this long closes the connection
    /// with [`Error::WriteTimeout`] (peers that do not read). `None`
    /// disables it. Default: 30 s.
    pub fn write_timeout(mut self, d: Option<Duration>) -> Self {
        self.write_timeout = d;
        self
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts {
            keepalive_interval: self.keepalive_interval,
            idle_timeout: self
                .idle_timeout
                .unwrap_or_else(|| self.keepalive_interval.map(|i| i * 3)),
            request_timeout: self.request_timeout,
            frame_timeout: self.frame_timeout,
            write_timeout: self.write_timeout,
        }
    }

    /// Sets up a connection over `io` with the default timer
    /// ([`AsyncIoTimer`](crate::AsyncIoTimer)).
    ///
    /// Returns the sending handle, the stream of incoming messages, and the
    /// driver future, which does all the work: spawn it on any executor.
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

    /// Like [`Builder::build`], with a timer of your choosing.
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
        let protocol = Arc::new(protocol);
        let shared = Arc::new(Shared {
            senders: AtomicUsize::new(1),
            ..Shared::default()
        });
        let outbox = Arc::new(Outbox::new(self.send_capacity, self.max_frame_len));
        let inbound = Arc::new(Queue::new(self.receive_capacity));
        let sender = Sender {
            outbox: outbox.clone(),
            protocol: protocol.clone(),
            shared: shared.clone(),
        };
        let incoming = Incoming {
            queue: inbound.clone(),
            batch: VecDeque::new(),
            shared: shared.clone(),
            done: false,
        };
        let conn = Connection {
            pipe: Pipe::new(io, self.max_frame_len),
            state: State::new(Instant::now(), self.timeouts()),
            protocol,
            shared,
            outbox,
            taken: VecDeque::new(),
            outbound_done: false,
            inbound,
            received: VecDeque::new(),
            receive_capacity: self.receive_capacity,
            inbound_closed: false,
            room: None,
            phase: Phase::Open,
            timer,
            armed: None,
            last_io: Instant::now(),
            max_frame_len: self.max_frame_len,
            request_timeout: self.request_timeout,
        };
        (sender, incoming, conn)
    }
}

/// Shared by every handle: the one reason the connection ended.
#[derive(Debug, Default)]
struct Shared {
    reason: OnceLock<Error>,
    /// Messages accepted but never written, once the connection failed.
    undelivered: AtomicUsize,
    /// Live `Sender`s: when the last goes, the connection closes gracefully.
    senders: AtomicUsize,
}

impl Shared {
    fn reason(&self) -> Error {
        self.reason.get().cloned().unwrap_or(Error::Closed)
    }
}

/// Sends messages and requests. Clone it to send from several tasks.
///
/// Messages are encoded on the caller's task, straight into the outbound
/// queue, so an unencodable or too large message fails its own `send` at
/// once and nothing else. Dropping every `Sender` closes the connection
/// gracefully, as [`Sender::close`] does.
pub struct Sender<P: Protocol> {
    outbox: Arc<Outbox<P>>,
    protocol: Arc<P>,
    shared: Arc<Shared>,
}

impl<P: Protocol> Clone for Sender<P> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            outbox: self.outbox.clone(),
            protocol: self.protocol.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<P: Protocol> Drop for Sender<P> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.outbox.close();
        }
    }
}

impl<P: Protocol> fmt::Debug for Sender<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("queued", &self.outbox.len())
            .field("closed", &self.outbox.is_closed())
            .finish()
    }
}

impl<P: Protocol> Sender<P> {
    /// Queues `msg`, waiting while the queue is full (backpressure).
    ///
    /// Returns once the message is queued, not written. Everything queued
    /// is written before a clean close; if the connection fails instead,
    /// every handle sees that error and [`Sender::undelivered`] counts what
    /// was lost.
    ///
    /// Cancel safety: if the future is dropped before it completes, the
    /// message was not queued.
    pub async fn send(&self, msg: P::Message) -> Result<(), SendError<P::Message>> {
        loop {
            let error = match self.outbox.try_push(&self.protocol, &msg, None) {
                Ok(()) => return Ok(()),
                Err((PushError::Full, _)) => {
                    self.outbox.room().await;
                    continue;
                }
                Err((PushError::Closed, _)) => self.shared.reason(),
                Err((PushError::Encode(e), _)) => e,
            };
            return Err(SendError {
                message: msg,
                error,
            });
        }
    }

    /// Queues `msg` if there is room, failing at once with
    /// [`TrySendError::Full`] if not: for servers that must not wait on a
    /// slow peer.
    pub fn try_send(&self, msg: P::Message) -> Result<(), TrySendError<P::Message>> {
        let error = match self.outbox.try_push(&self.protocol, &msg, None) {
            Ok(()) => return Ok(()),
            Err((PushError::Full, _)) => return Err(TrySendError::Full(msg)),
            Err((PushError::Closed, _)) => self.shared.reason(),
            Err((PushError::Encode(e), _)) => e,
        };
        Err(TrySendError::Failed(SendError {
            message: msg,
            error,
        }))
    }

    /// Sends a request and waits for the response carrying the same id.
    ///
    /// Fails with [`Error::RequestTimeout`] after the configured timeout, with
    /// [`Error::InvalidRequest`] if `msg` is not a request or its id is
    /// already outstanding, and with the connection's reason if it ends
    /// first. Dropping the future abandons the request: its entry leaves the
    /// table, and a late response is ignored.
    pub async fn request(&self, msg: P::Message) -> Result<P::Message, Error> {
        let Kind::Request(id) = self.protocol.kind(&msg) else {
            return Err(Error::InvalidRequest("the message is not a request"));
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let mut reply_tx = Some(reply_tx);
        while let Some(tx) = reply_tx.take() {
            match self
                .outbox
                .try_push(&self.protocol, &msg, Some((id.clone(), tx)))
            {
                Ok(()) => {}
                Err((PushError::Full, tx)) => {
                    reply_tx = tx;
                    self.outbox.room().await;
                }
                Err((PushError::Closed, _)) => return Err(self.shared.reason()),
                Err((PushError::Encode(e), _)) => return Err(e),
            }
        }
        drop(msg);
        let mut guard = AbandonOnDrop {
            outbox: &self.outbox,
            id: Some(id),
        };
        let res = match reply_rx.await {
            Ok(res) => res,
            Err(oneshot::Canceled) => Err(self.shared.reason()),
        };
        guard.id = None;
        res
    }

    /// Closes the connection gracefully: everything already queued is
    /// written, then the write half is shut. Later sends fail.
    pub fn close(&self) {
        self.outbox.close();
    }

    /// True once the connection no longer accepts messages.
    pub fn is_closed(&self) -> bool {
        self.outbox.is_closed()
    }

    /// The reason the connection ended: `None` while it is open.
    pub fn close_reason(&self) -> Option<Error> {
        self.shared.reason.get().cloned()
    }

    /// How many messages `send` or `try_send` accepted that were never
    /// written, because the connection failed (or its driver was dropped).
    /// Always 0 after a clean close: then everything accepted was written.
    /// Accurate once the connection has ended.
    pub fn undelivered(&self) -> usize {
        self.shared.undelivered.load(Ordering::Acquire)
    }
}

/// Tells the driver when a request future is dropped while waiting, so its
/// entry leaves the table at once.
struct AbandonOnDrop<'a, P: Protocol> {
    outbox: &'a Outbox<P>,
    id: Option<P::RequestId>,
}

impl<P: Protocol> Drop for AbandonOnDrop<'_, P> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.outbox.abandon(id);
        }
    }
}

/// The incoming messages: a [`Stream`] of `Result<Message, Error>`.
///
/// Keepalives and responses to requests are taken out. The stream ends
/// with `None` after a clean close, or yields the error that closed the
/// connection once and then ends. Dropping it is allowed: later messages
/// are then discarded (responses still reach their requests).
///
/// Messages are taken from the connection in batches: besides the
/// `receive_capacity` messages that may wait in the queue, the stream holds
/// at most as many again that it is handing out. When the connection ends,
/// what had already been read (at most one read-ahead, a maximum frame's
/// worth) is handed over too, room or not, before the end.
pub struct Incoming<P: Protocol> {
    queue: Arc<Queue<P::Message>>,
    batch: VecDeque<P::Message>,
    shared: Arc<Shared>,
    done: bool,
}

// Nothing in it is structurally pinned.
impl<P: Protocol> Unpin for Incoming<P> {}

impl<P: Protocol> Drop for Incoming<P> {
    fn drop(&mut self) {
        // Tells the driver to stop delivering (and stop waiting for room).
        self.queue.close();
    }
}

impl<P: Protocol> fmt::Debug for Incoming<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("buffered", &(self.queue.len() + self.batch.len()))
            .finish()
    }
}

impl<P: Protocol> Stream for Incoming<P> {
    type Item = Result<P::Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(m) = this.batch.pop_front() {
                return Poll::Ready(Some(Ok(m)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.queue.poll_take_all(cx, &mut this.batch) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => {
                    this.done = true;
                    return match this.shared.reason() {
                        Error::Closed => Poll::Ready(None),
                        e => Poll::Ready(Some(Err(e))),
                    };
                }
                Poll::Pending => {
                    // Give back a large batch; keep a small one, which the
                    // queue and the driver trade back and forth, so a
                    // conversation does not allocate per message.
                    if this.batch.capacity() > KEEP_BATCH {
                        this.batch = VecDeque::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading and writing.
    Open,
    /// Our side is closing: write what is queued, then shut the write half.
    Closing,
    /// Our write half is shut: read until the peer's EOF.
    WriteClosed,
}

/// The driver: owns the byte stream and does all the I/O. Spawn it.
///
/// It resolves when the connection ends: `Ok(())` after a clean close by
/// either side, or the error that closed it, which every handle sees too.
/// Dropping it closes the connection at once: queued messages are not
/// written (see [`Sender::undelivered`]) and every pending request fails
/// with [`Error::Closed`].
#[must_use = "the connection does nothing unless its driver future is polled (spawn it)"]
pub struct Connection<T, P: Protocol, Tm> {
    pipe: Pipe<T>,
    state: State<P::RequestId, Reply<P::Message>>,
    protocol: Arc<P>,
    shared: Arc<Shared>,
    outbox: Arc<Outbox<P>>,
    /// Taken from the outbox in one go, waiting for room in the pipe.
    taken: VecDeque<Piece<P>>,
    outbound_done: bool,
    inbound: Arc<Queue<P::Message>>,
    /// Decoded this round, waiting to go to the application in one batch.
    received: VecDeque<P::Message>,
    receive_capacity: usize,
    inbound_closed: bool,
    /// Set while the application has no room: reading waits on it.
    room: Option<EventListener>,
    phase: Phase,
    timer: Tm,
    armed: Option<Instant>,
    /// When bytes last moved either way: buffers are released only after a
    /// while without any, not between the messages of a conversation.
    last_io: Instant,
    max_frame_len: usize,
    request_timeout: Duration,
}

// No field is structurally pinned: `T` and `Tm` are `Unpin`.
impl<T, P: Protocol, Tm> Unpin for Connection<T, P, Tm> {}

impl<T, P: Protocol, Tm> fmt::Debug for Connection<T, P, Tm> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("phase", &self.phase)
            .field("outstanding_requests", &self.state.outstanding())
            .field("queued_bytes", &self.pipe.queued())
            .finish()
    }
}

/// How many rounds one poll may do before yielding to other tasks.
const BUDGET: usize = 16;
/// Most frames decoded in one round.
const FRAMES_PER_ROUND: usize = 1024;
/// Batch capacity (messages) the incoming stream keeps while it waits.
const KEEP_BATCH: usize = 8;
/// Without I/O for this long, a connection gives its buffers back.
const RELEASE_AFTER: Duration = Duration::from_secs(1);
/// Bytes read in one round, at most (give or take one read).
const READ_PER_ROUND: u64 = 256 * 1024;
/// Write-queue bytes above which nothing more is taken from the outbox.
const WRITE_HIGH_WATER: usize = 256 * 1024;

impl<T, P, Tm> Future for Connection<T, P, Tm>
where
    T: AsyncRead + AsyncWrite + Unpin,
    P: Protocol,
    Tm: Timer,
{
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(reason) = this.shared.reason.get() {
            return Poll::Ready(match reason {
                Error::Closed => Ok(()),
                e => Err(e.clone()),
            });
        }
        let res = std::task::ready!(this.drive(cx));
        this.finish(res.as_ref().err().cloned().unwrap_or(Error::Closed));
        Poll::Ready(res)
    }
}

impl<T, P, Tm> Connection<T, P, Tm>
where
    T: AsyncRead + AsyncWrite + Unpin,
    P: Protocol,
    Tm: Timer,
{
    /// Number of requests awaiting a response.
    pub fn outstanding_requests(&self) -> usize {
        self.state.outstanding()
    }

    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let was_idle = self.last_io.elapsed() >= RELEASE_AFTER;
        // A direction that returned `Pending` has its waker registered: it
        // is not tried again in this poll (with most runtimes each try is a
        // system call that would only fail again).
        let (mut write_blocked, mut read_blocked) = (false, false);
        for _ in 0..BUDGET {
            let now = Instant::now();
            let before = (self.pipe.bytes_read, self.pipe.bytes_written);
            let mut progress = false;

            while let Some(ev) = self.state.poll_event(now) {
                match ev {
                    // After our write half is shut there is nothing to keep alive.
                    Event::SendKeepalive if self.phase == Phase::WriteClosed => {}
                    Event::SendKeepalive => self.queue_keepalive(now)?,
                    Event::RequestExpired(reply) => {
                        let _ = reply.send(Err(Error::RequestTimeout(self.request_timeout)));
                    }
                    Event::Close(e) => return Poll::Ready(Err(e)),
                }
            }

            // Outbound: take what senders encoded while the pipe has room.
            while !self.outbound_done && self.pipe.queued() < WRITE_HIGH_WATER {
                if let Some(piece) = self.taken.pop_front() {
                    self.queue_piece(now, piece);
                    progress = true;
                    continue;
                }
                match self.outbox.poll_take(cx, &mut self.taken) {
                    Poll::Ready(true) => {}
                    Poll::Ready(false) => {
                        self.outbound_done = true;
                        if self.phase == Phase::Open {
                            self.phase = Phase::Closing;
                        }
                    }
                    Poll::Pending => break,
                }
            }
            let written = !write_blocked
                && match self.pipe.poll_write(cx) {
                    Poll::Ready(Ok(())) => true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        write_blocked = true;
                        false
                    }
                };
            if written && self.phase == Phase::Closing && self.outbound_done {
                if let Poll::Ready(res) = self.pipe.poll_close_write(cx) {
                    res?;
                    self.phase = Phase::WriteClosed;
                    progress = true;
                }
            }

            // Inbound: hand over what waits, then read more.
            progress |= self.deliver(cx, now);
            // Once the peer's EOF is buffered, what is left is bounded by the
            // read-ahead: decode it all and close, even if the application
            // is behind, so a closed connection is never held open.
            let eof = self.pipe.read_eof();
            if (self.received.is_empty() || eof) && !read_blocked {
                // A round ends after a bounded number of frames or bytes, so
                // the application gets them while they are hot.
                let read_limit = self.pipe.bytes_read + READ_PER_ROUND;
                while (eof || self.received.len() < FRAMES_PER_ROUND.min(self.receive_capacity))
                    && self.pipe.bytes_read < read_limit
                {
                    match self.pipe.poll_frame(cx) {
                        Poll::Ready(Ok(Some(payload))) => {
                            self.dispatch(payload)?;
                            progress = true;
                        }
                        Poll::Ready(Ok(None)) => {
                            if self.phase == Phase::WriteClosed {
                                // Both directions are done. What was received
                                // is handed over by `finish`, room or not, so
                                // a slow application cannot hold the
                                // connection open.
                                return Poll::Ready(Ok(()));
                            }
                            // The peer closed: close too, after writing
                            // what was already accepted.
                            self.outbox.close();
                            if self.phase == Phase::Open {
                                self.phase = Phase::Closing;
                                progress = true;
                            }
                            break;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            read_blocked = true;
                            break;
                        }
                    }
                }
                self.deliver(cx, now);
            }
            if !self.received.is_empty() && !read_blocked {
                // The application is behind: read ahead a bounded amount
                // so that a reset or EOF is still seen at once.
                match self.pipe.poll_fill(cx, self.max_frame_len + HEADER_LEN) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                    Poll::Pending => read_blocked = true,
                }
            }

            let after = (self.pipe.bytes_read, self.pipe.bytes_written);
            if after.0 != before.0 {
                self.state.on_received(now);
            }
            self.state.set_mid_frame(now, self.pipe.is_mid_frame());
            self.state
                .set_write_state(now, self.pipe.queued() > 0, after.1 != before.1);
            if after != before {
                progress = true;
                self.last_io = now;
            }

            if !progress {
                return self.arm_timer(cx, was_idle);
            }
        }
        // Out of budget: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Moves received messages to the application's queue, as many as fit.
    /// While some do not, reading pauses (and the idle clock with it) until
    /// the application makes room. True if anything moved.
    fn deliver(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut moved = false;
        loop {
            if self.received.is_empty() {
                break;
            }
            let before = self.received.len();
            if self.inbound_closed || self.inbound.push_batch(&mut self.received).is_err() {
                // Nobody is listening: discard.
                self.inbound_closed = true;
                self.received.clear();
            }
            moved |= self.received.len() != before;
            if self.received.is_empty() {
                break;
            }
            match &mut self.room {
                None => self.room = Some(self.inbound.listen_room()),
                Some(listener) => match Pin::new(listener).poll(cx) {
                    Poll::Ready(()) => self.room = None,
                    Poll::Pending => break,
                },
            }
        }
        let blocked = !self.received.is_empty();
        if !blocked {
            self.room = None;
        }
        self.state.set_read_paused(now, blocked);
        moved
    }

    /// Arms the timer for the state machine's next deadline. Deadlines
    /// usually move later (each message pushes keepalive and idle out), so
    /// the timer is only moved earlier; when it fires early the deadline is
    /// checked and it is re-armed.
    fn arm_timer(&mut self, cx: &mut Context<'_>, was_idle: bool) -> Poll<Result<(), Error>> {
        let empty = self.pipe.queued() == 0 && self.received.is_empty() && self.taken.is_empty();
        if was_idle && empty {
            // Woken after a quiet spell (for a keepalive, say): give the
            // buffers back, so an idle connection holds next to no memory.
            self.pipe.release_idle_buffers();
            self.taken = VecDeque::new();
            self.received = VecDeque::new();
            self.outbox.release_if_empty();
            self.inbound.release_if_empty();
        }
        while let Some(deadline) = self.state.poll_timeout() {
            if self.armed.is_none_or(|a| deadline < a) {
                self.timer.reset(deadline);
                self.armed = Some(deadline);
            }
            match self.timer.poll_expired(cx) {
                Poll::Pending => break,
                Poll::Ready(()) => {
                    self.armed = None;
                    if Instant::now() >= deadline {
                        cx.waker().wake_by_ref();
                        break;
                    }
                }
            }
        }
        Poll::Pending
    }

    fn queue_keepalive(&mut self, now: Instant) -> Result<(), Error> {
        let mut buf = BytesMut::new();
        let keepalive = self.protocol.keepalive();
        let body = encode_frame(&*self.protocol, &keepalive, &mut buf, self.max_frame_len)?;
        let body_frames = usize::from(!body.is_empty());
        self.pipe.queue(buf.freeze(), 1 - body_frames);
        self.pipe.queue(body, body_frames);
        self.state.on_sent(now);
        Ok(())
    }

    fn queue_piece(&mut self, now: Instant, piece: Piece<P>) {
        match piece {
            Piece::Bytes { bytes, frames } => self.pipe.queue(bytes, frames),
            Piece::Request {
                id,
                reply,
                head,
                body,
            } => {
                let abandoned = oneshot::Sender::is_canceled;
                if let Err(reply) = self.state.insert_request(now, id, reply, abandoned) {
                    let _ = reply.send(Err(Error::InvalidRequest(
                        "a request with this id is already outstanding",
                    )));
                    return;
                }
                let body_frames = usize::from(!body.is_empty());
                self.pipe.queue(head, 1 - body_frames);
                self.pipe.queue(body, body_frames);
            }
            Piece::Abandon(id) => return self.state.abandon(&id),
        }
        self.state.on_sent(now);
    }

    /// Decodes one payload and routes it: keepalives dropped, responses to
    /// their requests, everything else toward the application.
    fn dispatch(&mut self, payload: Bytes) -> Result<(), Error> {
        let msg = match self.protocol.decode(payload) {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(()),
            Err(e) => return Err(Error::Malformed(Arc::new(e))),
        };
        match self.protocol.kind(&msg) {
            Kind::Keepalive => {}
            Kind::Response(id) => match self.state.take_response(&id) {
                Matched::Pending(reply) => {
                    let _ = reply.send(Ok(msg));
                }
                Matched::Late => {}
                Matched::Unknown => {
                    return Err(Error::Protocol(format!(
                        "response to a request never made (id {id:?})"
                    )))
                }
            },
            Kind::Message | Kind::Request(_) => {
                if !self.inbound_closed {
                    self.received.push_back(msg);
                }
            }
        }
        Ok(())
    }
}

impl<T, P: Protocol, Tm> Connection<T, P, Tm> {
    /// Records why the connection ended, counts what was accepted but
    /// never written, and tells every handle. Runs once: on completion, or
    /// on drop if the driver never completed.
    fn finish(&mut self, reason: Error) {
        if self.shared.reason.set(reason.clone()).is_err() {
            return;
        }
        // What arrived before the end is delivered before the end is seen.
        let _ = self.inbound.push_all(&mut self.received);
        self.outbox.close();
        self.inbound.close();
        self.room = None;
        // Requests still queued fail when their reply slots drop here.
        let left = std::mem::take(&mut self.taken)
            .into_iter()
            .chain(self.outbox.take_all());
        let undelivered = self.pipe.unwritten_frames()
            + left
                .map(|piece| match piece {
                    Piece::Bytes { frames, .. } => frames,
                    Piece::Request { .. } => 1,
                    Piece::Abandon(_) => 0,
                })
                .sum::<usize>();
        self.shared
            .undelivered
            .store(undelivered, Ordering::Release);
        for reply in self.state.drain_requests() {
            let _ = reply.send(Err(reason.clone()));
        }
    }
}

impl<T, P: Protocol, Tm> Drop for Connection<T, P, Tm> {
    fn drop(&mut self) {
        self.finish(Error::Closed);
    }
}
