//! What a connection needs of its byte stream beyond reading and writing: a way to make the
//! coming close a TCP reset, and the per-socket send buffer bound.
//!
//! A graceful close (FIN) of a socket whose peer does not read keeps the socket in FIN-WAIT-1
//! with its whole send buffer for as long as the peer answers the kernel's zero-window probes,
//! after our task has ended and its admission place is gone: the memory is the peer's to
//! release. A reset (SO_LINGER 0 before the last close) frees it at once.

use std::io;
use std::os::fd::AsFd;
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

impl Transport for crate::poller::Socket {
    fn reset_on_drop(&self) {
        let _ = SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

impl Transport for tokio_rustls::server::TlsStream<crate::poller::Socket> {
    fn reset_on_drop(&self) {
        self.get_ref().0.reset_on_drop();
    }
}

/// Unit tests' in-memory streams: nothing in the kernel to free.
impl Transport for tokio::io::DuplexStream {
    fn reset_on_drop(&self) {}
}

/// Whether sockets accepted from a listener inherit its `TCP_NODELAY` and `SO_SNDBUF`. Linux
/// copies the listening socket into each connection it accepts, options included, so setting
/// them once on the listener saves two `setsockopt` calls per connection.
pub const ACCEPTED_INHERIT_OPTIONS: bool = cfg!(target_os = "linux");

/// The per-connection socket options, set on a listener for the sockets it will accept (see
/// [`ACCEPTED_INHERIT_OPTIONS`]): no Nagle delay (the outbox batches frames itself) and the
/// send buffer bound of `--socket-send-buffer`; and the listener's own `--defer-accept`.
pub fn configure_listener(
    listener: &socket2::Socket,
    send_buffer: usize,
    defer_accept: Duration,
) -> io::Result<()> {
    listener.set_nodelay(true)?;
    if send_buffer != 0 {
        listener.set_send_buffer_size(send_buffer)?;
    }
    defer_accept_for(listener, defer_accept)
}

/// TCP_DEFER_ACCEPT, in whole seconds (rounded up; `0` turns it off).
#[cfg(target_os = "linux")]
fn defer_accept_for(listener: &socket2::Socket, wait: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let seconds = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    // SAFETY: a socket the caller owns, and an option value of the size given.
    let set = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept_for(_: &socket2::Socket, _: Duration) -> io::Result<()> {
    Ok(())
}

/// The same options on one accepted socket, where the listener's are not inherited.
pub fn configure_accepted(stream: &impl AsFd, send_buffer: usize) -> io::Result<()> {
    if ACCEPTED_INHERIT_OPTIONS {
        return Ok(());
    }
    let socket = SockRef::from(stream);
    socket.set_nodelay(true)?;
    if send_buffer != 0 {
        socket.set_send_buffer_size(send_buffer)?;
    }
    Ok(())
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

    /// A listener configured with `send_buffer`, and a socket it accepted (configured the
    /// way the server does).
    async fn accepted_from_listener_with(send_buffer: usize) -> (TcpStream, TcpStream) {
        let listener = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        configure_listener(&listener, send_buffer, Duration::ZERO).unwrap();
        listener
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        listener.listen(16).unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener.into()).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (server, _) = accepted.unwrap();
        configure_accepted(&server, send_buffer).unwrap();
        (client.unwrap(), server)
    }

    #[tokio::test]
    async fn accepted_sockets_get_the_listeners_nodelay_and_send_buffer() {
        let (_client, server) = accepted_from_listener_with(131_072).await;
        assert!(server.nodelay().unwrap());
        let bounded = SockRef::from(&server).send_buffer_size().unwrap();
        assert!(
            bounded == 131_072 || bounded == 2 * 131_072,
            "SO_SNDBUF is {bounded}"
        );
    }

    #[tokio::test]
    async fn a_zero_send_buffer_leaves_the_kernels_autotuning() {
        let (_client, autotuned) = pair().await;
        let (_client, server) = accepted_from_listener_with(0).await;
        assert!(server.nodelay().unwrap());
        assert_eq!(
            SockRef::from(&server).send_buffer_size().unwrap(),
            SockRef::from(&autotuned).send_buffer_size().unwrap()
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn defer_accept_is_set_on_the_listener_and_zero_leaves_it_off() {
        use std::os::fd::AsRawFd;
        let deferral = |wait: Duration| {
            let listener = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .unwrap();
            configure_listener(&listener, 0, wait).unwrap();
            let mut value: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: a live socket and an option buffer of the size given.
            let got = unsafe {
                libc::getsockopt(
                    listener.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_DEFER_ACCEPT,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(got, 0);
            value
        };
        // Linux keeps it as a count of SYN-ACK retransmissions and reports the seconds those
        // cover, at least what was asked.
        assert!(deferral(Duration::from_secs(5)) >= 5);
        assert_eq!(deferral(Duration::ZERO), 0);
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
