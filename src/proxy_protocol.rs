//! The PROXY protocol (v1 text and v2 binary), which load balancers such as HAProxy or AWS NLB
//! put in front of a TCP connection to pass on the client's address.
//!
//! It is read only from peers in `--trusted-proxies`: from anyone else a header would let a
//! client claim any address, so there the bytes are left for HTTP, which refuses them. From a
//! trusted peer the header is optional (a proxy may also speak plain HTTP and send
//! X-Forwarded-For instead); parsing is done by the `ppp` crate.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;

use crate::poller::Socket;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest header read: a v1 line is at most 107 bytes; a v2 header with a few TLVs fits.
const MAX_HEADER: usize = 536;

/// If the connection starts with a PROXY header, consumes it and returns the client address it
/// carries (or `peer` for a proxy's own LOCAL connection, e.g. a health check). Without a
/// header, returns `peer` and leaves every byte in the socket. A malformed header, or one not
/// complete within `timeout`, is an error: the connection should be dropped.
pub async fn client_address(
    stream: &mut Socket,
    peer: SocketAddr,
    timeout: Duration,
) -> io::Result<SocketAddr> {
    tokio::time::timeout(timeout, read_header(stream, peer))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "PROXY header not complete in time"))?
}

async fn read_header(stream: &mut Socket, peer: SocketAddr) -> io::Result<SocketAddr> {
    let mut buf = [0u8; MAX_HEADER];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(peer);
        }
        let seen = &buf[..n];
        if !could_be_header(seen) {
            return Ok(peer);
        }
        let header = HeaderResult::parse(seen);
        if header.is_incomplete() {
            if n == buf.len() {
                return Err(invalid("PROXY header too long"));
            }
            // The rest is on its way: peek returns at once while any byte is there.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let (len, source) = match header {
            HeaderResult::V1(Ok(header)) => (header.header.len(), v1_source(&header.addresses)),
            HeaderResult::V2(Ok(header)) => (header.len(), v2_source(&header.addresses)),
            HeaderResult::V1(Err(error)) => return Err(invalid(&error.to_string())),
            HeaderResult::V2(Err(error)) => return Err(invalid(&error.to_string())),
        };
        let mut consumed = vec![0u8; len];
        stream.read_exact(&mut consumed).await?;
        return Ok(source.unwrap_or(peer));
    }
}

/// Whether `bytes` start like a PROXY header (or are too short to tell).
fn could_be_header(bytes: &[u8]) -> bool {
    let starts = |prefix: &[u8]| {
        let n = bytes.len().min(prefix.len());
        bytes[..n] == prefix[..n]
    };
    starts(V1_PREFIX) || starts(V2_SIGNATURE)
}

fn v1_source(addresses: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
        ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_source(addresses: &ppp::v2::Addresses) -> Option<SocketAddr> {
    match addresses {
        ppp::v2::Addresses::IPv4(a) => Some((a.source_address, a.source_port).into()),
        ppp::v2::Addresses::IPv6(a) => Some((a.source_address, a.source_port).into()),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    }
}

fn invalid(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad PROXY header: {reason}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_recognised_early_and_http_is_not() {
        assert!(could_be_header(b"PRO"));
        assert!(could_be_header(b"PROXY TCP4 "));
        assert!(could_be_header(b"\r\n\r\n\0"));
        assert!(!could_be_header(b"GET / HTTP/1.1\r\n"));
        assert!(!could_be_header(b"\x16\x03\x01")); // a TLS ClientHello
    }
}
