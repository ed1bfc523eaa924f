//! [`Sender`]: sends messages and requests, waits for room or for the
//! wire, and is a [`Sink`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use event_listener::EventListener;
use futures_sink::Sink;

use crate::connection::{FlushWait, Shared};
use crate::error::{SendError, TrySendError};
use crate::outbox::{Outbox, PushError, Reply};
use crate::{Call, Error, Kind, Protocol};

/// Sends messages and requests. Clone it to send from several tasks.
///
/// Messages are encoded on the caller's task, straight into the outbound
/// queue, so an unencodable or too large message fails its own `send` at
/// once and nothing else. Dropping every `Sender` closes the connection
/// gracefully, as [`Sender::close`] does.
///
/// It is also a [`Sink`] of messages, so `SinkExt::send_all` and
/// `StreamExt::forward` work; `poll_ready` reserves a slot in the queue
/// (backpressure), `poll_flush` is [`Sender::flush`], `poll_close` closes
/// the connection and waits until everything accepted is written.
pub struct Sender<P: Protocol> {
    outbox: Arc<Outbox<P>>,
    protocol: Arc<P>,
    shared: Arc<Shared>,
    /// The `Sink`'s state: a slot reserved by `poll_ready`, what it waits on.
    sink_reserved: bool,
    sink_room: Option<EventListener>,
    sink_flush: Option<(u64, Option<FlushWait>)>,
}

impl<P: Protocol> Sender<P> {
    pub(crate) fn new(outbox: Arc<Outbox<P>>, protocol: Arc<P>, shared: Arc<Shared>) -> Self {
        shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            outbox,
            protocol,
            shared,
            sink_reserved: false,
            sink_room: None,
            sink_flush: None,
        }
    }
}

impl<P: Protocol> Clone for Sender<P> {
    fn clone(&self) -> Self {
        Sender::new(
            self.outbox.clone(),
            self.protocol.clone(),
            self.shared.clone(),
        )
    }
}

impl<P: Protocol> Drop for Sender<P> {
    fn drop(&mut self) {
        if self.sink_reserved {
            self.outbox.release();
        }
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.outbox.close();
        }
    }
}

impl<P: Protocol> fmt::Debug for Sender<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("queued", &self.outbox.len())
            .field("closed", &self.outbox.is_closed())
            .finish()
    }
}

/// Why [`Sender::try_push_entry`] failed (`None`: the queue is full), and
/// a request's reply slot back.
pub(crate) type EntryFailure<M> = (Option<Error>, Option<Reply<M>>);

/// Pending once, its task woken: the executor's other tasks run first.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<P: Protocol> Sender<P> {
    fn push_error(&self, e: PushError) -> Error {
        match e {
            PushError::Full => unreachable!("only try_push without a permit is full"),
            PushError::Closed => self.shared.reason(),
            PushError::Encode(e) => e,
        }
    }

    /// Queues `msg`, waiting while the queue is full (backpressure).
    ///
    /// Returns once the message is queued, not written ([`Sender::flush`]
    /// waits for that). Everything queued is written before a clean close;
    /// if the connection fails instead, every handle sees that error and
    /// [`Sender::undelivered`] counts what was lost.
    ///
    /// Cancel safety: if the future is dropped before it completes, the
    /// message was not queued.
    ///
    /// Once the driver has fallen a write's worth behind (256 messages
    /// queued since it last took some, 16 KiB at least), `send` yields to
    /// the executor once before queueing, as a runtime's cooperative budget
    /// would: a task sending in a loop shares its thread with the driver
    /// (and everyone else) rather than filling the whole queue first.
    ///
    /// ```no_run
    /// # async fn f(sender: chatpipe::Sender<chatpipe::raw::Raw>) {
    /// use chatpipe::raw::RawMessage;
    /// if let Err(e) = sender.send(RawMessage::Message("hello".into())).await {
    ///     eprintln!("not sent: {e}"); // e.into_inner() is the message
    /// }
    /// # }
    /// ```
    pub async fn send(&self, msg: P::Message) -> Result<(), SendError<P::Message>> {
        // The driver fell a write's worth behind: give it a turn first, as
        // a runtime's cooperative budget would. Before queueing, for cancel
        // safety.
        if self.outbox.behind() {
            YieldNow(false).await;
        }
        loop {
            let error = match self.outbox.try_push(&self.protocol, &msg, None, false) {
                Ok(()) => return Ok(()),
                Err((PushError::Full, _)) => {
                    self.outbox.room().await;
                    continue;
                }
                Err((e, _)) => self.push_error(e),
            };
            return Err(SendError {
                message: msg,
                error,
            });
        }
    }

    /// For the session: queues `msg` (a request with its id and reply
    /// slot) if there is room, without waiting. On failure the message
    /// stays the caller's, and a request's reply slot comes back.
    pub(crate) fn try_push_entry(
        &self,
        msg: &P::Message,
        request: Option<(P::RequestId, Reply<P::Message>)>,
    ) -> Result<(), EntryFailure<P::Message>> {
        self.outbox
            .try_push(&self.protocol, msg, request, false)
            .map_err(|(e, reply)| match e {
                PushError::Full => (None, reply),
                e => (Some(self.push_error(e)), reply),
            })
    }

    /// For the session: a listener for room in the queue.
    pub(crate) fn listen_room(&self) -> EventListener {
        self.outbox.listen_room()
    }

    /// Queues `msg` if there is room, failing at once with
    /// [`TrySendError::Full`] if not: for servers that must not wait on a
    /// slow peer. [`Sender::reserve`] waits for room honestly.
    ///
    /// ```no_run
    /// # fn f(sender: chatpipe::Sender<chatpipe::raw::Raw>) {
    /// use chatpipe::raw::RawMessage;
    /// use chatpipe::TrySendError;
    /// match sender.try_send(RawMessage::Message("tick".into())) {
    ///     Ok(()) => {}
    ///     Err(TrySendError::Full(_msg)) => { /* the peer is behind */ }
    ///     Err(e) => eprintln!("not sent: {e}"),
    /// }
    /// # }
    /// ```
    pub fn try_send(&self, msg: P::Message) -> Result<(), TrySendError<P::Message>> {
        let error = match self.outbox.try_push(&self.protocol, &msg, None, false) {
            Ok(()) => return Ok(()),
            Err((PushError::Full, _)) => return Err(TrySendError::Full(msg)),
            Err((e, _)) => self.push_error(e),
        };
        Err(TrySendError::Failed(SendError {
            message: msg,
            error,
        }))
    }

    /// Waits for room in the queue and holds it: the [`Permit`] then sends
    /// one message without waiting, and no other send can take its slot.
    /// Dropping the permit gives the slot back.
    ///
    /// Fails with the connection's reason once it no longer accepts
    /// messages. Cancel safety: dropping the future reserves nothing.
    ///
    /// ```no_run
    /// # async fn f(sender: chatpipe::Sender<chatpipe::raw::Raw>) -> Result<(), chatpipe::Error> {
    /// use chatpipe::raw::RawMessage;
    /// let permit = sender.reserve().await?; // room is guaranteed from here
    /// let msg = RawMessage::Message("made once there is room".into());
    /// permit.send(msg).map_err(|e| e.error)?;
    /// # Ok(()) }
    /// ```
    pub async fn reserve(&self) -> Result<Permit<'_, P>, Error> {
        loop {
            let listener = self.outbox.listen_room();
            match self.outbox.try_reserve() {
                Ok(()) => return Ok(Permit { sender: self }),
                Err(PushError::Full) => listener.await,
                Err(e) => return Err(self.push_error(e)),
            }
        }
    }

    /// Sends a request and waits for the response carrying the same id.
    /// The caller chose the id (as in protocols whose ids are GUIDs);
    /// [`Sender::call`] has the connection choose it.
    ///
    /// Fails with [`Error::RequestTimeout`] after the configured timeout, with
    /// [`Error::InvalidRequest`] if `msg` is not a request or its id is
    /// already outstanding, and with the connection's reason if it ends
    /// first. Dropping the future abandons the request: its entry leaves the
    /// table, and a late response is ignored.
    ///
    /// ```no_run
    /// # async fn f(sender: chatpipe::Sender<chatpipe::raw::Raw>) -> Result<(), chatpipe::Error> {
    /// use chatpipe::raw::RawMessage;
    /// let answer = sender.request(RawMessage::Request { id: 7, body: "ping".into() }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn request(&self, msg: P::Message) -> Result<P::Message, Error> {
        let Kind::Request(id) = self.protocol.kind(&msg) else {
            return Err(Error::InvalidRequest("the message is not a request"));
        };
        let (reply_tx, reply_rx) = self.outbox.replies.take();
        let mut reply_tx = Some(reply_tx);
        while let Some(tx) = reply_tx.take() {
            match self
                .outbox
                .try_push(&self.protocol, &msg, Some((id.clone(), tx)), false)
            {
                Ok(()) => {}
                Err((PushError::Full, tx)) => {
                    reply_tx = tx;
                    self.outbox.room().await;
                }
                Err((e, _)) => return Err(self.push_error(e)),
            }
        }
        drop(msg);
        let mut guard = AbandonOnDrop {
            outbox: &self.outbox,
            id: Some(id),
        };
        let res = match reply_rx.await {
            Some(res) => res,
            None => Err(self.shared.reason()),
        };
        guard.id = None;
        res
    }

    /// Sends a request whose id the connection chooses (through
    /// [`Protocol::request_id`]) and reads the response as the call's
    /// `Output`: pipelining many calls needs no counter of your own.
    ///
    /// Fails as [`Sender::request`] does, and with
    /// [`Error::UnexpectedResponse`] if the response is not of the form the
    /// call expects.
    ///
    /// ```no_run
    /// # async fn f(sender: chatpipe::Sender<chatpipe::raw::Raw>) -> Result<(), chatpipe::Error> {
    /// // With the raw protocol a `Bytes` body is a call; the answer is the
    /// // response's body.
    /// let (a, b) = futures::join!(sender.call(bytes::Bytes::from("one")), sender.call(bytes::Bytes::from("two")));
    /// println!("{:?} {:?}", a?, b?);
    /// # Ok(()) }
    /// ```
    pub async fn call<C: Call<P>>(&self, call: C) -> Result<C::Output, Error> {
        let n = self.shared.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let id = self
            .protocol
            .request_id(n)
            .ok_or(Error::InvalidRequest("the protocol makes no request ids"))?;
        let response = self.request(call.into_request(id)).await?;
        C::from_response(response).map_err(|_| Error::UnexpectedResponse)
    }

    /// Waits until every message accepted before the call has been written
    /// to the byte stream and the stream flushed; the connection stays
    /// open. Fails with the reason the connection ended if some of them
    /// never will be. It does not wait for the peer.
    ///
    /// ```no_run
    /// # async fn f(sender: chatpipe::Sender<chatpipe::raw::Raw>) -> Result<(), chatpipe::Error> {
    /// use chatpipe::raw::RawMessage;
    /// sender.send(RawMessage::Message("last words".into())).await.map_err(|e| e.error)?;
    /// sender.flush().await?; // on the wire now
    /// # Ok(()) }
    /// ```
    pub async fn flush(&self) -> Result<(), Error> {
        let target = self.outbox.accepted();
        let mut listener = None;
        std::future::poll_fn(|cx| self.poll_flushed(cx, target, &mut listener)).await
    }

    /// How many messages the connection has accepted so far (sent,
    /// queued through a permit, or requested): read just after a send, the
    /// place of that message in the connection's order. With
    /// [`Sender::flushed`] it tells whether a message is on the wire yet
    /// without waiting, as [`Sender::flush`] does by waiting.
    ///
    /// ```no_run
    /// # async fn f(sender: chatpipe::Sender<chatpipe::raw::Raw>) -> Result<(), chatpipe::Error> {
    /// use chatpipe::raw::RawMessage;
    /// sender.send(RawMessage::Message("hello".into())).await.map_err(|e| e.error)?;
    /// let place = sender.accepted();
    /// // ... later, without waiting:
    /// let on_the_wire = sender.flushed() >= place;
    /// # Ok(()) }
    /// ```
    pub fn accepted(&self) -> u64 {
        self.outbox.accepted()
    }

    /// How many of the accepted messages are settled: written to the byte
    /// stream and the stream flushed (or refused by the driver, as a
    /// request whose id is outstanding already). It only grows, and never
    /// passes [`Sender::accepted`]; what [`Sender::flush`] waits on. After
    /// the connection failed it stays where it was: compare it with
    /// `accepted()` and [`Sender::undelivered`].
    pub fn flushed(&self) -> u64 {
        self.shared.flushed.load(Ordering::Acquire)
    }

    fn poll_flushed(
        &self,
        cx: &mut Context<'_>,
        target: u64,
        listener: &mut Option<FlushWait>,
    ) -> Poll<Result<(), Error>> {
        loop {
            if self.shared.flushed.load(Ordering::Acquire) >= target {
                return Poll::Ready(Ok(()));
            }
            if let Some(reason) = self.shared.reason.get() {
                // `flushed` is final once the reason is set.
                if self.shared.flushed.load(Ordering::Acquire) >= target {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(reason.clone()));
            }
            match listener {
                None => *listener = Some(self.shared.wait_flushed()),
                Some(l) => {
                    ready!(Pin::new(l).poll(cx));
                    *listener = None;
                }
            }
        }
    }

    /// Closes the connection gracefully: everything already queued is
    /// written, then the write half is shut. Later sends fail.
    ///
    /// ```no_run
    /// # fn f(sender: chatpipe::Sender<chatpipe::raw::Raw>) {
    /// sender.close(); // the driver resolves once the peer has closed too
    /// # }
    /// ```
    pub fn close(&self) {
        self.outbox.close();
    }

    /// True once the connection no longer accepts messages.
    pub fn is_closed(&self) -> bool {
        self.outbox.is_closed()
    }

    /// The reason the connection ended: `None` while it is open.
    pub fn close_reason(&self) -> Option<Error> {
        self.shared.reason.get().cloned()
    }

    /// How many messages `send` or `try_send` accepted that were never
    /// written, because the connection failed (or its driver was dropped).
    /// Always 0 after a clean close: then everything accepted was written.
    /// Accurate once the connection has ended.
    pub fn undelivered(&self) -> usize {
        self.shared.undelivered.load(Ordering::Acquire)
    }

    /// Counters for metrics, read without a lock.
    ///
    /// ```no_run
    /// # fn f(sender: chatpipe::Sender<chatpipe::raw::Raw>) {
    /// let stats = sender.stats();
    /// println!("{} messages in, {} out, {} queued", stats.messages_in, stats.messages_out, stats.queued);
    /// println!("silent for {:?}", stats.last_read.elapsed()); // default timer: the real clock
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        let s = &self.shared.stats;
        let at = |ns: u64| self.shared.start + std::time::Duration::from_nanos(ns);
        Stats {
            messages_in: s.messages_in.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            messages_out: s.messages_out.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            queued: self.outbox.len(),
            last_read: at(s.last_read_ns.load(Ordering::Relaxed)),
            last_written: at(s.last_written_ns.load(Ordering::Relaxed)),
        }
    }
}

/// A connection's counters, from [`Sender::stats`]. Totals count since the
/// connection was set up; the driver updates them as it works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Frames received (keepalives and responses included).
    pub messages_in: u64,
    /// Bytes received, length prefixes included.
    pub bytes_in: u64,
    /// Messages written to the stream (keepalives not included). Counted
    /// as each batch of coalesced messages is written in full, so it may
    /// lag a partly written batch, never run ahead.
    pub messages_out: u64,
    /// Bytes written, length prefixes and keepalives included.
    pub bytes_out: u64,
    /// Messages accepted and waiting in the queue.
    pub queued: usize,
    /// When a byte was last read, on the timer's clock (the connection's
    /// setup time before any was). `last_read.elapsed()` is the silence so
    /// far with the default timer.
    pub last_read: Instant,
    /// When a byte was last written, likewise.
    pub last_written: Instant,
}

/// Room for one message in a connection's queue, from
/// [`Sender::reserve`]. Dropping it unused gives the room back.
#[must_use = "a permit holds a slot of the queue until it sends or is dropped"]
pub struct Permit<'a, P: Protocol> {
    sender: &'a Sender<P>,
}

impl<P: Protocol> Permit<'_, P> {
    /// Queues `msg` in the reserved slot, without waiting. Fails only if
    /// the message cannot be encoded or the connection closed meanwhile,
    /// with the message handed back.
    pub fn send(self, msg: P::Message) -> Result<(), SendError<P::Message>> {
        let sender = self.sender;
        std::mem::forget(self);
        match sender.outbox.try_push(&sender.protocol, &msg, None, true) {
            Ok(()) => Ok(()),
            Err((e, _)) => Err(SendError {
                message: msg,
                error: sender.push_error(e),
            }),
        }
    }
}

impl<P: Protocol> Drop for Permit<'_, P> {
    fn drop(&mut self) {
        self.sender.outbox.release();
    }
}

impl<P: Protocol> fmt::Debug for Permit<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Permit")
    }
}

/// Tells the driver when a request future is dropped while waiting, so its
/// entry leaves the table at once.
struct AbandonOnDrop<'a, P: Protocol> {
    outbox: &'a Outbox<P>,
    id: Option<P::RequestId>,
}

impl<P: Protocol> Drop for AbandonOnDrop<'_, P> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.outbox.abandon(id);
        }
    }
}

/// Errors are the connection's reason, or [`Error::MessageTooLarge`] /
/// [`Error::Encode`] for a message `start_send` could not encode (that
/// message is dropped; use [`Sender::send`] to get it back).
impl<P: Protocol> Sink<P::Message> for Sender<P> {
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = &mut *self;
        while !this.sink_reserved {
            match this.outbox.try_reserve() {
                Ok(()) => {
                    this.sink_reserved = true;
                    this.sink_room = None;
                }
                Err(PushError::Full) => match &mut this.sink_room {
                    // Listen, then try again, so room made in between counts.
                    None => this.sink_room = Some(this.outbox.listen_room()),
                    Some(l) => {
                        ready!(Pin::new(l).poll(cx));
                        this.sink_room = None;
                    }
                },
                Err(e) => return Poll::Ready(Err(this.push_error(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, msg: P::Message) -> Result<(), Error> {
        let permit = std::mem::take(&mut self.sink_reserved);
        match self.outbox.try_push(&self.protocol, &msg, None, permit) {
            Ok(()) => {
                // A flush waiting since before must now wait for this too.
                self.sink_flush = None;
                Ok(())
            }
            Err((PushError::Full, _)) => Err(Error::InvalidRequest(
                "start_send without poll_ready on a full queue",
            )),
            Err((e, _)) => Err(self.push_error(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = &mut *self;
        let (target, mut listener) = match this.sink_flush.take() {
            Some(waiting) => waiting,
            None => (this.outbox.accepted(), None),
        };
        let res = this.poll_flushed(cx, target, &mut listener);
        if res.is_pending() {
            this.sink_flush = Some((target, listener));
        }
        res
    }

    /// Closes the connection and resolves once everything accepted was
    /// flushed; the driver then shuts the write half.
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if std::mem::take(&mut self.sink_reserved) {
            self.outbox.release();
        }
        self.outbox.close();
        self.poll_flush(cx)
    }
}
