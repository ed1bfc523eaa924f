//! Scenario 2b: pipelined requests, a window of 64 in flight on one
//! connection, and tarpc (the RPC peer, also in rtt).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::rc::Rc;
use std::sync::Mutex;
use std::task::{Poll, Waker};
use std::thread;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use chatpipe::raw::Raw;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tarpc::server::Channel as _;
use tarpc::tokio_serde::formats::Bincode;

use crate::harness::{allowed_cpus, calibrated, pin_this_thread, set_process_affinity, stats};
use crate::report::{ratio, si, Report};
use crate::scenarios::rtt::{chatpipe_echo, timed_trips};
use crate::stacks::{
    chatpipe_builder, payload, smol_stream, smol_task_thread, tcp_pair, tokio_framed,
    tokio_local_thread, tokio_stream, tokio_task_thread, HandoffEnd,
};
use crate::Cfg;

pub(crate) const WINDOW: usize = 64;
pub(crate) const PIPE_SIZE: usize = 64;

/// The floors before chatpipe, whose rows compare with them.
const PIPELINED_STACKS: [&str; 8] = [
    "raw one-thread client",
    "tarpc",
    "handoff floor",
    "handoff floor (tokio)",
    "calls floor",
    "calls floor (tokio)",
    "chatpipe call()",
    "chatpipe call() on tokio",
];

// ---------------------------------------------------------------------------
// placement: where the client's and the server's threads run
// ---------------------------------------------------------------------------

/// With every pair of threads taking turns, the rate here is set by how
/// each wakes the other: across CPUs (an inter-processor interrupt, dear
/// in a VM) or on one. Left free, the scheduler mixes the two from run to
/// run; the scenario also runs each placement pinned.
#[derive(Clone, Copy, PartialEq)]
enum Placement {
    Free,
    /// Every thread of the process on one CPU.
    OneCpu,
    /// The client's thread on one CPU, the server's on another.
    CpuEach,
}

impl Placement {
    const ALL: [Placement; 3] = [Placement::Free, Placement::OneCpu, Placement::CpuEach];

    fn name(self) -> &'static str {
        match self {
            Placement::Free => "free",
            Placement::OneCpu => "one CPU",
            Placement::CpuEach => "a CPU each",
        }
    }
}

enum Side {
    Client,
    Server,
}

/// The CPUs of the client's and the server's threads while the scenario
/// runs `Placement::CpuEach`.
static CPU_EACH: Mutex<Option<[usize; 2]>> = Mutex::new(None);

/// Pins the calling thread as the current placement says.
fn place(side: Side) {
    let cpus = *CPU_EACH.lock().unwrap();
    if let Some(cpus) = cpus {
        pin_this_thread(cpus[side as usize]);
    }
}

// ---------------------------------------------------------------------------
// tarpc
// ---------------------------------------------------------------------------

/// tarpc's request and response: bytes, echoed.
#[derive(tarpc::serde::Serialize, tarpc::serde::Deserialize)]
#[serde(crate = "tarpc::serde")]
pub(crate) struct Echo(Vec<u8>);

impl tarpc::RequestName for Echo {
    fn name(&self) -> &str {
        "echo"
    }
}

type TarpcClient = tarpc::client::Channel<Echo, Echo>;

/// A tarpc echo server on its own tokio thread, serving `s` until the
/// client goes.
fn tarpc_server(s: TcpStream) -> thread::JoinHandle<()> {
    tokio_task_thread(move || async move {
        place(Side::Server);
        let transport = tarpc::serde_transport::new(tokio_framed(s), Bincode::default());
        tarpc::server::BaseChannel::with_defaults(transport)
            .execute(tarpc::server::serve(|_, req: Echo| async move { Ok(req) }))
            .for_each(|response| async move {
                tokio::spawn(response);
            })
            .await;
    })
}

fn tarpc_client(s: TcpStream) -> TarpcClient {
    let transport = tarpc::serde_transport::new(tokio_framed(s), Bincode::default());
    tarpc::client::new(tarpc::client::Config::default(), transport).spawn()
}

/// Sequential tarpc calls: round-trip times in nanoseconds.
pub(crate) fn rtt_tarpc(n: usize, warm: usize, size: usize) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = tarpc_server(b);
    let client = tokio_task_thread(move || async move {
        let client = tarpc_client(a);
        let body = payload(size).to_vec();
        timed_trips(n, warm, (), |(), _| {
            let call = client.call(tarpc::context::current(), Echo(body.clone()));
            async move {
                call.await.expect("tarpc call");
            }
        })
        .await
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

fn pipelined_tarpc(n: u64) -> f64 {
    let (a, b) = tcp_pair();
    let server = tarpc_server(b);
    let client = tokio_task_thread(move || async move {
        place(Side::Client);
        let client = tarpc_client(a);
        let body = payload(PIPE_SIZE).to_vec();
        let call = || client.call(tarpc::context::current(), Echo(body.clone()));
        let t0 = Instant::now();
        let mut inflight = FuturesUnordered::new();
        let mut sent = 0;
        while sent < n.min(WINDOW as u64) {
            inflight.push(call());
            sent += 1;
        }
        while let Some(r) = inflight.next().await {
            r.expect("tarpc call");
            if sent < n {
                inflight.push(call());
                sent += 1;
            }
        }
        t0.elapsed().as_secs_f64()
    });
    let secs = client.join().unwrap();
    server.join().unwrap();
    secs
}

// ---------------------------------------------------------------------------
// raw: one client thread, a window of frames
// ---------------------------------------------------------------------------

/// Echoes whole frames back as they arrive, every frame in a read in one
/// write.
fn raw_echo_server(mut s: TcpStream) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        place(Side::Server);
        let mut buf = vec![0u8; 64 * 1024];
        let mut have = 0;
        loop {
            let n = match s.read(&mut buf[have..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            have += n;
            let mut pos = 0;
            while have - pos >= 4 {
                let len = 4 + u32::from_be_bytes(buf[pos..pos + 4].try_into().unwrap()) as usize;
                if have - pos < len {
                    break;
                }
                pos += len;
            }
            if s.write_all(&buf[..pos]).is_err() {
                return;
            }
            buf.copy_within(pos..have, 0);
            have -= pos;
        }
    })
}

/// The limit: one thread writes as many requests as the window allows in
/// one write, then reads what has come back, and again.
fn pipelined_raw(n: u64) -> f64 {
    let (mut a, b) = tcp_pair();
    let server = raw_echo_server(b);
    // The calling thread: the scenario gives it back every CPU afterwards.
    place(Side::Client);
    let mut frame = (PIPE_SIZE as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload(PIPE_SIZE));
    let window: Vec<u8> = frame.repeat(WINDOW);
    let flen = frame.len();
    let mut buf = vec![0u8; 64 * 1024];
    let t0 = Instant::now();
    let (mut sent, mut done, mut have) = (0u64, 0u64, 0usize);
    while done < n {
        let room = (WINDOW as u64 - (sent - done)).min(n - sent) as usize;
        if room > 0 {
            a.write_all(&window[..room * flen]).expect("raw write");
            sent += room as u64;
        }
        let k = a.read(&mut buf[have..]).expect("raw read");
        assert!(k > 0, "raw pipelined: early EOF");
        have += k;
        // Every frame is the same length: count whole ones.
        let whole = have / flen;
        done += whole as u64;
        buf.copy_within(whole * flen..have, 0);
        have -= whole * flen;
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(a);
    server.join().unwrap();
    secs
}

// ---------------------------------------------------------------------------
// chatpipe: `call()`s kept 64 in flight from one task
// ---------------------------------------------------------------------------

async fn window_of_calls(tx: &chatpipe::Sender<Raw>, n: u64) -> f64 {
    let body = payload(PIPE_SIZE);
    window(
        n,
        || tx.call(body.clone()),
        |r: Result<Bytes, _>| {
            std::hint::black_box(r.expect("call"));
        },
    )
    .await
}

/// `n` calls from one task, [`WINDOW`] of them in flight in a
/// `FuturesUnordered`, each answer checked as it comes: timed.
async fn window<F: Future>(n: u64, call: impl Fn() -> F, check: impl Fn(F::Output)) -> f64 {
    let t0 = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut sent = 0;
    while sent < n.min(WINDOW as u64) {
        inflight.push(call());
        sent += 1;
    }
    while let Some(r) = inflight.next().await {
        check(r);
        if sent < n {
            inflight.push(call());
            sent += 1;
        }
    }
    t0.elapsed().as_secs_f64()
}

fn pipelined_chatpipe(n: u64) -> f64 {
    let (a, b) = tcp_pair();
    let server = smol_task_thread(move |ex| async move {
        place(Side::Server);
        let (tx, incoming, conn) = chatpipe_builder().build(smol_stream(b), Raw);
        let driver = ex.spawn(conn);
        drop(chatpipe_echo(tx, incoming).await);
        let _ = driver.await;
    });
    let client = smol_task_thread(move |ex| async move {
        place(Side::Client);
        let (tx, _incoming, conn) = chatpipe_builder().build(smol_stream(a), Raw);
        let driver = ex.spawn(conn);
        let secs = window_of_calls(&tx, n).await;
        tx.close();
        driver.await.expect("client driver");
        secs
    });
    let secs = client.join().unwrap();
    server.join().unwrap();
    secs
}

fn pipelined_chatpipe_tokio(n: u64) -> f64 {
    let (a, b) = tcp_pair();
    let server = tokio_task_thread(move || async move {
        place(Side::Server);
        let (tx, incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(b), Raw);
        let driver = tokio::spawn(conn);
        drop(chatpipe_echo(tx, incoming).await);
        let _ = driver.await;
    });
    let client = tokio_task_thread(move || async move {
        place(Side::Client);
        let (tx, _incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(a), Raw);
        let driver = tokio::spawn(conn);
        let secs = window_of_calls(&tx, n).await;
        tx.close();
        driver.await.expect("join").expect("client driver");
        secs
    });
    let secs = client.join().unwrap();
    server.join().unwrap();
    secs
}

/// The handoff floor (see `rtt::rtt_handoff_floor`) with a window of
/// requests in flight: the application's task keeps `WINDOW` in the
/// queue to the socket's task and takes the answers as they come. No
/// request ids and no table: what the driver-task design costs at least.
fn pipelined_handoff_floor(n: u64) -> f64 {
    floor_run(n, false, floor_pipeline)
}

/// [`pipelined_handoff_floor`] on tokio.
fn pipelined_handoff_floor_tokio(n: u64) -> f64 {
    floor_run(n, true, floor_pipeline)
}

/// A floor's client `run` against the handoff floor's echo server, each
/// on its own thread, on tokio or smol: the client's seconds.
fn floor_run<F>(n: u64, tokio: bool, run: fn(HandoffEnd, u64) -> F) -> f64
where
    F: Future<Output = f64> + 'static,
{
    let (a, b) = tcp_pair();
    // Each thread is placed before its tasks start.
    let (server, client) = if tokio {
        (
            tokio_local_thread(move || {
                place(Side::Server);
                HandoffEnd::tokio(b).echo()
            }),
            tokio_local_thread(move || {
                place(Side::Client);
                run(HandoffEnd::tokio(a), n)
            }),
        )
    } else {
        (
            smol_task_thread(move |ex| {
                place(Side::Server);
                HandoffEnd::smol(&ex, b).echo()
            }),
            smol_task_thread(move |ex| {
                place(Side::Client);
                run(HandoffEnd::smol(&ex, a), n)
            }),
        )
    };
    let secs = client.join().unwrap();
    server.join().unwrap();
    secs
}

/// The floor's client: `n` requests through `end`, `WINDOW` in flight.
async fn floor_pipeline(end: HandoffEnd, n: u64) -> f64 {
    let body = payload(PIPE_SIZE);
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < n.min(WINDOW as u64) {
        end.out.push(body.clone()).await;
        sent += 1;
    }
    let (mut done, mut batch) = (0, VecDeque::new());
    while done < n {
        assert!(end.inq.take_all(&mut batch).await, "floor: early end");
        for m in batch.drain(..) {
            std::hint::black_box(m);
            done += 1;
            if sent < n {
                end.out.push(body.clone()).await;
                sent += 1;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    end.close().await;
    secs
}

// ---------------------------------------------------------------------------
// the calls floor: the handoff floor plus what a call API cannot do without
// ---------------------------------------------------------------------------

/// The handoff floor's pipeline with what `call()` cannot do without: an
/// id in each request, a table of the outstanding ones, and a future per
/// call that its response completes, kept [`WINDOW`] in flight in a
/// `FuturesUnordered` as chatpipe's and tarpc's clients are. Nothing else:
/// one thread's `Rc`s and `Cell`s (no locks, no atomics), reply slots
/// reused, requests encoded into one buffer, no timeouts, no
/// cancellation. The server is the handoff floor's echo.
fn pipelined_calls_floor(n: u64) -> f64 {
    floor_run(n, false, floor_calls)
}

/// [`pipelined_calls_floor`] on tokio.
fn pipelined_calls_floor_tokio(n: u64) -> f64 {
    floor_run(n, true, floor_calls)
}

/// The calls floor's client: the application's task runs the window of
/// calls and, joined with it, the dispatch of answers to their slots.
async fn floor_calls(end: HandoffEnd, n: u64) -> f64 {
    let calls = Calls {
        out: end.out.clone(),
        table: RefCell::default(),
        free: RefCell::default(),
        next: Cell::new(0),
        buf: RefCell::default(),
    };
    let body = payload(PIPE_SIZE);
    let dispatch = async {
        let (mut done, mut batch) = (0, VecDeque::new());
        while done < n {
            assert!(end.inq.take_all(&mut batch).await, "calls floor: early end");
            for frame in batch.drain(..) {
                calls.answer(frame);
                done += 1;
            }
        }
    };
    let (secs, ()) = futures::join!(
        window(
            n,
            || calls.call(&body),
            |r| {
                assert_eq!(r.len(), PIPE_SIZE);
            }
        ),
        dispatch
    );
    end.close().await;
    secs
}

/// The calls floor's request side: ids, the table, reply slots.
struct Calls {
    out: crate::stacks::Handoff<Bytes>,
    table: RefCell<HashMap<u64, Rc<Slot>>>,
    free: RefCell<Vec<Rc<Slot>>>,
    next: Cell<u64>,
    buf: RefCell<BytesMut>,
}

#[derive(Default)]
struct Slot {
    answer: Cell<Option<BytesMut>>,
    waker: Cell<Option<Waker>>,
}

impl Calls {
    async fn call(&self, body: &[u8]) -> BytesMut {
        let id = self.next.get();
        self.next.set(id + 1);
        let frame = {
            let mut buf = self.buf.borrow_mut();
            buf.reserve(8 + body.len());
            buf.put_u64(id);
            buf.put_slice(body);
            buf.split().freeze()
        };
        let slot = self.free.borrow_mut().pop().unwrap_or_default();
        self.table.borrow_mut().insert(id, slot.clone());
        self.out.push(frame).await;
        let answer = std::future::poll_fn(|cx| match slot.answer.take() {
            Some(a) => Poll::Ready(a),
            None => {
                slot.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        self.free.borrow_mut().push(slot);
        answer
    }

    /// An answer (the echoed request: id, then body) to its call.
    fn answer(&self, mut frame: BytesMut) {
        let id = frame.get_u64();
        let slot = self
            .table
            .borrow_mut()
            .remove(&id)
            .expect("an outstanding id");
        slot.answer.set(Some(frame));
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }
}

/// One case by name, for `--one`.
pub(crate) fn pipelined_case(stack: &str, n: u64) -> f64 {
    match stack {
        "raw one-thread client" => pipelined_raw(n),
        "tarpc" => pipelined_tarpc(n),
        "chatpipe call() on tokio" => pipelined_chatpipe_tokio(n),
        "handoff floor" => pipelined_handoff_floor(n),
        "handoff floor (tokio)" => pipelined_handoff_floor_tokio(n),
        "calls floor" => pipelined_calls_floor(n),
        "calls floor (tokio)" => pipelined_calls_floor_tokio(n),
        _ => pipelined_chatpipe(n),
    }
}

pub(crate) fn scenario_pipelined(cfg: &Cfg, rep: &mut Report) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 2b. pipelined: {WINDOW} requests of {PIPE_SIZE} B in flight on one connection\n\n\
         Requests/s at the client (a response in for each), median of {} runs, spread min–max. \
         Client and server each on their own thread. raw: one client thread writes as many frames as \
         the window allows in one write, then reads what came back; its server echoes every whole \
         frame of a read in one write. tarpc: `Channel::call` on tokio (bincode over \
         `LengthDelimitedCodec`), its server spawning each response. chatpipe: one task keeps \
         {WINDOW} `Sender::call` futures in a `FuturesUnordered`; the server answers each request \
         with `send().await`. handoff floor: the application's task keeps {WINDOW} frames in a queue \
         to a task that owns the socket and takes the answers in order (no ids). calls floor: the \
         same with what a call API cannot do without: an id in each request, a table of the \
         outstanding ones, and a future per call in a `FuturesUnordered` that its answer completes \
         (one thread's `Rc`s, reply slots reused).\n",
        cfg.reps
    );
    let cpus = allowed_cpus();
    let _ = writeln!(
        md,
        "Placements: *free*, the scheduler places the threads ({} CPUs allowed; the targets' \
         rows); *one CPU*, every thread of the process pinned to CPU {}; *a CPU each*, the \
         client's thread pinned to CPU {} and the server's to CPU {} (sched_setaffinity). \
         *x calls floor*: against the calls floor on the same runtime, in the same placement.\n",
        cpus.len(),
        cpus[0],
        cpus[0],
        cpus[cpus.len() - 1],
    );
    let _ = writeln!(
        md,
        "| placement | stack | N | req/s | spread | x raw one-thread | x tarpc | x calls floor |\n\
         |---|---|---:|---:|---|---:|---:|---:|"
    );
    for placement in Placement::ALL {
        match placement {
            Placement::Free => {}
            Placement::OneCpu => set_process_affinity(&cpus[..1]),
            Placement::CpuEach => {
                *CPU_EACH.lock().unwrap() = Some([cpus[0], cpus[cpus.len() - 1]]);
            }
        }
        // The free placement's keys are the targets' (no prefix).
        let key = |stack: &str| match placement {
            Placement::Free => format!("pipelined/{stack}"),
            p => format!("pipelined/{}/{stack}", p.name()),
        };
        for stack in PIPELINED_STACKS {
            eprintln!("pipelined {} {stack} ...", placement.name());
            let (n, secs) = calibrated(cfg, |n| pipelined_case(stack, n));
            let rates: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
            let st = stats(&rates);
            rep.set(key(stack), st.median);
            let calls_floor = match stack {
                s if s.starts_with("chatpipe") && s.ends_with("tokio") => {
                    rep.get(&key("calls floor (tokio)"))
                }
                s if s.starts_with("chatpipe") => rep.get(&key("calls floor")),
                _ => None,
            };
            let _ = writeln!(
                md,
                "| {} | {stack} | {} | {} | {}–{} | {} | {} | {} |",
                placement.name(),
                si(n as f64),
                si(st.median),
                si(st.min),
                si(st.max),
                ratio(Some(st.median), rep.get(&key("raw one-thread client"))),
                ratio(Some(st.median), rep.get(&key("tarpc"))),
                ratio(Some(st.median), calls_floor),
            );
            // The raw client pinned the calling thread: give it back.
            set_process_affinity(match placement {
                Placement::OneCpu => &cpus[..1],
                _ => &cpus,
            });
        }
        *CPU_EACH.lock().unwrap() = None;
        set_process_affinity(&cpus);
    }
    rep.md.push_str(&md);
    rep.md.push('\n');
}
