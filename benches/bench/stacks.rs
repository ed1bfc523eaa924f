//! The stacks compared: loopback sockets and runtime threads shared by every
//! scenario, then raw `std::net` sockets, tokio-util `Framed`, and chatpipe
//! (on smol, and on tokio through `Builder::build_tokio`), with their oneway runs.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::{Arc, Barrier};
use std::task::{Poll, Waker};
use std::thread;
use std::time::Instant;

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::{Builder, TrySendError};
use futures::{SinkExt, StreamExt};
use smol::LocalExecutor;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// chatpipe's default maximum frame is 64 KiB, and a 64 KiB body plus the
/// Raw protocol's tag byte is one byte over; a user sending 64 KiB
/// messages raises it, and so does the bench (for every stack alike).
const MAX_FRAME: usize = 1 << 20;

/// A connected loopback pair, Nagle off on both ends (every stack alike).
pub(crate) fn tcp_pair() -> (TcpStream, TcpStream) {
    pair_through(&loopback_listener())
}

fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1")
}

fn pair_through(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let a = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (b, _) = listener.accept().expect("accept");
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

pub(crate) fn payload(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| i as u8).collect::<Vec<u8>>())
}

pub(crate) fn chatpipe_builder() -> Builder {
    Builder::new().max_frame_len(MAX_FRAME)
}

pub(crate) fn smol_stream(s: TcpStream) -> smol::net::TcpStream {
    smol::net::TcpStream::try_from(s).expect("register with async-io")
}

pub(crate) fn tokio_framed(s: TcpStream) -> Framed<tokio::net::TcpStream, LengthDelimitedCodec> {
    s.set_nonblocking(true).unwrap();
    let s = tokio::net::TcpStream::from_std(s).expect("register with tokio");
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec();
    Framed::new(s, codec)
}

/// Runs `f` on a new thread inside its own smol `LocalExecutor`.
pub(crate) fn smol_thread<T, F, Fut>(f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce(Rc<LocalExecutor<'static>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    thread::spawn(move || {
        let ex = Rc::new(LocalExecutor::new());
        smol::block_on(ex.run(f(ex.clone())))
    })
}

/// Runs `f` on a new thread inside its own tokio current-thread runtime.
pub(crate) fn tokio_thread<T, F, Fut>(f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f())
    })
}

/// As `smol_thread`, with `f` a spawned task, as a server's code for a
/// connection runs. The future `block_on` drives itself is special: every
/// wake of it from a task is a turn of async-io's reactor (epoll_pwait,
/// timerfd_settime, eventfd; strace), which a task woken by a task does not
/// take. The request/response scenarios, where each message hops between
/// the application and a connection's driver, run every stack this way.
pub(crate) fn smol_task_thread<T, F, Fut>(f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce(Rc<LocalExecutor<'static>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: 'static,
{
    thread::spawn(move || {
        let ex = Rc::new(LocalExecutor::new());
        let task = ex.spawn(f(ex.clone()));
        smol::block_on(ex.run(task))
    })
}

/// Runs `f` on a new thread inside a tokio current-thread runtime and a
/// `LocalSet`, so that it may `spawn_local` tasks that are not `Send` (the
/// handoff floor's).
pub(crate) fn tokio_local_thread<T, F, Fut>(f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            tokio::task::spawn_local(f()).await.expect("task panicked")
        })
    })
}

/// As `tokio_thread`, with `f` a spawned task (see `smol_task_thread`:
/// on tokio each wake of the `block_on` future costs an epoll_wait).
pub(crate) fn tokio_task_thread<T, F, Fut>(f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async { tokio::spawn(f()).await.expect("task panicked") })
    })
}

/// `conns` connected loopback pairs through one listener, so that each
/// takes one ephemeral port, not two: 10,000 idle pairs after a run that
/// left as many in TIME_WAIT would otherwise run out of them.
pub(crate) fn fanin_pairs(conns: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let listener = loopback_listener();
    (0..conns).map(|_| pair_through(&listener)).unzip()
}

// ---------------------------------------------------------------------------
// Raw std::net stack
// ---------------------------------------------------------------------------

/// Pre-encoded frames of `size`-byte payloads, about 512 KiB of them (at
/// least one frame).
fn encoded_block(size: usize) -> (Vec<u8>, usize) {
    let frame = 4 + size;
    let per_block = (512 * 1024 / frame).max(1);
    let body = payload(size);
    let mut block = Vec::with_capacity(per_block * frame);
    for _ in 0..per_block {
        block.extend_from_slice(&(size as u32).to_be_bytes());
        block.extend_from_slice(&body);
    }
    (block, per_block)
}

fn raw_write_frames(s: &mut TcpStream, block: &[u8], per_block: usize, size: usize, n: u64) {
    let frame = 4 + size;
    let per_block = per_block as u64;
    for _ in 0..n / per_block {
        s.write_all(block).expect("raw write");
    }
    let rest = (n % per_block) as usize;
    s.write_all(&block[..rest * frame]).expect("raw write");
}

/// Reads until `expect` frames have arrived, walking the length prefixes
/// in a 64 KiB buffer; payloads are skipped, never copied. Returns the
/// payload bytes seen.
pub(crate) fn raw_read_frames(s: &mut TcpStream, expect: u64) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut have, mut skip, mut msgs, mut bytes) = (0usize, 0usize, 0u64, 0u64);
    while msgs < expect {
        let n = s.read(&mut buf[have..]).expect("raw read");
        assert!(n > 0, "raw reader: early EOF after {msgs} of {expect}");
        let end = have + n;
        let mut pos = 0;
        loop {
            if skip > 0 {
                let k = skip.min(end - pos);
                pos += k;
                skip -= k;
                if skip > 0 {
                    break;
                }
                msgs += 1;
            }
            if end - pos < 4 {
                break;
            }
            let len = u32::from_be_bytes(buf[pos..pos + 4].try_into().unwrap()) as usize;
            pos += 4;
            bytes += len as u64;
            if len == 0 {
                msgs += 1;
            } else {
                skip = len;
            }
        }
        buf.copy_within(pos..end, 0);
        have = end - pos;
    }
    bytes
}

/// Reads exactly one frame into `buf` (request/response: nothing follows it
/// until it is answered). `None` at EOF.
pub(crate) fn raw_read_one(s: &mut TcpStream, buf: &mut [u8]) -> Option<usize> {
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..]).expect("raw read");
        if n == 0 {
            return None;
        }
        have += n;
        if have >= 4 {
            let len = 4 + u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if have >= len {
                assert_eq!(have, len, "ping-pong: more than one frame");
                return Some(len);
            }
        }
    }
}

pub(crate) fn oneway_raw(size: usize, n: u64) -> f64 {
    let (mut a, mut b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let writer = thread::spawn(move || {
        let (block, per_block) = encoded_block(size);
        go2.wait();
        raw_write_frames(&mut a, &block, per_block, size, n);
        let _ = a.shutdown(Shutdown::Write);
    });
    go.wait();
    let t0 = Instant::now();
    let bytes = raw_read_frames(&mut b, n);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(bytes, n * size as u64);
    writer.join().unwrap();
    secs
}

// ---------------------------------------------------------------------------
// tokio-util stack
// ---------------------------------------------------------------------------

pub(crate) fn oneway_tokio(size: usize, n: u64, flush_each: bool) -> f64 {
    let (a, b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let body = payload(size);
    let sender = tokio_thread(move || async move {
        let mut f = tokio_framed(a);
        go2.wait();
        if flush_each {
            for _ in 0..n {
                f.send(body.clone()).await.unwrap();
            }
        } else {
            for _ in 0..n {
                f.feed(body.clone()).await.unwrap();
            }
            SinkExt::<Bytes>::flush(&mut f).await.unwrap();
        }
        SinkExt::<Bytes>::close(&mut f).await.unwrap();
    });
    let receiver = tokio_thread(move || async move {
        let mut f = tokio_framed(b);
        go.wait();
        let t0 = Instant::now();
        let mut bytes = 0u64;
        for _ in 0..n {
            bytes += f.next().await.unwrap().unwrap().len() as u64;
        }
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(bytes, n * size as u64);
        while f.next().await.is_some() {}
        secs
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

// ---------------------------------------------------------------------------
// chatpipe stack
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum CpSend {
    Send,
    TrySend,
}

/// The chatpipe receiving side: counts `n` messages, returns the seconds
/// from the barrier to the last one and the payload bytes, then lets the
/// connection close.
async fn chatpipe_receive(ex: &LocalExecutor<'static>, s: TcpStream, n: u64, go: &Barrier) -> f64 {
    let (tx, mut incoming, conn) = chatpipe_builder().build(smol_stream(s), Raw);
    let driver = ex.spawn(conn);
    go.wait();
    let t0 = Instant::now();
    let mut bytes = 0u64;
    for _ in 0..n {
        match incoming.next().await {
            Some(Ok(RawMessage::Message(b))) => bytes += b.len() as u64,
            other => panic!("chatpipe receiver: unexpected {other:?}"),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    while incoming.next().await.is_some() {}
    drop(tx);
    driver.await.expect("receiver driver");
    std::hint::black_box(bytes);
    secs
}

pub(crate) fn oneway_chatpipe(size: usize, n: u64, mode: CpSend) -> f64 {
    let (a, b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let body = payload(size);
    let sender = smol_thread(move |ex| async move {
        let (tx, _incoming, conn) = chatpipe_builder().build(smol_stream(a), Raw);
        let driver = ex.spawn(conn);
        go2.wait();
        match mode {
            CpSend::Send => {
                for _ in 0..n {
                    tx.send(RawMessage::Message(body.clone())).await.unwrap();
                }
            }
            CpSend::TrySend => {
                for _ in 0..n {
                    let mut msg = RawMessage::Message(body.clone());
                    loop {
                        match tx.try_send(msg) {
                            Ok(()) => break,
                            Err(TrySendError::Full(m)) => {
                                msg = m;
                                smol::future::yield_now().await;
                            }
                            Err(e) => panic!("try_send: {e}"),
                        }
                    }
                }
            }
        }
        tx.close();
        driver.await.expect("sender driver");
    });
    let receiver = smol_thread(move |ex| async move { chatpipe_receive(&ex, b, n, &go).await });
    sender.join().unwrap();
    receiver.join().unwrap()
}

// ---------------------------------------------------------------------------
// chatpipe on tokio
// ---------------------------------------------------------------------------

/// A std socket registered with tokio, for `Builder::build_tokio`.
pub(crate) fn tokio_stream(s: TcpStream) -> tokio::net::TcpStream {
    s.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(s).expect("register with tokio")
}

/// chatpipe on tokio (`Builder::build_tokio`, one current-thread runtime
/// per side): the same `send().await` loop and receiver as on smol.
pub(crate) fn oneway_chatpipe_tokio(size: usize, n: u64) -> f64 {
    let (a, b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let body = payload(size);
    let sender = tokio_thread(move || async move {
        let (tx, _incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(a), Raw);
        let driver = tokio::spawn(conn);
        go2.wait();
        for _ in 0..n {
            tx.send(RawMessage::Message(body.clone())).await.unwrap();
        }
        tx.close();
        driver.await.expect("join").expect("sender driver");
    });
    let receiver = tokio_thread(move || async move {
        let (tx, mut incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(b), Raw);
        let driver = tokio::spawn(conn);
        go.wait();
        let t0 = Instant::now();
        let mut bytes = 0u64;
        for _ in 0..n {
            match incoming.next().await {
                Some(Ok(RawMessage::Message(b))) => bytes += b.len() as u64,
                other => panic!("chatpipe receiver: unexpected {other:?}"),
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        while incoming.next().await.is_some() {}
        drop(tx);
        let _ = driver.await;
        std::hint::black_box(bytes);
        secs
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

// ---------------------------------------------------------------------------
// asynchronous-codec on smol
// ---------------------------------------------------------------------------

/// The 4-byte big-endian length prefix for asynchronous-codec (its own
/// `LengthCodec` writes 8 bytes): what tokio-util's `LengthDelimitedCodec`
/// does, including reserving a whole frame once its header is in.
pub(crate) struct Len4;

impl asynchronous_codec::Encoder for Len4 {
    type Item<'a> = Bytes;
    type Error = std::io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut bytes::BytesMut) -> std::io::Result<()> {
        dst.reserve(4 + item.len());
        dst.extend_from_slice(&(item.len() as u32).to_be_bytes());
        dst.extend_from_slice(&item);
        Ok(())
    }
}

impl asynchronous_codec::Decoder for Len4 {
    type Item = bytes::BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> std::io::Result<Option<bytes::BytesMut>> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(src[..4].try_into().unwrap()) as usize;
        if len > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "frame too large",
            ));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        let _ = src.split_to(4);
        Ok(Some(src.split_to(len)))
    }
}

pub(crate) type AcFramed = asynchronous_codec::Framed<smol::net::TcpStream, Len4>;

pub(crate) fn ac_framed(s: TcpStream) -> AcFramed {
    asynchronous_codec::Framed::new(smol_stream(s), Len4)
}

/// asynchronous-codec on smol: `feed` every message then one `flush`, or
/// `send` (feed + flush) per message; the receiver takes `next()`.
pub(crate) fn oneway_ac(size: usize, n: u64, flush_each: bool) -> f64 {
    let (a, b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let body = payload(size);
    let sender = smol_thread(move |_ex| async move {
        let mut f = ac_framed(a);
        go2.wait();
        if flush_each {
            for _ in 0..n {
                f.send(body.clone()).await.unwrap();
            }
        } else {
            for _ in 0..n {
                f.feed(body.clone()).await.unwrap();
            }
            f.flush().await.unwrap();
        }
        f.close().await.unwrap();
    });
    let receiver = smol_thread(move |_ex| async move {
        let mut f = ac_framed(b);
        go.wait();
        let t0 = Instant::now();
        let mut bytes = 0u64;
        for _ in 0..n {
            bytes += f.next().await.unwrap().unwrap().len() as u64;
        }
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(bytes, n * size as u64);
        while f.next().await.is_some() {}
        secs
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

/// The handoff floor: what a message costs when, as in chatpipe, a task of
/// its own owns each end's socket (so it reads while the application is
/// busy) and hands messages to and from the application's task over a
/// bounded queue. Everything else is the least there is: the runtime's
/// best framed codec (asynchronous-codec on smol, tokio-util on tokio; `feed`
/// a batch, one `flush`), both tasks on one single-threaded executor per
/// side, and the queue a `RefCell` with two wakers: no lock, no `Arc`, no
/// protocol. A design with a driver task cannot hand over for less, so
/// chatpipe's distance to `feed` splits into this floor's (the design) and
/// its own above the floor (the code).
pub(crate) fn oneway_handoff_floor(size: usize, n: u64) -> f64 {
    let (a, b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let body = payload(size);
    let sender = smol_thread(move |ex| async move {
        let q = Handoff::new(HANDOFF_CAPACITY);
        let writer = ex.spawn(write_from(q.clone(), ac_framed(a)));
        go2.wait();
        produce(&q, body, n).await;
        writer.await;
    });
    let receiver = smol_thread(move |ex| async move {
        let q = Handoff::new(HANDOFF_CAPACITY);
        let reader = ex.spawn(read_into(q.clone(), ac_framed(b)));
        go.wait();
        let secs = consume(&q, n, size).await;
        reader.await;
        secs
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

/// [`oneway_handoff_floor`] on tokio: tokio-util's `Framed`, the tasks
/// `spawn_local`ed on each side's current-thread runtime.
pub(crate) fn oneway_handoff_floor_tokio(size: usize, n: u64) -> f64 {
    let (a, b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let body = payload(size);
    let sender = tokio_thread(move || async move {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let q = Handoff::new(HANDOFF_CAPACITY);
                let writer = tokio::task::spawn_local(write_from(q.clone(), tokio_framed(a)));
                go2.wait();
                produce(&q, body, n).await;
                writer.await.unwrap();
            })
            .await
    });
    let receiver = tokio_thread(move || async move {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let q = Handoff::new(HANDOFF_CAPACITY);
                let reader = tokio::task::spawn_local(read_into(q.clone(), tokio_framed(b)));
                go.wait();
                let secs = consume(&q, n, size).await;
                reader.await.unwrap();
                secs
            })
            .await
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

/// The application's side of sending: `n` messages into the queue.
pub(crate) async fn produce(q: &Handoff<Bytes>, body: Bytes, n: u64) {
    for _ in 0..n {
        q.push(body.clone()).await;
    }
    q.close();
}

/// The task that owns the socket's sending side: whatever is queued, fed
/// then flushed as one batch.
pub(crate) async fn write_from<S>(q: Handoff<Bytes>, mut sink: S)
where
    S: futures::Sink<Bytes> + Unpin,
    S::Error: std::fmt::Debug,
{
    let mut batch = VecDeque::new();
    while q.take_all(&mut batch).await {
        for m in batch.drain(..) {
            sink.feed(m).await.unwrap();
        }
        sink.flush().await.unwrap();
    }
    sink.close().await.unwrap();
}

/// The task that owns the socket's receiving side: every frame into the
/// queue, waiting for room.
pub(crate) async fn read_into<S, B, E>(q: Handoff<B>, mut stream: S)
where
    S: futures::Stream<Item = Result<B, E>> + Unpin,
    E: std::fmt::Debug,
{
    while let Some(m) = stream.next().await {
        q.push(m.unwrap()).await;
    }
    q.close();
}

/// The application's side of receiving: takes `n` messages of `size`
/// bytes, timed, then drains the rest.
pub(crate) async fn consume<B: AsRef<[u8]>>(q: &Handoff<B>, n: u64, size: usize) -> f64 {
    let t0 = Instant::now();
    let (mut got, mut bytes) = (0u64, 0u64);
    let mut batch = VecDeque::new();
    while got < n && q.take_all(&mut batch).await {
        for m in batch.drain(..) {
            got += 1;
            bytes += m.as_ref().len() as u64;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(bytes, n * size as u64);
    while q.take_all(&mut batch).await {
        batch.clear();
    }
    secs
}

/// One end of the handoff floor's connection both ways (rtt, pipelined):
/// a task that reads the socket into the application's queue `inq`, and
/// one that writes what the application queues on `out`, over
/// asynchronous-codec. Two tasks, one a direction, as chatpipe's driver
/// reads while the application is busy; per round trip each is polled
/// once, as the driver is polled once to read and once to write.
pub(crate) struct HandoffEnd {
    pub(crate) out: Handoff<Bytes>,
    pub(crate) inq: Handoff<bytes::BytesMut>,
    /// The two tasks' ends, on either runtime.
    tasks: [std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>; 2],
}

impl HandoffEnd {
    pub(crate) fn smol(ex: &LocalExecutor<'static>, s: TcpStream) -> Self {
        let s = smol_stream(s);
        let (out, inq) = (
            Handoff::new(HANDOFF_CAPACITY),
            Handoff::new(HANDOFF_CAPACITY),
        );
        let read = asynchronous_codec::FramedRead::new(s.clone(), Len4);
        let write = asynchronous_codec::FramedWrite::new(s, Len4);
        let tasks: [std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>; 2] = [
            Box::pin(ex.spawn(read_into(inq.clone(), read))),
            Box::pin(ex.spawn(write_from(out.clone(), write))),
        ];
        HandoffEnd { out, inq, tasks }
    }

    /// [`HandoffEnd::smol`] on tokio: tokio-util's length-delimited codec,
    /// the tasks `spawn_local`ed (call it inside a `LocalSet`, as
    /// [`tokio_local_thread`] runs its future).
    pub(crate) fn tokio(s: TcpStream) -> Self {
        s.set_nonblocking(true).unwrap();
        let s = tokio::net::TcpStream::from_std(s).expect("register with tokio");
        let (r, w) = s.into_split();
        let codec = || {
            LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .new_codec()
        };
        let read = tokio_util::codec::FramedRead::new(r, codec());
        let write = tokio_util::codec::FramedWrite::new(w, codec());
        let (out, inq) = (
            Handoff::new(HANDOFF_CAPACITY),
            Handoff::new(HANDOFF_CAPACITY),
        );
        let reader = tokio::task::spawn_local(read_into(inq.clone(), read));
        let writer = tokio::task::spawn_local(write_from(out.clone(), write));
        let tasks: [std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>; 2] = [
            Box::pin(async { reader.await.expect("floor reader") }),
            Box::pin(async { writer.await.expect("floor writer") }),
        ];
        HandoffEnd { out, inq, tasks }
    }

    /// Closes the sending side (the peer reads the end) and waits for the
    /// peer to close its own.
    pub(crate) async fn close(self) {
        self.out.close();
        for t in self.tasks {
            t.await;
        }
    }

    /// The server of the floor's rtt and pipelined runs: every frame back
    /// as it came, until the client closes.
    pub(crate) async fn echo(self) {
        let mut batch = VecDeque::new();
        while self.inq.take_all(&mut batch).await {
            for m in batch.drain(..) {
                self.out.push(m.freeze()).await;
            }
        }
        self.close().await;
    }
}

/// chatpipe's default queue capacity, each way.
pub(crate) const HANDOFF_CAPACITY: usize = 1024;

/// A bounded queue between two tasks of one thread: one producer, one
/// consumer that takes everything waiting at once.
pub(crate) struct Handoff<T>(Rc<RefCell<HandoffState<T>>>);

struct HandoffState<T> {
    items: VecDeque<T>,
    capacity: usize,
    closed: bool,
    producer: Option<Waker>,
    consumer: Option<Waker>,
}

impl<T> Clone for Handoff<T> {
    fn clone(&self) -> Self {
        Handoff(self.0.clone())
    }
}

impl<T> Handoff<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Handoff(Rc::new(RefCell::new(HandoffState {
            items: VecDeque::new(),
            capacity,
            closed: false,
            producer: None,
            consumer: None,
        })))
    }

    pub(crate) async fn push(&self, item: T) {
        poll_fn(|cx| {
            let mut s = self.0.borrow_mut();
            if s.items.len() < s.capacity {
                return Poll::Ready(());
            }
            s.producer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let mut s = self.0.borrow_mut();
        s.items.push_back(item);
        if let Some(w) = s.consumer.take() {
            w.wake();
        }
    }

    /// Queues `item` whatever the capacity: for several producers (the
    /// fan-out floor), which `push`'s one waiting producer cannot serve.
    pub(crate) fn push_now(&self, item: T) {
        let mut s = self.0.borrow_mut();
        s.items.push_back(item);
        if let Some(w) = s.consumer.take() {
            w.wake();
        }
    }

    /// Moves everything waiting into `out` (empty); false once closed and
    /// drained.
    pub(crate) async fn take_all(&self, out: &mut VecDeque<T>) -> bool {
        poll_fn(|cx| {
            let mut s = self.0.borrow_mut();
            if s.items.is_empty() {
                if s.closed {
                    return Poll::Ready(false);
                }
                s.consumer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            std::mem::swap(&mut s.items, out);
            if let Some(w) = s.producer.take() {
                w.wake();
            }
            Poll::Ready(true)
        })
        .await
    }

    pub(crate) fn close(&self) {
        let mut s = self.0.borrow_mut();
        s.closed = true;
        if let Some(w) = s.consumer.take() {
            w.wake();
        }
    }
}
