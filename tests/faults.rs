//! Misbehaving peers and failures, over loopback: every case ends in a
//! typed error (or a clean end) within a bound, never a hang.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::{Builder, Error};
use common::*;
use futures::{AsyncWriteExt, StreamExt};

const MS: Duration = Duration::from_millis(1);

fn no_keepalive() -> Builder {
    Builder::new().keepalive_interval(None).idle_timeout(None)
}

#[test]
fn a_slow_sender_hits_the_frame_timeout() {
    smol::block_on(within(10, async {
        let (a, mut peer) = tcp_pair().await;
        let (_tx, mut rx, conn) = no_keepalive().frame_timeout(Some(150 * MS)).build(a, Raw);
        let conn = smol::spawn(conn);
        let start = Instant::now();
        // Slowloris: a header for 100 bytes, then one byte every 20 ms.
        peer.write_all(&100u32.to_be_bytes()).await.unwrap();
        let trickle = smol::spawn(async move {
            for _ in 0..100 {
                if peer.write_all(&[0]).await.is_err() {
                    break;
                }
                smol::Timer::after(20 * MS).await;
            }
        });
        let err = conn.await.unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(err, Error::FrameTimeout(d) if d == 150 * MS),
            "{err}"
        );
        assert!(took >= 150 * MS && took < 800 * MS, "took {took:?}");
        assert!(matches!(rx.next().await, Some(Err(Error::FrameTimeout(_)))));
        drop(trickle);
    }));
}

#[test]
fn a_peer_that_does_not_read_hits_the_write_timeout() {
    smol::block_on(within(20, async {
        let (a, _peer_never_reads) = tcp_pair().await;
        let (tx, _rx, conn) = no_keepalive()
            .write_timeout(Some(150 * MS))
            .send_capacity(16)
            .build(a, Raw);
        let conn = smol::spawn(conn);
        let body = Bytes::from(vec![7u8; 16 * 1024]);
        let mut accepted = 0usize;
        let err = loop {
            match tx.send(RawMessage::Message(body.clone())).await {
                Ok(()) => accepted += 1,
                Err(e) => break e.error,
            }
            assert!(accepted < 100_000, "never blocked");
        };
        assert!(
            matches!(err, Error::WriteTimeout(d) if d == 150 * MS),
            "{err}"
        );
        assert!(matches!(conn.await, Err(Error::WriteTimeout(_))));
        // What was accepted but never written is reported, not lost silently.
        let lost = tx.undelivered();
        assert!(lost > 0 && lost <= accepted, "{lost} of {accepted}");
    }));
}

#[test]
fn a_reset_in_the_middle_of_a_frame_is_an_error() {
    smol::block_on(within(10, async {
        let (a, mut peer) = tcp_pair().await;
        let (tx, mut rx, conn) = no_keepalive().build(a, Raw);
        let conn = smol::spawn(conn);
        // Data the peer never reads makes its close a reset (RST).
        tx.send(msg("unread")).await.unwrap();
        smol::Timer::after(20 * MS).await;
        peer.write_all(&raw_frame(b"\0half a frame")[..8])
            .await
            .unwrap();
        smol::Timer::after(20 * MS).await;
        drop(peer);
        let err = conn.await.unwrap_err();
        assert!(
            matches!(err, Error::Io(_) | Error::UnexpectedEof { .. }),
            "a reset is not a clean close: {err}"
        );
        assert_eq!(
            rx.next().await.unwrap().unwrap_err().to_string(),
            err.to_string()
        );
        assert!(rx.next().await.is_none());
    }));
}

#[test]
fn both_peers_closing_at_once_end_cleanly() {
    smol::block_on(within(10, async {
        for _ in 0..20 {
            let (a, b) = tcp_pair().await;
            let (atx, mut arx, aconn) = no_keepalive().build(a, Raw);
            let (btx, mut brx, bconn) = no_keepalive().build(b, Raw);
            atx.send(msg("from a")).await.unwrap();
            btx.send(msg("from b")).await.unwrap();
            atx.close();
            btx.close();
            let (ra, rb) = futures::join!(smol::spawn(aconn), smol::spawn(bconn));
            ra.unwrap();
            rb.unwrap();
            assert_eq!(arx.next().await.unwrap().unwrap(), msg("from b"));
            assert_eq!(brx.next().await.unwrap().unwrap(), msg("from a"));
            assert!(arx.next().await.is_none() && brx.next().await.is_none());
            assert_eq!(atx.undelivered() + btx.undelivered(), 0);
        }
    }));
}
