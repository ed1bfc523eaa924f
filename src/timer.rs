//! Time, behind one small trait, so any runtime's timer (or a virtual
//! clock in tests) can drive a connection.

use std::task::{Context, Poll};
use std::time::Instant;

/// A clock and one re-armable timer: the connection keeps one and moves its
/// deadline, rather than creating a timer per message.
///
/// Every time the connection reads comes from [`Timer::now`], so a timer
/// over a virtual clock ([`ManualClock`](crate::test_util::ManualClock)
/// with the `test-util` feature, or tokio's paused time with
/// [`TokioTimer`](crate::TokioTimer)) runs whole connections without
/// waiting.
///
/// Implementations ship for async-io ([`AsyncIoTimer`], the default) and
/// tokio ([`TokioTimer`](crate::TokioTimer), feature `tokio`).
pub trait Timer: Send + Unpin + 'static {
    /// The current time on this timer's clock.
    fn now(&self) -> Instant;

    /// Sets the deadline, replacing any earlier one.
    fn reset(&mut self, deadline: Instant);

    /// Ready once the deadline set last has passed; registers the waker
    /// otherwise. A registered waker is woken when the deadline passes,
    /// without another poll: the connection does not poll again while its
    /// task's waker is the same and the deadline is ahead (async-io's,
    /// tokio's and most timers work this way).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

/// The default timer: [`async_io::Timer`], driven by async-io's own
/// reactor thread when the executor is not async-io's, so it works under
/// smol or any other executor (on tokio, prefer
/// [`TokioTimer`](crate::TokioTimer), which needs no extra thread).
#[cfg(feature = "async-io")]
#[derive(Debug)]
pub struct AsyncIoTimer(async_io::Timer);

#[cfg(feature = "async-io")]
impl Default for AsyncIoTimer {
    fn default() -> Self {
        AsyncIoTimer(async_io::Timer::never())
    }
}

#[cfg(feature = "async-io")]
impl Timer for AsyncIoTimer {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn reset(&mut self, deadline: Instant) {
        self.0.set_at(deadline);
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use std::future::Future;
        use std::pin::Pin;
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}
