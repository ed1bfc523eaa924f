//! [`Session`]: a connection that stays connected. It reconnects with
//! backoff, runs a setup step on every new connection, and keeps one
//! sending handle and one incoming stream across reconnects.
//!
//! The pieces, and who owns what:
//!
//! - [`SessionBuilder`]: the settings (the connection's [`Builder`], the
//!   [`Backoff`], the buffer's size, the timeouts) and `build*`, which
//!   returns the three parts below;
//! - [`Session`] (clone it freely): the desired state, sending, requests,
//!   the state watch ([`Session::states`]);
//! - [`SessionIncoming`]: every message received, over every connection;
//! - [`SessionDriver`]: the one future that does all the work, owning the
//!   connector, the setup step, the timer and the current [`Connection`]
//!   (polled inline: the session spawns nothing).
//! - [`Backoff`] (its own module): the retry policy, sans-IO: fed explicit
//!   `Instant`s, it answers how long to wait.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use event_listener::{Event, EventListener};
use futures_channel::mpsc;
use futures_core::stream::{FusedStream, Stream};
use futures_io::{AsyncRead, AsyncWrite};

use crate::error::BoxError;
use crate::outbox::{encode_frame, Reply};
use crate::{
    Backoff, Builder, Call, Connection, Error, Incoming, Kind, Protocol, SendError, Sender, Timer,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many state changes a [`SessionStates`] stream may fall behind by
/// before it skips the oldest (and counts them in
/// [`SessionStates::missed`]).
const STATE_LOG: usize = 64;
/// Messages handed from a connection to the [`SessionIncoming`] stream in
/// flight between the two (the real buffer is the connection's own,
/// `receive_capacity`).
const HANDOFF: usize = 32;
/// Most messages a setup step may [`Link::pass_on`].
const PASS_ON: usize = 64;
/// Most steps one poll of the driver takes before it yields.
const BUDGET: usize = 256;

// ---------------------------------------------------------------------------
// What the user sees: the desired state, the state and its causes.
// ---------------------------------------------------------------------------

/// What the session should be: connected (and reconnect after any
/// failure) or disconnected (close gracefully and stay down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// Connect, and reconnect after every failure.
    Connected,
    /// Close gracefully (what was accepted is written first) and stay down.
    Disconnected,
}

/// Where a session is, as [`Session::state`] and [`Session::states`] report it.
///
/// Displayed, it is a line for a user: `connecting (attempt 2)`,
/// `connected`, `idle timeout: nothing received for 15s; reconnecting in
/// 1.2 s`, `disconnecting`, `disconnected`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SessionState {
    /// Connecting, or running the setup step on a new connection. `attempt`
    /// counts from 1 since the session was last connected.
    Connecting {
        /// This attempt's number.
        attempt: u32,
    },
    /// Connected, the setup step done: messages flow.
    Connected,
    /// An attempt failed or the connection was lost.
    Error {
        /// Why.
        cause: SessionError,
        /// When the next attempt starts; `None` when the session stays
        /// down (the desired state is `Disconnected`).
        retry_in: Option<Duration>,
        /// Messages the lost connection had accepted but not written: lost
        /// (delivery is at most once across a reconnect). Also counted in
        /// [`Session::undelivered`].
        undelivered: usize,
    },
    /// Closing gracefully: writing what was accepted, then shutting down.
    Disconnecting,
    /// Down, and staying down until the desired state is `Connected`.
    Disconnected,
}

impl SessionState {
    /// True for [`SessionState::Connected`].
    pub fn is_connected(&self) -> bool {
        matches!(self, SessionState::Connected)
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionState::Connecting { attempt } => write!(f, "connecting (attempt {attempt})"),
            SessionState::Connected => f.write_str("connected"),
            SessionState::Error {
                cause,
                retry_in: Some(t),
                ..
            } => write!(f, "{cause}; reconnecting in {:.1} s", t.as_secs_f64()),
            SessionState::Error { cause, .. } => write!(f, "{cause}"),
            SessionState::Disconnecting => f.write_str("disconnecting"),
            SessionState::Disconnected => f.write_str("disconnected"),
        }
    }
}

/// Why a connection attempt failed or a connection was lost: the cause in
/// [`SessionState::Error`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The connector failed (refused, unreachable, a TLS handshake...).
    #[error("cannot connect: {0}")]
    Connect(#[source] Arc<io::Error>),
    /// The connector did not finish within the connect timeout.
    #[error("connecting timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The setup step failed.
    #[error("setup failed: {0}")]
    Setup(#[source] BoxError),
    /// The setup step did not finish within the setup timeout.
    #[error("setup timed out after {0:?}")]
    SetupTimeout(Duration),
    /// The connection ended: its reason ([`Error::Closed`] when the peer
    /// closed it cleanly, [`Error::IdleTimeout`] for a black-holed peer...).
    #[error("{0}")]
    Lost(#[source] Error),
    /// A graceful close did not finish within the close timeout; the
    /// connection was dropped.
    #[error("closing timed out after {0:?}")]
    CloseTimeout(Duration),
}

/// A [`Session::send`] or [`Session::try_send`] that failed: the message
/// comes back.
#[derive(Clone)]
pub enum SessionSendError<M> {
    /// The session is down and its buffer is full (or, for `try_send`,
    /// the live connection's queue is full).
    Full(M),
    /// The desired state is `Disconnected`, or the session has ended.
    Disconnected(M),
    /// This message cannot be sent at all: it does not encode, or is over
    /// the frame limit.
    Failed(SendError<M>),
}

impl<M> SessionSendError<M> {
    /// The message that was not sent.
    pub fn into_inner(self) -> M {
        match self {
            SessionSendError::Full(m) | SessionSendError::Disconnected(m) => m,
            SessionSendError::Failed(e) => e.message,
        }
    }
}

impl<M> fmt::Debug for SessionSendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionSendError::Full(_) => f.write_str("Full(..)"),
            SessionSendError::Disconnected(_) => f.write_str("Disconnected(..)"),
            SessionSendError::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

impl<M> fmt::Display for SessionSendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionSendError::Full(_) => f.write_str("the session's buffer is full"),
            SessionSendError::Disconnected(_) => f.write_str("the session is disconnected"),
            SessionSendError::Failed(e) => e.fmt(f),
        }
    }
}

impl<M> std::error::Error for SessionSendError<M> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SessionSendError::Failed(e) => Some(&e.error),
            _ => None,
        }
    }
}

impl<M> From<SessionSendError<M>> for io::Error {
    fn from(e: SessionSendError<M>) -> Self {
        match e {
            SessionSendError::Full(_) => io::ErrorKind::WouldBlock.into(),
            SessionSendError::Disconnected(_) => io::ErrorKind::NotConnected.into(),
            SessionSendError::Failed(e) => e.into(),
        }
    }
}

// ---------------------------------------------------------------------------
// The state log: one for the session, read by every `SessionStates`.
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Watch {
    inner: Mutex<WatchInner>,
    event: Event,
}

#[derive(Debug)]
struct WatchInner {
    /// The last state changes, each with its number; the back is current.
    log: VecDeque<(u64, SessionState)>,
    next_seq: u64,
    ended: bool,
}

impl Watch {
    fn new() -> Self {
        let mut log = VecDeque::with_capacity(STATE_LOG);
        log.push_back((0, SessionState::Disconnected));
        Watch {
            inner: Mutex::new(WatchInner {
                log,
                next_seq: 1,
                ended: false,
            }),
            event: Event::new(),
        }
    }

    fn publish(&self, state: SessionState) {
        {
            let mut w = lock(&self.inner);
            if w.log.len() == STATE_LOG {
                w.log.pop_front();
            }
            let seq = w.next_seq;
            w.next_seq += 1;
            w.log.push_back((seq, state));
        }
        self.event.notify(usize::MAX);
    }

    fn current(&self) -> SessionState {
        let w = lock(&self.inner);
        match w.log.back() {
            Some((_, s)) => s.clone(),
            None => SessionState::Disconnected,
        }
    }

    fn end(&self) {
        lock(&self.inner).ended = true;
        self.event.notify(usize::MAX);
    }
}

/// The session's state changes, as a [`Stream`]: first the state when it
/// was made, then every change, in order, ending when the session's
/// driver has ended. From [`Session::states`].
///
/// It keeps no queue of its own: it reads the session's log of the last
/// 64 changes. A stream that falls further behind skips the oldest, and
/// [`SessionStates::missed`] counts them.
///
/// ```no_run
/// # async fn f(session: chatpipe::Session<chatpipe::raw::Raw>) {
/// use chatpipe::SessionState;
/// use futures::StreamExt;
/// let mut states = session.states();
/// while let Some(state) = states.next().await {
///     match state {
///         SessionState::Error { retry_in: Some(_), .. } => eprintln!("* connection lost: {state}"),
///         SessionState::Connected => eprintln!("* connected"),
///         _ => {}
///     }
/// }
/// # }
/// ```
pub struct SessionStates {
    watch: Arc<Watch>,
    next: u64,
    missed: u64,
    listener: Option<EventListener>,
}

impl SessionStates {
    /// State changes skipped because this stream fell more than 64 behind.
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

impl fmt::Debug for SessionStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionStates")
            .field("next", &self.next)
            .field("missed", &self.missed)
            .finish()
    }
}

impl Stream for SessionStates {
    type Item = SessionState;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SessionState>> {
        let this = &mut *self;
        loop {
            {
                let w = lock(&this.watch.inner);
                if let Some(&(first, _)) = w.log.front() {
                    if this.next < first {
                        this.missed += first - this.next;
                        this.next = first;
                    }
                    let i = (this.next - first) as usize;
                    if let Some((_, s)) = w.log.get(i) {
                        this.next += 1;
                        this.listener = None;
                        return Poll::Ready(Some(s.clone()));
                    }
                }
                if w.ended {
                    return Poll::Ready(None);
                }
            }
            match &mut this.listener {
                None => this.listener = Some(this.watch.event.listen()),
                Some(l) => {
                    if Pin::new(l).poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.listener = None;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The shared state between the handles and the driver.
// ---------------------------------------------------------------------------

/// A message waiting for a connection; a request with its reply slot.
struct Entry<P: Protocol> {
    msg: P::Message,
    request: Option<(P::RequestId, Reply<P::Message>)>,
}

struct Shared<P: Protocol> {
    inner: Mutex<Inner<P>>,
    watch: Arc<Watch>,
    protocol: Arc<P>,
    max_frame_len: usize,
    capacity: usize,
    /// Live `Session` handles: when the last goes, the driver closes and ends.
    handles: AtomicUsize,
    /// Requests `Session::call` has numbered.
    next_request: AtomicU64,
    /// Messages accepted and never written, over the session's life.
    undelivered: AtomicU64,
}

struct Inner<P: Protocol> {
    desired: Desired,
    /// The connection messages go to directly: set once its setup is done
    /// (and cleared when it is lost or closing).
    live: Option<Sender<P>>,
    /// Messages waiting for a connection, in order.
    buffer: VecDeque<Entry<P>>,
    /// The driver finished or was dropped.
    ended: bool,
    /// Why the last connection ended, for requests that lost their reply.
    last_loss: Option<Error>,
    driver: Option<Waker>,
}

impl<P: Protocol> Shared<P> {
    fn lock(&self) -> MutexGuard<'_, Inner<P>> {
        lock(&self.inner)
    }

    fn wake_driver(inner: &mut Inner<P>) {
        if let Some(w) = inner.driver.take() {
            w.wake();
        }
    }

    /// Checks that `msg` encodes within the frame limit, before it is
    /// buffered: a message that could never go out fails now, handed back,
    /// rather than later with nobody to tell.
    fn check(&self, msg: &P::Message) -> Result<(), Error> {
        let mut scratch = BytesMut::new();
        encode_frame(&*self.protocol, msg, &mut scratch, self.max_frame_len).map(|_| ())
    }
}

/// Where a push went; the message comes back unless it was taken.
enum Pushed<P: Protocol> {
    Done,
    /// The live connection's queue is full: wait for room on it.
    LiveFull(P::Message, Option<Reply<P::Message>>, Sender<P>),
    Refused(P::Message, Refusal),
}

enum Refusal {
    Full,
    Disconnected,
    Failed(Error),
}

impl<P: Protocol> Shared<P> {
    /// Queues `msg`: straight to the live connection when there is one and
    /// nothing waits before it, otherwise in the buffer.
    fn push(
        &self,
        msg: P::Message,
        id: Option<&P::RequestId>,
        mut reply: Option<Reply<P::Message>>,
    ) -> Pushed<P> {
        let mut inner = self.lock();
        if inner.ended || inner.desired == Desired::Disconnected {
            return Pushed::Refused(msg, Refusal::Disconnected);
        }
        if inner.buffer.is_empty() {
            if let Some(live) = &inner.live {
                let request = id.cloned().zip(reply.take());
                match live.try_push_entry(&msg, request) {
                    Ok(()) => return Pushed::Done,
                    Err((None, back)) => return Pushed::LiveFull(msg, back, live.clone()),
                    Err((Some(e), _)) if !e.is_fatal() => {
                        return Pushed::Refused(msg, Refusal::Failed(e))
                    }
                    // The connection is gone and the driver has not seen it
                    // yet: the message waits for the next one.
                    Err((Some(_), back)) => reply = back,
                }
            }
        }
        if inner.buffer.len() >= self.capacity {
            return Pushed::Refused(msg, Refusal::Full);
        }
        if let Err(e) = self.check(&msg) {
            return Pushed::Refused(msg, Refusal::Failed(e));
        }
        inner.buffer.push_back(Entry {
            msg,
            request: id.cloned().zip(reply),
        });
        Shared::wake_driver(&mut inner);
        Pushed::Done
    }
}

// ---------------------------------------------------------------------------
// The handle.
// ---------------------------------------------------------------------------

/// A connection that stays connected: reconnects with backoff, runs your
/// setup step on each new connection, and keeps one sending handle across
/// reconnects. Clone it freely: every clone controls and sends on the same
/// session. Made by [`SessionBuilder`].
///
/// **Delivery.** A message sent while the session is connected goes to the
/// connection at once (waiting for room as [`Sender::send`] does). A
/// message sent while it is down (connecting, setting up, waiting to
/// retry) waits in a bounded buffer and goes out after the next setup, in
/// order, once. When the buffer is full, or the desired state is
/// `Disconnected`, a send fails at once and hands the message back.
/// A message a connection accepted but had not written when it was lost
/// is *not* sent again (nobody can know whether the peer got it): the
/// [`SessionState::Error`] reporting the loss counts it, as does
/// [`Session::undelivered`]. So delivery is in order and at most once
/// across a reconnect, and exactly once for what waited in the buffer.
///
/// **Requests** sent while down wait in the buffer likewise (without a
/// timeout of their own until they go out; drop the future to give up:
/// a cancelled request is not sent). Once out, the connection's request
/// timeout applies; a request outstanding when its connection is lost
/// fails with the reason, and is not sent again.
///
/// Dropping every `Session` handle closes the session as
/// [`Session::disconnect`] does, then the driver resolves.
pub struct Session<P: Protocol> {
    shared: Arc<Shared<P>>,
}

impl<P: Protocol> Clone for Session<P> {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Session {
            shared: self.shared.clone(),
        }
    }
}

impl<P: Protocol> Drop for Session<P> {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            Shared::wake_driver(&mut self.shared.lock());
        }
    }
}

impl<P: Protocol> fmt::Debug for Session<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.shared.lock();
        f.debug_struct("Session")
            .field("desired", &inner.desired)
            .field("live", &inner.live.is_some())
            .field("buffered", &inner.buffer.len())
            .finish()
    }
}

impl<P: Protocol> Session<P> {
    /// Sets the desired state: `Connected` connects now (if down) and
    /// reconnects after every failure; `Disconnected` closes gracefully
    /// (what was accepted is written first) and stays down. It can change
    /// at any time, from any clone; the driver acts on the latest.
    pub fn set_desired(&self, desired: Desired) {
        let mut inner = self.shared.lock();
        if inner.desired != desired {
            inner.desired = desired;
            Shared::wake_driver(&mut inner);
        }
    }

    /// `set_desired(Desired::Connected)`.
    pub fn connect(&self) {
        self.set_desired(Desired::Connected);
    }

    /// `set_desired(Desired::Disconnected)`.
    pub fn disconnect(&self) {
        self.set_desired(Desired::Disconnected);
    }

    /// The desired state.
    pub fn desired(&self) -> Desired {
        self.shared.lock().desired
    }

    /// The current state.
    pub fn state(&self) -> SessionState {
        self.shared.watch.current()
    }

    /// A stream of the state: the current one, then every change.
    pub fn states(&self) -> SessionStates {
        let w = lock(&self.shared.watch.inner);
        let next = w.log.back().map_or(0, |(seq, _)| *seq);
        SessionStates {
            watch: self.shared.watch.clone(),
            next,
            missed: 0,
            listener: None,
        }
    }

    /// Sends `msg`: to the connection when connected (waiting for room in
    /// its queue), otherwise into the buffer, failing at once if that is
    /// full. See the type's docs for the delivery semantics.
    ///
    /// Cancel safety: if the future is dropped before it completes, the
    /// message was not sent.
    pub async fn send(&self, msg: P::Message) -> Result<(), SessionSendError<P::Message>> {
        let mut msg = msg;
        loop {
            match self.shared.push(msg, None, None) {
                Pushed::Done => return Ok(()),
                Pushed::LiveFull(back, _, live) => {
                    msg = back;
                    // Room, or the connection's end; then try again.
                    let _ = live.reserve().await;
                }
                Pushed::Refused(msg, why) => return Err(refused(msg, why)),
            }
        }
    }

    /// Sends `msg` without waiting: fails with [`SessionSendError::Full`]
    /// when the buffer (or, connected, the connection's queue) is full.
    pub fn try_send(&self, msg: P::Message) -> Result<(), SessionSendError<P::Message>> {
        match self.shared.push(msg, None, None) {
            Pushed::Done => Ok(()),
            Pushed::LiveFull(msg, ..) => Err(SessionSendError::Full(msg)),
            Pushed::Refused(msg, why) => Err(refused(msg, why)),
        }
    }

    /// Sends a request and waits for the response with the same id, as
    /// [`Sender::request`] does. While down, the request waits in the
    /// buffer (see the type's docs).
    ///
    /// Fails at once with [`Error::Closed`] if the desired state is
    /// `Disconnected` or the session has ended, with an I/O error of kind
    /// `WouldBlock` if the buffer is full, and with the connection's
    /// reason if the connection it went out on is lost first.
    pub async fn request(&self, msg: P::Message) -> Result<P::Message, Error> {
        let Kind::Request(id) = self.shared.protocol.kind(&msg) else {
            return Err(Error::InvalidRequest("the message is not a request"));
        };
        let (tx, rx) = crate::reply::channel();
        let mut tx = Some(tx);
        let mut msg = msg;
        loop {
            match self.shared.push(msg, Some(&id), tx.take()) {
                Pushed::Done => break,
                Pushed::LiveFull(back, reply, live) => {
                    msg = back;
                    tx = reply;
                    let _ = live.reserve().await;
                }
                Pushed::Refused(_, Refusal::Disconnected) => return Err(Error::Closed),
                Pushed::Refused(_, Refusal::Full) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "the session's buffer is full",
                    )
                    .into())
                }
                Pushed::Refused(_, Refusal::Failed(e)) => return Err(e),
            }
            if tx.is_none() {
                return Err(Error::Closed);
            }
        }
        match rx.await {
            Some(res) => res,
            None => Err(self
                .shared
                .lock()
                .last_loss
                .clone()
                .unwrap_or(Error::Closed)),
        }
    }

    /// Sends a request whose id the session chooses (through
    /// [`Protocol::request_id`], numbered across the whole session), as
    /// [`Sender::call`] does.
    pub async fn call<C: Call<P>>(&self, call: C) -> Result<C::Output, Error> {
        let n = self.shared.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let id = self
            .shared
            .protocol
            .request_id(n)
            .ok_or(Error::InvalidRequest("the protocol makes no request ids"))?;
        let response = self.request(call.into_request(id)).await?;
        C::from_response(response).map_err(|_| Error::UnexpectedResponse)
    }

    /// Messages (and requests) waiting in the buffer for a connection.
    pub fn buffered(&self) -> usize {
        self.shared.lock().buffer.len()
    }

    /// Takes every message waiting in the buffer out of it, in order:
    /// they will not be sent. Requests among them fail with
    /// [`Error::Closed`] and are not returned.
    pub fn take_buffered(&self) -> Vec<P::Message> {
        let taken = std::mem::take(&mut self.shared.lock().buffer);
        taken
            .into_iter()
            .filter_map(|e| match e.request {
                None => Some(e.msg),
                Some((_, reply)) => {
                    let _ = reply.send(Err(Error::Closed));
                    None
                }
            })
            .collect()
    }

    /// Messages the session accepted that were never written, over its
    /// whole life: those a lost connection had accepted, and those left in
    /// the buffer when the session ended.
    pub fn undelivered(&self) -> u64 {
        self.shared.undelivered.load(Ordering::Acquire)
    }
}

fn refused<M>(msg: M, why: Refusal) -> SessionSendError<M> {
    match why {
        Refusal::Full => SessionSendError::Full(msg),
        Refusal::Disconnected => SessionSendError::Disconnected(msg),
        Refusal::Failed(error) => SessionSendError::Failed(SendError {
            message: msg,
            error,
        }),
    }
}

// ---------------------------------------------------------------------------
// The incoming stream, and the link a setup step gets.
// ---------------------------------------------------------------------------

/// Every message received, over every connection of the session, in
/// order: a [`Stream`] of messages (keepalives and responses taken out, as
/// on [`Incoming`]). Failures are not in it: they are states
/// ([`Session::states`]). It ends when the session's driver ends.
///
/// Dropping it is allowed: later messages are then discarded.
pub struct SessionIncoming<P: Protocol> {
    rx: mpsc::Receiver<P::Message>,
}

impl<P: Protocol> fmt::Debug for SessionIncoming<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionIncoming")
    }
}

impl<P: Protocol> Stream for SessionIncoming<P> {
    type Item = P::Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<P::Message>> {
        Pin::new(&mut self.rx).poll_next(cx)
    }
}

impl<P: Protocol> FusedStream for SessionIncoming<P> {
    fn is_terminated(&self) -> bool {
        self.rx.is_terminated()
    }
}

/// A new connection, handed to the setup step: send on it, make requests,
/// read what arrives, then return it. What the setup step does not read
/// from `incoming` goes to the [`SessionIncoming`] stream after it.
#[non_exhaustive]
pub struct Link<P: Protocol> {
    /// This connection's sender. What the setup step sends goes out before
    /// anything the session buffered.
    pub sender: Sender<P>,
    /// This connection's incoming messages.
    pub incoming: Incoming<P>,
    attempt: u32,
    passed: VecDeque<P::Message>,
}

impl<P: Protocol> Link<P> {
    /// This attempt's number, from 1 since the session was last connected.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Hands a message the setup step read (and is not its to keep) to the
    /// [`SessionIncoming`] stream, ahead of what arrives after it. At most
    /// 64; past that the message comes back.
    pub fn pass_on(&mut self, msg: P::Message) -> Result<(), P::Message> {
        if self.passed.len() >= PASS_ON {
            return Err(msg);
        }
        self.passed.push_back(msg);
        Ok(())
    }
}

impl<P: Protocol> fmt::Debug for Link<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// A setup step that does nothing: the connection is ready as soon as it is
/// made.
///
/// ```no_run
/// # async fn f() {
/// let (session, incoming, driver) = chatpipe::SessionBuilder::new().build(
///     chatpipe::raw::Raw,
///     || smol::net::TcpStream::connect("127.0.0.1:4000"),
///     chatpipe::session::no_setup,
/// );
/// # }
/// ```
pub fn no_setup<P: Protocol>(link: Link<P>) -> std::future::Ready<Result<Link<P>, Error>> {
    std::future::ready(Ok(link))
}

// ---------------------------------------------------------------------------
// The builder.
// ---------------------------------------------------------------------------

/// A session's settings, each with its default, and `build*`.
///
/// | setting | default |
/// |---|---|
/// | [`connection`](SessionBuilder::connection) | `Builder::new()`: each connection's settings (keepalive, idle timeout...) |
/// | [`backoff`](SessionBuilder::backoff) | [`Backoff::new()`]: 1 s, x2, at most 30 s, reset after 30 s up |
/// | [`buffer_capacity`](SessionBuilder::buffer_capacity) | 1,024 messages |
/// | [`connect_timeout`](SessionBuilder::connect_timeout) | 10 s per attempt |
/// | [`setup_timeout`](SessionBuilder::setup_timeout) | 10 s |
/// | [`close_timeout`](SessionBuilder::close_timeout) | 10 s |
/// | [`start`](SessionBuilder::start) | `Desired::Connected` |
#[derive(Debug, Clone)]
pub struct SessionBuilder {
    connection: Builder,
    backoff: Backoff,
    buffer_capacity: usize,
    connect_timeout: Option<Duration>,
    setup_timeout: Option<Duration>,
    close_timeout: Duration,
    start: Desired,
}

impl Default for SessionBuilder {
    fn default() -> Self {
        SessionBuilder {
            connection: Builder::new(),
            backoff: Backoff::new(),
            buffer_capacity: 1024,
            connect_timeout: Some(Duration::from_secs(10)),
            setup_timeout: Some(Duration::from_secs(10)),
            close_timeout: Duration::from_secs(10),
            start: Desired::Connected,
        }
    }
}

impl SessionBuilder {
    /// The defaults (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    /// Each connection's settings. Its idle timeout is what catches a
    /// black-holed peer, and that counts as a lost connection like any
    /// other failure.
    pub fn connection(mut self, builder: Builder) -> Self {
        self.connection = builder;
        self
    }

    /// The retry policy.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How many messages may wait for a connection while the session is
    /// down. Default: 1,024. At least 1.
    pub fn buffer_capacity(mut self, n: usize) -> Self {
        self.buffer_capacity = n.max(1);
        self
    }

    /// How long one connect may take before it counts as a failed attempt
    /// ([`SessionError::ConnectTimeout`]); `None` waits for the connector.
    /// Default: 10 s.
    pub fn connect_timeout(mut self, d: Option<Duration>) -> Self {
        self.connect_timeout = d;
        self
    }

    /// How long the setup step may take before it counts as a failed
    /// attempt ([`SessionError::SetupTimeout`]); `None` waits for it.
    /// Default: 10 s.
    pub fn setup_timeout(mut self, d: Option<Duration>) -> Self {
        self.setup_timeout = d;
        self
    }

    /// How long a graceful close may take (writing what was accepted,
    /// then the peer's close) before the connection is dropped. Default:
    /// 10 s.
    pub fn close_timeout(mut self, d: Duration) -> Self {
        self.close_timeout = d;
        self
    }

    /// The desired state to start in. Default: `Desired::Connected`.
    pub fn start(mut self, desired: Desired) -> Self {
        self.start = desired;
        self
    }

    /// Builds a session with the default timer
    /// ([`AsyncIoTimer`](crate::AsyncIoTimer)): for smol and any
    /// executor. See [`SessionBuilder::build_with_timer`].
    #[cfg(feature = "async-io")]
    pub fn build<P, T, C, CF, S, SF, E>(
        &self,
        protocol: P,
        connector: C,
        setup: S,
    ) -> (Session<P>, SessionIncoming<P>, SessionDriver)
    where
        P: Protocol,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        C: FnMut() -> CF + Send + 'static,
        CF: Future<Output = io::Result<T>> + Send + 'static,
        S: FnMut(Link<P>) -> SF + Send + 'static,
        SF: Future<Output = Result<Link<P>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.build_with_timer(protocol, connector, setup, crate::AsyncIoTimer::default)
    }

    /// Builds a session whose connector makes tokio streams
    /// (`tokio::net::TcpStream`, a `tokio_rustls` stream...), with tokio's
    /// timer. Feature `tokio`. The driver must be polled inside a tokio
    /// runtime, as `tokio::spawn` does.
    #[cfg(feature = "tokio")]
    pub fn build_tokio<P, T, C, CF, S, SF, E>(
        &self,
        protocol: P,
        mut connector: C,
        setup: S,
    ) -> (Session<P>, SessionIncoming<P>, SessionDriver)
    where
        P: Protocol,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        C: FnMut() -> CF + Send + 'static,
        CF: Future<Output = io::Result<T>> + Send + 'static,
        S: FnMut(Link<P>) -> SF + Send + 'static,
        SF: Future<Output = Result<Link<P>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let connector = move || {
            let connecting = connector();
            async move { connecting.await.map(crate::TokioIo) }
        };
        self.build_with_timer(protocol, connector, setup, crate::TokioTimer::default)
    }

    /// Builds a session: the [`Session`] handle, the [`SessionIncoming`]
    /// stream, and the [`SessionDriver`] future, which does all the work:
    /// spawn it on any executor. Nothing happens until it is polled.
    ///
    /// - `connector` makes a fresh byte stream for each attempt (TCP, TLS,
    ///   anything); an error is a failed attempt.
    /// - `setup` runs on each new connection before anything buffered is
    ///   sent: claim a nickname, log in. It gets the [`Link`] and returns
    ///   it; an error (or the connection ending first) is a failed attempt.
    /// - `make_timer` makes a [`Timer`] for the session and one for each
    ///   connection: another runtime's, or a virtual clock's in tests.
    pub fn build_with_timer<P, T, C, CF, S, SF, E, Tm, MT>(
        &self,
        protocol: P,
        mut connector: C,
        mut setup: S,
        mut make_timer: MT,
    ) -> (Session<P>, SessionIncoming<P>, SessionDriver)
    where
        P: Protocol,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        C: FnMut() -> CF + Send + 'static,
        CF: Future<Output = io::Result<T>> + Send + 'static,
        S: FnMut(Link<P>) -> SF + Send + 'static,
        SF: Future<Output = Result<Link<P>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        Tm: Timer,
        MT: FnMut() -> Tm + Send + 'static,
    {
        let max_frame_len = self.connection.frame_limit(&protocol);
        let watch = Arc::new(Watch::new());
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                desired: self.start,
                live: None,
                buffer: VecDeque::new(),
                ended: false,
                last_loss: None,
                driver: None,
            }),
            watch,
            protocol: Arc::new(protocol),
            max_frame_len,
            capacity: self.buffer_capacity,
            handles: AtomicUsize::new(1),
            next_request: AtomicU64::new(0),
            undelivered: AtomicU64::new(0),
        });
        let (to_app, rx) = mpsc::channel(HANDOFF);
        let driver = Driver {
            shared: shared.clone(),
            config: self.connection.clone(),
            connector: Box::new(move || Box::pin(connector()) as BoxFuture<io::Result<T>>),
            setup: Box::new(move |link| {
                let fut = setup(link);
                Box::pin(async move {
                    fut.await
                        .map_err(|e| SessionError::Setup(Arc::from(e.into())))
                }) as BoxFuture<Result<Link<P>, SessionError>>
            }),
            timer: make_timer(),
            make_timer: Box::new(make_timer),
            backoff: self.backoff.clone(),
            connect_timeout: self.connect_timeout,
            setup_timeout: self.setup_timeout,
            close_timeout: self.close_timeout,
            phase: Phase::Down,
            attempt: 0,
            to_app: Some(to_app),
            passed: VecDeque::new(),
            leftover: None,
            room: None,
        };
        (
            Session { shared },
            SessionIncoming { rx },
            SessionDriver {
                inner: Box::pin(driver),
            },
        )
    }
}

// ---------------------------------------------------------------------------
// The driver.
// ---------------------------------------------------------------------------

/// The session's driver: connects, runs the setup step, moves buffered
/// messages to each new connection and received ones to
/// [`SessionIncoming`], waits out the backoff, and drives the current
/// connection (inline: it spawns nothing). Spawn it on any executor.
///
/// It resolves once every [`Session`] handle is dropped and the last
/// connection is closed (gracefully, as [`Session::disconnect`] does).
/// Dropping it instead ends the session at once: the connection is dropped
/// (see [`Connection`]), what waits in the buffer is counted in
/// [`Session::undelivered`], buffered requests fail with [`Error::Closed`],
/// later sends fail, and the incoming and state streams end.
#[must_use = "the session does nothing unless its driver future is polled (spawn it)"]
pub struct SessionDriver {
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl fmt::Debug for SessionDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionDriver")
    }
}

impl Future for SessionDriver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll(cx)
    }
}

type ConnectorFn<T> = Box<dyn FnMut() -> BoxFuture<io::Result<T>> + Send>;
type SetupFn<P> = Box<dyn FnMut(Link<P>) -> BoxFuture<Result<Link<P>, SessionError>> + Send>;

enum Phase<T, P: Protocol, Tm> {
    /// Down; connects when the desired state is `Connected`.
    Down,
    Backoff {
        until: Instant,
    },
    Connecting {
        fut: BoxFuture<io::Result<T>>,
        deadline: Option<Instant>,
    },
    Setup {
        conn: Pin<Box<Connection<T, P, Tm>>>,
        sender: Sender<P>,
        fut: BoxFuture<Result<Link<P>, SessionError>>,
        deadline: Option<Instant>,
    },
    Live {
        conn: Pin<Box<Connection<T, P, Tm>>>,
        sender: Sender<P>,
        incoming: Option<Incoming<P>>,
    },
    /// Writing what was accepted (`drain` more from the buffer first),
    /// then shutting down.
    Closing {
        conn: Pin<Box<Connection<T, P, Tm>>>,
        sender: Sender<P>,
        incoming: Option<Incoming<P>>,
        drain: usize,
        deadline: Instant,
    },
    Ended,
}

struct Driver<T, P: Protocol, Tm> {
    shared: Arc<Shared<P>>,
    config: Builder,
    connector: ConnectorFn<T>,
    setup: SetupFn<P>,
    make_timer: Box<dyn FnMut() -> Tm + Send>,
    timer: Tm,
    backoff: Backoff,
    connect_timeout: Option<Duration>,
    setup_timeout: Option<Duration>,
    close_timeout: Duration,
    phase: Phase<T, P, Tm>,
    /// Attempts since the session was last connected.
    attempt: u32,
    to_app: Option<mpsc::Sender<P::Message>>,
    /// What the last setup step passed on, for the application first.
    passed: VecDeque<P::Message>,
    /// A lost connection's incoming messages, still to hand over.
    leftover: Option<Incoming<P>>,
    /// Waiting for room in the connection's queue, to move the buffer.
    room: Option<EventListener>,
}

// Nothing in it is structurally pinned (the connection is boxed).
impl<T, P: Protocol, Tm> Unpin for Driver<T, P, Tm> {}

/// What one look at the current phase decided.
enum Step {
    /// The phase changed: look again.
    Again,
    /// Nothing to do until woken.
    Wait,
}

impl<T, P, Tm> Future for Driver<T, P, Tm>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Protocol,
    Tm: Timer,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        {
            let mut inner = this.shared.lock();
            match &inner.driver {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => inner.driver = Some(cx.waker().clone()),
            }
        }
        for _ in 0..BUDGET {
            if matches!(this.phase, Phase::Ended) {
                return Poll::Ready(());
            }
            this.hand_over(cx);
            match this.step(cx) {
                Step::Again => continue,
                Step::Wait => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T, P, Tm> Driver<T, P, Tm>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Protocol,
    Tm: Timer,
{
    /// True while the session should be up: the desired state is
    /// `Connected` and a handle is left.
    fn want_up(&self) -> bool {
        self.shared.handles.load(Ordering::Acquire) > 0
            && self.shared.lock().desired == Desired::Connected
    }

    fn publish(&self, state: SessionState) {
        self.shared.watch.publish(state);
    }

    /// Waits until `deadline` (registering the timer) or a wakeup.
    fn wait_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Step {
        self.timer.reset(deadline);
        match self.timer.poll_expired(cx) {
            Poll::Ready(()) => Step::Again,
            Poll::Pending => Step::Wait,
        }
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Step {
        let now = self.timer.now();
        let want_up = self.want_up();
        match &mut self.phase {
            Phase::Ended => Step::Wait,
            Phase::Down => {
                if self.shared.handles.load(Ordering::Acquire) == 0 {
                    self.end();
                    return Step::Again;
                }
                if want_up {
                    self.backoff.reset();
                    self.attempt = 0;
                    self.start_connect(now);
                    return Step::Again;
                }
                Step::Wait
            }
            Phase::Backoff { until } => {
                let until = *until;
                if !want_up {
                    self.down();
                    return Step::Again;
                }
                if now >= until {
                    self.start_connect(now);
                    return Step::Again;
                }
                self.wait_until(cx, until)
            }
            Phase::Connecting { fut, deadline } => {
                if !want_up {
                    self.down();
                    return Step::Again;
                }
                let deadline = *deadline;
                match fut.as_mut().poll(cx) {
                    Poll::Ready(Ok(io)) => {
                        self.start_setup(io, now);
                        return Step::Again;
                    }
                    Poll::Ready(Err(e)) => {
                        self.failed(SessionError::Connect(Arc::new(e)), 0, now);
                        return Step::Again;
                    }
                    Poll::Pending => {}
                }
                match (deadline, self.connect_timeout) {
                    (Some(deadline), Some(d)) => {
                        if now >= deadline {
                            self.failed(SessionError::ConnectTimeout(d), 0, now);
                            return Step::Again;
                        }
                        self.wait_until(cx, deadline)
                    }
                    _ => Step::Wait,
                }
            }
            Phase::Setup {
                conn,
                fut,
                deadline,
                sender,
            } => {
                if !want_up {
                    // Abandon the setup; what it sent is written.
                    let Phase::Setup { conn, sender, .. } =
                        std::mem::replace(&mut self.phase, Phase::Down)
                    else {
                        return Step::Again;
                    };
                    self.start_closing(conn, sender, None, 0, now);
                    return Step::Again;
                }
                if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                    let lost = sender.undelivered();
                    let error = res.err().unwrap_or(Error::Closed);
                    // The peer may have answered, then closed (a refusal):
                    // the setup step's own failure says more.
                    let cause = match fut.as_mut().poll(cx) {
                        Poll::Ready(Err(e)) => e,
                        _ => SessionError::Lost(error.clone()),
                    };
                    self.lost(error);
                    self.failed(cause, lost, now);
                    return Step::Again;
                }
                match fut.as_mut().poll(cx) {
                    Poll::Ready(Ok(link)) => {
                        self.go_live(link, now);
                        return Step::Again;
                    }
                    Poll::Ready(Err(e)) => {
                        let lost = sender.undelivered();
                        self.failed(e, lost, now);
                        return Step::Again;
                    }
                    Poll::Pending => {}
                }
                match (*deadline, self.setup_timeout) {
                    (Some(deadline), Some(d)) => {
                        if now >= deadline {
                            let lost = sender.undelivered();
                            self.failed(SessionError::SetupTimeout(d), lost, now);
                            return Step::Again;
                        }
                        self.wait_until(cx, deadline)
                    }
                    _ => Step::Wait,
                }
            }
            Phase::Live { .. } => {
                if !want_up {
                    let Phase::Live {
                        conn,
                        sender,
                        incoming,
                    } = std::mem::replace(&mut self.phase, Phase::Down)
                    else {
                        return Step::Again;
                    };
                    // Only what was accepted before the flip goes out.
                    let drain = self.shared.lock().buffer.len();
                    self.start_closing(conn, sender, incoming, drain, now);
                    return Step::Again;
                }
                let Phase::Live {
                    conn,
                    sender,
                    incoming,
                } = &mut self.phase
                else {
                    return Step::Again;
                };
                let mut unlimited = usize::MAX;
                let _ = drain(&self.shared, sender, &mut self.room, &mut unlimited, cx);
                if self.leftover.is_none() && self.passed.is_empty() {
                    pump(incoming, &mut self.to_app, cx);
                }
                if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                    let Phase::Live {
                        sender, incoming, ..
                    } = std::mem::replace(&mut self.phase, Phase::Down)
                    else {
                        return Step::Again;
                    };
                    let lost = sender.undelivered();
                    let error = res.err().unwrap_or(Error::Closed);
                    self.leftover = incoming;
                    self.lost(error.clone());
                    self.failed(SessionError::Lost(error), lost, now);
                    return Step::Again;
                }
                Step::Wait
            }
            Phase::Closing {
                conn,
                sender,
                incoming,
                drain: left,
                deadline,
            } => {
                if *left > 0 {
                    if let Poll::Ready(true) = drain(&self.shared, sender, &mut self.room, left, cx)
                    {
                        *left = 0;
                    }
                    if *left == 0 {
                        sender.close();
                    }
                }
                if self.leftover.is_none() && self.passed.is_empty() {
                    pump(incoming, &mut self.to_app, cx);
                }
                let deadline = *deadline;
                let outcome = match conn.as_mut().poll(cx) {
                    Poll::Ready(Ok(())) => None,
                    Poll::Ready(Err(e)) => Some(SessionError::Lost(e)),
                    Poll::Pending if now >= deadline => {
                        Some(SessionError::CloseTimeout(self.close_timeout))
                    }
                    Poll::Pending => return self.wait_until(cx, deadline),
                };
                let Phase::Closing {
                    sender, incoming, ..
                } = std::mem::replace(&mut self.phase, Phase::Down)
                else {
                    return Step::Again;
                };
                let lost = sender.undelivered();
                self.leftover = incoming;
                self.shared.lock().live = None;
                match outcome {
                    Some(cause) => {
                        self.lost(match &cause {
                            SessionError::Lost(e) => e.clone(),
                            _ => Error::Closed,
                        });
                        self.error_and_down(cause, lost);
                    }
                    None => {
                        self.count_undelivered(lost);
                        self.publish(SessionState::Disconnected);
                    }
                }
                Step::Again
            }
        }
    }

    fn start_connect(&mut self, now: Instant) {
        self.attempt = self.attempt.saturating_add(1);
        self.publish(SessionState::Connecting {
            attempt: self.attempt,
        });
        let fut = (self.connector)();
        self.phase = Phase::Connecting {
            fut,
            deadline: self.connect_timeout.map(|d| now + d),
        };
    }

    fn start_setup(&mut self, io: T, now: Instant) {
        let (sender, incoming, conn) =
            self.config
                .build_shared(io, self.shared.protocol.clone(), (self.make_timer)());
        let link = Link {
            sender: sender.clone(),
            incoming,
            attempt: self.attempt,
            passed: VecDeque::new(),
        };
        let fut = (self.setup)(link);
        self.phase = Phase::Setup {
            conn: Box::pin(conn),
            sender,
            fut,
            deadline: self.setup_timeout.map(|d| now + d),
        };
    }

    fn go_live(&mut self, link: Link<P>, now: Instant) {
        let Phase::Setup { conn, sender, .. } = std::mem::replace(&mut self.phase, Phase::Down)
        else {
            return;
        };
        let Link {
            sender: link_sender,
            incoming,
            passed,
            ..
        } = link;
        drop(link_sender);
        self.passed.extend(passed);
        self.shared.lock().live = Some(sender.clone());
        self.attempt = 0;
        self.backoff.connected(now);
        self.room = None;
        self.phase = Phase::Live {
            conn,
            sender,
            incoming: Some(incoming),
        };
        self.publish(SessionState::Connected);
    }

    fn start_closing(
        &mut self,
        conn: Pin<Box<Connection<T, P, Tm>>>,
        sender: Sender<P>,
        incoming: Option<Incoming<P>>,
        drain: usize,
        now: Instant,
    ) {
        self.shared.lock().live = None;
        self.publish(SessionState::Disconnecting);
        if drain == 0 {
            sender.close();
        }
        self.room = None;
        self.phase = Phase::Closing {
            conn,
            sender,
            incoming,
            drain,
            deadline: now + self.close_timeout,
        };
    }

    /// Records why a connection ended, for requests that lost their reply.
    fn lost(&mut self, error: Error) {
        let mut inner = self.shared.lock();
        inner.live = None;
        inner.last_loss = Some(error);
    }

    fn count_undelivered(&self, n: usize) {
        if n > 0 {
            self.shared
                .undelivered
                .fetch_add(n as u64, Ordering::AcqRel);
        }
    }

    /// An attempt failed or the connection was lost: back off and retry,
    /// or stay down.
    fn failed(&mut self, cause: SessionError, undelivered: usize, now: Instant) {
        self.shared.lock().live = None;
        self.room = None;
        self.count_undelivered(undelivered);
        if self.want_up() {
            let wait = self.backoff.failed(now);
            self.publish(SessionState::Error {
                cause,
                retry_in: Some(wait),
                undelivered,
            });
            self.phase = Phase::Backoff { until: now + wait };
        } else {
            self.phase = Phase::Down;
            self.publish(SessionState::Error {
                cause,
                retry_in: None,
                undelivered,
            });
            self.publish(SessionState::Disconnected);
        }
    }

    fn error_and_down(&mut self, cause: SessionError, undelivered: usize) {
        self.count_undelivered(undelivered);
        self.phase = Phase::Down;
        self.publish(SessionState::Error {
            cause,
            retry_in: None,
            undelivered,
        });
        self.publish(SessionState::Disconnected);
    }

    /// Goes down from backoff or connecting (nothing to close).
    fn down(&mut self) {
        self.phase = Phase::Down;
        self.publish(SessionState::Disconnected);
    }

    /// Hands a lost connection's last messages, then what the setup step
    /// of the new one passed on, to the application, in that order.
    fn hand_over(&mut self, cx: &mut Context<'_>) {
        if self.leftover.is_some() {
            pump(&mut self.leftover, &mut self.to_app, cx);
            if self.leftover.is_some() {
                return;
            }
        }
        while !self.passed.is_empty() {
            let Some(tx) = &mut self.to_app else {
                self.passed.clear();
                break;
            };
            match tx.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if let Some(m) = self.passed.pop_front() {
                        let _ = tx.start_send(m);
                    }
                }
                Poll::Ready(Err(_)) => self.to_app = None,
                Poll::Pending => return,
            }
        }
    }

    /// The session is over: no handle is left, or the driver is dropped.
    fn end(&mut self) {
        self.phase = Phase::Ended;
        let buffer = {
            let mut inner = self.shared.lock();
            inner.ended = true;
            inner.live = None;
            std::mem::take(&mut inner.buffer)
        };
        let mut lost = 0;
        for entry in buffer {
            lost += 1;
            if let Some((_, reply)) = entry.request {
                let _ = reply.send(Err(Error::Closed));
            }
        }
        self.count_undelivered(lost);
        self.to_app = None;
        self.shared.watch.end();
    }
}

impl<T, P: Protocol, Tm> Drop for Driver<T, P, Tm> {
    fn drop(&mut self) {
        if matches!(self.phase, Phase::Ended) {
            return;
        }
        let buffer = {
            let mut inner = self.shared.lock();
            inner.ended = true;
            inner.live = None;
            std::mem::take(&mut inner.buffer)
        };
        let mut lost = buffer.len() as u64;
        for entry in buffer {
            if let Some((_, reply)) = entry.request {
                let _ = reply.send(Err(Error::Closed));
            }
        }
        // The connection (if any) is dropped with the phase: what it had
        // accepted is lost too.
        let sender = match &self.phase {
            Phase::Setup { sender, .. }
            | Phase::Live { sender, .. }
            | Phase::Closing { sender, .. } => Some(sender.clone()),
            _ => None,
        };
        self.phase = Phase::Ended;
        if let Some(sender) = sender {
            lost += sender.undelivered() as u64;
        }
        self.shared.undelivered.fetch_add(lost, Ordering::AcqRel);
        self.shared.watch.end();
    }
}

/// Moves buffered messages to the connection, in order, while its queue
/// has room, at most `left` of them. Ready(true) once the buffer is empty
/// or `left` is spent; Pending while waiting for room (or for the
/// connection's end, which its own poll reports).
fn drain<P: Protocol>(
    shared: &Shared<P>,
    sender: &Sender<P>,
    room: &mut Option<EventListener>,
    left: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<bool> {
    loop {
        if let Some(l) = room {
            if Pin::new(l).poll(cx).is_pending() {
                return Poll::Pending;
            }
            *room = None;
        }
        let mut inner = shared.lock();
        loop {
            if *left == 0 {
                return Poll::Ready(true);
            }
            let Some(entry) = inner.buffer.front_mut() else {
                return Poll::Ready(true);
            };
            if matches!(&entry.request, Some((_, reply)) if reply.is_canceled()) {
                // The request's future was dropped: nobody wants it sent.
                inner.buffer.pop_front();
                *left -= 1;
                continue;
            }
            let request = entry.request.take();
            let id = request.as_ref().map(|(id, _)| id.clone());
            match sender.try_push_entry(&entry.msg, request) {
                Ok(()) => {
                    inner.buffer.pop_front();
                    *left -= 1;
                }
                Err((error, back)) => {
                    entry.request = id.zip(back);
                    match error {
                        None => {
                            drop(inner);
                            *room = Some(sender.listen_room());
                            break; // try again once listening
                        }
                        Some(e) if e.is_fatal() => return Poll::Pending,
                        Some(e) => {
                            // Checked when buffered, so only a protocol whose
                            // encoding changed its mind gets here: fail it
                            // loudly, counted.
                            if let Some(entry) = inner.buffer.pop_front() {
                                match entry.request {
                                    Some((_, reply)) => {
                                        let _ = reply.send(Err(e));
                                    }
                                    None => {
                                        shared.undelivered.fetch_add(1, Ordering::AcqRel);
                                    }
                                }
                            }
                            *left -= 1;
                        }
                    }
                }
            }
        }
    }
}

/// Moves received messages from a connection to the application while it
/// has room, at most a budget's worth per call.
fn pump<P: Protocol>(
    incoming: &mut Option<Incoming<P>>,
    to_app: &mut Option<mpsc::Sender<P::Message>>,
    cx: &mut Context<'_>,
) {
    for _ in 0..BUDGET {
        let Some(rx) = incoming else { return };
        let Some(tx) = to_app else {
            // Nobody reads: let the connection discard.
            *incoming = None;
            return;
        };
        match tx.poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                *to_app = None;
                continue;
            }
            Poll::Pending => return,
        }
        match Pin::new(rx).poll_next(cx) {
            Poll::Ready(Some(Ok(m))) => {
                let _ = tx.start_send(m);
            }
            // The end (its reason is the connection's, reported by it).
            Poll::Ready(Some(Err(_)) | None) => *incoming = None,
            Poll::Pending => return,
        }
    }
    cx.waker().wake_by_ref();
}
