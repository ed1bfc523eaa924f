//! One end of a loopback TCP connection speaks through tokio-util's
//! `LengthDelimitedCodec` with its default configuration, the other is a
//! chatpipe connection with the chat protocol: frames go both ways intact.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use chatpipe::chat::{Chat, ChatMessage, RequestId};
use chatpipe::Builder;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::TokioAsyncReadCompatExt;

/// Payloads written out by hand from PROTOCOL.md, independent of the
/// encoder under test.
fn payload(kind: u32, fields: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32(kind);
    for f in fields {
        b.put_slice(f);
    }
    b.freeze()
}

fn short(s: &str) -> Vec<u8> {
    [&[s.len() as u8][..], s.as_bytes()].concat()
}

fn long(s: &str) -> Vec<u8> {
    [&(s.len() as u16).to_be_bytes()[..], s.as_bytes()].concat()
}

#[tokio::test]
async fn length_delimited_codec_and_chatpipe_exchange_frames() {
    tokio::time::timeout(Duration::from_secs(20), exchange())
        .await
        .expect("the exchange finished in time");
}

async fn exchange() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, connected) = tokio::join!(listener.accept(), TcpStream::connect(addr));
    let mut codec = Framed::new(accepted.unwrap().0, LengthDelimitedCodec::new());

    // chatpipe on the same tokio runtime, through the futures-io adapter;
    // no keepalives so every frame the codec sees is one we sent.
    let (sender, mut incoming, conn) = Builder::new()
        .keepalive_interval(None)
        .build(connected.unwrap().compat(), Chat);
    let driver = tokio::spawn(conn);

    // Codec -> chatpipe: every type a client may receive or a server
    // may get, an unknown type and a keepalive that must be skipped, and
    // a frame near the maximum.
    let id = RequestId([7; 16]);
    let big = "é".repeat(30_000);
    let frames = [
        payload(0, &[&long("Hi")]),
        payload(9, &[b"from the future"]),
        payload(1, &[&short("ana"), &long("hello, bo")]),
        payload(2, &[]),
        payload(3, &[&id.0, &short("bo")]),
        payload(0, &[&long(&big)]),
        payload(0, &[&long("")]),
    ];
    for f in &frames {
        codec.send(f.clone()).await.unwrap();
    }
    let expected = [
        ChatMessage::Chat { text: "Hi".into() },
        ChatMessage::Broadcast {
            from: "ana".into(),
            text: "hello, bo".into(),
        },
        ChatMessage::SetNickname {
            request_id: id,
            nickname: "bo".into(),
        },
        ChatMessage::Chat { text: big.clone() },
        ChatMessage::Chat {
            text: String::new(),
        },
    ];
    for want in expected {
        assert_eq!(incoming.next().await.unwrap().unwrap(), want);
    }

    // chatpipe -> codec: each message arrives as exactly the hand-written
    // payload.
    let sent = [
        (
            ChatMessage::Nak {
                request_id: id,
                message: "taken".into(),
            },
            payload(5, &[&id.0, &long("taken")]),
        ),
        (
            ChatMessage::Broadcast {
                from: "127.0.0.1:50312".into(),
                text: big.clone(),
            },
            payload(1, &[&short("127.0.0.1:50312"), &long(&big)]),
        ),
        (ChatMessage::Keepalive, payload(2, &[])),
        (
            ChatMessage::Chat { text: "Hi".into() },
            Bytes::from_static(&[0, 0, 0, 0, 0, 2, 0x48, 0x69]),
        ),
    ];
    for (msg, _) in &sent {
        sender.send(msg.clone()).await.unwrap();
    }
    for (_, want) in &sent {
        let got = codec.next().await.unwrap().unwrap();
        assert_eq!(got.freeze(), want);
    }

    // A request from chatpipe, answered by the codec side with an Ack
    // carrying the id it read off the wire.
    let request = ChatMessage::set_nickname("cy");
    let ChatMessage::SetNickname { request_id, .. } = request else {
        unreachable!()
    };
    let (answer, ()) = tokio::join!(sender.request(request), async {
        let got = codec.next().await.unwrap().unwrap();
        assert_eq!(got.freeze(), payload(3, &[&request_id.0, &short("cy")]));
        codec.send(payload(4, &[&request_id.0])).await.unwrap();
    });
    assert_eq!(answer.unwrap(), ChatMessage::Ack { request_id });

    // A clean close reaches the codec as the end of the stream, and the
    // codec closing ends chatpipe cleanly.
    sender.close();
    assert!(codec.next().await.is_none());
    SinkExt::<Bytes>::close(&mut codec).await.unwrap();
    drop(codec);
    driver.await.unwrap().unwrap();
    assert!(incoming.next().await.is_none());
}
