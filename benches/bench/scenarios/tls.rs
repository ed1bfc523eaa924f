//! Scenario: tls, what encryption costs. chatpipe on smol over plain TCP
//! and over TLS (rustls by futures-rustls, crypto by ring, TLS 1.3 with a
//! self-signed ECDSA P-256 certificate made at startup), measured side by
//! side in one run: oneway throughput of 1 KiB messages, and the round trip
//! of a 64 B request. The handshake is done before timing starts.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use chatpipe::raw::{Raw, RawMessage};
use chatpipe_chat::tls::{self, rustls, Trust};
use chatpipe_chat::web::{
    self,
    async_tungstenite::{tungstenite::protocol::Role, WebSocketStream},
};
use futures::StreamExt;
use smol::io::{AsyncRead, AsyncWrite};

use crate::harness::{calibrated, percentile, stats};
use crate::report::{ratio, si, Report};
use crate::scenarios::rtt::{chatpipe_echo, requests, RTT_SIZE};
use crate::stacks::{chatpipe_builder, payload, smol_stream, smol_thread, tcp_pair};
use crate::Cfg;

pub(crate) const ONEWAY_SIZE: usize = 1024;

/// Both ends' TLS configurations, or none for plain TCP.
#[derive(Clone)]
pub(crate) struct Tls {
    acceptor: tls::TlsAcceptor,
    connector: tls::TlsConnector,
}

impl Tls {
    pub(crate) fn new() -> Self {
        let made = tls::self_signed(&["localhost"]).expect("a certificate");
        let client = tls::client_config(&Trust::Certs(vec![made.cert])).expect("client config");
        Tls {
            acceptor: tls::TlsAcceptor::from(made.config),
            connector: tls::TlsConnector::from(client),
        }
    }
}

/// What goes over the TCP connection: the chat frames as they are, TLS,
/// or a WebSocket (the ws scenario's).
#[derive(Clone)]
pub(crate) enum Wrap {
    Plain,
    Tls(Tls),
    Ws,
}

/// Runs `side` on `s`, wrapped as `wrap` says (its server or client end).
async fn over<T, F, Fut>(s: TcpStream, wrap: Wrap, server: bool, side: F) -> T
where
    F: FnOnce(Box<dyn Stream>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let s = smol_stream(s);
    let stream: Box<dyn Stream> = match (wrap, server) {
        (Wrap::Plain, _) => Box::new(s),
        (Wrap::Tls(t), true) => Box::new(t.acceptor.accept(s).await.expect("TLS accept")),
        (Wrap::Tls(t), false) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            Box::new(t.connector.connect(name, s).await.expect("TLS connect"))
        }
        (Wrap::Ws, server) => {
            let role = if server { Role::Server } else { Role::Client };
            let ws = WebSocketStream::from_raw_socket(s, role, Some(web::ws_config())).await;
            Box::new(web::WsIo::new(ws))
        }
    };
    side(stream).await
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// Seconds for the receiver to get `n` messages of `size`, from the start
/// signal (both handshakes done).
pub(crate) fn oneway(size: usize, n: u64, wrap: Wrap) -> f64 {
    let (a, b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let wrap2 = wrap.clone();
    let body = payload(size);
    let sender = smol_thread(move |ex| async move {
        over(a, wrap, false, |s| async move {
            let (tx, _incoming, conn) = chatpipe_builder().build(s, Raw);
            let driver = ex.spawn(conn);
            go2.wait();
            for _ in 0..n {
                tx.send(RawMessage::Message(body.clone())).await.unwrap();
            }
            tx.close();
            driver.await.expect("sender driver");
        })
        .await
    });
    let receiver = smol_thread(move |ex| async move {
        over(b, wrap2, true, |s| async move {
            let (tx, mut incoming, conn) = chatpipe_builder().build(s, Raw);
            let driver = ex.spawn(conn);
            go.wait();
            let t0 = Instant::now();
            for _ in 0..n {
                match incoming.next().await {
                    Some(Ok(RawMessage::Message(_))) => {}
                    other => panic!("receiver: unexpected {other:?}"),
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            while incoming.next().await.is_some() {}
            drop(tx);
            driver.await.expect("receiver driver");
            secs
        })
        .await
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

/// Round-trip times of `request()` in nanoseconds, warm-up excluded.
pub(crate) fn rtt(n: usize, warm: usize, wrap: Wrap) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let wrap2 = wrap.clone();
    let server = smol_thread(move |ex| async move {
        over(b, wrap2, true, |s| async move {
            let (tx, incoming, conn) = chatpipe_builder().build(s, Raw);
            let driver = ex.spawn(conn);
            drop(chatpipe_echo(tx, incoming).await);
            let _ = driver.await;
        })
        .await
    });
    let client = smol_thread(move |ex| async move {
        over(a, wrap, false, |s| async move {
            let (tx, _incoming, conn) = chatpipe_builder().build(s, Raw);
            let driver = ex.spawn(conn);
            let out = requests(&tx, n, warm).await;
            tx.close();
            driver.await.expect("client driver");
            out
        })
        .await
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

pub(crate) fn scenario_tls(cfg: &Cfg, rep: &mut Report) {
    let heading = format!(
        "## tls: what encryption costs\n\n\
         chatpipe on smol (`send().await`, `request()`), over plain TCP and over TLS 1.3 \
         (rustls by futures-rustls, ring, a self-signed ECDSA P-256 certificate), in the same run; \
         handshakes before timing. {}",
        measures(cfg)
    );
    compare(cfg, rep, "tls", "TLS", Wrap::Tls(Tls::new()), &heading);
}

/// How the oneway and rtt rows are measured, for a scenario's heading.
pub(crate) fn measures(cfg: &Cfg) -> String {
    format!(
        "Oneway: messages/s of {ONEWAY_SIZE} B, median of {} runs. \
         rtt: {} round trips of {RTT_SIZE} B per run after {} of warm-up, median over {} runs, \
         threads placed by the scheduler.\n",
        cfg.reps, cfg.rtt_n, cfg.rtt_warmup, cfg.reps
    )
}

/// Oneway and rtt over plain TCP and over `wrap`, in one run: a table
/// under `heading`, and the figures under `key` in the report.
pub(crate) fn compare(
    cfg: &Cfg,
    rep: &mut Report,
    key: &str,
    label: &str,
    wrap: Wrap,
    heading: &str,
) {
    let mut md = String::new();
    let _ = writeln!(md, "{heading}");
    let _ = writeln!(
        md,
        "| measure | plain TCP | {label} | {label} / plain |\n|---|---:|---:|---:|"
    );
    let sides = [("plain", Wrap::Plain), (key, wrap)];
    let mut oneway_rates = Vec::new();
    for (name, t) in &sides {
        eprintln!("{key} oneway {name} ...");
        let (n, secs) = calibrated(cfg, |n| oneway(ONEWAY_SIZE, n, t.clone()));
        let rates: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
        let rate = stats(&rates).median;
        rep.set(format!("{key}/oneway/{ONEWAY_SIZE}/{name}"), rate);
        oneway_rates.push(rate);
    }
    let (plain, over) = (oneway_rates[0], oneway_rates[1]);
    let _ = writeln!(
        md,
        "| oneway 1 KiB, msgs/s | {} | {} | {} |",
        si(plain),
        si(over),
        ratio(Some(over), Some(plain))
    );
    let _ = writeln!(
        md,
        "| oneway 1 KiB, MB/s | {:.0} | {:.0} | {} |",
        plain * ONEWAY_SIZE as f64 / 1e6,
        over * ONEWAY_SIZE as f64 / 1e6,
        ratio(Some(over), Some(plain))
    );
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for (name, t) in &sides {
        eprintln!("{key} rtt {name} ...");
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            let mut v = rtt(cfg.rtt_n, cfg.rtt_warmup, t.clone());
            v.sort_unstable();
            p50s.push(percentile(&v, 0.50));
            p99s.push(percentile(&v, 0.99));
        }
        let (a, b) = (stats(&p50s).median, stats(&p99s).median);
        rep.set(format!("{key}/rtt/{name}/p50"), a);
        rep.set(format!("{key}/rtt/{name}/p99"), b);
        p50.push(a);
        p99.push(b);
    }
    for (pct, v) in [("p50", &p50), ("p99", &p99)] {
        let _ = writeln!(
            md,
            "| rtt {RTT_SIZE} B, {pct} µs | {:.1} | {:.1} | {} |",
            v[0],
            v[1],
            ratio(Some(v[1]), Some(v[0]))
        );
    }
    rep.md.push_str(&md);
    rep.md.push('\n');
}
