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

/// One client's bucket.
#[derive(Debug)]
pub(crate) struct Bucket {
    pub rate: Rate,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Bucket {
            rate,
            tokens: rate.burst,
            last: now,
        }
    }

    /// Takes a token if there is one at `now`; otherwise says when there
    /// will be one (and takes nothing).
    pub fn take(&mut self, now: Instant) -> Result<(), Instant> {
        let ready = self.ready(now);
        if ready > now {
            return Err(ready);
        }
        self.tokens -= 1.0;
        Ok(())
    }

    /// When there is a token: `now` or earlier if there is one already.
    /// Takes nothing.
    pub fn ready(&mut self, now: Instant) -> Instant {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate.per_second;
        self.tokens = (self.tokens + refill).min(self.rate.burst);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            return now;
        }
        let wait = (1.0 - self.tokens) / self.rate.per_second.max(f64::MIN_POSITIVE);
        self.last + Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX / 2)
    }

    /// Puts back a token taken (never over `burst`).
    pub fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.rate.burst);
    }

    /// Whether the bucket is full again at `now`: one not used for a while.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.ready(now);
        self.tokens >= self.rate.burst
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
    fn a_burst_then_waits_until_it_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RATE, t0);
        assert!((0..3).all(|_| b.take(t0).is_ok()), "the burst");
        // 10/s: the next token in exactly 100 ms, none before.
        assert_eq!(b.take(t0), Err(t0 + ms(100)));
        assert_eq!(b.take(t0 + ms(99)), Err(t0 + ms(100)));
        assert_eq!(b.take(t0 + ms(100)), Ok(()));
        assert_eq!(b.take(t0 + ms(100)), Err(t0 + ms(200)));
    }

    #[test]
    fn refills_up_to_the_burst_only() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RATE, t0);
        assert!((0..3).all(|_| b.take(t0).is_ok()));
        // An hour idle gives back the burst, not 36,000 messages.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| b.take(later).is_ok()).count(), 3);
    }

    #[test]
    fn an_earlier_instant_refills_nothing() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut b = Bucket::new(RATE, t0);
        assert!((0..3).all(|_| b.take(t0).is_ok()));
        assert!(b.take(t0 - ms(500)).is_err());
        assert!(
            b.take(t0 + ms(99)).is_err(),
            "going back did not move the refill"
        );
        assert!(b.take(t0 + ms(100)).is_ok());
    }
}
