//! Misbehaving peers and failures: every case ends in a typed error (or a
//! clean end), never a hang. Timeouts run on virtual time and in-memory
//! streams (or the scripted mock), at exact times.

mod common;

use std::cell::Cell;
use std::io;
use std::rc::Rc;

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::test_util::Mock;
use chatpipe::{Builder, Error};
use common::*;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};

fn no_keepalive() -> Builder {
    Builder::new().keepalive_interval(None).idle_timeout(None)
}

#[test]
fn a_slow_sender_hits_the_frame_timeout() {
    let mut sim = Sim::new();
    let (a, mut peer) = duplex_pair(64 * 1024);
    let (_tx, mut rx, conn) =
        no_keepalive()
            .frame_timeout(Some(10 * S))
            .build_with_timer(a, Raw, sim.timer());
    let conn = sim.spawn(conn);
    let mut frame = raw_frame(&[0; 100]);
    // A whole frame at 3 s, then nothing: no frame is under way.
    sim.run_to(3 * S);
    ready(peer.write_all(&raw_frame(b"\0early"))).unwrap();
    // Slowloris from 7 s: the header's first byte, the rest of it at 9 s,
    // then one byte of the payload every 2 s.
    let mut at = 7 * S;
    for piece in [1, 3, 1, 1, 1] {
        sim.run_to(at);
        let rest = frame.split_off(piece);
        ready(peer.write_all(&frame)).unwrap();
        frame = rest;
        at += 2 * S;
    }
    assert_eq!(sim.now(), 15 * S);
    // The frame began at 7 s: it may take until 17 s...
    sim.run_to(17 * S - NS);
    assert!(!conn.is_finished());
    // ...and at 17 s exactly the connection closes.
    sim.run_to(17 * S);
    let err = conn.output().unwrap_err();
    assert!(
        matches!(err, Error::FrameTimeout(d) if d == 10 * S),
        "{err}"
    );
    assert_eq!(ready(rx.next()).unwrap().unwrap(), msg("early"));
    assert!(matches!(
        ready(rx.next()),
        Some(Err(Error::FrameTimeout(_)))
    ));
    assert!(ready(rx.next()).is_none());
}

#[test]
fn a_peer_that_does_not_read_hits_the_write_timeout() {
    let mut sim = Sim::new();
    let (a, mut peer) = duplex_pair(64 * 1024);
    let (tx, _rx, conn) = no_keepalive()
        .write_timeout(Some(10 * S))
        .send_capacity(16)
        .build_with_timer(a, Raw, sim.timer());
    let conn = sim.spawn(conn);
    let accepted = Rc::new(Cell::new(0usize));
    let sender = sim.spawn({
        let tx = tx.clone();
        let accepted = accepted.clone();
        async move {
            let body = Bytes::from(vec![7u8; 16 * 1024]);
            loop {
                match tx.send(RawMessage::Message(body.clone())).await {
                    Ok(()) => accepted.set(accepted.get() + 1),
                    Err(e) => break e.error,
                }
                assert!(accepted.get() < 100_000, "never blocked");
            }
        }
    });
    // The peer reads nothing: at 0 s writing stalls with the pipe full.
    sim.settle();
    assert!(!sender.is_finished(), "the sender never had to wait");
    let written = tx.stats().bytes_out;
    assert!(written > 0);
    // At 6 s the peer reads a little: the write progresses, and the
    // timeout counts from there.
    sim.run_to(6 * S);
    let mut buf = vec![0; 16 * 1024];
    assert_eq!(ready(peer.read(&mut buf)).unwrap(), buf.len());
    sim.settle();
    assert!(tx.stats().bytes_out > written);
    sim.run_to(16 * S - NS);
    assert!(!conn.is_finished() && !sender.is_finished());
    // No progress from 6 s: closed at 16 s exactly.
    sim.run_to(16 * S);
    let err = sender.output();
    assert!(
        matches!(err, Error::WriteTimeout(d) if d == 10 * S),
        "{err}"
    );
    assert!(matches!(conn.output(), Err(Error::WriteTimeout(_))));
    // What was accepted but never written is reported, not lost silently.
    let lost = tx.undelivered();
    let accepted = accepted.get();
    assert!(lost > 0 && lost <= accepted, "{lost} of {accepted}");
}

#[test]
fn a_reset_in_the_middle_of_a_frame_is_an_error() {
    let mut sim = Sim::new();
    let (io, peer) = Mock::new()
        .read(&raw_frame(b"\0half a frame")[..8])
        .read_pending()
        .read_error(io::ErrorKind::ConnectionReset)
        .build();
    let (tx, mut rx, conn) = no_keepalive().build_with_timer(io, Raw, sim.timer());
    tx.try_send(msg("unread")).unwrap();
    let conn = sim.spawn(conn);
    sim.settle();
    let err = conn.output().unwrap_err();
    assert!(
        matches!(err, Error::Io(ref e) if e.kind() == io::ErrorKind::ConnectionReset),
        "a reset is not a clean close: {err}"
    );
    assert_eq!(peer.written(), raw_frame(b"\0unread"));
    assert_eq!(
        ready(rx.next()).unwrap().unwrap_err().to_string(),
        err.to_string()
    );
    assert!(ready(rx.next()).is_none());
    let send_err = ready(tx.send(msg("x"))).unwrap_err();
    assert_eq!(send_err.error.to_string(), err.to_string());
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
