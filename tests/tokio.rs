//! The core of the suite again on tokio: chatpipe depends on no executor.
//! Sockets come through tokio-util's compat layer; timers are either the
//! default (async-io's, which runs anywhere) or tokio's own.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::{Builder, Error, Timer};
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

const MS: Duration = Duration::from_millis(1);

/// chatpipe's `Timer` over tokio's `Sleep`.
struct TokioTimer(Pin<Box<tokio::time::Sleep>>);

impl TokioTimer {
    fn new() -> Self {
        TokioTimer(Box::pin(tokio::time::sleep(Duration::from_secs(3600))))
    }
}

impl Timer for TokioTimer {
    fn reset(&mut self, deadline: Instant) {
        self.0.as_mut().reset(deadline.into());
    }
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

use std::future::Future;

async fn tcp_pair() -> (Compat<TcpStream>, Compat<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (b, _) = listener.accept().await.unwrap();
    (a.compat(), b.compat())
}

fn numbered(i: u32) -> RawMessage {
    RawMessage::Message(Bytes::copy_from_slice(&i.to_be_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_both_ways_and_clean_close_on_tokio() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (a, b) = tcp_pair().await;
        let (atx, mut arx, aconn) = Builder::new().build(a, Raw);
        let (btx, mut brx, bconn) = Builder::new().build(b, Raw);
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

#[tokio::test]
async fn requests_on_tokio_with_tokio_timers() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (a, b) = tcp_pair().await;
        let cfg = Builder::new().request_timeout(50 * MS);
        let (client, _crx, cconn) = cfg.build_with_timer(a, Raw, TokioTimer::new());
        let (server, mut srx, sconn) = cfg.build_with_timer(b, Raw, TokioTimer::new());
        let cconn = tokio::spawn(cconn);
        tokio::spawn(sconn);
        tokio::spawn(async move {
            while let Some(Ok(RawMessage::Request { id, body })) = srx.next().await {
                if id != 0 {
                    server
                        .send(RawMessage::Response { id, body })
                        .await
                        .unwrap();
                }
            }
        });
        let r = client
            .request(RawMessage::Request {
                id: 1,
                body: "q".into(),
            })
            .await
            .unwrap();
        assert_eq!(
            r,
            RawMessage::Response {
                id: 1,
                body: "q".into()
            }
        );
        // Id 0 is never answered: the tokio timer fires the timeout.
        let err = client
            .request(RawMessage::Request {
                id: 0,
                body: "q".into(),
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::RequestTimeout(_)), "{err}");
        client.close();
        cconn.await.unwrap().unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn idle_timeout_on_tokio() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (a, _silent_peer) = tcp_pair().await;
        let (_tx, mut rx, conn) = Builder::new()
            .keepalive_interval(Some(20 * MS))
            .idle_timeout(Some(80 * MS))
            .build_with_timer(a, Raw, TokioTimer::new());
        let start = Instant::now();
        let err = tokio::spawn(conn).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::IdleTimeout(_)), "{err}");
        assert!(start.elapsed() >= 80 * MS && start.elapsed() < 1000 * MS);
        assert!(matches!(rx.next().await, Some(Err(Error::IdleTimeout(_)))));
    })
    .await
    .unwrap();
}
