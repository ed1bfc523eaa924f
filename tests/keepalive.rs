//! Keepalives and the idle timeout, whole connections on virtual time:
//! every assertion is about the exact virtual time something happens.
//! (The deadline logic alone is tested in `state.rs`.)

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use chatpipe::raw::Raw;
use chatpipe::test_util::Mock;
use chatpipe::{Builder, Error};
use common::*;
use futures::StreamExt;

const KEEPALIVE: &[u8] = &[1];

#[test]
fn a_keepalive_goes_out_after_silence_and_none_while_traffic_flows() {
    let mut sim = Sim::new();
    // A peer that reads everything and sends nothing (nor closes).
    let (io, peer) = Mock::new().build();
    let (tx, _rx, conn) = Builder::new()
        .keepalive_interval(Some(5 * S))
        .idle_timeout(None)
        .build_with_timer(io, Raw, sim.timer());
    let conn = sim.spawn(conn);

    // Every frame on the wire, with the virtual time it was written.
    let mut timeline: Vec<(Duration, Vec<u8>)> = Vec::new();
    let observe = |timeline: &mut Vec<_>, now| {
        let wire = frames(&peer.written());
        for payload in &wire[timeline.len()..] {
            timeline.push((now, payload.clone()));
        }
    };

    // Traffic every 4 s for 40 s (8 keepalive intervals): never silent
    // for 5 s, so no keepalive among it.
    for i in 1..=10 {
        sim.run_to_with(4 * S * i, |now| observe(&mut timeline, now));
        tx.try_send(msg("t")).unwrap();
    }
    // The last message went out at 40 s: nothing until 45 s...
    sim.run_to_with(45 * S - NS, |now| observe(&mut timeline, now));
    assert_eq!(timeline.len(), 10, "{timeline:?}");
    // ...then a keepalive at 45 s exactly, and every 5 s after it.
    sim.run_to_with(62 * S, |now| observe(&mut timeline, now));

    let mut expected: Vec<_> = (1..=10).map(|i| (4 * S * i, b"\0t".to_vec())).collect();
    expected.extend((9..=12).map(|i| (5 * S * i, KEEPALIVE.to_vec())));
    assert_eq!(timeline, expected);
    assert!(!conn.is_finished());
}

/// Both ends idle-time-out a peer behind a black hole (nothing arrives,
/// nothing is closed), exactly one idle timeout after the last byte came.
#[test]
fn a_silent_peer_is_detected_within_the_idle_timeout() {
    let mut sim = Sim::new();
    let (client_io, server_io, cut) = black_holed_pair(64 * 1024);
    let cfg = Builder::new()
        .keepalive_interval(Some(5 * S))
        .idle_timeout(Some(15 * S));
    let (ctx, mut crx, cconn) = cfg.build_with_timer(client_io, Raw, sim.timer());
    let (stx, mut srx, sconn) = cfg.build_with_timer(server_io, Raw, sim.timer());
    let cconn = sim.spawn(cconn);
    let sconn = sim.spawn(sconn);

    // Keepalives (at 5, 10, ... 60 s each way) hold the connection open
    // through four idle timeouts.
    sim.run_to(62 * S);
    assert!(!cconn.is_finished() && !sconn.is_finished());
    for tx in [&ctx, &stx] {
        let stats = tx.stats();
        assert_eq!(stats.messages_in, 12, "one keepalive every 5 s");
        assert_eq!(stats.last_read, sim.at(60 * S));
    }

    cut.store(true, Ordering::SeqCst);
    // The last bytes arrived at 60 s: alive until 75 s...
    sim.run_to(75 * S - NS);
    assert!(!cconn.is_finished() && !sconn.is_finished());
    // ...and both ends close at 75 s exactly.
    sim.run_to(75 * S);
    for (conn, rx) in [(cconn, &mut crx), (sconn, &mut srx)] {
        let err = conn.output().unwrap_err();
        assert!(matches!(err, Error::IdleTimeout(d) if d == 15 * S), "{err}");
        assert!(matches!(ready(rx.next()), Some(Err(Error::IdleTimeout(_)))));
        assert!(ready(rx.next()).is_none());
    }
}

#[test]
fn our_own_application_not_reading_is_not_a_silent_peer() {
    let mut sim = Sim::new();
    let (a, b) = duplex_pair(64 * 1024);
    let cfg = Builder::new()
        .keepalive_interval(Some(5 * S))
        .idle_timeout(Some(15 * S))
        // a's writes stall because b stops reading: that is the write
        // timeout's business (tests/faults.rs), not this test's.
        .write_timeout(None)
        .receive_capacity(8);
    let (atx, _arx, aconn) = cfg.build_with_timer(a, Raw, sim.timer());
    let (btx, mut rx, bconn) = cfg.build_with_timer(b, Raw, sim.timer());
    let aconn = sim.spawn(aconn);
    let bconn = sim.spawn(bconn);
    let sender = sim.spawn({
        let tx = atx.clone();
        async move {
            for i in 0..5_000 {
                tx.send(numbered_padded(i, 1024)).await.unwrap();
            }
        }
    });
    sim.settle();
    // b's application takes nothing: the sender backs up, and a's bytes
    // stop arriving because b stopped reading them.
    assert!(!sender.is_finished(), "the sender never had to wait");
    let stalled = btx.stats();
    // Decoded: the queue's 8 and one batch of 8 waiting for room.
    assert!(stalled.messages_in <= 16, "{stalled:?}");

    // Ten idle timeouts without a byte from a: b stays open, and its own
    // keepalives still reach a (at 5, 10, ... 150 s).
    sim.run_to(150 * S);
    assert!(!bconn.is_finished(), "closed while we were the slow one");
    assert!(!aconn.is_finished());
    assert_eq!(btx.stats().bytes_in, stalled.bytes_in, "b read nothing");
    assert_eq!(atx.stats().messages_in, 30);

    // Once b's application reads, everything arrives, in order, at once.
    let reader = sim.spawn(async move {
        for i in 0..5_000 {
            assert_eq!(number_of(&rx.next().await.unwrap().unwrap()), i);
        }
        rx
    });
    sim.settle();
    assert!(sender.is_finished());
    let mut rx = reader.output();
    drop(atx);
    sim.settle();
    assert!(ready(rx.next()).is_none());
    assert_eq!(sim.now(), 150 * S);
    aconn.output().unwrap();
    bconn.output().unwrap();
}

/// A stream whose close takes a while (TLS's close_notify, QUIC's FIN
/// waiting for its acknowledgement) and that refuses writes once closing
/// began, as QUIC's does: no keepalive may be written meanwhile, or the
/// clean close becomes an error.
#[test]
fn no_keepalive_is_written_while_the_write_half_is_shutting() {
    use std::io;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    #[derive(Default)]
    struct Shared {
        closing: bool,
        /// The close finishes once set.
        acked: bool,
        waker: Option<Waker>,
        written: usize,
    }
    struct SlowClose(Arc<Mutex<Shared>>);
    impl futures::io::AsyncRead for SlowClose {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            // The peer sends nothing and never closes.
            Poll::Pending
        }
    }
    impl futures::io::AsyncWrite for SlowClose {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut s = self.0.lock().unwrap();
            if s.closing {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            }
            s.written += buf.len();
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let mut s = self.0.lock().unwrap();
            s.closing = true;
            if s.acked {
                return Poll::Ready(Ok(()));
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    let mut sim = Sim::new();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (tx, _rx, conn) = Builder::new()
        .keepalive_interval(Some(5 * S))
        .idle_timeout(None)
        .build_with_timer(SlowClose(shared.clone()), Raw, sim.timer());
    let conn = sim.spawn(conn);
    tx.try_send(msg("bye")).unwrap();
    tx.close();
    sim.run_to(S);
    assert!(shared.lock().unwrap().closing, "the close began");
    let written = shared.lock().unwrap().written;
    // Three keepalive intervals while the close waits for its acknowledgement.
    sim.run_to(16 * S);
    assert!(!conn.is_finished());
    assert_eq!(
        shared.lock().unwrap().written,
        written,
        "nothing written once closing"
    );
    let waker = {
        let mut s = shared.lock().unwrap();
        s.acked = true;
        s.waker.take()
    };
    waker.unwrap().wake();
    // Our half is shut; the connection waits for the peer's, as ever.
    sim.run_to(17 * S);
    assert!(!conn.is_finished(), "still waiting for the peer to close");
}
