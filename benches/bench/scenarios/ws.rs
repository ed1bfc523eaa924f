//! Scenario: ws, what WebSocket framing costs (the browser client's
//! transport, chatpipe_chat::web). chatpipe on smol over plain TCP and
//! over a WebSocket (async-tungstenite, each write one binary message, the
//! client's frames masked as a browser's are) through `web::WsIo`, measured
//! side by side in one run: oneway throughput of 1 KiB messages, and the
//! round trip of a 64 B request. The measuring is the tls scenario's
//! (`tls::oneway`, `tls::rtt` with `Wrap::Ws`).

use std::fmt::Write as _;

use crate::harness::{calibrated, percentile, stats};
use crate::report::{ratio, si, Report};
use crate::scenarios::rtt::RTT_SIZE;
use crate::scenarios::tls::{oneway, rtt, Wrap, ONEWAY_SIZE};
use crate::Cfg;

pub(crate) fn scenario_ws(cfg: &Cfg, rep: &mut Report) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## ws: what WebSocket framing costs\n\n\
         chatpipe on smol (`send().await`, `request()`), over plain TCP and over a WebSocket \
         (async-tungstenite through `chatpipe_chat::web::WsIo`, the browser client's transport; \
         one binary message per write, client frames masked), in the same run. Oneway: messages/s of {ONEWAY_SIZE} B, median of {} runs. \
         rtt: {} round trips of {RTT_SIZE} B per run after {} of warm-up, median over {} runs, \
         threads placed by the scheduler.\n",
        cfg.reps, cfg.rtt_n, cfg.rtt_warmup, cfg.reps
    );
    let _ = writeln!(
        md,
        "| measure | plain TCP | WebSocket | WebSocket / plain |\n|---|---:|---:|---:|"
    );
    let mut oneway_rates = Vec::new();
    for (name, t) in [("plain", Wrap::Plain), ("ws", Wrap::Ws)] {
        eprintln!("ws oneway {name} ...");
        let (n, secs) = calibrated(cfg, |n| oneway(ONEWAY_SIZE, n, t.clone()));
        let rates: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
        let rate = stats(&rates).median;
        rep.set(format!("ws/oneway/{ONEWAY_SIZE}/{name}"), rate);
        oneway_rates.push(rate);
    }
    let (plain, over_ws) = (oneway_rates[0], oneway_rates[1]);
    let _ = writeln!(
        md,
        "| oneway 1 KiB, msgs/s | {} | {} | {} |",
        si(plain),
        si(over_ws),
        ratio(Some(over_ws), Some(plain))
    );
    let _ = writeln!(
        md,
        "| oneway 1 KiB, MB/s | {:.0} | {:.0} | {} |",
        plain * ONEWAY_SIZE as f64 / 1e6,
        over_ws * ONEWAY_SIZE as f64 / 1e6,
        ratio(Some(over_ws), Some(plain))
    );
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for (name, t) in [("plain", Wrap::Plain), ("ws", Wrap::Ws)] {
        eprintln!("ws rtt {name} ...");
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            let mut v = rtt(cfg.rtt_n, cfg.rtt_warmup, t.clone());
            v.sort_unstable();
            p50s.push(percentile(&v, 0.50));
            p99s.push(percentile(&v, 0.99));
        }
        let (a, b) = (stats(&p50s).median, stats(&p99s).median);
        rep.set(format!("ws/rtt/{name}/p50"), a);
        rep.set(format!("ws/rtt/{name}/p99"), b);
        p50.push(a);
        p99.push(b);
    }
    let _ = writeln!(
        md,
        "| rtt {RTT_SIZE} B, p50 µs | {:.1} | {:.1} | {} |",
        p50[0],
        p50[1],
        ratio(Some(p50[1]), Some(p50[0]))
    );
    let _ = writeln!(
        md,
        "| rtt {RTT_SIZE} B, p99 µs | {:.1} | {:.1} | {} |",
        p99[0],
        p99[1],
        ratio(Some(p99[1]), Some(p99[0]))
    );
    rep.md.push_str(&md);
    rep.md.push('\n');
}
