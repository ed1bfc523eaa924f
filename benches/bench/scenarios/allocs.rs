//! Scenario 6: allocations per message.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Barrier};
use std::thread;

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::test_util::{ManualClock, ManualTimer};
use chatpipe::{AsyncIoTimer, Timer};
use futures::{SinkExt, StreamExt};

use crate::counting_alloc::{delta, thread_allocs, GLOBAL_ALLOCS, GLOBAL_BYTES, GLOBAL_ON};
use crate::report::{size_name, Report};
use crate::scenarios::rtt::RTT_SIZE;
use crate::stacks::{
    ac_framed, chatpipe_builder, payload, smol_stream, smol_thread, tcp_pair, tokio_framed,
    tokio_thread,
};
use crate::Cfg;

/// Allocations on each side's thread (and on every other thread) while `n`
/// messages cross. Returns [send allocs, send bytes, recv allocs, recv
/// bytes, other allocs].
fn allocs_run(
    n: u64,
    side_a: impl FnOnce(Arc<Barrier>, Arc<Barrier>) -> thread::JoinHandle<(u64, u64)>,
    side_b: impl FnOnce(Arc<Barrier>, Arc<Barrier>) -> thread::JoinHandle<(u64, u64)>,
) -> [f64; 5] {
    let ready = Arc::new(Barrier::new(3));
    let go = Arc::new(Barrier::new(3));
    let a = side_a(ready.clone(), go.clone());
    let b = side_b(ready.clone(), go.clone());
    ready.wait();
    GLOBAL_ALLOCS.store(0, Relaxed);
    GLOBAL_BYTES.store(0, Relaxed);
    GLOBAL_ON.store(true, Relaxed);
    go.wait();
    let (sa, sb) = a.join().unwrap();
    let (ra, rb) = b.join().unwrap();
    GLOBAL_ON.store(false, Relaxed);
    let all = GLOBAL_ALLOCS.load(Relaxed);
    let n = n as f64;
    [
        sa as f64 / n,
        sb as f64 / n,
        ra as f64 / n,
        rb as f64 / n,
        all.saturating_sub(sa + ra) as f64 / n,
    ]
}

fn allocs_chatpipe_oneway(n: u64, size: usize) -> [f64; 5] {
    let (a, b) = tcp_pair();
    let body = payload(size);
    allocs_run(
        n,
        move |ready, go| {
            smol_thread(move |ex| async move {
                let (tx, _incoming, conn) = chatpipe_builder().build(smol_stream(a), Raw);
                let driver = ex.spawn(conn);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    tx.send(RawMessage::Message(body.clone())).await.unwrap();
                }
                tx.close();
                driver.await.expect("driver");
                delta(before)
            })
        },
        move |ready, go| {
            smol_thread(move |ex| async move {
                let (tx, mut incoming, conn) = chatpipe_builder().build(smol_stream(b), Raw);
                let driver = ex.spawn(conn);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    std::hint::black_box(incoming.next().await.unwrap().unwrap());
                }
                let d = delta(before);
                while incoming.next().await.is_some() {}
                drop(tx);
                let _ = driver.await;
                d
            })
        },
    )
}

fn allocs_tokio_feed(n: u64, size: usize) -> [f64; 5] {
    let (a, b) = tcp_pair();
    let body = payload(size);
    allocs_run(
        n,
        move |ready, go| {
            tokio_thread(move || async move {
                let mut f = tokio_framed(a);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    f.feed(body.clone()).await.unwrap();
                }
                SinkExt::<Bytes>::flush(&mut f).await.unwrap();
                SinkExt::<Bytes>::close(&mut f).await.unwrap();
                delta(before)
            })
        },
        move |ready, go| {
            tokio_thread(move || async move {
                let mut f = tokio_framed(b);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    std::hint::black_box(f.next().await.unwrap().unwrap());
                }
                let d = delta(before);
                while f.next().await.is_some() {}
                d
            })
        },
    )
}

/// request() round trips: "send" is the client's thread, "receive" the
/// server's, per request. Each connection's timer comes from `timer`.
fn allocs_chatpipe_request<Tm: Timer>(n: u64, timer: fn() -> Tm) -> [f64; 5] {
    let (a, b) = tcp_pair();
    let body = payload(RTT_SIZE);
    allocs_run(
        n,
        move |ready, go| {
            smol_thread(move |ex| async move {
                let (tx, _incoming, conn) =
                    chatpipe_builder().build_with_timer(smol_stream(a), Raw, timer());
                let driver = ex.spawn(conn);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for id in 0..n {
                    let msg = RawMessage::Request {
                        id,
                        body: body.clone(),
                    };
                    tx.request(msg).await.expect("request");
                }
                let d = delta(before);
                tx.close();
                driver.await.expect("driver");
                d
            })
        },
        move |ready, go| {
            smol_thread(move |ex| async move {
                let (tx, mut incoming, conn) =
                    chatpipe_builder().build_with_timer(smol_stream(b), Raw, timer());
                let driver = ex.spawn(conn);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    match incoming.next().await {
                        Some(Ok(RawMessage::Request { id, body })) => {
                            tx.send(RawMessage::Response { id, body }).await.unwrap()
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                let d = delta(before);
                while incoming.next().await.is_some() {}
                drop(tx);
                let _ = driver.await;
                d
            })
        },
    )
}

/// A timer on a clock that never moves: no deadline ever fires, and
/// async-io's reactor holds no timer (see `allocs_ac_pingpong`).
fn frozen_timer() -> ManualTimer {
    ManualClock::new().timer()
}

/// The floor of a round trip's allocations on smol: asynchronous-codec's
/// ping-pong, `send` then `next` (its server `next` then `send`). Whatever
/// it allocates is async-io's reactor, which every stack on smol pays:
/// each turn of the reactor that wakes a task collects the wakers in a
/// new `Vec`, and while any timer is registered it splits its timer map
/// (`BTreeMap::split_off`) on every turn too. With `deadline`, each side
/// arms one async-io timer an hour away before its round trips, as a
/// connection with a keepalive deadline does (armed once, never re-armed):
/// the floor of a connection that has a deadline at all.
fn allocs_ac_pingpong(n: u64, deadline: bool) -> [f64; 5] {
    let (a, b) = tcp_pair();
    let body = payload(RTT_SIZE);
    // Registered in the reactor by its first poll; kept until the end.
    let arm = move || async move {
        let mut timer = deadline.then(|| smol::Timer::after(std::time::Duration::from_secs(3600)));
        if let Some(t) = &mut timer {
            assert!(futures::poll!(t).is_pending());
        }
        timer
    };
    allocs_run(
        n,
        move |ready, go| {
            smol_thread(move |_ex| async move {
                let mut f = ac_framed(a);
                let _deadline = arm().await;
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    f.send(body.clone()).await.unwrap();
                    std::hint::black_box(f.next().await.unwrap().unwrap());
                }
                let d = delta(before);
                SinkExt::<Bytes>::close(&mut f).await.unwrap();
                d
            })
        },
        move |ready, go| {
            smol_thread(move |_ex| async move {
                let mut f = ac_framed(b);
                let _deadline = arm().await;
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    let m = f.next().await.unwrap().unwrap();
                    f.send(m.freeze()).await.unwrap();
                }
                let d = delta(before);
                while f.next().await.is_some() {}
                d
            })
        },
    )
}

pub(crate) fn scenario_allocs(cfg: &Cfg, rep: &mut Report) {
    let n: u64 = if cfg.quick { 20_000 } else { 200_000 };
    let rtt_n: u64 = if cfg.quick { 2_000 } else { 20_000 };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 6. allocations per message\n\n\
         A counting global allocator (alloc, alloc_zeroed and realloc each count one) with per-thread \
         counters: *send path* is the sending side's thread (the sending task and its driver), \
         *receive path* the receiving side's thread (driver and the task reading the messages), \
         *other* every other thread (e.g. async-io's reactor thread). Payloads are `Bytes` clones of \
         one buffer, so the payload itself is never allocated per message on the send side. Oneway: \
         {n} messages; request(): {rtt_n} sequential round trips of {RTT_SIZE} B (send = client \
         thread, receive = server thread, per round trip).\n"
    );
    let _ = writeln!(
        md,
        "| stack | messages | send allocs/msg | send bytes/msg | receive allocs/msg | receive bytes/msg | other allocs/msg |\n|---|---|---:|---:|---:|---:|---:|"
    );
    let row = |md: &mut String, name: &str, key: &str, v: [f64; 5], rep: &mut Report| {
        rep.set(format!("allocs/{key}/send"), v[0]);
        rep.set(format!("allocs/{key}/recv"), v[2]);
        let _ = writeln!(
            md,
            "| {name} | {:.3} | {:.1} | {:.3} | {:.1} | {:.3} |",
            v[0], v[1], v[2], v[3], v[4]
        );
    };
    for size in [64usize, 1024, 64 * 1024] {
        eprintln!("allocs {} ...", size_name(size));
        let v = allocs_chatpipe_oneway(n.min(20_000_000 / size as u64), size);
        row(
            &mut md,
            &format!("chatpipe send | oneway {}", size_name(size)),
            &format!("chatpipe/{size}"),
            v,
            rep,
        );
        let v = allocs_tokio_feed(n.min(20_000_000 / size as u64), size);
        row(
            &mut md,
            &format!("tokio-util feed | oneway {}", size_name(size)),
            &format!("tokio/{size}"),
            v,
            rep,
        );
    }
    eprintln!("allocs request() ...");
    let v = allocs_chatpipe_request(rtt_n, AsyncIoTimer::default);
    row(
        &mut md,
        &format!("chatpipe request() | round trip {RTT_SIZE} B"),
        "chatpipe/request",
        v,
        rep,
    );
    // What of that is async-io's reactor: the same round trips with no
    // timer in async-io (a clock that never moves), and the floor that
    // asynchronous-codec's ping-pong pays on the same reactor.
    let v = allocs_chatpipe_request(rtt_n, frozen_timer);
    row(
        &mut md,
        &format!("chatpipe request(), no async-io timer | round trip {RTT_SIZE} B"),
        "chatpipe/request-frozen",
        v,
        rep,
    );
    let v = allocs_ac_pingpong(rtt_n, false);
    row(
        &mut md,
        &format!("asynchronous-codec ping-pong (floor) | round trip {RTT_SIZE} B"),
        "ac/pingpong",
        v,
        rep,
    );
    let v = allocs_ac_pingpong(rtt_n, true);
    row(
        &mut md,
        &format!(
            "asynchronous-codec ping-pong, a deadline armed in async-io (floor) | round trip {RTT_SIZE} B"
        ),
        "ac/pingpong-deadline",
        v,
        rep,
    );
    rep.md.push_str(&md);
    rep.md.push('\n');
}
