//! chatpipe's benchmark program (issue 5): `cargo bench` runs it and it
//! prints a markdown table comparing, in one run on loopback:
//!
//! - **raw**: blocking `std::net` sockets, a writer thread writing
//!   pre-encoded frames in ~512 KiB writes, a reader walking the length
//!   prefixes in a 64 KiB buffer without copying payloads — the limit;
//! - **tokio-util**: `Framed<TcpStream, LengthDelimitedCodec>` on tokio
//!   (one current-thread runtime per side), `feed` then one `flush`, and
//!   `send` per message;
//! - **chatpipe** on smol (one `LocalExecutor` per side) through its public
//!   API with the [`Raw`] protocol: `send().await`, `try_send`, `request()`.
//!
//! Scenarios: oneway, rtt, fanin, chat (fan-out through the example chat
//! server), memory, allocs.
//! Run `cargo bench` for all of them, `cargo bench -- oneway rtt` for some.
//!
//! Environment:
//! - `CHATPIPE_BENCH_QUICK=1`: a fast smoke run (small N, 2 repetitions);
//! - `CHATPIPE_BENCH_OUT=path/results.md`: also write the markdown there, the
//!   oneway CSV beside it (`results.csv`) and the chart to
//!   `docs/throughput.svg`.
//!
//! This file, unlike the library, uses `unsafe`: a counting global
//! allocator, and `libc` for CPU affinity and the open-file limit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::{Builder, TrySendError};
use futures::{SinkExt, StreamExt};
use smol::LocalExecutor;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

// ---------------------------------------------------------------------------
// Counting allocator (scenario 6)
// ---------------------------------------------------------------------------

struct CountingAlloc;

static GLOBAL_ON: AtomicBool = AtomicBool::new(false);
static GLOBAL_ALLOCS: AtomicU64 = AtomicU64::new(0);
static GLOBAL_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static THREAD_ALLOCS: Cell<u64> = const { Cell::new(0) };
    static THREAD_BYTES: Cell<u64> = const { Cell::new(0) };
}

#[inline]
fn count_alloc(size: usize) {
    let _ = THREAD_ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = THREAD_BYTES.try_with(|c| c.set(c.get() + size as u64));
    if GLOBAL_ON.load(Relaxed) {
        GLOBAL_ALLOCS.fetch_add(1, Relaxed);
        GLOBAL_BYTES.fetch_add(size as u64, Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`. Counting touches
// only const-initialised thread-locals without destructors and atomics,
// none of which allocates, so there is no re-entrance.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Allocations (calls to alloc, alloc_zeroed, realloc) and bytes requested
/// so far by the calling thread.
fn thread_allocs() -> (u64, u64) {
    (THREAD_ALLOCS.with(Cell::get), THREAD_BYTES.with(Cell::get))
}

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
    /// Chat fan-out: also a saturated run with a single sender.
    chat_single: bool,
    idle_pairs: usize,
    idle_settle: Duration,
    idle_cpu_window: Duration,
    filters: Vec<String>,
}

impl Cfg {
    fn from_env() -> Cfg {
        let quick = std::env::var("CHATPIPE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
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
                chat_msgs: 100,
                chat_reps: 2,
                chat_paced_secs: 0.3,
                chat_single: true,
                idle_pairs: 1_000,
                idle_settle: Duration::from_millis(500),
                idle_cpu_window: Duration::from_secs(5),
                filters,
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
                chat_msgs: 200,
                chat_reps: 3,
                chat_paced_secs: 0.75,
                chat_single: true,
                idle_pairs: 10_000,
                idle_settle: Duration::from_secs(1),
                idle_cpu_window: Duration::from_secs(10),
                filters,
            }
        }
    }

    fn wants(&self, scenario: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| scenario.contains(f.as_str()))
    }
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

const SIZES: [usize; 4] = [16, 64, 1024, 64 * 1024];
/// chatpipe's default maximum frame is 64 KiB, and a 64 KiB body plus the
/// Raw protocol's tag byte is one byte over; a user sending 64 KiB
/// messages raises it, and so does the bench (for every stack alike).
const MAX_FRAME: usize = 1 << 20;

/// A connected loopback pair, Nagle off on both ends (every stack alike).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let a = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (b, _) = listener.accept().expect("accept");
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

fn payload(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| i as u8).collect::<Vec<u8>>())
}

fn chatpipe_builder() -> Builder {
    Builder::new().max_frame_len(MAX_FRAME)
}

fn smol_stream(s: TcpStream) -> smol::net::TcpStream {
    smol::net::TcpStream::try_from(s).expect("register with async-io")
}

fn tokio_framed(s: TcpStream) -> Framed<tokio::net::TcpStream, LengthDelimitedCodec> {
    s.set_nonblocking(true).unwrap();
    let s = tokio::net::TcpStream::from_std(s).expect("register with tokio");
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec();
    Framed::new(s, codec)
}

/// Runs `f` on a new thread inside its own smol `LocalExecutor`.
fn smol_thread<T, F, Fut>(f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce(Rc<LocalExecutor<'static>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    thread::spawn(move || {
        let ex = Rc::new(LocalExecutor::new());
        smol::block_on(ex.run(f(ex.clone())))
    })
}

/// Runs `f` on a new thread inside its own tokio current-thread runtime.
fn tokio_thread<T, F, Fut>(f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f())
    })
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(v: &[f64]) -> Stats {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let median = if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    Stats {
        median,
        min: *s.first().unwrap_or(&f64::NAN),
        max: *s.last().unwrap_or(&f64::NAN),
    }
}

/// 12.3M, 456k, 789.
fn si(x: f64) -> String {
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

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}x", a / b),
        _ => "–".into(),
    }
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// Run `run(n)` (returning seconds) a few times to find an N that takes
/// about `target_secs`, then `reps` times with it. The first runs double as
/// warm-up.
fn calibrated(cfg: &Cfg, mut run: impl FnMut(u64) -> f64) -> (u64, Vec<f64>) {
    let mut n: u64 = 5_000;
    for _ in 0..4 {
        let t = run(n);
        if t >= cfg.target_secs * 0.5 {
            break;
        }
        let scale = (cfg.target_secs / t.max(1e-5)).min(100.0);
        n = ((n as f64 * scale) as u64).clamp(1_000, 200_000_000);
    }
    let secs = (0..cfg.reps).map(|_| run(n)).collect();
    (n, secs)
}

// ---------------------------------------------------------------------------
// Machine facts, /proc readers, affinity, rlimit
// ---------------------------------------------------------------------------

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: as above.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// Resident set size of this process, bytes, from /proc/self/statm.
fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * page_size()
}

/// CPU time (user + system) of this process, seconds, from /proc/self/stat.
fn process_cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command name: field 3 (state) is f[0]; utime is field 14.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Releases free heap memory to the system, so that RSS deltas measure
/// what is in use rather than what an earlier phase left free.
fn malloc_trim() {
    // SAFETY: malloc_trim only walks glibc's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The CPUs this process may run on at start.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the pointer and size
    // passed describe it exactly.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins every thread of the process (the runtimes' helper threads too, like
/// async-io's reactor thread) to `cpus`; threads created later inherit it.
fn set_process_affinity(cpus: &[usize]) {
    // SAFETY: as in `allowed_cpus`; sched_setaffinity only reads the set.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        set
    };
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            // SAFETY: as above. A thread that exited meanwhile gives ESRCH.
            unsafe {
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
        }
    }
}

/// Raises the soft open-file limit to the hard one; returns the soft limit
/// now in force.
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the struct given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(16)
}

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
fn utc_now() -> String {
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

fn machine_info(cfg: &Cfg) -> String {
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
// Raw std::net stack
// ---------------------------------------------------------------------------

/// Pre-encoded frames of `size`-byte payloads, about 512 KiB of them (at
/// least one frame).
fn encoded_block(size: usize) -> (Vec<u8>, usize) {
    let frame = 4 + size;
    let per_block = (512 * 1024 / frame).max(1);
    let body = payload(size);
    let mut block = Vec::with_capacity(per_block * frame);
    for _ in 0..per_block {
        block.extend_from_slice(&(size as u32).to_be_bytes());
        block.extend_from_slice(&body);
    }
    (block, per_block)
}

fn raw_write_frames(s: &mut TcpStream, block: &[u8], per_block: usize, size: usize, n: u64) {
    let frame = 4 + size;
    let per_block = per_block as u64;
    for _ in 0..n / per_block {
        s.write_all(block).expect("raw write");
    }
    let rest = (n % per_block) as usize;
    s.write_all(&block[..rest * frame]).expect("raw write");
}

/// Reads until `expect` frames have arrived, walking the length prefixes
/// in a 64 KiB buffer; payloads are skipped, never copied. Returns the
/// payload bytes seen.
fn raw_read_frames(s: &mut TcpStream, expect: u64) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut have, mut skip, mut msgs, mut bytes) = (0usize, 0usize, 0u64, 0u64);
    while msgs < expect {
        let n = s.read(&mut buf[have..]).expect("raw read");
        assert!(n > 0, "raw reader: early EOF after {msgs} of {expect}");
        let end = have + n;
        let mut pos = 0;
        loop {
            if skip > 0 {
                let k = skip.min(end - pos);
                pos += k;
                skip -= k;
                if skip > 0 {
                    break;
                }
                msgs += 1;
            }
            if end - pos < 4 {
                break;
            }
            let len = u32::from_be_bytes(buf[pos..pos + 4].try_into().unwrap()) as usize;
            pos += 4;
            bytes += len as u64;
            if len == 0 {
                msgs += 1;
            } else {
                skip = len;
            }
        }
        buf.copy_within(pos..end, 0);
        have = end - pos;
    }
    bytes
}

/// Reads exactly one frame into `buf` (request/response: nothing follows it
/// until it is answered). `None` at EOF.
fn raw_read_one(s: &mut TcpStream, buf: &mut [u8]) -> Option<usize> {
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..]).expect("raw read");
        if n == 0 {
            return None;
        }
        have += n;
        if have >= 4 {
            let len = 4 + u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if have >= len {
                assert_eq!(have, len, "ping-pong: more than one frame");
                return Some(len);
            }
        }
    }
}

fn oneway_raw(size: usize, n: u64) -> f64 {
    let (mut a, mut b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let writer = thread::spawn(move || {
        let (block, per_block) = encoded_block(size);
        go2.wait();
        raw_write_frames(&mut a, &block, per_block, size, n);
        let _ = a.shutdown(Shutdown::Write);
    });
    go.wait();
    let t0 = Instant::now();
    let bytes = raw_read_frames(&mut b, n);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(bytes, n * size as u64);
    writer.join().unwrap();
    secs
}

// ---------------------------------------------------------------------------
// tokio-util stack
// ---------------------------------------------------------------------------

fn oneway_tokio(size: usize, n: u64, flush_each: bool) -> f64 {
    let (a, b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let body = payload(size);
    let sender = tokio_thread(move || async move {
        let mut f = tokio_framed(a);
        go2.wait();
        if flush_each {
            for _ in 0..n {
                f.send(body.clone()).await.unwrap();
            }
        } else {
            for _ in 0..n {
                f.feed(body.clone()).await.unwrap();
            }
            SinkExt::<Bytes>::flush(&mut f).await.unwrap();
        }
        SinkExt::<Bytes>::close(&mut f).await.unwrap();
    });
    let receiver = tokio_thread(move || async move {
        let mut f = tokio_framed(b);
        go.wait();
        let t0 = Instant::now();
        let mut bytes = 0u64;
        for _ in 0..n {
            bytes += f.next().await.unwrap().unwrap().len() as u64;
        }
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(bytes, n * size as u64);
        while f.next().await.is_some() {}
        secs
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

// ---------------------------------------------------------------------------
// chatpipe stack
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum CpSend {
    Send,
    TrySend,
}

/// The chatpipe receiving side: counts `n` messages, returns the seconds
/// from the barrier to the last one and the payload bytes, then lets the
/// connection close.
async fn chatpipe_receive(ex: &LocalExecutor<'static>, s: TcpStream, n: u64, go: &Barrier) -> f64 {
    let (tx, mut incoming, conn) = chatpipe_builder().build(smol_stream(s), Raw);
    let driver = ex.spawn(conn);
    go.wait();
    let t0 = Instant::now();
    let mut bytes = 0u64;
    for _ in 0..n {
        match incoming.next().await {
            Some(Ok(RawMessage::Message(b))) => bytes += b.len() as u64,
            other => panic!("chatpipe receiver: unexpected {other:?}"),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    while incoming.next().await.is_some() {}
    drop(tx);
    driver.await.expect("receiver driver");
    std::hint::black_box(bytes);
    secs
}

fn oneway_chatpipe(size: usize, n: u64, mode: CpSend) -> f64 {
    let (a, b) = tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let body = payload(size);
    let sender = smol_thread(move |ex| async move {
        let (tx, _incoming, conn) = chatpipe_builder().build(smol_stream(a), Raw);
        let driver = ex.spawn(conn);
        go2.wait();
        match mode {
            CpSend::Send => {
                for _ in 0..n {
                    tx.send(RawMessage::Message(body.clone())).await.unwrap();
                }
            }
            CpSend::TrySend => {
                for _ in 0..n {
                    let mut msg = RawMessage::Message(body.clone());
                    loop {
                        match tx.try_send(msg) {
                            Ok(()) => break,
                            Err(TrySendError::Full(m)) => {
                                msg = m;
                                smol::future::yield_now().await;
                            }
                            Err(e) => panic!("try_send: {e}"),
                        }
                    }
                }
            }
        }
        tx.close();
        driver.await.expect("sender driver");
    });
    let receiver = smol_thread(move |ex| async move { chatpipe_receive(&ex, b, n, &go).await });
    sender.join().unwrap();
    receiver.join().unwrap()
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    md: String,
    metrics: BTreeMap<String, f64>,
    /// size, stack, N, median msgs/s, min, max
    oneway: Vec<(usize, &'static str, u64, f64, f64, f64)>,
    notes: Vec<String>,
}

impl Report {
    fn get(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).copied()
    }
    fn set(&mut self, key: String, v: f64) {
        self.metrics.insert(key, v);
    }
}

// ---------------------------------------------------------------------------
// Scenario 1: oneway
// ---------------------------------------------------------------------------

const ONEWAY_STACKS: [&str; 5] = [
    "raw",
    "tokio-util feed",
    "tokio-util send",
    "chatpipe send",
    "chatpipe try_send",
];

fn scenario_oneway(cfg: &Cfg, rep: &mut Report) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 1. oneway: one connection, N messages\n\n\
         Messages/s at the receiver (from the start signal to the N-th message), median of {} runs, \
         spread min–max; MB/s counts payload bytes (10^6). chatpipe's Raw protocol adds a 1-byte tag \
         to each payload.\n",
        cfg.reps
    );
    let _ = writeln!(
        md,
        "| size | stack | N | msgs/s | spread | MB/s | x raw | x tokio-util feed |\n|---|---|---:|---:|---|---:|---:|---:|"
    );
    for size in SIZES {
        for stack in ONEWAY_STACKS {
            eprintln!("oneway {} {stack} ...", size_name(size));
            let (n, secs) = match stack {
                "raw" => calibrated(cfg, |n| oneway_raw(size, n)),
                "tokio-util feed" => calibrated(cfg, |n| oneway_tokio(size, n, false)),
                "tokio-util send" => calibrated(cfg, |n| oneway_tokio(size, n, true)),
                "chatpipe send" => calibrated(cfg, |n| oneway_chatpipe(size, n, CpSend::Send)),
                _ => calibrated(cfg, |n| oneway_chatpipe(size, n, CpSend::TrySend)),
            };
            let rates: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
            let st = stats(&rates);
            rep.set(format!("oneway/{size}/{stack}"), st.median);
            rep.oneway.push((size, stack, n, st.median, st.min, st.max));
            let raw = rep.get(&format!("oneway/{size}/raw"));
            let feed = rep.get(&format!("oneway/{size}/tokio-util feed"));
            let _ = writeln!(
                md,
                "| {} | {stack} | {} | {} | {}–{} | {:.0} | {} | {} |",
                size_name(size),
                si(n as f64),
                si(st.median),
                si(st.min),
                si(st.max),
                st.median * size as f64 / 1e6,
                ratio(Some(st.median), raw),
                ratio(Some(st.median), feed),
            );
        }
    }
    rep.md.push_str(&md);
    rep.md.push('\n');
}

// ---------------------------------------------------------------------------
// Scenario 2: rtt
// ---------------------------------------------------------------------------

const RTT_SIZE: usize = 64;
const RTT_STACKS: [&str; 5] = [
    "raw ping-pong",
    "tokio-util ping-pong",
    "chatpipe request()",
    "chatpipe ping-pong",
    "chatpipe request() on tokio",
];

/// Round-trip times in nanoseconds, warm-up excluded.
fn rtt_raw(n: usize, warm: usize) -> Vec<u64> {
    let (mut a, mut b) = tcp_pair();
    let server = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Some(len) = raw_read_one(&mut b, &mut buf) {
            b.write_all(&buf[..len]).expect("raw echo");
        }
    });
    let mut frame = (RTT_SIZE as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload(RTT_SIZE));
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + warm {
        let t = Instant::now();
        a.write_all(&frame).expect("raw ping");
        raw_read_one(&mut a, &mut buf).expect("raw pong");
        if i >= warm {
            out.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(a);
    server.join().unwrap();
    out
}

fn rtt_tokio(n: usize, warm: usize) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = tokio_thread(move || async move {
        let mut f = tokio_framed(b);
        while let Some(Ok(frame)) = f.next().await {
            f.send(frame.freeze()).await.unwrap();
        }
    });
    let client = tokio_thread(move || async move {
        let mut f = tokio_framed(a);
        let body = payload(RTT_SIZE);
        let mut out = Vec::with_capacity(n);
        for i in 0..n + warm {
            let t = Instant::now();
            f.send(body.clone()).await.unwrap();
            f.next().await.unwrap().unwrap();
            if i >= warm {
                out.push(t.elapsed().as_nanos() as u64);
            }
        }
        out
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

fn rtt_chatpipe(n: usize, warm: usize, use_request: bool) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = smol_thread(move |ex| async move {
        let (tx, mut incoming, conn) = chatpipe_builder().build(smol_stream(b), Raw);
        let driver = ex.spawn(conn);
        while let Some(Ok(m)) = incoming.next().await {
            let reply = match m {
                RawMessage::Request { id, body } => RawMessage::Response { id, body },
                other => other,
            };
            if tx.send(reply).await.is_err() {
                break;
            }
        }
        drop(tx);
        let _ = driver.await;
    });
    let client = smol_thread(move |ex| async move {
        let (tx, mut incoming, conn) = chatpipe_builder().build(smol_stream(a), Raw);
        let driver = ex.spawn(conn);
        let body = payload(RTT_SIZE);
        let mut out = Vec::with_capacity(n);
        for i in 0..n + warm {
            let t = Instant::now();
            if use_request {
                let msg = RawMessage::Request {
                    id: i as u64,
                    body: body.clone(),
                };
                tx.request(msg).await.expect("request");
            } else {
                tx.send(RawMessage::Message(body.clone())).await.unwrap();
                incoming.next().await.unwrap().unwrap();
            }
            if i >= warm {
                out.push(t.elapsed().as_nanos() as u64);
            }
        }
        tx.close();
        driver.await.expect("client driver");
        out
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

/// chatpipe's `Timer` over tokio's, so the tokio runs need no async-io.
struct TokioTimer(std::pin::Pin<Box<tokio::time::Sleep>>);

impl TokioTimer {
    fn new() -> Self {
        TokioTimer(Box::pin(tokio::time::sleep(Duration::from_secs(3600))))
    }
}

impl chatpipe::Timer for TokioTimer {
    fn reset(&mut self, deadline: Instant) {
        self.0.as_mut().reset(deadline.into());
    }
    fn poll_expired(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::future::Future::poll(self.0.as_mut(), cx)
    }
}

fn tokio_compat(s: TcpStream) -> tokio_util::compat::Compat<tokio::net::TcpStream> {
    use tokio_util::compat::TokioAsyncReadCompatExt;
    s.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(s)
        .expect("register with tokio")
        .compat()
}

/// The same request/response as `rtt_chatpipe`, with chatpipe running on
/// tokio (current-thread runtime per side): what the runtime costs.
fn rtt_chatpipe_tokio(n: usize, warm: usize) -> Vec<u64> {
    let (a, b) = tcp_pair();
    let server = tokio_thread(move || async move {
        let (tx, mut incoming, conn) =
            chatpipe_builder().build_with_timer(tokio_compat(b), Raw, TokioTimer::new());
        let driver = tokio::spawn(conn);
        while let Some(Ok(RawMessage::Request { id, body })) = incoming.next().await {
            if tx.send(RawMessage::Response { id, body }).await.is_err() {
                break;
            }
        }
        drop(tx);
        let _ = driver.await;
    });
    let client = tokio_thread(move || async move {
        let (tx, _incoming, conn) =
            chatpipe_builder().build_with_timer(tokio_compat(a), Raw, TokioTimer::new());
        let driver = tokio::spawn(conn);
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
        driver.await.expect("join").expect("client driver");
        out
    });
    let out = client.join().unwrap();
    server.join().unwrap();
    out
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1000.0
}

fn scenario_rtt(cfg: &Cfg, rep: &mut Report) {
    let cpus = allowed_cpus();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 2. rtt: sequential request/response of {RTT_SIZE} B\n\n\
         {} round trips per run after {} of warm-up; p50 and p99 in microseconds, median over {} runs \
         (spread: min–max of the runs' p50). *one CPU*: every thread of the process pinned to CPU {} \
         (sched_setaffinity); *free*: the scheduler places them ({} CPUs allowed).\n",
        cfg.rtt_n,
        cfg.rtt_warmup,
        cfg.reps,
        cpus[0],
        cpus.len()
    );
    let _ = writeln!(
        md,
        "| placement | stack | p50 µs | p50 spread | p99 µs | p50 x raw | p50 x tokio-util |\n|---|---|---:|---|---:|---:|---:|"
    );
    for placement in ["one CPU", "free"] {
        if placement == "one CPU" {
            set_process_affinity(&cpus[..1]);
        }
        for stack in RTT_STACKS {
            eprintln!("rtt {placement} {stack} ...");
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            for _ in 0..cfg.reps {
                let mut v = match stack {
                    "raw ping-pong" => rtt_raw(cfg.rtt_n, cfg.rtt_warmup),
                    "tokio-util ping-pong" => rtt_tokio(cfg.rtt_n, cfg.rtt_warmup),
                    "chatpipe request()" => rtt_chatpipe(cfg.rtt_n, cfg.rtt_warmup, true),
                    "chatpipe request() on tokio" => rtt_chatpipe_tokio(cfg.rtt_n, cfg.rtt_warmup),
                    _ => rtt_chatpipe(cfg.rtt_n, cfg.rtt_warmup, false),
                };
                v.sort_unstable();
                p50s.push(percentile(&v, 0.50));
                p99s.push(percentile(&v, 0.99));
            }
            let p50 = stats(&p50s);
            let p99 = stats(&p99s);
            rep.set(format!("rtt/{placement}/{stack}/p50"), p50.median);
            rep.set(format!("rtt/{placement}/{stack}/p99"), p99.median);
            let raw = rep.get(&format!("rtt/{placement}/raw ping-pong/p50"));
            let tok = rep.get(&format!("rtt/{placement}/tokio-util ping-pong/p50"));
            let _ = writeln!(
                md,
                "| {placement} | {stack} | {:.1} | {:.1}–{:.1} | {:.1} | {} | {} |",
                p50.median,
                p50.min,
                p50.max,
                p99.median,
                ratio(Some(p50.median), raw),
                ratio(Some(p50.median), tok),
            );
        }
        if placement == "one CPU" {
            set_process_affinity(&cpus);
        }
    }
    rep.md.push_str(&md);
    rep.md.push('\n');
}

// ---------------------------------------------------------------------------
// Scenario 3: fanin
// ---------------------------------------------------------------------------

const FANIN_SIZE: usize = 64;

fn fanin_pairs(conns: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    (0..conns).map(|_| tcp_pair()).unzip()
}

fn fanin_raw(conns: usize, msgs: u64) -> f64 {
    let (clients, servers) = fanin_pairs(conns);
    let go = Arc::new(Barrier::new(conns + 2));
    let readers: Vec<_> = servers
        .into_iter()
        .map(|mut s| {
            let go = go.clone();
            thread::spawn(move || {
                go.wait();
                raw_read_frames(&mut s, msgs);
            })
        })
        .collect();
    let go2 = go.clone();
    let writer = thread::spawn(move || {
        let frame = 4 + FANIN_SIZE;
        let body = payload(FANIN_SIZE);
        let mut block = Vec::with_capacity(frame * msgs as usize);
        for _ in 0..msgs {
            block.extend_from_slice(&(FANIN_SIZE as u32).to_be_bytes());
            block.extend_from_slice(&body);
        }
        go2.wait();
        for mut c in clients {
            for chunk in block.chunks(512 * 1024) {
                c.write_all(chunk).expect("raw write");
            }
        }
    });
    go.wait();
    let t0 = Instant::now();
    for r in readers {
        r.join().unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    writer.join().unwrap();
    secs
}

fn fanin_tokio(conns: usize, msgs: u64) -> f64 {
    let (clients, servers) = fanin_pairs(conns);
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let client = tokio_thread(move || async move {
        let framed: Vec<_> = clients.into_iter().map(tokio_framed).collect();
        let body = payload(FANIN_SIZE);
        go2.wait();
        let tasks: Vec<_> = framed
            .into_iter()
            .map(|mut f| {
                let body = body.clone();
                tokio::spawn(async move {
                    for _ in 0..msgs {
                        f.feed(body.clone()).await.unwrap();
                    }
                    SinkExt::<Bytes>::flush(&mut f).await.unwrap();
                    SinkExt::<Bytes>::close(&mut f).await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let server = tokio_thread(move || async move {
        let framed: Vec<_> = servers.into_iter().map(tokio_framed).collect();
        go.wait();
        let t0 = Instant::now();
        let tasks: Vec<_> = framed
            .into_iter()
            .map(|mut f| {
                tokio::spawn(async move {
                    for _ in 0..msgs {
                        f.next().await.unwrap().unwrap();
                    }
                    f
                })
            })
            .collect();
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        let secs = t0.elapsed().as_secs_f64();
        for mut f in done {
            while f.next().await.is_some() {}
        }
        secs
    });
    client.join().unwrap();
    server.join().unwrap()
}

fn fanin_chatpipe(conns: usize, msgs: u64) -> f64 {
    let (clients, servers) = fanin_pairs(conns);
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let client = smol_thread(move |ex| async move {
        let ends: Vec<_> = clients
            .into_iter()
            .map(|s| {
                let (tx, _incoming, conn) = chatpipe_builder().build(smol_stream(s), Raw);
                (tx, ex.spawn(conn))
            })
            .collect();
        let body = payload(FANIN_SIZE);
        go2.wait();
        let tasks: Vec<_> = ends
            .into_iter()
            .map(|(tx, driver)| {
                let body = body.clone();
                ex.spawn(async move {
                    for _ in 0..msgs {
                        tx.send(RawMessage::Message(body.clone())).await.unwrap();
                    }
                    tx.close();
                    driver.await.expect("fanin client driver");
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    });
    let server = smol_thread(move |ex| async move {
        let ends: Vec<_> = servers
            .into_iter()
            .map(|s| {
                let (tx, incoming, conn) = chatpipe_builder().build(smol_stream(s), Raw);
                (tx, incoming, ex.spawn(conn))
            })
            .collect();
        go.wait();
        let t0 = Instant::now();
        let tasks: Vec<_> = ends
            .into_iter()
            .map(|(tx, mut incoming, driver)| {
                ex.spawn(async move {
                    for _ in 0..msgs {
                        incoming.next().await.unwrap().unwrap();
                    }
                    (tx, incoming, driver)
                })
            })
            .collect();
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await);
        }
        let secs = t0.elapsed().as_secs_f64();
        for (tx, mut incoming, driver) in done {
            while incoming.next().await.is_some() {}
            drop(tx);
            let _ = driver.await;
        }
        secs
    });
    client.join().unwrap();
    server.join().unwrap()
}

fn scenario_fanin(cfg: &Cfg, rep: &mut Report) {
    let (conns, msgs) = (cfg.fanin_conns, cfg.fanin_msgs as u64);
    let total = (conns as u64 * msgs) as f64;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 3. fanin: {conns} connections x {msgs} messages of {FANIN_SIZE} B to one server\n\n\
         Aggregate messages/s at the server, median of {} runs. raw: one writer thread writing each \
         connection's pre-encoded frames, one reader thread per connection; tokio-util (feed, then \
         flush) and chatpipe (`send().await`): one thread per side, one task per connection.\n",
        cfg.reps
    );
    let _ = writeln!(
        md,
        "| stack | msgs/s | spread | x raw | x tokio-util feed |\n|---|---:|---|---:|---:|"
    );
    for stack in ["raw", "tokio-util feed", "chatpipe send"] {
        eprintln!("fanin {stack} ...");
        let rates: Vec<f64> = (0..cfg.reps + 1)
            .map(|_| match stack {
                "raw" => fanin_raw(conns, msgs),
                "tokio-util feed" => fanin_tokio(conns, msgs),
                _ => fanin_chatpipe(conns, msgs),
            })
            .skip(1) // warm-up
            .map(|s| total / s)
            .collect();
        let st = stats(&rates);
        rep.set(format!("fanin/{stack}"), st.median);
        let _ = writeln!(
            md,
            "| {stack} | {} | {}–{} | {} | {} |",
            si(st.median),
            si(st.min),
            si(st.max),
            ratio(Some(st.median), rep.get("fanin/raw")),
            ratio(Some(st.median), rep.get("fanin/tokio-util feed")),
        );
    }
    rep.md.push_str(&md);
    rep.md.push('\n');
}

// ---------------------------------------------------------------------------
// Scenario 4: chat fan-out
// ---------------------------------------------------------------------------

/// The example chat server's room, the very file `examples/chat_server.rs`
/// and `tests/chat_e2e.rs` use.
#[path = "../examples/chat/server.rs"]
mod chat_server;

/// Bytes of every Chat text: a send timestamp, the sender and a sequence
/// number, padded.
const CHAT_TEXT: usize = 64;

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
struct ChatClient {
    tx: chatpipe::Sender<Chat>,
    incoming: Option<chatpipe::Incoming<Chat>>,
    driver: smol::Task<Result<(), chatpipe::Error>>,
}

/// What one run measured.
struct ChatRun {
    /// From the first send to the last delivery, seconds.
    secs: f64,
    deliveries: u64,
    /// Per delivery, receive time minus embedded send time, nanoseconds;
    /// sorted.
    latencies: Vec<u64>,
    /// Heap allocations during the run, every thread of the process.
    allocs: u64,
}

/// One run: `senders` clients (the first ones) each send `msgs` Chat
/// messages, as fast as `send().await` takes them or, with `pace`, at that
/// many messages/s each; every client takes every broadcast meant for it
/// (all but its own).
async fn chat_run(
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
struct ChatResults {
    /// Saturated runs, warm-up excluded.
    saturated: Vec<ChatRun>,
    /// The paced run, with its offered broadcasts/s (all senders).
    paced: Option<(ChatRun, f64)>,
    /// A saturated run with one sender.
    single: Option<ChatRun>,
    /// Thread name -> CPU seconds over the saturated runs.
    usage: BTreeMap<String, f64>,
    /// Server log lines about trouble (kicks, refusals, errors).
    trouble: Vec<String>,
}

fn chat_fanout(cfg: &Cfg) -> ChatResults {
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
        // No output: keep only lines that say something went wrong, which
        // never happens per message.
        log: Arc::new(move |line: String| {
            let bad = ["too slow", "refused", "error", "not sent", "failed"];
            if bad.iter().any(|b| line.contains(b)) {
                sink.lock().unwrap().push(line);
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
    let (target_paced, single) = (cfg.chat_paced_secs, cfg.chat_single);
    let client = thread::Builder::new()
        .name(CHAT_CLIENT_THREAD.into())
        .spawn(move || {
            let ex = Rc::new(LocalExecutor::new());
            let ex2 = ex.clone();
            smol::block_on(ex.run(async move {
                let ex = ex2;
                let mut cs = Vec::with_capacity(clients);
                for i in 0..clients {
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
                // Paced at half the saturated rate: latency without a
                // standing queue.
                let mut rates: Vec<f64> = saturated
                    .iter()
                    .map(|r| r.deliveries as f64 / r.secs)
                    .collect();
                rates.sort_by(|a, b| a.total_cmp(b));
                let paced = match rates.get(rates.len() / 2) {
                    Some(&deliveries) if target_paced > 0.0 => {
                        let broadcasts = 0.5 * deliveries / (clients - 1) as f64;
                        let per_sender = broadcasts / senders as f64;
                        let n = ((per_sender * target_paced) as u64).clamp(10, msgs * 10);
                        let run = chat_run(&ex, &mut cs, senders, n, Some(per_sender)).await;
                        Some((run, broadcasts))
                    }
                    _ => None,
                };
                // The same messages from one sender instead of many.
                let single = if single && senders > 1 {
                    Some(chat_run(&ex, &mut cs, 1, msgs, None).await)
                } else {
                    None
                };
                for c in cs {
                    c.tx.close();
                    c.driver.await.expect("chat client driver");
                }
                (saturated, paced, single, usage)
            }))
        })
        .expect("client thread");
    let (saturated, paced, single, usage) = client.join().expect("chat clients");
    let _ = stop.send_blocking(());
    server.join().expect("chat server");
    let trouble = trouble.lock().unwrap().clone();
    ChatResults {
        saturated,
        paced,
        single,
        usage,
        trouble,
    }
}

/// Each busy thread's share of a core over `secs`, with its role.
fn chat_cpu_line(res: &ChatResults, secs: f64) -> String {
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

fn scenario_chat_fanout(cfg: &Cfg, rep: &mut Report) {
    let (clients, senders, msgs) = (cfg.chat_clients, cfg.chat_senders, cfg.chat_msgs);
    let smol_threads = std::env::var("SMOL_THREADS").unwrap_or_else(|_| "1 (default)".into());
    eprintln!("chat fan-out ({clients} clients, {senders} senders x {msgs}) ...");
    let res = chat_fanout(cfg);
    let others = clients as u64 - 1;
    let per_run = msgs * senders as u64 * others;
    for r in &res.saturated {
        assert_eq!(r.deliveries, per_run, "chat fan-out: deliveries lost");
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 4. chat fan-out: the example chat server, {clients} clients\n\n\
         `examples/chat/server.rs` in-process: `serve` on a thread of its own, which runs only its \
         accept loop; the per-client tasks it `smol::spawn`s run on smol's global executor \
         (SMOL_THREADS = {smol_threads}). No rate limit; log lines dropped. {clients} chatpipe clients \
         (`Builder` defaults, `Chat` protocol, each with a nickname) all on **one** client thread (a \
         `LocalExecutor`). Senders (the first clients) send Chat messages of {CHAT_TEXT} B text whose \
         first bytes are the send time (ns since the run's start); the server broadcasts each to the \
         {others} others. *delivered/s*: deliveries at all clients / (first send to last delivery). \
         *latency*: per delivery, receive time minus the embedded send time. *saturated*: senders \
         `send().await` as fast as it returns, so latency there is mostly queueing behind the whole \
         run; *paced*: at half the saturated median rate, senders staggered, no standing queue. \
         *allocs*: heap allocations per delivery, whole process (server and clients).\n"
    );
    let _ = writeln!(
        md,
        "| load | deliveries per run | runs | delivered/s | spread | p50 µs | p99 µs | max µs | allocs |\n\
         |---|---:|---|---:|---|---:|---:|---:|---:|"
    );
    let p = |r: &ChatRun, q: f64| percentile(&r.latencies, q);
    let max = |r: &ChatRun| r.latencies.last().map_or(f64::NAN, |&v| v as f64 / 1000.0);
    let rate = |r: &ChatRun| r.deliveries as f64 / r.secs;
    let allocs = |r: &ChatRun| r.allocs as f64 / r.deliveries.max(1) as f64;
    let med = |f: &dyn Fn(&ChatRun) -> f64| {
        stats(&res.saturated.iter().map(f).collect::<Vec<_>>()).median
    };
    let st = stats(&res.saturated.iter().map(rate).collect::<Vec<_>>());
    let p99 = med(&|r| p(r, 0.99));
    rep.set("chat/delivered_per_s".into(), st.median);
    rep.set("chat/clients".into(), clients as f64);
    rep.set("chat/senders".into(), senders as f64);
    rep.set("chat/saturated/p99_us".into(), p99);
    let _ = writeln!(
        md,
        "| saturated, {senders} senders x {msgs} | {} | median of {}{} | {} | {}–{} | {:.0} | {p99:.0} | {:.0} | {:.2} |",
        si(per_run as f64),
        res.saturated.len(),
        if cfg.quick { "" } else { ", after a warm-up" },
        si(st.median),
        si(st.min),
        si(st.max),
        med(&|r| p(r, 0.50)),
        med(&max),
        med(&allocs),
    );
    if let Some((r, offered)) = &res.paced {
        rep.set("chat/paced/p99_us".into(), p(r, 0.99));
        let _ = writeln!(
            md,
            "| paced, {senders} senders, {} broadcasts/s offered | {} | one | {} | – | {:.0} | {:.0} | {:.0} | {:.2} |",
            si(*offered),
            si(r.deliveries as f64),
            si(rate(r)),
            p(r, 0.50),
            p(r, 0.99),
            max(r),
            allocs(r),
        );
    }
    if let Some(r) = &res.single {
        rep.set("chat/single/delivered_per_s".into(), rate(r));
        let _ = writeln!(
            md,
            "| saturated, 1 sender x {msgs} | {} | one | {} | – | {:.0} | {:.0} | {:.0} | {:.2} |",
            si(r.deliveries as f64),
            si(rate(r)),
            p(r, 0.50),
            p(r, 0.99),
            max(r),
            allocs(r),
        );
    }
    let secs: f64 = res.saturated.iter().map(|r| r.secs).sum();
    let _ = writeln!(
        md,
        "\nCPU per thread over the saturated {senders}-sender runs (/proc/self/task/*/stat, share of \
         one core): {}.\n",
        chat_cpu_line(&res, secs),
    );
    if !res.trouble.is_empty() {
        let note = format!(
            "chat fan-out: the server logged {} problem line(s), first: {}",
            res.trouble.len(),
            res.trouble[0]
        );
        let _ = writeln!(md, "**Note**: {note}.\n");
        rep.notes.push(note);
    }
    rep.md.push_str(&md);
}

// ---------------------------------------------------------------------------
// Scenario 5: memory and keepalive CPU of idle connections
// ---------------------------------------------------------------------------

/// Runs in a child process (a fresh heap, so RSS deltas are clean):
/// builds `pairs` idle loopback connections, both ends in this process, and
/// prints `IDLE <rss before> <rss after> <cpu secs> <window secs>`.
fn child_idle(stack: &str, pairs: usize, settle: Duration, window: Duration) {
    raise_nofile();
    let (clients, servers) = fanin_pairs(pairs);
    let mut socks = clients;
    socks.extend(servers);
    let (sock_tx, sock_rx) = std::sync::mpsc::channel::<Vec<TcpStream>>();
    let (built_tx, built_rx) = std::sync::mpsc::channel::<(u64, u64)>();
    let (stop_tx, stop_rx) = smol::channel::bounded::<()>(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let worker = match stack {
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
    worker.join().unwrap();
}

fn run_child_idle(
    stack: &str,
    pairs: usize,
    settle: Duration,
    window: Duration,
) -> Option<[f64; 6]> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe)
        .args([
            "--child-idle",
            stack,
            &pairs.to_string(),
            &settle.as_millis().to_string(),
            &window.as_millis().to_string(),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("IDLE "))?;
    let v: Vec<f64> = line[5..]
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() == 6 {
        Some([v[0], v[1], v[2], v[3], v[4], v[5]])
    } else {
        eprintln!(
            "idle child failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        None
    }
}

fn scenario_memory(cfg: &Cfg, rep: &mut Report) {
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
         CPU time (/proc/self/stat, {} Hz ticks) over {:.0} s while idle. tokio-util: one task per end \
         awaiting `Framed::next()` on one current-thread runtime, no keepalives.\n",
        2 * pairs,
        cfg.idle_settle.as_secs_f64(),
        clock_ticks(),
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
    for stack in ["chatpipe", "tokio-util"] {
        eprintln!("memory {stack} ({pairs} pairs) ...");
        let window = if stack == "chatpipe" {
            cfg.idle_cpu_window
        } else {
            Duration::ZERO
        };
        match run_child_idle(stack, pairs, cfg.idle_settle, window) {
            Some([rss0, rss1, cpu, wall, allocs, bytes]) => {
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
            None => {
                let _ = writeln!(md, "| {stack} | {} | failed | – | – |", 2 * pairs);
            }
        }
    }
    rep.set("memory/pairs".into(), pairs as f64);
    rep.md.push_str(&md);
    rep.md.push('\n');
}

// ---------------------------------------------------------------------------
// Scenario 6: allocations per message
// ---------------------------------------------------------------------------

/// Allocations on each side's thread (and on every other thread) while `n`
/// messages cross. Returns [send allocs, send bytes, recv allocs, recv
/// bytes, other allocs].
fn allocs_run(
    n: u64,
    side_a: impl FnOnce(Arc<Barrier>, Arc<Barrier>) -> thread::JoinHandle<(u64, u64)>,
    side_b: impl FnOnce(Arc<Barrier>, Arc<Barrier>) -> thread::JoinHandle<(u64, u64)>,
) -> [f64; 5] {
    let ready = Arc::new(Barrier::new(3));
    let go = Arc::new(Barrier::new(3));
    let a = side_a(ready.clone(), go.clone());
    let b = side_b(ready.clone(), go.clone());
    ready.wait();
    GLOBAL_ALLOCS.store(0, Relaxed);
    GLOBAL_BYTES.store(0, Relaxed);
    GLOBAL_ON.store(true, Relaxed);
    go.wait();
    let (sa, sb) = a.join().unwrap();
    let (ra, rb) = b.join().unwrap();
    GLOBAL_ON.store(false, Relaxed);
    let all = GLOBAL_ALLOCS.load(Relaxed);
    let n = n as f64;
    [
        sa as f64 / n,
        sb as f64 / n,
        ra as f64 / n,
        rb as f64 / n,
        all.saturating_sub(sa + ra) as f64 / n,
    ]
}

fn delta(before: (u64, u64)) -> (u64, u64) {
    let now = thread_allocs();
    (now.0 - before.0, now.1 - before.1)
}

fn allocs_chatpipe_oneway(n: u64, size: usize) -> [f64; 5] {
    let (a, b) = tcp_pair();
    let body = payload(size);
    allocs_run(
        n,
        move |ready, go| {
            smol_thread(move |ex| async move {
                let (tx, _incoming, conn) = chatpipe_builder().build(smol_stream(a), Raw);
                let driver = ex.spawn(conn);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    tx.send(RawMessage::Message(body.clone())).await.unwrap();
                }
                tx.close();
                driver.await.expect("driver");
                delta(before)
            })
        },
        move |ready, go| {
            smol_thread(move |ex| async move {
                let (tx, mut incoming, conn) = chatpipe_builder().build(smol_stream(b), Raw);
                let driver = ex.spawn(conn);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    std::hint::black_box(incoming.next().await.unwrap().unwrap());
                }
                let d = delta(before);
                while incoming.next().await.is_some() {}
                drop(tx);
                let _ = driver.await;
                d
            })
        },
    )
}

fn allocs_tokio_feed(n: u64, size: usize) -> [f64; 5] {
    let (a, b) = tcp_pair();
    let body = payload(size);
    allocs_run(
        n,
        move |ready, go| {
            tokio_thread(move || async move {
                let mut f = tokio_framed(a);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    f.feed(body.clone()).await.unwrap();
                }
                SinkExt::<Bytes>::flush(&mut f).await.unwrap();
                SinkExt::<Bytes>::close(&mut f).await.unwrap();
                delta(before)
            })
        },
        move |ready, go| {
            tokio_thread(move || async move {
                let mut f = tokio_framed(b);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    std::hint::black_box(f.next().await.unwrap().unwrap());
                }
                let d = delta(before);
                while f.next().await.is_some() {}
                d
            })
        },
    )
}

/// request() round trips: "send" is the client's thread, "receive" the
/// server's, per request.
fn allocs_chatpipe_request(n: u64) -> [f64; 5] {
    let (a, b) = tcp_pair();
    let body = payload(RTT_SIZE);
    allocs_run(
        n,
        move |ready, go| {
            smol_thread(move |ex| async move {
                let (tx, _incoming, conn) = chatpipe_builder().build(smol_stream(a), Raw);
                let driver = ex.spawn(conn);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for id in 0..n {
                    let msg = RawMessage::Request {
                        id,
                        body: body.clone(),
                    };
                    tx.request(msg).await.expect("request");
                }
                let d = delta(before);
                tx.close();
                driver.await.expect("driver");
                d
            })
        },
        move |ready, go| {
            smol_thread(move |ex| async move {
                let (tx, mut incoming, conn) = chatpipe_builder().build(smol_stream(b), Raw);
                let driver = ex.spawn(conn);
                ready.wait();
                go.wait();
                let before = thread_allocs();
                for _ in 0..n {
                    match incoming.next().await {
                        Some(Ok(RawMessage::Request { id, body })) => {
                            tx.send(RawMessage::Response { id, body }).await.unwrap()
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                let d = delta(before);
                while incoming.next().await.is_some() {}
                drop(tx);
                let _ = driver.await;
                d
            })
        },
    )
}

fn scenario_allocs(cfg: &Cfg, rep: &mut Report) {
    let n: u64 = if cfg.quick { 20_000 } else { 200_000 };
    let rtt_n: u64 = if cfg.quick { 2_000 } else { 20_000 };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 6. allocations per message\n\n\
         A counting global allocator (alloc, alloc_zeroed and realloc each count one) with per-thread \
         counters: *send path* is the sending side's thread (the sending task and its driver), \
         *receive path* the receiving side's thread (driver and the task reading the messages), \
         *other* every other thread (e.g. async-io's reactor thread). Payloads are `Bytes` clones of \
         one buffer, so the payload itself is never allocated per message on the send side. Oneway: \
         {n} messages; request(): {rtt_n} sequential round trips of {RTT_SIZE} B (send = client \
         thread, receive = server thread, per round trip).\n"
    );
    let _ = writeln!(
        md,
        "| stack | messages | send allocs/msg | send bytes/msg | receive allocs/msg | receive bytes/msg | other allocs/msg |\n|---|---|---:|---:|---:|---:|---:|"
    );
    let row = |md: &mut String, name: &str, key: &str, v: [f64; 5], rep: &mut Report| {
        rep.set(format!("allocs/{key}/send"), v[0]);
        rep.set(format!("allocs/{key}/recv"), v[2]);
        let _ = writeln!(
            md,
            "| {name} | {:.3} | {:.1} | {:.3} | {:.1} | {:.3} |",
            v[0], v[1], v[2], v[3], v[4]
        );
    };
    for size in [64usize, 1024, 64 * 1024] {
        eprintln!("allocs {} ...", size_name(size));
        let v = allocs_chatpipe_oneway(n.min(20_000_000 / size as u64), size);
        row(
            &mut md,
            &format!("chatpipe send | oneway {}", size_name(size)),
            &format!("chatpipe/{size}"),
            v,
            rep,
        );
        let v = allocs_tokio_feed(n.min(20_000_000 / size as u64), size);
        row(
            &mut md,
            &format!("tokio-util feed | oneway {}", size_name(size)),
            &format!("tokio/{size}"),
            v,
            rep,
        );
    }
    eprintln!("allocs request() ...");
    let v = allocs_chatpipe_request(rtt_n);
    row(
        &mut md,
        &format!("chatpipe request() | round trip {RTT_SIZE} B"),
        "chatpipe/request",
        v,
        rep,
    );
    rep.md.push_str(&md);
    rep.md.push('\n');
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

fn targets(rep: &mut Report) {
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
    // No target in the issue: informational only.
    let chat = match (
        rep.get("chat/delivered_per_s"),
        rep.get("chat/saturated/p99_us"),
    ) {
        (Some(rate), Some(p99)) => {
            let paced = rep
                .get("chat/paced/p99_us")
                .map_or(String::new(), |p| format!(", paced p99 {p:.0} µs"));
            let single = rep
                .get("chat/single/delivered_per_s")
                .map_or(String::new(), |r| {
                    format!("; 1 sender: {} deliveries/s", si(r))
                });
            format!(
                "{} deliveries/s ({} senders), saturated p99 {p99:.0} µs{paced}{single}",
                si(rate),
                rep.get("chat/senders").unwrap_or(0.0),
            )
        }
        _ => "not measured".into(),
    };
    let _ = writeln!(
        md,
        "| chat fan-out, {} clients (scenario 4; informational) | none given | {chat} | – |\n",
        rep.get("chat/clients").unwrap_or(100.0),
    );
    rep.md.push_str(&md);
}

// ---------------------------------------------------------------------------
// Outputs: CSV and SVG chart
// ---------------------------------------------------------------------------

fn oneway_csv(rep: &Report) -> String {
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

/// A hand-written SVG line chart: messages/s (log scale) against message
/// size (log scale) for the stacks that matter.
fn oneway_svg(rep: &Report, subtitle: &str) -> String {
    let series: [(&str, &str, &str); 4] = [
        ("raw", "#444444", ""),
        ("tokio-util feed", "#1f77b4", ""),
        ("tokio-util send", "#1f77b4", "4 4"),
        ("chatpipe send", "#d62728", ""),
    ];
    let (w, h) = (720.0, 440.0);
    let (l, r, t, b) = (80.0, 190.0, 50.0, 60.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let vals: Vec<f64> = rep
        .oneway
        .iter()
        .filter(|o| series.iter().any(|s| s.0 == o.1))
        .map(|o| o.3)
        .filter(|v| *v > 0.0)
        .collect();
    let lo = vals
        .iter()
        .cloned()
        .fold(f64::MAX, f64::min)
        .log10()
        .floor();
    let hi = vals.iter().cloned().fold(0.0, f64::max).log10().ceil();
    let (lo, hi) = if lo < hi { (lo, hi) } else { (3.0, 9.0) };
    let (xlo, xhi) = (16f64.log2(), (64.0 * 1024f64).log2());
    let x = |size: usize| l + pw * ((size as f64).log2() - xlo) / (xhi - xlo);
    let y = |v: f64| t + ph * (1.0 - (v.log10() - lo) / (hi - lo));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{l}" y="22" font-size="15" font-weight="bold">oneway throughput: messages/s vs message size (log-log)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="{l}" y="38" fill="#666">{}</text>"##,
        xml_escape(subtitle)
    );
    let mut d = lo as i32;
    while d <= hi as i32 {
        let yy = y(10f64.powi(d));
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            l + pw,
            l - 6.0,
            yy + 4.0,
            decade(d)
        );
        d += 1;
    }
    for size in SIZES {
        let xx = x(size);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{t}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            t + ph,
            t + ph + 18.0,
            size_name(size)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">payload size</text>"#,
        l + pw / 2.0,
        h - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">messages/s</text>"#,
        t + ph / 2.0
    );
    for (i, (name, color, dash)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = rep
            .oneway
            .iter()
            .filter(|o| o.1 == *name && o.3 > 0.0)
            .map(|o| (x(o.0), y(o.3)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            path.join(" ")
        );
        for (a, b) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{a:.1}" cy="{b:.1}" r="3.5" fill="{color}"/>"#
            );
        }
        let ly = t + 10.0 + 22.0 * i as f64;
        let lx = l + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// 10^d as 1, 10, 100, 1k, ..., 1G.
fn decade(d: i32) -> String {
    let units = ["", "k", "M", "G", "T"];
    let d = d.max(0) as usize;
    format!(
        "{}{}",
        10u64.pow((d % 3) as u32),
        units.get(d / 3).copied().unwrap_or("?")
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
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
            "chat" => {
                let mut cfg = Cfg::from_env();
                (cfg.chat_msgs, cfg.chat_reps, cfg.chat_paced_secs) = (n, 1, 0.0);
                if size > 0 {
                    cfg.chat_senders = size.min(cfg.chat_clients);
                }
                cfg.chat_single = false;
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
                run.secs
            }
            _ => {
                eprintln!(
                    "cases: raw feed tokio-send send try_send (size n), request ping-raw (_ n), \
                     fanin fanin-feed (_ msgs per connection), chat (senders msgs_each)"
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
    let scenarios: [(&str, Scenario); 6] = [
        ("oneway", scenario_oneway),
        ("rtt", scenario_rtt),
        ("fanin", scenario_fanin),
        ("chat", scenario_chat_fanout),
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

    if let Ok(out) = std::env::var("CHATPIPE_BENCH_OUT") {
        if !out.is_empty() {
            let path = std::path::PathBuf::from(out);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::create_dir_all(dir);
            }
            let csv = path.with_extension("csv");
            let svg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/throughput.svg");
            let _ = std::fs::create_dir_all(svg.parent().unwrap());
            let subtitle = format!(
                "{}; {}",
                if cfg.quick { "QUICK run" } else { "full run" },
                utc_now()
            );
            for (p, body) in [
                (&path, rep.md.clone()),
                (&csv, oneway_csv(&rep)),
                (&svg, oneway_svg(&rep, &subtitle)),
            ] {
                match std::fs::write(p, body) {
                    Ok(()) => eprintln!("wrote {}", p.display()),
                    Err(e) => eprintln!("could not write {}: {e}", p.display()),
                }
            }
        }
    }
}
