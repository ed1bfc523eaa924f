//! The bounded queue of received messages, from the driver to `Incoming`.
//!
//! Why not async-channel: its bounded queue allocates and touches every
//! slot up front (1,024 messages are tens of KiB per connection, idle or
//! not), and it moves one item per atomic operation. This queue grows only
//! with what is in it, gives its memory back once the connection is idle,
//! and both sides move whole batches under one lock.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

pub(crate) struct Queue<T> {
    inner: Mutex<Inner<T>>,
    capacity: usize,
}

struct Inner<T> {
    items: VecDeque<T>,
    closed: bool,
    /// The single consumer, parked on an empty queue.
    consumer: Option<Waker>,
    /// The single producer (the driver), parked on a full one. A waker
    /// slot rather than an `Event`, whose listeners are allocated: a
    /// driver ahead of its application waits here once per batch.
    producer: Option<Waker>,
}

impl<T> Queue<T> {
    pub fn new(capacity: usize) -> Self {
        Queue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                closed: false,
                consumer: None,
                producer: None,
            }),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Nothing runs user code under this lock, so poisoning cannot leave
        // the queue inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves as many of `items` as there is room for to the back of the
    /// queue, in order. `Ready(Ok)` once all have moved, `Ready(Err)` if
    /// the queue is closed, `Pending` (producer registered, woken when room
    /// is made or the queue closes) while some do not fit.
    pub fn poll_push(&self, cx: &mut Context<'_>, items: &mut VecDeque<T>) -> Poll<Result<(), ()>> {
        let mut inner = self.lock();
        if inner.closed {
            return Poll::Ready(Err(()));
        }
        let room = self.capacity.saturating_sub(inner.items.len());
        let consumer = Self::move_in(&mut inner, items, room);
        let res = if items.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            match &inner.producer {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => inner.producer = Some(cx.waker().clone()),
            }
            Poll::Pending
        };
        drop(inner);
        if let Some(w) = consumer {
            w.wake();
        }
        res
    }

    /// Moves all of `items`, room or not: for the last messages of a
    /// connection that is ending (at most one batch over the capacity).
    pub fn push_all(&self, items: &mut VecDeque<T>) -> Result<(), ()> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(());
        }
        let consumer = Self::move_in(&mut inner, items, usize::MAX);
        drop(inner);
        if let Some(w) = consumer {
            w.wake();
        }
        Ok(())
    }

    /// Moves up to `room` of `items` in; the consumer to wake, if any.
    fn move_in(inner: &mut Inner<T>, items: &mut VecDeque<T>, room: usize) -> Option<Waker> {
        let n = room.min(items.len());
        if n == 0 {
            return None;
        }
        if inner.items.is_empty() && n == items.len() {
            std::mem::swap(&mut inner.items, items);
        } else {
            inner.items.extend(items.drain(..n));
        }
        inner.consumer.take()
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
            if out.is_empty() && out.capacity() > inner.items.capacity() {
                // Keep the larger empty batch here, where the driver trades
                // it for its next one and gives it back once idle
                // (`release_if_empty`): growing a batch anew each round
                // costs reallocations and fresh pages.
                std::mem::swap(&mut inner.items, out);
            }
            inner.consumer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if out.is_empty() {
            std::mem::swap(&mut inner.items, out);
        } else {
            out.extend(inner.items.drain(..));
        }
        let producer = inner.producer.take();
        drop(inner);
        if let Some(w) = producer {
            w.wake();
        }
        Poll::Ready(true)
    }

    /// Closes the queue: pushes fail from now on; what is in it can still
    /// be taken. Wakes everyone waiting.
    pub fn close(&self) {
        let (consumer, producer) = {
            let mut inner = self.lock();
            inner.closed = true;
            (inner.consumer.take(), inner.producer.take())
        };
        for w in [consumer, producer].into_iter().flatten() {
            w.wake();
        }
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

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn counting() -> (std::sync::Arc<Count>, Waker) {
        let c = std::sync::Arc::new(Count(Default::default()));
        (c.clone(), Waker::from(c))
    }

    fn wakes(c: &Count) -> usize {
        c.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn bounded_fifo_in_batches_with_close() {
        let q = Queue::new(3);
        let mut cx = Context::from_waker(Waker::noop());
        let mut items = batch(&[1, 2, 3, 4, 5]);
        assert!(q.poll_push(&mut cx, &mut items).is_pending());
        assert_eq!(items, [4, 5], "only what fits moves");
        assert_eq!(q.len(), 3);
        let mut out = VecDeque::new();
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        assert_eq!(out, [1, 2, 3]);
        assert!(q.poll_take_all(&mut cx, &mut out).is_pending());
        assert_eq!(q.poll_push(&mut cx, &mut items), Poll::Ready(Ok(())));
        q.close();
        let closed = q.poll_push(&mut cx, &mut batch(&[6]));
        assert_eq!(closed, Poll::Ready(Err(())));
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        assert_eq!(out, [1, 2, 3, 4, 5], "what was queued before the close");
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(false));
    }

    #[test]
    fn a_full_producer_is_woken_when_room_is_made_or_the_queue_closes() {
        let q = Queue::new(1);
        let (producer, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut rest = batch(&[1, 2]);
        assert!(q.poll_push(&mut cx, &mut rest).is_pending());
        assert_eq!(rest, [2], "full");
        assert_eq!(wakes(&producer), 0);
        let mut out = VecDeque::new();
        let mut noop = Context::from_waker(Waker::noop());
        assert_eq!(q.poll_take_all(&mut noop, &mut out), Poll::Ready(true));
        assert_eq!(wakes(&producer), 1, "room was made");
        assert_eq!(q.poll_push(&mut cx, &mut rest), Poll::Ready(Ok(())));
        assert!(q.poll_push(&mut cx, &mut batch(&[3])).is_pending());
        q.close();
        assert_eq!(wakes(&producer), 2, "closed");
    }

    #[test]
    fn the_consumer_is_woken_by_a_push() {
        let q = Queue::new(4);
        let (consumer, waker) = counting();
        let mut out = VecDeque::new();
        let mut cx = Context::from_waker(&waker);
        assert!(q.poll_take_all(&mut cx, &mut out).is_pending());
        let mut noop = Context::from_waker(Waker::noop());
        assert_eq!(
            q.poll_push(&mut noop, &mut batch(&[1])),
            Poll::Ready(Ok(()))
        );
        assert_eq!(wakes(&consumer), 1);
        q.push_all(&mut batch(&[2, 3, 4, 5, 6])).unwrap();
        assert_eq!(q.len(), 6, "room or not");
    }

    #[test]
    fn memory_is_given_back_when_empty() {
        let q = Queue::new(1000);
        let mut out = VecDeque::new();
        let mut cx = Context::from_waker(Waker::noop());
        let pushed = q.poll_push(&mut cx, &mut (0..1000).collect());
        assert_eq!(pushed, Poll::Ready(Ok(())));
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        q.release_if_empty();
        assert_eq!(q.lock().items.capacity(), 0);
    }

    #[test]
    fn a_drained_batch_is_parked_in_the_queue_until_idle() {
        let q = Queue::new(1000);
        let mut cx = Context::from_waker(Waker::noop());
        let mut items: VecDeque<u32> = (0..1000).collect();
        let cap = items.capacity();
        assert_eq!(q.poll_push(&mut cx, &mut items), Poll::Ready(Ok(())));
        let mut out = VecDeque::new();
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        out.clear();
        assert!(q.poll_take_all(&mut cx, &mut out).is_pending());
        assert_eq!(out.capacity(), 0, "the consumer keeps the small one");
        assert_eq!(q.lock().items.capacity(), cap, "the queue the large one");
        // The driver's next batch comes back in it, empty.
        let mut next = batch(&[1]);
        assert_eq!(q.poll_push(&mut cx, &mut next), Poll::Ready(Ok(())));
        assert!(next.is_empty() && next.capacity() >= cap);
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        out.clear();
        assert!(q.poll_take_all(&mut cx, &mut out).is_pending());
        q.release_if_empty();
        assert_eq!(q.lock().items.capacity(), 0);
    }
}
