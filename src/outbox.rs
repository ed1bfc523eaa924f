//! The outbound queue: senders encode straight into it, the driver takes
//! everything waiting in one go.
//!
//! Small frames are encoded back to back into one buffer, so a batch of a
//! thousand messages reaches the socket as one piece with no per-message
//! allocation, copy or reference count; large bodies a protocol hands back
//! as `Bytes` are kept as pieces of their own and written without a copy.
//! The capacity counts messages; memory grows with what is queued and is
//! given back when the queue drains.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use event_listener::Event;

use crate::frame::{check_len, HEADER_LEN};
use crate::pipe::COPY_BELOW;
use crate::{Error, Protocol};

pub(crate) type Reply<M> = crate::reply::ReplyTx<M>;

/// Encoded output, in order, for the driver.
pub(crate) enum Piece<P: Protocol> {
    /// Bytes to write; `frames` frames end inside them.
    Bytes { bytes: Bytes, frames: usize },
    /// A request's frame, sent only once its id is registered.
    Request {
        id: P::RequestId,
        reply: Reply<P::Message>,
        head: Bytes,
        body: Bytes,
    },
    /// A request future was dropped: take its entry out of the table.
    Abandon(P::RequestId),
}

/// Queued while the driver takes nothing, after which `Sender::send` lets
/// it run (and the executor's other tasks) before queueing more: a write's
/// worth, at least this many messages of at least this many bytes in all.
/// Without it a task sending in a loop on the driver's thread encodes a
/// whole queue's worth before the first byte goes out, and a hundred such
/// tasks (the bench's fan-in) a hundred queues' worth while the reader
/// waits. Messages large enough that `YIELD_MESSAGES` of them pass four
/// times `YIELD_BYTES` already make large writes: batched as before.
const YIELD_MESSAGES: usize = 256;
const YIELD_BYTES: usize = 16 * 1024;

/// Why a push failed, and a request's reply slot back.
pub(crate) type PushFailure<M> = (PushError, Option<Reply<M>>);

/// Why a push failed.
pub(crate) enum PushError {
    Full,
    Closed,
    Encode(Error),
}

pub(crate) struct Outbox<P: Protocol> {
    inner: Mutex<Inner<P>>,
    /// Messages ever accepted: what `Sender::flush` waits for. Counted
    /// under the lock, read without it (`Sender::accepted`).
    accepted: AtomicU64,
    /// The driver has fallen a write's worth behind since it last took
    /// (`YIELD_MESSAGES`): the next `Sender::send` gives it a turn first
    /// ([`Outbox::behind`]).
    behind: AtomicBool,
    /// `Inner::consumer` is set: the driver is parked on an empty queue,
    /// and anything queued wakes it. Read without the lock
    /// ([`Outbox::parked`]), so a driver woken by its byte stream does not
    /// lock the queue only to find it empty.
    parked: AtomicBool,
    room: Event,
    capacity: usize,
    max_frame_len: usize,
    /// Reply slots for `Sender::request`, kept for reuse.
    pub replies: crate::reply::Pool<P::Message>,
}

struct Inner<P: Protocol> {
    /// Messages waiting: what the capacity counts, with `reserved`.
    queued: usize,
    /// Slots held by permits (`Sender::reserve`, the `Sink`).
    reserved: usize,
    pieces: VecDeque<Piece<P>>,
    /// Frames encoded in place, after everything in `pieces`.
    tail: BytesMut,
    tail_frames: usize,
    /// Bytes and messages queued since the driver last took (or since
    /// `behind` was last set).
    lag: (usize, usize),
    closed: bool,
    /// The driver, parked on an empty queue.
    consumer: Option<Waker>,
}

impl<P: Protocol> Inner<P> {
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let bytes = self.tail.split().freeze();
            let frames = std::mem::take(&mut self.tail_frames);
            self.pieces.push_back(Piece::Bytes { bytes, frames });
        }
    }
}

/// Appends one frame's head (length prefix and what the protocol wrote) to
/// `buf` and returns the body the protocol handed back, to follow it. On
/// error, or if the protocol panics, `buf` is left as it was.
pub(crate) fn encode_frame<P: Protocol>(
    protocol: &P,
    msg: &P::Message,
    buf: &mut BytesMut,
    max_frame_len: usize,
) -> Result<Bytes, Error> {
    let start = buf.len();
    let mut guard = Rollback { buf, to: start };
    guard.buf.put_u32(0);
    let body = protocol
        .encode(msg, guard.buf)
        .map_err(|e| Error::Encode(Arc::new(e)))?
        .unwrap_or_default();
    let len = guard.buf.len() - start - HEADER_LEN + body.len();
    check_len(len, max_frame_len)?;
    guard.buf[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    guard.to = guard.buf.len();
    Ok(body)
}

/// Truncates a frame left half-written by an error or a panic in
/// `Protocol::encode`, so the buffer holds whole frames only.
struct Rollback<'a> {
    buf: &'a mut BytesMut,
    to: usize,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        self.buf.truncate(self.to);
    }
}

impl<P: Protocol> Outbox<P> {
    pub fn new(capacity: usize, max_frame_len: usize) -> Self {
        Outbox {
            inner: Mutex::new(Inner {
                queued: 0,
                reserved: 0,
                pieces: VecDeque::new(),
                tail: BytesMut::new(),
                tail_frames: 0,
                lag: (0, 0),
                closed: false,
                consumer: None,
            }),
            accepted: AtomicU64::new(0),
            behind: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            room: Event::new(),
            replies: crate::reply::Pool::default(),
            capacity,
            max_frame_len,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<P>> {
        // A panic in user code under the lock is rolled back (`Rollback`),
        // so a poisoned lock still guards a consistent queue.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encodes `msg` into the queue if there is room, or into the slot a
    /// permit reserved (`permit`: the slot is used up either way). A
    /// request comes with its id and reply slot, which are handed back if
    /// it is not queued.
    pub fn try_push(
        &self,
        protocol: &P,
        msg: &P::Message,
        request: Option<(P::RequestId, Reply<P::Message>)>,
        permit: bool,
    ) -> Result<(), PushFailure<P::Message>> {
        let mut lock = self.lock();
        let inner = &mut *lock;
        if permit {
            inner.reserved -= 1;
        }
        if inner.closed {
            return Err((PushError::Closed, request.map(|r| r.1)));
        }
        if !permit && inner.queued + inner.reserved >= self.capacity {
            return Err((PushError::Full, request.map(|r| r.1)));
        }
        if request.is_some() {
            // A request travels as a piece of its own, in order.
            inner.seal_tail();
        }
        if inner.tail.capacity() - inner.tail.len() < 64 {
            inner.tail.reserve(4096);
        }
        // A panic in the encoder under a permit frees its slot: say so.
        struct NotifyOnUnwind<'a>(&'a Event, bool);
        impl Drop for NotifyOnUnwind<'_> {
            fn drop(&mut self) {
                if self.1 && std::thread::panicking() {
                    self.0.notify(usize::MAX);
                }
            }
        }
        let _notify = NotifyOnUnwind(&self.room, permit);
        let start = inner.tail.len();
        let body = match encode_frame(protocol, msg, &mut inner.tail, self.max_frame_len) {
            Ok(body) => body,
            Err(e) => {
                drop(lock);
                if permit {
                    // The reserved slot is free again.
                    self.room.notify(usize::MAX);
                }
                return Err((PushError::Encode(e), request.map(|r| r.1)));
            }
        };
        inner.lag.0 += inner.tail.len() - start + body.len();
        inner.lag.1 += 1;
        let (bytes, messages) = inner.lag;
        if messages >= YIELD_MESSAGES && (YIELD_BYTES..4 * YIELD_BYTES).contains(&bytes) {
            inner.lag = (0, 0);
            self.behind.store(true, Ordering::Relaxed);
        }
        // A small body goes after its head, into the batch: one piece to
        // write and to free, not two. (Most small messages are encoded
        // whole: nothing to append.)
        let body = if body.len() < COPY_BELOW {
            inner.tail.extend_from_slice(&body);
            Bytes::new()
        } else {
            body
        };
        match request {
            Some((id, reply)) => {
                let head = inner.tail.split().freeze();
                inner.pieces.push_back(Piece::Request {
                    id,
                    reply,
                    head,
                    body,
                });
            }
            None if body.is_empty() => inner.tail_frames += 1,
            None => {
                // The head stays with the frames before it; the body is a
                // piece of its own, written as it is.
                inner.seal_tail();
                inner.pieces.push_back(Piece::Bytes {
                    bytes: body,
                    frames: 1,
                });
            }
        }
        inner.queued += 1;
        // Only pushes change it, under the lock: a plain store, not a
        // read-modify-write (which costs a locked instruction per message).
        let accepted = self.accepted.load(Ordering::Relaxed) + 1;
        self.accepted.store(accepted, Ordering::Release);
        let consumer = self.unpark(inner);
        drop(lock);
        if let Some(w) = consumer {
            w.wake();
        }
        Ok(())
    }

    /// Waits until there may be room (or the queue closed).
    pub async fn room(&self) {
        let listener = self.room.listen();
        // Checked after listening, so room made in between is not missed.
        if !self.is_full() {
            return;
        }
        listener.await;
    }

    /// A listener for room being made.
    pub fn listen_room(&self) -> event_listener::EventListener {
        self.room.listen()
    }

    /// Holds one slot for a later `try_push(.., permit: true)`.
    pub fn try_reserve(&self) -> Result<(), PushError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(PushError::Closed);
        }
        if inner.queued + inner.reserved >= self.capacity {
            return Err(PushError::Full);
        }
        inner.reserved += 1;
        Ok(())
    }

    /// Gives back a slot held by an unused permit.
    pub fn release(&self) {
        self.lock().reserved -= 1;
        self.room.notify(usize::MAX);
    }

    /// Messages ever accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }

    /// Queues a marker that needs no room (best effort).
    pub fn abandon(&self, id: P::RequestId) {
        let mut inner = self.lock();
        if !inner.closed {
            inner.seal_tail();
            inner.pieces.push_back(Piece::Abandon(id));
            let consumer = self.unpark(&mut inner);
            drop(inner);
            if let Some(w) = consumer {
                w.wake();
            }
        }
    }

    pub fn is_full(&self) -> bool {
        let inner = self.lock();
        !inner.closed && inner.queued + inner.reserved >= self.capacity
    }

    pub fn len(&self) -> usize {
        self.lock().queued
    }

    /// Moves everything waiting to the back of `out`. `Ready(true)` if
    /// anything was taken, `Ready(false)` once closed and empty, `Pending`
    /// (driver registered) otherwise.
    pub fn poll_take(&self, cx: &mut Context<'_>, out: &mut VecDeque<Piece<P>>) -> Poll<bool> {
        let mut inner = self.lock();
        inner.seal_tail();
        if inner.pieces.is_empty() {
            if inner.closed {
                return Poll::Ready(false);
            }
            // Most polls find the waker of the last: no clone then.
            if !inner
                .consumer
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                inner.consumer = Some(cx.waker().clone());
            }
            self.parked.store(true, Ordering::Relaxed);
            return Poll::Pending;
        }
        if out.is_empty() {
            std::mem::swap(&mut inner.pieces, out);
        } else {
            out.extend(inner.pieces.drain(..));
        }
        let freed = std::mem::take(&mut inner.queued);
        inner.lag = (0, 0);
        // Stored only if set: the senders read its cache line.
        if self.behind.load(Ordering::Relaxed) {
            self.behind.store(false, Ordering::Relaxed);
        }
        // Everyone waiting found the queue full under this lock, after
        // listening, and only takes make room without notifying: so if it
        // is not full now, nobody waits, and the notification (a full
        // fence, then the listeners' lock) is skipped.
        let was_full = freed > 0 && freed + inner.reserved >= self.capacity;
        drop(inner);
        if was_full {
            // Everyone waiting checks again: a listener a `Sink` left
            // registered and never polls must not swallow the wakeup.
            self.room.notify(usize::MAX);
        }
        Poll::Ready(true)
    }

    /// Whether the driver has fallen a write's worth behind the senders
    /// since it last took (`YIELD_MESSAGES`); true once each time, for the
    /// caller to give it a turn.
    pub fn behind(&self) -> bool {
        self.behind.load(Ordering::Relaxed) && self.behind.swap(false, Ordering::Relaxed)
    }

    /// Whether the driver is still parked since its last `poll_take`
    /// returned `Pending`: nothing was queued since (that would have woken
    /// it), so another poll with the same waker would only say so again.
    pub fn parked(&self) -> bool {
        self.parked.load(Ordering::Acquire)
    }

    /// The parked driver's waker, to wake once the lock is released.
    fn unpark(&self, inner: &mut Inner<P>) -> Option<Waker> {
        let consumer = inner.consumer.take();
        if consumer.is_some() {
            self.parked.store(false, Ordering::Release);
        }
        consumer
    }

    /// Everything left, without waiting (after the connection ended).
    pub fn take_all(&self) -> VecDeque<Piece<P>> {
        let mut inner = self.lock();
        inner.seal_tail();
        inner.queued = 0;
        let pieces = std::mem::take(&mut inner.pieces);
        drop(inner);
        self.room.notify(usize::MAX);
        pieces
    }

    /// Closes the queue: pushes fail from now on, what is queued can still
    /// be taken. Wakes everyone waiting.
    pub fn close(&self) {
        let consumer = {
            let mut inner = self.lock();
            inner.closed = true;
            self.unpark(&mut inner)
        };
        if let Some(w) = consumer {
            w.wake();
        }
        self.room.notify(usize::MAX);
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Gives back the memory of an empty queue, and the free reply slots.
    pub fn release_if_empty(&self) {
        let mut inner = self.lock();
        if inner.pieces.is_empty() && inner.tail.is_empty() {
            inner.pieces = VecDeque::new();
            inner.tail = BytesMut::new();
        }
        drop(inner);
        self.replies.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::{Raw, RawMessage};

    fn take<P: Protocol>(outbox: &Outbox<P>) -> VecDeque<Piece<P>> {
        let mut out = VecDeque::new();
        let mut cx = Context::from_waker(Waker::noop());
        let _ = outbox.poll_take(&mut cx, &mut out);
        out
    }

    fn wire<P: Protocol>(pieces: &VecDeque<Piece<P>>) -> (Vec<u8>, usize) {
        let mut bytes = Vec::new();
        let mut frames = 0;
        for p in pieces {
            match p {
                Piece::Bytes {
                    bytes: b,
                    frames: f,
                } => {
                    bytes.extend_from_slice(b);
                    frames += f;
                }
                Piece::Request { head, body, .. } => {
                    bytes.extend_from_slice(head);
                    bytes.extend_from_slice(body);
                    frames += 1;
                }
                Piece::Abandon(_) => {}
            }
        }
        (bytes, frames)
    }

    fn text(s: &str) -> RawMessage {
        RawMessage::Message(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn small_frames_coalesce_into_one_piece() {
        let outbox = Outbox::new(10, 1024);
        for s in ["a", "bb", "ccc"] {
            assert!(outbox.try_push(&Raw, &text(s), None, false).is_ok());
        }
        let pieces = take(&outbox);
        assert_eq!(pieces.len(), 1);
        let (bytes, frames) = wire(&pieces);
        assert_eq!(frames, 3);
        assert_eq!(bytes, b"\0\0\0\x02\0a\0\0\0\x03\0bb\0\0\0\x04\0ccc");
    }

    #[test]
    fn the_driver_stays_parked_until_something_is_queued() {
        let outbox = Outbox::new(10, 1024);
        assert!(!outbox.parked(), "never polled");
        assert!(take(&outbox).is_empty());
        assert!(outbox.parked());
        // Each change the driver must see unparks it: a push, a marker, a
        // close.
        assert!(outbox.try_push(&Raw, &text("a"), None, false).is_ok());
        assert!(!outbox.parked());
        assert_eq!(take(&outbox).len(), 1);
        assert!(!outbox.parked(), "it took something: not parked");
        assert!(take(&outbox).is_empty());
        assert!(outbox.parked());
        outbox.abandon(7);
        assert!(!outbox.parked());
        assert_eq!(take(&outbox).len(), 1);
        assert!(take(&outbox).is_empty());
        outbox.close();
        assert!(!outbox.parked());
    }

    #[test]
    fn a_write_s_worth_queued_untaken_asks_for_a_turn_once() {
        let outbox = Outbox::new(4096, 1 << 20);
        let push = |size: usize| {
            let msg = RawMessage::Message(Bytes::from(vec![7u8; size]));
            assert!(outbox.try_push(&Raw, &msg, None, false).is_ok());
        };
        // 64-byte messages: 256 of them are past 16 KiB.
        for _ in 0..YIELD_MESSAGES - 1 {
            push(64);
        }
        assert!(!outbox.behind());
        push(64);
        assert!(outbox.behind());
        assert!(!outbox.behind(), "once");
        // Taken: it starts over.
        for _ in 0..YIELD_MESSAGES - 1 {
            push(64);
        }
        take(&outbox);
        push(64);
        assert!(!outbox.behind());
        take(&outbox);
        // Tiny ones: a write's worth of bytes too (16 KiB of 5-byte frames).
        for _ in 0..YIELD_BYTES.div_ceil(5) - 1 {
            push(0);
        }
        assert!(!outbox.behind());
        push(0);
        assert!(outbox.behind());
        take(&outbox);
        // Large ones already make large writes: never.
        for _ in 0..2 * YIELD_MESSAGES {
            push(1024);
        }
        assert!(!outbox.behind());
    }

    #[test]
    fn capacity_counts_messages_and_frees_on_take() {
        let outbox = Outbox::new(2, 1024);
        assert!(outbox.try_push(&Raw, &text("1"), None, false).is_ok());
        assert!(outbox.try_push(&Raw, &text("2"), None, false).is_ok());
        assert!(outbox.is_full());
        assert!(matches!(
            outbox.try_push(&Raw, &text("3"), None, false),
            Err((PushError::Full, None))
        ));
        take(&outbox);
        assert!(outbox.try_push(&Raw, &text("3"), None, false).is_ok());
        outbox.close();
        assert!(matches!(
            outbox.try_push(&Raw, &text("4"), None, false),
            Err((PushError::Closed, None))
        ));
        assert_eq!(wire(&take(&outbox)).1, 1, "queued before the close");
    }

    #[test]
    fn a_failed_encode_leaves_no_trace() {
        let outbox = Outbox::new(10, 8);
        assert!(outbox.try_push(&Raw, &text("ok"), None, false).is_ok());
        let too_big = text("this is longer than eight");
        assert!(matches!(
            outbox.try_push(&Raw, &too_big, None, false),
            Err((PushError::Encode(Error::MessageTooLarge { .. }), None))
        ));
        assert!(outbox.try_push(&Raw, &text("ok2"), None, false).is_ok());
        let (bytes, frames) = wire(&take(&outbox));
        assert_eq!(bytes, b"\0\0\0\x03\0ok\0\0\0\x04\0ok2");
        assert_eq!(frames, 2);
    }

    /// A protocol whose encoder writes half a frame and then panics.
    #[derive(Debug)]
    struct Panicky;

    impl Protocol for Panicky {
        type Message = RawMessage;
        type RequestId = u64;
        type Error = crate::raw::RawError;
        fn encode(
            &self,
            msg: &RawMessage,
            dst: &mut BytesMut,
        ) -> Result<Option<Bytes>, Self::Error> {
            dst.put_slice(b"partial");
            if msg == &RawMessage::Keepalive {
                panic!("encoder bug");
            }
            Raw.encode(msg, dst)
        }
        fn decode(&self, payload: Bytes) -> Result<Option<RawMessage>, Self::Error> {
            Raw.decode(payload)
        }
        fn keepalive(&self) -> Option<RawMessage> {
            Some(RawMessage::Keepalive)
        }
        fn kind(&self, msg: &RawMessage) -> crate::Kind<u64> {
            Raw.kind(msg)
        }
    }

    #[test]
    fn a_panicking_encoder_leaves_whole_frames_only() {
        let outbox = Outbox::new(10, 1024);
        assert!(outbox.try_push(&Panicky, &text("a"), None, false).is_ok());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = outbox.try_push(&Panicky, &RawMessage::Keepalive, None, false);
        }));
        assert!(panicked.is_err());
        // The poisoned lock is recovered and the half frame is gone.
        assert!(outbox.try_push(&Panicky, &text("b"), None, false).is_ok());
        let (bytes, frames) = wire(&take(&outbox));
        assert_eq!(frames, 2);
        assert_eq!(bytes, b"\0\0\0\x09partial\0a\0\0\0\x09partial\0b");
    }

    #[test]
    fn requests_and_large_bodies_keep_their_order() {
        let outbox = Outbox::new(10, 1 << 20);
        let big = Bytes::from(vec![9u8; 8192]);
        let (tx, _rx) = crate::reply::channel();
        assert!(outbox.try_push(&Raw, &text("first"), None, false).is_ok());
        let req = RawMessage::Request {
            id: 5,
            body: Bytes::from_static(b"q"),
        };
        assert!(outbox.try_push(&Raw, &req, Some((5, tx)), false).is_ok());
        let large = RawMessage::Message(big.clone());
        assert!(outbox.try_push(&Raw, &large, None, false).is_ok());
        outbox.abandon(5);
        let pieces = take(&outbox);
        let kinds: Vec<&str> = pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes { bytes, .. } if bytes.len() == 8192 => "body",
                Piece::Bytes { .. } => "bytes",
                Piece::Request { .. } => "request",
                Piece::Abandon(_) => "abandon",
            })
            .collect();
        assert_eq!(kinds, ["bytes", "request", "bytes", "body", "abandon"]);
        // A small request's body is copied after its head: one piece.
        let Piece::Request { head, body, .. } = &pieces[1] else {
            unreachable!()
        };
        assert!(body.is_empty());
        assert!(head.ends_with(b"q"));
        // The large body is the caller's own allocation, not a copy.
        let Piece::Bytes { bytes, .. } = &pieces[3] else {
            unreachable!()
        };
        assert_eq!(bytes.as_ptr(), big.as_ptr());
        assert_eq!(wire(&pieces).1, 3);
    }
}
