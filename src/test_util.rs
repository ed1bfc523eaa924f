//! Tools for testing code built on chatpipe (feature `test-util`): a
//! virtual clock and scripted mock I/O.
//!
//! Run a whole connection on virtual time: build it with a
//! [`ManualClock`]'s timer, poll it on a single-threaded executor until
//! nothing more can happen, then move the clock to the next deadline.
//!
//! ```
//! use std::time::Duration;
//! use chatpipe::raw::Raw;
//! use chatpipe::test_util::{ManualClock, Mock};
//! use futures::executor::LocalPool;
//! use futures::task::LocalSpawnExt;
//!
//! let clock = ManualClock::new();
//! // A peer that sends nothing and never closes.
//! let (io, handle) = Mock::new().build();
//! let (_sender, _incoming, conn) = chatpipe::Builder::new()
//!     .keepalive_interval(Some(Duration::from_secs(5)))
//!     .build_with_timer(io, Raw, clock.timer());
//! let mut pool = LocalPool::new();
//! let result = pool.spawner().spawn_local_with_handle(conn).unwrap();
//! pool.run_until_stalled();
//! clock.advance(Duration::from_secs(5));
//! pool.run_until_stalled();
//! assert_eq!(handle.written(), [0, 0, 0, 1, 1]); // one keepalive
//! clock.advance(Duration::from_secs(10)); // 15 s of silence in all
//! let result = pool.run_until(result);
//! assert!(matches!(result, Err(chatpipe::Error::IdleTimeout(_))));
//! ```

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_io::{AsyncRead, AsyncWrite};

use crate::Timer;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A clock that moves only when told to. Clones share the clock.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<ClockInner>>,
}

#[derive(Debug)]
struct ClockInner {
    now: Instant,
    /// Timers waiting, by id: their deadline and waker.
    waiting: Vec<(u64, Instant, Waker)>,
    next_id: u64,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock that starts at the real current time and stays there.
    pub fn new() -> Self {
        ManualClock {
            inner: Arc::new(Mutex::new(ClockInner {
                now: Instant::now(),
                waiting: Vec::new(),
                next_id: 0,
            })),
        }
    }

    /// The clock's time.
    pub fn now(&self) -> Instant {
        lock(&self.inner).now
    }

    /// Moves the clock forward and wakes every timer whose deadline passed.
    pub fn advance(&self, d: Duration) {
        let due = {
            let mut inner = lock(&self.inner);
            inner.now += d;
            let now = inner.now;
            let (due, waiting) = std::mem::take(&mut inner.waiting)
                .into_iter()
                .partition(|(_, deadline, _)| *deadline <= now);
            inner.waiting = waiting;
            due
        };
        due.into_iter()
            .for_each(|(_, _, w): (u64, Instant, Waker)| w.wake());
    }

    /// The earliest deadline a timer of this clock waits for.
    pub fn next_deadline(&self) -> Option<Instant> {
        lock(&self.inner).waiting.iter().map(|w| w.1).min()
    }

    /// Moves the clock to the earliest deadline a timer waits for (not
    /// backwards), returning how far it moved; `None` if no timer waits.
    pub fn advance_to_next(&self) -> Option<Duration> {
        let next = self.next_deadline()?;
        let d = next.saturating_duration_since(self.now());
        self.advance(d);
        Some(d)
    }

    /// A timer on this clock, for
    /// [`Builder::build_with_timer`](crate::Builder::build_with_timer).
    pub fn timer(&self) -> ManualTimer {
        let id = {
            let mut inner = lock(&self.inner);
            inner.next_id += 1;
            inner.next_id
        };
        ManualTimer {
            clock: self.clone(),
            id,
            deadline: None,
        }
    }
}

/// A [`Timer`] on a [`ManualClock`].
#[derive(Debug)]
pub struct ManualTimer {
    clock: ManualClock,
    id: u64,
    deadline: Option<Instant>,
}

impl Timer for ManualTimer {
    fn now(&self) -> Instant {
        self.clock.now()
    }

    fn reset(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(deadline) = self.deadline else {
            return Poll::Pending;
        };
        let mut inner = lock(&self.clock.inner);
        inner.waiting.retain(|w| w.0 != self.id);
        if inner.now >= deadline {
            return Poll::Ready(());
        }
        inner.waiting.push((self.id, deadline, cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for ManualTimer {
    fn drop(&mut self) {
        lock(&self.clock.inner).waiting.retain(|w| w.0 != self.id);
    }
}

/// One step of a [`Mock`]'s script.
#[derive(Debug)]
enum Step {
    Data(Vec<u8>),
    /// `Pending`, with the task woken at once: "not yet", as a socket says
    /// between two packets.
    Pending,
    Error(io::ErrorKind),
}

/// Scripted mock I/O: a byte stream whose reads and writes follow a script,
/// in order, for testing what a connection does with each.
///
/// - Reads hand out the scripted data (as much as fits in each read),
///   `Pending`s and errors in order; after the script they end with EOF
///   ([`Mock::eof`]) or stay pending without waking anyone, as a silent
///   peer does.
/// - Writes take `Pending`s and errors from their own script, in order,
///   then accept everything (at most [`Mock::max_write`] bytes a call).
///   What was written is kept for [`MockHandle::written`].
///
/// ```
/// use chatpipe::test_util::Mock;
/// let (io, handle) = Mock::new()
///     .read(b"\0\0\0\x01")   // the first half of a frame
///     .read_pending()         // then nothing, for now
///     .read(b"\0")            // the rest
///     .eof()
///     .write_pending()        // the first write waits
///     .build();
/// ```
#[derive(Debug, Default)]
#[must_use = "a mock does nothing until built"]
pub struct Mock {
    reads: VecDeque<Step>,
    writes: VecDeque<Step>,
    eof: bool,
    max_write: Option<usize>,
    pending_each_write: bool,
    /// With `pending_each_write`: the next write goes through.
    write_ready: bool,
}

impl Mock {
    /// An empty script: reads stay pending, writes accept everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// The peer sends these bytes (in one read, if it fits).
    pub fn read(mut self, data: &[u8]) -> Self {
        self.reads.push_back(Step::Data(data.to_vec()));
        self
    }

    /// A read returns `Pending` (and wakes the task at once).
    pub fn read_pending(mut self) -> Self {
        self.reads.push_back(Step::Pending);
        self
    }

    /// A read fails with this error.
    pub fn read_error(mut self, kind: io::ErrorKind) -> Self {
        self.reads.push_back(Step::Error(kind));
        self
    }

    /// After the script, reads return EOF (the peer closed), rather than
    /// staying pending.
    pub fn eof(mut self) -> Self {
        self.eof = true;
        self
    }

    /// A write returns `Pending` (and wakes the task at once).
    pub fn write_pending(mut self) -> Self {
        self.writes.push_back(Step::Pending);
        self
    }

    /// A write fails with this error.
    pub fn write_error(mut self, kind: io::ErrorKind) -> Self {
        self.writes.push_back(Step::Error(kind));
        self
    }

    /// Every write returns `Pending` once before it goes through, as a
    /// slow socket's do.
    pub fn pending_each_write(mut self) -> Self {
        self.pending_each_write = true;
        self
    }

    /// Each write takes at most `n` bytes (at least 1).
    pub fn max_write(mut self, n: usize) -> Self {
        self.max_write = Some(n.max(1));
        self
    }

    /// The stream, and a handle to what happened to it.
    pub fn build(self) -> (MockIo, MockHandle) {
        let log = Arc::new(Mutex::new(Log::default()));
        let io = MockIo {
            script: self,
            log: log.clone(),
        };
        (io, MockHandle { log })
    }
}

/// What a [`MockIo`] saw.
#[derive(Debug, Default)]
struct Log {
    written: Vec<u8>,
    /// Each write call's slices: address and length.
    calls: Vec<Vec<(usize, usize)>>,
    shut: bool,
    written_after_shut: bool,
}

/// The stream a [`Mock`] builds.
#[derive(Debug)]
pub struct MockIo {
    script: Mock,
    log: Arc<Mutex<Log>>,
}

/// Tells what was done to a [`MockIo`], from outside.
#[derive(Debug, Clone)]
pub struct MockHandle {
    log: Arc<Mutex<Log>>,
}

impl MockHandle {
    /// Every byte written so far.
    pub fn written(&self) -> Vec<u8> {
        lock(&self.log).written.clone()
    }

    /// Each write call so far, as the (address, length) of every slice it
    /// was given: shows vectored writes and that no copy was made.
    pub fn write_calls(&self) -> Vec<Vec<(usize, usize)>> {
        lock(&self.log).calls.clone()
    }

    /// True once the write half was shut (`poll_close`).
    pub fn is_shut(&self) -> bool {
        lock(&self.log).shut
    }

    /// True if anything was written after the write half was shut.
    pub fn written_after_shut(&self) -> bool {
        lock(&self.log).written_after_shut
    }
}

impl AsyncRead for MockIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.script.reads.pop_front() {
            Some(Step::Data(mut data)) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                if n < data.len() {
                    self.script.reads.push_front(Step::Data(data.split_off(n)));
                }
                Poll::Ready(Ok(n))
            }
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Step::Error(kind)) => Poll::Ready(Err(kind.into())),
            None if self.script.eof => Poll::Ready(Ok(0)),
            None => Poll::Pending,
        }
    }
}

impl AsyncWrite for MockIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.script.writes.pop_front() {
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Some(Step::Error(kind)) => return Poll::Ready(Err(kind.into())),
            Some(Step::Data(_)) | None => {}
        }
        if self.script.pending_each_write && !std::mem::take(&mut self.script.write_ready) {
            self.script.write_ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut left = self.script.max_write.unwrap_or(usize::MAX);
        let mut log = lock(&self.log);
        log.written_after_shut |= log.shut;
        log.calls.push(
            bufs.iter()
                .map(|b| (b.as_ptr() as usize, b.len()))
                .collect(),
        );
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(left);
            log.written.extend_from_slice(&b[..take]);
            n += take;
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.log).shut = true;
        Poll::Ready(Ok(()))
    }
}
