//! Request/response: the outstanding-request table seen from outside, on
//! in-memory streams and virtual time.

mod common;

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::{Builder, Error, Incoming, Sender};
use common::*;
use futures::{FutureExt, StreamExt};

fn req(id: u64, body: &str) -> RawMessage {
    RawMessage::Request {
        id,
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

fn resp(id: u64, body: &str) -> RawMessage {
    RawMessage::Response {
        id,
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

/// The client's sender and driver, the server's sender and incoming.
type Pair = (
    Sender<Raw>,
    Task<Result<(), Error>>,
    Sender<Raw>,
    Incoming<Raw>,
);

/// A client connection and the server side's handles, both drivers
/// spawned.
fn pair(sim: &Sim, b: Builder) -> Pair {
    let (a, s) = duplex_pair(64 * 1024);
    let (client, _crx, cconn) = b.build_with_timer(a, Raw, sim.timer());
    let (server, srx, sconn) = b.build_with_timer(s, Raw, sim.timer());
    sim.spawn(sconn).detach();
    (client, sim.spawn(cconn), server, srx)
}

/// A server that answers every request with its own body.
fn echo(sim: &Sim, server: Sender<Raw>, mut srx: Incoming<Raw>) {
    sim.spawn(async move {
        while let Some(Ok(RawMessage::Request { id, body })) = srx.next().await {
            server
                .send(RawMessage::Response { id, body })
                .await
                .unwrap();
        }
    })
    .detach();
}

#[test]
fn a_request_resolves_with_the_response_carrying_its_id() {
    let mut sim = Sim::new();
    let (client, _c, server, mut srx) = pair(&sim, Builder::new());
    // Answer out of order: ids, not order, correlate.
    let answered = sim.spawn(async move {
        let a = srx.next().await.unwrap().unwrap();
        let b = srx.next().await.unwrap().unwrap();
        for m in [b, a] {
            let RawMessage::Request { id, body } = m else {
                panic!("not a request: {m:?}");
            };
            server
                .send(RawMessage::Response { id, body })
                .await
                .unwrap();
        }
        srx
    });
    let both = sim.spawn(async move {
        futures::join!(client.request(req(1, "one")), client.request(req(2, "two")))
    });
    sim.settle();
    assert!(answered.is_finished());
    let (r1, r2) = both.output();
    assert_eq!(r1.unwrap(), resp(1, "one"));
    assert_eq!(r2.unwrap(), resp(2, "two"));
}

#[test]
fn an_error_response_is_delivered_as_the_response() {
    let mut sim = Sim::new();
    let (client, _c, server, mut srx) = pair(&sim, Builder::new());
    sim.spawn(async move {
        while let Some(Ok(RawMessage::Request { id, .. })) = srx.next().await {
            server.send(resp(id, "error: refused")).await.unwrap();
        }
    })
    .detach();
    let answer = sim.spawn(async move { client.request(req(5, "x")).await });
    sim.settle();
    assert_eq!(answer.output().unwrap(), resp(5, "error: refused"));
}

#[test]
fn a_request_with_no_response_times_out_and_a_late_response_is_ignored() {
    let mut sim = Sim::new();
    let b = Builder::new().request_timeout(10 * S);
    let (client, conn, server, mut srx) = pair(&sim, b);
    sim.run_to(2 * S);
    let slow = sim.spawn({
        let client = client.clone();
        async move { client.request(req(1, "slow")).await }
    });
    sim.settle();
    assert_eq!(ready(srx.next()).unwrap().unwrap(), req(1, "slow"));
    // Sent at 2 s: waiting until 12 s...
    sim.run_to(12 * S - NS);
    assert!(!slow.is_finished());
    // ...and failed at 12 s exactly.
    sim.run_to(12 * S);
    let err = slow.output().unwrap_err();
    assert!(
        matches!(err, Error::RequestTimeout(d) if d == 10 * S),
        "{err}"
    );

    // The server answers too late: ignored, the connection lives on.
    ready(server.send(resp(1, "too late"))).unwrap();
    sim.run_to(13 * S);
    assert!(!conn.is_finished());
    assert_eq!(client.stats().bytes_in, server.stats().bytes_out);
    echo(&sim, server, srx);
    let again = sim.spawn({
        let client = client.clone();
        async move { client.request(req(2, "again")).await }
    });
    sim.settle();
    assert_eq!(again.output().unwrap(), resp(2, "again"));
    assert!(!conn.is_finished());
}

/// Spawns `fut`, keeping it reachable from the test between settles.
fn spawn_shared<F>(sim: &Sim, fut: F) -> (Rc<RefCell<F>>, Task<F::Output>)
where
    F: Future + Unpin + 'static,
{
    let shared = Rc::new(RefCell::new(fut));
    let task = sim.spawn({
        let shared = shared.clone();
        futures::future::poll_fn(move |cx| shared.borrow_mut().poll_unpin(cx))
    });
    (shared, task)
}

#[test]
fn a_dropped_request_leaves_the_table_and_its_late_response_is_ignored() {
    let mut sim = Sim::new();
    let (a, s) = duplex_pair(64 * 1024);
    let (client, _crx, conn) = Builder::new().build_with_timer(a, Raw, sim.timer());
    let (server, mut srx, sconn) = Builder::new().build_with_timer(s, Raw, sim.timer());
    sim.spawn(sconn).detach();
    let (conn, conn_task) = spawn_shared(&sim, conn);

    // Start a request, then give up on it while the driver runs.
    let request = sim.spawn({
        let client = client.clone();
        async move { client.request(req(9, "never mind")).await }
    });
    sim.settle();
    assert_eq!(conn.borrow().outstanding_requests(), 1);
    request.abort();
    sim.settle();
    assert_eq!(
        conn.borrow().outstanding_requests(),
        0,
        "dropping took the entry out"
    );

    assert_eq!(ready(srx.next()).unwrap().unwrap(), req(9, "never mind"));
    ready(server.send(resp(9, "late"))).unwrap();
    // Past the request's timeout (30 s) too: nothing more happens to it.
    sim.run_to(40 * S);
    assert!(!conn_task.is_finished(), "the late response closed it");
    assert_eq!(conn.borrow().outstanding_requests(), 0);
    // It did arrive: the client read all the server wrote.
    assert_eq!(server.stats().messages_out, 1);
    assert_eq!(client.stats().bytes_in, server.stats().bytes_out);
}

#[test]
fn closing_fails_every_outstanding_request_with_the_reason() {
    let mut sim = Sim::new();
    let (client, conn, server, mut srx) = pair(&sim, Builder::new());
    let pending: Vec<_> = (0..10)
        .map(|id| {
            let c = client.clone();
            sim.spawn(async move { c.request(req(id, "?")).await })
        })
        .collect();
    sim.settle();
    for id in 0..10 {
        assert_eq!(ready(srx.next()).unwrap().unwrap(), req(id, "?"));
    }
    assert!(pending.iter().all(|p| !p.is_finished()));
    // The server goes away without answering.
    server.close();
    sim.settle();
    for p in pending {
        assert!(matches!(p.output(), Err(Error::Closed)));
    }
    conn.output().unwrap();
    assert!(matches!(
        ready(client.request(req(11, "?"))),
        Err(Error::Closed)
    ));
}

#[test]
fn a_response_to_an_id_never_issued_closes_the_connection() {
    let mut sim = Sim::new();
    let (client, conn, server, mut srx) = pair(&sim, Builder::new());
    let waiting = sim.spawn({
        let c = client.clone();
        async move { c.request(req(1, "?")).await }
    });
    sim.settle();
    assert_eq!(ready(srx.next()).unwrap().unwrap(), req(1, "?"));
    ready(server.send(resp(777, "unsolicited"))).unwrap();
    sim.settle();
    let err = conn.output().unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ref s) if s.contains("777")),
        "{err}"
    );
    // The outstanding request fails with the same reason.
    assert_eq!(waiting.output().unwrap_err().to_string(), err.to_string());
}

#[test]
fn invalid_requests_are_refused() {
    let mut sim = Sim::new();
    let (client, conn, _server, mut srx) = pair(&sim, Builder::new());
    assert!(matches!(
        ready(client.request(msg("not a request"))),
        Err(Error::InvalidRequest(_))
    ));
    let first = sim.spawn({
        let c = client.clone();
        async move { c.request(req(3, "first")).await }
    });
    sim.settle();
    assert_eq!(ready(srx.next()).unwrap().unwrap(), req(3, "first"));
    let dup = sim.spawn(async move { client.request(req(3, "duplicate")).await });
    sim.settle();
    let dup = dup.output();
    assert!(matches!(dup, Err(Error::InvalidRequest(_))), "{dup:?}");
    // The first is still waiting, and nothing more was sent.
    assert!(!first.is_finished());
    assert!(srx.next().now_or_never().is_none());
    assert!(!conn.is_finished());
}
