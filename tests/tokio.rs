//! The core of the suite again on tokio, through `Builder::build_tokio`:
//! tokio streams as they are, tokio's timer, no compat layer. Timeouts run
//! on tokio's paused clock, so no test waits for real time.
#![cfg(feature = "tokio")]

use std::time::Duration;

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::{Builder, Error};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (b, _) = listener.accept().await.unwrap();
    (a, b)
}

fn numbered(i: u32) -> RawMessage {
    RawMessage::Message(Bytes::copy_from_slice(&i.to_be_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_both_ways_and_clean_close_on_tokio() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (a, b) = tcp_pair().await;
        let (atx, mut arx, aconn) = Builder::new().build_tokio(a, Raw);
        let (btx, mut brx, bconn) = Builder::new().build_tokio(b, Raw);
        let aconn = tokio::spawn(aconn);
        let bconn = tokio::spawn(bconn);
        let sender = tokio::spawn(async move {
            for i in 0..20_000 {
                atx.send(numbered(i)).await.unwrap();
            }
            atx
        });
        for i in 0..20_000u32 {
            assert_eq!(brx.next().await.unwrap().unwrap(), numbered(i));
        }
        btx.send(numbered(7)).await.unwrap();
        assert_eq!(arx.next().await.unwrap().unwrap(), numbered(7));
        sender.await.unwrap().close();
        assert!(brx.next().await.is_none());
        assert!(arx.next().await.is_none());
        aconn.await.unwrap().unwrap();
        bconn.await.unwrap().unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_forwards_a_stream_and_flush_puts_it_on_the_wire() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (a, b) = tcp_pair().await;
        let (mut atx, _arx, aconn) = Builder::new().send_capacity(16).build_tokio(a, Raw);
        let (_btx, brx, bconn) = Builder::new().build_tokio(b, Raw);
        let aconn = tokio::spawn(aconn);
        tokio::spawn(bconn);
        let mut source = futures::stream::iter((0..5_000).map(|i| Ok(numbered(i))));
        atx.send_all(&mut source).await.unwrap();
        // `send_all` flushed: every message has been handed to the socket.
        assert_eq!(atx.stats().messages_out, 5_000);
        SinkExt::close(&mut atx).await.unwrap();
        let got: Vec<_> = brx.map(Result::unwrap).collect().await;
        assert_eq!(got, (0..5_000).map(numbered).collect::<Vec<_>>());
        aconn.await.unwrap().unwrap();
    })
    .await
    .unwrap();
}

/// Requests whose ids the connection picks, answered in reverse order.
#[tokio::test(start_paused = true)]
async fn pipelined_calls_and_a_request_timeout_on_paused_time() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let cfg = Builder::new().request_timeout(Duration::from_secs(5));
    let (client, _crx, cconn) = cfg.build_tokio(a, Raw);
    let (server, mut srx, sconn) = cfg.build_tokio(b, Raw);
    let cconn = tokio::spawn(cconn);
    tokio::spawn(sconn);
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(Ok(RawMessage::Request { id, body })) = srx.next().await {
            if body.as_ref() == b"never" {
                continue;
            }
            batch.push((id, body));
            if batch.len() == 3 {
                for (id, body) in batch.drain(..).rev() {
                    let _ = server.send(RawMessage::Response { id, body }).await;
                }
            }
        }
    });
    let (x, y, z) = futures::join!(
        client.call(Bytes::from("x")),
        client.call(Bytes::from("y")),
        client.call(Bytes::from("z")),
    );
    assert_eq!(
        (x.unwrap(), y.unwrap(), z.unwrap()),
        ("x".into(), "y".into(), "z".into())
    );

    let start = tokio::time::Instant::now();
    let err = client.call(Bytes::from("never")).await.unwrap_err();
    assert!(matches!(err, Error::RequestTimeout(_)), "{err}");
    assert!(
        !err.is_fatal(),
        "a timed-out request leaves the connection up"
    );
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(5),
        "on tokio's paused clock"
    );
    client.close();
    cconn.await.unwrap().unwrap();
}

/// A peer that never says anything: keepalives go out every interval, and
/// the connection gives up after the idle timeout, on virtual time.
#[tokio::test(start_paused = true)]
async fn keepalives_and_idle_timeout_on_paused_time() {
    let (a, mut silent_peer) = tokio::io::duplex(64 * 1024);
    let (_tx, mut rx, conn) = Builder::new()
        .keepalive_interval(Some(Duration::from_secs(5)))
        .build_tokio(a, Raw);
    let start = tokio::time::Instant::now();
    let err = tokio::spawn(conn).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::IdleTimeout(_)), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(15), "3 x the interval");
    assert!(matches!(rx.next().await, Some(Err(Error::IdleTimeout(_)))));
    // Keepalives at 5 s and 10 s (at 15 s the idle timeout came first).
    let mut seen = Vec::new();
    silent_peer.read_to_end(&mut seen).await.unwrap();
    assert_eq!(seen, [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]].concat());
    // tokio's timer did it all: no async-io reactor thread was started.
    #[cfg(target_os = "linux")]
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "async-io", "an async-io thread is running");
    }
}
