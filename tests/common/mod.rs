//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chatpipe::raw::RawMessage;
use futures_io::{AsyncRead, AsyncWrite};
use smol::net::{TcpListener, TcpStream};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

/// A connected pair of loopback TCP sockets.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (b, _) = listener.accept().await.unwrap();
    (a, b)
}

/// A connected pair of in-memory streams (no runtime needed).
pub fn duplex_pair(
    cap: usize,
) -> (
    Compat<tokio::io::DuplexStream>,
    Compat<tokio::io::DuplexStream>,
) {
    let (a, b) = tokio::io::duplex(cap);
    (a.compat(), b.compat())
}

/// Fails the test if `fut` takes longer than `secs` seconds.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    smol::future::or(fut, async {
        smol::Timer::after(Duration::from_secs(secs)).await;
        panic!("test step took longer than {secs} s");
    })
    .await
}

pub fn msg(s: &str) -> RawMessage {
    RawMessage::Message(Bytes::copy_from_slice(s.as_bytes()))
}

pub fn numbered(i: u32) -> RawMessage {
    RawMessage::Message(Bytes::copy_from_slice(&i.to_be_bytes()))
}

/// A numbered message padded to `len` bytes.
pub fn numbered_padded(i: u32, len: usize) -> RawMessage {
    let mut v = i.to_be_bytes().to_vec();
    v.resize(len.max(4), 0x55);
    RawMessage::Message(v.into())
}

pub fn number_of(m: &RawMessage) -> u32 {
    match m {
        RawMessage::Message(b) if b.len() >= 4 => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        other => panic!("not a numbered message: {other:?}"),
    }
}

/// A frame of the Raw protocol, as bytes on the wire.
pub fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Scripted mock I/O: reads hand out the given chunks one by one with a
/// `Poll::Pending` before each; writes are collected; after the script,
/// reads either end (EOF) or stay pending.
pub struct Scripted {
    chunks: std::collections::VecDeque<Vec<u8>>,
    pending_next: bool,
    pub eof_at_end: bool,
    pub written: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Scripted {
    pub fn new(chunks: Vec<Vec<u8>>, eof_at_end: bool) -> Self {
        Scripted {
            chunks: chunks.into(),
            pending_next: true,
            eof_at_end,
            written: Default::default(),
        }
    }
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending_next {
            self.pending_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let Some(mut chunk) = self.chunks.pop_front() else {
            return if self.eof_at_end {
                Poll::Ready(Ok(0))
            } else {
                Poll::Pending
            };
        };
        let n = chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        if n < chunk.len() {
            self.chunks.push_front(chunk.split_off(n));
        }
        self.pending_next = true;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.lock().unwrap().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A TCP proxy on loopback that forwards both ways until `black_hole` is
/// set; from then on it swallows everything, closing neither socket (a
/// half-open connection, as a dead NAT or a pulled cable makes).
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    pub black_hole: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _task: smol::Task<()>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        use futures::{AsyncReadExt, AsyncWriteExt};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let black_hole = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bh = black_hole.clone();
        let task = smol::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(target).await.unwrap();
            let pump = |mut from: TcpStream,
                        mut to: TcpStream,
                        bh: std::sync::Arc<std::sync::atomic::AtomicBool>| async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match from.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if !bh.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            };
            let up = pump(client.clone(), server.clone(), bh.clone());
            let down = pump(server, client, bh);
            futures::future::join(up, down).await;
        });
        Proxy {
            addr,
            black_hole,
            _task: task,
        }
    }
}
