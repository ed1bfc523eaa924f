//! The driver future: it joins the pipe, the state machine, the queues and
//! the timer, and does all the I/O.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_io::{AsyncRead, AsyncWrite};

use crate::frame::HEADER_LEN;
use crate::outbox::{encode_frame, Outbox, Piece, Reply};
use crate::pipe::Pipe;
use crate::queue::Queue;
use crate::reply::Spares;
use crate::state::{Event, Matched, State, Timeouts};
use crate::timer::Timer;
use crate::{Error, Kind, Protocol};

/// Logs through `tracing` with the feature on; nothing without it.
macro_rules! log {
    ($level:ident, $($arg:tt)*) => {{
        #[cfg(feature = "tracing")]
        tracing::$level!($($arg)*);
    }};
}

/// Shared by every handle: the one reason the connection ended, and what
/// the handles read without asking the driver.
#[derive(Debug)]
pub(crate) struct Shared {
    pub reason: OnceLock<Error>,
    /// Messages accepted but never written, once the connection failed.
    pub undelivered: AtomicUsize,
    /// Live `Sender`s: when the last goes, the connection closes gracefully.
    pub senders: AtomicUsize,
    /// Accepted messages settled: written and flushed (or refused by the
    /// driver). `Sender::flush` waits on it through `flush_event`.
    pub flushed: AtomicU64,
    pub flush_event: event_listener::Event,
    /// Flushes listening on `flush_event` ([`FlushWait`]): the driver
    /// notifies only while there are any, as a notification costs a lock.
    pub flush_waiters: AtomicUsize,
    /// Requests `Sender::call` has numbered.
    pub next_request: AtomicU64,
    pub stats: Counters,
    /// The connection's setup time: counters' times are offsets from it.
    pub start: Instant,
}

/// A flush's wait for `Shared::flushed` to move: a listener, counted in
/// `Shared::flush_waiters` until dropped.
#[derive(Debug)]
pub(crate) struct FlushWait {
    listener: event_listener::EventListener,
    shared: Arc<Shared>,
}

impl Future for FlushWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.listener).poll(cx)
    }
}

impl Drop for FlushWait {
    fn drop(&mut self) {
        self.shared.flush_waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters the driver stores once a round, for `Sender::stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub last_read_ns: AtomicU64,
    pub last_written_ns: AtomicU64,
}

impl Shared {
    pub fn new(start: Instant) -> Self {
        Shared {
            reason: OnceLock::new(),
            undelivered: AtomicUsize::new(0),
            senders: AtomicUsize::new(0),
            flushed: AtomicU64::new(0),
            flush_event: event_listener::Event::new(),
            flush_waiters: AtomicUsize::new(0),
            next_request: AtomicU64::new(0),
            stats: Counters::default(),
            start,
        }
    }

    /// Listens for `flushed` to move, counted as a waiter while it lives.
    pub fn wait_flushed(self: &Arc<Self>) -> FlushWait {
        // Counted before listening, and `listen` fences after: either the
        // driver's check after its store of `flushed` sees the count, or the
        // caller's next look at `flushed` sees the store.
        self.flush_waiters.fetch_add(1, Ordering::SeqCst);
        FlushWait {
            listener: self.flush_event.listen(),
            shared: self.clone(),
        }
    }

    pub fn reason(&self) -> Error {
        self.reason.get().cloned().unwrap_or(Error::Closed)
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
///
/// Each poll runs a few rounds of named steps (see `drive`): *deadlines*
/// (keepalives, timeouts), *take* (what senders queued), *write*, *read*
/// (and deliver), then *account* (what moved, for the deadlines). A round
/// with no progress arms the timer and returns `Pending`.
///
/// Closing, both directions together:
///
/// | phase | everything accepted written | peer's EOF read | next |
/// |---|---|---|---|
/// | open | - | no | read and write; `close()` or the last `Sender` dropped: closing |
/// | open | - | yes | take it as a close: stop accepting, closing |
/// | closing | no | - | keep writing (and reading) |
/// | closing | yes | - | shut our write half: write-closed |
/// | write-closed | yes | no | read and deliver until the peer's EOF |
/// | write-closed | yes | yes | resolve `Ok(())` |
///
/// An error or timeout in any phase resolves with that error at once.
///
/// Dropping the driver closes the connection at once: queued messages are
/// not written (see [`Sender::undelivered`](crate::Sender::undelivered))
/// and every pending request fails with [`Error::Closed`].
#[must_use = "the connection does nothing unless its driver future is polled (spawn it)"]
pub struct Connection<T, P: Protocol, Tm> {
    pipe: Pipe<T>,
    state: State<P::RequestId, Reply<P::Message>>,
    /// Reply slots answered, back to the outbox's pool once their
    /// requesters let go: a lock per poll, not per response.
    spares: Spares<P::Message>,
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
    /// The waker every call into the byte stream registers: it notes that
    /// the stream woke us. (All of them, not only reads: a stream may do
    /// reads within a write, as TLS does, and keep one waker for both.)
    io_wake: Arc<IoWake>,
    io_waker: Waker,
    /// The last read returned `Pending`: until `io_wake` fires, another
    /// would only fail again (a system call, with most streams).
    read_parked: bool,
    phase: Phase,
    timer: Tm,
    armed: Option<Instant>,
    /// The timer holds the task's current waker for the `armed` deadline:
    /// until that passes it wakes the task by itself, unasked.
    timer_waits: bool,
    /// The outbox holds the task's current waker, as of our last take.
    outbox_waits: bool,
    /// When bytes last moved either way, in nanoseconds since
    /// `Shared::start`: buffers are released only after a while without
    /// any, not between the messages of a conversation.
    last_io: u64,
    max_frame_len: usize,
    request_timeout: Duration,
    /// Frames received.
    frames_in: u64,
    label: Option<Arc<str>>,
    #[cfg(feature = "tracing")]
    span: tracing::Span,
}

/// What `Builder` hands the driver.
pub(crate) struct Parts<T, P: Protocol, Tm> {
    pub io: T,
    pub protocol: Arc<P>,
    pub shared: Arc<Shared>,
    pub outbox: Arc<Outbox<P>>,
    pub inbound: Arc<Queue<P::Message>>,
    pub timer: Tm,
    pub now: Instant,
    pub timeouts: Timeouts,
    pub max_frame_len: usize,
    pub receive_capacity: usize,
    pub label: Option<Arc<str>>,
}

// No field is structurally pinned: `T` and `Tm` are `Unpin`.
impl<T, P: Protocol, Tm> Unpin for Connection<T, P, Tm> {}

impl<T, P: Protocol, Tm> fmt::Debug for Connection<T, P, Tm> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("label", &self.label)
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
/// Without I/O for this long, a connection gives its buffers back.
const RELEASE_AFTER: Duration = Duration::from_secs(1);
/// Bytes read in one round, at most (give or take one read).
const READ_PER_ROUND: u64 = 256 * 1024;
/// The most read ahead (beyond what was decoded) while the application has
/// no room. It need not hold a whole frame: it is there to see an EOF or a
/// reset early. More costs copies: the buffer cannot grow in place while
/// delivered messages share it, so each growth copies what it holds
/// (callgrind, oneway 64 B with 1 MiB frames allowed: about 500 bytes
/// copied per message, read-ahead up to a maximum frame).
const READ_AHEAD: usize = 64 * 1024;
/// Write-queue bytes above which nothing more is taken from the outbox.
const WRITE_HIGH_WATER: usize = 256 * 1024;

/// `t` in nanoseconds since `start` (0 before it).
fn since(start: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(start).as_nanos() as u64
}

/// A step's outcome: whether it made progress, or why the connection ends
/// (`Error::Closed` for a clean end).
type Step = Result<bool, Error>;

/// The waker calls into the byte stream register: it records that the
/// stream woke the driver, then wakes the driver's task.
#[derive(Default)]
struct IoWake {
    ready: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl IoWake {
    /// Keeps the driver task's current waker; true if it is a new one.
    fn set_task(&self, waker: &Waker) -> bool {
        let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if task.as_ref().is_some_and(|w| w.will_wake(waker)) {
            return false;
        }
        *task = Some(waker.clone());
        true
    }
}

impl Wake for IoWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        // Woken outside the lock: an executor may poll the task at once.
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = task {
            w.wake();
        }
    }
}

/// Directions that returned `Pending` in this poll: their wakers are
/// registered, so they are not tried again (with most runtimes each try is
/// a system call that would only fail again).
#[derive(Default)]
struct Blocked {
    read: bool,
    write: bool,
}

impl<T, P, Tm> Future for Connection<T, P, Tm>
where
    T: AsyncRead + AsyncWrite + Unpin,
    P: Protocol,
    Tm: Timer,
{
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        #[cfg(feature = "tracing")]
        let _span = this.span.clone().entered();
        if let Some(reason) = this.shared.reason.get() {
            return Poll::Ready(match reason {
                Error::Closed => Ok(()),
                e => Err(e.clone()),
            });
        }
        let reason = match std::task::ready!(this.drive(cx)) {
            Ok(never) => match never {},
            Err(reason) => reason,
        };
        this.finish(reason.clone());
        Poll::Ready(match reason {
            Error::Closed => Ok(()),
            e => Err(e),
        })
    }
}

impl<T, P, Tm> Connection<T, P, Tm>
where
    T: AsyncRead + AsyncWrite + Unpin,
    P: Protocol,
    Tm: Timer,
{
    pub(crate) fn new(parts: Parts<T, P, Tm>) -> Self {
        #[cfg(feature = "tracing")]
        let span = tracing::debug_span!("chatpipe", label = parts.label.as_deref().unwrap_or(""));
        let io_wake = Arc::new(IoWake::default());
        let last_io = since(parts.shared.start, parts.now);
        Connection {
            pipe: Pipe::new(parts.io, parts.max_frame_len),
            state: State::new(parts.now, parts.timeouts),
            spares: Spares::default(),
            protocol: parts.protocol,
            shared: parts.shared,
            outbox: parts.outbox,
            taken: VecDeque::new(),
            outbound_done: false,
            inbound: parts.inbound,
            received: VecDeque::new(),
            receive_capacity: parts.receive_capacity,
            inbound_closed: false,
            io_wake: io_wake.clone(),
            io_waker: Waker::from(io_wake),
            read_parked: false,
            phase: Phase::Open,
            timer: parts.timer,
            armed: None,
            timer_waits: false,
            outbox_waits: false,
            last_io,
            max_frame_len: parts.max_frame_len,
            request_timeout: parts.timeouts.request_timeout,
            frames_in: 0,
            label: parts.label,
            #[cfg(feature = "tracing")]
            span,
        }
    }

    /// Number of requests awaiting a response.
    pub fn outstanding_requests(&self) -> usize {
        self.state.outstanding()
    }

    /// Rounds of the steps until none makes progress (then the timer is
    /// armed) or the budget is spent (then other tasks get a turn).
    /// Resolves only with the reason the connection ends.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<std::convert::Infallible, Error>> {
        // One clock read a poll: its rounds are microseconds apart, the
        // deadlines seconds.
        let now = self.timer.now();
        // Nanoseconds from here on: integer arithmetic, one conversion a
        // poll.
        let now_ns = since(self.shared.start, now);
        let was_idle = now_ns.saturating_sub(self.last_io) >= RELEASE_AFTER.as_nanos() as u64;
        // Woken by something else than the byte stream (a sender, the timer,
        // room made): a read parked on `Pending` is not tried again.
        if self.io_wake.set_task(cx.waker()) {
            // What holds the old waker must be given the new one.
            self.timer_waits = false;
            self.outbox_waits = false;
        }
        let mut blocked = Blocked {
            read: self.read_parked && !self.io_wake.ready.swap(false, Ordering::AcqRel),
            write: false,
        };
        if !self.spares.is_empty() {
            // Answered in an earlier poll: most are taken by now.
            self.outbox.replies.recycle(&mut self.spares);
        }
        for round in 0..BUDGET {
            let before = (self.pipe.bytes_read, self.pipe.bytes_written);
            // Deadlines are checked once a poll: one that falls due during
            // it is found by `arm_timer`, whose timer then fires at once.
            let progress = (round == 0 && self.step_deadlines(now)?)
                | self.step_take(cx, now)
                | self.step_write(&mut blocked)?
                | self.step_read(cx, now, &mut blocked)?
                | self.step_account(now, now_ns, before);
            if !progress {
                if was_idle {
                    self.release_idle_buffers();
                }
                self.arm_timer(cx, now);
                return Poll::Pending;
            }
        }
        // Out of budget: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Keepalives, request timeouts, and the timeouts that end the
    /// connection.
    fn step_deadlines(&mut self, now: Instant) -> Step {
        let mut progress = false;
        while let Some(ev) = self.state.poll_event(now) {
            match ev {
                // Once closing there is nothing to keep alive: what is left
                // is written, then our write half is shut, and the shutting
                // may take a while (TLS's close_notify, QUIC's FIN waits for
                // its acknowledgement), during which a stream refuses writes.
                Event::SendKeepalive if self.phase != Phase::Open => {}
                Event::SendKeepalive => {
                    log!(trace, "keepalive");
                    self.queue_keepalive(now)?;
                    progress = true;
                }
                Event::RequestExpired(reply) => {
                    log!(debug, timeout = ?self.request_timeout, "request timed out");
                    let _ = reply.send(Err(Error::RequestTimeout(self.request_timeout)));
                }
                Event::Close(e) => {
                    log!(warn, error = %e, "timed out");
                    return Err(e);
                }
            }
        }
        Ok(progress)
    }

    /// Moves what senders encoded into the pipe, while it has room.
    fn step_take(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        while !self.outbound_done && self.pipe.queued() < WRITE_HIGH_WATER {
            if let Some(piece) = self.taken.pop_front() {
                self.queue_piece(now, piece);
                progress = true;
                continue;
            }
            // Still parked with this waker: nothing was queued since, and
            // whatever is queued next wakes the task.
            if self.outbox_waits && self.outbox.parked() {
                break;
            }
            match self.outbox.poll_take(cx, &mut self.taken) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => {
                    self.outbound_done = true;
                    if self.phase == Phase::Open {
                        self.phase = Phase::Closing;
                    }
                    progress = true;
                }
                Poll::Pending => {
                    self.outbox_waits = true;
                    break;
                }
            }
        }
        progress
    }

    /// Writes what the pipe holds; once everything is written while
    /// closing, shuts the write half.
    fn step_write(&mut self, blocked: &mut Blocked) -> Step {
        if blocked.write {
            return Ok(false);
        }
        match self
            .pipe
            .poll_write(&mut Context::from_waker(&self.io_waker))
        {
            Poll::Ready(res) => res?,
            Poll::Pending => {
                blocked.write = true;
                return Ok(false);
            }
        }
        if self.phase == Phase::Closing && self.outbound_done {
            let mut io_cx = Context::from_waker(&self.io_waker);
            if let Poll::Ready(res) = self.pipe.poll_close_write(&mut io_cx) {
                res?;
                self.phase = Phase::WriteClosed;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Hands over what waits, then reads and decodes more while the
    /// application has room; when it has none, reads ahead a bounded
    /// amount so that a reset or EOF is still seen at once.
    fn step_read(&mut self, cx: &mut Context<'_>, now: Instant, blocked: &mut Blocked) -> Step {
        let mut progress = self.deliver(cx, now);
        // Once the peer's EOF is buffered, what is left is bounded by the
        // read-ahead: decode it all and close, even if the application is
        // behind, so a closed connection is never held open.
        let eof = self.pipe.read_eof();
        if self.received.is_empty() || eof {
            // A round ends after a bounded number of frames or bytes, so
            // the application gets them while they are hot.
            let read_limit = self.pipe.bytes_read + READ_PER_ROUND;
            let frame_limit = FRAMES_PER_ROUND.min(self.receive_capacity);
            while (eof || self.received.len() < frame_limit) && self.pipe.bytes_read < read_limit {
                // Blocked: only frames already buffered (read ahead while
                // the application had no room) are decoded.
                let may_read = !blocked.read;
                let frame = self
                    .pipe
                    .poll_frame_reading(&mut Context::from_waker(&self.io_waker), may_read);
                if may_read {
                    self.read_parked = frame.is_pending();
                }
                match frame {
                    Poll::Ready(Ok(Some(payload))) => {
                        self.dispatch(payload)?;
                        progress = true;
                    }
                    Poll::Ready(Ok(None)) => {
                        progress |= self.on_read_eof()?;
                        break;
                    }
                    Poll::Ready(Err(e)) => {
                        log!(warn, error = %e, "refused what the peer sent");
                        return Err(e);
                    }
                    Poll::Pending => {
                        blocked.read = true;
                        break;
                    }
                }
            }
            self.deliver(cx, now);
        }
        if !self.received.is_empty() && !blocked.read {
            let limit = self.max_frame_len.min(READ_AHEAD) + HEADER_LEN;
            let fill = self
                .pipe
                .poll_fill(&mut Context::from_waker(&self.io_waker), limit);
            self.read_parked = fill.is_pending();
            match fill {
                Poll::Ready(res) => res?,
                Poll::Pending => blocked.read = true,
            }
        }
        Ok(progress)
    }

    /// The peer closed: end if our side is done too, otherwise close ours
    /// after writing what was already accepted.
    fn on_read_eof(&mut self) -> Step {
        if self.phase == Phase::WriteClosed {
            // Both directions are done. What was received is handed over by
            // `finish`, room or not, so a slow application cannot hold the
            // connection open.
            return Err(Error::Closed);
        }
        self.outbox.close();
        if self.phase == Phase::Open {
            self.phase = Phase::Closing;
            return Ok(true);
        }
        Ok(false)
    }

    /// Tells the state machine and the counters what moved this round.
    /// `now_ns` is `now` in nanoseconds since `Shared::start`.
    fn step_account(&mut self, now: Instant, now_ns: u64, before: (u64, u64)) -> bool {
        let after = (self.pipe.bytes_read, self.pipe.bytes_written);
        if after.0 != before.0 {
            self.state.on_received(now);
        }
        self.state.set_mid_frame(now, self.pipe.is_mid_frame());
        self.state
            .set_write_state(now, self.pipe.queued() > 0, after.1 != before.1);
        let stats = &self.shared.stats;
        if after.0 != before.0 {
            stats.last_read_ns.store(now_ns, Ordering::Relaxed);
        }
        if after.1 != before.1 {
            stats.last_written_ns.store(now_ns, Ordering::Relaxed);
        }
        self.publish();
        if after != before {
            self.last_io = now_ns;
            return true;
        }
        false
    }

    /// Moves received messages to the application's queue, as many as fit.
    /// While some do not, reading pauses (and the idle clock with it) until
    /// the application makes room. True if anything moved.
    fn deliver(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let before = self.received.len();
        if before > 0 {
            let closed = self.inbound_closed
                || self.inbound.poll_push(cx, &mut self.received) == Poll::Ready(Err(()));
            if closed {
                // Nobody is listening: discard.
                self.inbound_closed = true;
                self.received.clear();
            }
        }
        self.state.set_read_paused(now, !self.received.is_empty());
        self.received.len() != before
    }

    /// Woken after a quiet spell (for a keepalive, say): give the buffers
    /// back, so an idle connection holds next to no memory.
    fn release_idle_buffers(&mut self) {
        if self.pipe.queued() == 0 && self.received.is_empty() && self.taken.is_empty() {
            self.pipe.release_idle_buffers();
            self.taken = VecDeque::new();
            self.received = VecDeque::new();
            self.spares.release();
            self.outbox.release_if_empty();
            self.inbound.release_if_empty();
        }
    }

    /// Arms the timer for the state machine's next deadline. Deadlines
    /// usually move later (each message pushes keepalive and idle out), so
    /// the timer is only moved earlier; when it fires early the deadline is
    /// checked and it is re-armed. Nor is it polled again while it holds
    /// this task's waker and its deadline (after `now`) is ahead: a poll
    /// would only say so again.
    fn arm_timer(&mut self, cx: &mut Context<'_>, now: Instant) {
        while let Some(deadline) = self.state.poll_timeout() {
            if self.armed.is_none_or(|a| deadline < a) {
                self.timer.reset(deadline);
                self.armed = Some(deadline);
                self.timer_waits = false;
            }
            if self.timer_waits && self.armed.is_some_and(|a| now < a) {
                break;
            }
            match self.timer.poll_expired(cx) {
                Poll::Pending => {
                    self.timer_waits = true;
                    break;
                }
                Poll::Ready(()) => {
                    self.armed = None;
                    self.timer_waits = false;
                    if self.timer.now() >= deadline {
                        cx.waker().wake_by_ref();
                        break;
                    }
                }
            }
        }
    }

    fn queue_keepalive(&mut self, now: Instant) -> Result<(), Error> {
        let Some(keepalive) = self.protocol.keepalive() else {
            return Ok(());
        };
        let mut buf = BytesMut::new();
        // Without keepalives the connection cannot go on: that is fatal.
        let body = encode_frame(&*self.protocol, &keepalive, &mut buf, self.max_frame_len)
            .map_err(|e| Error::Protocol(format!("cannot send a keepalive: {e}")))?;
        // Counted as no frame: `flush` and `undelivered` count messages
        // that senders accepted.
        self.pipe.queue(buf.freeze(), 0);
        self.pipe.queue(body, 0);
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
                let abandoned = Reply::is_canceled;
                if let Err(reply) = self.state.insert_request(now, id, reply, abandoned) {
                    let _ = reply.send(Err(Error::InvalidRequest(
                        "a request with this id is already outstanding",
                    )));
                    // Settled once what was queued before it is flushed.
                    self.pipe.mark();
                    return;
                }
                let body_frames = usize::from(!body.is_empty());
                self.pipe.queue(head, 1 - body_frames);
                self.pipe.queue(body, body_frames);
            }
            // Only if that request's future is gone: the id may have been
            // reused since by a request that is still waiting.
            Piece::Abandon(id) => return self.state.abandon(&id, Reply::is_canceled),
        }
        self.state.on_sent(now);
    }

    /// Decodes one payload and routes it: keepalives dropped, responses to
    /// their requests, everything else toward the application.
    fn dispatch(&mut self, payload: Bytes) -> Result<(), Error> {
        self.frames_in += 1;
        let msg = match self.protocol.decode(payload) {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(()),
            Err(e) => {
                let e = Error::Malformed(Arc::new(e));
                log!(warn, error = %e, "refused a frame");
                return Err(e);
            }
        };
        match self.protocol.kind(&msg) {
            Kind::Keepalive => {}
            Kind::Response(id) => match self.state.take_response(&id) {
                Matched::Pending(reply) => {
                    let _ = reply.send_keep(Ok(msg), &mut self.spares);
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
    /// Stores the totals the handles read, and wakes `flush` waiters when
    /// more was flushed.
    fn publish(&self) {
        let stats = &self.shared.stats;
        stats
            .bytes_in
            .store(self.pipe.bytes_read, Ordering::Relaxed);
        stats
            .bytes_out
            .store(self.pipe.bytes_written, Ordering::Relaxed);
        stats.messages_in.store(self.frames_in, Ordering::Relaxed);
        stats
            .messages_out
            .store(self.pipe.frames_written(), Ordering::Relaxed);
        let flushed = self.pipe.frames_flushed() + self.pipe.marks_flushed();
        // The driver is its only writer: a load, not a locked swap, each round.
        if self.shared.flushed.load(Ordering::Relaxed) != flushed {
            self.shared.flushed.store(flushed, Ordering::Release);
            // Paired with `Shared::wait_flushed`.
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.shared.flush_waiters.load(Ordering::Relaxed) > 0 {
                self.shared.flush_event.notify(usize::MAX);
            }
        }
    }

    /// Records why the connection ended, counts what was accepted but
    /// never written, and tells every handle. Runs once: on completion, or
    /// on drop if the driver never completed.
    fn finish(&mut self, reason: Error) {
        if self.shared.reason.get().is_some() {
            return;
        }
        // Final before the reason is set, so whoever sees the reason sees
        // the final counts.
        self.publish();
        let _ = self.shared.reason.set(reason.clone());
        log!(debug, reason = %reason, "connection ended");
        // What arrived before the end is delivered before the end is seen.
        let _ = self.inbound.push_all(&mut self.received);
        self.outbox.close();
        self.inbound.close();
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
        self.shared.flush_event.notify(usize::MAX);
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
