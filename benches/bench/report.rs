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
    let cp64 = get("oneway/64/chatpipe send");
    let pairs = get("memory/pairs").unwrap_or(0.0);
    let r_feed = div(cp64, get("oneway/64/tokio-util feed"));
    let r_send = div(cp64, get("oneway/64/tokio-util send"));
    let r_1k = div(get("oneway/1024/chatpipe send"), get("oneway/1024/raw"));
    let r_64k = div(get("oneway/65536/chatpipe send"), get("oneway/65536/raw"));
    let r_rtt = div(
        get("rtt/one CPU/chatpipe request()/p50"),
        get("rtt/one CPU/raw ping-pong/p50"),
    );
    let r_fanin = div(get("fanin/chatpipe send"), get("fanin/tokio-util feed"));
    let rss = get("memory/chatpipe/rss_per_end");
    let cpu = get("memory/chatpipe/cpu_pct");
    let a_send = get("allocs/chatpipe/64/send");
    let a_recv = get("allocs/chatpipe/64/recv");
    let a_req_c = get("allocs/chatpipe/request/send");
    let a_req_s = get("allocs/chatpipe/request/recv");
    let list = [
        T {
            what: "oneway 64 B: chatpipe send vs tokio-util feed".into(),
            goal: ">= 1.5x".into(),
            measured: r_feed,
            unit: "x",
            met: ge(r_feed, 1.5),
        },
        T {
            what: "oneway 64 B: chatpipe send vs tokio-util send".into(),
            goal: ">= 30x".into(),
            measured: r_send,
            unit: "x",
            met: ge(r_send, 30.0),
        },
        T {
            what: "oneway 1 KiB: chatpipe send vs raw".into(),
            goal: ">= 0.6x".into(),
            measured: r_1k,
            unit: "x",
            met: ge(r_1k, 0.6),
        },
        T {
            what: "oneway 64 KiB: chatpipe send vs raw".into(),
            goal: ">= 0.8x".into(),
            measured: r_64k,
            unit: "x",
            met: ge(r_64k, 0.8),
        },
        T {
            what: "rtt p50, one CPU: chatpipe request() vs raw ping-pong".into(),
            goal: "<= 1.25x".into(),
            measured: r_rtt,
            unit: "x",
            met: le(r_rtt, 1.25),
        },
        T {
            what: "fanin 100 x 64 B: chatpipe vs tokio-util feed".into(),
            goal: ">= 1.0x".into(),
            measured: r_fanin,
            unit: "x",
            met: ge(r_fanin, 1.0),
        },
        T {
            what: "idle connection: RSS per connection end".into(),
            goal: "<= 4096 B".into(),
            measured: rss,
            unit: " B",
            met: le(rss, 4096.0),
        },
        T {
            what: format!(
                "keepalive CPU, {:.0} connections (both ends in-process)",
                pairs
            ),
            goal: "< 1% of a core (for 10,000)".into(),
            // Scaled to 10,000 connections when fewer were measured.
            measured: cpu.map(|c| if pairs > 0.0 { c * 10_000.0 / pairs } else { c }),
            unit: "% (scaled to 10,000)",
            met: cpu.map(|c| (if pairs > 0.0 { c * 10_000.0 / pairs } else { c }) < 1.0),
        },
        T {
            what: "allocations per message sent (64 B)".into(),
            goal: "<= 1".into(),
            measured: a_send,
            unit: "",
            met: le(a_send, 1.0),
        },
        T {
            what: "allocations per message received (64 B)".into(),
            goal: "<= 1".into(),
            measured: a_recv,
            unit: "",
            met: le(a_recv, 1.0),
        },
        // Each side of a round trip sends one message and receives one.
        T {
            what: "allocations per request() round trip, client thread".into(),
            goal: "<= 2 (1 sent + 1 received)".into(),
            measured: a_req_c,
            unit: "",
            met: le(a_req_c, 2.0),
        },
        T {
            what: "allocations per request() round trip, server thread".into(),
            goal: "<= 2 (1 received + 1 sent)".into(),
            measured: a_req_s,
            unit: "",
            met: le(a_req_s, 2.0),
        },
    ];
    let mut md = String::from(
        "## Targets (issue 5)\n\n| target | goal | measured | met |\n|---|---|---:|:---:|\n",
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
    rep.md.push_str(&md);
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
