//! Request/response: the outstanding-request table seen from outside.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::{Builder, Error, Incoming, Sender};
use common::*;
use futures::StreamExt;

const MS: Duration = Duration::from_millis(1);

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

/// A client connection and the server side's handles, both drivers spawned.
async fn pair(
    b: Builder,
) -> (
    Sender<Raw>,
    smol::Task<Result<(), Error>>,
    Sender<Raw>,
    Incoming<Raw>,
) {
    let (a, s) = tcp_pair().await;
    let (client, _crx, cconn) = b.build(a, Raw);
    let (server, srx, sconn) = b.build(s, Raw);
    smol::spawn(sconn).detach();
    (client, smol::spawn(cconn), server, srx)
}

#[test]
fn a_request_resolves_with_the_response_carrying_its_id() {
    smol::block_on(within(10, async {
        let (client, _c, server, mut srx) = pair(Builder::new()).await;
        // Answer out of order: ids, not order, correlate.
        smol::spawn(async move {
            let a = srx.next().await.unwrap().unwrap();
            let b = srx.next().await.unwrap().unwrap();
            for m in [b, a] {
                if let RawMessage::Request { id, body } = m {
                    server
                        .send(RawMessage::Response { id, body })
                        .await
                        .unwrap();
                }
            }
            srx
        })
        .detach();
        let (r1, r2) = futures::join!(client.request(req(1, "one")), client.request(req(2, "two")));
        assert_eq!(r1.unwrap(), resp(1, "one"));
        assert_eq!(r2.unwrap(), resp(2, "two"));
    }));
}

#[test]
fn an_error_response_is_delivered_as_the_response() {
    smol::block_on(within(10, async {
        let (client, _c, server, mut srx) = pair(Builder::new()).await;
        smol::spawn(async move {
            while let Some(Ok(RawMessage::Request { id, .. })) = srx.next().await {
                server.send(resp(id, "error: refused")).await.unwrap();
            }
        })
        .detach();
        assert_eq!(
            client.request(req(5, "x")).await.unwrap(),
            resp(5, "error: refused")
        );
    }));
}

#[test]
fn a_request_with_no_response_times_out_and_a_late_response_is_ignored() {
    smol::block_on(within(10, async {
        let b = Builder::new().request_timeout(50 * MS);
        let (client, conn, server, mut srx) = pair(b).await;
        let start = Instant::now();
        let err = client.request(req(1, "slow")).await.unwrap_err();
        assert!(
            matches!(err, Error::RequestTimeout(d) if d == 50 * MS),
            "{err}"
        );
        assert!(start.elapsed() >= 50 * MS && start.elapsed() < 1000 * MS);
        // The server answers too late: ignored, the connection lives on.
        assert_eq!(srx.next().await.unwrap().unwrap(), req(1, "slow"));
        server.send(resp(1, "too late")).await.unwrap();
        smol::spawn(async move {
            while let Some(Ok(RawMessage::Request { id, body })) = srx.next().await {
                server
                    .send(RawMessage::Response { id, body })
                    .await
                    .unwrap();
            }
        })
        .detach();
        assert_eq!(
            client.request(req(2, "again")).await.unwrap(),
            resp(2, "again")
        );
        assert!(!conn.is_finished());
    }));
}

/// Runs the driver for `dur` (it must not end meanwhile).
async fn drive<F: std::future::Future<Output = Result<(), Error>> + Unpin>(
    conn: &mut F,
    dur: Duration,
) {
    let ended = smol::future::or(async { Some(conn.await) }, async {
        smol::Timer::after(dur).await;
        None
    })
    .await;
    assert!(ended.is_none(), "the connection ended: {ended:?}");
}

#[test]
fn a_dropped_request_leaves_the_table_and_its_late_response_is_ignored() {
    smol::block_on(within(10, async {
        let (a, s) = tcp_pair().await;
        let (client, _crx, mut conn) = Builder::new().build(a, Raw);
        let (server, mut srx, sconn) = Builder::new().build(s, Raw);
        smol::spawn(sconn).detach();
        // Start a request, then give up on it while the driver runs.
        let gave_up = smol::future::or(
            async { Some(client.request(req(9, "never mind")).await) },
            async {
                drive(&mut conn, 30 * MS).await;
                None
            },
        )
        .await;
        assert!(gave_up.is_none());
        drive(&mut conn, 10 * MS).await;
        assert_eq!(
            conn.outstanding_requests(),
            0,
            "dropping took the entry out"
        );

        assert_eq!(srx.next().await.unwrap().unwrap(), req(9, "never mind"));
        server.send(resp(9, "late")).await.unwrap();
        drive(&mut conn, 50 * MS).await;
        assert_eq!(conn.outstanding_requests(), 0);
    }));
}

#[test]
fn closing_fails_every_outstanding_request_with_the_reason() {
    smol::block_on(within(10, async {
        let (client, conn, server, mut srx) = pair(Builder::new()).await;
        let pending: Vec<_> = (0..10)
            .map(|id| {
                let c = client.clone();
                smol::spawn(async move { c.request(req(id, "?")).await })
            })
            .collect();
        for _ in 0..10 {
            srx.next().await.unwrap().unwrap();
        }
        // The server goes away without answering.
        server.close();
        for p in pending {
            assert!(matches!(p.await, Err(Error::Closed)));
        }
        conn.await.unwrap();
        assert!(matches!(
            client.request(req(11, "?")).await,
            Err(Error::Closed)
        ));
    }));
}

#[test]
fn a_response_to_an_id_never_issued_closes_the_connection() {
    smol::block_on(within(10, async {
        let (client, conn, server, _srx) = pair(Builder::new()).await;
        let waiting = smol::spawn({
            let c = client.clone();
            async move { c.request(req(1, "?")).await }
        });
        smol::Timer::after(20 * MS).await;
        server.send(resp(777, "unsolicited")).await.unwrap();
        let err = conn.await.unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ref s) if s.contains("777")),
            "{err}"
        );
        // The outstanding request fails with the same reason.
        assert_eq!(waiting.await.unwrap_err().to_string(), err.to_string());
    }));
}

#[test]
fn invalid_requests_are_refused() {
    smol::block_on(within(10, async {
        let (client, _conn, _server, mut srx) = pair(Builder::new()).await;
        assert!(matches!(
            client.request(msg("not a request")).await,
            Err(Error::InvalidRequest(_))
        ));
        let first = smol::spawn({
            let c = client.clone();
            async move { c.request(req(3, "first")).await }
        });
        assert_eq!(srx.next().await.unwrap().unwrap(), req(3, "first"));
        let dup = client.request(req(3, "duplicate")).await;
        assert!(matches!(dup, Err(Error::InvalidRequest(_))), "{dup:?}");
        drop(first);
    }));
}
