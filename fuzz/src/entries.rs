//! The fuzz targets' logic. The libFuzzer targets in `fuzz_targets/` call
//! these functions, and the main crate's `tests/fuzz_corpus.rs` includes
//! this file with `#[path]` to replay the corpus on stable: so it may use
//! only `chatpipe`, `bytes`, `futures` and std.
//!
//! Input layout, for both targets:
//!
//! ```text
//! config: u8 | flags << 4 | n: u8 | n chunk sizes: u8 each | the byte stream...
//! ```
//!
//! The stream is fed in chunks whose sizes cycle through the chunk sizes
//! (one chunk when there are none), so the fuzzer explores splits too.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatpipe::frame::{self, Decoder};
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::test_util::{ManualClock, Mock};
use chatpipe::{Builder, Error, Protocol};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use futures::{FutureExt, StreamExt};

struct Input<'a> {
    config: u8,
    /// More configuration: the high 4 bits of the second byte.
    flags: u8,
    sizes: &'a [u8],
    stream: &'a [u8],
}

fn parse(data: &[u8]) -> Input<'_> {
    let (config, rest) = data.split_first().unwrap_or((&0, &[]));
    let (second, rest) = rest.split_first().unwrap_or((&0, &[]));
    let n = usize::from(second & 15).min(rest.len());
    Input {
        config: *config,
        flags: second >> 4,
        sizes: &rest[..n],
        stream: &rest[n..],
    }
}

/// Cuts `stream` into chunks of `min` + the sizes, cycled.
fn chunks<'a>(stream: &'a [u8], sizes: &[u8], min: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    // Bounded even when every size is 0; the rest goes in one last chunk.
    for &size in sizes.iter().cycle().take(stream.len() + sizes.len()) {
        if at == stream.len() {
            break;
        }
        let end = (at + min + usize::from(size)).min(stream.len());
        out.push(&stream[at..end]);
        at = end;
    }
    if at < stream.len() {
        out.push(&stream[at..]);
    }
    out
}

// ---------------------------------------------------------------------------
// frame_decoder

/// Feeds the stream to [`Decoder`] whole and in chunks, under several
/// maximums: both must give the same frames and the same end, no payload
/// is over the maximum, and the decoder never grows the buffer.
pub fn frame_decoder(data: &[u8]) {
    let input = parse(data);
    let split = chunks(input.stream, input.sizes, 0);
    for max in [0, 16, 1024, frame::DEFAULT_MAX_FRAME_LEN] {
        let whole = decode_all(max, &[input.stream]);
        assert_eq!(
            whole,
            decode_all(max, &split),
            "chunking changed the result"
        );
        // The frames are exactly a prefix of the stream, re-encoded.
        let mut wire = BytesMut::new();
        for f in &whole.frames {
            frame::encode(f, max, &mut wire).expect("a decoded frame fits the maximum");
        }
        assert!(input.stream.starts_with(&wire));
    }
}

#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<Bytes>,
    /// The error, or how the stream ended.
    end: String,
}

fn decode_all(max: usize, chunks: &[&[u8]]) -> Decoded {
    let mut dec = Decoder::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let cap = buf.capacity();
            let res = dec.decode(&mut buf);
            // Memory follows the bytes that arrived, never a header's claim.
            assert!(buf.capacity() <= cap, "the decoder grew the buffer");
            match res {
                Ok(Some(payload)) => {
                    assert!(payload.len() <= max, "payload over the maximum");
                    frames.push(payload);
                }
                Ok(None) => {
                    assert!(dec.remaining(&buf) > 0, "Ok(None) yet nothing missing");
                    break;
                }
                Err(e) => {
                    let Error::FrameTooLarge { len, max: m } = e else {
                        panic!("unexpected decoder error {e:?}");
                    };
                    assert!(len > max as u64 && m == max, "{e:?}");
                    // A decoder must not be used after an error.
                    return Decoded {
                        frames,
                        end: e.to_string(),
                    };
                }
            }
        }
    }
    let end = match dec.is_mid_frame(&buf) {
        true => format!("mid-frame, {} missing", dec.remaining(&buf)),
        false => "clean".to_string(),
    };
    Decoded { frames, end }
}

// ---------------------------------------------------------------------------
// connection

/// The ids of the requests outstanding while the input is read: responses
/// with these ids match them (once each).
const REQUEST_IDS: [u64; 3] = [1, 2, 3];

/// The id of a request abandoned (its future dropped) before the driver
/// starts, under flag bit 1: its first response is ignored as late.
const ABANDONED_ID: u64 = 4;

/// A value one task leaves for the checks at the end.
type Slot<T> = Rc<RefCell<T>>;

/// Long enough never to fire during a run.
const HOUR: Duration = Duration::from_secs(3600);

/// Runs a whole connection whose peer sends the stream (in chunks, with
/// `Pending` between them, then EOF) while three requests are outstanding
/// and a sender sends a few messages, all on one thread.
///
/// Checks it against a model of the stream (the frame decoder and the Raw
/// protocol): the driver's outcome, the messages delivered, which requests
/// were answered; that every handle sees the same end; that after a clean
/// close everything accepted for sending was written as whole frames; and
/// that nothing hangs (a bounded number of polls, and no stall without a
/// wakeup).
///
/// Config bits: 0 max frame 1024 (else 64), 1 keepalive of an hour (else
/// none), 2 receive capacity 1 (else 64), 3 the sender closes after its
/// sends, 4-5 bytes per write (all, 1, 5, 100), 6 every write is
/// `Pending` first, 7 the application yields after each message. Flag
/// bits: 0 the sends are queued before the driver starts, 1 a request is
/// abandoned before it starts, 2 the application drops `Incoming` at once.
pub fn connection(data: &[u8]) {
    let input = parse(data);
    let cfg = input.config;
    let max = if cfg & 1 != 0 { 1024 } else { 64 };
    let close_early = cfg & 8 != 0;
    let abandon = input.flags & 2 != 0;
    let drop_incoming = input.flags & 4 != 0;
    let slow_reader = cfg & 0x80 != 0;

    // The peer: each chunk (at least 1 byte: an empty read would mean EOF)
    // after a `Pending`, then EOF; writes of at most a few bytes, each
    // `Pending` first if asked.
    let mut mock = Mock::new().max_write([usize::MAX, 1, 5, 100][usize::from(cfg >> 4 & 3)]);
    for chunk in chunks(input.stream, input.sizes, 1) {
        mock = mock.read_pending().read(chunk);
    }
    if cfg & 0x40 != 0 {
        mock = mock.pending_each_write();
    }
    let (io, peer) = mock.eof().build();
    // A clock that never moves: every timeout is an hour or off, and a
    // real clock would make runs depend on the time they take.
    let clock = ManualClock::new();
    let (sender, incoming, mut conn) = Builder::new()
        .max_frame_len(max)
        .send_capacity(16)
        .receive_capacity(if cfg & 4 != 0 { 1 } else { 64 })
        .keepalive_interval((cfg & 2 != 0).then_some(HOUR))
        .idle_timeout(None)
        .frame_timeout(None)
        .write_timeout(None)
        .request_timeout(HOUR)
        .build_with_timer(io, Raw, clock.timer());

    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    let spawn = |fut: Pin<Box<dyn Future<Output = ()>>>| spawner.spawn_local(fut).expect("spawn");

    // Requests first, run until they wait for their answers: they are then
    // in the queue before the driver reads a byte, and the outcome depends
    // on the input alone.
    let replies: Vec<Slot<Option<Result<RawMessage, Error>>>> =
        REQUEST_IDS.iter().map(|_| Default::default()).collect();
    for (&id, slot) in REQUEST_IDS.iter().zip(&replies) {
        let (sender, slot) = (sender.clone(), slot.clone());
        spawn(Box::pin(async move {
            let body = Bytes::from_static(b"q");
            *slot.borrow_mut() = Some(sender.request(RawMessage::Request { id, body }).await);
        }));
    }
    pool.run_until_stalled();
    if abandon {
        // Polled once, so queued, then dropped while it waits.
        let body = Bytes::new();
        let id = ABANDONED_ID;
        assert!(sender
            .request(RawMessage::Request { id, body })
            .now_or_never()
            .is_none());
    }

    // The application sends a few messages (one always too large, one too
    // large under the small maximum), before the driver starts (flag 1) or
    // alongside it.
    let sends: Slot<Vec<(RawMessage, Result<(), Error>)>> = Default::default();
    let sent_all = Rc::new(Cell::new(false));
    let (s, log, done) = (sender.clone(), sends.clone(), sent_all.clone());
    let mut send_task = Some(Box::pin(async move {
        for msg in outgoing() {
            let res = s.send(msg.clone()).await.map_err(|e| e.error);
            log.borrow_mut().push((msg, res));
        }
        if close_early {
            s.close();
        }
        done.set(true);
    }));
    if input.flags & 1 != 0 {
        spawn(send_task.take().expect("not spawned yet"));
        pool.run_until_stalled();
    }

    // The driver, with a bound on polls so a livelock fails instead of
    // hanging: polls grow with chunks and writes, both bounded by the input.
    let outcome: Slot<Option<Result<(), Error>>> = Default::default();
    let limit = 8 * (input.stream.len() + 4096);
    let slot = outcome.clone();
    spawn(Box::pin(async move {
        let mut polls = 0;
        let res = futures::future::poll_fn(|cx| {
            polls += 1;
            assert!(polls <= limit, "driver not done after {limit} polls");
            Pin::new(&mut conn).poll(cx)
        })
        .await;
        *slot.borrow_mut() = Some(res);
    }));
    if let Some(task) = send_task {
        spawn(task);
    }

    // The application also takes every incoming item, or drops the stream
    // (then messages are discarded and responses still reach requests).
    let received: Slot<Vec<Result<RawMessage, Error>>> = Default::default();
    let incoming_ended = Rc::new(Cell::new(drop_incoming));
    let (rec, ended) = (received.clone(), incoming_ended.clone());
    if drop_incoming {
        drop(incoming);
    } else {
        spawn(Box::pin(async move {
            let mut incoming = incoming;
            while let Some(item) = incoming.next().await {
                rec.borrow_mut().push(item);
                if slow_reader {
                    yield_now().await;
                }
            }
            ended.set(true);
        }));
    }
    pool.run_until_stalled();

    // Nothing may be left waiting: the input ended in EOF.
    let outcome = outcome
        .take()
        .expect("stalled: the driver neither resolved nor asked to be polled again");
    assert!(incoming_ended.get(), "the incoming stream did not end");
    assert!(sent_all.get(), "a send never resolved");

    let expected = model(input.stream, max, abandon);
    let error = outcome.as_ref().err();
    assert_eq!(error.map(kind), expected.error, "driver outcome");
    let reason = error.cloned().unwrap_or(Error::Closed);
    assert_eq!(
        sender.close_reason().as_ref().map(kind),
        Some(kind(&reason))
    );

    // Incoming: the expected messages in order, then the driver's error once.
    let mut received = received.take();
    if let Some(Err(e)) = received.last() {
        assert_eq!(Some(e.to_string()), error.map(ToString::to_string));
        received.pop();
    } else {
        assert!(
            error.is_none() || drop_incoming,
            "the incoming stream ended without the error"
        );
    }
    let delivered: Vec<RawMessage> = received
        .into_iter()
        .map(|r| r.expect("an error before the end of the stream"))
        .collect();
    if !drop_incoming {
        assert_eq!(delivered, expected.delivered);
    }

    // Sends: accepted if within the maximum, else refused alone (the
    // connection carries on); or failed with the connection's reason.
    let mut accepted = Vec::new();
    for (msg, res) in sends.take() {
        let len = payload_len(&msg);
        match res {
            Ok(()) => {
                assert!(len <= max, "a message over the maximum was accepted");
                accepted.push(msg);
            }
            Err(Error::MessageTooLarge { len: l, .. }) if len > max => assert_eq!(l, len as u64),
            Err(e) => assert_eq!(kind(&e), kind(&reason), "send failed"),
        }
    }

    // Requests: answered by their response, or failed with the reason.
    for (answer, slot) in expected.answers.iter().zip(&replies) {
        match (answer, slot.take().expect("a request never resolved")) {
            (Some(want), Ok(got)) => assert_eq!(&got, want),
            (None, Err(e)) => assert_eq!(kind(&e), kind(&reason)),
            (want, got) => panic!("request: expected {want:?}, got {got:?}"),
        }
    }

    // After a clean close, everything accepted was written, in whole frames,
    // and the write half was shut.
    if outcome.is_ok() {
        assert!(
            peer.is_shut(),
            "clean close without shutting the write half"
        );
        assert!(
            !peer.written_after_shut(),
            "write after the write half was shut"
        );
        let mut ids = Vec::new();
        let mut others = Vec::new();
        for msg in decode_wire(&peer.written(), max) {
            match msg {
                RawMessage::Request { id, .. } => ids.push(id),
                other => others.push(other),
            }
        }
        ids.sort_unstable();
        let mut want = REQUEST_IDS.to_vec();
        want.extend(abandon.then_some(ABANDONED_ID));
        assert_eq!(ids, want);
        assert_eq!(others, accepted);
    }
}

/// What the application sends, in order.
fn outgoing() -> Vec<RawMessage> {
    vec![
        RawMessage::Message(Bytes::from_static(b"hi")),
        e_msg(600),
        RawMessage::Keepalive,
        e_msg(2000),
        RawMessage::Message(Bytes::from_static(b"bye")),
    ]
}

/// A message whose payload is `len` bytes long.
fn e_msg(len: usize) -> RawMessage {
    RawMessage::Message(vec![b'e'; len - 1].into())
}

fn payload_len(msg: &RawMessage) -> usize {
    match msg {
        RawMessage::Message(b) => 1 + b.len(),
        RawMessage::Keepalive => 1,
        RawMessage::Request { body, .. } | RawMessage::Response { body, .. } => 9 + body.len(),
    }
}

/// An error's variant and, where the input fixes them, its fields: not the
/// wording, which may change.
fn kind(e: &Error) -> String {
    match e {
        Error::FrameTooLarge { len, max } => format!("FrameTooLarge {len} {max}"),
        Error::UnexpectedEof { missing } => format!("UnexpectedEof {missing}"),
        other => format!("{other:?}")
            .split(['(', ' ', '{'])
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

#[derive(Debug, Default)]
struct Expected {
    delivered: Vec<RawMessage>,
    /// The response each of [`REQUEST_IDS`] gets, if any.
    answers: [Option<RawMessage>; 3],
    error: Option<String>,
}

/// What a connection must make of `stream`, decoded in one piece;
/// `abandoned`: the request [`ABANDONED_ID`] was issued and abandoned.
fn model(stream: &[u8], max: usize, mut abandoned: bool) -> Expected {
    let mut dec = Decoder::new(max);
    let mut buf = BytesMut::from(stream);
    let mut exp = Expected::default();
    let error = loop {
        let payload = match dec.decode(&mut buf) {
            Ok(Some(payload)) => payload,
            Ok(None) if dec.is_mid_frame(&buf) => {
                let missing = dec.remaining(&buf);
                break Some(Error::UnexpectedEof { missing });
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        };
        match Raw.decode(payload) {
            Err(e) => break Some(Error::Malformed(Arc::new(e))),
            Ok(None | Some(RawMessage::Keepalive)) => {}
            Ok(Some(msg @ RawMessage::Response { id, .. })) => {
                let slot = REQUEST_IDS
                    .iter()
                    .position(|&r| r == id)
                    .and_then(|i| exp.answers.get_mut(i))
                    .filter(|slot| slot.is_none());
                match slot {
                    Some(slot) => *slot = Some(msg),
                    // A late response is ignored, once.
                    None if id == ABANDONED_ID && abandoned => abandoned = false,
                    // Never issued, or answered already.
                    None => break Some(Error::Protocol(String::new())),
                }
            }
            Ok(Some(msg)) => exp.delivered.push(msg),
        }
    };
    exp.error = error.as_ref().map(kind);
    exp
}

/// Decodes what the connection wrote, which must be whole Raw frames.
fn decode_wire(wire: &[u8], max: usize) -> Vec<RawMessage> {
    let mut dec = Decoder::new(max);
    let mut buf = BytesMut::from(wire);
    let mut out = Vec::new();
    while let Some(payload) = dec.decode(&mut buf).expect("written frame over max") {
        out.push(
            Raw.decode(payload)
                .expect("written frame")
                .expect("known type"),
        );
    }
    assert!(!dec.is_mid_frame(&buf), "a partial frame was written");
    out
}

/// Returns `Pending` once, asking to be polled again.
async fn yield_now() {
    let mut yielded = false;
    futures::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// The chat protocol's decoder on one arbitrary payload: it never panics,
/// and whatever it accepts encodes again (within the field limits) and
/// decodes to the same message. Unknown types are skipped (`Ok(None)`).
pub fn chat_decoder(data: &[u8]) {
    use chatpipe::chat::Chat;
    let Ok(Some(msg)) = Chat.decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let mut buf = BytesMut::new();
    let body = Chat
        .encode(&msg, &mut buf)
        .unwrap_or_else(|e| panic!("a decoded message must encode again: {e} ({msg:?})"));
    if let Some(body) = body {
        buf.extend_from_slice(&body);
    }
    let again = Chat.decode(buf.freeze());
    assert!(
        matches!(&again, Ok(Some(m)) if *m == msg),
        "round trip changed {msg:?} into {again:?}"
    );
}
