//! Keepalives and the idle timeout, on real sockets with short intervals.
//! (The deadline logic itself is tested on a virtual clock in `state.rs`.)

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chatpipe::raw::Raw;
use chatpipe::{Builder, Error};
use common::*;
use futures::{AsyncReadExt, StreamExt};
use smol::net::{TcpListener, TcpStream};

const MS: Duration = Duration::from_millis(1);

/// Reads raw frames from `peer` for `dur`, returning their payloads.
async fn frames_for(peer: &mut TcpStream, dur: Duration) -> Vec<Vec<u8>> {
    let mut wire = Vec::new();
    let deadline = Instant::now() + dur;
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let read = smol::future::or(async { Some(peer.read(&mut buf).await.unwrap()) }, async {
            smol::Timer::after(left).await;
            None
        });
        match read.await {
            Some(0) | None => break,
            Some(n) => wire.extend_from_slice(&buf[..n]),
        }
    }
    let mut out = Vec::new();
    let mut rest = &wire[..];
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(payload) = rest.get(4..4 + len) else {
            panic!("a frame cut at the window's end: {rest:?}");
        };
        out.push(payload.to_vec());
        rest = &rest[4 + len..];
    }
    out
}

#[test]
fn a_keepalive_goes_out_after_silence_and_none_while_traffic_flows() {
    smol::block_on(within(10, async {
        let (a, mut peer) = tcp_pair().await;
        let (tx, _rx, conn) = Builder::new()
            .keepalive_interval(Some(100 * MS))
            .idle_timeout(None)
            .build(a, Raw);
        smol::spawn(conn).detach();

        // Traffic every 10 ms for 400 ms: no keepalive among it.
        let sending = smol::spawn(async move {
            for _ in 0..40 {
                tx.send(msg("t")).await.unwrap();
                smol::Timer::after(10 * MS).await;
            }
            tx
        });
        let mut busy = frames_for(&mut peer, 400 * MS).await;
        let _tx = sending.await;
        // The last messages may still be in flight on a loaded machine:
        // drain them, well within one keepalive interval.
        busy.extend(frames_for(&mut peer, 30 * MS).await);
        assert_eq!(busy.len(), 40, "all traffic arrived");
        assert!(
            busy.iter().all(|p| p[..] == b"\0t"[..]),
            "no keepalive while busy"
        );

        // Then silence: keepalives (payload [1]) about every 100 ms.
        let quiet = frames_for(&mut peer, 450 * MS).await;
        assert!(quiet.iter().all(|p| p[..] == [1]), "{quiet:?}");
        assert!(
            (2..=5).contains(&quiet.len()),
            "{} keepalives in 450 ms",
            quiet.len()
        );
    }));
}

/// Both ends idle-time-out a peer behind a black-holed proxy.
#[test]
fn a_silent_peer_is_detected_within_the_idle_timeout() {
    smol::block_on(within(10, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy::start(listener.local_addr().unwrap()).await;
        let client_io = TcpStream::connect(proxy.addr).await.unwrap();
        let (server_io, _) = listener.accept().await.unwrap();
        let cfg = Builder::new()
            .keepalive_interval(Some(50 * MS))
            .idle_timeout(Some(250 * MS));
        let (_ctx, mut crx, cconn) = cfg.build(client_io, Raw);
        let (_stx, mut srx, sconn) = cfg.build(server_io, Raw);
        let cconn = smol::spawn(cconn);
        let sconn = smol::spawn(sconn);

        // Keepalives hold the connection open through several timeouts.
        smol::Timer::after(800 * MS).await;
        assert!(!cconn.is_finished() && !sconn.is_finished());

        let cut = Instant::now();
        proxy.black_hole.store(true, Ordering::SeqCst);
        for (conn, rx) in [(cconn, &mut crx), (sconn, &mut srx)] {
            let err = conn.await.unwrap_err();
            let took = cut.elapsed();
            assert!(
                matches!(err, Error::IdleTimeout(d) if d == 250 * MS),
                "{err}"
            );
            assert!(
                took >= 100 * MS && took < 1000 * MS,
                "detected after {took:?}"
            );
            assert!(matches!(rx.next().await, Some(Err(Error::IdleTimeout(_)))));
        }
    }));
}

#[test]
fn our_own_application_not_reading_is_not_a_silent_peer() {
    smol::block_on(within(20, async {
        let (a, b) = tcp_pair().await;
        let cfg = Builder::new()
            .keepalive_interval(Some(50 * MS))
            .idle_timeout(Some(200 * MS))
            .receive_capacity(8);
        let (tx, _arx, aconn) = cfg.build(a, Raw);
        let (_btx, mut rx, bconn) = cfg.build(b, Raw);
        let aconn = smol::spawn(aconn);
        let bconn = smol::spawn(bconn);
        let sender = smol::spawn(async move {
            for i in 0..5_000 {
                tx.send(numbered_padded(i, 1024)).await.unwrap();
            }
            tx
        });
        // Read nothing for 5 idle timeouts: the sender backs up, and the
        // peer's bytes stop arriving because we stopped reading them.
        smol::Timer::after(1000 * MS).await;
        assert!(!bconn.is_finished(), "closed while we were the slow one");
        for i in 0..5_000 {
            assert_eq!(number_of(&rx.next().await.unwrap().unwrap()), i);
        }
        drop(sender.await);
        assert!(rx.next().await.is_none());
        aconn.await.unwrap();
        bconn.await.unwrap();
    }));
}
