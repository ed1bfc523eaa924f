//! The per-client rate limit: a token bucket, sans-IO (told the time).

use std::time::{Duration, Instant};

/// A token bucket: `burst` messages at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Messages per second, on average.
    pub per_second: f64,
    /// Messages at once.
    pub burst: f64,
}

/// One client's bucket, and what it has dropped since it last said so.
pub(crate) struct Bucket {
    pub rate: Rate,
    tokens: f64,
    last: Instant,
    dropped: u64,
    reported: Option<Instant>,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Bucket {
            rate,
            tokens: rate.burst,
            last: now,
            dropped: 0,
            reported: None,
        }
    }

    /// Takes a token if there is one at `now`; counts a drop if not.
    pub fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate.per_second;
        self.tokens = (self.tokens + refill).min(self.rate.burst);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.dropped += 1;
        false
    }

    /// How many were dropped since the last report, if any were, and at most
    /// once a second.
    pub fn report(&mut self, now: Instant) -> Option<u64> {
        if self.dropped == 0
            || self
                .reported
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return None;
        }
        self.reported = Some(now);
        Some(std::mem::take(&mut self.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_second: 10.0,
        burst: 3.0,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_then_drops_until_it_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RATE, t0);
        assert!((0..3).all(|_| b.take(t0)), "the burst");
        assert!(!b.take(t0));
        // 10/s: one token every 100 ms, none before.
        assert!(!b.take(t0 + ms(99)));
        assert!(b.take(t0 + ms(100)));
        assert!(!b.take(t0 + ms(100)));
    }

    #[test]
    fn refills_up_to_the_burst_only() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RATE, t0);
        assert!((0..3).all(|_| b.take(t0)));
        // An hour idle gives back the burst, not 36,000 messages.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 3);
    }

    #[test]
    fn an_earlier_instant_refills_nothing() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut b = Bucket::new(RATE, t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0 - ms(500)));
        assert!(!b.take(t0 + ms(99)), "going back did not move the refill");
        assert!(b.take(t0 + ms(100)));
    }

    #[test]
    fn drops_are_counted_and_reported_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RATE, t0);
        assert_eq!(b.report(t0), None, "nothing dropped yet");
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert_eq!(b.report(t0), Some(1), "the first drop, at once");
        assert!(!b.take(t0) && !b.take(t0 + ms(50)));
        assert_eq!(b.report(t0 + ms(999)), None, "within the second");
        assert_eq!(b.report(t0 + ms(1000)), Some(2), "the two since");
        assert!(b.take(t0 + ms(1000)), "refilled meanwhile");
        assert_eq!(b.report(t0 + ms(5000)), None, "none since");
    }
}
