//! permessage-deflate (RFC 7692), behind `--compression`: the negotiation, and the inflating
//! and deflating of one message.
//!
//! Both sides run without context takeover: each message is compressed on its own, with no
//! window kept between messages. On the server side that is what lets a fan-out compress a
//! frame once and send the same bytes to every recipient that negotiated compression (a
//! window per connection would make each recipient's bytes its own); on the client side it
//! means a connection keeps no inflate state (32 KiB of window) while it waits: one inflater
//! per thread serves every connection. The answer is therefore always
//! `permessage-deflate; server_no_context_takeover; client_no_context_takeover`, which RFC 7692
//! 7.1.1 lets a server send to any offer (a client must honour `client_no_context_takeover`).
//! An offer that limits our window (`server_max_window_bits` under 15) is declined, as is one
//! with a parameter we do not know; the next offer is then considered, and with none left the
//! connection goes on uncompressed.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::protocol::frame_header;

/// The `Sec-WebSocket-Extensions` value of a response that accepts an offer.
pub const ACCEPTED: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// RFC 7692 7.2.1: the bytes a sender removes from the end of a compressed message (an empty
/// stored block's), which the receiver appends before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Whether one of the offers in the request's `Sec-WebSocket-Extensions` values is one we
/// accept (see the module's doc).
pub fn accepts_an_offer<'a>(values: impl IntoIterator<Item = &'a str>) -> bool {
    values
        .into_iter()
        .flat_map(|value| value.split(','))
        .any(acceptable)
}

/// One offer: `permessage-deflate` and its parameters, each known, valid and given once.
fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
    {
        return false;
    }
    let mut seen: Vec<&str> = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        if seen.contains(&name) {
            return false;
        }
        seen.push(name);
        let bits = |value: Option<&str>| {
            value
                .and_then(|bits| bits.parse::<u8>().ok())
                .filter(|bits| (8..=15).contains(bits))
        };
        let valid = match name {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            // Our window is 15 bits: a smaller one asked of us is declined.
            "server_max_window_bits" => bits(value) == Some(15),
            // The client's own window: we inflate with the largest, whatever it uses.
            "client_max_window_bits" => value.is_none() || bits(value).is_some(),
            _ => false,
        };
        if !valid {
            return false;
        }
    }
    true
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the message size limit (a zip bomb among others).
    TooBig,
    /// It is not valid DEFLATE data.
    Corrupt,
}

thread_local! {
    // One raw inflater per thread, reset for each message (no context takeover).
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    // One raw deflater per thread, likewise.
    static DEFLATER: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
}

/// Inflates one message's payload into `out` (cleared first), stopping as soon as it would
/// exceed `max` bytes: the size limit applies to what the message inflates to.
pub fn inflate(compressed: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
    out.clear();
    INFLATER.with(|inflater| {
        let mut inflater = inflater.borrow_mut();
        inflater.reset(false);
        let result = inflate_with(&mut inflater, compressed, max, out);
        if result.is_err() {
            // Whatever state the failure left is not carried into the next message.
            inflater.reset(false);
        }
        result
    })
}

fn inflate_with(
    inflater: &mut Decompress,
    compressed: &[u8],
    max: usize,
    out: &mut Vec<u8>,
) -> Result<(), InflateError> {
    for input in [compressed, &TAIL[..]] {
        let mut input = input;
        loop {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                // Grow in steps, never past one byte over the limit (which is how going over
                // it shows).
                let room = (out.capacity().max(1024)).min(max + 1 - out.len());
                out.reserve_exact(room);
            }
            let before_in = inflater.total_in();
            let before_out = inflater.total_out();
            let status = inflater
                .decompress_vec(input, out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let consumed = (inflater.total_in() - before_in) as usize;
            let produced = inflater.total_out() - before_out;
            input = &input[consumed..];
            if out.len() > max {
                return Err(InflateError::TooBig);
            }
            match status {
                // A final block ends the stream; what follows it is not ours to read.
                Status::StreamEnd => return Ok(()),
                _ if input.is_empty() && out.len() < out.capacity() => break,
                _ if consumed == 0 && produced == 0 && out.len() < out.capacity() => {
                    return Err(InflateError::Corrupt)
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Deflates one message's payload on its own (no context takeover), without the trailing
/// [`TAIL`], as RFC 7692 7.2.1 sends it. `None` in the case that should not happen, where the
/// output did not fit the worst-case bound: the message then goes uncompressed.
///
/// Why one call into a buffer of the worst-case size rather than growing it: with
/// flate2's miniz_oxide backend, compressing into an output that fills up and is then grown
/// lost data on some inputs (an Autobahn 12.5 PDF slice; the test below keeps it).
pub fn deflate(payload: &[u8]) -> Option<Vec<u8>> {
    DEFLATER.with(|deflater| {
        let mut deflater = deflater.borrow_mut();
        deflater.reset();
        // Above zlib's deflateBound (len + len/4096 + len/16384 + ... + 13) for raw DEFLATE,
        // with the sync flush's 5 bytes.
        let mut out = Vec::with_capacity(payload.len() + payload.len() / 64 + 128);
        let status = deflater.compress_vec(payload, &mut out, FlushCompress::Sync);
        let complete = status.is_ok()
            && deflater.total_in() as usize == payload.len()
            && out.len() < out.capacity()
            && out.ends_with(&TAIL);
        if !complete {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        Some(out)
    })
}

/// The compressed form of `frame`, one whole server frame (unmasked), when it is worth it: a
/// final text or binary frame of at least `min_size` payload bytes whose payload deflates
/// smaller. The payload is deflated on its own and sent with RSV1 set (RFC 7692 6.1).
pub fn compressed_frame(frame: &[u8], min_size: usize) -> Option<Bytes> {
    let (&first, rest) = frame.split_first()?;
    let opcode = first & 0x0f;
    // FIN, no RSV bits, text or binary.
    if first & 0xf0 != 0x80 || !(opcode == 0x1 || opcode == 0x2) {
        return None;
    }
    let header_len = match rest.first()? & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let payload = frame.get(header_len..)?;
    let declared = match header_len {
        2 => (rest[0] & 0x7f) as usize,
        4 => u16::from_be_bytes([rest[1], rest[2]]) as usize,
        _ => u64::from_be_bytes(rest[1..9].try_into().ok()?) as usize,
    };
    // One frame exactly, or it is not ours to rewrite.
    if declared != payload.len() || payload.len() < min_size {
        return None;
    }
    let compressed = deflate(payload)?;
    let (header, header_len) = frame_header(first | 0x40, compressed.len());
    if header_len + compressed.len() >= frame.len() {
        return None;
    }
    let mut out = BytesMut::with_capacity(header_len + compressed.len());
    out.extend_from_slice(&header[..header_len]);
    out.extend_from_slice(&compressed);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_accepted_only_with_parameters_we_can_honour() {
        assert!(accepts_an_offer(["permessage-deflate"]));
        assert!(accepts_an_offer([
            "permessage-deflate; client_max_window_bits"
        ]));
        assert!(accepts_an_offer([
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15; client_max_window_bits=10"
        ]));
        // A smaller window asked of us: declined, and the next offer taken.
        assert!(!accepts_an_offer([
            "permessage-deflate; server_max_window_bits=8"
        ]));
        assert!(accepts_an_offer([
            "permessage-deflate; server_max_window_bits=8, permessage-deflate"
        ]));
        assert!(accepts_an_offer([
            "x-webkit-deflate-frame",
            "permessage-deflate"
        ]));
        for refused in [
            "x-webkit-deflate-frame",
            "permessage-deflate; unknown",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover=1",
        ] {
            assert!(!accepts_an_offer([refused]), "{refused}");
        }
        assert!(!accepts_an_offer(std::iter::empty()));
    }

    #[test]
    fn a_message_deflated_alone_inflates_back_and_rfc_7692s_example_too() {
        let text = br#"{"type":"room_message","room":"lobby","message":"hello hello hello"}"#;
        let compressed = deflate(text).unwrap();
        assert!(compressed.len() < text.len());
        assert!(!compressed.ends_with(&TAIL));
        let mut out = Vec::new();
        inflate(&compressed, 1000, &mut out).unwrap();
        assert_eq!(out, text);
        // RFC 7692 7.2.3.1: "Hello" compressed.
        inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100, &mut out).unwrap();
        assert_eq!(out, b"Hello");
        // 7.2.3.3: a message in a stored (uncompressed) block.
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        inflate(&stored, 100, &mut out).unwrap();
        assert_eq!(out, b"Hello");
        // An empty message.
        inflate(&deflate(b"").unwrap(), 100, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn the_limit_applies_to_the_inflated_size_and_garbage_is_corrupt() {
        let bomb = deflate(&vec![b'a'; 10_000_000]).unwrap();
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        let mut out = Vec::new();
        assert_eq!(inflate(&bomb, 65_536, &mut out), Err(InflateError::TooBig));
        assert!(out.capacity() <= 65_537 + 1024, "{}", out.capacity());
        inflate(&deflate(&[7u8; 65_536]).unwrap(), 65_536, &mut out).unwrap();
        assert_eq!(out.len(), 65_536);
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0xff], 100, &mut out),
            Err(InflateError::Corrupt)
        );
        // The thread's inflater is fine after a failure.
        inflate(&deflate(b"again").unwrap(), 100, &mut out).unwrap();
        assert_eq!(out, b"again");
    }

    #[test]
    fn a_large_text_frame_is_compressed_with_rsv1_and_others_are_left_alone() {
        let tick = "tick ".repeat(100);
        let plain =
            crate::protocol::broadcast("a", &crate::protocol::Body::Text(tick.as_str().into()), 0);
        let text = crate::protocol::frame_payload(&plain);
        let compressed = compressed_frame(&plain, 256).unwrap();
        assert_eq!(compressed[0], 0xc1, "FIN, RSV1, text");
        assert!(compressed.len() < plain.len() / 3, "{}", compressed.len());
        let payload = crate::protocol::frame_payload(&compressed);
        let mut out = Vec::new();
        inflate(&payload, 10_000, &mut out).unwrap();
        assert_eq!(out, text);
        // Under the minimum, a control frame, or not one whole frame: left as it is.
        assert!(compressed_frame(&plain, text.len() + 1).is_none());
        assert!(compressed_frame(&[0x89, 0x00], 0).is_none());
        assert!(compressed_frame(&plain[..plain.len() - 1], 0).is_none());
    }
}

#[cfg(test)]
mod roundtrip {
    use super::*;

    /// Bytes of mixed compressibility: random runs between repeated text, as in a PDF.
    fn mixed(len: usize) -> Vec<u8> {
        let mut state = 0x1234_5678u32;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let run = (state % 3000) as usize;
            if state % 2 == 0 {
                out.extend((0..run).map(|i| (state.wrapping_mul(i as u32 + 1) >> 7) as u8));
            } else {
                out.extend(
                    b"stream endobj obj 0 R /Type /Page "
                        .iter()
                        .cycle()
                        .take(run),
                );
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn slices_of_mixed_and_incompressible_data_inflate_back_whole_elsewhere_too() {
        let data = mixed(1 << 20);
        for len in [32_768usize, 65_536, 131_072] {
            for start in (0..data.len() - len).step_by(7919) {
                let payload = &data[start..start + len];
                let compressed = deflate(payload).unwrap();
                // Ours, and flate2's own inflater, fresh, with the tail put back.
                let mut out = Vec::new();
                inflate(&compressed, usize::MAX - 1, &mut out).unwrap();
                assert_eq!(out, payload, "ours, start {start} len {len}");
                let mut input = compressed;
                input.extend_from_slice(&TAIL);
                let mut other = Decompress::new(false);
                let mut out = Vec::with_capacity(len + 1);
                other
                    .decompress_vec(&input, &mut out, FlushDecompress::Sync)
                    .unwrap();
                assert_eq!(out, payload, "flate2's, start {start} len {len}");
            }
        }
        // What a client's deflater sends (sync flush, tail removed) inflates here.
        let payload = &data[..131_072];
        let mut client = Compress::new(Compression::default(), false);
        let mut compressed = Vec::with_capacity(payload.len() * 2);
        client
            .compress_vec(payload, &mut compressed, FlushCompress::Sync)
            .unwrap();
        compressed.truncate(compressed.len() - 4);
        let mut out = Vec::new();
        inflate(&compressed, usize::MAX - 1, &mut out).unwrap();
        assert_eq!(out, payload);
    }
}
