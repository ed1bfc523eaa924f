//! The room's memory budget for what waits on slow members
//! ([`Config::max_memory`](crate::Config::max_memory)): its default, the
//! `--max-memory` parser, and [`Usage`], the room's count.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The default budget where the machine's memory cannot be read.
pub const FALLBACK_MAX_MEMORY: usize = 1 << 30;

/// What one queued message costs the budget beyond its strings: a generous
/// allowance for its frame's header (11 bytes for a Broadcast) and its slot
/// in a queue.
pub const MESSAGE_OVERHEAD: usize = 32;

/// A quarter of the memory this process may use: the machine's
/// (`MemTotal` in `/proc/meminfo`) or its cgroup's limit, whichever is
/// lower; [`FALLBACK_MAX_MEMORY`] (1 GiB) where neither can be read.
pub fn default_max_memory() -> usize {
    let total = meminfo_total();
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok())
    .filter_map(|text| text.trim().parse::<u64>().ok())
    .min();
    match (total, cgroup) {
        (Some(t), Some(c)) => quarter(t.min(c)),
        (Some(t), None) => quarter(t),
        (None, Some(c)) => quarter(c),
        (None, None) => FALLBACK_MAX_MEMORY,
    }
}

fn quarter(bytes: u64) -> usize {
    usize::try_from(bytes / 4).unwrap_or(usize::MAX)
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Parses a size in bytes: a whole number, optionally followed by `K`,
/// `M`, `G` or `T` (powers of 1,024; `KiB`, `kb`, `MB`... read the same),
/// as `--max-memory` takes it: `1073741824`, `512M`, `2G`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: a number, then K, M, G or T"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (K, M, G or T)")),
    };
    number
        .checked_mul(1usize.checked_shl(shift).unwrap_or(0))
        .filter(|_| shift < usize::BITS)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// What waits for the room's members, for [`Config::usage`](crate::Config::usage):
/// the count [`Config::max_memory`](crate::Config::max_memory) bounds, read
/// without a lock, for monitoring and tests.
///
/// A message queued for a member counts from the moment the room queues it
/// until it is written to that member's socket (or dropped with the member):
/// its strings plus [`MESSAGE_OVERHEAD`], once per member it waits for, as
/// if each had its own copy. (Members share one copy while it waits in
/// their backlogs; each connection's queue holds an encoded copy of its
/// own.)
#[derive(Debug, Default)]
pub struct Usage {
    waiting: AtomicUsize,
    peak: AtomicUsize,
}

impl Usage {
    /// Bytes waiting for members now, as the budget counts them.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The most [`waiting`](Usage::waiting) has been since the room
    /// started.
    pub fn peak_waiting(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Counts `cost` more. Called only with the room's state locked, so
    /// that the budget check before it holds and the peak has one writer.
    pub(crate) fn add(&self, cost: usize) {
        let now = self.waiting.fetch_add(cost, Ordering::Relaxed) + cost;
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.store(now, Ordering::Relaxed);
        }
    }

    /// Counts `cost` less.
    pub(crate) fn sub(&self, cost: usize) {
        self.waiting.fetch_sub(cost, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("32M"), Ok(32 << 20));
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size(" 2G "), Ok(2 << 30));
        assert_eq!(parse_size("2 GB"), Ok(2 << 30));
        assert_eq!(parse_size("7b"), Ok(7));
        for bad in ["", "M", "-1", "1.5G", "12Q", "1G2", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size(&format!("{}T", usize::MAX >> 39)).is_err());
    }

    #[test]
    fn the_default_budget_is_a_quarter_of_the_memory() {
        let budget = default_max_memory();
        match meminfo_total() {
            // A cgroup limit can only lower it.
            Some(total) => assert!(budget as u64 <= total / 4, "{budget} of {total}"),
            None => assert!(budget <= FALLBACK_MAX_MEMORY),
        }
        assert!(budget > 0);
        assert_eq!(quarter(4 << 30), 1 << 30);
    }
}
