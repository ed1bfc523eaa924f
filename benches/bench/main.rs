//! chatpipe's benchmark program (issue 5): `cargo bench` runs it and it
//! prints a markdown table comparing, in one run on loopback:
//!
//! - **raw**: blocking `std::net` sockets, a writer thread writing
//!   pre-encoded frames in ~512 KiB writes, a reader walking the length
//!   prefixes in a 64 KiB buffer without copying payloads — the limit;
//! - **tokio-util**: `Framed<TcpStream, LengthDelimitedCodec>` on tokio
//!   (one current-thread runtime per side), `feed` then one `flush`, and
//!   `send` per message;
//! - **asynchronous-codec**: `Framed` with a 4-byte length codec on smol
//!   (one `LocalExecutor` per side), `feed` + `flush` and `send`;
//! - **tarpc**: `client::Channel::call` with bincode on tokio (rtt and
//!   pipelined);
//! - **chatpipe** on smol (one `LocalExecutor` per side) and on tokio
//!   (`Builder::build_tokio`) through its public API with the
//!   [`Raw`](chatpipe::raw::Raw) protocol: `send().await`, `try_send`,
//!   `request()`, `call()`.
//!
//! Scenarios: oneway, rtt, pipelined (64 requests in flight), tls (oneway 1 KiB and rtt over TLS next to
//! plain TCP), ws (the same over a WebSocket, the browser client's transport, next to
//! plain TCP), quic (the same over a QUIC stream, next to TCP and TLS), fanin, chat (fan-out through the example chat server), chat-scale (the same with 100 and 10,000 clients in a child
//! process), memory (with the keepalive floor: a hand-written epoll loop), allocs.
//! Run `cargo bench` for all of them, `cargo bench -- oneway rtt` for some.
//!
//! Outputs: the markdown goes to stdout, and into files that stay under
//! Cargo's target directory unless asked otherwise:
//! - every run writes `target/bench/results.md` (the same markdown),
//!   `target/bench/results.csv` (oneway throughput) and
//!   `target/bench/throughput.svg` (the chart); `target` is wherever Cargo
//!   builds (`CARGO_TARGET_DIR` included), and `CHATPIPE_BENCH_OUT` moves
//!   the three files;
//! - only when asked, with `CHATPIPE_BENCH_UPDATE_DOCS=1` or the
//!   `--update-docs` argument (`cargo bench --bench bench -- --update-docs`),
//!   the chart also goes to `docs/throughput.svg`, the one docs/BENCHMARKS.md
//!   shows. The results section of docs/BENCHMARKS.md is not written by the
//!   bench: paste it from `target/bench/results.md`.
//!
//! The profiling and child modes (`--one`, `--child-idle`, `--child-chat`)
//! write no files.
//!
//! Environment:
//! - `CHATPIPE_BENCH_QUICK=1`: a fast smoke run (small N, 2 repetitions);
//! - `CHATPIPE_BENCH_OUT=path/results.md`: write the markdown there instead,
//!   with the oneway CSV (`results.csv`) and the chart (`throughput.svg`)
//!   beside it;
//! - `CHATPIPE_BENCH_UPDATE_DOCS=1`: as `--update-docs` above.
//!
//! Layout: this file (configuration, the scenario list, `main`),
//! `counting_alloc` (the global allocator), `harness` (statistics,
//! calibration, /proc, affinity, rlimits), `stacks` (the stacks compared),
//! `scenarios/*` (one module per scenario), `report` (metrics, machine facts,
//! targets, CSV, output files) and `chart` (the SVG).
//!
//! This program, unlike the library, uses `unsafe`: a counting global
//! allocator, and `libc` for CPU affinity and the open-file limit.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

mod chart;
mod counting_alloc;
mod harness;
mod report;
mod scenarios;
mod stacks;

use harness::percentile;
use report::{machine_info, si, targets, write_outputs, Report};
use scenarios::allocs::scenario_allocs;
use scenarios::chat::{chat_cpu_line, chat_fanout, scenario_chat_fanout};
use scenarios::chat_scale::{child_chat, scenario_chat_scale};
use scenarios::fanin::{
    fanin_ac, fanin_chatpipe, fanin_chatpipe_tokio, fanin_handoff_floor, fanin_handoff_floor_tokio,
    fanin_tokio, scenario_fanin,
};
use scenarios::loadgen::{self, serve_chat, serve_floor, serve_floor_threads, Server};
use scenarios::memory::{child_idle, scenario_memory};
use scenarios::oneway::scenario_oneway;
use scenarios::pipelined::{pipelined_case, scenario_pipelined};
use scenarios::quic::scenario_quic;
use scenarios::rtt::{
    rtt_ac, rtt_chatpipe, rtt_chatpipe_tokio, rtt_handoff_floor, rtt_handoff_floor_tokio, rtt_raw,
    rtt_tokio, scenario_rtt,
};
use scenarios::tls::scenario_tls;
use scenarios::ws::scenario_ws;
use stacks::{
    oneway_ac, oneway_chatpipe, oneway_chatpipe_tokio, oneway_handoff_floor,
    oneway_handoff_floor_tokio, oneway_raw, oneway_tokio, CpSend,
};

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

struct Cfg {
    quick: bool,
    reps: usize,
    /// Seconds one oneway run should take.
    target_secs: f64,
    rtt_n: usize,
    rtt_warmup: usize,
    fanin_conns: usize,
    fanin_msgs: usize,
    /// Chat fan-out: clients, how many of them send, messages each, runs.
    chat_clients: usize,
    chat_senders: usize,
    chat_msgs: u64,
    chat_reps: usize,
    /// Chat fan-out: seconds the paced run should take (0: none).
    chat_paced_secs: f64,
    /// Chat fan-out against the peers: messages/s of the paced run, in all.
    chat_paced_rate: f64,
    /// Chat at scale, clients in a child process: (clients, messages per
    /// sender) for each run; `chat_senders` send.
    chat_scale: Vec<(usize, u64)>,
    idle_pairs: usize,
    idle_settle: Duration,
    idle_cpu_window: Duration,
    filters: Vec<String>,
    /// Also write docs/throughput.svg (`--update-docs`,
    /// `CHATPIPE_BENCH_UPDATE_DOCS=1`).
    update_docs: bool,
}

impl Cfg {
    fn from_env() -> Cfg {
        let flag = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0");
        let quick = flag("CHATPIPE_BENCH_QUICK");
        let update_docs =
            flag("CHATPIPE_BENCH_UPDATE_DOCS") || std::env::args().any(|a| a == "--update-docs");
        // `cargo bench` passes `--bench`; other words select scenarios.
        let filters = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();
        if quick {
            Cfg {
                quick,
                reps: 2,
                target_secs: 0.05,
                rtt_n: 2_000,
                rtt_warmup: 200,
                fanin_conns: 100,
                fanin_msgs: 200,
                chat_clients: 100,
                chat_senders: 10,
                chat_msgs: 200,
                chat_reps: 2,
                chat_paced_secs: 0.5,
                chat_paced_rate: 10_000.0,
                chat_scale: vec![(100, 100), (10_000, 10)],
                idle_pairs: 1_000,
                idle_settle: Duration::from_millis(500),
                idle_cpu_window: Duration::from_secs(5),
                filters,
                update_docs,
            }
        } else {
            Cfg {
                quick,
                reps: 5,
                target_secs: 0.4,
                rtt_n: 20_000,
                rtt_warmup: 1_000,
                fanin_conns: 100,
                fanin_msgs: 2_000,
                chat_clients: 100,
                chat_senders: 10,
                chat_msgs: 2_000,
                chat_reps: 3,
                chat_paced_secs: 2.0,
                chat_paced_rate: 10_000.0,
                chat_scale: vec![(100, 200), (10_000, 50)],
                idle_pairs: 10_000,
                idle_settle: Duration::from_secs(1),
                idle_cpu_window: Duration::from_secs(10),
                filters,
                update_docs,
            }
        }
    }

    fn wants(&self, scenario: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| scenario.contains(f.as_str()))
    }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child-idle") {
        let num = |i: usize| args.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        child_idle(
            &args[2],
            num(3) as usize,
            Duration::from_millis(num(4)),
            Duration::from_millis(num(5)),
        );
        return;
    }
    if args.get(1).map(String::as_str) == Some("--serve-chat") {
        // `--serve-chat`: scenario 4's chat server (see loadgen.rs).
        serve_chat();
        return;
    }
    if args.get(1).map(String::as_str) == Some("--serve-floor") {
        // `--serve-floor`: scenario 4's fan-out floor (see loadgen.rs).
        serve_floor();
        return;
    }
    if args.get(1).map(String::as_str) == Some("--serve-floor-threads") {
        serve_floor_threads();
        return;
    }
    if args.get(1).map(String::as_str) == Some("--one")
        && args.get(2).is_some_and(|c| c == "chat")
        && std::env::var_os("SMOL_THREADS").is_none()
    {
        // The in-process room on one executor thread per core, as
        // chat_server runs it; set before anything spawns a thread.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("SMOL_THREADS", cores.to_string());
    }
    if args.get(1).map(String::as_str) == Some("--child-chat") {
        // `--child-chat ADDR CLIENTS SENDERS MSGS`: chat at scale's clients.
        let num = |i: usize| args.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let addr = args.get(2).map_or("", String::as_str);
        child_chat(addr, num(3) as usize, num(4) as usize, num(5));
        return;
    }
    if args.get(1).map(String::as_str) == Some("--one") {
        // One case, for profilers: `--one <case> <size> <n>`.
        let num = |i: usize| args.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let (case, size, n) = (
            args.get(2).map_or("", String::as_str),
            num(3) as usize,
            num(4),
        );
        let t0 = Instant::now();
        let secs = match case {
            "raw" => oneway_raw(size, n),
            "feed" => oneway_tokio(size, n, false),
            "tokio-send" => oneway_tokio(size, n, true),
            "send" => oneway_chatpipe(size, n, CpSend::Send),
            "try_send" => oneway_chatpipe(size, n, CpSend::TrySend),
            "tokio-cp-send" => oneway_chatpipe_tokio(size, n),
            "ac-feed" => oneway_ac(size, n, false),
            "ac-send" => oneway_ac(size, n, true),
            "handoff-floor" => oneway_handoff_floor(size, n),
            "handoff-floor-tokio" => oneway_handoff_floor_tokio(size, n),
            "pipelined" => pipelined_case("chatpipe call()", n),
            "pipelined-tokio" => pipelined_case("chatpipe call() on tokio", n),
            "pipelined-raw" => pipelined_case("raw one-thread client", n),
            "pipelined-tarpc" => pipelined_case("tarpc", n),
            "pipelined-floor" => pipelined_case("handoff floor", n),
            "pipelined-floor-tokio" => pipelined_case("handoff floor (tokio)", n),
            "pipelined-calls-floor" => pipelined_case("calls floor", n),
            "pipelined-calls-floor-tokio" => pipelined_case("calls floor (tokio)", n),
            "rtt-floor" | "rtt-floor-deadline" => {
                let v = rtt_handoff_floor(n as usize, 0, case.contains("deadline"));
                v.iter().sum::<u64>() as f64 / 1e9
            }
            "rtt-floor-tokio" | "rtt-floor-deadline-tokio" => {
                let v = rtt_handoff_floor_tokio(n as usize, 0, case.contains("deadline"));
                v.iter().sum::<u64>() as f64 / 1e9
            }
            "request-tokio" => {
                let v = rtt_chatpipe_tokio(n as usize, 0);
                v.iter().sum::<u64>() as f64 / 1e9
            }
            "ping-tokio" => {
                let v = rtt_tokio(n as usize, 0);
                v.iter().sum::<u64>() as f64 / 1e9
            }
            "ping-ac" => {
                let v = rtt_ac(n as usize, 0);
                v.iter().sum::<u64>() as f64 / 1e9
            }
            "request" => {
                let v = rtt_chatpipe(n as usize, 0, true);
                v.iter().sum::<u64>() as f64 / 1e9
            }
            "ping-raw" => {
                let v = rtt_raw(n as usize, 0);
                v.iter().sum::<u64>() as f64 / 1e9
            }
            "fanin" => fanin_chatpipe(100, n),
            "fanin-feed" => fanin_tokio(100, n),
            "fanin-ac" => fanin_ac(100, n),
            "fanin-floor" => fanin_handoff_floor(100, n),
            "fanin-floor-tokio" => fanin_handoff_floor_tokio(100, n),
            "fanin-tokio" => fanin_chatpipe_tokio(100, n),
            "fanout-chatpipe"
            | "fanout-nats"
            | "fanout-redis"
            | "fanout-floor"
            | "fanout-floor-threads"
            | "paced-chatpipe"
            | "paced-nats"
            | "paced-redis"
            | "paced-floor"
            | "paced-floor-threads" => {
                // Scenario 4's load generator against one server, in a
                // process of its own: `--one fanout-nats <senders> <msgs>`,
                // saturated; `paced-*`: 10,000 messages/s in all.
                let server = match &case[case.find('-').unwrap_or(0) + 1..] {
                    "chatpipe" => Server::Chatpipe,
                    "nats" => Server::Nats,
                    "floor" => Server::Floor,
                    "floor-threads" => Server::FloorThreads,
                    _ => Server::Redis,
                };
                let running = loadgen::start(server, loadgen::chat_threads())
                    .unwrap_or_else(|e| panic!("{e}"));
                let senders = if size > 0 { size } else { 10 };
                let pace = case
                    .starts_with("paced")
                    .then(|| Cfg::from_env().chat_paced_rate / senders as f64);
                let ex = std::rc::Rc::new(smol::LocalExecutor::new());
                let ex2 = ex.clone();
                let (run, cpu) = smol::block_on(ex.run(async {
                    let cs = loadgen::connect_all(server, running.addr, 100, senders).await;
                    let (cpu0, gen0) = (running.cpu_secs(), harness::process_cpu_secs());
                    let run = loadgen::run(&ex2, server, &cs, senders, n, pace).await;
                    let cpu = running.cpu_secs() - cpu0;
                    (run, (cpu, harness::process_cpu_secs() - gen0))
                }));
                eprintln!(
                    "{}: {} deliveries/s, p50 {:.0} µs, p99 {:.0} µs; CPU: server {:.2} cores, load generator {:.2}",
                    server.name(),
                    si(run.deliveries as f64 / run.secs),
                    percentile(&run.latencies, 0.5),
                    percentile(&run.latencies, 0.99),
                    cpu.0 / run.secs,
                    cpu.1 / run.secs,
                );
                run.secs
            }
            "chat" => {
                let mut cfg = Cfg::from_env();
                (cfg.chat_msgs, cfg.chat_reps, cfg.chat_paced_secs) = (n, 1, 0.0);
                if size > 0 {
                    cfg.chat_senders = size.min(cfg.chat_clients);
                }
                let r = chat_fanout(&cfg);
                let run = &r.saturated[0];
                eprintln!(
                    "chat: {} deliveries/s, p50 {:.0} µs, p99 {:.0} µs; CPU: {}; {:.2} allocs per delivery",
                    si(run.deliveries as f64 / run.secs),
                    percentile(&run.latencies, 0.5),
                    percentile(&run.latencies, 0.99),
                    chat_cpu_line(&r, run.secs),
                    run.allocs as f64 / run.deliveries as f64,
                );
                for line in &r.trouble {
                    eprintln!("chat server: {line}");
                }
                run.secs
            }
            _ => {
                eprintln!(
                    "cases: raw feed tokio-send ac-feed ac-send send try_send tokio-cp-send \
                     handoff-floor handoff-floor-tokio (size n), request request-tokio ping-raw \
                     ping-ac ping-tokio rtt-floor rtt-floor-tokio (_ n), pipelined pipelined-tokio \
                     pipelined-raw pipelined-tarpc pipelined-floor pipelined-floor-tokio (_ n), fanin fanin-feed fanin-ac fanin-tokio \
                     fanin-floor fanin-floor-tokio (_ msgs per connection), chat (senders msgs_each), \
                     fanout-SERVER paced-SERVER with SERVER chatpipe nats redis floor (senders msgs_each)"
                );
                return;
            }
        };
        println!(
            "{case} size {size} n {n}: {secs:.3} s measured, {:.3} s total, {} per s",
            t0.elapsed().as_secs_f64(),
            si(n as f64 / secs)
        );
        return;
    }
    let cfg = Cfg::from_env();
    let started = Instant::now();
    let mut rep = Report::default();
    let machine = machine_info(&cfg);
    rep.md.push_str("# chatpipe benchmarks\n\n");
    rep.md.push_str(&machine);
    rep.md.push('\n');

    type Scenario = fn(&Cfg, &mut Report);
    let scenarios: [(&str, Scenario); 11] = [
        ("oneway", scenario_oneway),
        ("rtt", scenario_rtt),
        ("pipelined", scenario_pipelined),
        ("tls", scenario_tls),
        ("quic", scenario_quic),
        ("ws", scenario_ws),
        ("fanin", scenario_fanin),
        ("chat", scenario_chat_fanout),
        ("chat-scale", scenario_chat_scale),
        ("memory", scenario_memory),
        ("allocs", scenario_allocs),
    ];
    for (name, f) in scenarios {
        if !cfg.wants(name) {
            continue;
        }
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&cfg, &mut rep)));
        if res.is_err() {
            let _ = writeln!(rep.md, "## {name}\n\n**failed** (see stderr)\n");
        }
    }
    targets(&mut rep);
    if !rep.notes.is_empty() {
        rep.md.push_str("## Notes\n\n");
        for n in &rep.notes {
            let _ = writeln!(rep.md, "- {n}");
        }
        rep.md.push('\n');
    }
    let _ = writeln!(
        rep.md,
        "_Total bench time: {:.0} s._",
        started.elapsed().as_secs_f64()
    );
    print!("{}", rep.md);

    write_outputs(&cfg, &rep);
}
