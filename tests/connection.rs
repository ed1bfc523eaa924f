//! The message connection end to end: on smol over loopback TCP and
//! in-memory streams, and on virtual time over in-memory streams and the
//! scripted mock where a test must know that nothing more can happen.

mod common;

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Waker};

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::test_util::Mock;
use chatpipe::{Builder, Error, TrySendError};
use common::*;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use futures_io::{AsyncRead, AsyncWrite};

fn quiet() -> Builder {
    Builder::new().keepalive_interval(None)
}

async fn both_ways<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(a: T, b: T) {
    let (a_tx, mut a_rx, a_conn) = quiet().build(a, Raw);
    let (b_tx, mut b_rx, b_conn) = quiet().build(b, Raw);
    let a_conn = smol::spawn(a_conn);
    let b_conn = smol::spawn(b_conn);
    a_tx.send(msg("ping")).await.unwrap();
    b_tx.send(msg("pong")).await.unwrap();
    assert_eq!(b_rx.next().await.unwrap().unwrap(), msg("ping"));
    assert_eq!(a_rx.next().await.unwrap().unwrap(), msg("pong"));
    // A large message too, written without a copy.
    let big = RawMessage::Message(Bytes::from(vec![0xab; 60_000]));
    a_tx.send(big.clone()).await.unwrap();
    assert_eq!(b_rx.next().await.unwrap().unwrap(), big);

    // One side closes: both see a clean end.
    a_tx.close();
    assert!(b_rx.next().await.is_none());
    assert!(a_rx.next().await.is_none());
    a_conn.await.unwrap();
    b_conn.await.unwrap();
    assert!(matches!(
        b_tx.send(msg("late")).await,
        Err(chatpipe::SendError {
            error: Error::Closed,
            ..
        })
    ));
}

#[test]
fn messages_both_ways_over_tcp() {
    smol::block_on(within(10, async {
        let (a, b) = tcp_pair().await;
        both_ways(a, b).await;
    }));
}

#[test]
fn messages_both_ways_in_memory() {
    smol::block_on(within(10, async {
        let (a, b) = duplex_pair(4096);
        both_ways(a, b).await;
    }));
}

#[test]
fn hundred_thousand_messages_arrive_complete_and_in_order() {
    const N: u32 = 100_000;
    smol::block_on(within(60, async {
        let (a, b) = tcp_pair().await;
        let (tx, _a_rx, a_conn) = quiet().build(a, Raw);
        let (_b_tx, mut rx, b_conn) = quiet().build(b, Raw);
        let a_conn = smol::spawn(a_conn);
        let b_conn = smol::spawn(b_conn);
        let sender = smol::spawn(async move {
            for i in 0..N {
                tx.send(numbered(i)).await.unwrap();
            }
            // Dropping the last sender closes gracefully.
        });
        for i in 0..N {
            let m = rx.next().await.expect("stream ended early").unwrap();
            assert_eq!(number_of(&m), i);
        }
        assert!(rx.next().await.is_none());
        sender.await;
        a_conn.await.unwrap();
        b_conn.await.unwrap();
    }));
}

#[test]
fn close_delivers_everything_queued() {
    smol::block_on(within(20, async {
        let (a, b) = duplex_pair(1024);
        let (tx, _a_rx, a_conn) = quiet().send_capacity(20_000).build(a, Raw);
        let (_b_tx, mut rx, b_conn) = quiet().build(b, Raw);
        // Queue everything before the driver even runs, then close.
        for i in 0..10_000 {
            tx.try_send(numbered(i)).unwrap();
        }
        tx.close();
        assert!(tx.send(msg("after close")).await.is_err());
        let a_conn = smol::spawn(a_conn);
        let b_conn = smol::spawn(b_conn);
        let mut n = 0;
        while let Some(m) = rx.next().await {
            assert_eq!(number_of(&m.unwrap()), n);
            n += 1;
        }
        assert_eq!(n, 10_000);
        a_conn.await.unwrap();
        b_conn.await.unwrap();
    }));
}

#[test]
fn a_consumer_that_stops_reading_holds_memory_bounded() {
    const CAP: usize = 64;
    let mut sim = Sim::new();
    let (a, b) = duplex_pair(8 * 1024);
    let (tx, _a_rx, a_conn) = quiet()
        .send_capacity(CAP)
        .build_with_timer(a, Raw, sim.timer());
    let (_b_tx, mut rx, b_conn) =
        quiet()
            .receive_capacity(CAP)
            .build_with_timer(b, Raw, sim.timer());
    sim.spawn(a_conn).detach();
    sim.spawn(b_conn).detach();
    let body = Bytes::from(vec![1u8; 1000]);
    // Send until `send` waits: the consumer never reads.
    let accepted = Rc::new(Cell::new(0usize));
    let sender = sim.spawn({
        let (tx, body, accepted) = (tx.clone(), body.clone(), accepted.clone());
        async move {
            for _ in 0..10_000 {
                tx.send(RawMessage::Message(body.clone())).await.unwrap();
                accepted.set(accepted.get() + 1);
            }
        }
    });
    // Everything that can move without the consumer has moved.
    sim.settle();
    assert!(!sender.is_finished(), "the sender never had to wait");
    sender.abort();
    sim.settle();
    let accepted = accepted.get();
    // Everything accepted sits in bounded places: both queues, the batch
    // the sending driver took from its queue, the sender's write buffer
    // (256 KiB), the pipe (8 KiB) and the receiver's read-ahead (one
    // maximum frame).
    let bound = CAP * 3 + (256 + 8 + 64 + 16) * 1024 / 1000;
    eprintln!("accepted {accepted}, bound {bound}");
    assert!(accepted <= bound, "accepted {accepted} > bound {bound}");
    assert!(tx
        .try_send(RawMessage::Message(body.clone()))
        .unwrap_err()
        .is_full());
    // Once the consumer reads, everything arrives.
    let reader = sim.spawn(async move {
        for _ in 0..accepted {
            rx.next().await.unwrap().unwrap();
        }
    });
    sim.settle();
    assert!(reader.is_finished());
}

#[test]
fn try_send_fails_at_once_when_full_and_hands_the_message_back() {
    smol::block_on(async {
        let (a, _b) = duplex_pair(64);
        let (tx, _rx, _conn) = quiet().send_capacity(2).build(a, Raw);
        tx.try_send(msg("1")).unwrap();
        tx.try_send(msg("2")).unwrap();
        match tx.try_send(msg("3")) {
            Err(TrySendError::Full(m)) => assert_eq!(m, msg("3")),
            other => panic!("expected Full, got {other:?}"),
        }
    });
}

#[test]
fn an_oversized_outgoing_message_fails_alone() {
    smol::block_on(within(10, async {
        let (a, b) = duplex_pair(4096);
        let (tx, _a_rx, a_conn) = quiet().max_frame_len(100).build(a, Raw);
        let (_b_tx, mut rx, b_conn) = quiet().max_frame_len(100).build(b, Raw);
        smol::spawn(a_conn).detach();
        smol::spawn(b_conn).detach();
        let big = RawMessage::Message(Bytes::from(vec![0; 100]));
        let err = tx.send(big.clone()).await.unwrap_err();
        assert!(matches!(
            err.error,
            Error::MessageTooLarge { len: 101, max: 100 }
        ));
        assert_eq!(err.into_inner(), big);
        // The connection carries on.
        tx.send(msg("fine")).await.unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap(), msg("fine"));
    }));
}

/// A raw peer's bad input: the connection closes with a typed error that
/// every handle sees.
async fn closes_with(bytes: Vec<u8>, shutdown: bool) -> (Error, Vec<RawMessage>) {
    let (a, mut peer) = tcp_pair().await;
    let (tx, mut rx, conn) = quiet().max_frame_len(1000).build(a, Raw);
    let conn = smol::spawn(conn);
    peer.write_all(&bytes).await.unwrap();
    if shutdown {
        peer.close().await.unwrap();
    }
    let mut got = Vec::new();
    let err = loop {
        match rx.next().await.expect("stream must end with the error") {
            Ok(m) => got.push(m),
            Err(e) => break e,
        }
    };
    assert!(rx.next().await.is_none(), "the error is the last item");
    let driver_err = conn.await.unwrap_err();
    assert_eq!(driver_err.to_string(), err.to_string());
    let send_err = tx.send(msg("x")).await.unwrap_err();
    assert_eq!(send_err.error.to_string(), err.to_string());
    (err, got)
}

#[test]
fn a_length_over_the_maximum_closes_with_frame_too_large() {
    smol::block_on(within(10, async {
        let mut bytes = raw_frame(b"\0ok");
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        let (err, got) = closes_with(bytes, false).await;
        assert!(
            matches!(err, Error::FrameTooLarge { len, max: 1000 } if len == u64::from(u32::MAX))
        );
        assert_eq!(
            got,
            [msg("ok")],
            "what arrived before the error is delivered"
        );
    }));
}

#[test]
fn eof_in_the_middle_of_a_frame_is_not_a_clean_close() {
    smol::block_on(within(10, async {
        let mut bytes = raw_frame(b"\0ok");
        bytes.extend_from_slice(&raw_frame(b"\0cut short")[..7]);
        let (err, got) = closes_with(bytes, true).await;
        assert!(matches!(err, Error::UnexpectedEof { missing: 7 }), "{err}");
        assert_eq!(got, [msg("ok")]);
    }));
}

#[test]
fn a_malformed_payload_closes_with_malformed() {
    smol::block_on(within(10, async {
        let (err, _) = closes_with(raw_frame(&[3, 0, 1]), false).await;
        assert!(matches!(err, Error::Malformed(_)), "{err}");
    }));
}

#[test]
fn unknown_message_types_are_skipped() {
    smol::block_on(within(10, async {
        let mut bytes = raw_frame(&[99, 1, 2, 3]);
        bytes.extend_from_slice(&raw_frame(b"\0after"));
        bytes.extend_from_slice(&raw_frame(&[3, 0, 0, 0, 0, 0, 0, 0, 42]));
        let (err, got) = closes_with(bytes, false).await;
        assert_eq!(got, [msg("after")]);
        assert!(
            matches!(err, Error::Protocol(_)),
            "unsolicited response: {err}"
        );
    }));
}

#[test]
fn a_peer_closing_is_seen_as_a_clean_end() {
    smol::block_on(within(10, async {
        let (a, mut peer) = tcp_pair().await;
        let (tx, mut rx, conn) = quiet().build(a, Raw);
        let conn = smol::spawn(conn);
        peer.write_all(&raw_frame(b"\0bye")).await.unwrap();
        tx.send(msg("queued before the close")).await.unwrap();
        peer.close().await.unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap(), msg("bye"));
        assert!(rx.next().await.is_none());
        conn.await.unwrap();
        // What we had accepted was still written before our side closed.
        let mut back = Vec::new();
        peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, raw_frame(b"\0queued before the close"));
    }));
}

#[test]
fn dropping_the_driver_fails_everything_pending() {
    let mut sim = Sim::new();
    let (a, _b) = duplex_pair(64);
    let (tx, mut rx, mut conn) = quiet().build_with_timer(a, Raw, sim.timer());
    let req = sim.spawn({
        let tx = tx.clone();
        async move {
            tx.request(RawMessage::Request {
                id: 1,
                body: Bytes::new(),
            })
            .await
        }
    });
    sim.settle();
    // Let the driver pick up the request, then drop it.
    let mut cx = Context::from_waker(Waker::noop());
    assert!(Pin::new(&mut conn).poll(&mut cx).is_pending());
    assert_eq!(conn.outstanding_requests(), 1);
    drop(conn);
    sim.settle();
    assert!(matches!(req.output(), Err(Error::Closed)));
    assert!(ready(rx.next()).is_none());
    assert!(tx.is_closed());
}

#[test]
fn scripted_io_with_partial_headers_and_pending_between() {
    let mut sim = Sim::new();
    let mut wire = Vec::new();
    for w in ["a", "bb", "", "dddd"] {
        let mut p = vec![0u8];
        p.extend_from_slice(w.as_bytes());
        wire.extend_from_slice(&raw_frame(&p));
    }
    // One byte at a time, Pending before each.
    let mut script = Mock::new();
    for b in &wire {
        script = script.read_pending().read(&[*b]);
    }
    let (io, peer) = script.eof().build();
    let (tx, rx, conn) = quiet().build_with_timer(io, Raw, sim.timer());
    ready(tx.send(msg("out"))).unwrap();
    let conn = sim.spawn(conn);
    let got = sim.spawn(rx.map(Result::unwrap).collect::<Vec<_>>());
    sim.settle();
    assert_eq!(got.output(), [msg("a"), msg("bb"), msg(""), msg("dddd")]);
    conn.output().unwrap();
    assert_eq!(peer.written(), raw_frame(b"\0out"));
    assert!(peer.is_shut() && !peer.written_after_shut());
}

#[test]
fn a_slow_application_does_not_hold_a_closed_connection_open() {
    smol::block_on(within(10, async {
        let (a, b) = duplex_pair(64 * 1024);
        let (atx, _arx, aconn) = quiet().build(a, Raw);
        let (btx, mut brx, bconn) = quiet().receive_capacity(4).build(b, Raw);
        for i in 0..100 {
            atx.send(numbered(i)).await.unwrap();
        }
        atx.close();
        btx.close();
        // Both drivers end although b's application has read nothing yet.
        let (ra, rb) = futures::join!(smol::spawn(aconn), smol::spawn(bconn));
        ra.unwrap();
        rb.unwrap();
        // Everything that arrived is still delivered, then a clean end.
        for i in 0..100 {
            assert_eq!(number_of(&brx.next().await.unwrap().unwrap()), i);
        }
        assert!(brx.next().await.is_none());
    }));
}

/// Large messages keep the socket's buffer full, so writes return
/// `Pending` between partial writes. Flushing then must not make the
/// stream forget the wait for writability (smol's `TcpStream` drops it on
/// flush): without keepalives nothing else would wake the driver, and the
/// transfer would stop (the hang guard fails the test). Each side runs on
/// a thread and executor of its own, as a server and a client would.
#[test]
fn large_messages_over_tcp_never_stall_on_a_full_socket() {
    const N: usize = 2000;
    let body = Bytes::from(vec![7u8; 64 * 1024]);
    let cfg = quiet().max_frame_len(1 << 20);
    for _ in 0..4 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (body, cfg_a, cfg_b) = (body.clone(), cfg.clone(), cfg.clone());
        let sender = std::thread::spawn(move || {
            let ex = smol::LocalExecutor::new();
            smol::block_on(ex.run(within(60, async {
                let io = smol::net::TcpStream::try_from(a).unwrap();
                let (tx, _rx, conn) = cfg_a.build(io, Raw);
                let conn = ex.spawn(conn);
                for _ in 0..N {
                    tx.send(RawMessage::Message(body.clone())).await.unwrap();
                }
                tx.close();
                conn.await.unwrap();
            })))
        });
        let receiver = std::thread::spawn(move || {
            let ex = smol::LocalExecutor::new();
            smol::block_on(ex.run(within(60, async {
                let io = smol::net::TcpStream::try_from(b).unwrap();
                let (_tx, mut rx, conn) = cfg_b.build(io, Raw);
                let conn = ex.spawn(conn);
                for _ in 0..N {
                    let m = rx.next().await.expect("stream ended early").unwrap();
                    assert!(matches!(m, RawMessage::Message(b) if b.len() == 64 * 1024));
                }
                assert!(rx.next().await.is_none());
                conn.await.unwrap();
            })))
        });
        sender.join().unwrap();
        receiver.join().unwrap();
    }
}

/// While the application takes nothing, the receiver reads ahead at most
/// 64 KiB (and one read) beyond what it decoded, however large the frames
/// it allows: the read-ahead is there to see an EOF early, and more of it
/// cost copies.
#[test]
fn read_ahead_is_bounded_below_a_large_maximum_frame() {
    let mut sim = Sim::new();
    let (a, b) = duplex_pair(4 << 20);
    let cfg = Builder::new()
        .max_frame_len(1 << 20)
        .send_capacity(4096)
        .receive_capacity(8)
        .keepalive_interval(None)
        .write_timeout(None);
    let (atx, _arx, aconn) = cfg.build_with_timer(a, Raw, sim.timer());
    let (btx, _rx, bconn) = cfg.build_with_timer(b, Raw, sim.timer());
    let _aconn = sim.spawn(aconn);
    let _bconn = sim.spawn(bconn);
    for i in 0..2_000 {
        atx.try_send(numbered_padded(i, 1024)).unwrap();
    }
    sim.settle();
    assert_eq!(atx.stats().messages_out, 2_000, "all written");
    let stats = btx.stats();
    // Decoded: the queue's 8 and one batch of 8 waiting for room.
    assert!(stats.messages_in <= 16, "{stats:?}");
    let bound = 16 * 1_100 + 64 * 1024 + 4 + 64 * 1024;
    assert!(stats.bytes_in <= bound, "read {} > {bound}", stats.bytes_in);
}
