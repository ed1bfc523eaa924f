//! The handles users expect: `Sink`, `flush`, `reserve`, `call` with ids
//! the connection picks, `FusedStream`, errors that say whether the
//! connection is gone and convert to `io::Error`, a two-method protocol,
//! the default frame limit, and counters.
//!
//! Everything runs on one thread (`LocalPool`) over in-memory streams, so
//! each step is deterministic: "pending" here means no progress was
//! possible, not that the machine was slow.

use std::error::Error as _;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatpipe::chat::{Chat, ChatMessage, Nickname};
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::test_util::{ManualClock, Mock};
use chatpipe::{Builder, Call, Error, Kind, Protocol, SendError, TrySendError};
use futures::executor::LocalPool;
use futures::stream::FusedStream;
use futures::task::LocalSpawnExt;
use futures::{SinkExt, StreamExt};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

type Duplex = Compat<tokio::io::DuplexStream>;

fn duplex(cap: usize) -> (Duplex, Duplex) {
    let (a, b) = tokio::io::duplex(cap);
    (a.compat(), b.compat())
}

fn msg(s: &str) -> RawMessage {
    RawMessage::Message(Bytes::copy_from_slice(s.as_bytes()))
}

/// Polls `fut` once: `Some` if it completed.
fn poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    match std::pin::Pin::new(fut).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Reads `n` bytes from `peer`, the other end of a connection.
fn read_bytes(pool: &mut LocalPool, peer: &mut Duplex, n: usize) {
    let mut buf = vec![0u8; 8192];
    let mut read = 0;
    pool.run_until(async {
        use futures::AsyncReadExt;
        while read < n {
            read += peer.read(&mut buf).await.unwrap();
        }
    });
}

/// No keepalives or timeouts to get in the way, on a clock that never moves.
fn quiet() -> Builder {
    Builder::new()
        .keepalive_interval(None)
        .frame_timeout(None)
        .write_timeout(None)
}

#[test]
fn a_sender_is_a_sink_with_backpressure_for_send_all_and_forward() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (a, b) = duplex(1024);
    let cfg = quiet().send_capacity(4);
    let (mut tx, _arx, aconn) = cfg.build_with_timer(a, Raw, clock.timer());
    let (_btx, brx, bconn) = cfg.build_with_timer(b, Raw, clock.timer());
    let s = pool.spawner();
    let aconn = s.spawn_local_with_handle(aconn).unwrap();
    s.spawn_local(async { bconn.await.unwrap() }).unwrap();
    let received = s
        .spawn_local_with_handle(brx.map(Result::unwrap).collect::<Vec<_>>())
        .unwrap();
    pool.run_until(async move {
        let mut first = futures::stream::iter((0..1000).map(|i| Ok(msg(&i.to_string()))));
        tx.send_all(&mut first).await.unwrap();
        // A second stream through `forward`, which also closes the sink.
        let rest = futures::stream::iter((1000..2000).map(|i| Ok(msg(&i.to_string()))));
        rest.forward(tx).await.unwrap();
    });
    let got = pool.run_until(received);
    let want: Vec<_> = (0..2000).map(|i| msg(&i.to_string())).collect();
    assert_eq!(got, want);
    pool.run_until(aconn).unwrap();
}

#[test]
fn flush_waits_for_the_wire_and_fails_with_the_reason_if_it_never_gets_there() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    // Room on the wire for little more than one 1 KiB message.
    let (a, mut peer) = duplex(1100);
    let (tx, _rx, conn) = quiet().build_with_timer(a, Raw, clock.timer());
    let conn = pool.spawner().spawn_local_with_handle(conn).unwrap();
    let big = RawMessage::Message(Bytes::from(vec![7u8; 1024]));
    for _ in 0..3 {
        tx.try_send(big.clone()).unwrap();
    }
    let mut flush = pin!(tx.flush());
    pool.run_until_stalled();
    assert!(
        poll_once(&mut flush).is_none(),
        "3 KiB cannot be written yet"
    );
    assert!(tx.stats().bytes_out < 3 * 1029, "{:?}", tx.stats());

    // The peer reads: everything goes out and the flush resolves, with the
    // connection still open.
    read_bytes(&mut pool, &mut peer, 3 * (4 + 1 + 1024));
    pool.run_until_stalled();
    assert_eq!(poll_once(&mut flush).map(|r| r.is_ok()), Some(true));
    assert!(!tx.is_closed());
    // Nothing was sent since: a new flush is done at once.
    assert!(poll_once(&mut pin!(tx.flush())).is_some_and(|r| r.is_ok()));

    // Messages that will never be written: the flush fails with the reason.
    for _ in 0..3 {
        tx.try_send(big.clone()).unwrap();
    }
    let mut flush = pin!(tx.flush());
    pool.run_until_stalled();
    assert!(poll_once(&mut flush).is_none());
    drop(peer); // the peer goes away without reading them
    let end = pool.run_until(conn);
    assert!(end.is_err(), "{end:?}");
    let err = poll_once(&mut flush).expect("resolved").unwrap_err();
    assert!(err.is_fatal(), "{err}");
    assert!(tx.undelivered() > 0);
}

#[test]
fn accepted_and_flushed_tell_whether_a_message_is_on_the_wire_without_waiting() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    // Room on the wire for little more than one 1 KiB message.
    let (a, mut peer) = duplex(1100);
    let (tx, _rx, conn) = quiet().build_with_timer(a, Raw, clock.timer());
    let conn = pool.spawner().spawn_local_with_handle(conn).unwrap();
    assert_eq!((tx.accepted(), tx.flushed()), (0, 0));
    let big = RawMessage::Message(Bytes::from(vec![7u8; 1024]));
    tx.try_send(big.clone()).unwrap();
    let first = tx.accepted();
    let permit = pool.run_until(tx.reserve()).unwrap();
    permit.send(big.clone()).unwrap();
    tx.try_send(big.clone()).unwrap();
    let third = tx.accepted();
    assert_eq!((first, third), (1, 3));
    pool.run_until_stalled();
    // Not all of it fits on the wire yet (how much counts as flushed
    // depends on how the driver batched the three).
    assert!(tx.flushed() < third, "{}", tx.flushed());

    read_bytes(&mut pool, &mut peer, 3 * (4 + 1 + 1024));
    pool.run_until_stalled();
    assert_eq!(tx.flushed(), third);

    // What is never written stays unflushed once the connection fails.
    tx.try_send(big.clone()).unwrap();
    tx.try_send(big).unwrap();
    drop(peer);
    assert!(pool.run_until(conn).is_err());
    assert_eq!(tx.accepted(), 5);
    assert!(tx.flushed() < 5);
    assert_eq!(tx.flushed() + tx.undelivered() as u64, 5);
}

#[test]
fn a_sender_in_a_loop_gives_its_driver_a_turn_before_the_queue_fills() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (a, _peer) = duplex(1 << 20);
    let (tx, _rx, conn) = quiet().build_with_timer(a, Raw, clock.timer());
    pool.spawner()
        .spawn_local(async {
            let _ = conn.await;
        })
        .unwrap();
    let body = RawMessage::Message(Bytes::from(vec![7u8; 64]));
    // On one thread the driver runs only when the sender lets it: after a
    // write's worth (256 such messages), not once the queue (1,024) is full.
    let flushed = pool.run_until(async {
        let mut flushed = Vec::new();
        for _ in 0..600 {
            tx.send(body.clone()).await.unwrap();
            flushed.push(tx.flushed());
        }
        flushed
    });
    assert_eq!(flushed[255], 0);
    assert_eq!(flushed[256], 256);
    assert_eq!(flushed[512], 512);
}

#[test]
fn a_send_that_yields_first_has_queued_nothing_if_dropped() {
    let clock = ManualClock::new();
    let (a, _peer) = duplex(1 << 20);
    // No driver: nothing is taken.
    let (tx, _rx, _conn) = quiet().build_with_timer(a, Raw, clock.timer());
    let body = RawMessage::Message(Bytes::from(vec![7u8; 64]));
    for _ in 0..256 {
        assert!(poll_once(&mut pin!(tx.send(body.clone()))).is_some());
    }
    // The driver is a write's worth behind: this send yields before
    // queueing, and dropped then, it queued nothing.
    {
        let mut send = pin!(tx.send(body.clone()));
        assert!(poll_once(&mut send).is_none());
    }
    assert_eq!(tx.accepted(), 256);
    // Once per write's worth: the next goes straight in.
    assert!(poll_once(&mut pin!(tx.send(body.clone()))).is_some());
    assert_eq!(tx.accepted(), 257);
}

#[test]
fn reserve_waits_for_room_and_a_permit_keeps_it() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (a, b) = duplex(64 * 1024);
    let (tx, _rx, conn) = quiet()
        .send_capacity(2)
        .build_with_timer(a, Raw, clock.timer());
    tx.try_send(msg("1")).unwrap();
    tx.try_send(msg("2")).unwrap();
    assert!(tx.try_send(msg("3")).unwrap_err().is_full());

    // Full, and the driver has not run: reserve waits.
    let mut reserve = Box::pin(tx.reserve());
    assert!(poll_once(&mut reserve).is_none());
    let (_btx, brx, bconn) = quiet().build_with_timer(b, Raw, clock.timer());
    let s = pool.spawner();
    s.spawn_local(async { conn.await.unwrap() }).unwrap();
    s.spawn_local(async { bconn.await.unwrap() }).unwrap();
    let received = s
        .spawn_local_with_handle(brx.map(Result::unwrap).collect::<Vec<_>>())
        .unwrap();
    pool.run_until_stalled();
    let permit = poll_once(&mut reserve)
        .expect("room once the driver took the queue")
        .unwrap();
    // The permit's slot is its own: one more slot is left for others.
    let second = poll_once(&mut Box::pin(tx.reserve())).unwrap().unwrap();
    assert!(
        tx.try_send(msg("x")).unwrap_err().is_full(),
        "both slots held"
    );
    drop(second);
    tx.try_send(msg("3")).unwrap();
    permit.send(msg("4")).unwrap();
    drop(reserve);
    drop(tx);
    let got = pool.run_until(received);
    assert_eq!(got, ["1", "2", "3", "4"].map(msg));
}

#[test]
fn calls_get_ids_from_the_connection_and_their_answers_as_output() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (a, b) = duplex(64 * 1024);
    let (client, _crx, cconn) = quiet().build_with_timer(a, Raw, clock.timer());
    let (server, mut srx, sconn) = quiet().build_with_timer(b, Raw, clock.timer());
    let s = pool.spawner();
    s.spawn_local(async { cconn.await.unwrap() }).unwrap();
    s.spawn_local(async { sconn.await.unwrap() }).unwrap();
    s.spawn_local(async move {
        let mut ids = std::collections::HashSet::new();
        while let Some(Ok(RawMessage::Request { id, body })) = srx.next().await {
            assert!(ids.insert(id), "id {id} issued twice");
            server
                .send(RawMessage::Response { id, body })
                .await
                .unwrap();
        }
    })
    .unwrap();
    pool.run_until(async {
        // 100 calls in flight at once, no counter in sight.
        let calls = (0..100).map(|i| client.call(Bytes::from(i.to_string())));
        let answers = futures::future::try_join_all(calls).await.unwrap();
        let want: Vec<Bytes> = (0..100).map(|i| Bytes::from(i.to_string())).collect();
        assert_eq!(answers, want);
    });
    // A response the call cannot read fails the call, not the connection.
    struct Wrong;
    impl Call<Raw> for Wrong {
        type Output = ();
        fn into_request(self, id: u64) -> RawMessage {
            RawMessage::Request {
                id,
                body: "ok".into(),
            }
        }
        fn from_response(r: RawMessage) -> Result<(), RawMessage> {
            Err(r)
        }
    }
    let err = pool.run_until(client.call(Wrong)).unwrap_err();
    assert!(matches!(err, Error::UnexpectedResponse), "{err}");
    assert!(!err.is_fatal());
    assert!(!client.is_closed());
}

/// A protocol that implements only the two required methods.
struct Lines;

impl Protocol for Lines {
    type Message = String;
    type RequestId = ();
    type Error = std::string::FromUtf8Error;

    fn encode(&self, msg: &String, dst: &mut BytesMut) -> Result<Option<Bytes>, Self::Error> {
        dst.extend_from_slice(msg.as_bytes());
        Ok(None)
    }

    fn decode(&self, payload: Bytes) -> Result<Option<String>, Self::Error> {
        String::from_utf8(payload.to_vec()).map(Some)
    }
}

#[test]
fn a_two_method_protocol_sends_no_keepalives_and_never_idles_out() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (io, peer) = Mock::new().read(b"\0\0\0\x02hi").build();
    let (tx, mut rx, conn) = Builder::new().build_with_timer(io, Lines, clock.timer());
    let conn = pool.spawner().spawn_local_with_handle(conn).unwrap();
    assert_eq!(pool.run_until(rx.next()).unwrap().unwrap(), "hi");
    // An hour of silence: no keepalive (the protocol has none) and no idle
    // timeout (nothing to expect from the peer).
    clock.advance(Duration::from_secs(3600));
    pool.run_until_stalled();
    assert!(peer.written().is_empty());
    assert!(!tx.is_closed());
    // `call` needs ids the protocol does not make.
    struct Ask;
    impl Call<Lines> for Ask {
        type Output = String;
        fn into_request(self, _: ()) -> String {
            "?".into()
        }
        fn from_response(r: String) -> Result<String, String> {
            Ok(r)
        }
    }
    let err = pool.run_until(tx.call(Ask)).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
    pool.run_until(tx.send("bye".into())).unwrap();
    pool.run_until(tx.flush()).unwrap();
    assert_eq!(peer.written(), b"\0\0\0\x03bye");
    // The peer never closes: dropping the driver ends it here.
    drop(conn);
}

#[test]
fn incoming_is_fused_after_its_end() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (io, _peer) = Mock::new().read(b"\0\0\0\x02\0a").eof().build();
    let (_tx, mut rx, conn) = quiet().build_with_timer(io, Raw, clock.timer());
    pool.spawner()
        .spawn_local(async { conn.await.unwrap() })
        .unwrap();
    assert!(!rx.is_terminated());
    assert_eq!(pool.run_until(rx.next()).unwrap().unwrap(), msg("a"));
    assert!(pool.run_until(rx.next()).is_none());
    assert!(rx.is_terminated());
    assert!(pool.run_until(rx.next()).is_none(), "None again, no panic");
}

#[test]
fn errors_say_whether_the_connection_is_gone_and_convert_to_io_errors() {
    let per_message = [
        Error::MessageTooLarge { len: 9, max: 8 },
        Error::RequestTimeout(Duration::from_secs(1)),
        Error::InvalidRequest("x"),
        Error::UnexpectedResponse,
    ];
    for e in per_message {
        assert!(!e.is_fatal(), "{e}");
    }
    let refused = io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer");
    let fatal = [
        (Error::from(refused), io::ErrorKind::ConnectionReset),
        (
            Error::IdleTimeout(Duration::from_secs(15)),
            io::ErrorKind::TimedOut,
        ),
        (
            Error::FrameTooLarge { len: 9, max: 8 },
            io::ErrorKind::InvalidData,
        ),
        (
            Error::UnexpectedEof { missing: 3 },
            io::ErrorKind::UnexpectedEof,
        ),
        (Error::Closed, io::ErrorKind::NotConnected),
    ];
    for (e, kind) in fatal {
        assert!(e.is_fatal(), "{e}");
        let text = e.to_string();
        let was_io = matches!(e, Error::Io(_));
        let io_err = io::Error::from(e);
        assert_eq!(io_err.kind(), kind, "{text}");
        // The chatpipe error is inside; an I/O error is the original.
        let inner = io_err.get_ref().expect("wrapped").to_string();
        assert_eq!(inner, if was_io { "reset by peer".into() } else { text });
    }
    // The I/O error is the source of `Error::Io`.
    let e = Error::from(io::Error::new(io::ErrorKind::BrokenPipe, "gone"));
    assert_eq!(e.source().unwrap().to_string(), "gone");

    // Per-operation errors: the message comes back, the source is the
    // reason, and they convert too.
    let send = SendError {
        message: msg("m"),
        error: Error::Closed,
    };
    assert!(send.is_fatal());
    assert_eq!(send.source().unwrap().to_string(), "connection closed");
    assert_eq!(
        io::Error::from(send.clone()).kind(),
        io::ErrorKind::NotConnected
    );
    assert_eq!(send.into_inner(), msg("m"));
    let full = TrySendError::Full(msg("m"));
    assert!(!full.is_fatal() && full.source().is_none());
    assert_eq!(io::Error::from(full).kind(), io::ErrorKind::WouldBlock);
    let failed = TrySendError::Failed(SendError {
        message: msg("m"),
        error: Error::MessageTooLarge { len: 9, max: 8 },
    });
    assert!(!failed.is_fatal());
    assert!(failed
        .source()
        .unwrap()
        .to_string()
        .contains("over the maximum"));
    assert_eq!(io::Error::from(failed).kind(), io::ErrorKind::InvalidInput);
}

/// At default settings the largest message the chat protocol can make, a
/// Broadcast of the longest nickname and the longest text, goes through.
#[test]
fn the_largest_chat_broadcast_fits_the_default_frame_limit() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (a, b) = duplex(64 * 1024);
    let (server, _srx, sconn) = Builder::new().build_with_timer(a, Chat, clock.timer());
    let (_client, mut crx, cconn) = Builder::new().build_with_timer(b, Chat, clock.timer());
    let s = pool.spawner();
    s.spawn_local(async { sconn.await.unwrap() }).unwrap();
    s.spawn_local(async { cconn.await.unwrap() }).unwrap();
    let largest = ChatMessage::Broadcast {
        from: "n".repeat(255),
        text: "t".repeat(65_535),
    };
    assert_eq!(chatpipe::chat::MAX_PAYLOAD_LEN, 65_813);
    pool.run_until(server.send(largest.clone())).unwrap();
    assert_eq!(pool.run_until(crx.next()).unwrap().unwrap(), largest);
    // One byte over the protocol's own maximum is still refused.
    let (io, _peer) = Mock::new().read(&65_814u32.to_be_bytes()).build();
    let (_tx, mut rx, conn) = Builder::new().build_with_timer(io, Chat, clock.timer());
    pool.spawner()
        .spawn_local(async {
            conn.await.unwrap_err();
        })
        .unwrap();
    let err = pool.run_until(rx.next()).unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            Error::FrameTooLarge {
                len: 65_814,
                max: 65_813
            }
        ),
        "{err}"
    );
}

#[test]
fn a_nickname_call_reads_ack_and_nak() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (a, b) = duplex(64 * 1024);
    let (client, _crx, cconn) = Builder::new().build_with_timer(a, Chat, clock.timer());
    let (server, mut srx, sconn) = Builder::new().build_with_timer(b, Chat, clock.timer());
    let s = pool.spawner();
    s.spawn_local(async { cconn.await.unwrap() }).unwrap();
    s.spawn_local(async { sconn.await.unwrap() }).unwrap();
    s.spawn_local(async move {
        while let Some(Ok(ChatMessage::SetNickname {
            request_id,
            nickname,
        })) = srx.next().await
        {
            let reply = match nickname.as_str() {
                "taken" => ChatMessage::Nak {
                    request_id,
                    message: "in use".into(),
                },
                _ => ChatMessage::Ack { request_id },
            };
            server.send(reply).await.unwrap();
        }
    })
    .unwrap();
    let ok = pool.run_until(client.call(Nickname("ana".into()))).unwrap();
    assert_eq!(ok, Ok(()));
    let refused = pool
        .run_until(client.call(Nickname("taken".into())))
        .unwrap();
    assert_eq!(refused, Err("in use".to_string()));
    assert!(matches!(
        Chat.kind(&ChatMessage::Keepalive),
        Kind::Keepalive
    ));
}

#[test]
fn stats_count_what_went_each_way() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (io, peer) = Mock::new().read(b"\0\0\0\x02\0a\0\0\0\x03\0bc").build();
    let (tx, mut rx, conn) = quiet().build_with_timer(io, Raw, clock.timer());
    let start = clock.now();
    pool.spawner()
        .spawn_local(async {
            conn.await.unwrap_err();
        })
        .unwrap();
    clock.advance(Duration::from_secs(2));
    assert_eq!(pool.run_until(rx.next()).unwrap().unwrap(), msg("a"));
    tx.try_send(msg("xyz")).unwrap();
    pool.run_until(tx.flush()).unwrap();
    let stats = tx.stats();
    assert_eq!((stats.messages_in, stats.bytes_in), (2, 13));
    assert_eq!((stats.messages_out, stats.bytes_out), (1, 8));
    assert_eq!(stats.queued, 0);
    assert_eq!(stats.last_read, start + Duration::from_secs(2));
    assert_eq!(stats.last_written, start + Duration::from_secs(2));
    assert_eq!(peer.written(), b"\0\0\0\x04\0xyz");
}
