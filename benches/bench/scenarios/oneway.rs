//! Scenario 1: oneway, one connection, N messages.

use std::fmt::Write as _;

use crate::harness::{calibrated, stats};
use crate::report::{ratio, si, size_name, Report};
use crate::stacks::{
    oneway_ac, oneway_chatpipe, oneway_chatpipe_tokio, oneway_handoff_floor,
    oneway_handoff_floor_tokio, oneway_raw, oneway_tokio, CpSend,
};
use crate::Cfg;

/// Payload sizes of the oneway runs (and the chart's x axis).
pub(crate) const SIZES: [usize; 4] = [16, 64, 1024, 64 * 1024];

const ONEWAY_STACKS: [&str; 10] = [
    "raw",
    "tokio-util feed",
    "tokio-util send",
    "asynchronous-codec feed",
    "asynchronous-codec send",
    "handoff floor",
    "chatpipe send",
    "chatpipe try_send",
    "chatpipe send (tokio)",
    "handoff floor (tokio)",
];

pub(crate) fn scenario_oneway(cfg: &Cfg, rep: &mut Report) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 1. oneway: one connection, N messages\n\n\
         Messages/s at the receiver (from the start signal to the N-th message), median of {} runs, \
         spread min–max; MB/s counts payload bytes (10^6). chatpipe's Raw protocol adds a 1-byte tag \
         to each payload. tokio-util, `chatpipe send (tokio)` and `handoff floor (tokio)` run on tokio; \
         asynchronous-codec, `handoff floor` and the other chatpipe rows on smol. handoff floor: \
         the least a design like chatpipe's can cost, a task that owns the socket and the application's \
         task on each side, a bounded single-threaded queue between them, the runtime's framed codec \
         (asynchronous-codec or tokio-util) `feed`ing each batch.\n",
        cfg.reps
    );
    let _ = writeln!(
        md,
        "| size | stack | N | msgs/s | spread | MB/s | x raw | x tokio-util feed | x asynchronous-codec feed |\n|---|---|---:|---:|---|---:|---:|---:|---:|"
    );
    for size in SIZES {
        for stack in ONEWAY_STACKS {
            eprintln!("oneway {} {stack} ...", size_name(size));
            let (n, secs) = match stack {
                "raw" => calibrated(cfg, |n| oneway_raw(size, n)),
                "tokio-util feed" => calibrated(cfg, |n| oneway_tokio(size, n, false)),
                "tokio-util send" => calibrated(cfg, |n| oneway_tokio(size, n, true)),
                "asynchronous-codec feed" => calibrated(cfg, |n| oneway_ac(size, n, false)),
                "asynchronous-codec send" => calibrated(cfg, |n| oneway_ac(size, n, true)),
                "handoff floor" => calibrated(cfg, |n| oneway_handoff_floor(size, n)),
                "handoff floor (tokio)" => calibrated(cfg, |n| oneway_handoff_floor_tokio(size, n)),
                "chatpipe send" => calibrated(cfg, |n| oneway_chatpipe(size, n, CpSend::Send)),
                "chatpipe send (tokio)" => calibrated(cfg, |n| oneway_chatpipe_tokio(size, n)),
                _ => calibrated(cfg, |n| oneway_chatpipe(size, n, CpSend::TrySend)),
            };
            let rates: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
            let st = stats(&rates);
            rep.set(format!("oneway/{size}/{stack}"), st.median);
            rep.set(format!("oneway/{size}/{stack}/min"), st.min);
            rep.set(format!("oneway/{size}/{stack}/max"), st.max);
            rep.oneway.push((size, stack, n, st.median, st.min, st.max));
            let raw = rep.get(&format!("oneway/{size}/raw"));
            let feed = rep.get(&format!("oneway/{size}/tokio-util feed"));
            let ac = rep.get(&format!("oneway/{size}/asynchronous-codec feed"));
            let _ = writeln!(
                md,
                "| {} | {stack} | {} | {} | {}–{} | {:.0} | {} | {} | {} |",
                size_name(size),
                si(n as f64),
                si(st.median),
                si(st.min),
                si(st.max),
                st.median * size as f64 / 1e6,
                ratio(Some(st.median), raw),
                ratio(Some(st.median), feed),
                ratio(Some(st.median), ac),
            );
        }
    }
    rep.md.push_str(&md);
    rep.md.push('\n');
}
