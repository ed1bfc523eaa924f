//! Measurement plumbing: medians and spreads, percentiles, calibrating N,
//! and the machine side (/proc readers, CPU affinity, the open-file limit).

use crate::Cfg;

pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) fn stats(v: &[f64]) -> Stats {
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

pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1000.0
}

/// Run `run(n)` (returning seconds) a few times to find an N that takes
/// about `target_secs`, then `reps` times with it. The first runs double as
/// warm-up.
pub(crate) fn calibrated(cfg: &Cfg, mut run: impl FnMut(u64) -> f64) -> (u64, Vec<f64>) {
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

pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: as above.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// Resident set size of this process, bytes, from /proc/self/statm.
pub(crate) fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * page_size()
}

/// CPU time (user + system) of this process, seconds, from `getrusage`
/// (microseconds, where /proc/self/stat counts 10 ms ticks: the keepalive
/// floor's few milliseconds need the finer clock).
pub(crate) fn process_cpu_secs() -> f64 {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Releases free heap memory to the system, so that RSS deltas measure
/// what is in use rather than what an earlier phase left free.
pub(crate) fn malloc_trim() {
    // SAFETY: malloc_trim only walks glibc's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The CPUs this process may run on at start.
pub(crate) fn allowed_cpus() -> Vec<usize> {
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
pub(crate) fn set_process_affinity(cpus: &[usize]) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            set_affinity(tid, cpus);
        }
    }
}

/// Pins the calling thread to `cpu`; threads it creates later inherit it.
pub(crate) fn pin_this_thread(cpu: usize) {
    set_affinity(0, &[cpu]);
}

/// Pins thread `tid` (0: the calling thread) to `cpus`.
fn set_affinity(tid: i32, cpus: &[usize]) {
    // SAFETY: as in `allowed_cpus`; sched_setaffinity only reads the set. A
    // thread that exited meanwhile gives ESRCH.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Raises the soft open-file limit to the hard one; returns the soft limit
/// now in force.
pub(crate) fn raise_nofile() -> u64 {
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

pub(crate) fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(16)
}
