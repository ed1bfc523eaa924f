//! [`Incoming`]: the stream of received messages.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::stream::{FusedStream, Stream};

use crate::connection::Shared;
use crate::queue::Queue;
use crate::{Error, Protocol};

/// The incoming messages: a [`Stream`] of `Result<Message, Error>`.
///
/// Keepalives and responses to requests are taken out. The stream ends
/// with `None` after a clean close, or yields the error that closed the
/// connection once and then ends. Dropping it is allowed: later messages
/// are then discarded (responses still reach their requests).
///
/// Messages are taken from the connection in batches: besides the
/// `receive_capacity` messages that may wait in the queue, the stream holds
/// at most as many again that it is handing out. When the connection ends,
/// what had already been read (at most one read-ahead: a maximum frame's
/// worth, or 64 KiB if that is less) is handed over too, room or not,
/// before the end.
///
/// ```no_run
/// # async fn f(mut incoming: chatpipe::Incoming<chatpipe::raw::Raw>) {
/// use futures::StreamExt;
/// while let Some(msg) = incoming.next().await {
///     match msg {
///         Ok(msg) => println!("{msg:?}"),
///         Err(e) => eprintln!("connection failed: {e}"), // always the last item
///     }
/// }
/// # }
/// ```
pub struct Incoming<P: Protocol> {
    queue: Arc<Queue<P::Message>>,
    batch: VecDeque<P::Message>,
    shared: Arc<Shared>,
    done: bool,
}

impl<P: Protocol> Incoming<P> {
    pub(crate) fn new(queue: Arc<Queue<P::Message>>, shared: Arc<Shared>) -> Self {
        Incoming {
            queue,
            batch: VecDeque::new(),
            shared,
            done: false,
        }
    }

    /// Messages received and not yet taken by the application: how far
    /// behind it is. At most about twice the `receive_capacity`; beyond
    /// that the connection stops reading, and the peer's sends wait.
    ///
    /// ```no_run
    /// # fn f(incoming: chatpipe::Incoming<chatpipe::raw::Raw>) {
    /// if incoming.buffered() > 500 {
    ///     eprintln!("the peer sends faster than we handle");
    /// }
    /// # }
    /// ```
    pub fn buffered(&self) -> usize {
        self.queue.len() + self.batch.len()
    }

    /// The reason the connection ended: `None` while it is open.
    pub fn close_reason(&self) -> Option<Error> {
        self.shared.reason.get().cloned()
    }
}

// Nothing in it is structurally pinned.
impl<P: Protocol> Unpin for Incoming<P> {}

impl<P: Protocol> Drop for Incoming<P> {
    fn drop(&mut self) {
        // Tells the driver to stop delivering (and stop waiting for room).
        self.queue.close();
    }
}

impl<P: Protocol> fmt::Debug for Incoming<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("buffered", &(self.queue.len() + self.batch.len()))
            .finish()
    }
}

impl<P: Protocol> Stream for Incoming<P> {
    type Item = Result<P::Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(m) = this.batch.pop_front() {
                return Poll::Ready(Some(Ok(m)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.queue.poll_take_all(cx, &mut this.batch) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => {
                    this.done = true;
                    return match this.shared.reason() {
                        Error::Closed => Poll::Ready(None),
                        e => Poll::Ready(Some(Err(e))),
                    };
                }
                // A large batch, drained, waits in the queue (see
                // `poll_take_all`), which gives it back once idle.
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<P: Protocol> FusedStream for Incoming<P> {
    fn is_terminated(&self) -> bool {
        self.done && self.batch.is_empty()
    }
}
