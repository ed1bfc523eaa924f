//! The bounded queue of received messages, from the driver to `Incoming`.
//!
//! Why not async-channel: its bounded queue allocates and touches every
//! slot up front (1,024 messages are tens of KiB per connection, idle or
//! not), and it moves one item per atomic operation. This queue grows only
//! with what is in it, gives its memory back when drained, and both sides
//! move whole batches under one lock.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use event_listener::{Event, IntoNotification};

pub(crate) struct Queue<T> {
    inner: Mutex<Inner<T>>,
    /// Producers waiting for room.
    room: Event,
    capacity: usize,
}

struct Inner<T> {
    items: VecDeque<T>,
    closed: bool,
    /// The single consumer, parked on an empty queue.
    consumer: Option<Waker>,
}

impl<T> Queue<T> {
    pub fn new(capacity: usize) -> Self {
        Queue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                closed: false,
                consumer: None,
            }),
            room: Event::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Nothing runs user code under this lock, so poisoning cannot leave
        // the queue inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves as many of `items` as there is room for to the back of the
    /// queue, in order. `Err(())` if the queue is closed.
    pub fn push_batch(&self, items: &mut VecDeque<T>) -> Result<(), ()> {
        self.push(items, false)
    }

    /// Moves all of `items`, room or not: for the last messages of a
    /// connection that is ending (at most one batch over the capacity).
    pub fn push_all(&self, items: &mut VecDeque<T>) -> Result<(), ()> {
        self.push(items, true)
    }

    fn push(&self, items: &mut VecDeque<T>, all: bool) -> Result<(), ()> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(());
        }
        let room = match all {
            true => usize::MAX,
            false => self.capacity.saturating_sub(inner.items.len()),
        };
        let n = room.min(items.len());
        if n == 0 {
            return Ok(());
        }
        if inner.items.is_empty() && n == items.len() {
            std::mem::swap(&mut inner.items, items);
        } else {
            inner.items.extend(items.drain(..n));
        }
        let consumer = inner.consumer.take();
        drop(inner);
        if let Some(w) = consumer {
            w.wake();
        }
        Ok(())
    }

    /// A listener notified when room is made (or the queue closes). Listen
    /// first, then check, so room made in between is not missed.
    pub fn listen_room(&self) -> event_listener::EventListener {
        self.room.listen()
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Moves everything waiting to the back of `out` (which the consumer
    /// owns, so the lock is held only for a swap or a short copy).
    ///
    /// `Ready(true)` if anything was taken, `Ready(false)` once the queue is
    /// closed and empty; `Pending` (consumer registered) otherwise.
    pub fn poll_take_all(&self, cx: &mut Context<'_>, out: &mut VecDeque<T>) -> Poll<bool> {
        let mut inner = self.lock();
        if inner.items.is_empty() {
            if inner.closed {
                return Poll::Ready(false);
            }
            inner.consumer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = inner.items.len();
        if out.is_empty() {
            std::mem::swap(&mut inner.items, out);
        } else {
            out.extend(inner.items.drain(..));
        }
        drop(inner);
        self.room.notify(n.additional());
        Poll::Ready(true)
    }

    /// Closes the queue: pushes fail from now on; what is in it can still
    /// be taken. Wakes everyone waiting.
    pub fn close(&self) {
        let consumer = {
            let mut inner = self.lock();
            inner.closed = true;
            inner.consumer.take()
        };
        if let Some(w) = consumer {
            w.wake();
        }
        self.room.notify(usize::MAX);
    }

    /// Gives back the memory of an empty queue.
    pub fn release_if_empty(&self) {
        let mut inner = self.lock();
        if inner.items.is_empty() && inner.items.capacity() > 0 {
            inner.items = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(items: &[u32]) -> VecDeque<u32> {
        items.iter().copied().collect()
    }

    #[test]
    fn bounded_fifo_in_batches_with_close() {
        let q = Queue::new(3);
        let mut cx = Context::from_waker(Waker::noop());
        let mut items = batch(&[1, 2, 3, 4, 5]);
        q.push_batch(&mut items).unwrap();
        assert_eq!(items, [4, 5], "only what fits moves");
        assert_eq!(q.len(), 3);
        let mut out = VecDeque::new();
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        assert_eq!(out, [1, 2, 3]);
        assert!(q.poll_take_all(&mut cx, &mut out).is_pending());
        q.push_batch(&mut items).unwrap();
        q.close();
        assert!(q.push_batch(&mut batch(&[6])).is_err());
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        assert_eq!(out, [1, 2, 3, 4, 5], "what was queued before the close");
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(false));
    }

    #[test]
    fn a_full_producer_is_woken_when_room_is_made() {
        let q = Queue::new(1);
        q.push_batch(&mut batch(&[1])).unwrap();
        let listener = q.listen_room();
        let mut rest = batch(&[2]);
        q.push_batch(&mut rest).unwrap();
        assert_eq!(rest, [2], "full");
        let mut out = VecDeque::new();
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        // The listener fires because room was made.
        smol::block_on(listener);
        q.push_batch(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn memory_is_given_back_when_empty() {
        let q = Queue::new(1000);
        q.push_batch(&mut (0..1000).collect()).unwrap();
        let mut out = VecDeque::new();
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        q.release_if_empty();
        assert_eq!(q.lock().items.capacity(), 0);
    }
}
