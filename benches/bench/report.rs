//! The report: metrics gathered by the scenarios, number formatting, the
//! machine facts at the top, the targets table at the end, the oneway CSV,
//! and where the files go.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::SystemTime;

use crate::chart::oneway_svg;
use crate::Cfg;

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) md: String,
    pub(crate) metrics: BTreeMap<String, f64>,
    /// size, stack, N, median msgs/s, min, max
    pub(crate) oneway: Vec<(usize, &'static str, u64, f64, f64, f64)>,
    pub(crate) notes: Vec<String>,
}

impl Report {
    pub(crate) fn get(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).copied()
    }
    pub(crate) fn set(&mut self, key: String, v: f64) {
        self.metrics.insert(key, v);
    }
}

/// 12.3M, 456k, 789.
pub(crate) fn si(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let (v, unit) = if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    if v >= 100.0 {
        format!("{v:.0}{unit}")
    } else if v >= 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.2}{unit}")
    }
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}x", a / b),
        _ => "–".into(),
    }
}

pub(crate) fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

// ---------------------------------------------------------------------------
// Machine facts
// ---------------------------------------------------------------------------

fn first_line_of(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .next()
        .map(str::to_string)
}

fn lock_version(lock: &str, name: &str) -> String {
    let needle = format!("name = \"{name}\"\nversion = \"");
    lock.find(&needle)
        .map(|i| {
            let rest = &lock[i + needle.len()..];
            rest[..rest.find('"').unwrap_or(0)].to_string()
        })
        .unwrap_or_else(|| "?".into())
}

/// UTC date and time, from the system clock (no date crate needed).
pub(crate) fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        sod / 3600,
        (sod / 60) % 60
    )
}

pub(crate) fn machine_info(cfg: &Cfg) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .unwrap_or_default();
    let rustc = first_line_of("rustc", &["--version"]).unwrap_or_else(|| "unknown".into());
    let git = first_line_of(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .unwrap_or_else(|| "?".into());
    let mut s = String::new();
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date | {} |", utc_now());
    let _ = writeln!(s, "| nproc | {nproc} |");
    let _ = writeln!(s, "| CPU | {model} |");
    let _ = writeln!(s, "| kernel | {kernel} |");
    let _ = writeln!(s, "| load average at start | {} |", load.join(" "));
    let _ = writeln!(s, "| rustc | {rustc} |");
    let _ = writeln!(
        s,
        "| chatpipe | {} (git {git}) |",
        env!("CARGO_PKG_VERSION")
    );
    let crates = [
        "tokio",
        "tokio-util",
        "smol",
        "async-io",
        "async-channel",
        "bytes",
        "futures",
    ];
    let versions: Vec<String> = crates
        .iter()
        .map(|c| format!("{c} {}", lock_version(&lock, c)))
        .collect();
    let _ = writeln!(s, "| crates (Cargo.lock) | {} |", versions.join(", "));
    let _ = writeln!(
        s,
        "| mode | {} ({} repetitions per measurement) |",
        if cfg.quick {
            "QUICK smoke run (CHATPIPE_BENCH_QUICK): numbers are rough"
        } else {
            "full"
        },
        cfg.reps
    );
    s
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

pub(crate) fn targets(rep: &mut Report) {
    struct T {
        what: String,
        goal: String,
        measured: Option<f64>,
        unit: &'static str,
        met: Option<bool>,
    }
    let get = |k: &str| rep.get(k);
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ge = |v: Option<f64>, t: f64| v.map(|v| v >= t);
    let le = |v: Option<f64>, t: f64| v.map(|v| v <= t);
    let pairs = get("memory/pairs").unwrap_or(0.0);
    let mut list = Vec::new();
    let mut push = |what: String, goal: &str, measured: Option<f64>, unit, met| {
        list.push(T {
            what,
            goal: goal.into(),
            measured,
            unit,
            met,
        })
    };
    // oneway: plain `send().await` against the best batched peer on the
    // same runtime.
    for (size, smol_goal, tokio_goal) in [(16, 1.0, 1.0), (64, 1.0, 1.0), (1024, 1.0, 1.5)] {
        let name = size_name(size);
        let r = div(
            get(&format!("oneway/{size}/chatpipe send")),
            get(&format!("oneway/{size}/asynchronous-codec feed")),
        );
        push(
            format!("oneway {name}, smol: chatpipe send vs asynchronous-codec feed"),
            if smol_goal == 1.0 {
                ">= 1.0x"
            } else {
                ">= 1.5x"
            },
            r,
            "x",
            ge(r, smol_goal),
        );
        let r = div(
            get(&format!("oneway/{size}/chatpipe send (tokio)")),
            get(&format!("oneway/{size}/tokio-util feed")),
        );
        push(
            format!("oneway {name}, tokio: chatpipe send vs tokio-util feed"),
            if tokio_goal == 1.0 {
                ">= 1.0x"
            } else {
                ">= 1.5x"
            },
            r,
            "x",
            ge(r, tokio_goal),
        );
    }
    let raw64k = get("oneway/65536/raw");
    for (rt, stack) in [
        ("smol", "chatpipe send"),
        ("tokio", "chatpipe send (tokio)"),
    ] {
        let med = get(&format!("oneway/65536/{stack}"));
        let r = div(med, raw64k);
        // Spread: the runs' farthest from the median, either way.
        let spread = match (
            med,
            get(&format!("oneway/65536/{stack}/min")),
            get(&format!("oneway/65536/{stack}/max")),
        ) {
            (Some(m), Some(lo), Some(hi)) if m > 0.0 => Some((hi / m - 1.0).max(1.0 - lo / m)),
            _ => None,
        };
        push(
            format!("oneway 64 KiB, {rt}: chatpipe send vs raw"),
            ">= 0.9x",
            r,
            "x",
            ge(r, 0.9),
        );
        push(
            format!("oneway 64 KiB, {rt}: chatpipe send, spread of the runs"),
            "< ±15%",
            spread.map(|v| v * 100.0),
            "%",
            spread.map(|v| v < 0.15),
        );
    }
    for (rt, stack, peer) in [
        ("smol", "chatpipe send", "asynchronous-codec feed"),
        ("tokio", "chatpipe send (tokio)", "tokio-util feed"),
    ] {
        let r = div(
            get(&format!("fanin/{stack}")),
            get(&format!("fanin/{peer}")),
        );
        push(
            format!("fanin 100 x 64 B, {rt}: chatpipe send vs {peer}"),
            ">= 1.0x",
            r,
            "x",
            ge(r, 1.0),
        );
    }
    for (rt, stack, peer) in [
        ("smol", "chatpipe request()", "asynchronous-codec ping-pong"),
        (
            "tokio",
            "chatpipe request() on tokio",
            "tokio-util ping-pong",
        ),
    ] {
        let r = div(
            get(&format!("rtt/one CPU/{stack}/p50")),
            get(&format!("rtt/one CPU/{peer}/p50")),
        );
        push(
            format!("rtt p50, one CPU, {rt}: chatpipe request() vs {peer}"),
            "<= 1.05x",
            r,
            "x",
            le(r, 1.05),
        );
    }
    for (rt, stack) in [
        ("smol", "chatpipe call()"),
        ("tokio", "chatpipe call() on tokio"),
    ] {
        let cp = get(&format!("pipelined/{stack}"));
        let r = div(cp, get("pipelined/tarpc"));
        push(
            format!("pipelined 64 x 64 B, {rt}: chatpipe vs tarpc"),
            ">= 3x",
            r,
            "x",
            ge(r, 3.0),
        );
        let r = div(cp, get("pipelined/raw one-thread client"));
        push(
            format!("pipelined 64 x 64 B, {rt}: chatpipe vs raw one-thread client"),
            ">= 0.8x",
            r,
            "x",
            ge(r, 0.8),
        );
    }
    // Chat fan-out (scenario 4) has its rows after this list, with the
    // chat scenario's own keys.
    // Keepalive CPU against the floor, both measured with the same
    // connections over the same window.
    let r = div(get("memory/chatpipe/cpu_pct"), get("memory/floor/cpu_pct"));
    push(
        format!("keepalive CPU, {pairs:.0} idle connections: chatpipe vs the floor"),
        "<= 2x",
        r,
        "x",
        le(r, 2.0),
    );
    let rss = get("memory/chatpipe/rss_per_end");
    push(
        "idle connection: RSS per connection end".into(),
        "<= 4096 B",
        rss,
        " B",
        le(rss, 4096.0),
    );
    for (what, key, goal, t) in [
        (
            "allocations per message sent (64 B)",
            "allocs/chatpipe/64/send",
            "<= 1",
            1.0,
        ),
        (
            "allocations per message received (64 B)",
            "allocs/chatpipe/64/recv",
            "<= 1",
            1.0,
        ),
        (
            "allocations per request() round trip, client thread",
            "allocs/chatpipe/request/send",
            "<= 2 (1 sent + 1 received)",
            2.0,
        ),
        (
            "allocations per request() round trip, server thread",
            "allocs/chatpipe/request/recv",
            "<= 2 (1 received + 1 sent)",
            2.0,
        ),
    ] {
        let v = get(key);
        push(what.into(), goal, v, "", le(v, t));
    }
    let mut md = String::from(
        "## Targets (issue 12)\n\n| target | goal | measured | met |\n|---|---|---:|:---:|\n",
    );
    for t in list {
        let measured = match t.measured {
            Some(v) if t.unit == " B" => format!("{v:.0}{}", t.unit),
            Some(v) => format!("{v:.3}{}", t.unit),
            None => "not measured".into(),
        };
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**NO**",
            None => "–",
        };
        let _ = writeln!(md, "| {} | {} | {measured} | {met} |", t.what, t.goal);
    }
    // Issue 12's chat fan-out row: ratios against nats-server and
    // redis-server, driven by the same load generator in the same run.
    let chat = |k: &str| rep.get(&format!("chat/{k}"));
    let peer = match (chat("nats/delivered_per_s"), chat("redis/delivered_per_s")) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let fan = div(chat("chatpipe/delivered_per_s"), peer);
    let paced = div(chat("chatpipe/paced_p50_us"), chat("redis/paced_p50_us"));
    let mark = |met: Option<bool>| match met {
        Some(true) => "yes",
        Some(false) => "**NO**",
        None => "–",
    };
    let show = |v: Option<f64>| v.map_or("not measured".into(), |v| format!("{v:.3}x"));
    let _ = writeln!(
        md,
        "| chat fan-out, {} clients, saturated: chatpipe chat_server delivered/s vs the faster of nats-server and redis-server | >= 1.0x | {} | {} |",
        rep.get("chat/clients").unwrap_or(100.0),
        show(fan),
        mark(ge(fan, 1.0)),
    );
    let _ = writeln!(
        md,
        "| chat fan-out, paced at 10,000 msgs/s: chatpipe p50 vs redis-server p50 | <= 1.0x | {} | {} |",
        show(paced),
        mark(le(paced, 1.0)),
    );
    // Issue §6: 10,000 clients, reported next to 100; no figure to meet.
    let scale: Vec<String> = [100, 10_000]
        .iter()
        .filter_map(|n| {
            let rate = rep.get(&format!("chat_scale/{n}/delivered_per_s"))?;
            let rss = rep.get(&format!("chat_scale/{n}/rss_per_client"))?;
            Some(format!(
                "{n}: {} deliveries/s, {:.1} KiB server RSS per client",
                si(rate),
                rss / 1024.0
            ))
        })
        .collect();
    let scale = if scale.is_empty() {
        "not measured".into()
    } else {
        scale.join("; ")
    };
    let _ = writeln!(
        md,
        "| chat at scale, clients in another process (scenario 4b; informational) | none given | {scale} | – |\n"
    );
    floors(rep, &mut md);
    rep.md.push_str(&md);
}

/// Where the small-message targets stand against the handoff floor
/// (`stacks::oneway_handoff_floor`): the floor's share of the batched peer
/// is what a design with a driver task can reach at best, chatpipe's share
/// of the floor what its own code costs above that.
fn floors(rep: &Report, md: &mut String) {
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let show = |v: Option<f64>| v.map_or("not measured".into(), |v| format!("{v:.3}x"));
    let _ = writeln!(
        md,
        "## Floors (issue 12): the handoff floor\n\n\
         The handoff floor (scenarios 1, 2, 2b and 3; in scenario 4 the fan-out floor) is the least a message costs when a task of its \
         own owns each end's socket, as chatpipe's driver does so that it reads while the application \
         is busy: the runtime's framed codec and a lock-free single-threaded queue, nothing else (no \
         protocol, no request ids). The calls floor (2b) adds what a call API cannot do without: request \
         ids, the table of outstanding ones, a future per call. *floor / peer* is the most such a design can reach against the \
         peer; *chatpipe / floor* is what chatpipe's own code keeps of the floor. Rates: higher is \
         better; the rtt rows are p50 latencies, lower is better.\n\n\
         | measure | peer | floor / peer | chatpipe / floor |\n|---|---|---:|---:|"
    );
    let mut rows = Vec::new();
    for size in [16, 64] {
        rows.push((
            format!("oneway {}, smol", size_name(size)),
            "asynchronous-codec `feed`".to_string(),
            format!("oneway/{size}/handoff floor"),
            format!("oneway/{size}/asynchronous-codec feed"),
            format!("oneway/{size}/chatpipe send"),
        ));
        rows.push((
            format!("oneway {}, tokio", size_name(size)),
            "tokio-util `feed`".into(),
            format!("oneway/{size}/handoff floor (tokio)"),
            format!("oneway/{size}/tokio-util feed"),
            format!("oneway/{size}/chatpipe send (tokio)"),
        ));
    }
    rows.push((
        "fanin 100 x 64 B, smol".into(),
        "asynchronous-codec `feed`".into(),
        "fanin/handoff floor".into(),
        "fanin/asynchronous-codec feed".into(),
        "fanin/chatpipe send".into(),
    ));
    rows.push((
        "fanin 100 x 64 B, tokio".into(),
        "tokio-util `feed`".into(),
        "fanin/handoff floor (tokio)".into(),
        "fanin/tokio-util feed".into(),
        "fanin/chatpipe send (tokio)".into(),
    ));
    rows.push((
        "rtt p50, one CPU, smol (lower is better)".into(),
        "asynchronous-codec ping-pong".into(),
        "rtt/one CPU/handoff floor/p50".into(),
        "rtt/one CPU/asynchronous-codec ping-pong/p50".into(),
        "rtt/one CPU/chatpipe request()/p50".into(),
    ));
    rows.push((
        "rtt p50, one CPU, tokio (lower is better)".into(),
        "tokio-util ping-pong".into(),
        "rtt/one CPU/handoff floor (tokio)/p50".into(),
        "rtt/one CPU/tokio-util ping-pong/p50".into(),
        "rtt/one CPU/chatpipe request() on tokio/p50".into(),
    ));
    // A connection with a keepalive or idle deadline keeps a timer armed,
    // which each runtime's timer charges on every turn; the ping-pongs arm
    // none.
    rows.push((
        "rtt p50, one CPU, smol, the floor with a deadline armed (lower is better)".into(),
        "asynchronous-codec ping-pong".into(),
        "rtt/one CPU/handoff floor, a deadline armed/p50".into(),
        "rtt/one CPU/asynchronous-codec ping-pong/p50".into(),
        "rtt/one CPU/chatpipe request()/p50".into(),
    ));
    rows.push((
        "rtt p50, one CPU, tokio, the floor with a deadline armed (lower is better)".into(),
        "tokio-util ping-pong".into(),
        "rtt/one CPU/handoff floor, a deadline armed (tokio)/p50".into(),
        "rtt/one CPU/tokio-util ping-pong/p50".into(),
        "rtt/one CPU/chatpipe request() on tokio/p50".into(),
    ));
    // The calls floor adds what a call API cannot do without: ids, the
    // table, a future per call (scenario 2b).
    for (runtime, floors, chatpipe) in [
        ("smol", ["handoff floor", "calls floor"], "chatpipe call()"),
        (
            "tokio",
            ["handoff floor (tokio)", "calls floor (tokio)"],
            "chatpipe call() on tokio",
        ),
    ] {
        for floor in floors {
            let which = floor.trim_end_matches(" (tokio)");
            for peer in ["raw one-thread client", "tarpc"] {
                rows.push((
                    format!("pipelined 64 x 64 B, {runtime}, {which}"),
                    peer.into(),
                    format!("pipelined/{floor}"),
                    format!("pipelined/{peer}"),
                    format!("pipelined/{chatpipe}"),
                ));
            }
        }
    }
    rows.push((
        "chat fan-out paced p50, the floor on one thread (lower is better)".into(),
        "redis-server".into(),
        "chat/floor/paced_p50_us".into(),
        "chat/redis/paced_p50_us".into(),
        "chat/chatpipe/paced_p50_us".into(),
    ));
    rows.push((
        "chat fan-out paced p50, the floor on every thread, as the room (lower is better)".into(),
        "redis-server".into(),
        "chat/floor_threads/paced_p50_us".into(),
        "chat/redis/paced_p50_us".into(),
        "chat/chatpipe/paced_p50_us".into(),
    ));
    for (what, peer_name, floor, peer, chatpipe) in rows {
        let floor = rep.get(&floor);
        let _ = writeln!(
            md,
            "| {what} | {peer_name} | {} | {} |",
            show(div(floor, rep.get(&peer))),
            show(div(rep.get(&chatpipe), floor)),
        );
    }
    // Allocations per round trip: what async-io's reactor allocates for
    // any stack (asynchronous-codec's ping-pong), and what chatpipe does
    // with and without a timer registered in it.
    let both = |k: &str| match (
        rep.get(&format!("allocs/{k}/send")),
        rep.get(&format!("allocs/{k}/recv")),
    ) {
        (Some(a), Some(b)) => format!("{:.2} ({a:.2} + {b:.2})", a + b),
        _ => "not measured".into(),
    };
    let _ = writeln!(
        md,
        "\nAllocations per `request()` round trip on smol, both threads (client + server): \
         asynchronous-codec ping-pong (async-io's reactor alone) {}; the same with a deadline \
         armed in async-io on each side {}; chatpipe with no timer in async-io {}; chatpipe {}.",
        both("ac/pingpong"),
        both("ac/pingpong-deadline"),
        both("chatpipe/request-frozen"),
        both("chatpipe/request"),
    );
    md.push('\n');
}

// ---------------------------------------------------------------------------
// Outputs: CSV, and the files written
// ---------------------------------------------------------------------------

pub(crate) fn oneway_csv(rep: &Report) -> String {
    let mut s = String::from(
        "size_bytes,stack,n,msgs_per_s_median,msgs_per_s_min,msgs_per_s_max,mb_per_s_median\n",
    );
    for &(size, stack, n, med, min, max) in &rep.oneway {
        let _ = writeln!(
            s,
            "{size},{stack},{n},{med:.0},{min:.0},{max:.0},{:.1}",
            med * size as f64 / 1e6
        );
    }
    s
}

/// `target/bench` (the target directory of this build, wherever
/// `CARGO_TARGET_DIR` or the Cargo configuration put it).
fn default_out_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("bench")
}

/// Writes the markdown to `CHATPIPE_BENCH_OUT` (default
/// `target/bench/results.md`), the oneway CSV (`results.csv`) and the chart
/// (`throughput.svg`) beside it, and the chart to docs/throughput.svg as well
/// only when asked (`--update-docs`, `CHATPIPE_BENCH_UPDATE_DOCS=1`).
pub(crate) fn write_outputs(cfg: &Cfg, rep: &Report) {
    let path = match std::env::var("CHATPIPE_BENCH_OUT") {
        Ok(out) if !out.is_empty() => PathBuf::from(out),
        _ => default_out_dir().join("results.md"),
    };
    let csv = path.with_extension("csv");
    let svg = path.with_file_name("throughput.svg");
    let subtitle = format!(
        "{}; {}",
        if cfg.quick { "QUICK run" } else { "full run" },
        utc_now()
    );
    let chart = oneway_svg(rep, &subtitle);
    let docs_svg = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/throughput.svg");
    let mut files = vec![
        (path, rep.md.clone()),
        (csv, oneway_csv(rep)),
        (svg, chart.clone()),
    ];
    if cfg.update_docs {
        files.push((docs_svg, chart));
    } else {
        eprintln!(
            "{} left as it is (--update-docs or CHATPIPE_BENCH_UPDATE_DOCS=1 to update it)",
            docs_svg.display()
        );
    }
    for (p, body) in files {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::write(&p, body) {
            Ok(()) => eprintln!("wrote {}", p.display()),
            Err(e) => eprintln!("could not write {}: {e}", p.display()),
        }
    }
}
