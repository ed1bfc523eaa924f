//! [`Backoff`]: when a [`Session`](crate::Session) tries again after a
//! failure. Sans-IO: it reads no clock, so it is tested (and usable) on its
//! own, fed explicit `Instant`s.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// When to try again: exponential backoff with full jitter, reset after a
/// stable connection. Sans-IO: it reads no clock, so it is tested (and
/// can be used) on its own, fed explicit `Instant`s.
///
/// After the `n`th failure in a row (a refused or timed-out connect, a
/// failed setup, or a connection lost), the wait is drawn uniformly from
/// `[0, ceiling(n)]`, where `ceiling(n) = min(max, initial * multiplier^(n-1))`
/// ("full jitter": clients that lost the same server do not come back in
/// step). A connection that stayed up for `reset_after` starts the count
/// again, so its loss is failure 1.
///
/// | setting | default |
/// |---|---|
/// | [`initial`](Backoff::initial) | 1 s |
/// | [`multiplier`](Backoff::multiplier) | 2 |
/// | [`max`](Backoff::max) | 30 s |
/// | [`reset_after`](Backoff::reset_after) | 30 s |
///
/// The jitter comes from a small generator seeded from the standard
/// library's `RandomState`; [`seed`](Backoff::seed) fixes it for tests.
///
/// ```
/// use std::time::{Duration, Instant};
/// let mut backoff = chatpipe::Backoff::new().seed(7);
/// let now = Instant::now();
/// let first = backoff.failed(now);
/// assert!(first <= Duration::from_secs(1));
/// let second = backoff.failed(now + first);
/// assert!(second <= Duration::from_secs(2));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    multiplier: f64,
    max: Duration,
    reset_after: Duration,
    failures: u32,
    connected_at: Option<Instant>,
    rng: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(0x5e55_1011);
        Backoff {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
            failures: 0,
            connected_at: None,
            rng: h.finish(),
        }
    }
}

impl Backoff {
    /// The defaults (see the table above), with a random seed.
    pub fn new() -> Self {
        Self::default()
    }

    /// The ceiling of the first wait. Default: 1 s.
    pub fn initial(mut self, d: Duration) -> Self {
        self.initial = d;
        self
    }

    /// How much the ceiling grows with each failure in a row. Default: 2.
    /// At least 1 (a NaN is taken as 1).
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m >= 1.0 && m.is_finite() { m } else { 1.0 };
        self
    }

    /// The largest ceiling. Default: 30 s.
    pub fn max(mut self, d: Duration) -> Self {
        self.max = d;
        self
    }

    /// A connection up for this long resets the count of failures.
    /// Default: 30 s.
    pub fn reset_after(mut self, d: Duration) -> Self {
        self.reset_after = d;
        self
    }

    /// Fixes the jitter's seed: the same seed and the same calls give the
    /// same waits. For tests; the default seed is random.
    pub fn seed(mut self, seed: u64) -> Self {
        self.rng = seed;
        self
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The ceiling of the wait after the `n`th failure in a row:
    /// `min(max, initial * multiplier^(n-1))`; zero for `n = 0`.
    pub fn ceiling(&self, n: u32) -> Duration {
        if n == 0 {
            return Duration::ZERO;
        }
        let exp = (n - 1).min(1_000) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        let max = self.max.as_secs_f64();
        Duration::try_from_secs_f64(secs.min(max))
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// An attempt failed, or the connection was lost, at `now`: how long
    /// to wait before the next attempt.
    pub fn failed(&mut self, now: Instant) -> Duration {
        if let Some(at) = self.connected_at.take() {
            if now.saturating_duration_since(at) >= self.reset_after {
                self.failures = 0;
            }
        }
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.ceiling(self.failures);
        ceiling.mul_f64(self.unit())
    }

    /// The session became connected at `now` (its setup done): if it stays
    /// up for `reset_after`, its loss counts as a first failure.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// Forgets every failure: the next wait is drawn from the first
    /// ceiling.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.connected_at = None;
    }

    /// Uniform in `[0, 1)`: splitmix64.
    fn unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}
