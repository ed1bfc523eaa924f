//! Edge cases of the handles, each once a bug: flush targets, refused
//! requests, a panicking encoder under a permit, a keepalive that cannot be
//! encoded, flush under a queue that never drains, and room wakeups a
//! `Sink` left waiting must not swallow. Each drives the connection by hand
//! or on a `LocalPool`, on a clock that never moves.
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::test_util::{ManualClock, Mock};
use chatpipe::{Builder, Error, Kind, Protocol};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use futures::{Sink, SinkExt};
use tokio_util::compat::TokioAsyncReadCompatExt;

fn msg(s: &str) -> RawMessage {
    RawMessage::Message(Bytes::copy_from_slice(s.as_bytes()))
}
fn quiet() -> Builder {
    Builder::new()
        .keepalive_interval(None)
        .frame_timeout(None)
        .write_timeout(None)
}
struct Flag(AtomicBool);
impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}
fn poll<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

/// A `poll_flush` after more `start_send`s waits for those too, not only
/// for what an earlier pending flush waited for.
#[test]
fn a_sink_flush_waits_for_what_was_sent_after_an_earlier_pending_flush() {
    let clock = ManualClock::new();
    let (io, peer) = Mock::new().build();
    let (mut tx, _rx, conn) = quiet().build_with_timer(io, Raw, clock.timer());
    let mut conn = pin!(conn);
    let mut sink = Pin::new(&mut tx);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(sink.as_mut().poll_ready(&mut cx).is_ready());
    sink.as_mut().start_send(msg("one")).unwrap();
    // Flush pending: the driver has not run. Target = 1.
    assert!(sink.as_mut().poll_flush(&mut cx).is_pending());
    // The driver writes "one".
    assert!(poll(conn.as_mut()).is_pending());
    let written_after_one = peer.written().len();
    // More is sent, the driver does not run again.
    assert!(sink.as_mut().poll_ready(&mut cx).is_ready());
    sink.as_mut().start_send(msg("two")).unwrap();
    let r = sink.as_mut().poll_flush(&mut cx);
    assert_eq!(peer.written().len(), written_after_one, "two not written");
    assert!(
        r.is_pending(),
        "poll_flush resolved ({r:?}) though 'two' was never written"
    );
}

/// The same through `send_all` with a stream that pauses.
#[test]
fn send_all_returns_only_once_its_last_item_is_written() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (io, peer) = Mock::new().build();
    let (mut tx, _rx, conn) = quiet().build_with_timer(io, Raw, clock.timer());
    let mut conn = Box::pin(conn);
    let (chan, mut items) = futures::channel::mpsc::unbounded::<Result<RawMessage, Error>>();
    chan.unbounded_send(Ok(msg("one"))).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    pool.spawner()
        .spawn_local(async move {
            tx.send_all(&mut items).await.unwrap();
            d.store(true, Ordering::SeqCst);
        })
        .unwrap();
    pool.run_until_stalled(); // start_send(one), stream pending, flush pending
    assert!(poll(conn.as_mut()).is_pending()); // "one" written and flushed
    let before = peer.written().len();
    chan.unbounded_send(Ok(msg("two"))).unwrap();
    drop(chan);
    pool.run_until_stalled(); // start_send(two), stream ends, poll_flush
    let done = done.load(Ordering::SeqCst);
    assert_eq!(peer.written().len(), before);
    assert!(!done, "send_all finished though 'two' is not on the wire");
}

/// A request refused as a duplicate is settled only once what was queued
/// before it is flushed, so it cannot resolve a flush early.
#[test]
fn a_refused_duplicate_request_does_not_resolve_an_earlier_flush() {
    let clock = ManualClock::new();
    let (a, _peer) = tokio::io::duplex(64); // the peer never reads
    let (tx, _rx, conn) = quiet().build_with_timer(a.compat(), Raw, clock.timer());
    let mut conn = pin!(conn);
    let req = || RawMessage::Request {
        id: 7,
        body: Bytes::from_static(b"q"),
    };
    let mut r1 = pin!(tx.request(req()));
    assert!(poll(r1.as_mut()).is_pending());
    assert!(poll(conn.as_mut()).is_pending()); // r1 written, outstanding
                                               // A message too large for the pipe's room: it stays unwritten.
    tx.try_send(RawMessage::Message(Bytes::from(vec![1u8; 4096])))
        .unwrap();
    let mut flush = pin!(tx.flush()); // target: r1 + the big message
    assert!(poll(flush.as_mut()).is_pending());
    let mut r2 = pin!(tx.request(req())); // same id: refused by the driver
    assert!(poll(r2.as_mut()).is_pending());
    assert!(poll(conn.as_mut()).is_pending());
    assert!(matches!(
        poll(r2.as_mut()),
        Poll::Ready(Err(Error::InvalidRequest(_)))
    ));
    let out = tx.stats().bytes_out;
    let r = poll(flush.as_mut());
    assert!(
        r.is_pending(),
        "flush resolved ({r:?}) with the 4 KiB message unwritten (bytes_out {out})"
    );
}

/// A protocol whose encoder panics on the message "boom".
#[derive(Debug)]
struct Panicky;
impl Protocol for Panicky {
    type Message = RawMessage;
    type RequestId = u64;
    type Error = <Raw as Protocol>::Error;
    fn encode(&self, m: &RawMessage, dst: &mut BytesMut) -> Result<Option<Bytes>, Self::Error> {
        if m == &msg("boom") {
            panic!("encoder bug");
        }
        Raw.encode(m, dst)
    }
    fn decode(&self, p: Bytes) -> Result<Option<RawMessage>, Self::Error> {
        Raw.decode(p)
    }
    fn kind(&self, m: &RawMessage) -> Kind<u64> {
        Raw.kind(m)
    }
}

/// A panic in the encoder under a permit frees the slot and wakes a sender
/// waiting for room.
#[test]
fn a_panicking_encoder_under_a_permit_wakes_whoever_waits_for_room() {
    let clock = ManualClock::new();
    let (io, _peer) = Mock::new().build();
    let (tx, _rx, conn) = quiet()
        .send_capacity(1)
        .build_with_timer(io, Panicky, clock.timer());
    let mut conn = pin!(conn);
    let permit = match poll(pin!(tx.reserve())) {
        Poll::Ready(Ok(p)) => p,
        _ => panic!("room"),
    };
    let flag = Arc::new(Flag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    let mut send = pin!(tx.send(msg("waiting")));
    assert!(send
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = permit.send(msg("boom"));
    }));
    assert!(panicked.is_err());
    for _ in 0..3 {
        assert!(poll(conn.as_mut()).is_pending());
    }
    assert_eq!(tx.stats().queued, 0, "the queue is empty");
    // try_send succeeds: there is room...
    // ...but the waiting send was never woken, and stays pending.
    let woken = flag.0.load(Ordering::SeqCst);
    let still = send
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending();
    assert!(woken && !still, "woken={woken}, still pending={still}");
}

/// A keepalive that cannot be encoded ends the connection with an error
/// that says the connection is gone.
#[test]
fn a_keepalive_that_cannot_be_encoded_ends_the_connection_with_a_fatal_error() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (io, _peer) = Mock::new().build();
    let (tx, _rx, conn) = Builder::new()
        .max_frame_len(0) // the 1-byte Raw keepalive does not fit
        .keepalive_interval(Some(Duration::from_secs(5)))
        .build_with_timer(io, Raw, clock.timer());
    let done = pool.spawner().spawn_local_with_handle(conn).unwrap();
    pool.run_until_stalled();
    clock.advance(Duration::from_secs(5));
    let end = pool.run_until(done);
    let reason = end.unwrap_err();
    let send_err = poll(pin!(tx.send(RawMessage::Keepalive))).map(|r| r.unwrap_err().error);
    assert!(tx.is_closed());
    assert!(
        reason.is_fatal(),
        "the connection ended with {reason:?}, is_fatal() = false; send now fails with {send_err:?}"
    );
}

/// `flush` resolves once its own messages are written, even while a
/// producer keeps the write queue from ever draining.
#[test]
fn flush_is_not_starved_by_a_write_queue_that_never_drains() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    // Every write takes at most 512 bytes and returns Pending once first,
    // as a socket whose buffer is full does.
    let (io, _peer) = Mock::new().pending_each_write().max_write(512).build();
    let (tx, _rx, conn) = quiet()
        .send_capacity(64)
        .build_with_timer(io, Raw, clock.timer());
    let s = pool.spawner();
    s.spawn_local(async {
        let _ = conn.await;
    })
    .unwrap();
    let out_at_flush = Arc::new(AtomicUsize::new(0));
    let total = 20_000usize;
    let tx2 = tx.clone();
    let o = out_at_flush.clone();
    s.spawn_local(async move {
        tx2.send(msg("first")).await.unwrap();
        tx2.flush().await.unwrap();
        o.store(tx2.stats().messages_out as usize, Ordering::SeqCst);
    })
    .unwrap();
    let tx3 = tx.clone();
    s.spawn_local(async move {
        for i in 0..total {
            tx3.send(msg(&format!("bulk {i:06}"))).await.unwrap();
        }
    })
    .unwrap();
    drop(tx);
    pool.run_until_stalled();
    let out = out_at_flush.load(Ordering::SeqCst);
    assert!(
        out < 1000,
        "the flush of the first message resolved only after {out} messages were written"
    );
}

/// A converted error wraps the chatpipe error; an I/O error comes back as
/// it was.
#[test]
fn io_errors_wrap_the_chatpipe_error_or_are_the_original() {
    let e: std::io::Error = Error::Closed.into();
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<Error>());
    assert!(matches!(inner, Some(Error::Closed)), "{e:?}");
    let original = std::io::Error::other("the original");
    let e: std::io::Error = Error::from(original).into();
    assert_eq!(e.to_string(), "the original");
    assert!(e
        .get_ref()
        .and_then(|i| i.downcast_ref::<Error>())
        .is_none());
}

/// A `Sink` whose `poll_ready` was left pending (its `send` future dropped
/// by a timeout, say) keeps a room listener; another task waiting in
/// `send` is still woken when room is made.
#[test]
fn a_sink_left_waiting_for_room_does_not_swallow_the_wakeup() {
    let clock = ManualClock::new();
    let (io, _peer) = Mock::new().build();
    let (mut tx_a, _rx, conn) = quiet()
        .send_capacity(1)
        .build_with_timer(io, Raw, clock.timer());
    let tx_b = tx_a.clone();
    let mut conn = pin!(conn);
    tx_a.try_send(msg("fills the queue")).unwrap();
    {
        // e.g. `timeout(d, sink.send(m))` that timed out: dropped while
        // poll_ready was pending.
        let mut send = Box::pin(SinkExt::send(&mut tx_a, msg("a")));
        assert!(poll(send.as_mut()).is_pending());
    }
    let flag = Arc::new(Flag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    let mut b = pin!(tx_b.send(msg("b")));
    assert!(b
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    assert!(poll(conn.as_mut()).is_pending()); // takes the queue: one slot free
    assert_eq!(tx_b.stats().queued, 0);
    let woken = flag.0.load(Ordering::SeqCst);
    assert!(
        woken,
        "B waits in send() with a free slot and was never woken"
    );
}

/// A stream whose reads stay pending (keeping the waker, for the test to
/// fire), counting them; writes take everything.
struct CountingReads {
    reads: Arc<AtomicUsize>,
    waker: Arc<std::sync::Mutex<Option<Waker>>>,
}

impl futures::io::AsyncRead for CountingReads {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        _buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl futures::io::AsyncWrite for CountingReads {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A read that returned `Pending` is tried again only once the stream
/// wakes the driver, not each time a send does (with a socket, each try is
/// a system call that fails again).
#[test]
fn a_pending_read_is_retried_only_when_the_stream_wakes() {
    let reads = Arc::new(AtomicUsize::new(0));
    let waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
    let io = CountingReads {
        reads: reads.clone(),
        waker: waker.clone(),
    };
    let clock = ManualClock::new();
    let (tx, _rx, conn) = quiet().build_with_timer(io, Raw, clock.timer());
    let mut pool = LocalPool::new();
    pool.spawner()
        .spawn_local(async { conn.await.unwrap() })
        .unwrap();
    pool.run_until_stalled();
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    for i in 0..10 {
        tx.try_send(msg(&format!("m{i}"))).unwrap();
        pool.run_until_stalled();
    }
    // Ten wake-ups by the sender, ten writes, no read.
    assert_eq!(tx.stats().messages_out, 10);
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    // The stream says it is readable: the driver reads again.
    waker.lock().unwrap().take().unwrap().wake();
    pool.run_until_stalled();
    assert_eq!(reads.load(Ordering::SeqCst), 2);
}
