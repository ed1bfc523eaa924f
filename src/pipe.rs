//! The byte pipes: one owner of both directions of an
//! `AsyncRead + AsyncWrite`, with a bounded read buffer and a write queue
//! that coalesces frames. It knows frames, not messages.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_io::{AsyncRead, AsyncWrite};

use crate::frame::Decoder;
use crate::Error;

/// The most one read takes in.
const MAX_READ: usize = 64 * 1024;

/// The first read's size; it doubles while reads fill it, up to `MAX_READ`.
const MIN_READ: usize = 1024;
/// Pieces at least this long are queued as they are (vectored, no copy);
/// shorter ones are copied together into one buffer.
pub(crate) const COPY_BELOW: usize = 4 * 1024;
/// Most slices handed to one vectored write.
const MAX_IOVS: usize = 64;
/// Frames at least this long (header included) that do not fit the read
/// buffer are read into a buffer of their own, sized to them.
const LARGE_FRAME: usize = 16 * 1024;
/// Most buffers of large frames kept for reuse, and the largest kept:
/// rarer, larger frames' memory goes back as soon as they are dropped.
const RECYCLE: usize = 4;
const RECYCLE_MAX: usize = 2 * MAX_READ;

pub(crate) struct Pipe<T> {
    io: T,
    decoder: Decoder,
    /// `filled` bytes received and not yet decoded, then spare room that
    /// reads write into. Safe code must hand `poll_read` initialised
    /// memory; keeping the spare room in the buffer means it is zeroed once
    /// when allocated, not before every read.
    read_buf: BytesMut,
    filled: usize,
    read_size: usize,
    read_eof: bool,
    /// The frame being read has `read_buf` to itself, sized to it: reads
    /// stop at its end, so that the whole buffer goes with it.
    large: bool,
    /// Buffers of large frames handed to the application, to read into
    /// again once it has dropped them (they are ours alone then): fresh
    /// memory costs a page fault per page, and its zeroing. At most
    /// `RECYCLE`; given back when the connection goes idle.
    recycled: VecDeque<Bytes>,
    /// The read buffer before `read_buf`, kept to read into again once the
    /// application has dropped every message in it (see `top_up`); empty
    /// when there is none.
    spare: BytesMut,
    /// Total bytes read; the driver watches it for liveness.
    pub bytes_read: u64,
    /// Total bytes written; the driver watches it for write progress.
    pub bytes_written: u64,
    /// Frozen pieces, in order, all before `tail`.
    chunks: VecDeque<Bytes>,
    /// Small frames copied together.
    tail: BytesMut,
    queued: usize,
    /// Where queued frames end (counted in bytes ever queued), how many end
    /// there, and how many markers (see `mark`) stand there: tells how many
    /// were never written if the connection fails, and what `flush` waits on.
    frame_ends: VecDeque<(u64, usize, usize)>,
    unwritten_frames: usize,
    bytes_queued: u64,
    needs_flush: bool,
    /// Frames completely written, and of those, flushed.
    frames_written: u64,
    frames_flushed: u64,
    /// Markers reached by the writes, and of those, flushed.
    marks_written: u64,
    marks_flushed: u64,
}

impl<T> Pipe<T> {
    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Frames queued and not completely written.
    pub fn unwritten_frames(&self) -> usize {
        self.unwritten_frames
    }

    /// Frames completely written.
    pub fn frames_written(&self) -> u64 {
        self.frames_written
    }

    /// Frames written, then flushed: handed to the transport.
    pub fn frames_flushed(&self) -> u64 {
        self.frames_flushed
    }

    /// Markers whose place in the stream was written and flushed.
    pub fn marks_flushed(&self) -> u64 {
        self.marks_flushed
    }

    /// Places a marker after everything queued so far: it counts as
    /// flushed once all of that is. For a message settled without being
    /// written (a refused request), so `flush` waits for what came before.
    pub fn mark(&mut self) {
        match self.frame_ends.back_mut() {
            Some(end) if end.0 == self.bytes_queued => end.2 += 1,
            Some(_) => self.frame_ends.push_back((self.bytes_queued, 0, 1)),
            // Everything queued was written: only a flush may be due.
            None => {
                self.marks_written += 1;
                if !self.needs_flush {
                    self.marks_flushed = self.marks_written;
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Pipe<T> {
    pub fn new(io: T, max_frame_len: usize) -> Self {
        Pipe {
            io,
            decoder: Decoder::new(max_frame_len),
            read_buf: BytesMut::new(),
            filled: 0,
            read_size: MIN_READ,
            read_eof: false,
            large: false,
            recycled: VecDeque::new(),
            spare: BytesMut::new(),
            bytes_read: 0,
            bytes_written: 0,
            chunks: VecDeque::new(),
            tail: BytesMut::new(),
            queued: 0,
            frame_ends: VecDeque::new(),
            unwritten_frames: 0,
            bytes_queued: 0,
            needs_flush: false,
            frames_written: 0,
            frames_flushed: 0,
            marks_written: 0,
            marks_flushed: 0,
        }
    }

    /// True once the peer's EOF has been read (frames before it may still
    /// be buffered).
    pub fn read_eof(&self) -> bool {
        self.read_eof
    }

    /// True if a frame is partly received.
    pub fn is_mid_frame(&self) -> bool {
        self.filled > 0
    }

    /// The next frame's payload; `Ok(None)` at a clean end of stream.
    #[cfg(test)]
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, Error>> {
        self.poll_frame_reading(cx, true)
    }

    /// [`Pipe::poll_frame`], or with `may_read` false only what is already
    /// buffered: `Pending` (nothing registered) when no whole frame is.
    pub fn poll_frame_reading(
        &mut self,
        cx: &mut Context<'_>,
        may_read: bool,
    ) -> Poll<Result<Option<Bytes>, Error>> {
        loop {
            if let Some(payload) = self
                .decoder
                .decode_filled(&mut self.read_buf, self.filled)?
            {
                self.filled -= payload.len() + crate::frame::HEADER_LEN;
                if self.large {
                    self.large_frame_done(&payload);
                }
                return Poll::Ready(Ok(Some(payload)));
            }
            if self.read_eof {
                if self.is_mid_frame() {
                    let missing = self.decoder.remaining_after(self.filled);
                    return Poll::Ready(Err(Error::UnexpectedEof { missing }));
                }
                return Poll::Ready(Ok(None));
            }
            if !may_read {
                return Poll::Pending;
            }
            if self.filled == 0 && self.read_buf.capacity() > 2 * MAX_READ {
                // Give back what a large message made us grow to.
                self.read_buf = BytesMut::new();
            }
            match self.poll_read_more(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads ahead without decoding, up to `limit` buffered bytes, so that
    /// EOF and errors are seen while the application is not taking messages.
    /// Ready when the limit or EOF is reached.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<Result<(), Error>> {
        while !self.read_eof && self.filled < limit {
            if self.large && Some(self.filled) == self.decoder.frame_end() {
                // A large frame fills its own buffer: it takes nothing more
                // until the frame is decoded.
                break;
            }
            ready!(self.poll_read_more(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let frame_end = self.decoder.frame_end();
        if let Some(end) = frame_end {
            if !self.large && end >= LARGE_FRAME && end > self.read_buf.capacity() {
                self.start_large_frame(end);
            }
        }
        if let (Some(end), true) = (frame_end, self.large) {
            // Only capacity was set aside for the frame: it is initialised
            // (touched) a read at a time, so memory still follows the bytes
            // that arrive; never past the frame's end.
            if self.read_buf.len() == self.filled {
                self.read_buf.resize((self.filled + MAX_READ).min(end), 0);
            }
        } else if self.read_buf.len() - self.filled < self.read_size / 2 {
            self.top_up();
        }
        let filled = self.filled;
        let room = self.read_buf.len() - filled;
        let res = Pin::new(&mut self.io).poll_read(cx, &mut self.read_buf[filled..]);
        match res {
            Poll::Ready(Ok(0)) => self.read_eof = true,
            Poll::Ready(Ok(n)) => {
                self.filled += n;
                self.bytes_read += n as u64;
                if n == room {
                    self.read_size = (self.read_size * 2).min(MAX_READ);
                }
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => return Poll::Pending,
        }
        Poll::Ready(Ok(()))
    }

    /// Tops the room to read into up to one read's worth. The read size
    /// grows only while reads fill it: memory follows the bytes that
    /// actually arrive, never a length a peer announced.
    ///
    /// Without allocating where it can: in place once the application has
    /// dropped every message read into the buffer, or else in the buffer
    /// before it once it has dropped those. When a buffer runs out, the
    /// message just read from it is usually still held (a request's
    /// answer, say), so the two buffers take turns.
    fn top_up(&mut self) {
        let want = self.filled + self.read_size;
        if want > self.read_buf.capacity() {
            self.read_buf.truncate(self.filled);
            if !self.read_buf.try_reclaim(self.read_size) {
                self.spare.clear();
                let mut next = if self.spare.try_reclaim(want) {
                    std::mem::take(&mut self.spare)
                } else {
                    BytesMut::with_capacity(want)
                };
                next.extend_from_slice(&self.read_buf);
                self.spare = std::mem::replace(&mut self.read_buf, next);
            }
        }
        self.read_buf.resize(want, 0);
    }

    /// Reads stopped at a large frame's end: nothing else is in its
    /// buffer, which now goes with the payload. Keeps a handle to it, and
    /// reads the next header into a small buffer. Out of line: the path of
    /// every small frame only tests `large`.
    #[cold]
    fn large_frame_done(&mut self, payload: &Bytes) {
        self.large = false;
        self.read_buf = BytesMut::new();
        self.read_size = MIN_READ;
        if payload.len() <= RECYCLE_MAX {
            if self.recycled.len() == RECYCLE {
                self.recycled.pop_front();
            }
            self.recycled.push_back(payload.clone());
        }
    }

    /// A large frame's header is in: gives it a buffer of its own (a
    /// recycled one if the application is done with one), so that its body
    /// is read straight into place rather than copied along as the buffer
    /// grows. What is in of it (at most one read) moves once.
    #[cold]
    fn start_large_frame(&mut self, end: usize) {
        let mut buf = self.recycled_buffer(end);
        buf.extend_from_slice(&self.read_buf[..self.filled]);
        self.read_buf = buf;
        self.large = true;
    }

    /// A buffer with room for `len` bytes: a recycled one that nothing
    /// references any more, or a new one.
    fn recycled_buffer(&mut self, len: usize) -> BytesMut {
        for _ in 0..self.recycled.len() {
            let Some(bytes) = self.recycled.pop_front() else {
                break;
            };
            match bytes.try_into_mut() {
                Ok(mut buf) => {
                    // Empty, then back to the start of its allocation.
                    buf.clear();
                    buf.reserve(len);
                    return buf;
                }
                Err(bytes) => self.recycled.push_back(bytes),
            }
        }
        BytesMut::with_capacity(len)
    }

    /// Queues encoded bytes in which `frames` frames end. Large pieces are
    /// kept as they are (written vectored, without a copy); small ones are
    /// copied together.
    pub fn queue(&mut self, piece: Bytes, frames: usize) {
        self.queued += piece.len();
        self.bytes_queued += piece.len() as u64;
        if frames > 0 {
            self.frame_ends.push_back((self.bytes_queued, frames, 0));
            self.unwritten_frames += frames;
        }
        if piece.len() >= COPY_BELOW {
            if !self.tail.is_empty() {
                self.chunks.push_back(self.tail.split().freeze());
            }
            self.chunks.push_back(piece);
        } else {
            self.tail.extend_from_slice(&piece);
        }
    }

    /// Writes everything queued, then flushes. Ready when all is written.
    pub fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let res = self.poll_write_inner(cx);
        // The queue did not drain: flush what is written so far, so that
        // `Sender::flush` is not held up by messages sent after it.
        if res.is_pending() && self.needs_flush && self.frames_written > self.frames_flushed {
            if let Poll::Ready(Ok(())) = Pin::new(&mut self.io).poll_flush(cx) {
                self.frames_flushed = self.frames_written;
                self.marks_flushed = self.marks_written;
                self.needs_flush = false;
                // Some streams drop their wait for writability when flushed
                // (smol's `TcpStream` does): write again, which waits anew.
                return self.poll_write_inner(cx);
            }
        }
        res
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while self.queued > 0 {
            let n = if self.chunks.is_empty() {
                ready!(Pin::new(&mut self.io).poll_write(cx, &self.tail))
            } else {
                let mut iovs = [IoSlice::new(&[]); MAX_IOVS];
                let mut k = 0;
                for c in self.chunks.iter().take(MAX_IOVS - 1) {
                    iovs[k] = IoSlice::new(c);
                    k += 1;
                }
                if k == self.chunks.len() {
                    iovs[k] = IoSlice::new(&self.tail);
                    k += 1;
                }
                ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &iovs[..k]))
            };
            let n = match n {
                Ok(0) => return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Err(e.into())),
            };
            self.advance(n);
            self.needs_flush = true;
        }
        if self.tail.capacity() > MAX_READ {
            self.tail = BytesMut::new();
        }
        if self.needs_flush {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.needs_flush = false;
        }
        self.frames_flushed = self.frames_written;
        self.marks_flushed = self.marks_written;
        Poll::Ready(Ok(()))
    }

    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        self.bytes_written += n as u64;
        while let Some(&(end, frames, marks)) = self.frame_ends.front() {
            if end > self.bytes_written {
                break;
            }
            self.unwritten_frames -= frames;
            self.frames_written += frames as u64;
            self.marks_written += marks as u64;
            self.frame_ends.pop_front();
        }
        while n > 0 {
            match self.chunks.front_mut() {
                Some(c) if c.len() <= n => {
                    n -= c.len();
                    self.chunks.pop_front();
                }
                Some(c) => {
                    c.advance(n);
                    return;
                }
                None => {
                    self.tail.advance(n);
                    return;
                }
            }
        }
    }

    /// Shuts the write half down (after [`Pipe::poll_write`] drained it).
    pub fn poll_close_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.io).poll_close(cx).map_err(Error::from)
    }

    /// Releases buffers while nothing is in them, so an idle connection
    /// holds next to no memory.
    pub fn release_idle_buffers(&mut self) {
        if self.filled == 0 {
            self.read_buf = BytesMut::new();
            self.read_size = MIN_READ;
            self.large = false;
        }
        self.recycled = VecDeque::new();
        self.spare = BytesMut::new();
        if self.queued == 0 {
            self.tail = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Mock;
    use std::task::Waker;

    fn frame(len: usize) -> Vec<u8> {
        let mut v = (len as u32).to_be_bytes().to_vec();
        v.resize(4 + len, 7);
        v
    }

    #[test]
    fn read_buffers_shrink_back_after_a_large_message() {
        let mut script = Mock::new();
        for chunk in frame(1 << 20).chunks(64 * 1024) {
            script = script.read(chunk);
        }
        // Then a small frame, and nothing more (the peer stays open).
        let (io, _) = script.read(&frame(10)).build();
        let mut pipe = Pipe::new(io, 2 << 20);
        let mut cx = Context::from_waker(Waker::noop());
        let big = match pipe.poll_frame(&mut cx) {
            Poll::Ready(Ok(Some(p))) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(big.len(), 1 << 20);
        // The message had a buffer of its own, which went with it; too
        // large to be kept for reuse.
        assert!(pipe.read_buf.capacity() <= 2 * MAX_READ);
        assert!(pipe.recycled.is_empty());
        drop(big);
        assert!(matches!(pipe.poll_frame(&mut cx), Poll::Ready(Ok(Some(p))) if p.len() == 10));
        assert!(pipe.poll_frame(&mut cx).is_pending());
        assert!(
            pipe.read_buf.capacity() <= 2 * MAX_READ,
            "still holding {} bytes",
            pipe.read_buf.capacity()
        );
        pipe.release_idle_buffers();
        assert_eq!(pipe.read_buf.capacity(), 0);
    }

    #[test]
    fn large_frames_are_read_into_place_and_their_buffers_reused() {
        let mut script = Mock::new();
        for _ in 0..3 {
            let f = frame(60_000);
            // The header and a little of the body, then the rest.
            script = script.read(&f[..100]).read(&f[100..]);
        }
        let (io, _peer) = script.build();
        let mut pipe = Pipe::new(io, 1 << 20);
        let mut cx = Context::from_waker(Waker::noop());
        let mut next = || match pipe.poll_frame(&mut cx) {
            Poll::Ready(Ok(Some(p))) => p,
            other => panic!("{other:?}"),
        };
        let first = next();
        assert_eq!(first.len(), 60_000);
        assert!(first.iter().all(|&b| b == 7));
        let first_at = first.as_ptr();
        // Still held by the application: the next frame gets a new buffer.
        let second = next();
        assert_ne!(second.as_ptr(), first_at);
        drop(first);
        drop(second);
        // Both dropped: the third is read into the first's buffer again.
        let third = next();
        assert_eq!(third.as_ptr(), first_at);
        assert_eq!(third.len(), 60_000);
        // The frame's buffer went with it: what reads the next header is
        // small again.
        assert!(pipe.read_buf.capacity() <= MIN_READ);
        drop(third);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(pipe.poll_frame(&mut cx).is_pending());
        pipe.release_idle_buffers();
        assert!(pipe.recycled.is_empty());
    }

    #[test]
    fn the_spare_read_buffer_is_given_back_when_the_connection_goes_idle() {
        let mut script = Mock::new();
        for _ in 0..50 {
            script = script.read(&frame(100));
        }
        let (io, _peer) = script.build();
        let mut pipe = Pipe::new(io, 1 << 20);
        let mut cx = Context::from_waker(Waker::noop());
        // The application holds the last frame it was given, so buffers
        // that run out are not ours alone: the one before is kept.
        let mut held = None;
        for _ in 0..50 {
            let Poll::Ready(Ok(Some(p))) = pipe.poll_frame(&mut cx) else {
                panic!("no frame");
            };
            held = Some(p);
        }
        assert!(pipe.spare.capacity() > 0);
        drop(held);
        assert!(pipe.poll_frame(&mut cx).is_pending());
        pipe.release_idle_buffers();
        assert_eq!(pipe.read_buf.capacity() + pipe.spare.capacity(), 0);
    }

    #[test]
    fn small_frames_coalesce_and_large_pieces_are_not_copied() {
        let (io, peer) = Mock::new().build();
        let mut pipe = Pipe::new(io, 1 << 20);
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..100 {
            pipe.queue(Bytes::from(frame(20)), 1);
        }
        assert!(matches!(pipe.poll_write(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(peer.write_calls().len(), 1, "100 small frames, one write");
        assert_eq!(peer.written().len(), 100 * 24);

        let big = Bytes::from(vec![9u8; 64 * 1024]);
        pipe.queue(Bytes::from(frame(0)), 0);
        pipe.queue(big.clone(), 1);
        pipe.queue(Bytes::from(frame(3)), 1);
        assert_eq!(pipe.unwritten_frames(), 2);
        assert!(matches!(pipe.poll_write(&mut cx), Poll::Ready(Ok(()))));
        let calls = peer.write_calls();
        let call = calls.last().unwrap();
        assert_eq!(call.len(), 3, "head, body, tail in one vectored write");
        assert_eq!(
            call[1],
            (big.as_ptr() as usize, big.len()),
            "the body as it is"
        );
        assert_eq!(pipe.unwritten_frames(), 0);
    }
}
