//! Scenario: quic, chatpipe over a QUIC stream (`chatpipe::quic`, quinn on
//! smol, TLS 1.3 by rustls with ring, a self-signed certificate made at
//! startup) next to plain TCP and TLS over TCP (the tls scenario's own
//! functions), measured side by side in one run: oneway throughput of
//! 1 KiB messages, and the round trip of a 64 B request. Handshakes and
//! the stream's preamble are done before timing starts.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use chatpipe::quic::{self, quinn, QuicStream};
use chatpipe::raw::{Raw, RawMessage};
use chatpipe_chat::tls::{self, Trust};
use futures::StreamExt;

use crate::harness::{calibrated, percentile, stats};
use crate::report::{ratio, si, Report};
use crate::scenarios::rtt::RTT_SIZE;
use crate::scenarios::tls::{self as over_tls, Tls, Wrap, ONEWAY_SIZE};
use crate::stacks::{chatpipe_builder, payload, smol_thread};
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

    /// A connected pair of endpoints on smol's runtime: the server's and
    /// the client's, and the server's address.
    fn endpoints(&self) -> (quinn::Endpoint, quinn::Endpoint, SocketAddr) {
        let udp = || UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        let runtime = Arc::new(quinn::SmolRuntime);
        let config = quinn::EndpointConfig::default;
        let server =
            quinn::Endpoint::new(config(), Some(self.server.clone()), udp(), runtime.clone())
                .expect("server endpoint");
        let client = quinn::Endpoint::new(config(), None, udp(), runtime).expect("client endpoint");
        let addr = server.local_addr().expect("its address");
        (server, client, addr)
    }
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
    let (server, client, addr) = q.endpoints();
    let q = q.clone();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let body = payload(size);
    let sender = smol_thread(move |ex| async move {
        let s = connect(client, q, addr).await;
        let (tx, _incoming, conn) = chatpipe_builder().build(s, Raw);
        let driver = ex.spawn(conn);
        go2.wait();
        for _ in 0..n {
            tx.send(RawMessage::Message(body.clone())).await.unwrap();
        }
        tx.close();
        driver.await.expect("sender driver");
    });
    let receiver = smol_thread(move |ex| async move {
        let s = accept(server).await;
        let (tx, mut incoming, conn) = chatpipe_builder().build(s, Raw);
        let driver = ex.spawn(conn);
        go.wait();
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
        secs
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

/// Round-trip times of `request()` over QUIC in nanoseconds, warm-up
/// excluded.
fn rtt(n: usize, warm: usize, q: &Quic) -> Vec<u64> {
    let (server, client, addr) = q.endpoints();
    let q = q.clone();
    let serving = smol_thread(move |ex| async move {
        let s = accept(server).await;
        let (tx, mut incoming, conn) = chatpipe_builder().build(s, Raw);
        let driver = ex.spawn(conn);
        while let Some(Ok(RawMessage::Request { id, body })) = incoming.next().await {
            if tx.send(RawMessage::Response { id, body }).await.is_err() {
                break;
            }
        }
        drop(tx);
        let _ = driver.await;
    });
    let calling = smol_thread(move |ex| async move {
        let s = connect(client, q, addr).await;
        let (tx, _incoming, conn) = chatpipe_builder().build(s, Raw);
        let driver = ex.spawn(conn);
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
        driver.await.expect("client driver");
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
         (futures-rustls) and one QUIC bidirectional stream (quinn 0.11 on smol's runtime, \
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
