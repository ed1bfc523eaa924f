//! Length-prefix framing, sans-IO.
//!
//! ```text
//! +----------------+--------------------------------+
//! | length: u32 BE |  payload: `length` bytes        |
//! +----------------+--------------------------------+
//!   4 bytes          the length does not count the header
//! ```
//!
//! This is the default layout of tokio-util's `LengthDelimitedCodec`, so a
//! peer using that codec exchanges frames with this one.
//!
//! Unlike that codec, [`Decoder`] never reserves buffer space on a peer's
//! say-so: a header announcing 60 KiB makes it reserve nothing. Memory
//! grows only with bytes that actually arrive.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::Error;

/// Size of the length prefix in bytes.
pub const HEADER_LEN: usize = 4;

/// The default maximum payload length: 65,536 bytes. A connection's
/// default rises above it only for a protocol whose own messages are larger
/// ([`Protocol::max_payload_len`](crate::Protocol::max_payload_len)).
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Decodes length-prefixed frames out of a [`BytesMut`].
///
/// Feed it bytes in any split or coalescing; it yields the same frames.
/// Each payload is split off the buffer and frozen, so it is handed out as
/// [`Bytes`] without copying.
///
/// ```
/// use bytes::BytesMut;
/// use chatpipe::frame::Decoder;
///
/// let mut dec = Decoder::new(1024);
/// let mut buf = BytesMut::from(&[0, 0, 0, 2, b'h'][..]);
/// assert_eq!(dec.decode(&mut buf).unwrap(), None); // half a payload
/// buf.extend_from_slice(b"i");
/// assert_eq!(dec.decode(&mut buf).unwrap().as_deref(), Some(&b"hi"[..]));
/// ```
#[derive(Debug, Clone)]
pub struct Decoder {
    max_frame_len: usize,
    /// Payload length of the frame whose header has been consumed.
    current: Option<usize>,
}

impl Decoder {
    /// A decoder that refuses payloads longer than `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        Decoder {
            max_frame_len,
            current: None,
        }
    }

    /// The largest payload this decoder accepts.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Takes the next whole frame's payload out of `buf`, if it is all there.
    ///
    /// Returns `Ok(None)` when more bytes are needed. A header announcing
    /// more than the maximum is an [`Error::FrameTooLarge`] as soon as its
    /// four bytes are in; nothing is reserved or awaited for its body. After
    /// an error the decoder must not be used again.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        let filled = buf.len();
        self.decode_filled(buf, filled)
    }

    /// [`Decoder::decode`] over the first `filled` bytes of `buf` only (the
    /// rest is spare room a reader writes into).
    pub(crate) fn decode_filled(
        &mut self,
        buf: &mut BytesMut,
        filled: usize,
    ) -> Result<Option<Bytes>, Error> {
        let len = match self.current {
            Some(len) => len,
            None => {
                let Some(header) = buf[..filled].first_chunk::<HEADER_LEN>() else {
                    return Ok(None);
                };
                let len = u64::from(u32::from_be_bytes(*header));
                if len > self.max_frame_len as u64 {
                    return Err(Error::FrameTooLarge {
                        len,
                        max: self.max_frame_len,
                    });
                }
                // Fits in usize: it is at most `max_frame_len`.
                let len = len as usize;
                self.current = Some(len);
                len
            }
        };
        // The header stays in the buffer until the frame is whole, then
        // both leave in one split (cheaper than advancing twice).
        if filled < HEADER_LEN + len {
            return Ok(None);
        }
        self.current = None;
        let mut frame = buf.split_to(HEADER_LEN + len).freeze();
        frame.advance(HEADER_LEN);
        Ok(Some(frame))
    }

    /// True while a frame has been started (some of its bytes consumed or
    /// buffered) but not completed. At a frame boundary, EOF is a clean end;
    /// inside a frame it is [`Error::UnexpectedEof`].
    pub fn is_mid_frame(&self, buf: &BytesMut) -> bool {
        !buf.is_empty()
    }

    /// How many more bytes the frame in progress needs, if known.
    pub fn remaining(&self, buf: &BytesMut) -> usize {
        self.remaining_after(buf.len())
    }

    /// Where the frame whose header is in ends (header included), once
    /// its header has been read.
    pub(crate) fn frame_end(&self) -> Option<usize> {
        self.current.map(|len| HEADER_LEN + len)
    }

    pub(crate) fn remaining_after(&self, filled: usize) -> usize {
        match self.current {
            Some(len) => (HEADER_LEN + len).saturating_sub(filled),
            None => HEADER_LEN.saturating_sub(filled),
        }
    }
}

/// Appends one frame, header and payload, to `dst`.
///
/// A payload over `max_frame_len` is an [`Error::MessageTooLarge`] and
/// leaves `dst` untouched.
///
/// ```
/// use bytes::BytesMut;
/// let mut buf = BytesMut::new();
/// chatpipe::frame::encode(b"hi", 1024, &mut buf).unwrap();
/// assert_eq!(&buf[..], &[0, 0, 0, 2, b'h', b'i']);
/// ```
pub fn encode(payload: &[u8], max_frame_len: usize, dst: &mut BytesMut) -> Result<(), Error> {
    check_len(payload.len(), max_frame_len)?;
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_u32(payload.len() as u32);
    dst.put_slice(payload);
    Ok(())
}

/// Checks an outgoing payload length against the maximum.
pub(crate) fn check_len(len: usize, max_frame_len: usize) -> Result<(), Error> {
    // `max_frame_len` is clamped to u32::MAX by the builder, so a length
    // that passes fits in the header.
    if len > max_frame_len || len > u32::MAX as usize {
        return Err(Error::MessageTooLarge {
            len: len as u64,
            max: max_frame_len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_large_is_refused_from_header_alone() {
        let mut dec = Decoder::new(16);
        let mut buf = BytesMut::from(&[0, 0, 0, 17][..]);
        let cap = buf.capacity();
        match dec.decode(&mut buf) {
            Err(Error::FrameTooLarge { len: 17, max: 16 }) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.capacity() <= cap, "nothing reserved for the body");
    }

    #[test]
    fn header_does_not_reserve_body() {
        let mut dec = Decoder::new(1 << 20);
        let mut buf = BytesMut::with_capacity(8);
        buf.extend_from_slice(&[0, 0x0f, 0, 0]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert!(buf.capacity() <= 8);
        assert!(dec.is_mid_frame(&buf));
        assert_eq!(dec.remaining(&buf), 0x0f_0000);
    }

    #[test]
    fn zero_length_frame() {
        let mut dec = Decoder::new(16);
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 1, 9][..]);
        assert_eq!(dec.decode(&mut buf).unwrap().as_deref(), Some(&[][..]));
        assert_eq!(dec.decode(&mut buf).unwrap().as_deref(), Some(&[9][..]));
        assert!(!dec.is_mid_frame(&buf));
    }

    #[test]
    fn encode_too_large_leaves_buffer() {
        let mut buf = BytesMut::new();
        assert!(matches!(
            encode(&[0; 5], 4, &mut buf),
            Err(Error::MessageTooLarge { len: 5, max: 4 })
        ));
        assert!(buf.is_empty());
    }
}
