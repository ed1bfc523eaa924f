//! Scenario 4: chat fan-out through the example chat server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::Builder;
use futures::StreamExt;
use smol::LocalExecutor;

use super::loadgen::{self, Run, Server};
use crate::counting_alloc::{GLOBAL_ALLOCS, GLOBAL_ON};
use crate::harness::{clock_ticks, percentile, stats};
use crate::report::{si, Report};
use crate::Cfg;

/// The example chat server's room: the `chatpipe-chat` crate (`chat/`), the
/// very room `examples/chat_server.rs` and the chat tests use.
use chatpipe_chat::{self as chat_server, Disconnect, Event};

/// Bytes of every Chat text: a send timestamp, the sender and a sequence
/// number, padded.
pub(crate) const CHAT_TEXT: usize = 64;

/// A Chat text carrying `sent`, nanoseconds since the run's base `Instant`.
fn chat_text(sent: u64, sender: usize, seq: u64) -> String {
    let mut s = format!("{sent:020} {sender:03} {seq:09} ");
    while s.len() < CHAT_TEXT {
        s.push('.');
    }
    s
}

/// The send timestamp `chat_text` put at the start of a text.
fn chat_sent(text: &str) -> u64 {
    text.get(..20)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("chat fan-out: no timestamp in {text:?}"))
}

/// One chat client of the bench, on the client thread.
pub(crate) struct ChatClient {
    pub(crate) tx: chatpipe::Sender<Chat>,
    pub(crate) incoming: Option<chatpipe::Incoming<Chat>>,
    pub(crate) driver: smol::Task<Result<(), chatpipe::Error>>,
}

/// Connects `n` chat clients to the room at `addr`, one after another,
/// each with a nickname: once each is answered, the room has it.
pub(crate) async fn connect_clients(
    ex: &Rc<LocalExecutor<'static>>,
    addr: std::net::SocketAddr,
    n: usize,
) -> Vec<ChatClient> {
    let mut cs = Vec::with_capacity(n);
    for i in 0..n {
        let s = smol::net::TcpStream::connect(addr).await.expect("connect");
        let _ = s.set_nodelay(true);
        let (tx, incoming, conn) = Builder::new().build(s, Chat);
        let driver = ex.spawn(conn);
        // Answered once the server has this client in its room.
        match tx
            .request(ChatMessage::set_nickname(format!("c{i:03}")))
            .await
        {
            Ok(ChatMessage::Ack { .. }) => {}
            other => panic!("chat client {i}: nickname refused: {other:?}"),
        }
        cs.push(ChatClient {
            tx,
            incoming: Some(incoming),
            driver,
        });
    }
    cs
}

/// What one run measured.
pub(crate) struct ChatRun {
    /// From the first send to the last delivery, seconds.
    pub(crate) secs: f64,
    pub(crate) deliveries: u64,
    /// Per delivery, receive time minus embedded send time, nanoseconds;
    /// sorted.
    pub(crate) latencies: Vec<u64>,
    /// Heap allocations during the run, every thread of the process.
    pub(crate) allocs: u64,
}

/// One run: `senders` clients (the first ones) each send `msgs` Chat
/// messages, as fast as `send().await` takes them or, with `pace`, at that
/// many messages/s each; every client takes every broadcast meant for it
/// (all but its own).
pub(crate) async fn chat_run(
    ex: &Rc<LocalExecutor<'static>>,
    clients: &mut [ChatClient],
    senders: usize,
    msgs: u64,
    pace: Option<f64>,
) -> ChatRun {
    GLOBAL_ALLOCS.store(0, Relaxed);
    GLOBAL_ON.store(true, Relaxed);
    let base = Instant::now();
    let receivers: Vec<_> = clients
        .iter_mut()
        .enumerate()
        .map(|(i, c)| {
            let expect = msgs * (senders - usize::from(i < senders)) as u64;
            let mut incoming = c.incoming.take().expect("incoming");
            ex.spawn(async move {
                let mut lat = Vec::with_capacity(expect as usize);
                let mut last = base;
                while (lat.len() as u64) < expect {
                    match incoming.next().await {
                        Some(Ok(ChatMessage::Broadcast { text, .. })) => {
                            last = Instant::now();
                            let now = last.duration_since(base).as_nanos() as u64;
                            lat.push(now.saturating_sub(chat_sent(&text)));
                        }
                        other => panic!("chat client {i}: expected a broadcast, got {other:?}"),
                    }
                }
                (incoming, lat, last)
            })
        })
        .collect();
    let sending: Vec<_> = clients[..senders]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let tx = c.tx.clone();
            ex.spawn(async move {
                // Paced senders start staggered, so their ticks interleave.
                let start = base
                    + pace.map_or(Duration::ZERO, |r| {
                        Duration::from_secs_f64(i as f64 / (r * senders as f64))
                    });
                for seq in 0..msgs {
                    if let Some(rate) = pace {
                        let due = start + Duration::from_secs_f64(seq as f64 / rate);
                        if Instant::now() < due {
                            smol::Timer::at(due).await;
                        }
                    }
                    let sent = base.elapsed().as_nanos() as u64;
                    let text = chat_text(sent, i, seq);
                    tx.send(ChatMessage::Chat { text })
                        .await
                        .expect("chat send");
                }
            })
        })
        .collect();
    for s in sending {
        s.await;
    }
    let mut latencies = Vec::new();
    let mut end = base;
    for (c, r) in clients.iter_mut().zip(receivers) {
        let (incoming, lat, last) = r.await;
        c.incoming = Some(incoming);
        latencies.extend(lat);
        end = end.max(last);
    }
    GLOBAL_ON.store(false, Relaxed);
    latencies.sort_unstable();
    ChatRun {
        secs: end.duration_since(base).as_secs_f64(),
        deliveries: latencies.len() as u64,
        latencies,
        allocs: GLOBAL_ALLOCS.load(Relaxed),
    }
}

/// CPU seconds (user + system) of this process's threads, summed by
/// thread name (`/proc/self/task/*/{comm,stat}`).
fn thread_cpu() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(name.trim().to_string()).or_insert(0.0) +=
            (ticks(11) + ticks(12)) / clock_ticks();
    }
    out
}

/// The server thread's name: its `serve` runs the accept loop there; the
/// per-client tasks it spawns run on smol's global executor ("smol-N").
const CHAT_SERVER_THREAD: &str = "chat-server";
const CHAT_CLIENT_THREAD: &str = "chat-clients";

/// Everything one chat fan-out measurement gives back.
pub(crate) struct ChatResults {
    /// Saturated runs, warm-up excluded.
    pub(crate) saturated: Vec<ChatRun>,
    /// Thread name -> CPU seconds over the saturated runs.
    pub(crate) usage: BTreeMap<String, f64>,
    /// Server log lines about trouble (kicks, refusals, errors).
    pub(crate) trouble: Vec<String>,
}

/// A room event that says something went wrong: a kick, a refusal, an
/// error. None happens per message in a healthy run.
pub(crate) fn is_trouble(event: &Event) -> bool {
    match event {
        Event::Disconnected { reason, .. } => {
            !matches!(reason, Disconnect::Closed | Disconnect::ShutdownTimeout)
        }
        Event::Refused { .. }
        | Event::NicknameRefused { .. }
        | Event::BroadcastNotSent { .. }
        | Event::AcceptFailed(_) => true,
        _ => false,
    }
}

pub(crate) fn chat_fanout(cfg: &Cfg) -> ChatResults {
    let (clients, senders, msgs) = (cfg.chat_clients, cfg.chat_senders, cfg.chat_msgs);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let addr = listener.local_addr().unwrap();
    let trouble = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = trouble.clone();
    let config = chat_server::Config {
        rate: None,
        max_per_ip: clients + 1,
        max_connections: clients + 1,
        grace: Duration::from_secs(2),
        // No output: keep only events that say something went wrong, which
        // never happens per message.
        events: Arc::new(move |event| {
            if is_trouble(&event) {
                sink.lock().unwrap().push(event.to_string());
            }
        }),
        ..chat_server::Config::default()
    };
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let server = thread::Builder::new()
        .name(CHAT_SERVER_THREAD.into())
        .spawn(move || {
            let listener = smol::net::TcpListener::try_from(listener).expect("async listener");
            smol::block_on(chat_server::serve(listener, config, async move {
                let _ = stopped.recv().await;
            }));
        })
        .expect("server thread");

    let (reps, warmup) = (cfg.chat_reps, usize::from(!cfg.quick));
    let client = thread::Builder::new()
        .name(CHAT_CLIENT_THREAD.into())
        .spawn(move || {
            let ex = Rc::new(LocalExecutor::new());
            let ex2 = ex.clone();
            smol::block_on(ex.run(async move {
                let ex = ex2;
                let mut cs = connect_clients(&ex, addr, clients).await;
                for _ in 0..warmup {
                    chat_run(&ex, &mut cs, senders, msgs, None).await;
                }
                let u0 = thread_cpu();
                let mut saturated = Vec::new();
                for _ in 0..reps {
                    saturated.push(chat_run(&ex, &mut cs, senders, msgs, None).await);
                }
                let u1 = thread_cpu();
                let usage = u1
                    .iter()
                    .map(|(k, c1)| (k.clone(), c1 - u0.get(k).copied().unwrap_or(0.0)))
                    .collect();
                for c in cs {
                    c.tx.close();
                    c.driver.await.expect("chat client driver");
                }
                (saturated, usage)
            }))
        })
        .expect("client thread");
    let (saturated, usage) = client.join().expect("chat clients");
    let _ = stop.send_blocking(());
    server.join().expect("chat server");
    let trouble = trouble.lock().unwrap().clone();
    ChatResults {
        saturated,
        usage,
        trouble,
    }
}

/// Each busy thread's share of a core over `secs`, with its role.
pub(crate) fn chat_cpu_line(res: &ChatResults, secs: f64) -> String {
    let mut threads: Vec<String> = Vec::new();
    for (name, &cpu) in &res.usage {
        let role = if name.starts_with("smol-") {
            "the server's client tasks"
        } else if name == CHAT_SERVER_THREAD {
            "the server's accept loop"
        } else if name == CHAT_CLIENT_THREAD {
            "the clients"
        } else if name == "async-io" {
            "async-io's reactor"
        } else {
            continue;
        };
        let share = 100.0 * cpu / secs.max(1e-9);
        if share >= 0.5 {
            threads.push(format!("{name} ({role}) {share:.0}%"));
        }
    }
    threads.join(", ")
}

/// One server's figures in scenario 4.
struct Driven {
    version: String,
    saturated: Vec<Run>,
    /// Server CPU seconds over the saturated runs.
    cpu: f64,
    /// The load generator's (this process's) CPU seconds over them.
    gen_cpu: f64,
    /// The paced runs (none if pacing is off).
    paced: Vec<Run>,
}

/// Drives `server` (in a process of its own) with the load generator on
/// this thread: a warm-up, `reps` saturated runs, `reps` paced runs.
fn drive(cfg: &Cfg, server: Server, threads: usize) -> Result<Driven, String> {
    let running = loadgen::start(server, threads)?;
    let (clients, senders, msgs) = (cfg.chat_clients, cfg.chat_senders, cfg.chat_msgs);
    let (reps, warmup) = (cfg.chat_reps, usize::from(!cfg.quick));
    let paced_n = (cfg.chat_paced_rate / senders as f64 * cfg.chat_paced_secs) as u64;
    let ex = Rc::new(LocalExecutor::new());
    let ex2 = ex.clone();
    let running = &running;
    let (saturated, (cpu, gen_cpu), paced) = smol::block_on(ex.run(async move {
        let ex = ex2;
        let cs = loadgen::connect_all(server, running.addr, clients, senders).await;
        for _ in 0..warmup {
            loadgen::run(&ex, server, &cs, senders, msgs, None).await;
            loadgen::keep_alive(server, &cs).await;
        }
        let (cpu0, gen0) = (running.cpu_secs(), crate::harness::process_cpu_secs());
        let mut saturated = Vec::new();
        for _ in 0..reps {
            saturated.push(loadgen::run(&ex, server, &cs, senders, msgs, None).await);
            loadgen::keep_alive(server, &cs).await;
        }
        let cpu = running.cpu_secs() - cpu0;
        let gen_cpu = crate::harness::process_cpu_secs() - gen0;
        // As many paced runs as saturated ones: one run's p50 swings with
        // the machine (redis-server's from 1.3 to 2.1 ms in one session).
        let mut paced = Vec::new();
        let per_sender = cfg.chat_paced_rate / senders as f64;
        for _ in 0..if paced_n > 0 { reps } else { 0 } {
            paced.push(loadgen::run(&ex, server, &cs, senders, paced_n, Some(per_sender)).await);
            loadgen::keep_alive(server, &cs).await;
        }
        (saturated, (cpu, gen_cpu), paced)
    }));
    Ok(Driven {
        version: running.version.clone(),
        saturated,
        cpu,
        gen_cpu,
        paced,
    })
}

pub(crate) fn scenario_chat_fanout(cfg: &Cfg, rep: &mut Report) {
    let (clients, senders, msgs) = (cfg.chat_clients, cfg.chat_senders, cfg.chat_msgs);
    let threads = loadgen::chat_threads();
    let per_run = msgs * senders as u64 * (clients as u64 - 1);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 4. chat fan-out: {clients} clients, {senders} senders x {msgs} chats of {CHAT_TEXT} B, \
         chatpipe's chat server next to nats-server and redis-server pub/sub\n\n\
         Each server in a process of its own: chatpipe's room (`chatpipe-chat`, served as \
         `examples/chat_server.rs` serves it: no rate limit, its tasks on smol's global executor with \
         SMOL_THREADS = {threads}: one per core unless CHATPIPE_BENCH_CHAT_THREADS says otherwise), nats-server and redis-server (the distribution's \
         packages, found on PATH), and the *fan-out floor* (`loadgen::serve_floor`: chatpipe's wire \
         on one smol thread, per connection a reading task and a writing task, a chat encoded once \
         and queued for every other member; no room, no limits: the least a server of chatpipe's \
         design does), and that floor on every executor thread as the room runs (`loadgen::serve_floor_threads`: \
         smol's global executor with SMOL_THREADS = {threads}, each member's queue an `async-channel`). One load generator on **one** thread drives each the same way \
         (`benches/bench/scenarios/loadgen.rs`): {clients} plain TCP connections, each read by a task \
         that parses its server's wire format in place; the first {senders} clients send, writing each \
         message as soon as it is made (at most {} per write while the connection keeps up); every \
         other client gets each message once (NATS without echo; Redis publishes on a second \
         connection per sender, and its subscriber's own messages are read but not counted). \
         *delivered/s*: deliveries at all clients / (first send to last delivery), median of {} runs \
         after a warm-up, spread min–max. *latency*: per delivery, receive time minus the send time \
         the text carries. *server CPU*: the server process's CPU time over the saturated runs \
         (/proc/PID/stat), in cores, and the load generator's (this process) beside it. *paced*: {:.0} messages/s in all ({:.0} deliveries/s), the \
         senders staggered; {} runs after the saturated ones, medians (the p50's spread min–max).\n",
        loadgen::BATCH,
        cfg.chat_reps,
        cfg.chat_paced_rate,
        cfg.chat_paced_rate * (clients - 1) as f64,
        cfg.chat_reps,
    );
    let _ = writeln!(
        md,
        "| server | saturated delivered/s | spread | server CPU (load generator) | saturated p50 / p99 µs | paced p50 µs | paced p99 µs | paced delivered/s |\n\
         |---|---:|---|---:|---:|---:|---:|---:|"
    );
    let mut versions = Vec::new();
    for server in [
        Server::Chatpipe,
        Server::Nats,
        Server::Redis,
        Server::Floor,
        Server::FloorThreads,
    ] {
        eprintln!("chat fan-out: {} ...", server.name());
        let d = match drive(cfg, server, threads) {
            Ok(d) => d,
            Err(why) => {
                let note = format!("chat fan-out: {}: {why}", server.name());
                let _ = writeln!(
                    md,
                    "| {} | skipped | – | – | – | – | – | – |",
                    server.name()
                );
                rep.notes.push(note);
                continue;
            }
        };
        for r in &d.saturated {
            assert_eq!(
                r.deliveries,
                per_run,
                "chat fan-out: {}: deliveries lost",
                server.name()
            );
        }
        versions.push(format!("{}: {}", server.name(), d.version));
        let rate = |r: &Run| r.deliveries as f64 / r.secs;
        let st = stats(&d.saturated.iter().map(rate).collect::<Vec<_>>());
        let med = |q: f64| {
            stats(
                &d.saturated
                    .iter()
                    .map(|r| percentile(&r.latencies, q))
                    .collect::<Vec<_>>(),
            )
            .median
        };
        let secs: f64 = d.saturated.iter().map(|r| r.secs).sum();
        let key = match server {
            Server::Chatpipe => "chatpipe",
            Server::Nats => "nats",
            Server::Redis => "redis",
            Server::Floor => "floor",
            Server::FloorThreads => "floor_threads",
        };
        rep.set(format!("chat/{key}/delivered_per_s"), st.median);
        rep.set(format!("chat/{key}/server_cores"), d.cpu / secs.max(1e-9));
        let paced = if d.paced.is_empty() {
            "– | – | –".to_string()
        } else {
            let of = |f: &dyn Fn(&Run) -> f64| stats(&d.paced.iter().map(f).collect::<Vec<_>>());
            let p50 = of(&|r| percentile(&r.latencies, 0.5));
            rep.set(format!("chat/{key}/paced_p50_us"), p50.median);
            format!(
                "{:.0} ({:.0}–{:.0}) | {:.0} | {}",
                p50.median,
                p50.min,
                p50.max,
                of(&|r| percentile(&r.latencies, 0.99)).median,
                si(of(&rate).median)
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {}–{} | {:.2} ({:.2}) cores | {:.0} / {:.0} | {paced} |",
            server.name(),
            si(st.median),
            si(st.min),
            si(st.max),
            d.cpu / secs.max(1e-9),
            d.gen_cpu / secs.max(1e-9),
            med(0.5),
            med(0.99),
        );
    }
    rep.set("chat/clients".into(), clients as f64);
    rep.set("chat/senders".into(), senders as f64);
    let _ = writeln!(md, "\nVersions: {}.\n", versions.join("; "));
    rep.md.push_str(&md);
}
