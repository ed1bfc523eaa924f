//! The reconnecting session: the backoff policy on its own (explicit
//! instants), whole sessions on virtual time against an in-memory "network"
//! whose server the test kills, restarts or black-holes, then real loopback
//! TCP on smol (a server restarted on the same port; 1,000 reconnects and
//! the fd count) and a session on tokio's paused clock.

mod common;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::session::no_setup;
use chatpipe::{
    Backoff, Builder, Desired, Error, Link, Session, SessionBuilder, SessionError, SessionIncoming,
    SessionSendError, SessionState,
};
use common::*;
use futures::future::{AbortHandle, Abortable};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use futures_io::{AsyncRead, AsyncWrite};

const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------
// The policy alone.
// ---------------------------------------------------------------------------

#[test]
fn backoff_sequence_and_jitter_bounds() {
    let t0 = Instant::now();
    let policy = Backoff::new()
        .initial(Duration::from_secs(1))
        .multiplier(2.0)
        .max(Duration::from_secs(30));
    let ceilings: Vec<_> = (0..9).map(|n| policy.ceiling(n).as_secs()).collect();
    assert_eq!(ceilings, [0, 1, 2, 4, 8, 16, 30, 30, 30]);
    assert_eq!(policy.ceiling(u32::MAX), Duration::from_secs(30));

    // Full jitter: each wait in [0, ceiling], spread over all of it.
    let mut per_failure: Vec<Vec<Duration>> = vec![Vec::new(); 8];
    for seed in 0..2_000u64 {
        let mut b = policy.clone().seed(seed);
        for (n, waits) in per_failure.iter_mut().enumerate() {
            let wait = b.failed(t0);
            assert_eq!(b.failures(), n as u32 + 1);
            assert!(wait <= b.ceiling(n as u32 + 1), "{wait:?} at failure {n}");
            waits.push(wait);
        }
    }
    for (n, waits) in per_failure.iter().enumerate() {
        let ceiling = policy.ceiling(n as u32 + 1).as_secs_f64();
        let mean = waits.iter().map(Duration::as_secs_f64).sum::<f64>() / waits.len() as f64;
        let lo = waits.iter().min().unwrap().as_secs_f64();
        let hi = waits.iter().max().unwrap().as_secs_f64();
        assert!(
            (mean / ceiling - 0.5).abs() < 0.05,
            "mean {mean} of {ceiling}"
        );
        assert!(
            lo < ceiling * 0.01 && hi > ceiling * 0.99,
            "{lo}..{hi} of {ceiling}"
        );
    }

    // The same seed gives the same waits; another seed others.
    let run = |seed| {
        let mut b = policy.clone().seed(seed);
        (0..6).map(|_| b.failed(t0)).collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    // Unseeded policies differ from each other.
    let a: Vec<_> = (0..6).map(|_| Backoff::new().failed(t0)).collect();
    let b: Vec<_> = (0..6).map(|_| Backoff::new().failed(t0)).collect();
    assert_ne!(a, b);
    // Degenerate settings stay sane.
    let mut flat = Backoff::new().multiplier(f64::NAN).initial(S).seed(1);
    assert!((0..50).all(|_| flat.failed(t0) <= S));
}

#[test]
fn backoff_resets_after_a_stable_period() {
    let t0 = Instant::now();
    let mut b = Backoff::new().reset_after(30 * S).seed(3);
    for _ in 0..4 {
        b.failed(t0);
    }
    assert_eq!(b.failures(), 4);
    // Up for 29 s: its loss is failure 5.
    b.connected(t0);
    b.failed(t0 + 29 * S);
    assert_eq!(b.failures(), 5);
    // Up for 30 s: its loss is failure 1 again, drawn from the first ceiling.
    b.connected(t0 + 40 * S);
    assert!(b.failed(t0 + 70 * S) <= S);
    assert_eq!(b.failures(), 1);
    b.reset();
    assert_eq!(b.failures(), 0);
}

// ---------------------------------------------------------------------------
// An in-memory network on the virtual clock.
// ---------------------------------------------------------------------------

type ClientIo = Counted<BlackHole<futures_compat::Io>>;

mod futures_compat {
    pub type Io = tokio_util::compat::Compat<tokio::io::DuplexStream>;
}

/// What the connector does next.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Up,
    Refuse,
    Hang,
}

/// A "network" with one server address: the connector asks it for a
/// stream, and the test decides whether it connects, is refused or hangs.
#[derive(Clone, Default)]
struct Net {
    inner: Arc<Mutex<NetInner>>,
    /// Client streams not yet dropped.
    streams: Arc<AtomicUsize>,
    /// Connect futures not yet dropped.
    connecting: Arc<AtomicUsize>,
}

#[derive(Default)]
struct NetInner {
    mode: Option<Mode>,
    attempts: usize,
    accepted: VecDeque<BlackHole<futures_compat::Io>>,
    cuts: Vec<Arc<AtomicBool>>,
    acceptor: Option<Waker>,
}

impl Net {
    fn new(mode: Mode) -> Net {
        let net = Net::default();
        net.set(mode);
        net
    }

    fn set(&self, mode: Mode) {
        self.inner.lock().unwrap().mode = Some(mode);
    }

    fn attempts(&self) -> usize {
        self.inner.lock().unwrap().attempts
    }

    /// Cuts every connection made so far: a black hole.
    fn cut_all(&self) {
        for c in &self.inner.lock().unwrap().cuts {
            c.store(true, Ordering::SeqCst);
        }
    }

    fn connector(
        &self,
    ) -> impl FnMut() -> Pin<Box<dyn Future<Output = io::Result<ClientIo>> + Send>> + Send + 'static
    {
        let net = self.clone();
        move || {
            let net = net.clone();
            let guard = Guard::new(&net.connecting);
            Box::pin(async move {
                let _guard = guard;
                let mode = {
                    let mut inner = net.inner.lock().unwrap();
                    inner.attempts += 1;
                    inner.mode.unwrap_or(Mode::Up)
                };
                match mode {
                    Mode::Refuse => Err(io::ErrorKind::ConnectionRefused.into()),
                    Mode::Hang => futures::future::pending().await,
                    Mode::Up => {
                        let (client, server, cut) = black_holed_pair(64 * 1024);
                        let mut inner = net.inner.lock().unwrap();
                        inner.accepted.push_back(server);
                        inner.cuts.push(cut);
                        if let Some(w) = inner.acceptor.take() {
                            w.wake();
                        }
                        Ok(Counted::new(client, &net.streams))
                    }
                }
            })
        }
    }

    fn accept(&self) -> impl Future<Output = BlackHole<futures_compat::Io>> + '_ {
        futures::future::poll_fn(move |cx| {
            let mut inner = self.inner.lock().unwrap();
            match inner.accepted.pop_front() {
                Some(io) => Poll::Ready(io),
                None => {
                    inner.acceptor = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
    }
}

/// Counts itself in a counter while it lives.
struct Guard(Arc<AtomicUsize>);

impl Guard {
    fn new(count: &Arc<AtomicUsize>) -> Guard {
        count.fetch_add(1, Ordering::SeqCst);
        Guard(count.clone())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream counted while it lives.
struct Counted<T> {
    inner: T,
    _guard: Guard,
}

impl<T> Counted<T> {
    fn new(inner: T, count: &Arc<AtomicUsize>) -> Self {
        Counted {
            inner,
            _guard: Guard::new(count),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// The server side, run by one task of the [`Sim`]: every connection
/// accepted gets a chatpipe connection that records what arrives and
/// echoes requests (while `answer` is set).
#[derive(Default)]
struct Server {
    /// Every message received, with the number of the connection (from 0).
    got: Vec<(usize, RawMessage)>,
    /// Each connection's sender and the handle that kills it.
    conns: Vec<(chatpipe::Sender<Raw>, AbortHandle)>,
    answer: bool,
    /// Closes each connection right after answering a request (a server
    /// that refuses a login, then hangs up).
    close_after_answer: bool,
    /// While set, the server reads nothing (and TCP-like backpressure
    /// builds up); cleared with [`resume`].
    paused: bool,
    resume: Vec<Waker>,
}

impl Server {
    /// The number each message received carries (`numbered`), in order.
    fn numbers(&self) -> Vec<u32> {
        self.got.iter().map(|(_, m)| number_of(m)).collect()
    }
}

fn pause(server: &Shared<Server>) {
    server.borrow_mut().paused = true;
}

fn resume(server: &Shared<Server>) {
    let mut s = server.borrow_mut();
    s.paused = false;
    s.resume.drain(..).for_each(Waker::wake);
}

type Shared<T> = Rc<RefCell<T>>;

fn start_server(sim: &Sim, net: &Net) -> Shared<Server> {
    let server: Shared<Server> = Rc::new(RefCell::new(Server {
        answer: true,
        ..Server::default()
    }));
    let timer = {
        let clock = sim.clock.clone();
        move || clock.timer()
    };
    let (net, srv) = (net.clone(), server.clone());
    sim.spawn(async move {
        let mut running = FuturesUnordered::<Pin<Box<dyn Future<Output = ()>>>>::new();
        loop {
            let io = if running.is_empty() {
                net.accept().await
            } else {
                let next = futures::future::select(Box::pin(net.accept()), running.next()).await;
                match next {
                    futures::future::Either::Left((io, _)) => io,
                    futures::future::Either::Right(_) => continue,
                }
            };
            let (tx, mut rx, conn) =
                Builder::new()
                    .receive_capacity(1)
                    .build_with_timer(io, Raw, timer());
            let (abort, reg) = AbortHandle::new_pair();
            let n = {
                let mut s = srv.borrow_mut();
                s.conns.push((tx.clone(), abort));
                s.conns.len() - 1
            };
            running.push(Box::pin(async move {
                let _ = Abortable::new(conn, reg).await;
            }));
            let srv = srv.clone();
            running.push(Box::pin(async move {
                loop {
                    futures::future::poll_fn(|cx| {
                        let mut s = srv.borrow_mut();
                        if s.paused {
                            s.resume.push(cx.waker().clone());
                            return Poll::Pending;
                        }
                        Poll::Ready(())
                    })
                    .await;
                    let Some(Ok(m)) = rx.next().await else { break };
                    if let RawMessage::Request { id, body } = &m {
                        if srv.borrow().answer {
                            let _ = tx.try_send(RawMessage::Response {
                                id: *id,
                                body: body.clone(),
                            });
                            if srv.borrow().close_after_answer {
                                tx.close();
                            }
                        }
                    }
                    srv.borrow_mut().got.push((n, m));
                }
            }));
        }
    })
    .detach();
    server
}

/// Kills every server connection: the client reads EOF.
fn kill_all(server: &Shared<Server>) {
    for (_, abort) in &server.borrow().conns {
        abort.abort();
    }
}

/// Every state with the virtual time it was published at.
fn record_states(sim: &Sim, session: &Session<Raw>) -> Shared<Vec<(Duration, SessionState)>> {
    let log: Shared<Vec<(Duration, SessionState)>> = Rc::default();
    let mut states = session.states();
    let (clock, start, out) = (sim.clock.clone(), sim.at(Duration::ZERO), log.clone());
    sim.spawn(async move {
        while let Some(s) = states.next().await {
            out.borrow_mut().push((clock.now() - start, s));
        }
    })
    .detach();
    log
}

/// Everything the session's incoming stream yields.
fn record_incoming(sim: &Sim, mut incoming: SessionIncoming<Raw>) -> Shared<Vec<RawMessage>> {
    let log: Shared<Vec<RawMessage>> = Rc::default();
    let out = log.clone();
    sim.spawn(async move {
        while let Some(m) = incoming.next().await {
            out.borrow_mut().push(m);
        }
    })
    .detach();
    log
}

/// A session on the sim's clock over `net`, with a fixed jitter seed.
fn session_with<S, SF>(
    sim: &Sim,
    net: &Net,
    settings: SessionBuilder,
    setup: S,
) -> (Session<Raw>, SessionIncoming<Raw>, Task<()>)
where
    S: FnMut(Link<Raw>) -> SF + Send + 'static,
    SF: Future<Output = Result<Link<Raw>, Error>> + Send + 'static,
{
    let clock = sim.clock.clone();
    let (session, incoming, driver) =
        settings.build_with_timer(Raw, net.connector(), setup, move || clock.timer());
    let task = sim.spawn(driver);
    (session, incoming, task)
}

fn settings() -> SessionBuilder {
    SessionBuilder::new().backoff(Backoff::new().seed(11))
}

/// The states' names, for compact assertions.
fn names(states: &[(Duration, SessionState)]) -> Vec<String> {
    states
        .iter()
        .map(|(_, s)| match s {
            SessionState::Connecting { attempt } => format!("connecting {attempt}"),
            SessionState::Connected => "connected".into(),
            SessionState::Error {
                cause,
                retry_in: Some(_),
                ..
            } => format!("error {} retry", cause_name(cause)),
            SessionState::Error { cause, .. } => format!("error {}", cause_name(cause)),
            SessionState::Disconnecting => "disconnecting".into(),
            SessionState::Disconnected => "disconnected".into(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn cause_name(cause: &SessionError) -> String {
    match cause {
        SessionError::Connect(_) => "connect".into(),
        SessionError::ConnectTimeout(_) => "connect-timeout".into(),
        SessionError::Setup(_) => "setup".into(),
        SessionError::SetupTimeout(_) => "setup-timeout".into(),
        SessionError::Lost(e) => format!("lost({e})"),
        SessionError::CloseTimeout(_) => "close-timeout".into(),
        other => format!("{other:?}"),
    }
}

fn payloads(got: &[(usize, RawMessage)]) -> Vec<(usize, String)> {
    got.iter()
        .map(|(n, m)| match m {
            RawMessage::Message(b) => (*n, String::from_utf8_lossy(b).into_owned()),
            other => (*n, format!("{other:?}")),
        })
        .collect()
}

fn texts(n: usize, items: &[&str]) -> Vec<(usize, String)> {
    items.iter().map(|s| (n, s.to_string())).collect()
}

// ---------------------------------------------------------------------------
// Sessions on virtual time.
// ---------------------------------------------------------------------------

/// A server that refuses: attempts follow the backoff exactly, each one
/// the drawn wait after the failure before it, the waits those of the
/// same policy (same seed) fed the same instants.
#[test]
fn retries_follow_the_backoff_on_the_virtual_clock() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Refuse);
    let (session, _incoming, _driver) = session_with(&sim, &net, settings(), no_setup);
    let states = record_states(&sim, &session);
    sim.run_to(300 * S);

    let states = states.borrow();
    let mut expected = Backoff::new().seed(11);
    let mut attempt = 0;
    let mut next_at = Duration::ZERO;
    // The first state is the one before the driver ran.
    assert!(matches!(states[0].1, SessionState::Disconnected));
    for pair in states[1..].chunks(2) {
        let [(t1, SessionState::Connecting { attempt: a }), (
            t2,
            SessionState::Error {
                cause: SessionError::Connect(e),
                retry_in: Some(wait),
                undelivered: 0,
            },
        )] = pair
        else {
            panic!("unexpected states: {pair:?}");
        };
        attempt += 1;
        assert_eq!(*a, attempt);
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(*t1, next_at, "attempt {attempt} not on time");
        assert_eq!(t2, t1);
        assert_eq!(*wait, expected.failed(sim.at(*t2)), "attempt {attempt}");
        assert!(*wait <= expected.ceiling(attempt));
        next_at = *t2 + *wait;
    }
    assert!(attempt >= 12, "only {attempt} attempts in 300 s");
    assert_eq!(net.attempts(), attempt as usize);
    assert_eq!(
        net.connecting.load(Ordering::SeqCst),
        0,
        "no connect future left behind"
    );
}

/// The failure count restarts after a connection that stayed up for
/// `reset_after`, and not after a shorter one.
#[test]
fn backoff_resets_after_a_stable_connection() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Refuse);
    let server = start_server(&sim, &net);
    let (session, _incoming, _driver) = session_with(&sim, &net, settings(), no_setup);
    let states = record_states(&sim, &session);

    // Five failures, then up; a server that drops it after 10 s; then down
    // again for five more failures; then up for 40 s, dropped again.
    sim.run_to(20 * S);
    net.set(Mode::Up);
    sim.run_to(60 * S);
    assert!(session.state().is_connected());
    net.set(Mode::Refuse);
    kill_all(&server);
    sim.run_to(200 * S);
    net.set(Mode::Up);
    sim.run_to(260 * S);
    assert!(session.state().is_connected());
    net.set(Mode::Refuse);
    kill_all(&server);
    sim.run_to(300 * S);

    // Replay the very events on a policy of the same seed: the session
    // must have drawn exactly these waits, resets included.
    let states = states.borrow();
    let mut replay = Backoff::new().seed(11);
    let mut failures_at_loss = Vec::new();
    for (t, s) in states.iter() {
        match s {
            SessionState::Connected => replay.connected(sim.at(*t)),
            SessionState::Error {
                cause,
                retry_in: Some(wait),
                ..
            } => {
                assert_eq!(*wait, replay.failed(sim.at(*t)), "at {t:?}");
                if let SessionError::Lost(_) = cause {
                    failures_at_loss.push(replay.failures());
                }
            }
            _ => {}
        }
    }
    // The first loss came after 40 s up (reset_after 30 s): failure 1. The
    // second came after a connection just as long: failure 1 again, though
    // many attempts had failed just before it.
    assert_eq!(failures_at_loss, [1, 1], "{:?}", names(&states));
    // And a connection up for less than reset_after continues the count.
    let mut short = Backoff::new().seed(11);
    let t0 = sim.at(Duration::ZERO);
    (0..5).for_each(|_| {
        short.failed(t0);
    });
    short.connected(t0);
    short.failed(t0 + 10 * S);
    assert_eq!(short.failures(), 6);
}

/// Desired state Disconnected during the wait between attempts: no
/// further attempt; back to Connected: an attempt at once.
#[test]
fn disconnect_during_backoff() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Refuse);
    let settings = settings().backoff(Backoff::new().initial(10 * S).max(10 * S).seed(2));
    let (session, _incoming, _driver) = session_with(&sim, &net, settings, no_setup);
    let states = record_states(&sim, &session);
    sim.run_to(NS);
    let Some((
        _,
        SessionState::Error {
            retry_in: Some(wait),
            ..
        },
    )) = states.borrow().last().cloned()
    else {
        panic!("{:?}", names(&states.borrow()));
    };
    assert!(wait > NS);
    session.disconnect();
    sim.run_to(100 * S);
    assert_eq!(net.attempts(), 1);
    assert_eq!(
        names(&states.borrow()),
        [
            "disconnected",
            "connecting 1",
            "error connect retry",
            "disconnected"
        ]
    );
    // A send now fails at once, the message handed back.
    match session.try_send(msg("late")) {
        Err(SessionSendError::Disconnected(m)) => assert_eq!(m, msg("late")),
        other => panic!("{other:?}"),
    }
    net.set(Mode::Up);
    session.connect();
    sim.run_to(100 * S + NS);
    let (t, last) = states.borrow().last().cloned().unwrap();
    assert!(last.is_connected() && t == 100 * S, "{last:?} at {t:?}");
    assert_eq!(net.attempts(), 2);
}

/// Desired state Disconnected while a connect hangs: the connect is
/// dropped at once, and nothing more happens.
#[test]
fn disconnect_during_connect() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Hang);
    let (session, _incoming, _driver) = session_with(&sim, &net, settings(), no_setup);
    let states = record_states(&sim, &session);
    sim.run_to(3 * S);
    assert_eq!(net.connecting.load(Ordering::SeqCst), 1);
    session.disconnect();
    sim.run_to(3 * S); // settles only
    assert_eq!(net.connecting.load(Ordering::SeqCst), 0, "connect dropped");
    sim.run_to(60 * S);
    assert_eq!(net.attempts(), 1);
    let states = states.borrow();
    assert_eq!(
        names(&states),
        ["disconnected", "connecting 1", "disconnected"]
    );
    assert_eq!(states[2].0, 3 * S);
}

/// A connect that hangs past the connect timeout is a failed attempt.
#[test]
fn a_hanging_connect_times_out() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Hang);
    let settings = settings().connect_timeout(Some(4 * S));
    let (session, _incoming, _driver) = session_with(&sim, &net, settings, no_setup);
    let states = record_states(&sim, &session);
    sim.run_to(4 * S);
    let states = states.borrow();
    assert_eq!(
        names(&states)[..3],
        [
            "disconnected",
            "connecting 1",
            "error connect-timeout retry"
        ]
    );
    assert_eq!(states[2].0, 4 * S);
    assert_eq!(net.connecting.load(Ordering::SeqCst), 0);
}

/// Desired state Disconnected during the setup step: the step is
/// abandoned, what it sent is written, the connection closes gracefully;
/// what was buffered stays buffered and goes out, once, after the setup
/// on the next connect.
#[test]
fn disconnect_during_setup() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let server = start_server(&sim, &net);
    let stall = Arc::new(AtomicBool::new(true));
    let setup = {
        let stall = stall.clone();
        move |link: Link<Raw>| {
            let stall = stall.load(Ordering::SeqCst);
            async move {
                link.sender.send(msg("hello")).await.map_err(|e| e.error)?;
                if stall {
                    futures::future::pending::<()>().await;
                }
                Ok(link)
            }
        }
    };
    let settings = settings().setup_timeout(None);
    let (session, _incoming, _driver) = session_with(&sim, &net, settings, setup);
    let states = record_states(&sim, &session);
    sim.run_to(S);
    session.try_send(msg("buffered")).unwrap();
    sim.run_to(2 * S);
    assert_eq!(session.buffered(), 1);
    session.disconnect();
    sim.run_to(3 * S);
    assert_eq!(
        names(&states.borrow()),
        [
            "disconnected",
            "connecting 1",
            "disconnecting",
            "disconnected"
        ]
    );
    assert_eq!(payloads(&server.borrow().got), texts(0, &["hello"]));
    assert_eq!(
        net.streams.load(Ordering::SeqCst),
        0,
        "the stream was closed"
    );
    assert_eq!(session.buffered(), 1);

    stall.store(false, Ordering::SeqCst);
    session.connect();
    sim.run_to(4 * S);
    assert!(session.state().is_connected());
    let got = payloads(&server.borrow().got);
    assert_eq!(got[1..], texts(1, &["hello", "buffered"]));
    assert_eq!(session.buffered(), 0);
}

/// Desired state Disconnected while connected, with messages waiting in
/// the buffer behind a full connection (a server that does not read):
/// once it reads again, all of them are written, then the connection
/// closes cleanly.
#[test]
fn disconnect_while_draining_writes_what_the_buffer_held() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Refuse);
    let server = start_server(&sim, &net);
    let settings = settings().connection(Builder::new().send_capacity(2));
    let (session, _incoming, _driver) = session_with(&sim, &net, settings, no_setup);
    let states = record_states(&sim, &session);
    sim.run_to(S);
    // 40 messages of 16 KiB wait: more than the pipe (64 KiB), the write
    // buffer (256 KiB) and the connection's queue hold together.
    for i in 0..40 {
        session.try_send(numbered_padded(i, 16 * 1024)).unwrap();
    }
    pause(&server);
    net.set(Mode::Up);
    // (Within the write timeout, 30 s, of the stalled connection.)
    sim.run_to(20 * S);
    assert!(session.state().is_connected());
    let waiting = session.buffered();
    assert!(
        waiting > 0,
        "the buffer drains only as the connection has room"
    );
    session.disconnect();
    sim.run_to(21 * S);
    assert!(matches!(session.state(), SessionState::Disconnecting));
    // Sent now: refused, the message back.
    assert!(matches!(
        session.try_send(numbered(99)),
        Err(SessionSendError::Disconnected(_))
    ));
    resume(&server);
    sim.run_to(22 * S);
    assert_eq!(
        names(&states.borrow())[states.borrow().len() - 2..],
        ["disconnecting", "disconnected"]
    );
    let numbers = server.borrow().numbers();
    assert_eq!(numbers, (0..40).collect::<Vec<_>>());
    assert_eq!(session.buffered(), 0);
    assert_eq!(session.undelivered(), 0);
    assert_eq!(net.streams.load(Ordering::SeqCst), 0);
}

/// Desired state Disconnected while connected, with the connection's
/// queue full: everything accepted is written, then the connection
/// closes cleanly; Connected again during the close: the session comes
/// back once the close is done.
#[test]
fn disconnect_while_connected_writes_what_was_accepted() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let server = start_server(&sim, &net);
    // A small connection queue, so some messages wait in the buffer.
    let settings = settings().connection(Builder::new().send_capacity(8));
    let (session, _incoming, _driver) = session_with(&sim, &net, settings, no_setup);
    let states = record_states(&sim, &session);
    sim.run_to(S);
    for i in 0..8 {
        session.try_send(numbered(i)).unwrap();
    }
    assert!(session.try_send(numbered(99)).unwrap_err().into_inner() == numbered(99));
    session.disconnect();
    sim.run_to(2 * S);
    assert_eq!(
        names(&states.borrow())[2..],
        ["connected", "disconnecting", "disconnected"]
    );
    let numbers = server.borrow().numbers();
    assert_eq!(numbers, (0..8).collect::<Vec<_>>());
    assert_eq!(net.streams.load(Ordering::SeqCst), 0);
    assert_eq!(session.undelivered(), 0);

    // Up again, then down and at once up again: the close completes, then
    // a new connection.
    session.connect();
    sim.run_to(3 * S);
    assert!(session.state().is_connected());
    session.disconnect();
    session.connect();
    sim.run_to(4 * S);
    assert!(session.state().is_connected());
    assert_eq!(net.attempts(), 2, "the flip back and forth changed nothing");
    session.disconnect();
    sim.settle();
    session.connect();
    sim.run_to(5 * S);
    assert!(session.state().is_connected());
    assert_eq!(net.attempts(), 3);
    assert_eq!(
        names(&states.borrow())[5..],
        [
            "connecting 1",
            "connected",
            "disconnecting",
            "disconnected",
            "connecting 1",
            "connected"
        ]
    );
}

/// A setup step that takes too long is a failed attempt.
#[test]
fn a_slow_setup_times_out() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let _server = start_server(&sim, &net);
    let setup = |link: Link<Raw>| async move {
        futures::future::pending::<()>().await;
        Ok(link)
    };
    let settings = settings().setup_timeout(Some(5 * S));
    let (session, _incoming, _driver) = session_with(&sim, &net, settings, setup);
    let states = record_states(&sim, &session);
    sim.run_to(5 * S);
    let states = states.borrow();
    assert_eq!(names(&states)[2], "error setup-timeout retry");
    assert_eq!(states[2].0, 5 * S);
}

/// The buffer holds `buffer_capacity` messages while down; past that,
/// and when disconnected, a send fails at once with the message back.
#[test]
fn the_buffer_is_bounded_and_hands_messages_back() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Refuse);
    let settings = settings().buffer_capacity(4);
    let (session, _incoming, _driver) = session_with(&sim, &net, settings, no_setup);
    sim.run_to(S);
    // A message that can never be sent fails now, not once connected.
    let huge = RawMessage::Message(vec![0; 70_000].into());
    match session.try_send(huge) {
        Err(SessionSendError::Failed(e)) => {
            assert!(matches!(e.error, Error::MessageTooLarge { .. }))
        }
        other => panic!("{other:?}"),
    }
    for i in 0..4 {
        session.try_send(numbered(i)).unwrap();
    }
    match session.try_send(numbered(4)) {
        Err(SessionSendError::Full(m)) => assert_eq!(m, numbered(4)),
        other => panic!("{other:?}"),
    }
    // `send` does not wait on a full buffer either.
    match ready(session.send(numbered(5))) {
        Err(SessionSendError::Full(m)) => assert_eq!(m, numbered(5)),
        other => panic!("{other:?}"),
    }
    // A request, too, fails at once.
    let e = ready(session.request(RawMessage::Request {
        id: 9,
        body: Bytes::new(),
    }))
    .unwrap_err();
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::WouldBlock);
    assert_eq!(session.buffered(), 4);
    session.disconnect();
    match session.try_send(numbered(6)) {
        Err(SessionSendError::Disconnected(m)) => assert_eq!(m, numbered(6)),
        other => panic!("{other:?}"),
    }
    // What waits can be taken back.
    assert_eq!(
        session.take_buffered(),
        (0..4).map(numbered).collect::<Vec<_>>()
    );
    assert_eq!(session.buffered(), 0);
}

/// Messages sent while down go out after the setup, in order, once;
/// messages sent while up go straight out; a loss in the middle loses
/// only what the lost connection had accepted, and says how many.
#[test]
fn buffered_messages_go_out_after_setup_in_order_exactly_once() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Refuse);
    let server = start_server(&sim, &net);
    let setup = |link: Link<Raw>| async move {
        link.sender.send(msg("login")).await.map_err(|e| e.error)?;
        Ok(link)
    };
    let settings = settings().connection(Builder::new().send_capacity(16));
    let (session, incoming, _driver) = session_with(&sim, &net, settings, setup);
    let states = record_states(&sim, &session);
    let received = record_incoming(&sim, incoming);

    // Down: 300 messages wait (more than one batch of the connection's queue).
    sim.run_to(5 * S);
    for i in 0..300 {
        session.try_send(numbered(i)).unwrap();
    }
    assert_eq!(session.buffered(), 300);
    net.set(Mode::Up);
    // While the buffer drains (16 at a time: the connection's queue),
    // later sends queue behind it.
    for i in 300..400 {
        session.try_send(numbered(i)).unwrap();
        sim.settle();
    }
    sim.run_to(40 * S);
    assert!(session.state().is_connected());
    // Connected, `send` waits for room in the connection's queue.
    let s = session.clone();
    let sending = sim.spawn(async move {
        for i in 400..500 {
            s.send(numbered(i)).await.unwrap();
        }
    });
    sim.run_to(41 * S);
    assert!(sending.is_finished());
    {
        let srv = server.borrow();
        let (first, rest) = srv.got.split_first().unwrap();
        assert_eq!(first, &(0, msg("login")));
        let numbers: Vec<u32> = rest.iter().map(|(_, m)| number_of(m)).collect();
        assert_eq!(numbers, (0..500).collect::<Vec<_>>());
    }
    // The server's messages arrive on the one stream.
    server.borrow().conns[0]
        .0
        .try_send(msg("from server"))
        .unwrap();
    sim.run_to(42 * S);
    assert_eq!(*received.borrow(), [msg("from server")]);

    // Loss: the server goes away; what is sent meanwhile waits, and goes
    // to the next connection after its login.
    kill_all(&server);
    net.set(Mode::Refuse);
    sim.run_to(43 * S);
    assert!(!session.state().is_connected());
    for i in 500..600 {
        session.try_send(numbered(i)).unwrap();
    }
    net.set(Mode::Up);
    sim.run_to(120 * S);
    assert!(session.state().is_connected());
    server.borrow().conns[1].0.try_send(msg("again")).unwrap();
    sim.run_to(121 * S);
    let srv = server.borrow();
    let second: Vec<_> = srv.got.iter().filter(|(n, _)| *n == 1).collect();
    assert_eq!(second[0].1, msg("login"));
    let numbers: Vec<u32> = second[1..].iter().map(|(_, m)| number_of(m)).collect();
    assert_eq!(numbers, (500..600).collect::<Vec<_>>());
    assert_eq!(*received.borrow(), [msg("from server"), msg("again")]);
    assert_eq!(session.undelivered(), 0);
    let lost = names(&states.borrow())
        .into_iter()
        .filter(|n| n.starts_with("error lost"))
        .count();
    assert_eq!(lost, 1);
}

/// The setup step makes requests (a login, say) on the new connection,
/// and hands what it read but is not its to the application, first.
#[test]
fn the_setup_step_makes_requests_and_passes_messages_on() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let server = start_server(&sim, &net);
    let logins: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let setup = {
        let logins = logins.clone();
        move |mut link: Link<Raw>| {
            let logins = logins.clone();
            async move {
                let answer = link.sender.call(Bytes::from("login ana")).await?;
                logins.lock().unwrap().push(answer);
                link.pass_on(msg("welcome back")).unwrap();
                Ok(link)
            }
        }
    };
    let (session, incoming, _driver) = session_with(&sim, &net, settings(), setup);
    let received = record_incoming(&sim, incoming);
    sim.run_to(S);
    assert!(session.state().is_connected());
    server.borrow().conns[0].0.try_send(msg("news")).unwrap();
    sim.run_to(2 * S);
    assert_eq!(*logins.lock().unwrap(), ["login ana"]);
    assert_eq!(*received.borrow(), [msg("welcome back"), msg("news")]);
    // Every reconnect logs in again.
    kill_all(&server);
    sim.run_to(10 * S);
    assert!(session.state().is_connected());
    assert_eq!(logins.lock().unwrap().len(), 2);
    assert_eq!(received.borrow().len(), 3);
}

/// The states read as lines for a user.
#[test]
fn states_display_as_lines_for_a_user() {
    let lost = SessionState::Error {
        cause: SessionError::Lost(Error::IdleTimeout(15 * S)),
        retry_in: Some(Duration::from_millis(1_234)),
        undelivered: 0,
    };
    assert_eq!(
        lost.to_string(),
        "idle timeout: nothing received for 15s; reconnecting in 1.2 s"
    );
    let refused = SessionState::Error {
        cause: SessionError::Connect(Arc::new(io::ErrorKind::ConnectionRefused.into())),
        retry_in: None,
        undelivered: 0,
    };
    assert_eq!(refused.to_string(), "cannot connect: connection refused");
    assert_eq!(
        SessionState::Connecting { attempt: 3 }.to_string(),
        "connecting (attempt 3)"
    );
    assert_eq!(SessionState::Connected.to_string(), "connected");
}

/// A setup step that fails is a failed attempt, retried with backoff;
/// the connections it failed on are closed.
#[test]
fn a_failed_setup_is_retried() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let server = start_server(&sim, &net);
    let setup = |link: Link<Raw>| async move {
        let attempt = link.attempt();
        link.sender
            .send(numbered(attempt))
            .await
            .map_err(|e| e.error)?;
        link.sender.flush().await?;
        if attempt < 3 {
            return Err(Error::Protocol(format!("login refused ({attempt})")));
        }
        Ok(link)
    };
    let (session, _incoming, _driver) = session_with(&sim, &net, settings(), setup);
    let states = record_states(&sim, &session);
    session.try_send(msg("after login")).unwrap();
    sim.run_to(30 * S);
    assert_eq!(
        names(&states.borrow()),
        [
            "disconnected",
            "connecting 1",
            "error setup retry",
            "connecting 2",
            "error setup retry",
            "connecting 3",
            "connected"
        ]
    );
    let SessionState::Error { cause, .. } = &states.borrow()[2].1 else {
        unreachable!()
    };
    assert_eq!(
        cause.to_string(),
        "setup failed: protocol violation: login refused (1)"
    );
    assert_eq!(net.attempts(), 3);
    assert_eq!(
        net.streams.load(Ordering::SeqCst),
        1,
        "failed attempts' streams closed"
    );
    let srv = server.borrow();
    let got: Vec<_> = srv.got.iter().map(|(n, m)| (*n, m.clone())).collect();
    assert_eq!(
        got,
        [
            (0, numbered(1)),
            (1, numbered(2)),
            (2, numbered(3)),
            (2, msg("after login"))
        ]
    );
}

/// A peer that answers the setup step's request, then closes at once (a
/// login refused): the failure reported is the setup step's, which says
/// why, not the close that came with it.
#[test]
fn a_refusal_then_a_close_reports_the_refusal() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let server = start_server(&sim, &net);
    server.borrow_mut().close_after_answer = true;
    let setup = |link: Link<Raw>| async move {
        let answer = link.sender.call(Bytes::from_static(b"login")).await?;
        Err::<Link<Raw>, _>(Error::Protocol(format!(
            "refused: {}",
            String::from_utf8_lossy(&answer)
        )))
    };
    let (session, _incoming, _driver) = session_with(&sim, &net, settings(), setup);
    let states = record_states(&sim, &session);
    sim.run_to(2 * S);
    let states = states.borrow();
    let SessionState::Error { cause, .. } = &states[2].1 else {
        panic!("{:?}", names(&states))
    };
    assert_eq!(
        cause.to_string(),
        "setup failed: protocol violation: refused: login"
    );
}

/// A peer behind a black hole (nothing arrives, nothing closes) is caught
/// by the idle timeout, and the session reconnects.
#[test]
fn a_black_holed_peer_triggers_a_reconnect() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let server = start_server(&sim, &net);
    let settings = settings().connection(
        Builder::new()
            .keepalive_interval(Some(5 * S))
            .idle_timeout(Some(15 * S)),
    );
    let (session, _incoming, _driver) = session_with(&sim, &net, settings, no_setup);
    let states = record_states(&sim, &session);
    sim.run_to(60 * S);
    assert!(session.state().is_connected(), "keepalives hold it up");
    net.cut_all();
    // The last keepalive arrived at 60 s: the idle timeout fires at 75 s.
    sim.run_to(75 * S - NS);
    assert!(session.state().is_connected());
    sim.run_to(90 * S);
    let states = states.borrow();
    let lost = states
        .iter()
        .position(|(_, s)| {
            matches!(
                s,
                SessionState::Error {
                    cause: SessionError::Lost(Error::IdleTimeout(_)),
                    ..
                }
            )
        })
        .expect("an idle timeout");
    assert_eq!(states[lost].0, 75 * S);
    assert!(matches!(states.last().unwrap().1, SessionState::Connected));
    assert_eq!(server.borrow().conns.len(), 2);
}

/// A request outstanding when its connection drops fails with the
/// reason; one made while down waits in the buffer and is answered on
/// the next connection.
#[test]
fn requests_fail_with_the_reason_on_a_drop_and_wait_while_down() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let server = start_server(&sim, &net);
    let (session, _incoming, _driver) = session_with(&sim, &net, settings(), no_setup);
    sim.run_to(S);
    assert!(session.state().is_connected());
    // Answered while up.
    let s = session.clone();
    let answer = sim.spawn(async move { s.call(Bytes::from("one")).await });
    sim.run_to(2 * S);
    assert_eq!(answer.output().unwrap(), "one");

    // Outstanding when the server goes away.
    server.borrow_mut().answer = false;
    let s = session.clone();
    let pending = sim.spawn(async move { s.call(Bytes::from("two")).await });
    sim.run_to(3 * S);
    assert!(!pending.is_finished());
    net.set(Mode::Refuse);
    kill_all(&server);
    sim.run_to(3 * S + NS);
    assert!(matches!(pending.output(), Err(Error::Closed)));

    // Made while down: waits, then goes out after the reconnect.
    server.borrow_mut().answer = true;
    let s = session.clone();
    let later = sim.spawn(async move { s.call(Bytes::from("three")).await });
    sim.run_to(4 * S);
    assert_eq!(session.buffered(), 1);
    // A cancelled one is not sent at all.
    let s = session.clone();
    sim.spawn(async move { s.call(Bytes::from("cancelled")).await })
        .abort();
    sim.run_to(5 * S);
    net.set(Mode::Up);
    sim.run_to(120 * S);
    assert_eq!(later.output().unwrap(), "three");
    let srv = server.borrow();
    let bodies: Vec<_> = srv
        .got
        .iter()
        .filter_map(|(n, m)| match m {
            RawMessage::Request { body, .. } => Some((*n, body.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        bodies,
        [(0, "one".into()), (0, "two".into()), (1, "three".into())]
    );
}

/// 1,000 reconnect cycles on virtual time: the session keeps one stream
/// and one connect at most, and every message sent along the way arrives
/// once.
#[test]
fn no_leaks_after_1000_reconnect_cycles_on_virtual_time() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let server = start_server(&sim, &net);
    let settings = settings().backoff(Backoff::new().initial(MS).max(MS).seed(5));
    let (session, incoming, driver) = session_with(&sim, &net, settings, no_setup);
    let received = record_incoming(&sim, incoming);
    let mut t = Duration::ZERO;
    for cycle in 0..1_000u32 {
        t += 10 * MS;
        sim.run_to(t);
        assert!(session.state().is_connected(), "cycle {cycle}");
        session.try_send(numbered(cycle)).unwrap();
        t += MS;
        sim.run_to(t); // on the wire before the server goes
        assert!(net.streams.load(Ordering::SeqCst) <= 1);
        kill_all(&server);
    }
    t += 10 * MS;
    sim.run_to(t);
    assert_eq!(server.borrow().conns.len(), 1_001);
    let numbers = server.borrow().numbers();
    assert_eq!(numbers, (0..1_000).collect::<Vec<_>>());
    assert_eq!(session.undelivered(), 0);
    drop(session);
    sim.run_to(t + S);
    assert!(driver.is_finished(), "the driver ends with its last handle");
    assert_eq!(net.streams.load(Ordering::SeqCst), 0);
    assert_eq!(net.connecting.load(Ordering::SeqCst), 0);
    assert!(received.borrow().is_empty());
}

/// Dropping every handle closes gracefully (what was accepted is written)
/// and ends the driver, the incoming stream and the state stream.
#[test]
fn dropping_every_handle_closes_gracefully_and_ends_everything() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Up);
    let server = start_server(&sim, &net);
    let (session, incoming, driver) = session_with(&sim, &net, settings(), no_setup);
    let states = record_states(&sim, &session);
    let mut incoming = incoming;
    sim.run_to(S);
    for i in 0..50 {
        session.try_send(numbered(i)).unwrap();
    }
    let clone = session.clone();
    drop(session);
    sim.run_to(2 * S);
    assert!(!driver.is_finished(), "a clone keeps it");
    drop(clone);
    sim.run_to(3 * S);
    assert!(driver.is_finished());
    assert_eq!(server.borrow().got.len(), 50);
    assert_eq!(
        names(&states.borrow())[2..],
        ["connected", "disconnecting", "disconnected"]
    );
    assert_eq!(ready(incoming.next()), None);
    assert_eq!(net.streams.load(Ordering::SeqCst), 0);
}

/// Dropping the driver ends the session at once: buffered requests fail,
/// sends fail, buffered messages are counted as undelivered.
#[test]
fn dropping_the_driver_fails_what_waits() {
    let mut sim = Sim::new();
    let net = Net::new(Mode::Refuse);
    let (session, _incoming, driver) = session_with(&sim, &net, settings(), no_setup);
    sim.run_to(S);
    session.try_send(msg("waits")).unwrap();
    let s = session.clone();
    let request = sim.spawn(async move { s.call(Bytes::from("q")).await });
    sim.run_to(2 * S);
    driver.abort();
    sim.run_to(3 * S);
    assert!(matches!(request.output(), Err(Error::Closed)));
    assert!(matches!(
        session.try_send(msg("x")),
        Err(SessionSendError::Disconnected(_))
    ));
    assert_eq!(session.undelivered(), 2);
    let mut states = session.states();
    assert!(ready(states.next()).is_some());
    assert!(ready(states.next()).is_none());
}

// ---------------------------------------------------------------------------
// Real loopback TCP, on smol.
// ---------------------------------------------------------------------------

/// Held by every test that opens descriptors (sockets, a tokio runtime),
/// so the fd count of the leak test sees no other test's.
static FDS: Mutex<()> = Mutex::new(());

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// An echo server on `listener`: it answers each message with the same.
async fn echo_server(listener: smol::net::TcpListener) {
    let mut tasks = Vec::new();
    while let Ok((io, _)) = listener.accept().await {
        let (tx, mut rx, conn) = Builder::new().build(io, Raw);
        tasks.push(smol::spawn(async move {
            let serve = async move {
                while let Some(Ok(m)) = rx.next().await {
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
            };
            let _ = futures::join!(conn, serve);
        }));
    }
}

async fn wait_for(
    states: &mut chatpipe::SessionStates,
    f: impl Fn(&SessionState) -> bool,
) -> SessionState {
    within(60, async {
        loop {
            let s = states.next().await.expect("the session ended");
            if f(&s) {
                return s;
            }
        }
    })
    .await
}

/// The server is killed and restarted on the same port: the session
/// comes back by itself, at the default backoff, and carries on.
#[test]
fn comes_back_after_a_server_restart_on_the_same_port() {
    let _fds = FDS.lock().unwrap_or_else(|e| e.into_inner());
    smol::block_on(async {
        // A port the restarted server finds free again.
        let port = restartable_port();
        let listener = smol::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = smol::spawn(echo_server(listener));
        let (session, mut incoming, driver) =
            SessionBuilder::new().build(Raw, move || smol::net::TcpStream::connect(addr), no_setup);
        let driver = smol::spawn(driver);
        let mut states = session.states();
        wait_for(&mut states, SessionState::is_connected).await;
        session.send(msg("before")).await.unwrap();
        assert_eq!(within(10, incoming.next()).await, Some(msg("before")));

        // Kill the server: its listener and every connection.
        let _ = server.cancel().await;
        let lost = wait_for(&mut states, |s| matches!(s, SessionState::Error { .. })).await;
        eprintln!("* {lost}");
        // Sent while it is away: buffered.
        session.send(msg("during")).await.unwrap();
        smol::Timer::after(Duration::from_millis(300)).await;

        let listener = smol::net::TcpListener::bind(addr).await.unwrap();
        let back = Instant::now();
        let _server = smol::spawn(echo_server(listener));
        wait_for(&mut states, SessionState::is_connected).await;
        let took = back.elapsed();
        eprintln!("reconnected {took:?} after the listener was back (default backoff)");
        // Failures so far at most a few: the wait was at most 2^k s.
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert_eq!(within(10, incoming.next()).await, Some(msg("during")));
        session.send(msg("after")).await.unwrap();
        assert_eq!(within(10, incoming.next()).await, Some(msg("after")));
        drop(session);
        within(10, driver).await;
    });
}

/// 1,000 cycles of connect, setup and loss over loopback TCP: no file
/// descriptor is left behind.
#[test]
fn no_fd_leaks_after_1000_reconnect_cycles_over_loopback() {
    let _fds = FDS.lock().unwrap_or_else(|e| e.into_inner());
    smol::block_on(async {
        let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and closes each connection at once: a loss per cycle.
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let server = smol::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(io);
            }
        });
        // Warm-up: the runtime's own descriptors exist before counting.
        let (s, _i, d) =
            SessionBuilder::new().build(Raw, move || smol::net::TcpStream::connect(addr), no_setup);
        let d = smol::spawn(d);
        within(10, async {
            while accepted.load(Ordering::SeqCst) < 1 {
                smol::Timer::after(MS).await;
            }
        })
        .await;
        drop(s);
        within(10, d).await;
        let before = fds();

        let cycles = Arc::new(AtomicUsize::new(0));
        let counter = cycles.clone();
        let setup = move |link: Link<Raw>| {
            counter.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<_, Error>(link))
        };
        let settings = SessionBuilder::new()
            .backoff(Backoff::new().initial(Duration::ZERO).max(Duration::ZERO));
        let (session, _incoming, driver) =
            settings.build(Raw, move || smol::net::TcpStream::connect(addr), setup);
        let mut states = session.states();
        let driver = smol::spawn(driver);
        within(120, async {
            let mut losses = 0;
            while losses < 1_000 {
                if let Some(SessionState::Error {
                    cause: SessionError::Lost(_),
                    ..
                }) = states.next().await
                {
                    losses += 1;
                }
            }
        })
        .await;
        session.disconnect();
        wait_for(&mut states, |s| matches!(s, SessionState::Disconnected)).await;
        drop(session);
        within(10, driver).await;
        assert!(cycles.load(Ordering::SeqCst) >= 1_000);
        // Sockets close asynchronously in the reactor: give them a moment.
        let mut after = fds();
        for _ in 0..100 {
            if after <= before {
                break;
            }
            smol::Timer::after(10 * MS).await;
            after = fds();
        }
        eprintln!(
            "fds before {before}, after {} cycles {after}",
            cycles.load(Ordering::SeqCst)
        );
        assert!(after <= before, "fds before {before}, after {after}");
        drop(server);
    });
}

// ---------------------------------------------------------------------------
// Tokio, on its paused clock.
// ---------------------------------------------------------------------------

async fn tokio_until(
    states: &mut chatpipe::SessionStates,
    f: fn(&SessionState) -> bool,
) -> SessionState {
    let fut = async move {
        loop {
            let s = states.next().await.expect("the session ended");
            if f(&s) {
                return s;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(600), fut)
        .await
        .expect("state not reached")
}

#[test]
fn on_tokio_a_lost_connection_comes_back_with_the_buffer() {
    let _fds = FDS.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(tokio_reconnects());
}

async fn tokio_reconnects() {
    let streams: Arc<Mutex<VecDeque<tokio::io::DuplexStream>>> = Arc::default();
    let up = Arc::new(AtomicBool::new(true));
    let connector = {
        let (streams, up) = (streams.clone(), up.clone());
        move || {
            let (streams, up) = (streams.clone(), up.clone());
            async move {
                if !up.load(Ordering::SeqCst) {
                    return Err(io::ErrorKind::ConnectionRefused.into());
                }
                let (a, b) = tokio::io::duplex(64 * 1024);
                streams.lock().unwrap().push_back(b);
                Ok(a)
            }
        }
    };
    let setup = |link: Link<Raw>| async move {
        link.sender.send(msg("hi")).await.map_err(|e| e.error)?;
        Ok::<_, Error>(link)
    };
    let (session, _incoming, driver) = SessionBuilder::new()
        .backoff(Backoff::new().seed(1))
        .build_tokio(Raw, connector, setup);
    let driver = tokio::spawn(driver);
    let mut states = session.states();
    tokio_until(&mut states, SessionState::is_connected).await;
    let first = streams.lock().unwrap().pop_front().unwrap();
    let (_tx, mut rx, conn) = Builder::new().build_tokio(first, Raw);
    let conn = tokio::spawn(conn);
    assert_eq!(rx.next().await.unwrap().unwrap(), msg("hi"));

    // The server goes away for a while; what is sent meanwhile waits.
    up.store(false, Ordering::SeqCst);
    conn.abort();
    tokio_until(&mut states, |s| matches!(s, SessionState::Error { .. })).await;
    for i in 0..10 {
        session.send(numbered(i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    up.store(true, Ordering::SeqCst);
    tokio_until(&mut states, SessionState::is_connected).await;
    let second = streams.lock().unwrap().pop_back().unwrap();
    let (_tx, rx, conn) = Builder::new().build_tokio(second, Raw);
    tokio::spawn(conn);
    let got: Vec<_> = rx.take(11).map(Result::unwrap).collect().await;
    let mut expected = vec![msg("hi")];
    expected.extend((0..10).map(numbered));
    assert_eq!(got, expected);
    session.set_desired(Desired::Disconnected);
    drop(session);
    tokio::time::timeout(Duration::from_secs(60), driver)
        .await
        .unwrap()
        .unwrap();
}
