//! Tokio support (feature `tokio`): the timer and the I/O adapter behind
//! [`Builder::build_tokio`](crate::Builder::build_tokio).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use crate::{Connection, Timer};

/// The driver of a connection over a tokio stream, as
/// [`Builder::build_tokio`](crate::Builder::build_tokio) returns it.
pub type TokioConnection<T, P> = Connection<TokioIo<T>, P, TokioTimer>;

/// A [`Timer`] over tokio's: no thread of its own, and it follows tokio's
/// clock, so a test runtime with paused time (`#[tokio::test(start_paused
/// = true)]`) runs connections on virtual time.
///
/// It can be created anywhere; it must be *polled* inside a tokio runtime
/// (as everything spawned with `tokio::spawn` is).
#[derive(Debug, Default)]
pub struct TokioTimer {
    deadline: Option<Instant>,
    // Created on the first poll, so that building a connection needs no
    // runtime.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Timer for TokioTimer {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn reset(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
        if let Some(sleep) = &mut self.sleep {
            sleep.as_mut().reset(deadline.into());
        }
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(deadline) = self.deadline else {
            return Poll::Pending;
        };
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        sleep.as_mut().poll(cx)
    }
}

/// A tokio `AsyncRead + AsyncWrite` seen as a `futures-io` one, which is
/// what the connection drives. You rarely name it: [`Builder::build_tokio`]
/// wraps your stream in it.
///
/// Unlike tokio-util's `Compat`, it forwards vectored writes, which the
/// connection uses to write large payloads without copying them.
///
/// [`Builder::build_tokio`]: crate::Builder::build_tokio
#[derive(Debug)]
pub struct TokioIo<T>(pub T);

impl<T> TokioIo<T> {
    /// The wrapped stream.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T: tokio::io::AsyncRead + Unpin> futures_io::AsyncRead for TokioIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut buf = tokio::io::ReadBuf::new(buf);
        ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(buf.filled().len()))
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> futures_io::AsyncWrite for TokioIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
