//! The one timer a connection needs, behind a small trait so any runtime's
//! timer can drive it.

use std::task::{Context, Poll};
use std::time::Instant;

/// A re-armable timer: the connection keeps one and moves its deadline,
/// rather than creating a timer per message.
///
/// Implement it over your runtime's timer (for tokio, a pinned
/// `tokio::time::Sleep` with `reset`), or use the default,
/// [`AsyncIoTimer`], which works under any executor.
pub trait Timer: Send + Unpin + 'static {
    /// Sets the deadline, replacing any earlier one.
    fn reset(&mut self, deadline: Instant);

    /// Ready once the deadline set last has passed; registers the waker
    /// otherwise.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

/// The default timer: [`async_io::Timer`], driven by async-io's own
/// reactor thread when the executor is not async-io's, so it works under
/// smol, tokio or anything else.
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
    fn reset(&mut self, deadline: Instant) {
        self.0.set_at(deadline);
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use std::future::Future;
        use std::pin::Pin;
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}
