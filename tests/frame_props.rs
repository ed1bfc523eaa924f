//! Properties of the framer: any split decodes the same, nothing panics,
//! nothing is allocated on a peer's say-so.

use bytes::BytesMut;
use chatpipe::frame::{encode, Decoder};
use chatpipe::Error;
use proptest::prelude::*;

const MAX: usize = 1024;

proptest! {
    #[test]
    fn any_split_decodes_the_same(
        msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..40),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode(m, MAX, &mut wire).unwrap();
        }
        let wire = wire.freeze();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();

        let mut dec = Decoder::new(MAX);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        for cut in cuts {
            buf.extend_from_slice(&wire[at..cut]);
            at = cut;
            while let Some(p) = dec.decode(&mut buf).unwrap() {
                out.push(p.to_vec());
            }
        }
        prop_assert_eq!(out, msgs);
        prop_assert!(!dec.is_mid_frame(&buf));
    }

    #[test]
    fn arbitrary_bytes_never_panic(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..32)) {
        let mut dec = Decoder::new(MAX);
        let mut buf = BytesMut::new();
        'feed: for c in chunks {
            buf.extend_from_slice(&c);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(p)) => prop_assert!(p.len() <= MAX),
                    Ok(None) => break,
                    Err(Error::FrameTooLarge { len, max }) => {
                        prop_assert!(len > max as u64);
                        break 'feed;
                    }
                    Err(e) => prop_assert!(false, "unexpected error {}", e),
                }
            }
        }
    }

    #[test]
    fn over_maximum_is_refused_without_allocating(len in (MAX as u32 + 1)..=u32::MAX, extra in prop::collection::vec(any::<u8>(), 0..16)) {
        let mut dec = Decoder::new(MAX);
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&extra);
        let cap = buf.capacity();
        let refused = matches!(dec.decode(&mut buf), Err(Error::FrameTooLarge { len: l, .. }) if l == u64::from(len));
        prop_assert!(refused);
        prop_assert!(buf.capacity() <= cap, "nothing reserved");
    }

    #[test]
    fn under_maximum_reserves_nothing_up_front(len in 0u32..=MAX as u32) {
        let mut dec = Decoder::new(MAX);
        let mut buf = BytesMut::with_capacity(4);
        buf.extend_from_slice(&len.to_be_bytes());
        let out = dec.decode(&mut buf).unwrap();
        prop_assert_eq!(out.is_some(), len == 0);
        prop_assert!(buf.capacity() <= 4);
    }
}
