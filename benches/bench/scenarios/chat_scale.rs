//! Scenario 4, at scale: the chat room with its clients in another process
//! (`--child-chat`), at 100 and at 10,000 clients: how long they take to
//! join, the server's RSS per client, and the fan-out rate.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use smol::LocalExecutor;

use super::chat::{chat_run, connect_clients, CHAT_TEXT};
use crate::harness::{malloc_trim, open_fds, percentile, raise_nofile, rss_bytes};
use crate::report::{si, Report};
use crate::Cfg;

use chatpipe_chat::{self as chat_server, Disconnect, Event, Usage};

/// The child: `clients` chat clients of the room at `addr`, all on one
/// thread. Says `JOINED <secs>` once every one is in the room; on `GO`
/// (stdin), runs once with `senders` of them sending `msgs` each, and
/// says `RUN <deliveries> <secs> <p50 µs> <p99 µs> <max µs>`; on `BYE`,
/// closes them all and says `DONE`.
pub(crate) fn child_chat(addr: &str, clients: usize, senders: usize, msgs: u64) {
    raise_nofile();
    let addr: SocketAddr = addr.parse().expect("--child-chat ADDR");
    let ex = Rc::new(LocalExecutor::new());
    let ex2 = ex.clone();
    smol::block_on(ex.run(async move {
        let ex = ex2;
        let t0 = Instant::now();
        let mut cs = connect_clients(&ex, addr, clients).await;
        say(&format!("JOINED {}", t0.elapsed().as_secs_f64()));
        expect_line("GO").await;
        let run = chat_run(&ex, &mut cs, senders, msgs, None).await;
        let max = run
            .latencies
            .last()
            .map_or(f64::NAN, |&v| v as f64 / 1000.0);
        say(&format!(
            "RUN {} {} {} {} {max}",
            run.deliveries,
            run.secs,
            percentile(&run.latencies, 0.5),
            percentile(&run.latencies, 0.99),
        ));
        expect_line("BYE").await;
        for c in cs {
            c.tx.close();
            let _ = c.driver.await;
        }
        say("DONE");
    }));
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Waits for `word` on stdin; panics if stdin ends first.
async fn expect_line(word: &'static str) {
    smol::unblock(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match std::io::stdin().read_line(&mut line) {
                Ok(0) | Err(_) => panic!("chat child: stdin ended before {word}"),
                Ok(_) if line.trim() == word => return,
                Ok(_) => {}
            }
        }
    })
    .await
}

/// What one run at one size measured.
pub(crate) struct ScaleRun {
    pub(crate) clients: usize,
    pub(crate) senders: usize,
    pub(crate) msgs: u64,
    /// Seconds until every client was in the room.
    pub(crate) join_secs: f64,
    /// The server process's RSS growth, per client: once all joined, and
    /// its peak during the run.
    pub(crate) rss_joined: f64,
    pub(crate) rss_peak: f64,
    pub(crate) deliveries: u64,
    pub(crate) secs: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) max_us: f64,
    /// The most that waited on members, as the room's budget counts it,
    /// and the budget.
    pub(crate) peak_waiting: usize,
    pub(crate) budget: usize,
    /// Server log lines about trouble.
    pub(crate) trouble: Vec<String>,
}

/// Serves the room on this process (a thread for its accept loop, smol's
/// global executor for its clients' tasks), with `clients` clients in a
/// child process.
pub(crate) fn chat_scale(clients: usize, senders: usize, msgs: u64) -> Result<ScaleRun, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let trouble = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = trouble.clone();
    let usage = Arc::new(Usage::default());
    let config = chat_server::Config {
        rate: None,
        max_per_ip: clients + 1,
        max_connections: clients + 1,
        grace: Duration::from_secs(2),
        usage: usage.clone(),
        events: Arc::new(move |event| {
            let bad = match &event {
                Event::Disconnected { reason, .. } => {
                    !matches!(reason, Disconnect::Closed | Disconnect::ShutdownTimeout)
                }
                _ => event.is_discard(),
            } || matches!(
                event,
                Event::Refused { .. } | Event::NicknameRefused { .. } | Event::AcceptFailed(_)
            );
            if bad {
                sink.lock().unwrap().push(event.to_string());
            }
        }),
        ..chat_server::Config::default()
    };
    let budget = config.max_memory;
    malloc_trim();
    let rss0 = rss_bytes() as f64;
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let server = thread::Builder::new()
        .name("chat-server".into())
        .spawn(move || {
            let listener = smol::net::TcpListener::try_from(listener).expect("async listener");
            smol::block_on(chat_server::serve(listener, config, async move {
                let _ = stopped.recv().await;
            }));
        })
        .map_err(|e| e.to_string())?;
    let stop_server = || {
        let _ = stop.send_blocking(());
        server
            .join()
            .map_err(|_| "the chat server panicked".to_string())
    };

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "--child-chat".to_string(),
            addr.to_string(),
            clients.to_string(),
            senders.to_string(),
            msgs.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("child: {e}"))?;
    let mut to_child = child.stdin.take().expect("piped stdin");
    let mut from_child = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut ran = || -> Result<ScaleRun, String> {
        let joined = expect(&mut from_child, "JOINED")?;
        malloc_trim();
        let rss_joined = rss_bytes() as f64;
        // The peak RSS during the run, as it is (no trimming).
        let (done, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let sampler = {
            let (done, peak) = (done.clone(), peak.clone());
            thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(10));
                }
            })
        };
        writeln!(to_child, "GO").map_err(|e| e.to_string())?;
        let run = expect(&mut from_child, "RUN");
        done.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let run = run?;
        writeln!(to_child, "BYE").map_err(|e| e.to_string())?;
        expect(&mut from_child, "DONE")?;
        let per_client = |rss: f64| (rss - rss0) / clients as f64;
        Ok(ScaleRun {
            clients,
            senders,
            msgs,
            join_secs: joined[0],
            rss_joined: per_client(rss_joined),
            rss_peak: per_client(peak.load(Ordering::Relaxed) as f64),
            deliveries: run[0] as u64,
            secs: run[1],
            p50_us: run[2],
            p99_us: run[3],
            max_us: run[4],
            peak_waiting: usage.peak_waiting(),
            budget,
            trouble: Vec::new(),
        })
    };
    let result = ran();
    drop(to_child);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    stop_server()?;
    let mut run = result?;
    if !status.success() {
        return Err(format!("the chat child exited with {status}"));
    }
    run.trouble = trouble.lock().unwrap().clone();
    Ok(run)
}

/// Reads the child's lines until one starting with `word`; returns the
/// numbers after it.
fn expect(from_child: &mut impl BufRead, word: &str) -> Result<Vec<f64>, String> {
    let mut line = String::new();
    loop {
        line.clear();
        match from_child.read_line(&mut line) {
            Ok(0) => return Err(format!("the chat child ended before {word}")),
            Err(e) => return Err(format!("reading the chat child: {e}")),
            Ok(_) => {}
        }
        let mut words = line.split_whitespace();
        if words.next() == Some(word) {
            return Ok(words.filter_map(|w| w.parse().ok()).collect());
        }
    }
}

pub(crate) fn scenario_chat_scale(cfg: &Cfg, rep: &mut Report) {
    // The server holds one end of each connection, the child the other.
    let limit = raise_nofile();
    let fit = limit.saturating_sub(open_fds() + 64) as usize;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 4b. chat at scale: the clients in another process\n\n\
         The same room, served the same way (accept loop on a thread of its own, client tasks on \
         smol's global executor), in the bench process; the clients, `Builder` defaults with a \
         nickname each, all on one thread of a child process (`--child-chat`), which connects them \
         one after another. *joined in*: until the last one's nickname was acknowledged. *server \
         RSS per client*: the bench process's RSS (/proc/self/statm) growth over the clients, once \
         all have joined (after `malloc_trim`), and at its peak during the run (sampled every 10 \
         ms, not trimmed). Then one saturated run: the first senders each send Chat messages of \
         {CHAT_TEXT} B as fast as `send().await` returns; every client checks it got every one \
         meant for it. *peak waiting*: the most the room's memory budget (`max_memory`, its \
         default here) counted as waiting on clients.\n"
    );
    let _ = writeln!(
        md,
        "| clients | joined in | server RSS per client, joined | peak, during the run | senders x messages | deliveries | delivered/s | p50 µs | p99 µs | max µs | peak waiting (budget) |\n\
         |---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"
    );
    for &(clients, msgs) in &cfg.chat_scale {
        let clients = if clients > fit {
            let note = format!(
                "chat at scale: {clients} clients scaled down to {fit}: the open-file limit is \
                 {limit}"
            );
            let _ = writeln!(md, "**Note**: {note}.\n");
            rep.notes.push(note);
            fit
        } else {
            clients
        };
        let senders = cfg.chat_senders.min(clients);
        eprintln!(
            "chat at scale ({clients} clients in a child process, {senders} senders x {msgs}) ..."
        );
        match chat_scale(clients, senders, msgs) {
            Ok(r) => {
                let expected = r.msgs * r.senders as u64 * (r.clients as u64 - 1);
                assert_eq!(r.deliveries, expected, "chat at scale: deliveries lost");
                let rate = r.deliveries as f64 / r.secs;
                rep.set(format!("chat_scale/{clients}/delivered_per_s"), rate);
                rep.set(format!("chat_scale/{clients}/rss_per_client"), r.rss_joined);
                rep.set(
                    format!("chat_scale/{clients}/peak_rss_per_client"),
                    r.rss_peak,
                );
                let _ = writeln!(
                    md,
                    "| {} | {:.1} s | {:.1} KiB | {:.1} KiB | {} x {} | {} | {} | {:.0} | {:.0} | {:.0} | {} ({}) |",
                    r.clients,
                    r.join_secs,
                    r.rss_joined / 1024.0,
                    r.rss_peak / 1024.0,
                    r.senders,
                    r.msgs,
                    si(r.deliveries as f64),
                    si(rate),
                    r.p50_us,
                    r.p99_us,
                    r.max_us,
                    bytes(r.peak_waiting as f64),
                    bytes(r.budget as f64),
                );
                if !r.trouble.is_empty() {
                    let note = format!(
                        "chat at scale, {clients} clients: the server logged {} problem line(s), \
                         first: {}",
                        r.trouble.len(),
                        r.trouble[0]
                    );
                    rep.notes.push(note);
                }
            }
            Err(e) => {
                eprintln!("chat at scale, {clients} clients: {e}");
                let _ = writeln!(md, "| {clients} | failed: {e} | | | | | | | | | |");
            }
        }
    }
    md.push('\n');
    rep.md.push_str(&md);
}

/// 1.5 MiB, 6.0 GiB.
fn bytes(b: f64) -> String {
    if b >= f64::from(1 << 30) {
        format!("{:.1} GiB", b / f64::from(1 << 30))
    } else if b >= f64::from(1 << 20) {
        format!("{:.1} MiB", b / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}
