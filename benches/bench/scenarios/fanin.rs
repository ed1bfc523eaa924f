//! Scenario 3: fanin, many connections into one server.

use std::fmt::{Debug, Write as _};
use std::future::Future;
use std::io::Write;
use std::net::TcpStream;
use std::rc::Rc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use futures::{Sink, SinkExt, Stream, StreamExt};
use smol::LocalExecutor;

use crate::harness::stats;
use crate::report::{ratio, si, Report};
use crate::stacks::{
    ac_framed, chatpipe_builder, consume, fanin_pairs, payload, produce, raw_read_frames,
    read_into, smol_stream, smol_thread, tokio_framed, tokio_local_thread, tokio_stream,
    write_from, Handoff, HANDOFF_CAPACITY,
};
use crate::Cfg;

const FANIN_SIZE: usize = 64;

fn fanin_raw(conns: usize, msgs: u64) -> f64 {
    let (clients, servers) = fanin_pairs(conns);
    let go = Arc::new(Barrier::new(conns + 2));
    let readers: Vec<_> = servers
        .into_iter()
        .map(|mut s| {
            let go = go.clone();
            thread::spawn(move || {
                go.wait();
                raw_read_frames(&mut s, msgs);
            })
        })
        .collect();
    let go2 = go.clone();
    let writer = thread::spawn(move || {
        let frame = 4 + FANIN_SIZE;
        let body = payload(FANIN_SIZE);
        let mut block = Vec::with_capacity(frame * msgs as usize);
        for _ in 0..msgs {
            block.extend_from_slice(&(FANIN_SIZE as u32).to_be_bytes());
            block.extend_from_slice(&body);
        }
        go2.wait();
        for mut c in clients {
            for chunk in block.chunks(512 * 1024) {
                c.write_all(chunk).expect("raw write");
            }
        }
    });
    go.wait();
    let t0 = Instant::now();
    for r in readers {
        r.join().unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    writer.join().unwrap();
    secs
}

pub(crate) fn fanin_tokio(conns: usize, msgs: u64) -> f64 {
    let body = payload(FANIN_SIZE);
    tokio_fanin(
        conns,
        move |s| feed_all(tokio_framed(s), body.clone(), msgs),
        move |s| take(tokio_framed(s), msgs),
    )
}

pub(crate) fn fanin_chatpipe(conns: usize, msgs: u64) -> f64 {
    let body = payload(FANIN_SIZE);
    smol_fanin(
        conns,
        move |s, ex| {
            let (tx, _incoming, conn) = chatpipe_builder().build(smol_stream(s), Raw);
            send_all(tx, ex.spawn(conn), body.clone(), msgs)
        },
        move |s, ex| {
            let (tx, incoming, conn) = chatpipe_builder().build(smol_stream(s), Raw);
            take_chatpipe(tx, incoming, ex.spawn(conn), msgs)
        },
    )
}

/// chatpipe's client, on either runtime: `send().await` per message, then
/// close and wait for the driver.
async fn send_all<D>(tx: chatpipe::Sender<Raw>, driver: D, body: Bytes, msgs: u64)
where
    D: Future<Output = Result<(), chatpipe::Error>>,
{
    for _ in 0..msgs {
        tx.send(RawMessage::Message(body.clone())).await.unwrap();
    }
    tx.close();
    driver.await.expect("fanin client driver");
}

/// chatpipe's server, on either runtime: takes `msgs` messages (timed),
/// then gives back the rest (untimed): the drain, the close, the driver.
// It yields the untimed rest on purpose.
#[allow(clippy::async_yields_async)]
async fn take_chatpipe<D: Future>(
    tx: chatpipe::Sender<Raw>,
    mut incoming: chatpipe::Incoming<Raw>,
    driver: D,
    msgs: u64,
) -> impl Future<Output = ()> {
    for _ in 0..msgs {
        incoming.next().await.unwrap().unwrap();
    }
    async move {
        while incoming.next().await.is_some() {}
        drop(tx);
        let _ = driver.await;
    }
}

/// A framed peer's client (tokio-util or asynchronous-codec): `feed` every
/// message, one `flush`, then close.
async fn feed_all<F>(mut f: F, body: Bytes, msgs: u64)
where
    F: Sink<Bytes> + Unpin,
    F::Error: Debug,
{
    for _ in 0..msgs {
        f.feed(body.clone()).await.unwrap();
    }
    f.flush().await.unwrap();
    f.close().await.unwrap();
}

/// A framed peer's server: takes `msgs` frames (timed), then gives back the
/// rest of the stream to drain (untimed: see `smol_fanin`).
// It yields the untimed rest on purpose.
#[allow(clippy::async_yields_async)]
async fn take<F, T, E>(mut f: F, msgs: u64) -> impl Future<Output = ()>
where
    F: Stream<Item = Result<T, E>> + Unpin,
    E: Debug,
{
    for _ in 0..msgs {
        f.next().await.unwrap().unwrap();
    }
    async move { while f.next().await.is_some() {} }
}

/// asynchronous-codec on smol: as `fanin_tokio`, one task per connection
/// on one `LocalExecutor` per side, `feed` then one `flush`.
pub(crate) fn fanin_ac(conns: usize, msgs: u64) -> f64 {
    let body = payload(FANIN_SIZE);
    smol_fanin(
        conns,
        move |s, _ex| feed_all(ac_framed(s), body.clone(), msgs),
        move |s, _ex| take(ac_framed(s), msgs),
    )
}

/// The handoff floor (`stacks::oneway_handoff_floor`) for fan-in: per
/// connection, a task owning the socket (asynchronous-codec) and the
/// application's task, a `Handoff` between them, on each side; one
/// `LocalExecutor` per side, as `fanin_ac`.
// The server's timed task yields the untimed rest (see `smol_fanin`).
#[allow(clippy::async_yields_async)]
pub(crate) fn fanin_handoff_floor(conns: usize, msgs: u64) -> f64 {
    let body = payload(FANIN_SIZE);
    smol_fanin(
        conns,
        move |s, ex| {
            let q = Handoff::new(HANDOFF_CAPACITY);
            let writer = ex.spawn(write_from(q.clone(), ac_framed(s)));
            let body = body.clone();
            async move {
                produce(&q, body, msgs).await;
                writer.await;
            }
        },
        move |s, ex| {
            let q = Handoff::new(HANDOFF_CAPACITY);
            let reader = ex.spawn(read_into(q.clone(), ac_framed(s)));
            async move {
                consume(&q, msgs, FANIN_SIZE).await;
                reader
            }
        },
    )
}

/// [`fanin_handoff_floor`] on tokio: tokio-util's codec, the tasks
/// `spawn_local`ed on each side's current-thread runtime.
// Each server task yields its reader, the untimed rest, on purpose.
#[allow(clippy::async_yields_async)]
pub(crate) fn fanin_handoff_floor_tokio(conns: usize, msgs: u64) -> f64 {
    let body = payload(FANIN_SIZE);
    tokio_fanin(
        conns,
        move |s| {
            let q = Handoff::new(HANDOFF_CAPACITY);
            let writer = tokio::task::spawn_local(write_from(q.clone(), tokio_framed(s)));
            let body = body.clone();
            async move {
                produce(&q, body, msgs).await;
                writer.await.expect("floor writer");
            }
        },
        move |s| {
            let q = Handoff::new(HANDOFF_CAPACITY);
            let reader = tokio::task::spawn_local(read_into(q.clone(), tokio_framed(s)));
            async move {
                consume(&q, msgs, FANIN_SIZE).await;
                async { reader.await.expect("floor reader") }
            }
        },
    )
}

/// One fan-in run on smol, one `LocalExecutor` thread per side. For each
/// connection, `client` and `server` set it up before the start signal and
/// return its task. The server's tasks are timed from the start signal
/// until each has taken its messages; what each then returns (the rest of
/// the stream, the close) runs after the clock stops.
fn smol_fanin<C, CF, S, SF>(conns: usize, client: C, server: S) -> f64
where
    C: Fn(TcpStream, &Rc<LocalExecutor<'static>>) -> CF + Send + 'static,
    CF: Future<Output = ()> + 'static,
    S: Fn(TcpStream, &Rc<LocalExecutor<'static>>) -> SF + Send + 'static,
    SF: Future + 'static,
    SF::Output: Future<Output = ()>,
{
    let (clients, servers) = fanin_pairs(conns);
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let client = smol_thread(move |ex| async move {
        let ends: Vec<_> = clients.into_iter().map(|s| client(s, &ex)).collect();
        go2.wait();
        let tasks: Vec<_> = ends.into_iter().map(|t| ex.spawn(t)).collect();
        for t in tasks {
            t.await;
        }
    });
    let server = smol_thread(move |ex| async move {
        let ends: Vec<_> = servers.into_iter().map(|s| server(s, &ex)).collect();
        go.wait();
        let t0 = Instant::now();
        let tasks: Vec<_> = ends.into_iter().map(|t| ex.spawn(t)).collect();
        let mut rest = Vec::new();
        for t in tasks {
            rest.push(t.await);
        }
        let secs = t0.elapsed().as_secs_f64();
        for r in rest {
            r.await;
        }
        secs
    });
    client.join().unwrap();
    server.join().unwrap()
}

/// chatpipe on tokio (`build_tokio`): as `fanin_chatpipe`.
pub(crate) fn fanin_chatpipe_tokio(conns: usize, msgs: u64) -> f64 {
    let body = payload(FANIN_SIZE);
    tokio_fanin(
        conns,
        move |s| {
            let (tx, _incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(s), Raw);
            let driver = tokio::spawn(conn);
            send_all(
                tx,
                async { driver.await.expect("join") },
                body.clone(),
                msgs,
            )
        },
        move |s| {
            let (tx, incoming, conn) = chatpipe_builder().build_tokio(tokio_stream(s), Raw);
            take_chatpipe(tx, incoming, tokio::spawn(conn), msgs)
        },
    )
}

/// `smol_fanin` on tokio: one current-thread runtime per side, each
/// connection's task `spawn_local`ed (so that the handoff floor's, which
/// are not `Send`, run the same way as the others).
fn tokio_fanin<C, CF, S, SF>(conns: usize, client: C, server: S) -> f64
where
    C: Fn(TcpStream) -> CF + Send + 'static,
    CF: Future<Output = ()> + 'static,
    S: Fn(TcpStream) -> SF + Send + 'static,
    SF: Future + 'static,
    SF::Output: Future<Output = ()>,
{
    let (clients, servers) = fanin_pairs(conns);
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let client = tokio_local_thread(move || async move {
        let ends: Vec<_> = clients.into_iter().map(client).collect();
        go2.wait();
        let tasks: Vec<_> = ends.into_iter().map(tokio::task::spawn_local).collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let server = tokio_local_thread(move || async move {
        let ends: Vec<_> = servers.into_iter().map(server).collect();
        go.wait();
        let t0 = Instant::now();
        let tasks: Vec<_> = ends.into_iter().map(tokio::task::spawn_local).collect();
        let mut rest = Vec::new();
        for t in tasks {
            rest.push(t.await.unwrap());
        }
        let secs = t0.elapsed().as_secs_f64();
        for r in rest {
            r.await;
        }
        secs
    });
    client.join().unwrap();
    server.join().unwrap()
}

pub(crate) fn scenario_fanin(cfg: &Cfg, rep: &mut Report) {
    let (conns, msgs) = (cfg.fanin_conns, cfg.fanin_msgs as u64);
    let total = (conns as u64 * msgs) as f64;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 3. fanin: {conns} connections x {msgs} messages of {FANIN_SIZE} B to one server\n\n\
         Aggregate messages/s at the server, median of {} runs. raw: one writer thread writing each \
         connection's pre-encoded frames, one reader thread per connection; tokio-util and asynchronous-codec \
         (feed, then flush) and chatpipe (`send().await`, on smol and on tokio): one thread per side, \
         one task per connection. handoff floor: asynchronous-codec (tokio-util on tokio) in a task per connection that owns \
         the socket, and the application's task beside it, a bounded queue between them (see scenario 1).\n",
        cfg.reps
    );
    let _ = writeln!(
        md,
        "| stack | msgs/s | spread | x raw | x tokio-util feed | x asynchronous-codec feed |\n|---|---:|---|---:|---:|---:|"
    );
    let stacks = [
        "raw",
        "tokio-util feed",
        "asynchronous-codec feed",
        "handoff floor",
        "handoff floor (tokio)",
        "chatpipe send",
        "chatpipe send (tokio)",
    ];
    for stack in stacks {
        eprintln!("fanin {stack} ...");
        let rates: Vec<f64> = (0..cfg.reps + 1)
            .map(|_| match stack {
                "raw" => fanin_raw(conns, msgs),
                "tokio-util feed" => fanin_tokio(conns, msgs),
                "asynchronous-codec feed" => fanin_ac(conns, msgs),
                "handoff floor" => fanin_handoff_floor(conns, msgs),
                "handoff floor (tokio)" => fanin_handoff_floor_tokio(conns, msgs),
                "chatpipe send (tokio)" => fanin_chatpipe_tokio(conns, msgs),
                _ => fanin_chatpipe(conns, msgs),
            })
            .skip(1) // warm-up
            .map(|s| total / s)
            .collect();
        let st = stats(&rates);
        rep.set(format!("fanin/{stack}"), st.median);
        let _ = writeln!(
            md,
            "| {stack} | {} | {}–{} | {} | {} | {} |",
            si(st.median),
            si(st.min),
            si(st.max),
            ratio(Some(st.median), rep.get("fanin/raw")),
            ratio(Some(st.median), rep.get("fanin/tokio-util feed")),
            ratio(Some(st.median), rep.get("fanin/asynchronous-codec feed")),
        );
    }
    rep.md.push_str(&md);
    rep.md.push('\n');
}
