//! The HTTP/1.1 request head that starts every connection, and the WebSocket opening
//! handshake (RFC 6455 4.2) answered without hyper.
//!
//! Why not hyper for the first request: a connection that has not finished its request is
//! the cheapest thing an attacker can hold open, so what it costs decides how many of them the
//! server survives. hyper gives each connection an 8 KiB read buffer at once (growing to
//! ~400 KiB for large heads) plus its connection state; 16,000 slowloris requests held 512 MB
//! and 3,000 heads of 390 KB held 1.6 GB. Here a pending connection holds the bytes it has
//! sent, in a buffer sized to them, read through a per-thread scratch buffer, and at most
//! `--max-request-head-size` of them (431 beyond). A WebSocket upgrade is then validated and
//! answered here; any other request (health, metrics, the demo page, the API) goes to hyper
//! with the head already read.
//!
//! Validation follows RFC 6455 4.2.1: a GET, HTTP/1.1, a Host, `Upgrade: websocket`,
//! `Connection: Upgrade`, `Sec-WebSocket-Version: 13` (426 with the version we speak
//! otherwise), and a `Sec-WebSocket-Key` that is base64 of 16 bytes; anything else is 400.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, UPGRADE};
use hyper::{Method, StatusCode, Uri, Version};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Headers a request head may have; more is 431, as a head over the size limit is.
pub const MAX_HEADERS: usize = 64;

/// Bytes one read of a pending head may take, through a per-thread buffer.
const SCRATCH_SIZE: usize = 16 * 1024;

/// RFC 6455 1.3: appended to the client's key before hashing.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// A parsed request head and what the client sent after it.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// Everything read: the head, then any bytes past it (pipelined frames or requests).
    bytes: Vec<u8>,
    head_len: usize,
}

impl Head {
    /// The bytes the client sent after the head.
    pub fn rest(&self) -> &[u8] {
        &self.bytes[self.head_len..]
    }

    /// Everything read, head included: for hyper, which parses the head again.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from(self.bytes)
    }
}

/// Why a request head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// Over `--max-request-head-size` or [`MAX_HEADERS`]: 431.
    #[error("request head too large")]
    TooLarge,
    /// Not an HTTP/1.x request head: 400.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The client closed before finishing its head.
    #[error("connection closed before the request head ended")]
    Closed,
    /// Not a whole head yet (internal to the reader).
    #[error("request head incomplete")]
    Incomplete,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl HeadError {
    /// The status to answer with, when the client is still there to read it.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HeadError::TooLarge => Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            HeadError::Malformed(_) => Some(StatusCode::BAD_REQUEST),
            HeadError::Closed | HeadError::Incomplete | HeadError::Io(_) => None,
        }
    }
}

/// Reads one request head of at most `max` bytes.
pub async fn read_head<S: AsyncRead + Unpin>(io: &mut S, max: usize) -> Result<Head, HeadError> {
    let mut buf = Vec::new();
    let mut blank = 0;
    poll_fn(|cx| poll_read_head(cx, io, &mut buf, &mut blank, max)).await
}

/// One step of [`read_head`]. `blank` counts the CR and LF bytes before the request line
/// (RFC 9112 2.2: ignored), kept across calls so that finding the head's end never depends on
/// how the bytes were cut into reads, and never rescans them.
fn poll_read_head<S: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    io: &mut S,
    buf: &mut Vec<u8>,
    blank: &mut usize,
    max: usize,
) -> Poll<Result<Head, HeadError>> {
    loop {
        let before = buf.len();
        let n = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            // Never more than one byte past the limit: that byte is what says "too large".
            let room = (max + 1).saturating_sub(buf.len()).min(scratch.len());
            let mut read = ReadBuf::new(&mut scratch[..room]);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(error)) => Poll::Ready(Err(HeadError::Io(error))),
                Poll::Ready(Ok(())) => {
                    let filled = read.filled();
                    // Sized to what arrived: a slow client holds only the bytes it sent.
                    buf.reserve_exact(filled.len());
                    buf.extend_from_slice(filled);
                    Poll::Ready(Ok(filled.len()))
                }
            }
        });
        let n = match n {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result?,
        };
        if n == 0 {
            return Poll::Ready(Err(HeadError::Closed));
        }
        if *blank == before {
            *blank += buf[before..]
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
        }
        // A blank line after the request line ends the head; RFC 9112 allows a bare LF as
        // the line end. Only the bytes past the leading blank ones and not searched before
        // (less three, for an end cut between reads) are looked at.
        let from = before.saturating_sub(3).max(*blank);
        let tail = buf.get(from..).unwrap_or_default();
        let ended = *blank < buf.len()
            && (tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n"));
        if ended || buf.len() > max {
            return Poll::Ready(match parse(buf, max) {
                Ok(head_len) => build(std::mem::take(buf), head_len),
                Err(HeadError::Incomplete) => Err(HeadError::TooLarge),
                Err(error) => Err(error),
            });
        }
    }
}

/// The length of the head at the start of `bytes`, if it is complete and within `max`.
fn parse(bytes: &[u8], max: usize) -> Result<usize, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) if len <= max => Ok(len),
        Ok(httparse::Status::Complete(_)) => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Err(HeadError::Incomplete),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Malformed("not an HTTP/1.1 request")),
    }
}

/// The [`Head`] of `bytes`, whose first `head_len` bytes [`parse`] found to be one.
fn build(bytes: Vec<u8>, head_len: usize) -> Result<Head, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(
        request.parse(&bytes[..head_len]),
        Ok(httparse::Status::Complete(_))
    ) {
        return Err(HeadError::Malformed("not an HTTP/1.1 request"));
    }
    let method = Method::from_bytes(request.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Malformed("bad method"))?;
    let uri = request
        .path
        .unwrap_or_default()
        .parse::<Uri>()
        .map_err(|_| HeadError::Malformed("bad request target"))?;
    let version = match request.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut map = HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| HeadError::Malformed("bad header name"))?;
        let value = HeaderValue::from_bytes(header.value)
            .map_err(|_| HeadError::Malformed("bad header value"))?;
        map.append(name, value);
    }
    Ok(Head {
        method,
        uri,
        version,
        headers: map,
        bytes,
        head_len,
    })
}

/// Whether a request asks for a WebSocket (`Upgrade: websocket`). Such a request is either a
/// valid upgrade or refused, never served as plain HTTP.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, UPGRADE, "websocket")
}

/// Why an upgrade request breaks RFC 6455 4.2.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    #[error("a WebSocket upgrade must be a GET request")]
    NotGet,
    #[error("a WebSocket upgrade needs HTTP/1.1")]
    NotHttp11,
    #[error("Host header required")]
    NoHost,
    #[error("Connection: Upgrade required")]
    NoConnectionUpgrade,
    #[error("Sec-WebSocket-Key must be base64 of 16 bytes")]
    BadKey,
    #[error("unsupported Sec-WebSocket-Version (this server speaks 13)")]
    BadVersion,
}

impl UpgradeError {
    /// 426 Upgrade Required for a version we do not speak (RFC 6455 4.4), else 400.
    pub fn status(&self) -> StatusCode {
        match self {
            UpgradeError::BadVersion => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks an upgrade request (see [`is_upgrade`]) and returns its `Sec-WebSocket-Key`.
pub fn check_upgrade<'a>(
    method: &Method,
    version: Version,
    headers: &'a HeaderMap,
) -> Result<&'a [u8], UpgradeError> {
    if method != Method::GET {
        return Err(UpgradeError::NotGet);
    }
    if version != Version::HTTP_11 {
        return Err(UpgradeError::NotHttp11);
    }
    if !headers.get(HOST).is_some_and(|host| !host.is_empty()) {
        return Err(UpgradeError::NoHost);
    }
    if !has_token(headers, CONNECTION, "upgrade") {
        return Err(UpgradeError::NoConnectionUpgrade);
    }
    let version_ok = headers
        .get("sec-websocket-version")
        .is_some_and(|v| v.as_bytes() == b"13");
    if !version_ok {
        return Err(UpgradeError::BadVersion);
    }
    let key = headers
        .get("sec-websocket-key")
        .map(|key| key.as_bytes())
        .ok_or(UpgradeError::BadKey)?;
    // Base64 of 16 bytes is exactly 24 characters ending in "==".
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| UpgradeError::BadKey)?;
    if decoded.len() != 16 {
        return Err(UpgradeError::BadKey);
    }
    Ok(key)
}

/// `Sec-WebSocket-Accept` for `key`: base64 of SHA-1 over the key and the RFC's GUID.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(WEBSOCKET_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

/// The 101 response that completes the handshake for `key`, with the
/// `Sec-WebSocket-Extensions` it accepted, if any.
pub fn switching_protocols(key: &[u8], extensions: Option<&str>) -> Bytes {
    let accept = accept_key(key);
    let mut response = BytesMut::with_capacity(220);
    response.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: ",
    );
    response.extend_from_slice(accept.as_bytes());
    if let Some(extensions) = extensions {
        response.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
        response.extend_from_slice(extensions.as_bytes());
    }
    response.extend_from_slice(b"\r\n\r\n");
    response.freeze()
}

/// The `Sec-WebSocket-Extensions` to answer a request with, given whether `--compression` is
/// on: permessage-deflate's, when the client offered it in a form we accept.
pub fn extensions(headers: &HeaderMap, compression: bool) -> Option<&'static str> {
    let offers = headers
        .get_all("sec-websocket-extensions")
        .iter()
        .filter_map(|value| value.to_str().ok());
    (compression && crate::ws::deflate::accepts_an_offer(offers))
        .then_some(crate::ws::deflate::ACCEPTED)
}

/// A complete refusal: `status`, a one-line text body, and `Connection: close`. A 426 names
/// the version this server speaks.
pub fn refusal(status: StatusCode, body: &str) -> Bytes {
    let mut text = String::with_capacity(body.len() + 1);
    text.push_str(body);
    text.push('\n');
    refusal_with(status, "text/plain; charset=utf-8", text.as_bytes())
}

/// A refusal with `body` of `content_type` as given (the application's own answer to the
/// connect proxy).
pub fn refusal_with(status: StatusCode, content_type: &str, body: &[u8]) -> Bytes {
    let reason = status.canonical_reason().unwrap_or("");
    let extra = if status == StatusCode::UPGRADE_REQUIRED {
        "Sec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    let mut answer = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {content_type}\r\n\
         content-length: {}\r\nconnection: close\r\n{extra}\r\n",
        status.as_u16(),
        body.len(),
    )
    .into_bytes();
    answer.extend_from_slice(body);
    Bytes::from(answer)
}

/// Writes `response` and shuts the write side, ignoring errors: the client may be gone.
pub async fn write_and_close<S: AsyncWrite + Unpin>(io: &mut S, response: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let _ = io.write_all(response).await;
    let _ = io.shutdown().await;
}

/// Whether any `name` header holds `token` in its comma-separated list (case-insensitive).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&c| c == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// An I/O stream whose first reads return bytes already read from it: hands a connection to
/// hyper with its request head, which hyper then parses itself.
pub struct Prefixed<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, io: S) -> Self {
        Self { prefix, io }
    }

    /// The prefix bytes not yet read, and the stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.io)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head_of(bytes: &[u8], max: usize) -> Result<Head, HeadError> {
        let mut io = bytes;
        read_head(&mut io, max).await
    }

    fn upgrade_headers(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, "example.com".parse().unwrap());
        headers.insert(UPGRADE, "websocket".parse().unwrap());
        headers.insert(CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        headers.insert("sec-websocket-version", "13".parse().unwrap());
        headers.insert("sec-websocket-key", key.parse().unwrap());
        headers
    }

    #[test]
    fn the_accept_key_is_the_rfc_example() {
        // RFC 6455 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn a_head_is_parsed_and_what_follows_it_is_kept() {
        let head = head_of(b"GET /x?token=t HTTP/1.1\r\nHost: a\r\n\r\n\x81\x80", 8192)
            .await
            .unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri.path(), "/x");
        assert_eq!(head.uri.query(), Some("token=t"));
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers[HOST], "a");
        assert_eq!(head.rest(), b"\x81\x80");
    }

    #[tokio::test]
    async fn bare_lf_line_ends_and_leading_blank_lines_are_accepted() {
        let head = head_of(b"GET /lf HTTP/1.1\nHost: a\n\n", 8192)
            .await
            .unwrap();
        assert_eq!(head.uri.path(), "/lf");
        let head = head_of(b"\r\n\r\nGET /blank HTTP/1.1\r\nHost: a\r\n\r\n", 8192)
            .await
            .unwrap();
        assert_eq!(head.uri.path(), "/blank");
        assert_eq!(head.rest(), b"");
    }

    #[tokio::test]
    async fn where_reads_are_cut_does_not_change_the_answer() {
        // Found by the `head` fuzz target: blank lines, then a bad request line, one byte a
        // read, ended as "closed" instead of "malformed".
        struct OneByte<'a>(&'a [u8]);
        impl AsyncRead for OneByte<'_> {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                if let Some((first, rest)) = self.0.split_first() {
                    buf.put_slice(&[*first]);
                    self.0 = rest;
                }
                Poll::Ready(Ok(()))
            }
        }
        for input in [
            &b"\n\n2P\n"[..],
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            let whole = head_of(input, 8192).await.map(|head| head.uri.to_string());
            let cut = read_head(&mut OneByte(input), 8192)
                .await
                .map(|head| head.uri.to_string());
            assert_eq!(format!("{whole:?}"), format!("{cut:?}"), "{input:?}");
        }
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_too_large() {
        let mut request = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        request.resize(10_000, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(
            head_of(&request, 8192).await,
            Err(HeadError::TooLarge)
        ));
        // The same head fits a larger limit.
        assert!(head_of(&request, 16384).await.is_ok());
    }

    #[tokio::test]
    async fn garbage_is_malformed_and_a_cut_head_is_closed() {
        assert!(matches!(
            head_of(b"\x16\x03\x01 hello\r\n\r\n", 8192).await,
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            head_of(b"GET / HTTP/1.1\r\nHost: a\r\n", 8192).await,
            Err(HeadError::Closed)
        ));
    }

    #[test]
    fn a_valid_upgrade_passes_and_each_rfc_violation_is_named() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let good = upgrade_headers(key);
        assert!(is_upgrade(&good));
        assert_eq!(
            check_upgrade(&Method::GET, Version::HTTP_11, &good),
            Ok(key.as_bytes())
        );
        let check = |method: Method, version: Version, headers: &HeaderMap| {
            check_upgrade(&method, version, headers).unwrap_err()
        };
        assert_eq!(
            check(Method::POST, Version::HTTP_11, &good),
            UpgradeError::NotGet
        );
        assert_eq!(
            check(Method::HEAD, Version::HTTP_11, &good),
            UpgradeError::NotGet
        );
        assert_eq!(
            check(Method::GET, Version::HTTP_10, &good),
            UpgradeError::NotHttp11
        );
        let mut no_host = good.clone();
        no_host.remove(HOST);
        assert_eq!(
            check(Method::GET, Version::HTTP_11, &no_host),
            UpgradeError::NoHost
        );
        for bad_key in ["abc", "dGhlIHNhbXBsZSBub25j", "not base64 at all!!!!!!!"] {
            assert_eq!(
                check(Method::GET, Version::HTTP_11, &upgrade_headers(bad_key)),
                UpgradeError::BadKey,
                "{bad_key}"
            );
        }
        let mut old = good.clone();
        old.insert("sec-websocket-version", "8".parse().unwrap());
        let error = check(Method::GET, Version::HTTP_11, &old);
        assert_eq!(error, UpgradeError::BadVersion);
        assert_eq!(error.status(), StatusCode::UPGRADE_REQUIRED);
    }

    #[tokio::test]
    async fn a_prefixed_stream_reads_its_prefix_first() {
        use tokio::io::AsyncReadExt;
        let rest: &[u8] = b" world";
        let mut io = Prefixed::new(Bytes::from_static(b"hello"), rest);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
