//! A request's reply slot: the driver fills it once, the requester takes
//! what is in it.
//!
//! A one-shot channel would do, but costs an allocation per request. These
//! slots go back to their connection's [`Pool`] when the requester is done
//! with them, so once as many requests have been in flight as ever will
//! be, a round trip allocates nothing. The driver keeps the slots it
//! answered as [`Spares`] and gives back, one lock for many, those whose
//! requesters have let go. Each slot has a lock of its own: requests in
//! flight do not contend with one another. Each use of a slot is a new
//! *round*, and each end remembers its round, so an end left over from an
//! earlier use (the driver's, of a request abandoned or timed out) can no
//! longer touch it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::Error;

/// What a request gets: its response, or why there is none.
pub(crate) type Answer<M> = Result<M, Error>;

/// Most free slots a pool keeps; more in flight at once are allocated, and
/// freed when done.
const KEEP: usize = 1024;

struct Slot<M> {
    inner: Mutex<Inner<M>>,
}

struct Inner<M> {
    round: u64,
    state: State<M>,
}

enum State<M> {
    /// The requester waits (its waker, once it has polled).
    Waiting(Option<Waker>),
    Answered(Answer<M>),
    /// The driver's end was dropped without an answer: the connection is
    /// gone.
    Dropped,
}

impl<M> Inner<M> {
    /// Whether the requester still waits in round `round`.
    fn waits(&self, round: u64) -> bool {
        self.round == round && matches!(self.state, State::Waiting(_))
    }

    /// Ends the round with `to`: the requester's waker.
    fn end(&mut self, to: State<M>) -> Option<Waker> {
        match std::mem::replace(&mut self.state, to) {
            State::Waiting(waker) => waker,
            _ => None,
        }
    }

    /// Readies the slot for the round after `round`, which no end of
    /// `round` can touch; gives back what was in it.
    fn reset(&mut self, round: u64) -> State<M> {
        self.round = round.wrapping_add(1);
        std::mem::replace(&mut self.state, State::Waiting(None))
    }
}

impl<M> Slot<M> {
    fn lock(&self) -> MutexGuard<'_, Inner<M>> {
        // Nothing runs user code under this lock (wakers are woken after
        // it is released), so poisoning cannot leave a slot inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A slot ready for its next round, and that round.
type Ready<M> = (Arc<Slot<M>>, u64);

/// A connection's free slots, each ready for its next round, so taking one
/// needs no lock but the pool's.
pub(crate) struct Pool<M> {
    free: Mutex<Vec<Ready<M>>>,
}

impl<M> Default for Pool<M> {
    fn default() -> Self {
        Pool {
            free: Mutex::new(Vec::new()),
        }
    }
}

impl<M> Pool<M> {
    fn lock(&self) -> MutexGuard<'_, Vec<Ready<M>>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for one request: a free one, or a new one.
    pub fn take(&self) -> (ReplyTx<M>, ReplyRx<M>) {
        let slot = self.lock().pop();
        open(slot)
    }

    /// Takes back the spare slots that only the driver still holds (their
    /// requesters are done), as many as the pool keeps.
    pub fn recycle(&self, spares: &mut Spares<M>) {
        let mut free = self.lock();
        let mut i = 0;
        while i < spares.0.len() && free.len() < KEEP {
            if Arc::strong_count(&spares.0[i].0) == 1 {
                free.push(spares.0.swap_remove(i));
            } else {
                i += 1;
            }
        }
        drop(free);
        // Past the pool's keep, or held by requesters for long: let go.
        if spares.0.len() > KEEP {
            spares.0.clear();
        }
    }

    /// Gives back the memory of the free slots.
    pub fn release(&self) {
        *self.lock() = Vec::new();
    }
}

/// The slots a driver answered, each with its next round: back to the
/// pool in batches ([`Pool::recycle`]), so a request costs the pool's lock
/// once (to take a slot), not twice.
pub(crate) struct Spares<M>(Vec<Ready<M>>);

impl<M> Default for Spares<M> {
    fn default() -> Self {
        Spares(Vec::new())
    }
}

impl<M> Spares<M> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Gives back their memory.
    pub fn release(&mut self) {
        self.0 = Vec::new();
    }
}

/// A slot of its own, not from a pool.
pub(crate) fn channel<M>() -> (ReplyTx<M>, ReplyRx<M>) {
    open(None)
}

fn open<M>(slot: Option<Ready<M>>) -> (ReplyTx<M>, ReplyRx<M>) {
    let (slot, round) = slot.unwrap_or_else(|| {
        let inner = Mutex::new(Inner {
            round: 0,
            state: State::Waiting(None),
        });
        (Arc::new(Slot { inner }), 0)
    });
    let tx = ReplyTx {
        slot: Some(slot.clone()),
        round,
    };
    let rx = ReplyRx {
        slot,
        round,
        reset: false,
    };
    (tx, rx)
}

/// The driver's end of a reply slot. Dropped without an answer, it tells
/// the requester that none will come.
pub(crate) struct ReplyTx<M> {
    /// `None` once answered.
    slot: Option<Arc<Slot<M>>>,
    round: u64,
}

impl<M> ReplyTx<M> {
    /// Hands `answer` to the requester; gives it back if the requester is
    /// gone.
    pub fn send(self, answer: Answer<M>) -> Result<(), Answer<M>> {
        self.answer(answer).0
    }

    /// [`ReplyTx::send`], and the slot kept in `spares` for the pool.
    pub fn send_keep(self, answer: Answer<M>, spares: &mut Spares<M>) -> Result<(), Answer<M>> {
        let (res, slot) = self.answer(answer);
        if let Some(slot) = slot {
            // Whether answered or given up on, the requester's end moves
            // the slot to the next round.
            spares.0.push(slot);
        }
        res
    }

    fn answer(mut self, answer: Answer<M>) -> (Result<(), Answer<M>>, Option<Ready<M>>) {
        let Some(slot) = self.slot.take() else {
            return (Err(answer), None);
        };
        let next = self.round.wrapping_add(1);
        let waker = {
            let mut inner = slot.lock();
            if !inner.waits(self.round) {
                drop(inner);
                return (Err(answer), Some((slot, next)));
            }
            inner.end(State::Answered(answer))
        };
        if let Some(w) = waker {
            w.wake();
        }
        (Ok(()), Some((slot, next)))
    }

    /// Whether the requester has gone away (dropped its future).
    pub fn is_canceled(&self) -> bool {
        self.slot
            .as_ref()
            .is_none_or(|slot| !slot.lock().waits(self.round))
    }
}

impl<M> Drop for ReplyTx<M> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let waker = {
            let mut inner = slot.lock();
            match inner.waits(self.round) {
                true => inner.end(State::Dropped),
                false => None,
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The requester's end of a reply slot: a future of the answer, `None` if
/// the driver's end was dropped without one. Dropping it frees the slot
/// (for the next round), whatever the driver's end does later.
pub(crate) struct ReplyRx<M> {
    slot: Arc<Slot<M>>,
    round: u64,
    /// The slot is ready for its next round already: it was, under the
    /// lock that took the answer.
    reset: bool,
}

impl<M> Future for ReplyRx<M> {
    type Output = Option<Answer<M>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.reset {
            return Poll::Ready(None);
        }
        let round = self.round;
        let mut inner = self.slot.lock();
        if let State::Waiting(waker) = &mut inner.state {
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        // Answered or dropped: this round is over, and the slot is readied
        // for the next under this same lock, so dropping `self` needs none.
        let state = inner.reset(round);
        drop(inner);
        self.reset = true;
        Poll::Ready(match state {
            State::Answered(answer) => Some(answer),
            _ => None,
        })
    }
}

impl<M> Drop for ReplyRx<M> {
    fn drop(&mut self) {
        if !self.reset {
            // A new round: the driver's end of this one can no longer
            // touch the slot. An answer never taken is the application's
            // message: dropped after the lock, as the slot's lock runs no
            // user code.
            let left = self.slot.lock().reset(self.round);
            drop(left);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll<M>(rx: &mut ReplyRx<M>) -> Poll<Option<Answer<M>>> {
        Pin::new(rx).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn an_answer_reaches_the_requester_and_the_slot_is_used_again() {
        let pool = Pool::<u8>::default();
        let mut spares = Spares::default();
        let (tx, mut rx) = pool.take();
        assert!(poll(&mut rx).is_pending());
        assert!(!tx.is_canceled());
        assert!(tx.send_keep(Ok(7), &mut spares).is_ok());
        assert!(matches!(poll(&mut rx), Poll::Ready(Some(Ok(7)))));
        let first = Arc::as_ptr(&rx.slot);
        // Held by its requester, the slot stays with the driver.
        pool.recycle(&mut spares);
        assert!(pool.lock().is_empty());
        drop(rx);
        pool.recycle(&mut spares);
        assert!(spares.is_empty());
        let (_tx, rx) = pool.take();
        assert_eq!(Arc::as_ptr(&rx.slot), first);
        assert_eq!(rx.round, 1);
    }

    #[test]
    fn a_taken_answer_readies_the_slot_for_its_next_round() {
        let (tx, mut rx) = channel::<u8>();
        assert!(tx.send(Ok(3)).is_ok());
        assert!(matches!(poll(&mut rx), Poll::Ready(Some(Ok(3)))));
        // Polled again it has nothing more; the slot is already free of it.
        assert!(matches!(poll(&mut rx), Poll::Ready(None)));
        let inner = rx.slot.lock();
        assert!(matches!(inner.state, State::Waiting(None)));
        assert_eq!(inner.round, 1);
    }

    #[test]
    fn a_slot_given_up_on_goes_back_when_the_driver_answers() {
        let pool = Pool::<u8>::default();
        let mut spares = Spares::default();
        let (tx, rx) = pool.take();
        drop(rx);
        assert!(tx.is_canceled());
        assert!(matches!(tx.send_keep(Ok(1), &mut spares), Err(Ok(1))));
        pool.recycle(&mut spares);
        let (tx, mut rx) = pool.take();
        assert_eq!(rx.round, 1);
        assert!(tx.send(Ok(2)).is_ok());
        assert!(matches!(poll(&mut rx), Poll::Ready(Some(Ok(2)))));
    }

    #[test]
    fn a_dropped_driver_end_says_no_answer_will_come() {
        let (tx, mut rx) = channel::<u8>();
        assert!(poll(&mut rx).is_pending());
        drop(tx);
        assert!(matches!(poll(&mut rx), Poll::Ready(None)));
    }

    #[test]
    fn an_end_left_from_an_earlier_round_cannot_touch_the_slot() {
        // The requester gives up; the driver still holds its end.
        let (stale, rx) = channel::<u8>();
        let slot = rx.slot.clone();
        drop(rx);
        assert!(stale.is_canceled());
        // Were the slot used again meanwhile, the old end could neither
        // answer the new round nor end it.
        let (tx, mut rx) = open(Some((slot, 1)));
        assert!(matches!(stale.send(Ok(1)), Err(Ok(1))));
        assert!(poll(&mut rx).is_pending());
        assert!(tx.send(Ok(2)).is_ok());
        assert!(matches!(poll(&mut rx), Poll::Ready(Some(Ok(2)))));
    }

    #[test]
    fn a_stale_end_dropped_does_not_end_the_new_round() {
        let (stale, rx) = channel::<u8>();
        let slot = rx.slot.clone();
        drop(rx);
        let (_tx, mut rx) = open(Some((slot, 1)));
        drop(stale);
        assert!(poll(&mut rx).is_pending());
    }
}
