//! Helpers shared by the integration tests.
#![allow(dead_code)]

mod ports;
#[allow(unused_imports)] // Only the tests that restart a server use it.
pub use ports::restartable_port;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatpipe::raw::RawMessage;
use chatpipe::test_util::{ManualClock, ManualTimer};
use futures::executor::LocalPool;
use futures::future::{AbortHandle, Abortable};
use futures::task::LocalSpawnExt;
use futures::FutureExt;
use futures_io::{AsyncRead, AsyncWrite};
use smol::net::{TcpListener, TcpStream};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

pub const NS: Duration = Duration::from_nanos(1);
pub const S: Duration = Duration::from_secs(1);

/// A connected pair of loopback TCP sockets.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (b, _) = listener.accept().await.unwrap();
    (a, b)
}

/// A connected pair of in-memory streams (no runtime needed). A write
/// whose peer does not read stays `Pending` once `cap` bytes wait.
pub fn duplex_pair(
    cap: usize,
) -> (
    Compat<tokio::io::DuplexStream>,
    Compat<tokio::io::DuplexStream>,
) {
    let (a, b) = tokio::io::duplex(cap);
    (a.compat(), b.compat())
}

/// Fails the test if `fut` takes longer than `secs` seconds: only a hang
/// guard for the tests on real sockets, far above what they need.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    smol::future::or(fut, async {
        smol::Timer::after(Duration::from_secs(secs)).await;
        panic!("test step took longer than {secs} s");
    })
    .await
}

/// Polls `fut` once: its output, or a panic if it is not ready. For steps
/// that must complete at once once the tasks of a [`Sim`] have settled.
#[track_caller]
pub fn ready<F: Future>(fut: F) -> F::Output {
    match fut.now_or_never() {
        Some(out) => out,
        None => panic!("not ready"),
    }
}

/// Most polls all the tasks of one [`Sim`] may take: a task that wakes
/// itself for ever fails the test instead of hanging it.
const MAX_POLLS: u64 = 200_000;
/// Most timer deadlines one [`Sim::run_to`] may stop at.
const MAX_STOPS: usize = 100_000;

/// Whole connections on virtual time: tasks on a single-threaded executor,
/// every timer on one [`ManualClock`]. Time moves only in [`Sim::run_to`],
/// from one timer deadline to the next, with every task run until it
/// stalls at each; so what a connection does happens at the exact virtual
/// time it is due, however loaded the machine.
pub struct Sim {
    pub clock: ManualClock,
    pool: LocalPool,
    start: Instant,
    polls: Rc<Cell<u64>>,
}

impl Default for Sim {
    fn default() -> Self {
        Self::new()
    }
}

impl Sim {
    pub fn new() -> Sim {
        let clock = ManualClock::new();
        Sim {
            start: clock.now(),
            clock,
            pool: LocalPool::new(),
            polls: Rc::default(),
        }
    }

    /// A timer on the virtual clock, for `Builder::build_with_timer`.
    pub fn timer(&self) -> ManualTimer {
        self.clock.timer()
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        self.clock.now() - self.start
    }

    /// The clock's reading `t` after the start.
    pub fn at(&self, t: Duration) -> Instant {
        self.start + t
    }

    /// Spawns `fut`; it first runs at the next [`Sim::settle`]. Panics in
    /// it fail the test there.
    pub fn spawn<F>(&self, fut: F) -> Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let out = Rc::new(RefCell::new(None));
        let (abort, reg) = AbortHandle::new_pair();
        let mut fut = Box::pin(Abortable::new(fut, reg));
        let polls = self.polls.clone();
        let counted = futures::future::poll_fn(move |cx| {
            polls.set(polls.get() + 1);
            assert!(
                polls.get() <= MAX_POLLS,
                "tasks still busy after {MAX_POLLS} polls"
            );
            fut.as_mut().poll(cx)
        });
        let slot = out.clone();
        self.pool
            .spawner()
            .spawn_local(async move {
                if let Ok(v) = counted.await {
                    *slot.borrow_mut() = Some(v);
                }
            })
            .unwrap();
        Task { out, abort }
    }

    /// Runs every task until none can move without the clock moving.
    pub fn settle(&mut self) {
        self.pool.run_until_stalled();
    }

    /// Moves the clock to `at` after the start, stopping at every timer
    /// deadline on the way (tasks settle at each).
    pub fn run_to(&mut self, at: Duration) {
        self.run_to_with(at, |_| {});
    }

    /// [`Sim::run_to`], calling `each` with the time at every stop, the
    /// first (before the clock moves) and the last (at `at`) included.
    pub fn run_to_with(&mut self, at: Duration, mut each: impl FnMut(Duration)) {
        let target = self.start + at;
        assert!(
            target >= self.clock.now(),
            "{at:?} is in the past ({:?})",
            self.now()
        );
        for _ in 0..MAX_STOPS {
            self.settle();
            each(self.now());
            match self.clock.next_deadline() {
                Some(next) if next <= target => {
                    self.clock
                        .advance(next.saturating_duration_since(self.clock.now()));
                }
                _ => {
                    if self.clock.now() < target {
                        self.clock.advance(target - self.clock.now());
                        continue;
                    }
                    return;
                }
            }
        }
        panic!("more than {MAX_STOPS} timer deadlines before {at:?}");
    }
}

/// A task of a [`Sim`]. Dropping it lets it run on.
pub struct Task<T> {
    out: Rc<RefCell<Option<T>>>,
    abort: AbortHandle,
}

impl<T> Task<T> {
    pub fn is_finished(&self) -> bool {
        self.out.borrow().is_some()
    }

    /// The task's output; panics if it has not finished.
    #[track_caller]
    pub fn output(self) -> T {
        match self.out.borrow_mut().take() {
            Some(out) => out,
            None => panic!("the task has not finished"),
        }
    }

    /// Lets the task run on, its output unwanted.
    pub fn detach(self) {}

    /// Drops the task's future at the next settle.
    pub fn abort(self) {
        self.abort.abort();
    }
}

/// Splits a byte stream of whole frames into their payloads.
#[track_caller]
pub fn frames(mut wire: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        assert!(wire.len() >= 4, "a cut header: {wire:?}");
        let len = u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
        let Some(payload) = wire.get(4..4 + len) else {
            panic!("a cut frame: {wire:?}");
        };
        out.push(payload.to_vec());
        wire = &wire[4 + len..];
    }
    out
}

/// A stream that works until `cut` is set; from then on reads never
/// complete and writes are swallowed, closing nothing: a half-open
/// connection, as a dead NAT or a pulled cable makes.
pub struct BlackHole<T> {
    inner: T,
    cut: Arc<AtomicBool>,
}

/// A pair of in-memory streams between which [`BlackHole`]s can cut.
pub fn black_holed_pair(
    cap: usize,
) -> (
    BlackHole<Compat<tokio::io::DuplexStream>>,
    BlackHole<Compat<tokio::io::DuplexStream>>,
    Arc<AtomicBool>,
) {
    let (a, b) = duplex_pair(cap);
    let cut = Arc::new(AtomicBool::new(false));
    let a = BlackHole {
        inner: a,
        cut: cut.clone(),
    };
    let b = BlackHole {
        inner: b,
        cut: cut.clone(),
    };
    (a, b, cut)
}

impl<T: AsyncRead + Unpin> AsyncRead for BlackHole<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.cut.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BlackHole<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.cut.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

pub fn msg(s: &str) -> RawMessage {
    RawMessage::Message(Bytes::copy_from_slice(s.as_bytes()))
}

pub fn numbered(i: u32) -> RawMessage {
    RawMessage::Message(Bytes::copy_from_slice(&i.to_be_bytes()))
}

/// A numbered message padded to `len` bytes.
pub fn numbered_padded(i: u32, len: usize) -> RawMessage {
    let mut v = i.to_be_bytes().to_vec();
    v.resize(len.max(4), 0x55);
    RawMessage::Message(v.into())
}

pub fn number_of(m: &RawMessage) -> u32 {
    match m {
        RawMessage::Message(b) if b.len() >= 4 => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        other => panic!("not a numbered message: {other:?}"),
    }
}

/// A frame of the Raw protocol, as bytes on the wire.
pub fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}
