//! Client frames (RFC 6455 section 5), read straight from the bytes a socket read returned.
//!
//! Why not fastwebsockets' reader: it owns an 8 KiB buffer per connection for the connection's
//! whole life, and an idle connection should own nothing. Here the connection task reads into
//! a per-thread scratch buffer and hands the bytes to [`FrameReader::feed`], which parses,
//! unmasks (with fastwebsockets' SIMD [`unmask`](fastwebsockets::unmask)) and dispatches every
//! complete frame in place. Only a frame cut off by the end of a read is copied, into a buffer
//! that is freed as soon as the frame is complete.
//!
//! Every check a server owes RFC 6455 is made here: reserved bits, known opcodes, client
//! masking, control frames short and unfragmented, close codes and UTF-8 (via the assembler).
//! On a connection that negotiated permessage-deflate, RSV1 marks a compressed message (on its
//! first frame only, RFC 7692 6.1), which the assembler inflates.

use bytes::{Buf, BytesMut};

use super::fragment::{Assembler, FragmentError};

/// Frame opcodes (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A frame the client should not have sent. Each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set without an extension")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("client frame not masked")]
    Unmasked,
    #[error("control frame fragmented or longer than 125 bytes")]
    BadControlFrame,
    #[error("invalid close frame")]
    BadClose,
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    #[error("invalid fragment sequence")]
    BadFragments,
    #[error("message larger than the limit")]
    TooBig,
    /// RFC 6455 5.2: the most significant bit of a 64-bit payload length must be 0.
    #[error("64-bit payload length with its top bit set")]
    BadLength,
    /// A compressed message that does not inflate.
    #[error("a compressed message does not inflate")]
    Corrupt,
}

impl FrameError {
    /// The close code RFC 6455 section 7.4.1 gives this violation.
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::InvalidUtf8 | FrameError::Corrupt => 1007,
            FrameError::TooBig => 1009,
            _ => 1002,
        }
    }
}

impl From<FragmentError> for FrameError {
    fn from(error: FragmentError) -> Self {
        match error {
            FragmentError::InvalidSequence => FrameError::BadFragments,
            FragmentError::TooBig => FrameError::TooBig,
            FragmentError::InvalidUtf8 => FrameError::InvalidUtf8,
            FragmentError::Corrupt => FrameError::Corrupt,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    /// RSV1: a compressed message's first frame.
    compressed: bool,
    opcode: OpCode,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// Parses the header at the start of `buf`; `Ok(None)` means more bytes are needed.
/// `deflate`: the connection negotiated permessage-deflate, so RSV1 may mark a message's
/// first frame.
fn parse_header(
    buf: &[u8],
    max_payload: usize,
    deflate: bool,
) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (first, second) = (buf[0], buf[1]);
    if first & 0x30 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = OpCode::from_bits(first & 0x0f).ok_or(FrameError::UnknownOpcode(first & 0x0f))?;
    let compressed = first & 0x40 != 0;
    if compressed && !(deflate && matches!(opcode, OpCode::Text | OpCode::Binary)) {
        return Err(FrameError::ReservedBits);
    }
    let fin = first & 0x80 != 0;
    if second & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (length_bytes, short_len) = match second & 0x7f {
        126 => (2, 0),
        127 => (8, 0),
        n => (0, n as usize),
    };
    if opcode.is_control() && (!fin || length_bytes != 0) {
        return Err(FrameError::BadControlFrame);
    }
    let header_len = 2 + length_bytes + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    let payload_len = match length_bytes {
        2 => u16::from_be_bytes([buf[2], buf[3]]) as usize,
        8 => {
            let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(FrameError::BadLength);
            }
            usize::try_from(len).map_err(|_| FrameError::TooBig)?
        }
        _ => short_len,
    };
    if payload_len > max_payload {
        return Err(FrameError::TooBig);
    }
    let mask_at = 2 + length_bytes;
    let mask = buf[mask_at..mask_at + 4].try_into().expect("4 bytes");
    Ok(Some(Header {
        fin,
        compressed,
        opcode,
        mask,
        header_len,
        payload_len,
    }))
}

/// Something the connection must act on.
#[derive(Debug)]
pub enum Event<'a> {
    /// A complete text or binary message, unmasked, writable so it can be parsed in place.
    Message { binary: bool, payload: &'a mut [u8] },
    /// A ping; the pong carries the same payload.
    Ping(&'a [u8]),
}

/// The peer's close frame: the code to echo (`None` when it sent none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerClose {
    pub code: Option<u16>,
}

/// Reads frames out of the bytes a connection receives. Holds memory only while a frame or a
/// fragmented message is incomplete.
pub struct FrameReader {
    /// The start of a frame that a read cut off; `None` between frames. Boxed, like the
    /// assembler's message: an idle connection keeps only the empty pointers.
    partial: Option<Box<BytesMut>>,
    assembler: Assembler,
    limits: Limits,
}

/// The largest frame and the largest message a connection accepts, and whether it negotiated
/// permessage-deflate, in 8 bytes of every connection's state: both sizes are at most 1 GiB
/// (the configuration's bound, kept here by saturating at 2^31 - 1), so the frame limit's top
/// bit holds the flag.
#[derive(Clone, Copy)]
struct Limits {
    frame_and_deflate: u32,
    message: u32,
}

impl Limits {
    const DEFLATE: u32 = 1 << 31;

    fn new(max_frame_size: usize, max_message_size: usize, deflate: bool) -> Self {
        let size = |max: usize| {
            u32::try_from(max)
                .unwrap_or(u32::MAX)
                .min(Self::DEFLATE - 1)
        };
        Self {
            frame_and_deflate: size(max_frame_size) | if deflate { Self::DEFLATE } else { 0 },
            message: size(max_message_size),
        }
    }

    fn max_frame_size(self) -> usize {
        (self.frame_and_deflate & !Self::DEFLATE) as usize
    }

    fn deflate(self) -> bool {
        self.frame_and_deflate & Self::DEFLATE != 0
    }

    fn max_message_size(self) -> usize {
        self.message as usize
    }
}

impl FrameReader {
    /// A reader refusing frames over `max_frame_size` and messages over `max_message_size`.
    pub fn new(max_frame_size: usize, max_message_size: usize) -> Self {
        Self {
            partial: None,
            assembler: Assembler::default(),
            limits: Limits::new(max_frame_size, max_message_size, false),
        }
    }

    /// The same, for a connection that negotiated permessage-deflate.
    pub fn with_deflate(max_frame_size: usize, max_message_size: usize) -> Self {
        Self {
            partial: None,
            assembler: Assembler::default(),
            limits: Limits::new(max_frame_size, max_message_size, true),
        }
    }

    /// Takes the bytes of one read. Calls `on_event` for each complete message and ping, in
    /// order. Returns `Some` when a close frame arrived (bytes after it are ignored).
    pub fn feed(
        &mut self,
        input: &mut [u8],
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Option<PeerClose>, FrameError> {
        let Self {
            partial,
            assembler,
            limits,
        } = self;
        let limits = *limits;
        let Some(held) = partial else {
            let (consumed, close) = process(input, assembler, limits, on_event)?;
            if close.is_none() && consumed < input.len() {
                *partial = Some(Box::new(BytesMut::from(&input[consumed..])));
            }
            return Ok(close);
        };
        held.extend_from_slice(input);
        let (consumed, close) = process(held, assembler, limits, on_event)?;
        held.advance(consumed);
        if held.is_empty() {
            // Give the memory back: an idle connection holds no buffer.
            *partial = None;
        }
        Ok(close)
    }

    /// Bytes held for an incomplete frame (for tests and diagnostics).
    pub fn buffered(&self) -> usize {
        self.partial.as_ref().map_or(0, |held| held.len())
    }
}

/// Dispatches every complete frame at the front of `buf`; returns how many bytes they took.
fn process(
    buf: &mut [u8],
    assembler: &mut Assembler,
    limits: Limits,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<(usize, Option<PeerClose>), FrameError> {
    let mut offset = 0;
    let (max_frame_size, deflate) = (limits.max_frame_size(), limits.deflate());
    while let Some(header) = parse_header(&buf[offset..], max_frame_size, deflate)? {
        let end = offset + header.header_len + header.payload_len;
        if buf.len() < end {
            break;
        }
        let payload = &mut buf[offset + header.header_len..end];
        fastwebsockets::unmask(payload, header.mask);
        offset = end;
        match header.opcode {
            OpCode::Ping => on_event(Event::Ping(payload)),
            OpCode::Pong => {}
            OpCode::Close => return Ok((offset, Some(parse_close(payload)?))),
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                let (fin, opcode, compressed) = (header.fin, header.opcode, header.compressed);
                let max_message_size = limits.max_message_size();
                let pushed = assembler.push(fin, opcode, compressed, payload, max_message_size)?;
                if let Some(mut message) = pushed {
                    let binary = message.opcode() == OpCode::Binary;
                    on_event(Event::Message {
                        binary,
                        payload: message.payload(),
                    });
                }
            }
        }
    }
    Ok((offset, None))
}

/// Checks a close frame's payload (RFC 6455 section 5.5.1 and 7.4).
fn parse_close(payload: &[u8]) -> Result<PeerClose, FrameError> {
    match payload.len() {
        0 => Ok(PeerClose { code: None }),
        1 => Err(FrameError::BadClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed {
                return Err(FrameError::BadClose);
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(FrameError::InvalidUtf8);
            }
            Ok(PeerClose { code: Some(code) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&MASK);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        frame
    }

    /// Messages, pings and the close that a byte stream held.
    type Fed = (Vec<Vec<u8>>, Vec<Vec<u8>>, Option<PeerClose>);

    /// Feeds `bytes` in pieces of `chunk` bytes.
    fn feed_all(reader: &mut FrameReader, bytes: &[u8], chunk: usize) -> Result<Fed, FrameError> {
        let (mut messages, mut pings) = (Vec::new(), Vec::new());
        for piece in bytes.chunks(chunk) {
            let mut piece = piece.to_vec();
            let close = reader.feed(&mut piece, &mut |event| match event {
                Event::Message { payload, .. } => messages.push(payload.to_vec()),
                Event::Ping(payload) => pings.push(payload.to_vec()),
            })?;
            if close.is_some() {
                return Ok((messages, pings, close));
            }
        }
        Ok((messages, pings, None))
    }

    #[test]
    fn frames_split_at_every_byte_are_read_whole() {
        let mut stream = client_frame(0x81, b"hello");
        stream.extend(client_frame(0x89, b"ping!"));
        stream.extend(client_frame(0x82, &vec![7u8; 300]));
        stream.extend(client_frame(0x81, &vec![b'a'; 70_000]));
        for chunk in [1, 2, 3, 7, 64, 1000, usize::MAX] {
            let mut reader = FrameReader::new(100_000, 100_000);
            let (messages, pings, close) = feed_all(&mut reader, &stream, chunk).unwrap();
            assert_eq!(messages.len(), 3, "chunk {chunk}");
            assert_eq!(messages[0], b"hello");
            assert_eq!(messages[1], vec![7u8; 300]);
            assert_eq!(messages[2].len(), 70_000);
            assert_eq!(pings, vec![b"ping!".to_vec()]);
            assert!(close.is_none());
            assert_eq!(reader.buffered(), 0);
            assert!(reader.partial.is_none(), "no buffer held between frames");
        }
    }

    #[test]
    fn violations_are_refused_with_their_close_codes() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (client_frame(0xC1, b"x"), FrameError::ReservedBits),
            (client_frame(0x83, b"x"), FrameError::UnknownOpcode(3)),
            (vec![0x81, 0x01, b'x'], FrameError::Unmasked),
            (client_frame(0x09, b"x"), FrameError::BadControlFrame),
            (client_frame(0x89, &[0u8; 126]), FrameError::BadControlFrame),
            (client_frame(0x88, &[3]), FrameError::BadClose),
            (
                client_frame(0x88, &999u16.to_be_bytes()),
                FrameError::BadClose,
            ),
            (client_frame(0x81, &[0xff]), FrameError::InvalidUtf8),
            (client_frame(0x80, b"x"), FrameError::BadFragments),
            (client_frame(0x81, &[b'x'; 101]), FrameError::TooBig),
        ];
        for (bytes, expected) in cases {
            let mut reader = FrameReader::new(100, 100);
            assert_eq!(
                feed_all(&mut reader, &bytes, usize::MAX).unwrap_err(),
                expected
            );
        }
        assert_eq!(FrameError::InvalidUtf8.close_code(), 1007);
        assert_eq!(FrameError::TooBig.close_code(), 1009);
        assert_eq!(FrameError::Unmasked.close_code(), 1002);
    }

    #[test]
    fn frame_and_message_limits_are_separate() {
        // Frames of 60 bytes are fine, a 150-byte message made of three is not.
        let mut stream = client_frame(0x01, &[b'a'; 60]);
        stream.extend(client_frame(0x00, &[b'a'; 60]));
        stream.extend(client_frame(0x80, &[b'a'; 30]));
        let mut reader = FrameReader::new(64, 140);
        assert_eq!(
            feed_all(&mut reader, &stream, usize::MAX).unwrap_err(),
            FrameError::TooBig
        );
        // One 100-byte frame is over a 64-byte frame limit even though the message limit is
        // larger.
        let mut reader = FrameReader::new(64, 1000);
        assert_eq!(
            feed_all(&mut reader, &client_frame(0x81, &[b'a'; 100]), usize::MAX).unwrap_err(),
            FrameError::TooBig
        );
    }

    #[test]
    fn a_huge_declared_length_is_refused_before_any_buffering() {
        let mut reader = FrameReader::new(1 << 16, 1 << 16);
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
        header.extend_from_slice(&MASK);
        assert_eq!(
            feed_all(&mut reader, &header, usize::MAX).unwrap_err(),
            FrameError::TooBig
        );
    }

    #[test]
    fn a_64_bit_length_with_its_top_bit_set_is_a_protocol_error() {
        let mut reader = FrameReader::new(1 << 16, 1 << 16);
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        header.extend_from_slice(&MASK);
        let error = feed_all(&mut reader, &header, usize::MAX).unwrap_err();
        assert_eq!(error, FrameError::BadLength);
        assert_eq!(error.close_code(), 1002);
    }

    #[test]
    fn close_frame_ends_reading_and_reports_the_code() {
        let mut payload = 1001u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let mut stream = client_frame(0x88, &payload);
        stream.extend(client_frame(0x81, b"after close"));
        let mut reader = FrameReader::new(100, 100);
        let (messages, _, close) = feed_all(&mut reader, &stream, usize::MAX).unwrap();
        assert!(messages.is_empty());
        assert_eq!(close, Some(PeerClose { code: Some(1001) }));
        let (_, _, close) =
            feed_all(&mut FrameReader::new(100, 100), &client_frame(0x88, b""), 1).unwrap();
        assert_eq!(close, Some(PeerClose { code: None }));
    }

    #[test]
    fn fragments_with_a_ping_between_them_make_one_message() {
        let mut stream = client_frame(0x01, b"hel");
        stream.extend(client_frame(0x89, b"p"));
        stream.extend(client_frame(0x00, b"lo "));
        stream.extend(client_frame(0x80, b"world"));
        let mut reader = FrameReader::new(100, 100);
        let (messages, pings, _) = feed_all(&mut reader, &stream, 5).unwrap();
        assert_eq!(messages, vec![b"hello world".to_vec()]);
        assert_eq!(pings.len(), 1);
    }
}
