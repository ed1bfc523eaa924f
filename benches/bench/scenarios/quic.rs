//! Scenario: quic, chatpipe over a QUIC stream (`chatpipe::quic`, quinn on
//! smol, TLS 1.3 by rustls with ring, a self-signed certificate made at
//! startup) next to plain TCP and TLS over TCP (the tls scenario's own
//! functions), measured side by side in one run: oneway throughput of
//! 1 KiB messages, and the round trip of a 64 B request. Handshakes and
//! the stream's preamble are done before timing starts.

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use chatpipe::quic::{self, quinn, QuicStream};
use chatpipe::raw::{Raw, RawMessage};
use chatpipe_chat::tls::{self, Trust};
use futures::StreamExt;
use smol::Executor;

use crate::harness::{calibrated, percentile, stats};
use crate::report::{ratio, si, Report};
use crate::scenarios::rtt::{chatpipe_echo, requests, RTT_SIZE};
use crate::scenarios::tls::{self as over_tls, Tls, Wrap, ONEWAY_SIZE};
use crate::stacks::{chatpipe_builder, payload};
use crate::Cfg;

/// Both ends' QUIC configurations.
#[derive(Clone)]
struct Quic {
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
}

impl Quic {
    fn new() -> Self {
        let made = tls::self_signed(&["localhost"]).expect("a certificate");
        let client = tls::client_config(&Trust::Certs(vec![made.cert])).expect("client config");
        // Longer than any run: neither timeout plays a part here.
        let idle = Duration::from_secs(60);
        Quic {
            server: quic::server_config(&made.config, idle).expect("QUIC server config"),
            client: quic::client_config(&client, idle).expect("QUIC client config"),
        }
    }

    /// An endpoint whose tasks run on `ex`: a server's if `server`.
    fn endpoint(&self, ex: &Arc<Executor<'static>>, server: bool) -> quinn::Endpoint {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        let config = server.then(|| self.server.clone());
        let runtime = Arc::new(ThreadRuntime(ex.clone()));
        quinn::Endpoint::new(quinn::EndpointConfig::default(), config, udp, runtime)
            .expect("an endpoint")
    }
}

/// quinn on smol, its tasks spawned on the calling side's own executor
/// thread rather than smol's global one (quinn's `SmolRuntime`). With the
/// global one, both sides' endpoints shared one thread apart from their
/// connections' threads: every packet was a wake across threads, and all
/// of QUIC's work for both sides fell on that one thread (`perf record`:
/// 32% of the samples in `smol-1`, most of the rest the kernel switching
/// tasks), which a client and a server in two processes never do. Each
/// TCP side has its thread; so does each QUIC side.
#[derive(Debug)]
struct ThreadRuntime(Arc<Executor<'static>>);

impl quinn::Runtime for ThreadRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        quinn::SmolRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future).detach();
    }

    fn wrap_udp_socket(&self, sock: UdpSocket) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        quinn::SmolRuntime.wrap_udp_socket(sock)
    }
}

/// Waits at `barrier` without blocking the executor's thread, whose
/// quinn tasks must go on (a handshake's last flight, acknowledgements).
async fn wait(barrier: Arc<Barrier>) {
    smol::unblock(move || {
        barrier.wait();
    })
    .await;
}

/// Runs `f` on a new thread, on an executor of its own that quinn can
/// spawn on too (`ThreadRuntime`).
fn quic_thread<T, F, Fut>(f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce(Arc<Executor<'static>>) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    thread::spawn(move || {
        let ex = Arc::new(Executor::new());
        smol::block_on(ex.run(f(ex.clone())))
    })
}

async fn accept(endpoint: quinn::Endpoint) -> QuicStream {
    let incoming = endpoint.accept().await.expect("a connection");
    quic::accept(incoming.await.expect("QUIC handshake"))
        .await
        .expect("its stream")
}

async fn connect(endpoint: quinn::Endpoint, q: Quic, addr: SocketAddr) -> QuicStream {
    quic::connect(&endpoint, q.client, addr, "localhost")
        .await
        .expect("QUIC connect")
}

/// Seconds for the receiver to get `n` messages of `size` over QUIC, from
/// the start signal (the handshake done).
fn oneway(size: usize, n: u64, q: &Quic) -> f64 {
    let (q, q2) = (q.clone(), q.clone());
    let (addr_tx, addr_rx) = mpsc::channel();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    // Each side's quinn tasks run on its thread: both stay until both
    // connections have closed.
    let done = Arc::new(Barrier::new(2));
    let done2 = done.clone();
    let body = payload(size);
    let sender = quic_thread(move |ex| async move {
        let addr = addr_rx.recv().expect("the server's address");
        let s = connect(q.endpoint(&ex, false), q, addr).await;
        let (tx, _incoming, conn) = chatpipe_builder().build(s, Raw);
        let driver = ex.spawn(conn);
        // Waited for off the thread: quinn's tasks for this side run here.
        wait(go2).await;
        for _ in 0..n {
            tx.send(RawMessage::Message(body.clone())).await.unwrap();
        }
        tx.close();
        driver.await.expect("sender driver");
        wait(done2).await;
    });
    let receiver = quic_thread(move |ex| async move {
        let server = q2.endpoint(&ex, true);
        let _ = addr_tx.send(server.local_addr().expect("its address"));
        let s = accept(server).await;
        let (tx, mut incoming, conn) = chatpipe_builder().build(s, Raw);
        let driver = ex.spawn(conn);
        wait(go).await;
        let t0 = Instant::now();
        for _ in 0..n {
            match incoming.next().await {
                Some(Ok(RawMessage::Message(_))) => {}
                other => panic!("quic receiver: unexpected {other:?}"),
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        while incoming.next().await.is_some() {}
        drop(tx);
        driver.await.expect("receiver driver");
        wait(done).await;
        secs
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

/// Round-trip times of `request()` over QUIC in nanoseconds, warm-up
/// excluded.
fn rtt(n: usize, warm: usize, q: &Quic) -> Vec<u64> {
    let (q, q2) = (q.clone(), q.clone());
    let (addr_tx, addr_rx) = mpsc::channel();
    let done = Arc::new(Barrier::new(2));
    let done2 = done.clone();
    let serving = quic_thread(move |ex| async move {
        let server = q2.endpoint(&ex, true);
        let _ = addr_tx.send(server.local_addr().expect("its address"));
        let s = accept(server).await;
        let (tx, incoming, conn) = chatpipe_builder().build(s, Raw);
        let driver = ex.spawn(conn);
        drop(chatpipe_echo(tx, incoming).await);
        let _ = driver.await;
        wait(done).await;
    });
    let calling = quic_thread(move |ex| async move {
        let addr = addr_rx.recv().expect("the server's address");
        let s = connect(q.endpoint(&ex, false), q, addr).await;
        let (tx, _incoming, conn) = chatpipe_builder().build(s, Raw);
        let driver = ex.spawn(conn);
        let out = requests(&tx, n, warm).await;
        tx.close();
        driver.await.expect("client driver");
        wait(done2).await;
        out
    });
    let out = calling.join().unwrap();
    serving.join().unwrap();
    out
}

/// Which stack a measure runs on.
#[derive(Clone, Copy)]
enum Over {
    Tcp,
    Tls,
    Quic,
}

const STACKS: [(&str, Over); 3] = [
    ("plain", Over::Tcp),
    ("tls", Over::Tls),
    ("quic", Over::Quic),
];

pub(crate) fn scenario_quic(cfg: &Cfg, rep: &mut Report) {
    let (t, q) = (Tls::new(), Quic::new());
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## quic: chatpipe over a QUIC stream\n\n\
         chatpipe on smol (`send().await`, `request()`), over plain TCP, TLS 1.3 over TCP \
         (futures-rustls) and one QUIC bidirectional stream (quinn 0.11 on smol, each side's endpoint \
         on that side's own thread, beside its connection, as each TCP side has its thread; \
         TLS 1.3 by rustls, ring, a self-signed ECDSA P-256 certificate), in the same run; \
         handshakes before timing. Oneway: messages/s of {ONEWAY_SIZE} B, median of {} runs. \
         rtt: {} round trips of {RTT_SIZE} B per run after {} of warm-up, median over {} runs, \
         threads placed by the scheduler.\n",
        cfg.reps, cfg.rtt_n, cfg.rtt_warmup, cfg.reps
    );
    let _ = writeln!(
        md,
        "| measure | plain TCP | TLS | QUIC | QUIC / plain | QUIC / TLS |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    let mut rates = Vec::new();
    for (name, over) in STACKS {
        eprintln!("quic oneway {name} ...");
        let (n, secs) = calibrated(cfg, |n| match over {
            Over::Tcp => over_tls::oneway(ONEWAY_SIZE, n, Wrap::Plain),
            Over::Tls => over_tls::oneway(ONEWAY_SIZE, n, Wrap::Tls(t.clone())),
            Over::Quic => oneway(ONEWAY_SIZE, n, &q),
        });
        let per_sec: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
        let rate = stats(&per_sec).median;
        rep.set(format!("quic/oneway/{ONEWAY_SIZE}/{name}"), rate);
        rates.push(rate);
    }
    let row = |md: &mut String, what: &str, v: &[f64], fmt: &dyn Fn(f64) -> String| {
        let _ = writeln!(
            md,
            "| {what} | {} | {} | {} | {} | {} |",
            fmt(v[0]),
            fmt(v[1]),
            fmt(v[2]),
            ratio(Some(v[2]), Some(v[0])),
            ratio(Some(v[2]), Some(v[1]))
        );
    };
    row(&mut md, "oneway 1 KiB, msgs/s", &rates, &|r| si(r));
    let mb: Vec<f64> = rates.iter().map(|r| r * ONEWAY_SIZE as f64 / 1e6).collect();
    row(&mut md, "oneway 1 KiB, MB/s", &mb, &|r| format!("{r:.0}"));
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for (name, over) in STACKS {
        eprintln!("quic rtt {name} ...");
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            let mut v = match over {
                Over::Tcp => over_tls::rtt(cfg.rtt_n, cfg.rtt_warmup, Wrap::Plain),
                Over::Tls => over_tls::rtt(cfg.rtt_n, cfg.rtt_warmup, Wrap::Tls(t.clone())),
                Over::Quic => rtt(cfg.rtt_n, cfg.rtt_warmup, &q),
            };
            v.sort_unstable();
            p50s.push(percentile(&v, 0.50));
            p99s.push(percentile(&v, 0.99));
        }
        let (a, b) = (stats(&p50s).median, stats(&p99s).median);
        rep.set(format!("quic/rtt/{name}/p50"), a);
        rep.set(format!("quic/rtt/{name}/p99"), b);
        p50.push(a);
        p99.push(b);
    }
    row(&mut md, &format!("rtt {RTT_SIZE} B, p50 µs"), &p50, &|v| {
        format!("{v:.1}")
    });
    row(&mut md, &format!("rtt {RTT_SIZE} B, p99 µs"), &p99, &|v| {
        format!("{v:.1}")
    });
    rep.md.push_str(&md);
    rep.md.push('\n');
}
