//! The request head before an upgrade: any bytes, delivered in reads cut at any points, must
//! give the same head (or the same refusal) as the whole input in one read, never panic, and
//! never take more than the size limit; whatever parses is checked as an upgrade without
//! panicking.
#![no_main]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use roomcast::handshake::{self, Head, HeadError};
use tokio::io::{AsyncRead, ReadBuf};

/// The head limit the target runs with: small, so that the fuzzer reaches it.
const MAX: usize = 512;

/// An in-memory stream that hands out its bytes in the given pieces.
struct Pieces<'a> {
    data: &'a [u8],
    cuts: Vec<usize>,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let piece = self.cuts.first().copied().unwrap_or(self.data.len());
        let n = piece.clamp(1, self.data.len().max(1)).min(self.data.len());
        let n = n.min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        if !self.cuts.is_empty() {
            self.cuts.remove(0);
        }
        Poll::Ready(Ok(()))
    }
}

/// What a read ended with, comparable across cuts.
fn outcome(result: &Result<Head, HeadError>) -> String {
    match result {
        Ok(head) => format!(
            "{} {} {:?} {:?} rest {:?}",
            head.method,
            head.uri,
            head.version,
            head.headers,
            head.rest()
        ),
        Err(HeadError::Io(_)) => "io".into(),
        Err(error) => error.to_string(),
    }
}

/// The head read, and how many bytes of `data` were never read.
fn read(data: &[u8], cuts: Vec<usize>) -> (Result<Head, HeadError>, usize) {
    let mut stream = Pieces { data, cuts };
    let result = {
        let mut future = Box::pin(handshake::read_head(&mut stream, MAX));
        let mut cx = Context::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(result) => result,
            // The stream is always ready: reading never waits.
            Poll::Pending => panic!("read_head waited on a ready stream"),
        }
    };
    (result, stream.data.len())
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // The first byte chooses the piece size; the rest is the stream.
    let piece = usize::from(data[0] % 64) + 1;
    let stream = &data[1..];
    let (whole, unread) = read(stream, Vec::new());
    let (cut, _) = read(stream, vec![piece; stream.len() / piece + 1]);
    // Pieces may stop at a different point past the head, so compare the head only.
    let strip = |text: String| text.split(" rest ").next().unwrap_or("").to_owned();
    assert_eq!(strip(outcome(&whole)), strip(outcome(&cut)));
    if let Ok(head) = &whole {
        let head_len = stream.len() - unread - head.rest().len();
        assert!(head_len <= MAX, "a head of {head_len} bytes passed a {MAX}-byte limit");
        if let Ok(key) = handshake::check_upgrade(&head.method, head.version, &head.headers) {
            assert_eq!(handshake::accept_key(key).len(), 28);
        }
    }
});
