//! Why a connection attempt or an established connection failed, and the coarse cause each
//! failure is counted under in reports (refused, timeout, fd limit, ...).

use std::fmt;
use std::io;

use fastwebsockets::WebSocketError;
use serde::Serialize;

/// Everything that can go wrong on one client connection. Never panics the generator: each
/// error is counted by [`Cause`] and the run goes on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot create socket: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot bind source address {addr}: {error}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        error: io::Error,
    },
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("TLS: {0}")]
    Tls(#[source] io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("upgrade refused: HTTP {0}")]
    Status(u16),
    #[error("bad upgrade response: {0}")]
    BadUpgrade(&'static str),
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    #[error("WebSocket: {0}")]
    Ws(#[source] WebSocketError),
    #[error("server closed the connection ({0})")]
    Closed(CloseCode),
    #[error("unexpected server message: {0}")]
    Unexpected(String),
    #[error("server replied with error: {0}")]
    ServerError(String),
    #[error("cannot encode message: {0}")]
    Encode(#[source] serde_json::Error),
    #[error(
        "--compression: the server did not accept permessage-deflate (its 101 had no \
         Sec-WebSocket-Extensions); start it with compression on (roomcast: --compression), or \
         run without --compression"
    )]
    CompressionDeclined,
    #[error("bad Sec-WebSocket-Extensions in the upgrade response: {0}")]
    BadExtension(String),
    #[error("permessage-deflate: {0}")]
    Inflate(#[from] super::deflate::InflateError),
}

/// The status code of a close frame the server sent, if it had one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub Option<u16>);

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(1013) => f.write_str("close code 1013 Try Again Later: slow consumer"),
            Some(1001) => f.write_str("close code 1001 Going Away"),
            Some(code) => write!(f, "close code {code}"),
            None => f.write_str("close frame without code"),
        }
    }
}

/// The coarse reason a failure is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// ECONNREFUSED: nothing listening, or the listen backlog overflowed.
    Refused,
    /// A connect, handshake, reply or write took longer than its timeout.
    Timeout,
    /// EMFILE/ENFILE: out of file descriptors (this process or the system).
    FdLimit,
    /// EADDRNOTAVAIL/EADDRINUSE: no free ephemeral port for this source address; use
    /// `--source-ips`.
    PortsExhausted,
    /// ECONNRESET/EPIPE/ECONNABORTED.
    Reset,
    /// ENETUNREACH/EHOSTUNREACH.
    Unreachable,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// The HTTP upgrade was refused or its response was not a WebSocket upgrade.
    Handshake,
    /// The server closed the connection (close frame or end of stream) when we did not ask.
    Closed,
    /// The server sent something the protocol does not allow here, or an `error` reply.
    Protocol,
    /// Any other I/O error.
    Io,
}

impl Cause {
    /// Human label used in the text report.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Refused => "connection refused",
            Cause::Timeout => "timeout",
            Cause::FdLimit => "file descriptor limit",
            Cause::PortsExhausted => "ephemeral ports exhausted",
            Cause::Reset => "connection reset",
            Cause::Unreachable => "unreachable",
            Cause::Tls => "TLS error",
            Cause::Handshake => "handshake error",
            Cause::Closed => "closed by server",
            Cause::Protocol => "protocol error",
            Cause::Io => "I/O error",
        }
    }
}

/// Classifies an OS error by errno.
pub fn io_cause(error: &io::Error) -> Cause {
    match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => Cause::Refused,
        Some(libc::EMFILE | libc::ENFILE) => Cause::FdLimit,
        Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE) => Cause::PortsExhausted,
        Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED) => Cause::Reset,
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => Cause::Unreachable,
        Some(libc::ETIMEDOUT) => Cause::Timeout,
        _ => match error.kind() {
            io::ErrorKind::UnexpectedEof => Cause::Closed,
            io::ErrorKind::TimedOut => Cause::Timeout,
            _ => Cause::Io,
        },
    }
}

fn hyper_cause(error: &hyper::Error) -> Cause {
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        if let Some(io) = inner.downcast_ref::<io::Error>() {
            return io_cause(io);
        }
        source = inner.source();
    }
    if error.is_incomplete_message() || error.is_closed() {
        Cause::Closed
    } else if error.is_timeout() {
        Cause::Timeout
    } else {
        Cause::Handshake
    }
}

impl ClientError {
    /// The cause this error is counted under.
    pub fn cause(&self) -> Cause {
        match self {
            ClientError::Socket(e) | ClientError::Connect(e) => io_cause(e),
            ClientError::Bind { error, .. } => io_cause(error),
            ClientError::Tls(e) => match io_cause(e) {
                Cause::Io => Cause::Tls,
                other => other,
            },
            ClientError::Timeout(_) => Cause::Timeout,
            ClientError::Status(_)
            | ClientError::BadUpgrade(_)
            | ClientError::CompressionDeclined
            | ClientError::BadExtension(_) => Cause::Handshake,
            ClientError::Inflate(_) => Cause::Protocol,
            ClientError::Http(e) => hyper_cause(e),
            ClientError::Ws(e) => match e {
                WebSocketError::IoError(io) => io_cause(io),
                WebSocketError::HTTPError(h) => hyper_cause(h),
                WebSocketError::UnexpectedEOF
                | WebSocketError::ConnectionClosed
                | WebSocketError::SendError(_) => Cause::Closed,
                WebSocketError::InvalidStatusCode(_)
                | WebSocketError::InvalidUpgradeHeader
                | WebSocketError::InvalidConnectionHeader => Cause::Handshake,
                _ => Cause::Protocol,
            },
            ClientError::Closed(_) => Cause::Closed,
            ClientError::Unexpected(_) | ClientError::ServerError(_) | ClientError::Encode(_) => {
                Cause::Protocol
            }
        }
    }
}

impl From<WebSocketError> for ClientError {
    fn from(error: WebSocketError) -> Self {
        ClientError::Ws(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_to_cause() {
        let os = |n| io::Error::from_raw_os_error(n);
        assert_eq!(io_cause(&os(libc::ECONNREFUSED)), Cause::Refused);
        assert_eq!(io_cause(&os(libc::EMFILE)), Cause::FdLimit);
        assert_eq!(io_cause(&os(libc::EADDRNOTAVAIL)), Cause::PortsExhausted);
        assert_eq!(io_cause(&os(libc::ECONNRESET)), Cause::Reset);
        assert_eq!(
            ClientError::Tls(io::Error::other("bad certificate")).cause(),
            Cause::Tls
        );
        assert_eq!(
            ClientError::Ws(WebSocketError::UnexpectedEOF).cause(),
            Cause::Closed
        );
        assert_eq!(ClientError::Status(403).cause(), Cause::Handshake);
    }
}
