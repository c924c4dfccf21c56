//! Reassembly of fragmented WebSocket messages (RFC 6455 section 5.4), under the message size
//! limit.
//!
//! fastwebsockets' own `FragmentCollector` limits each frame but not the sum of a message's
//! fragments, so a client could grow one message without bound with endless continuation
//! frames. This assembler enforces the limit on the whole message and checks UTF-8 once, on the
//! complete text.

use bytes::BytesMut;
use fastwebsockets::{Frame, OpCode, Payload};

/// A complete data message.
#[derive(Debug)]
pub struct Message {
    /// `Text` or `Binary`.
    pub opcode: OpCode,
    pub payload: BytesMut,
}

/// A fragment sequence that breaks RFC 6455 or the size limit. Each maps to a close code.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// A continuation frame with no message to continue, or a new message before the last
    /// one finished.
    #[error("invalid fragment sequence")]
    InvalidSequence,
    /// The reassembled message is larger than the limit.
    #[error("message too big")]
    TooBig,
    /// A fragmented text message is not valid UTF-8.
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
}

/// The message being reassembled, if any. Holds no buffer between messages.
pub struct Assembler {
    max_message_size: usize,
    partial: Option<Message>,
}

impl Assembler {
    pub fn new(max_message_size: usize) -> Self {
        Self {
            max_message_size,
            partial: None,
        }
    }

    /// Takes one data frame (text, binary or continuation); returns the message it completes.
    /// Control frames are not for the assembler (they may come between fragments).
    pub fn push(&mut self, frame: Frame<'_>) -> Result<Option<Message>, FragmentError> {
        match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(FragmentError::InvalidSequence);
                }
                let message = Message {
                    opcode: frame.opcode,
                    payload: into_bytes_mut(frame.payload),
                };
                self.check_size(message.payload.len())?;
                if frame.fin {
                    // fastwebsockets has checked the UTF-8 of a complete text frame.
                    return Ok(Some(message));
                }
                self.partial = Some(message);
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(FragmentError::InvalidSequence);
                };
                let total = partial.payload.len() + frame.payload.len();
                if total > self.max_message_size {
                    self.partial = None;
                    return Err(FragmentError::TooBig);
                }
                partial.payload.extend_from_slice(&frame.payload);
                if !frame.fin {
                    return Ok(None);
                }
                let message = self.partial.take().expect("checked above");
                if message.opcode == OpCode::Text && std::str::from_utf8(&message.payload).is_err()
                {
                    return Err(FragmentError::InvalidUtf8);
                }
                Ok(Some(message))
            }
            _ => Ok(None),
        }
    }

    fn check_size(&self, len: usize) -> Result<(), FragmentError> {
        if len > self.max_message_size {
            Err(FragmentError::TooBig)
        } else {
            Ok(())
        }
    }
}

fn into_bytes_mut(payload: Payload<'_>) -> BytesMut {
    match payload {
        Payload::Bytes(bytes) => bytes,
        other => BytesMut::from(&other[..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: OpCode, data: &[u8]) -> Frame<'static> {
        Frame::new(fin, opcode, None, Payload::Owned(data.to_vec()))
    }

    #[test]
    fn fragments_are_joined_in_order() {
        let mut a = Assembler::new(100);
        assert!(a.push(frame(false, OpCode::Text, b"ab")).unwrap().is_none());
        assert!(a
            .push(frame(false, OpCode::Continuation, b"cd"))
            .unwrap()
            .is_none());
        let message = a
            .push(frame(true, OpCode::Continuation, b"ef"))
            .unwrap()
            .unwrap();
        assert_eq!(&message.payload[..], b"abcdef");
        assert_eq!(message.opcode, OpCode::Text);
    }

    #[test]
    fn the_limit_applies_to_the_whole_message() {
        let mut a = Assembler::new(5);
        a.push(frame(false, OpCode::Binary, b"abc")).unwrap();
        assert_eq!(
            a.push(frame(false, OpCode::Continuation, b"def"))
                .unwrap_err(),
            FragmentError::TooBig
        );
        let mut a = Assembler::new(5);
        assert_eq!(
            a.push(frame(true, OpCode::Binary, b"abcdef")).unwrap_err(),
            FragmentError::TooBig
        );
        let mut a = Assembler::new(6);
        assert!(a
            .push(frame(true, OpCode::Binary, b"abcdef"))
            .unwrap()
            .is_some());
    }

    #[test]
    fn continuation_without_a_start_and_interleaved_starts_are_refused() {
        let mut a = Assembler::new(100);
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, b"x")).unwrap_err(),
            FragmentError::InvalidSequence
        );
        a.push(frame(false, OpCode::Text, b"x")).unwrap();
        assert_eq!(
            a.push(frame(true, OpCode::Text, b"y")).unwrap_err(),
            FragmentError::InvalidSequence
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted_and_invalid_utf8_refused() {
        let snowman = "\u{2603}".as_bytes();
        let mut a = Assembler::new(100);
        a.push(frame(false, OpCode::Text, &snowman[..1])).unwrap();
        let message = a
            .push(frame(true, OpCode::Continuation, &snowman[1..]))
            .unwrap();
        assert_eq!(&message.unwrap().payload[..], snowman);
        a.push(frame(false, OpCode::Text, b"ok")).unwrap();
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, &[0xff]))
                .unwrap_err(),
            FragmentError::InvalidUtf8
        );
    }
}
