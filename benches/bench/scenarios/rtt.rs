//! Scenario 2: rtt, sequential request/response.

use std::fmt::Write as _;
use std::io::Write;
use std::thread;
use std::time::Instant;

use chatpipe::raw::{Raw, RawMessage};
use futures::{SinkExt, StreamExt};

use crate::harness::{allowed_cpus, percentile, set_process_affinity, stats};
use crate::report::{ratio, Report};
use crate::scenarios::pipelined::rtt_tarpc;
use crate::stacks::{
    ac_framed, chatpipe_builder, payload, raw_read_one, smol_stream, smol_task_thread, tcp_pair,
    tokio_framed, tokio_stream, tokio_task_thread,
};
use crate::Cfg;

pub(crate) const RTT_SIZE: usize = 64;
const RTT_STACKS: [&str; 7] = [
    "raw ping-pong",
    "tokio-util ping-pong",
    "asynchronous-codec ping-pong",
    "tarpc call",
    "chatpipe request()",
    "chatpipe ping-pong",
    "chatpipe request() on tokio",
];

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
    let server = tokio_task_thread(move || async move {
        let mut f = tokio_framed(b);
        while let Some(Ok(frame)) = f.next().await {
            f.send(frame.freeze()).await.unwrap();
        }
    });
    let client = tokio_task_thread(move || async move {
        let mut f = tokio_framed(a);
        let body = payload(RTT_SIZE);
        let mut out = Vec::with_capacity(n);
        for i in 0..n + warm {
            let t = Instant::now();
            f.send(body.clone()).await.unwrap();
            f.next().await.unwrap().unwrap();
            if i >= warm {
                out.push(t.elapsed().as_nanos() as u64);
            }
        }
        out
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

/// asynchronous-codec on smol: `send` then `next`, the server echoing.
pub(crate) fn rtt_ac(n: usize, warm: usize) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = smol_task_thread(move |_ex| async move {
        let mut f = ac_framed(b);
        while let Some(Ok(frame)) = f.next().await {
            f.send(frame.freeze()).await.unwrap();
        }
    });
    let client = smol_task_thread(move |_ex| async move {
        let mut f = ac_framed(a);
        let body = payload(RTT_SIZE);
        let mut out = Vec::with_capacity(n);
        for i in 0..n + warm {
            let t = Instant::now();
            f.send(body.clone()).await.unwrap();
            f.next().await.unwrap().unwrap();
            if i >= warm {
                out.push(t.elapsed().as_nanos() as u64);
            }
        }
        out
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

pub(crate) fn rtt_chatpipe(n: usize, warm: usize, use_request: bool) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = smol_task_thread(move |ex| async move {
        let (tx, mut incoming, conn) = chatpipe_builder().build(smol_stream(b), Raw);
        let driver = ex.spawn(conn);
        while let Some(Ok(m)) = incoming.next().await {
            let reply = match m {
                RawMessage::Request { id, body } => RawMessage::Response { id, body },
                other => other,
            };
            if tx.send(reply).await.is_err() {
                break;
            }
        }
        drop(tx);
        let _ = driver.await;
    });
    let client = smol_task_thread(move |ex| async move {
        let (tx, mut incoming, conn) = chatpipe_builder().build(smol_stream(a), Raw);
        let driver = ex.spawn(conn);
        let body = payload(RTT_SIZE);
        let mut out = Vec::with_capacity(n);
        for i in 0..n + warm {
            let t = Instant::now();
            if use_request {
                let msg = RawMessage::Request {
                    id: i as u64,
                    body: body.clone(),
                };
                tx.request(msg).await.expect("request");
            } else {
                tx.send(RawMessage::Message(body.clone())).await.unwrap();
                incoming.next().await.unwrap().unwrap();
            }
            if i >= warm {
                out.push(t.elapsed().as_nanos() as u64);
            }
        }
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
        let (tx, mut incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(b), Raw);
        let driver = tokio::spawn(conn);
        while let Some(Ok(RawMessage::Request { id, body })) = incoming.next().await {
            if tx.send(RawMessage::Response { id, body }).await.is_err() {
                break;
            }
        }
        drop(tx);
        let _ = driver.await;
    });
    let client = tokio_task_thread(move || async move {
        let (tx, _incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(a), Raw);
        let driver = tokio::spawn(conn);
        let body = payload(RTT_SIZE);
        let mut out = Vec::with_capacity(n);
        for i in 0..n + warm {
            let t = Instant::now();
            let msg = RawMessage::Request {
                id: i as u64,
                body: body.clone(),
            };
            tx.request(msg).await.expect("request");
            if i >= warm {
                out.push(t.elapsed().as_nanos() as u64);
            }
        }
        tx.close();
        driver.await.expect("join").expect("client driver");
        out
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
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
