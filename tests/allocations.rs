//! What a connection allocates per message, counted by a global allocator
//! that counts this thread's allocations. Everything runs on one thread
//! over scripted or in-memory streams and a clock that never moves, so the
//! counts are the same on every run; the benches measure the same on real
//! sockets (`cargo bench`, scenario 6).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::VecDeque;

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::test_util::{ManualClock, Mock};
use chatpipe::Builder;
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use futures::StreamExt;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: allocations while the thread's locals are torn down are
    // not counted.
    let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is forwarded to `System` unchanged; counting touches
// only a thread-local integer.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn the_counter_counts_this_threads_allocations() {
    let before = allocs();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert_eq!(allocs() - before, 1);
    drop(v);
}

/// No keepalives or timeouts to get in the way, on a clock that never moves.
fn quiet() -> Builder {
    Builder::new()
        .keepalive_interval(None)
        .frame_timeout(None)
        .write_timeout(None)
}

/// A raw message frame: length, type 0, `body`.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    f.push(0);
    f.extend_from_slice(body);
    f
}

/// A connection reading `script`, its driver spawned on the pool: the
/// sender (kept, so that the connection stays open), the incoming stream
/// and the pool.
fn reading(script: Mock) -> (chatpipe::Sender<Raw>, chatpipe::Incoming<Raw>, LocalPool) {
    let (io, _peer) = script.build();
    let clock = ManualClock::new();
    let (tx, rx, conn) = quiet().build_with_timer(io, Raw, clock.timer());
    let pool = LocalPool::new();
    pool.spawner()
        .spawn_local(async { drop(conn.await) })
        .unwrap();
    (tx, rx, pool)
}

#[test]
fn small_messages_read_one_at_a_time_reuse_the_read_buffers() {
    const WARM: usize = 100;
    const N: usize = 1000;
    let body = [7u8; 100];
    let mut script = Mock::new();
    for _ in 0..WARM + N {
        // Each frame on its own, as answers come one at a time: the driver
        // waits between them, and the application takes each as it comes.
        script = script.read(&frame(&body)).read_pending();
    }
    let (_tx, mut rx, mut pool) = reading(script);
    let want = RawMessage::Message(Bytes::copy_from_slice(&body));
    let counted = pool.run_until(async {
        // The application keeps the message it was given last, as a
        // request's caller holds its answer while the next one is read.
        let mut held = VecDeque::new();
        let mut before = 0;
        for i in 0..WARM + N {
            if i == WARM {
                before = allocs();
            }
            let m = rx.next().await.unwrap().unwrap();
            assert!(m == want);
            held.push_back(m);
            if held.len() > 1 {
                held.pop_front();
            }
        }
        allocs() - before
    });
    // A read buffer holds five of these frames before it is topped up.
    // Read into a new buffer each time one runs out (while its last
    // message is still held), they cost two allocations per buffer: 400
    // here. The two buffers taking turns cost none.
    assert!(counted <= 10, "{counted} allocations for {N} messages");
}

#[test]
fn a_stream_of_small_messages_keeps_its_batches_and_waits_without_allocating() {
    // Fan-in's load: reads of 64 KiB, each hundreds of messages, faster
    // than the application takes them, so that the driver waits for room.
    const READS: usize = 200;
    const PER_READ: usize = 600;
    const WARM: usize = 40 * PER_READ;
    const N: usize = READS * PER_READ - WARM;
    let body = [7u8; 100];
    let chunk: Vec<u8> = (0..PER_READ).flat_map(|_| frame(&body)).collect();
    let mut script = Mock::new();
    for _ in 0..READS {
        script = script.read(&chunk);
    }
    let (_tx, mut rx, mut pool) = reading(script);
    let counted = pool.run_until(async {
        let mut before = 0;
        for i in 0..WARM + N {
            if i == WARM {
                before = allocs();
            }
            let m = rx.next().await.unwrap().unwrap();
            assert!(matches!(&m, RawMessage::Message(b) if b.len() == body.len()));
        }
        allocs() - before
    });
    // Reading goes on into a new buffer whenever one runs out while its
    // messages wait (two allocations: the buffer, and its shared count
    // once split). With, besides, an allocated listener whenever the
    // application's queue is full, and the batches between driver and
    // application grown anew each round, this cost 1,238 allocations.
    let reads = (N / PER_READ) as u64;
    assert!(
        counted <= 2 * reads,
        "{counted} allocations for {N} messages"
    );
}

#[test]
fn a_request_round_trip_allocates_nothing_once_warm() {
    use chatpipe::Sender;
    use futures::StreamExt as _;
    use tokio_util::compat::TokioAsyncReadCompatExt;
    const WARM: u64 = 100;
    const N: u64 = 1000;
    let (a, b) = tokio::io::duplex(64 * 1024);
    let clock = ManualClock::new();
    let (client, _crx, cconn) = quiet().build_with_timer(a.compat(), Raw, clock.timer());
    let (server, mut srx, sconn) = quiet().build_with_timer(b.compat(), Raw, clock.timer());
    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    spawner.spawn_local(async { drop(cconn.await) }).unwrap();
    spawner.spawn_local(async { drop(sconn.await) }).unwrap();
    // The server answers each request with its body.
    let echo = |server: Sender<Raw>| async move {
        while let Some(Ok(RawMessage::Request { id, body })) = srx.next().await {
            let _ = server.send(RawMessage::Response { id, body }).await;
        }
    };
    spawner.spawn_local(echo(server)).unwrap();
    let body = Bytes::from_static(&[7u8; 64]);
    let counted = pool.run_until(async {
        let mut before = 0;
        for id in 0..WARM + N {
            if id == WARM {
                before = allocs();
            }
            let req = RawMessage::Request {
                id,
                body: body.clone(),
            };
            let res = client.request(req).await.unwrap();
            assert!(matches!(res, RawMessage::Response { id: got, .. } if got == id));
        }
        allocs() - before
    });
    // Both ends and both drivers run on this thread. A reply slot per
    // request (a one-shot channel) would be 1,000 here on its own.
    assert!(counted <= 20, "{counted} allocations for {N} round trips");
}
