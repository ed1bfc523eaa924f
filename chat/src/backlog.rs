//! A member's backlog: what the room queued for it, on its way to its
//! connection. One sender (the room, under its lock) and one receiver (the
//! member's task), unbounded (the room's counts bound it).
//!
//! An `async_channel` did this before, at a cost per message the profile of
//! a busy room showed: every send notified the receiver's event (a lock and
//! a wake-up attempt) and every receive polled a listener. Here a send is a
//! push under an uncontended lock, and wakes the receiver only when it is
//! parked on an empty backlog; the receiver takes everything waiting at
//! once.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

struct Inner<T> {
    items: VecDeque<T>,
    /// No more sends: the sender closed it or a side was dropped.
    closed: bool,
    /// The receiver, parked on an empty backlog.
    waker: Option<Waker>,
}

struct Shared<T>(Mutex<Inner<T>>);

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Nothing panics while it is held.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        let waker = {
            let mut inner = self.lock();
            inner.closed = true;
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The room's end.
pub(crate) struct Sender<T>(Arc<Shared<T>>);

/// The member task's end.
pub(crate) struct Receiver<T>(Arc<Shared<T>>);

pub(crate) fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared(Mutex::new(Inner {
        items: VecDeque::new(),
        closed: false,
        waker: None,
    })));
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `item`, or hands it back if the backlog is closed.
    #[cfg(test)]
    pub(crate) fn try_send(&self, item: T) -> Result<(), T> {
        self.send_or(item, Err, || {})
    }

    /// Queues `item`, or hands it to `direct` instead if the receiver is
    /// parked on an empty backlog (so it holds nothing taken earlier, and
    /// stays parked meanwhile: `item` cannot overtake anything). `direct`
    /// gives the item back if it did not deliver it; then it is queued,
    /// `queued` called just before, under the lock the receiver takes it
    /// under. Hands the item back if the backlog is closed.
    pub(crate) fn send_or(
        &self,
        item: T,
        direct: impl FnOnce(T) -> Result<(), T>,
        queued: impl FnOnce(),
    ) -> Result<(), T> {
        let waker = {
            let mut inner = self.0.lock();
            if inner.closed {
                return Err(item);
            }
            let item = if inner.items.is_empty() && inner.waker.is_some() {
                match direct(item) {
                    Ok(()) => return Ok(()),
                    Err(item) => item,
                }
            } else {
                item
            };
            queued();
            inner.items.push_back(item);
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// No more sends; the receiver still takes what waits.
    pub(crate) fn close(&self) {
        self.0.close();
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl<T> Receiver<T> {
    /// Waits for something in the backlog and moves all of it to the end of
    /// `into` (expected empty). False once the backlog is closed and empty.
    pub(crate) async fn recv_all(&self, into: &mut VecDeque<T>) -> bool {
        poll_fn(|cx| {
            let mut inner = self.0.lock();
            if !inner.items.is_empty() {
                // Swapped, not copied: `into`'s buffer is reused next time.
                std::mem::swap(&mut inner.items, into);
                // Not parked: it holds what it took (`send_or`).
                inner.waker = None;
                return Poll::Ready(true);
            }
            if inner.closed {
                return Poll::Ready(false);
            }
            match &mut inner.waker {
                Some(w) => w.clone_from(cx.waker()),
                None => inner.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// The oldest item waiting, if any.
    #[cfg(test)]
    pub(crate) fn try_recv(&self) -> Option<T> {
        self.0.lock().items.pop_front()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Nothing more is queued for a member whose task has gone.
        let items = {
            let mut inner = self.0.lock();
            inner.closed = true;
            std::mem::take(&mut inner.items)
        };
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_sent_is_received_in_order_until_closed() {
        let (tx, rx) = unbounded();
        smol::block_on(async {
            let mut got = VecDeque::new();
            let receiving = async {
                let mut all = Vec::new();
                while rx.recv_all(&mut got).await {
                    all.extend(got.drain(..));
                }
                all
            };
            let sending = async {
                for i in 0..1000 {
                    tx.try_send(i).unwrap();
                    if i % 7 == 0 {
                        smol::future::yield_now().await;
                    }
                }
                tx.close();
                assert_eq!(tx.try_send(1000), Err(1000));
            };
            let (all, ()) = smol::future::zip(receiving, sending).await;
            assert_eq!(all, (0..1000).collect::<Vec<_>>());
        });
    }

    #[test]
    fn only_a_parked_receiver_with_nothing_in_hand_is_bypassed() {
        let (tx, rx) = unbounded();
        let direct = std::cell::RefCell::new(Vec::new());
        let take = |i| {
            direct.borrow_mut().push(i);
            Ok(())
        };
        // How many went into the backlog, as `queued` counts them.
        let counted = std::cell::Cell::new(0);
        let count = || counted.set(counted.get() + 1);
        // Not parked yet: queued.
        tx.send_or(1, take, count).unwrap();
        let mut got = VecDeque::new();
        smol::block_on(async {
            assert!(rx.recv_all(&mut got).await);
            // Holding 1, not parked: queued behind it.
            tx.send_or(2, take, count).unwrap();
            assert!(direct.borrow().is_empty());
            got.clear();
            assert!(rx.recv_all(&mut got).await);
            assert_eq!(got, [2]);
            got.clear();
            // Parked on an empty backlog: bypassed, unless `direct` declines.
            let parked = smol::future::poll_once(rx.recv_all(&mut got)).await;
            assert!(parked.is_none());
        });
        assert_eq!(counted.get(), 2);
        tx.send_or(3, take, count).unwrap();
        assert_eq!(*direct.borrow(), [3]);
        assert_eq!(counted.get(), 2);
        tx.send_or(4, Err, count).unwrap();
        tx.send_or(5, take, count).unwrap();
        assert_eq!(*direct.borrow(), [3]);
        assert_eq!(counted.get(), 4);
        assert!(smol::block_on(rx.recv_all(&mut got)));
        assert_eq!(got, [4, 5]);
        // Closed: handed back, not counted.
        tx.close();
        assert_eq!(tx.send_or(6, take, count), Err(6));
        assert_eq!(counted.get(), 4);
    }

    #[test]
    fn a_dropped_receiver_refuses_sends_and_a_dropped_sender_ends_receiving() {
        let (tx, rx) = unbounded();
        tx.try_send(1).unwrap();
        drop(rx);
        assert_eq!(tx.try_send(2), Err(2));
        let (tx, rx) = unbounded::<u8>();
        tx.try_send(1).unwrap();
        drop(tx);
        let mut got = VecDeque::new();
        assert!(smol::block_on(rx.recv_all(&mut got)));
        assert_eq!(got, [1]);
        got.clear();
        assert!(!smol::block_on(rx.recv_all(&mut got)));
    }

    #[test]
    fn a_send_from_another_thread_reaches_the_receiver() {
        let (tx, rx) = unbounded();
        // Whether the receiver parks before the send or not, it gets it.
        let t = std::thread::spawn(move || tx.try_send(7).unwrap());
        let mut got = VecDeque::new();
        assert!(smol::block_on(rx.recv_all(&mut got)));
        assert_eq!(got, [7]);
        t.join().unwrap();
    }
}
