//! Reassembly of fragmented messages (RFC 6455 section 5.4) under the message size limit.
//!
//! The limit applies to the whole message, not to each frame: otherwise a client could grow one
//! message without bound with endless continuation frames (fastwebsockets' `FragmentCollector`
//! only bounds frames). UTF-8 is checked once, on the complete text. A compressed message
//! (permessage-deflate) is inflated once complete, under the same limit on what it inflates to.

use bytes::BytesMut;

use super::deflate::{self, InflateError};
use super::frame::OpCode;

/// A fragment sequence that breaks RFC 6455 or the size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// A continuation frame with no message to continue, or a new message before the last
    /// one finished.
    #[error("invalid fragment sequence")]
    InvalidSequence,
    /// The reassembled message is larger than the limit.
    #[error("message too big")]
    TooBig,
    /// A text message is not valid UTF-8.
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    /// A compressed message is not valid DEFLATE data.
    #[error("a compressed message does not inflate")]
    Corrupt,
}

impl From<InflateError> for FragmentError {
    fn from(error: InflateError) -> Self {
        match error {
            InflateError::TooBig => FragmentError::TooBig,
            InflateError::Corrupt => FragmentError::Corrupt,
        }
    }
}

/// A complete message: the frame's own payload when it came whole (no copy), or the
/// reassembled fragments.
pub enum Complete<'a> {
    Whole(OpCode, &'a mut [u8]),
    Reassembled(OpCode, BytesMut),
}

impl Complete<'_> {
    pub fn opcode(&self) -> OpCode {
        match self {
            Complete::Whole(opcode, _) | Complete::Reassembled(opcode, _) => *opcode,
        }
    }

    pub fn payload(&mut self) -> &mut [u8] {
        match self {
            Complete::Whole(_, payload) => payload,
            Complete::Reassembled(_, payload) => payload,
        }
    }
}

/// The message being reassembled, if any. Holds no buffer between messages, and no limit: the
/// frame reader keeps the connection's limits in one word beside it.
#[derive(Default)]
pub struct Assembler {
    /// Its opcode, whether it is compressed (its first frame's RSV1), what came so far. Boxed:
    /// an idle connection keeps only the empty pointer.
    partial: Option<Box<(OpCode, bool, BytesMut)>>,
}

impl Assembler {
    /// Takes one data frame (text, binary or continuation) and returns the message it
    /// completes, refusing messages over `max_message_size` (inflated size, when compressed).
    /// The frame size was checked against its limit by the frame parser. `compressed`: the
    /// frame's RSV1, which only a message's first frame may set (checked by the frame parser),
    /// on a connection that negotiated permessage-deflate.
    pub fn push<'a>(
        &mut self,
        fin: bool,
        opcode: OpCode,
        compressed: bool,
        payload: &'a mut [u8],
        max_message_size: usize,
    ) -> Result<Option<Complete<'a>>, FragmentError> {
        match opcode {
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(FragmentError::InvalidSequence);
                }
                if payload.len() > max_message_size {
                    return Err(FragmentError::TooBig);
                }
                if fin {
                    if compressed {
                        return inflated(opcode, payload, max_message_size).map(Some);
                    }
                    if opcode == OpCode::Text && std::str::from_utf8(payload).is_err() {
                        return Err(FragmentError::InvalidUtf8);
                    }
                    return Ok(Some(Complete::Whole(opcode, payload)));
                }
                self.partial = Some(Box::new((opcode, compressed, BytesMut::from(&payload[..]))));
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(FragmentError::InvalidSequence);
                };
                let buffer = &mut partial.2;
                if buffer.len() + payload.len() > max_message_size {
                    self.partial = None;
                    return Err(FragmentError::TooBig);
                }
                buffer.extend_from_slice(payload);
                if !fin {
                    return Ok(None);
                }
                let (opcode, compressed, buffer) = *self.partial.take().expect("checked above");
                if compressed {
                    return inflated(opcode, &buffer, max_message_size).map(Some);
                }
                if opcode == OpCode::Text && std::str::from_utf8(&buffer).is_err() {
                    return Err(FragmentError::InvalidUtf8);
                }
                Ok(Some(Complete::Reassembled(opcode, buffer)))
            }
            // Control frames never reach the assembler.
            OpCode::Close | OpCode::Ping | OpCode::Pong => Ok(None),
        }
    }
}

/// A complete compressed message, inflated under the size limit, UTF-8 checked if text.
fn inflated(
    opcode: OpCode,
    compressed: &[u8],
    max_message_size: usize,
) -> Result<Complete<'static>, FragmentError> {
    let mut inflated = Vec::new();
    deflate::inflate(compressed, max_message_size, &mut inflated)?;
    if opcode == OpCode::Text && std::str::from_utf8(&inflated).is_err() {
        return Err(FragmentError::InvalidUtf8);
    }
    Ok(Complete::Reassembled(opcode, BytesMut::from(&inflated[..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An assembler with its limit, as the frame reader holds them.
    struct Limited {
        assembler: Assembler,
        max_message_size: usize,
    }

    impl Limited {
        fn new(max_message_size: usize) -> Self {
            Self {
                assembler: Assembler::default(),
                max_message_size,
            }
        }

        fn push<'a>(
            &mut self,
            fin: bool,
            opcode: OpCode,
            compressed: bool,
            payload: &'a mut [u8],
        ) -> Result<Option<Complete<'a>>, FragmentError> {
            let max = self.max_message_size;
            self.assembler.push(fin, opcode, compressed, payload, max)
        }
    }

    fn push(
        a: &mut Limited,
        fin: bool,
        opcode: OpCode,
        data: &[u8],
    ) -> Result<Option<Vec<u8>>, FragmentError> {
        let mut data = data.to_vec();
        a.push(fin, opcode, false, &mut data)
            .map(|complete| complete.map(|mut c| c.payload().to_vec()))
    }

    #[test]
    fn fragments_are_joined_in_order() {
        let mut a = Limited::new(100);
        assert_eq!(push(&mut a, false, OpCode::Text, b"ab"), Ok(None));
        assert_eq!(push(&mut a, false, OpCode::Continuation, b"cd"), Ok(None));
        assert_eq!(
            push(&mut a, true, OpCode::Continuation, b"ef"),
            Ok(Some(b"abcdef".to_vec()))
        );
    }

    #[test]
    fn the_limit_applies_to_the_whole_message() {
        let mut a = Limited::new(5);
        push(&mut a, false, OpCode::Binary, b"abc").unwrap();
        assert_eq!(
            push(&mut a, false, OpCode::Continuation, b"def"),
            Err(FragmentError::TooBig)
        );
        let mut a = Limited::new(6);
        push(&mut a, false, OpCode::Binary, b"abc").unwrap();
        assert!(push(&mut a, true, OpCode::Continuation, b"def")
            .unwrap()
            .is_some());
    }

    #[test]
    fn continuation_without_a_start_and_interleaved_starts_are_refused() {
        let mut a = Limited::new(100);
        assert_eq!(
            push(&mut a, true, OpCode::Continuation, b"x"),
            Err(FragmentError::InvalidSequence)
        );
        push(&mut a, false, OpCode::Text, b"x").unwrap();
        assert_eq!(
            push(&mut a, true, OpCode::Text, b"y"),
            Err(FragmentError::InvalidSequence)
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted_and_invalid_utf8_refused() {
        let snowman = "\u{2603}".as_bytes();
        let mut a = Limited::new(100);
        push(&mut a, false, OpCode::Text, &snowman[..1]).unwrap();
        assert_eq!(
            push(&mut a, true, OpCode::Continuation, &snowman[1..]),
            Ok(Some(snowman.to_vec()))
        );
        push(&mut a, false, OpCode::Text, b"ok").unwrap();
        assert_eq!(
            push(&mut a, true, OpCode::Continuation, &[0xff]),
            Err(FragmentError::InvalidUtf8)
        );
        assert_eq!(
            push(&mut a, true, OpCode::Text, &[0xc3]),
            Err(FragmentError::InvalidUtf8)
        );
        // Binary is not text: any bytes go.
        assert!(push(&mut a, true, OpCode::Binary, &[0xff])
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_compressed_message_is_inflated_whole_or_from_fragments_under_the_limit() {
        let text = "caf\u{e9} ".repeat(50);
        let compressed = deflate::deflate(text.as_bytes()).unwrap();
        let mut a = Limited::new(1000);
        let mut whole = compressed.clone();
        let mut done = a
            .push(true, OpCode::Text, true, &mut whole)
            .unwrap()
            .unwrap();
        assert_eq!(done.payload(), text.as_bytes());
        let (first, rest) = compressed.split_at(compressed.len() / 2);
        let mut first = first.to_vec();
        assert!(a
            .push(false, OpCode::Text, true, &mut first)
            .unwrap()
            .is_none());
        let mut rest = rest.to_vec();
        let mut done = a
            .push(true, OpCode::Continuation, false, &mut rest)
            .unwrap()
            .unwrap();
        assert_eq!(done.payload(), text.as_bytes());
        // The limit is on the inflated size.
        let mut small = Limited::new(100);
        let mut whole = compressed.clone();
        assert!(matches!(
            small.push(true, OpCode::Text, true, &mut whole),
            Err(FragmentError::TooBig)
        ));
        let mut invalid = deflate::deflate(&[0xff, 0xfe]).unwrap();
        assert!(matches!(
            a.push(true, OpCode::Text, true, &mut invalid),
            Err(FragmentError::InvalidUtf8)
        ));
        let mut garbage = vec![0xff; 8];
        assert!(matches!(
            a.push(true, OpCode::Binary, true, &mut garbage),
            Err(FragmentError::Corrupt)
        ));
    }
}
