//! Scenario 2: rtt, sequential request/response.

use std::collections::VecDeque;
use std::fmt::{Debug, Write as _};
use std::future::Future;
use std::io::Write;
use std::thread;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use chatpipe::raw::{Raw, RawMessage};
use futures::{Sink, SinkExt, Stream, StreamExt};
use smol::LocalExecutor;

use crate::harness::{allowed_cpus, percentile, set_process_affinity, stats};
use crate::report::{ratio, Report};
use crate::scenarios::pipelined::rtt_tarpc;
use crate::stacks::{
    ac_framed, chatpipe_builder, payload, raw_read_one, smol_stream, smol_task_thread, tcp_pair,
    tokio_framed, tokio_local_thread, tokio_stream, tokio_task_thread, HandoffEnd,
};
use crate::Cfg;

pub(crate) const RTT_SIZE: usize = 64;
const RTT_STACKS: [&str; 11] = [
    "raw ping-pong",
    "tokio-util ping-pong",
    "asynchronous-codec ping-pong",
    "tarpc call",
    "chatpipe request()",
    "chatpipe ping-pong",
    "chatpipe request() on tokio",
    "handoff floor",
    "handoff floor (tokio)",
    "handoff floor, a deadline armed",
    "handoff floor, a deadline armed (tokio)",
];

/// The handoff floor of a round trip (see `stacks::oneway_handoff_floor`):
/// on each side the socket owned by tasks of its own and the
/// application's task handing the ping, and the echo, over a queue each
/// way. What a design with a driver task costs at least; no request ids.
/// With `deadline`, each side also keeps one timer armed an hour ahead on
/// its runtime, as a connection with a keepalive or idle deadline must:
/// what the runtime's timer costs per turn while any is armed.
pub(crate) fn rtt_handoff_floor(n: usize, warm: usize, deadline: bool) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let armed = move |ex: &LocalExecutor<'static>| {
        if deadline {
            ex.spawn(async_io::Timer::after(HOUR)).detach();
        }
    };
    let server = smol_task_thread(move |ex| {
        armed(&ex);
        HandoffEnd::smol(&ex, b).echo()
    });
    let client = smol_task_thread(move |ex| {
        armed(&ex);
        async move { floor_pings(HandoffEnd::smol(&ex, a), n, warm).await }
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

/// [`rtt_handoff_floor`] on tokio (tokio-util's codec, `spawn_local`ed
/// tasks on each side's current-thread runtime).
pub(crate) fn rtt_handoff_floor_tokio(n: usize, warm: usize, deadline: bool) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let armed = move || {
        if deadline {
            drop(tokio::task::spawn_local(tokio::time::sleep(HOUR)));
        }
    };
    let server = tokio_local_thread(move || {
        armed();
        HandoffEnd::tokio(b).echo()
    });
    let client = tokio_local_thread(move || {
        armed();
        async move { floor_pings(HandoffEnd::tokio(a), n, warm).await }
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

/// The floor's client: `n` timed pings through `end`, each waiting for its
/// echo.
async fn floor_pings(end: HandoffEnd, n: usize, warm: usize) -> Vec<u64> {
    let body = payload(RTT_SIZE);
    let end_ref = &end;
    let out = timed_trips(n, warm, VecDeque::new(), |mut batch, _| {
        let body = body.clone();
        async move {
            end_ref.out.push(body).await;
            while batch.is_empty() {
                assert!(end_ref.inq.take_all(&mut batch).await, "floor: early end");
            }
            batch.clear();
            batch
        }
    })
    .await;
    end.close().await;
    out
}

/// Round-trip times in nanoseconds, warm-up excluded.
pub(crate) fn rtt_raw(n: usize, warm: usize) -> Vec<u64> {
    let (mut a, mut b) = tcp_pair();
    let server = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Some(len) = raw_read_one(&mut b, &mut buf) {
            b.write_all(&buf[..len]).expect("raw echo");
        }
    });
    let mut frame = (RTT_SIZE as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload(RTT_SIZE));
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + warm {
        let t = Instant::now();
        a.write_all(&frame).expect("raw ping");
        raw_read_one(&mut a, &mut buf).expect("raw pong");
        if i >= warm {
            out.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(a);
    server.join().unwrap();
    out
}

pub(crate) fn rtt_tokio(n: usize, warm: usize) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = tokio_task_thread(move || framed_echo(tokio_framed(b)));
    let client = tokio_task_thread(move || framed_pings(tokio_framed(a), n, warm));
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

/// asynchronous-codec on smol: `send` then `next`, the server echoing.
pub(crate) fn rtt_ac(n: usize, warm: usize) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = smol_task_thread(move |_ex| framed_echo(ac_framed(b)));
    let client = smol_task_thread(move |_ex| framed_pings(ac_framed(a), n, warm));
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

pub(crate) fn rtt_chatpipe(n: usize, warm: usize, use_request: bool) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = smol_task_thread(move |ex| async move {
        let (tx, incoming, conn) = chatpipe_builder().build(smol_stream(b), Raw);
        let driver = ex.spawn(conn);
        drop(chatpipe_echo(tx, incoming).await);
        let _ = driver.await;
    });
    let client = smol_task_thread(move |ex| async move {
        let (tx, incoming, conn) = chatpipe_builder().build(smol_stream(a), Raw);
        let driver = ex.spawn(conn);
        let out = match use_request {
            true => requests(&tx, n, warm).await,
            false => {
                let (tx, body) = (&tx, payload(RTT_SIZE));
                timed_trips(n, warm, incoming, |mut incoming, _| {
                    let body = body.clone();
                    async move {
                        tx.send(RawMessage::Message(body)).await.unwrap();
                        incoming.next().await.unwrap().unwrap();
                        incoming
                    }
                })
                .await
            }
        };
        tx.close();
        driver.await.expect("client driver");
        out
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

/// The same request/response as `rtt_chatpipe`, with chatpipe running on
/// tokio (current-thread runtime per side): what the runtime costs.
pub(crate) fn rtt_chatpipe_tokio(n: usize, warm: usize) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = tokio_task_thread(move || async move {
        let (tx, incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(b), Raw);
        let driver = tokio::spawn(conn);
        drop(chatpipe_echo(tx, incoming).await);
        let _ = driver.await;
    });
    let client = tokio_task_thread(move || async move {
        let (tx, _incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(a), Raw);
        let driver = tokio::spawn(conn);
        let out = requests(&tx, n, warm).await;
        tx.close();
        driver.await.expect("join").expect("client driver");
        out
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

/// Times `n + warm` round trips made by `trip`, one after another, and
/// gives the last `n` in nanoseconds. Each trip gets the trip's number and
/// `state` (what it needs mutably: a stream), and hands the state back.
pub(crate) async fn timed_trips<S, F, Fut>(
    n: usize,
    warm: usize,
    mut state: S,
    mut trip: F,
) -> Vec<u64>
where
    F: FnMut(S, u64) -> Fut,
    Fut: Future<Output = S>,
{
    let mut out = Vec::with_capacity(n);
    for i in 0..n + warm {
        let t = Instant::now();
        state = trip(state, i as u64).await;
        if i >= warm {
            out.push(t.elapsed().as_nanos() as u64);
        }
    }
    out
}

/// chatpipe's round trip: `request()` of a body of `RTT_SIZE` bytes.
pub(crate) async fn requests(tx: &chatpipe::Sender<Raw>, n: usize, warm: usize) -> Vec<u64> {
    let body = payload(RTT_SIZE);
    timed_trips(n, warm, (), |(), id| {
        let body = body.clone();
        async move {
            tx.request(RawMessage::Request { id, body })
                .await
                .expect("request");
        }
    })
    .await
}

/// The server side of chatpipe's rtt and pipelined runs: answers every
/// request with its body (and sends any other message back as it is).
pub(crate) async fn chatpipe_echo(
    tx: chatpipe::Sender<Raw>,
    mut incoming: chatpipe::Incoming<Raw>,
) -> chatpipe::Sender<Raw> {
    while let Some(Ok(m)) = incoming.next().await {
        let reply = match m {
            RawMessage::Request { id, body } => RawMessage::Response { id, body },
            other => other,
        };
        if tx.send(reply).await.is_err() {
            break;
        }
    }
    tx
}

/// A framed peer's ping-pong (tokio-util or asynchronous-codec): `send`
/// then `next`, timed.
async fn framed_pings<F, E>(f: F, n: usize, warm: usize) -> Vec<u64>
where
    F: Stream<Item = Result<BytesMut, E>> + Sink<Bytes> + Unpin,
    <F as Sink<Bytes>>::Error: Debug,
    E: Debug,
{
    let body = payload(RTT_SIZE);
    timed_trips(n, warm, f, |mut f, _| {
        let body = body.clone();
        async move {
            f.send(body).await.unwrap();
            f.next().await.unwrap().unwrap();
            f
        }
    })
    .await
}

/// The echoing side of a framed ping-pong.
async fn framed_echo<F, E>(mut f: F)
where
    F: Stream<Item = Result<BytesMut, E>> + Sink<Bytes> + Unpin,
    <F as Sink<Bytes>>::Error: Debug,
{
    while let Some(Ok(frame)) = f.next().await {
        f.send(frame.freeze()).await.unwrap();
    }
}

pub(crate) fn scenario_rtt(cfg: &Cfg, rep: &mut Report) {
    let cpus = allowed_cpus();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 2. rtt: sequential request/response of {RTT_SIZE} B\n\n\
         {} round trips per run after {} of warm-up; p50 and p99 in microseconds, median over {} runs \
         (spread: min–max of the runs' p50). *one CPU*: every thread of the process pinned to CPU {} \
         (sched_setaffinity); *free*: the scheduler places them ({} CPUs allowed).\n",
        cfg.rtt_n,
        cfg.rtt_warmup,
        cfg.reps,
        cpus[0],
        cpus.len()
    );
    let _ = writeln!(
        md,
        "| placement | stack | p50 µs | p50 spread | p99 µs | p50 x raw | p50 x tokio-util | p50 x asynchronous-codec |\n|---|---|---:|---|---:|---:|---:|---:|"
    );
    for placement in ["one CPU", "free"] {
        if placement == "one CPU" {
            set_process_affinity(&cpus[..1]);
        }
        for stack in RTT_STACKS {
            eprintln!("rtt {placement} {stack} ...");
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            for _ in 0..cfg.reps {
                let mut v = match stack {
                    "raw ping-pong" => rtt_raw(cfg.rtt_n, cfg.rtt_warmup),
                    "tokio-util ping-pong" => rtt_tokio(cfg.rtt_n, cfg.rtt_warmup),
                    "asynchronous-codec ping-pong" => rtt_ac(cfg.rtt_n, cfg.rtt_warmup),
                    "tarpc call" => rtt_tarpc(cfg.rtt_n, cfg.rtt_warmup, RTT_SIZE),
                    "chatpipe request()" => rtt_chatpipe(cfg.rtt_n, cfg.rtt_warmup, true),
                    "chatpipe request() on tokio" => rtt_chatpipe_tokio(cfg.rtt_n, cfg.rtt_warmup),
                    "handoff floor" => rtt_handoff_floor(cfg.rtt_n, cfg.rtt_warmup, false),
                    "handoff floor (tokio)" => {
                        rtt_handoff_floor_tokio(cfg.rtt_n, cfg.rtt_warmup, false)
                    }
                    "handoff floor, a deadline armed" => {
                        rtt_handoff_floor(cfg.rtt_n, cfg.rtt_warmup, true)
                    }
                    "handoff floor, a deadline armed (tokio)" => {
                        rtt_handoff_floor_tokio(cfg.rtt_n, cfg.rtt_warmup, true)
                    }
                    _ => rtt_chatpipe(cfg.rtt_n, cfg.rtt_warmup, false),
                };
                v.sort_unstable();
                p50s.push(percentile(&v, 0.50));
                p99s.push(percentile(&v, 0.99));
            }
            let p50 = stats(&p50s);
            let p99 = stats(&p99s);
            rep.set(format!("rtt/{placement}/{stack}/p50"), p50.median);
            rep.set(format!("rtt/{placement}/{stack}/p99"), p99.median);
            let raw = rep.get(&format!("rtt/{placement}/raw ping-pong/p50"));
            let tok = rep.get(&format!("rtt/{placement}/tokio-util ping-pong/p50"));
            let ac = rep.get(&format!("rtt/{placement}/asynchronous-codec ping-pong/p50"));
            let _ = writeln!(
                md,
                "| {placement} | {stack} | {:.1} | {:.1}–{:.1} | {:.1} | {} | {} | {} |",
                p50.median,
                p50.min,
                p50.max,
                p99.median,
                ratio(Some(p50.median), raw),
                ratio(Some(p50.median), tok),
                ratio(Some(p50.median), ac),
            );
        }
        if placement == "one CPU" {
            set_process_affinity(&cpus);
        }
    }
    rep.md.push_str(&md);
    rep.md.push('\n');
}
