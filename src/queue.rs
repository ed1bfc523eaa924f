//! The bounded message queue between the handles and the driver, one each
//! way.
//!
//! Why not async-channel: its bounded queue allocates and touches every
//! slot up front (1,024 outgoing frames are ~80 KiB per connection, idle or
//! not), and its consumer takes one item per atomic operation. This queue
//! grows only with what is in it, gives its memory back when drained, and
//! its single consumer takes everything waiting under one lock.

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

/// Why a push failed; the item comes back.
#[derive(Debug)]
pub(crate) enum PushError<T> {
    Full(T),
    Closed(T),
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

    /// Pushes if there is room.
    pub fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(PushError::Closed(item));
        }
        if inner.items.len() >= self.capacity {
            return Err(PushError::Full(item));
        }
        inner.items.push_back(item);
        let consumer = inner.consumer.take();
        drop(inner);
        if let Some(w) = consumer {
            w.wake();
        }
        Ok(())
    }

    /// Pushes, waiting for room. Gives the item back if the queue closes.
    ///
    /// Cancel safe: if the future is dropped, the item was not pushed.
    pub async fn push(&self, mut item: T) -> Result<(), T> {
        loop {
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(it)) => return Err(it),
                Err(PushError::Full(it)) => item = it,
            }
            // Listen, then check again: room made in between is not missed.
            let listener = self.room.listen();
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(it)) => return Err(it),
                Err(PushError::Full(it)) => item = it,
            }
            listener.await;
        }
    }

    /// Whether a push would find the queue full right now.
    pub fn is_full(&self) -> bool {
        self.lock().items.len() >= self.capacity
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

    /// Takes everything left without waiting (used after the end).
    pub fn take_all(&self) -> VecDeque<T> {
        let items = std::mem::take(&mut self.lock().items);
        self.room.notify(usize::MAX);
        items
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

    pub fn is_closed(&self) -> bool {
        self.lock().closed
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
    use std::sync::Arc;

    #[test]
    fn bounded_fifo_with_close() {
        let q = Queue::new(2);
        q.try_push(1).unwrap();
        q.try_push(2).unwrap();
        assert!(matches!(q.try_push(3), Err(PushError::Full(3))));
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        let mut out = VecDeque::new();
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        assert_eq!(out, [1, 2]);
        assert!(q.poll_take_all(&mut cx, &mut out).is_pending());
        q.try_push(3).unwrap();
        q.close();
        assert!(matches!(q.try_push(4), Err(PushError::Closed(4))));
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(true));
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(q.poll_take_all(&mut cx, &mut out), Poll::Ready(false));
    }

    #[test]
    fn waiting_producers_get_room_in_order_of_space() {
        let q = Arc::new(Queue::new(1));
        q.try_push(0).unwrap();
        let producers: Vec<_> = (1..=3)
            .map(|i| {
                let q = q.clone();
                std::thread::spawn(move || smol::block_on(q.push(i)))
            })
            .collect();
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        let mut got = Vec::new();
        for _ in 0..50_000 {
            let mut out = VecDeque::new();
            if let Poll::Ready(true) = q.poll_take_all(&mut cx, &mut out) {
                got.extend(out);
            }
            if got.len() == 4 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        for p in producers {
            p.join().unwrap().unwrap();
        }
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2, 3]);
    }

    fn futures_task_noop() -> Waker {
        Waker::noop().clone()
    }
}
