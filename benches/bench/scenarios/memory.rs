//! Scenario 5: memory and keepalive CPU of idle connections.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use chatpipe::raw::Raw;
use chatpipe::Builder;
use futures::StreamExt;

use crate::counting_alloc::{delta, thread_allocs};
use crate::harness::{malloc_trim, open_fds, process_cpu_secs, raise_nofile, rss_bytes};
use crate::report::Report;
use crate::stacks::{fanin_pairs, smol_stream, smol_thread, tokio_framed, tokio_thread};
use crate::Cfg;

/// Runs in a child process (a fresh heap, so RSS deltas are clean):
/// builds `pairs` idle loopback connections, both ends in this process, and
/// prints `IDLE <rss before> <rss after> <cpu secs> <window secs>`.
pub(crate) fn child_idle(stack: &str, pairs: usize, settle: Duration, window: Duration) {
    raise_nofile();
    let (clients, servers) = fanin_pairs(pairs);
    let mut socks = clients;
    socks.extend(servers);
    let (sock_tx, sock_rx) = std::sync::mpsc::channel::<Vec<TcpStream>>();
    let (built_tx, built_rx) = std::sync::mpsc::channel::<(u64, u64)>();
    let (stop_tx, stop_rx) = smol::channel::bounded::<()>(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let poller = Arc::new(polling::Poller::new().expect("epoll"));
    let worker = match stack {
        "floor" => {
            let poller = poller.clone();
            thread::spawn(move || {
                ready_tx.send(()).unwrap();
                let socks = sock_rx.recv().unwrap();
                keepalive_floor(&poller, socks, &built_tx, &stop_rx);
            })
        }
        "chatpipe" => smol_thread(move |ex| async move {
            smol::Timer::after(Duration::from_millis(1)).await; // reactor up
            ready_tx.send(()).unwrap();
            let socks = sock_rx.recv().unwrap();
            let before = thread_allocs();
            let mut handles = Vec::with_capacity(socks.len());
            for s in socks {
                let (tx, incoming, conn) = Builder::new().build(smol_stream(s), Raw);
                ex.spawn(conn).detach();
                handles.push((tx, incoming));
            }
            built_tx.send(delta(before)).unwrap();
            let _ = stop_rx.recv().await;
            drop(handles);
        }),
        _ => tokio_thread(move || async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            ready_tx.send(()).unwrap();
            let socks = sock_rx.recv().unwrap();
            let before = thread_allocs();
            let mut tasks = Vec::with_capacity(socks.len());
            for s in socks {
                let mut f = tokio_framed(s);
                tasks.push(tokio::spawn(async move {
                    while let Some(Ok(_)) = f.next().await {}
                }));
            }
            built_tx.send(delta(before)).unwrap();
            let _ = stop_rx.recv().await;
            for t in tasks {
                t.abort();
            }
        }),
    };
    ready_rx.recv().unwrap();
    malloc_trim();
    let rss0 = rss_bytes();
    sock_tx.send(socks).unwrap();
    let (allocs, bytes) = built_rx.recv().unwrap();
    thread::sleep(settle);
    let rss1 = rss_bytes();
    let (cpu, wall) = if window.is_zero() {
        (0.0, 0.0)
    } else {
        let (c0, t0) = (process_cpu_secs(), Instant::now());
        thread::sleep(window);
        (process_cpu_secs() - c0, t0.elapsed().as_secs_f64())
    };
    println!("IDLE {rss0} {rss1} {cpu} {wall} {allocs} {bytes}");
    let _ = stop_tx.send_blocking(());
    let _ = poller.notify();
    worker.join().unwrap();
}

/// The keepalive floor: every connection end sends chatpipe's keepalive
/// frame (the `Raw` protocol's: length 1, tag 1) after each 5 s of sending
/// nothing, and reads what its peer sends, noting the time for an idle
/// check, through one hand-written epoll loop (`polling`, level-triggered:
/// no re-arming) and one timer wheel of 10 ms slots. The unavoidable part
/// of a keepalive: one `write`, one readiness event, one `read`.
fn keepalive_floor(
    poller: &polling::Poller,
    socks: Vec<TcpStream>,
    built_tx: &std::sync::mpsc::Sender<(u64, u64)>,
    stop_rx: &smol::channel::Receiver<()>,
) {
    const TICK: Duration = Duration::from_millis(10);
    const SLOTS: usize = 512; // > 5 s of ticks
    const INTERVAL_TICKS: u64 = 500; // 5 s, chatpipe's default
    const IDLE_TICKS: u64 = 1_500; // 15 s, chatpipe's default idle timeout
    const KEEPALIVE: [u8; 5] = [0, 0, 0, 1, 1];
    let before = thread_allocs();
    let start = Instant::now();
    let tick_now = || (start.elapsed().as_nanos() / TICK.as_nanos()) as u64;
    let mut wheel: Vec<Vec<u32>> = vec![Vec::new(); SLOTS];
    let mut last_read = vec![0u64; socks.len()];
    for (i, s) in socks.iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        // SAFETY: every socket outlives its registration (deleted below).
        unsafe {
            poller
                .add_with_mode(s, polling::Event::readable(i), polling::PollMode::Level)
                .expect("epoll add");
        }
        wheel[(INTERVAL_TICKS as usize) % SLOTS].push(i as u32);
    }
    built_tx.send(delta(before)).unwrap();
    let mut events = polling::Events::new();
    let mut buf = [0u8; 4096];
    let mut tick = 0u64; // the next tick to run
    loop {
        if stop_rx.try_recv().is_ok() {
            break;
        }
        let now = tick_now();
        while tick <= now {
            let due = std::mem::take(&mut wheel[tick as usize % SLOTS]);
            for &i in &due {
                let mut s = &socks[i as usize];
                // Loopback with an idle peer: 5 bytes always fit.
                let _ = s.write(&KEEPALIVE);
                if tick.saturating_sub(last_read[i as usize]) > IDLE_TICKS {
                    panic!("floor: connection {i} idle for 15 s");
                }
            }
            let slot = &mut wheel[(tick + INTERVAL_TICKS) as usize % SLOTS];
            if slot.is_empty() {
                *slot = due;
            } else {
                slot.extend_from_slice(&due);
            }
            tick += 1;
        }
        // Sleep until the next slot with work in it.
        let wait = (0..SLOTS as u64)
            .find(|k| !wheel[(tick + k) as usize % SLOTS].is_empty())
            .map(|k| (start + TICK * (tick + k) as u32).saturating_duration_since(Instant::now()));
        events.clear();
        poller.wait(&mut events, wait).expect("epoll wait");
        let now = tick_now();
        for ev in events.iter() {
            let mut s = &socks[ev.key];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            last_read[ev.key] = now;
        }
    }
    for s in &socks {
        let _ = poller.delete(s);
    }
}

/// Runs one stack's idle connections in a child process: its figures, or
/// why there are none (the child's status and what it wrote to stderr).
fn run_child_idle(
    stack: &str,
    pairs: usize,
    settle: Duration,
    window: Duration,
) -> Result<[f64; 6], String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args([
            "--child-idle",
            stack,
            &pairs.to_string(),
            &settle.as_millis().to_string(),
            &window.as_millis().to_string(),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("IDLE "))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match v[..] {
        [a, b, c, d, e, f] => Ok([a, b, c, d, e, f]),
        _ => Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

pub(crate) fn scenario_memory(cfg: &Cfg, rep: &mut Report) {
    let limit = raise_nofile();
    let spare = open_fds() + 64;
    let fit = (limit.saturating_sub(spare) / 2) as usize;
    let pairs = cfg.idle_pairs.min(fit);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 5. memory: idle connections\n\n\
         {pairs} idle loopback connections, both ends in one fresh child process, so {} connection \
         ends; RSS (/proc/self/statm) before and {:.1} s after building them, divided by the number of \
         ends. Each chatpipe end keeps its `Sender` and `Incoming` and a spawned driver, all on one \
         smol thread, default Builder (keepalive every 5 s, idle timeout 15 s). Keepalive CPU: process \
         CPU time (`getrusage`) over {:.0} s while idle. tokio-util: one task per end \
         awaiting `Framed::next()` on one current-thread runtime, no keepalives. floor: the same \
         connections exchanging the same keepalive frames every 5 s through one hand-written \
         level-triggered epoll loop (`polling`) with one timer wheel of 10 ms slots, one thread: \
         the keepalive floor of issue 12.\n",
        2 * pairs,
        cfg.idle_settle.as_secs_f64(),
        cfg.idle_cpu_window.as_secs_f64(),
    );
    if pairs < cfg.idle_pairs {
        let note = format!(
            "memory: scaled down from {} to {pairs} connections: the open-file limit is {limit} \
             (raise it with `ulimit -n {}` for the full count)",
            cfg.idle_pairs,
            2 * cfg.idle_pairs + spare as usize,
        );
        let _ = writeln!(md, "**Note**: {note}.\n");
        rep.notes.push(note);
    }
    let _ = writeln!(
        md,
        "| stack | connection ends | RSS per end | heap allocations / bytes per end, at setup | keepalive CPU, % of one core |\n|---|---:|---:|---:|---:|"
    );
    for stack in ["chatpipe", "tokio-util", "floor"] {
        eprintln!("memory {stack} ({pairs} pairs) ...");
        let window = if stack == "tokio-util" {
            Duration::ZERO
        } else {
            cfg.idle_cpu_window
        };
        match run_child_idle(stack, pairs, cfg.idle_settle, window) {
            Ok([rss0, rss1, cpu, wall, allocs, bytes]) => {
                let per = (rss1 - rss0) / (2 * pairs) as f64;
                rep.set(format!("memory/{stack}/rss_per_end"), per);
                let cpu_pct = if wall > 0.0 {
                    let p = 100.0 * cpu / wall;
                    rep.set(format!("memory/{stack}/cpu_pct"), p);
                    format!("{p:.2}%")
                } else {
                    "– (no keepalives)".into()
                };
                let ends = (2 * pairs) as f64;
                let _ = writeln!(
                    md,
                    "| {stack} | {} | {:.0} B ({:.1} KiB) | {:.1} / {:.0} B | {cpu_pct} |",
                    2 * pairs,
                    per,
                    per / 1024.0,
                    allocs / ends,
                    bytes / ends,
                );
            }
            Err(why) => {
                eprintln!("idle child {stack} failed: {why}");
                let _ = writeln!(md, "| {stack} | {} | failed | – | – |", 2 * pairs);
                rep.notes
                    .push(format!("memory: the {stack} child failed ({why})"));
            }
        }
    }
    rep.set("memory/pairs".into(), pairs as f64);
    rep.md.push_str(&md);
    rep.md.push('\n');
}
