//! `--compression`: permessage-deflate (RFC 7692) on the receiving side of a client, and the
//! count of the bytes every client reads from its socket (both modes, so plain and compressed
//! runs compare on wire bytes).
//!
//! Clients offer `permessage-deflate; client_max_window_bits`, as browsers do, and never
//! compress what they send: RFC 7692 lets an endpoint that negotiated the extension send
//! uncompressed messages (RSV1 clear). What they receive with RSV1 set is inflated per message:
//! the trailing `00 00 ff ff` (7.2.1) appended, raw DEFLATE inflated. When the server promised
//! `server_no_context_takeover` (roomcast always does), each message is inflated on its own with
//! the thread's one reusable [`Decompress`], reset per message, so a waiting connection holds
//! no window; otherwise the connection keeps its own inflater across messages, as RFC 7692
//! 7.2.2 then requires.
//!
//! # RSV1 and fastwebsockets
//!
//! fastwebsockets 0.10's frame reader (`ReadHalf::parse_frame_header`) refuses every frame with
//! an RSV bit set (`ReservedBitsNotZero`), unconditionally: it has no option for extensions, and
//! its `Frame` has no RSV field. It also rejects a final text frame whose payload is not UTF-8,
//! which a compressed text frame's is not. Rather than replace its reader (its parser, ping and
//! close handling, fragment reassembly and UTF-8 checks for every plain message, which are
//! what the generator has always measured with), [`Rsv1Shim`] sits between the socket and it:
//! an `AsyncRead` that follows the frame boundaries in the byte stream (it reads each frame's
//! 2-14 header bytes and skips payloads by count, without looking at them) and, on a
//! connection that negotiated permessage-deflate, rewrites the first byte of a data frame that
//! starts a compressed message: RSV1 cleared and the opcode set to binary, so fastwebsockets
//! parses it and reassembles its continuations without a UTF-8 check. For each message start
//! it queues whether the message was compressed and whether it was text; [`Inflate`] pops that
//! when fastwebsockets hands the message over, inflates it, and checks UTF-8 for text. Anything
//! RSV1 may not be on (a control or continuation frame, or any frame when the extension was not
//! negotiated), and RSV2/RSV3, is passed through untouched, so fastwebsockets still fails the
//! connection on it as RFC 7692 6.1 and RFC 6455 5.2 require.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, ReadBuf};

use crate::stats::Counter;

/// The `Sec-WebSocket-Extensions` every client offers with `--compression`.
pub const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// RFC 7692 7.2.1: the tail a sender strips from each compressed message.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Largest message a compressed frame may inflate to (fastwebsockets' own frame limit).
pub const MAX_INFLATED: usize = 64 << 20;

/// What the server's 101 agreed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The server compresses each message on its own: a per-thread inflater serves all.
    pub server_no_context_takeover: bool,
    /// The response's `Sec-WebSocket-Extensions`, as sent.
    pub response: String,
}

/// Reads the 101's `Sec-WebSocket-Extensions` after our [`OFFER`]: `Ok(None)` when the server
/// answered none (it declined), `Ok(Some)` for an acceptance of permessage-deflate, and `Err`
/// for anything a client must fail the connection on (RFC 6455 9.1, RFC 7692 5): an extension
/// we did not offer, more than one, or a parameter that is unknown, repeated or invalid.
pub fn parse_response<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Option<Agreed>, String> {
    let values: Vec<&str> = values.into_iter().collect();
    let joined = values.join(", ");
    let mut extensions = joined.split(',').map(str::trim).filter(|e| !e.is_empty());
    let Some(extension) = extensions.next() else {
        return Ok(None);
    };
    if extensions.next().is_some() {
        return Err(format!("more than one extension accepted: {joined:?}"));
    }
    let mut params = extension.split(';').map(str::trim);
    if !params
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
    {
        return Err(format!("an extension we did not offer: {joined:?}"));
    }
    let mut seen: Vec<String> = Vec::new();
    let mut server_no_context_takeover = false;
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return Err(format!("parameter {name} given twice: {joined:?}"));
        }
        let bits_ok = |value: Option<&str>| {
            value
                .and_then(|bits| bits.parse::<u8>().ok())
                .is_some_and(|bits| (8..=15).contains(&bits))
        };
        let valid = match name.as_str() {
            "server_no_context_takeover" => {
                server_no_context_takeover = true;
                value.is_none()
            }
            "client_no_context_takeover" => value.is_none(),
            // Any window the server uses fits the 15-bit one we inflate with.
            "server_max_window_bits" => bits_ok(value),
            // Ours; we offered it, and we send nothing compressed.
            "client_max_window_bits" => bits_ok(value),
            _ => false,
        };
        if !valid {
            return Err(format!("invalid parameter {param:?} in {joined:?}"));
        }
        seen.push(name);
    }
    Ok(Some(Agreed {
        server_no_context_takeover,
        response: joined,
    }))
}

/// Why a received compressed message could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("a compressed message is not valid DEFLATE data")]
    Corrupt,
    #[error("a compressed message inflates to more than {MAX_INFLATED} bytes")]
    TooBig,
    #[error("a compressed text message is not UTF-8 once inflated")]
    NotUtf8,
    #[error("a message arrived that the frame scanner did not see start")]
    Untracked,
}

thread_local! {
    // One raw inflater per thread, reset for each message (server_no_context_takeover).
    static INFLATER: std::cell::RefCell<Decompress> =
        std::cell::RefCell::new(Decompress::new(false));
}

/// How the messages of one connection that negotiated permessage-deflate are inflated.
pub enum Inflater {
    /// Each message on its own, with the thread's inflater, reset per message.
    PerMessage,
    /// The server keeps its window across messages: so must we.
    Context(Box<Decompress>),
}

impl Inflater {
    pub fn new(agreed: &Agreed) -> Self {
        if agreed.server_no_context_takeover {
            Inflater::PerMessage
        } else {
            Inflater::Context(Box::new(Decompress::new(false)))
        }
    }

    /// Inflates one message's payload (the tail stripped, as sent).
    pub fn inflate(&mut self, compressed: &[u8]) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::with_capacity((compressed.len() * 4).clamp(256, MAX_INFLATED));
        match self {
            Inflater::PerMessage => INFLATER.with(|inflater| {
                let mut inflater = inflater.borrow_mut();
                inflater.reset(false);
                inflate_into(&mut inflater, compressed, &mut out)
            })?,
            Inflater::Context(inflater) => inflate_into(inflater, compressed, &mut out)?,
        }
        Ok(out)
    }
}

/// Feeds `compressed` and then [`TAIL`] through `inflater` (sync flush), growing `out`.
fn inflate_into(
    inflater: &mut Decompress,
    compressed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), InflateError> {
    for mut input in [compressed, &TAIL[..]] {
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_INFLATED {
                    return Err(InflateError::TooBig);
                }
                let room = out.capacity().max(1024).min(MAX_INFLATED - out.len());
                out.reserve_exact(room);
            }
            let (before_in, before_out) = (inflater.total_in(), inflater.total_out());
            let status = inflater
                .decompress_vec(input, out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let consumed = (inflater.total_in() - before_in) as usize;
            let produced = inflater.total_out() - before_out;
            input = &input[consumed..];
            match status {
                // A final block ends the stream (a sender may set BFINAL, RFC 7692 7.2.3.3).
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

/// What a message that fastwebsockets hands over was on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrived {
    Plain,
    /// RSV1 was set; `text`: its opcode was text (now binary, see the module's doc).
    Compressed {
        text: bool,
    },
}

/// Message starts the [`Rsv1Shim`] saw, in order, for the reader to pop one per message.
pub type Arrivals = Arc<Mutex<VecDeque<Arrived>>>;

/// Counters every connection of a run adds to.
#[derive(Default)]
pub struct WireStats {
    /// Bytes read from the clients' sockets (after TLS: WebSocket bytes), all clients.
    pub bytes_read: Counter,
    /// Messages received compressed (RSV1) and inflated.
    pub inflated: Counter,
    /// Connections whose 101 accepted permessage-deflate.
    pub negotiated: AtomicU64,
    /// Connections failed because `--compression` was asked and the server declined it.
    pub declined: AtomicU64,
    /// The first acceptance's `Sec-WebSocket-Extensions`, for the report.
    pub agreed: std::sync::OnceLock<String>,
}

impl WireStats {
    pub fn negotiated(&self) -> u64 {
        self.negotiated.load(Ordering::Relaxed)
    }

    pub fn declined(&self) -> u64 {
        self.declined.load(Ordering::Relaxed)
    }
}

/// The receiving half of a client socket, as fastwebsockets reads it: counts the bytes read,
/// and when permessage-deflate was negotiated rewrites compressed messages' first frame
/// header (see the module's doc).
pub struct Rsv1Shim<R> {
    inner: R,
    wire: Arc<WireStats>,
    index: usize,
    /// `Some` once permessage-deflate is negotiated.
    arrivals: Option<Arrivals>,
    scan: FrameScan,
}

impl<R> Rsv1Shim<R> {
    pub fn new(inner: R, wire: Arc<WireStats>, index: usize, arrivals: Option<Arrivals>) -> Self {
        Self {
            inner,
            wire,
            index,
            arrivals,
            scan: FrameScan::default(),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Rsv1Shim<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let new = &mut buf.filled_mut()[before..];
        if !new.is_empty() {
            this.wire.bytes_read.add(this.index, new.len() as u64);
            if let Some(arrivals) = &this.arrivals {
                let mut arrivals = arrivals.lock().unwrap_or_else(PoisonError::into_inner);
                this.scan
                    .scan(new, &mut |arrived| arrivals.push_back(arrived));
            }
        }
        polled
    }
}

/// Follows frame boundaries through a server's byte stream, a chunk at a time.
#[derive(Default, Debug)]
pub struct FrameScan {
    /// Header bytes of the current frame seen so far (0 = at a frame's first byte).
    have: usize,
    /// The header's full length, once its second byte is seen.
    need: usize,
    /// Its second byte (mask bit and length code), then the extended length's bytes.
    len_bytes: [u8; 9],
    /// Payload bytes left to pass over.
    skip: u64,
}

impl FrameScan {
    /// Scans `chunk`, the next bytes of the stream, rewriting the first byte of each data frame
    /// that starts a compressed message in place, and reporting each message start.
    pub fn scan(&mut self, chunk: &mut [u8], arrived: &mut impl FnMut(Arrived)) {
        let mut i = 0;
        while i < chunk.len() {
            if self.skip > 0 {
                let n = self.skip.min((chunk.len() - i) as u64);
                self.skip -= n;
                i += n as usize;
                continue;
            }
            let byte = chunk[i];
            match self.have {
                0 => {
                    let opcode = byte & 0x0f;
                    // Text or binary: a message starts (continuations and controls don't).
                    if opcode == 0x1 || opcode == 0x2 {
                        // RSV1 alone (RSV2/RSV3 are left for fastwebsockets to refuse).
                        if byte & 0x70 == 0x40 {
                            chunk[i] = (byte & 0x80) | 0x2;
                            arrived(Arrived::Compressed {
                                text: opcode == 0x1,
                            });
                        } else {
                            arrived(Arrived::Plain);
                        }
                    }
                }
                1 => {
                    let extra = match byte & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    self.need = 2 + extra + if byte & 0x80 != 0 { 4 } else { 0 };
                    self.len_bytes[0] = byte;
                }
                n => {
                    if n < 2 + 8 {
                        self.len_bytes[n - 1] = byte;
                    }
                }
            }
            self.have += 1;
            i += 1;
            if self.have >= 2 && self.have == self.need {
                self.skip = self.payload_len();
                self.have = 0;
            }
        }
    }

    fn payload_len(&self) -> u64 {
        match self.len_bytes[0] & 0x7f {
            126 => u16::from_be_bytes([self.len_bytes[1], self.len_bytes[2]]) as u64,
            127 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&self.len_bytes[1..9]);
                u64::from_be_bytes(be)
            }
            short => short as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    /// What roomcast sends: raw DEFLATE of one message, sync flush, tail stripped.
    fn deflate(payload: &[u8]) -> Vec<u8> {
        let mut deflater = Compress::new(Compression::fast(), false);
        let mut out = Vec::with_capacity(payload.len() + 64);
        deflater
            .compress_vec(payload, &mut out, FlushCompress::Sync)
            .unwrap();
        assert_eq!(deflater.total_in() as usize, payload.len());
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - 4);
        out
    }

    /// A server frame (unmasked) with the given first byte.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n < 65536 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn the_response_is_checked_against_the_offer() {
        let roomcast = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        let agreed = parse_response([roomcast]).unwrap().unwrap();
        assert!(agreed.server_no_context_takeover);
        assert_eq!(agreed.response, roomcast);
        // No header: declined.
        assert_eq!(parse_response([]).unwrap(), None);
        // Context takeover, windows given.
        let agreed = parse_response([
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=15",
        ])
        .unwrap()
        .unwrap();
        assert!(!agreed.server_no_context_takeover);
        assert!(parse_response(["Permessage-Deflate"]).unwrap().is_some());
        // What a client must fail the connection on.
        for bad in [
            "x-webkit-deflate-frame",
            "permessage-deflate, permessage-deflate",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; unknown",
        ] {
            assert!(parse_response([bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_message_inflates_on_its_own_with_a_reused_inflater() {
        let first = br#"{"type":"room_message","message":"hello hello hello hello hello"}"#;
        let second = vec![b'a'; 100_000];
        let mut inflater = Inflater::PerMessage;
        assert_eq!(inflater.inflate(&deflate(first)).unwrap(), first);
        // Larger than the first guess of the output's size: the buffer grows.
        assert_eq!(inflater.inflate(&deflate(&second)).unwrap(), second);
        assert_eq!(inflater.inflate(&deflate(first)).unwrap(), first);
        assert_eq!(inflater.inflate(&deflate(b"")).unwrap(), b"");
        assert_eq!(
            inflater.inflate(&[0xff, 0xff, 0xff, 0xff]),
            Err(InflateError::Corrupt)
        );
        // The failure left nothing behind for the next message.
        assert_eq!(inflater.inflate(&deflate(first)).unwrap(), first);
    }

    #[test]
    fn context_takeover_keeps_the_window_across_messages() {
        let mut deflater = Compress::new(Compression::fast(), false);
        let mut inflater = Inflater::new(&Agreed {
            server_no_context_takeover: false,
            response: String::new(),
        });
        let message = b"the same words, over and over, the same words".to_vec();
        for round in 0..3 {
            let mut out = Vec::with_capacity(256);
            deflater
                .compress_vec(&message, &mut out, FlushCompress::Sync)
                .unwrap();
            out.truncate(out.len() - 4);
            if round > 0 {
                // It refers back to the previous message: per-message inflating would fail.
                assert!(out.len() < message.len() / 2, "{}", out.len());
            }
            assert_eq!(inflater.inflate(&out).unwrap(), message);
        }
    }

    /// fastwebsockets' client reader over `stream`, with or without the shim in between.
    async fn read_all(
        stream: Vec<u8>,
        shim: bool,
    ) -> (
        Vec<(Vec<u8>, Arrived)>,
        Option<fastwebsockets::WebSocketError>,
        u64,
    ) {
        use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Role, WebSocket};
        use tokio::io::AsyncWriteExt;
        let (client, mut server) = tokio::io::duplex(1 << 20);
        server.write_all(&stream).await.unwrap();
        drop(server);
        let wire = Arc::new(WireStats::default());
        let arrivals: Arrivals = Arc::default();
        let (read, _write) = WebSocket::after_handshake(client, Role::Client).split(|io| {
            let (read, write) = tokio::io::split(io);
            let arrivals = shim.then(|| arrivals.clone());
            (Rsv1Shim::new(read, wire.clone(), 3, arrivals), write)
        });
        let mut frames = FragmentCollectorRead::new(read);
        let mut inflater = Inflater::PerMessage;
        let mut messages = Vec::new();
        let error = loop {
            let frame = frames
                .read_frame(&mut |_: Frame<'_>| async {
                    Ok::<(), fastwebsockets::WebSocketError>(())
                })
                .await;
            match frame {
                Ok(frame) if matches!(frame.opcode, OpCode::Text | OpCode::Binary) => {
                    let arrived = arrivals
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(Arrived::Plain);
                    let payload = match arrived {
                        Arrived::Plain => frame.payload.to_vec(),
                        Arrived::Compressed { .. } => inflater.inflate(&frame.payload).unwrap(),
                    };
                    messages.push((payload, arrived));
                }
                Ok(_) => {}
                Err(error) => break Some(error),
            }
        };
        (messages, error, wire.bytes_read.get())
    }

    #[tokio::test]
    async fn fastwebsockets_reads_compressed_messages_through_the_shim_only() {
        let text = br#"{"type":"room_message","message":"hello hello hello hello"}"#.to_vec();
        let compressed = deflate(&text);
        let mut stream = Vec::new();
        stream.extend(frame(0x81, b"{\"type\":\"welcome\"}"));
        stream.extend(frame(0xc1, &compressed));
        stream.extend(frame(0x89, b"")); // a ping between messages
                                         // A compressed message in two fragments: RSV1 on the first only.
        let (a, b) = compressed.split_at(5);
        stream.extend(frame(0x41, a));
        stream.extend(frame(0x80, b));
        stream.extend(frame(0x81, &text));
        let total = stream.len() as u64;

        let (messages, error, read) = read_all(stream.clone(), true).await;
        let got: Vec<_> = messages.iter().map(|(p, a)| (p.as_slice(), *a)).collect();
        let compressed_text = Arrived::Compressed { text: true };
        assert_eq!(
            got,
            [
                (&b"{\"type\":\"welcome\"}"[..], Arrived::Plain),
                (&text[..], compressed_text),
                (&text[..], compressed_text),
                (&text[..], Arrived::Plain),
            ]
        );
        // The stream's end, and every byte counted.
        assert!(matches!(
            error,
            Some(fastwebsockets::WebSocketError::UnexpectedEOF)
        ));
        assert_eq!(read, total);

        // Without the shim fastwebsockets refuses the first RSV1 frame: why the shim exists.
        let (messages, error, _) = read_all(stream, false).await;
        assert_eq!(messages.len(), 1);
        assert!(matches!(
            error,
            Some(fastwebsockets::WebSocketError::ReservedBitsNotZero)
        ));

        // RSV1 on a continuation frame is still a protocol error, shim or not.
        let mut stream = frame(0x01, b"ab");
        stream.extend(frame(0xc0, b"cd"));
        let (_, error, _) = read_all(stream, true).await;
        assert!(matches!(
            error,
            Some(fastwebsockets::WebSocketError::ReservedBitsNotZero)
        ));
    }

    #[test]
    fn the_scanner_rewrites_compressed_message_starts_only() {
        let text = br#"{"type":"room_message","message":"x"}"#;
        let big = vec![b'{'; 70_000];
        let compressed = deflate(text);
        let mut stream = Vec::new();
        stream.extend(frame(0x81, text)); // plain text
        stream.extend(frame(0xc1, &compressed)); // compressed text
        stream.extend(frame(0x89, b"ping")); // ping
        stream.extend(frame(0x42, &big[..200])); // compressed binary, fragmented
        stream.extend(frame(0x80, &big)); // its last fragment (64-bit length)
        stream.extend(frame(0xc0, b"")); // RSV1 on a continuation: left alone
        stream.extend(frame(0xe1, b"")); // RSV1+RSV2: left alone
        stream.extend(frame(0x81, &big[..300])); // 16-bit length
        let expected_firsts = [0x81, 0x82, 0x89, 0x02, 0x80, 0xc0, 0xe1, 0x81];
        let expected_arrivals = [
            Arrived::Plain,
            Arrived::Compressed { text: true },
            Arrived::Compressed { text: false },
            Arrived::Plain,
            Arrived::Plain,
        ];
        // Fed whole, and one byte at a time, the scan is the same.
        for chunk in [stream.len(), 1, 7] {
            let mut bytes = stream.clone();
            let mut scan = FrameScan::default();
            let mut arrivals = Vec::new();
            for piece in bytes.chunks_mut(chunk) {
                scan.scan(piece, &mut |a| arrivals.push(a));
            }
            assert_eq!(arrivals, expected_arrivals, "chunks of {chunk}");
            // Walk the rewritten stream: only the first bytes changed.
            let mut at = 0;
            for &first in &expected_firsts {
                assert_eq!(bytes[at], first, "chunks of {chunk}, frame at {at}");
                let (len, header) = match bytes[at + 1] {
                    126 => (
                        u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize,
                        4,
                    ),
                    127 => (
                        u64::from_be_bytes(bytes[at + 2..at + 10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n => (n as usize, 2),
                };
                bytes[at] = stream[at];
                at += header + len;
            }
            assert_eq!(at, bytes.len());
            assert_eq!(bytes, stream, "nothing but first bytes rewritten");
        }
    }
}
