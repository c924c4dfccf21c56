//! What a connection needs of its byte stream beyond reading and writing: a way to make the
//! coming close a TCP reset, and the per-socket send buffer bound.
//!
//! A graceful close (FIN) of a socket whose peer does not read keeps the socket in FIN-WAIT-1
//! with its whole send buffer for as long as the peer answers the kernel's zero-window probes,
//! after our task has ended and its admission place is gone: the memory is the peer's to
//! release. A reset (SO_LINGER 0 before the last close) frees it at once.

use std::io;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;

/// A connection's transport: plain TCP, TLS over TCP, or a test stream.
pub trait Transport {
    /// Makes dropping this stream reset the TCP connection (RST, send buffer freed at once)
    /// instead of closing it gracefully. For a connection whose peer stopped reading.
    fn reset_on_drop(&self);
}

impl Transport for TcpStream {
    fn reset_on_drop(&self) {
        // Best effort: on a socket that already failed there is nothing left to free.
        let _ = SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn reset_on_drop(&self) {
        self.get_ref().0.reset_on_drop();
    }
}

/// Unit tests' in-memory streams: nothing in the kernel to free.
impl Transport for tokio::io::DuplexStream {
    fn reset_on_drop(&self) {}
}

/// Bounds an accepted socket's send buffer to `bytes` (SO_SNDBUF; Linux doubles the value
/// for its bookkeeping and stops autotuning the buffer). `0` leaves the kernel's autotuning.
pub fn bound_send_buffer(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    SockRef::from(stream).set_send_buffer_size(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn the_send_buffer_bound_is_applied_and_zero_leaves_autotuning() {
        let (_client, server) = pair().await;
        let autotuned = SockRef::from(&server).send_buffer_size().unwrap();
        bound_send_buffer(&server, 0).unwrap();
        assert_eq!(
            SockRef::from(&server).send_buffer_size().unwrap(),
            autotuned
        );
        bound_send_buffer(&server, 131_072).unwrap();
        let bounded = SockRef::from(&server).send_buffer_size().unwrap();
        // Linux reports twice what was set (its bookkeeping share); other systems the value.
        assert!(
            bounded == 131_072 || bounded == 2 * 131_072,
            "SO_SNDBUF is {bounded}"
        );
    }

    #[tokio::test]
    async fn reset_on_drop_sets_linger_zero() {
        let (_client, server) = pair().await;
        assert_eq!(SockRef::from(&server).linger().unwrap(), None);
        server.reset_on_drop();
        assert_eq!(
            SockRef::from(&server).linger().unwrap(),
            Some(Duration::ZERO)
        );
    }
}
