//! One WebSocket client connection, from socket to welcome, and the [`Connector`] that opens
//! them for every scenario.
//!
//! This module owns the transport: source-address binding, TCP, TLS, the HTTP/1.1 upgrade
//! (hyper 1, as fastwebsockets' `handshake::client` does it, plus a `Sec-WebSocket-Accept`
//! check and no stderr noise), the masked client frames (fastwebsockets), and the timeouts that
//! keep any of it from hanging. fastwebsockets was chosen over tungstenite for its lower CPU per
//! frame: a load generator must not be the bottleneck it measures.
//!
//! With `--protocol pusher` the same transport carries Pusher frames ([`crate::pusher`]): the
//! welcome is `pusher:connection_established`, a join is a signed `pusher:subscribe` answered by
//! `subscription_succeeded`.
//!
//! A [`Conn`] is split: a [`Reader`] that one task drives, and a cloneable [`Writer`] that a
//! publisher can use from another future while the reader waits. Pings are answered and close
//! frames echoed by the reader, through the writer.

pub mod deflate;
pub mod error;
pub mod source_ip;
pub mod target;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use fastwebsockets::{
    FragmentCollectorRead, Frame, OpCode, Payload, Role, WebSocket, WebSocketRead, WebSocketWrite,
};
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, UPGRADE, USER_AGENT};
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use deflate::{Agreed, Arrivals, Arrived, InflateError, Inflater, Rsv1Shim, WireStats};
pub use error::{Cause, ClientError, CloseCode};
use source_ip::SourceIps;
pub use target::Target;

use crate::message::{ClientMessage, FromNow, ServerMessage};
use crate::pusher::{self, Event};

/// The byte stream under every WebSocket: hyper's upgraded connection, whatever the transport.
type Io = TokioIo<Upgraded>;

/// What fastwebsockets reads from: the socket's read half, through the shim that counts wire
/// bytes and lets compressed frames past its reader ([`deflate`]'s doc says why).
type ReadIo = Rsv1Shim<ReadHalf<Io>>;

/// How connections are made: shared, read-only, by every task of a run.
pub struct Connector {
    targets: Vec<Target>,
    tls: Option<TlsConnector>,
    source_ips: Option<SourceIps>,
    origin: Option<String>,
    connect_timeout: Duration,
    /// `Some`: the clients speak Pusher, for this app.
    pusher: Option<Arc<pusher::App>>,
    /// `--compression`: offer permessage-deflate, and require it.
    compression: bool,
    wire: Arc<WireStats>,
}

impl Connector {
    pub fn new(
        targets: Vec<Target>,
        tls: Option<Arc<rustls::ClientConfig>>,
        source_ips: Option<SourceIps>,
        origin: Option<String>,
        connect_timeout: Duration,
        pusher: Option<pusher::App>,
        compression: bool,
    ) -> Self {
        Self {
            targets,
            tls: tls.map(TlsConnector::from),
            source_ips,
            origin,
            connect_timeout,
            pusher: pusher.map(Arc::new),
            compression,
            wire: Arc::default(),
        }
    }

    /// The same connector (TLS, source addresses, Origin, timeouts, protocol, compression) aimed
    /// at other `targets`, counting into the same wire counters: the reconnect storm's
    /// clients reconnect to another server than the one they first joined.
    pub fn retarget(&self, targets: Vec<Target>) -> Self {
        Self {
            targets,
            tls: self.tls.clone(),
            source_ips: self.source_ips.clone(),
            origin: self.origin.clone(),
            connect_timeout: self.connect_timeout,
            pusher: self.pusher.clone(),
            compression: self.compression,
            wire: self.wire.clone(),
        }
    }

    /// The targets, in the order clients are spread over them.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Whether the clients offer (and require) permessage-deflate.
    pub fn compression(&self) -> bool {
        self.compression
    }

    /// The wire counters of every connection this connector opened.
    pub fn wire(&self) -> &WireStats {
        &self.wire
    }

    /// Connects client number `index` (targets are used round-robin by index) and waits for its
    /// `welcome` (Pusher: `connection_established`). TCP connect, TLS, upgrade and welcome together must fit in the connect timeout.
    pub async fn connect(&self, index: usize) -> Result<Conn, ClientError> {
        let target = &self.targets[index % self.targets.len()];
        let started = Instant::now();
        match tokio::time::timeout(self.connect_timeout, self.connect_inner(target, index)).await {
            Ok(Ok(mut conn)) => {
                conn.connect_time = started.elapsed();
                Ok(conn)
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ClientError::Timeout(
                "connecting (TCP + TLS + upgrade + welcome)",
            )),
        }
    }

    async fn connect_inner(&self, target: &Target, index: usize) -> Result<Conn, ClientError> {
        let tcp = self.tcp_connect(target.addr).await?;
        let ws = match (&self.tls, target.tls) {
            (Some(tls), true) => {
                let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                    .map_err(|e| ClientError::Tls(std::io::Error::other(e)))?;
                let stream = tls.connect(name, tcp).await.map_err(ClientError::Tls)?;
                upgrade(stream, target, self.origin.as_deref(), self.compression).await?
            }
            (None, true) => {
                return Err(ClientError::Tls(std::io::Error::other(
                    "no TLS configuration for a wss:// target",
                )))
            }
            (_, false) => upgrade(tcp, target, self.origin.as_deref(), self.compression).await?,
        };
        let (ws, agreed) = ws;
        if self.compression {
            // --compression measures compressed delivery: a server that declines must not
            // be measured plain under that name.
            let Some(agreed) = &agreed else {
                self.wire.declined.fetch_add(1, Ordering::Relaxed);
                return Err(ClientError::CompressionDeclined);
            };
            let _ = self.wire.agreed.set(agreed.response.clone());
            self.wire.negotiated.fetch_add(1, Ordering::Relaxed);
        }
        let mut conn = Conn::new(ws, self.pusher.clone(), agreed, self.wire.clone(), index);
        conn.client_id = match conn.pusher {
            None => conn.reader.welcome().await?,
            Some(_) => conn.reader.pusher_welcome().await?,
        };
        Ok(conn)
    }

    async fn tcp_connect(&self, addr: SocketAddr) -> Result<TcpStream, ClientError> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(ClientError::Socket)?;
        if let Some(ips) = &self.source_ips {
            let local = SocketAddr::new(ips.next(), 0);
            bind_address_no_port(&socket).map_err(ClientError::Socket)?;
            socket
                .bind(local)
                .map_err(|error| ClientError::Bind { addr: local, error })?;
        }
        let stream = socket.connect(addr).await.map_err(ClientError::Connect)?;
        // Every frame we send is a whole message; Nagle would only delay it.
        stream.set_nodelay(true).map_err(ClientError::Connect)?;
        Ok(stream)
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: `bind()` to a source address then picks no port, and
/// `connect()` picks one unique for the full 4-tuple, so each source address serves ~28k
/// connections per destination instead of ~28k in total.
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// RFC 6455's GUID, hashed with the key into `Sec-WebSocket-Accept`.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Aborts the HTTP connection task unless the upgrade completed.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The HTTP/1.1 upgrade on an established stream.
/// With `compression`, offers permessage-deflate and returns what the server agreed to (`None`:
/// it declined); an answer a client must fail on (one we did not offer) is an error.
async fn upgrade<S>(
    stream: S,
    target: &Target,
    origin: Option<&str>,
    compression: bool,
) -> Result<(WebSocket<Io>, Option<Agreed>), ClientError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let key = fastwebsockets::handshake::generate_key();
    let mut request = Request::builder()
        .method("GET")
        .uri(target.path_and_query.as_str())
        .header(HOST, target.authority.as_str())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header("Sec-WebSocket-Key", key.as_str())
        .header("Sec-WebSocket-Version", "13")
        .header(
            USER_AGENT,
            concat!("roomcast-loadtest/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(origin) = origin {
        request = request.header("Origin", origin);
    }
    if compression {
        request = request.header("Sec-WebSocket-Extensions", deflate::OFFER);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|_| ClientError::BadUpgrade("cannot build the upgrade request"))?;

    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ClientError::Http)?;
    let mut http_task = AbortOnDrop(Some(tokio::spawn(async move {
        // Ends once the connection is upgraded; errors surface through `send_request`.
        let _ = connection.with_upgrades().await;
    })));
    let mut response = sender
        .send_request(request)
        .await
        .map_err(ClientError::Http)?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(ClientError::Status(response.status().as_u16()));
    }
    let headers = response.headers();
    let header_is = |name, value: &str| {
        headers
            .get(name)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| h.eq_ignore_ascii_case(value))
    };
    if !header_is(UPGRADE, "websocket") {
        return Err(ClientError::BadUpgrade("no `Upgrade: websocket` header"));
    }
    if !headers
        .get(CONNECTION)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| {
            h.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    {
        return Err(ClientError::BadUpgrade("no `Connection: Upgrade` header"));
    }
    if headers
        .get("Sec-WebSocket-Accept")
        .and_then(|h| h.to_str().ok())
        != Some(accept_key(&key).as_str())
    {
        return Err(ClientError::BadUpgrade("wrong Sec-WebSocket-Accept"));
    }
    let extensions = headers
        .get_all("Sec-WebSocket-Extensions")
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let agreed = if compression {
        deflate::parse_response(extensions).map_err(ClientError::BadExtension)?
    } else if headers.contains_key("Sec-WebSocket-Extensions") {
        // RFC 6455 9.1: an extension we did not ask for fails the connection.
        return Err(ClientError::BadExtension(
            "the server accepted an extension we did not offer".to_owned(),
        ));
    } else {
        None
    };
    let upgraded = hyper::upgrade::on(&mut response)
        .await
        .map_err(ClientError::Http)?;
    // The HTTP task is finishing on its own now.
    http_task.0 = None;
    Ok((
        WebSocket::after_handshake(TokioIo::new(upgraded), Role::Client),
        agreed,
    ))
}

/// An open connection that has received its `welcome`.
pub struct Conn {
    pub reader: Reader,
    pub writer: Writer,
    /// The `client_id` of the welcome (Pusher: the socket id).
    pub client_id: String,
    /// TCP connect to welcome.
    pub connect_time: Duration,
    /// `Some`: a Pusher connection of this app.
    pusher: Option<Arc<pusher::App>>,
}

impl Conn {
    fn new(
        ws: WebSocket<Io>,
        pusher: Option<Arc<pusher::App>>,
        agreed: Option<Agreed>,
        wire: Arc<WireStats>,
        index: usize,
    ) -> Self {
        let arrivals: Option<Arrivals> = agreed
            .as_ref()
            .map(|_| Arc::new(std::sync::Mutex::new(VecDeque::new())));
        let shim_arrivals = arrivals.clone();
        let shim_wire = wire.clone();
        let (read, write): (WebSocketRead<ReadIo>, WebSocketWrite<WriteHalf<Io>>) =
            ws.split(move |io| {
                let (read, write) = tokio::io::split(io);
                let read = Rsv1Shim::new(read, shim_wire.clone(), index, shim_arrivals.clone());
                (read, write)
            });
        let writer = Writer {
            inner: Arc::new(Mutex::new(write)),
        };
        let compressed = match (agreed, arrivals) {
            (Some(agreed), Some(arrivals)) => Some(Compressed {
                inflater: Inflater::new(&agreed),
                arrivals,
            }),
            _ => None,
        };
        Conn {
            reader: Reader {
                frames: FragmentCollectorRead::new(read),
                writer: writer.clone(),
                compressed,
                wire,
                index,
            },
            writer,
            client_id: String::new(),
            connect_time: Duration::ZERO,
            pusher,
        }
    }

    /// Sends `join_room` (with `"since":{}` when `since`) and reads until its `room_joined`
    /// arrives (other traffic, such as `member_joined` of earlier joiners, is skipped). Returns
    /// the member count it reported; `None` on Pusher, whose private channels report none
    /// (there `room` is the channel, and `since` is not sent).
    pub async fn join(
        &mut self,
        room: &str,
        since: bool,
        timeout: Duration,
    ) -> Result<Option<u64>, ClientError> {
        if let Some(app) = self.pusher.clone() {
            return self.subscribe(&app, room, timeout).await.map(|()| None);
        }
        let since = since.then_some(FromNow {});
        self.writer
            .send(&ClientMessage::JoinRoom { room, since })
            .await?;
        let wait = async {
            loop {
                let payload = self.reader.recv().await?;
                match ServerMessage::parse(&payload) {
                    Ok(ServerMessage::RoomJoined { room: r, members }) if r == room => {
                        return Ok(Some(members))
                    }
                    Ok(ServerMessage::Error { message }) => {
                        return Err(ClientError::ServerError(message))
                    }
                    Ok(_) => {}
                    Err(error) => return Err(ClientError::Unexpected(error.to_string())),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout("waiting for room_joined"))?
    }

    /// Pusher's join: a `pusher:subscribe` to `channel` signed for this socket, then reads
    /// until its `subscription_succeeded` (a `subscription_error` or `pusher:error` fails it).
    async fn subscribe(
        &mut self,
        app: &pusher::App,
        channel: &str,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let frame = app
            .subscribe(&self.client_id, channel)
            .map_err(ClientError::Encode)?;
        self.writer.send_text(frame).await?;
        let wait = async {
            loop {
                let payload = self.reader.recv().await?;
                match Event::parse(&payload) {
                    Ok(Event::SubscriptionSucceeded { channel: c }) if c == channel => {
                        return Ok(())
                    }
                    Ok(Event::SubscriptionError { error, .. }) => {
                        return Err(ClientError::ServerError(format!(
                            "subscription refused: {error}"
                        )))
                    }
                    Ok(Event::Error { message }) => return Err(ClientError::ServerError(message)),
                    Ok(_) => {}
                    Err(error) => return Err(ClientError::Unexpected(error.to_string())),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout("waiting for subscription_succeeded"))?
    }

    /// Sends a close frame and waits (at most `timeout`) for the server's close and end of
    /// stream, so the server closes TCP first and keeps the TIME_WAIT (our ephemeral ports stay
    /// free). Errors from the server that arrive first are returned.
    pub async fn close(mut self, timeout: Duration) -> Result<(), ClientError> {
        self.writer.close().await?;
        let drain = async {
            loop {
                match self.reader.recv().await {
                    Ok(payload) => {
                        if let Ok(ServerMessage::Error { message }) = ServerMessage::parse(&payload)
                        {
                            return Err(ClientError::ServerError(message));
                        }
                    }
                    // Our close was answered; anything after it is the end of the stream.
                    Err(ClientError::Closed(_)) => return Ok(()),
                    Err(error) => {
                        return match error.cause() {
                            Cause::Closed | Cause::Reset => Ok(()),
                            _ => Err(error),
                        }
                    }
                }
            }
        };
        tokio::time::timeout(timeout, drain)
            .await
            .map_err(|_| ClientError::Timeout("waiting for the server's close"))?
    }
}

/// The receiving half of a connection.
pub struct Reader {
    frames: FragmentCollectorRead<ReadIo>,
    writer: Writer,
    /// `Some` when permessage-deflate was negotiated.
    compressed: Option<Compressed>,
    wire: Arc<WireStats>,
    index: usize,
}

/// A reader's permessage-deflate state.
struct Compressed {
    inflater: Inflater,
    /// Filled by the connection's [`Rsv1Shim`], one entry per message start.
    arrivals: Arrivals,
}

impl Reader {
    /// The next text (or binary) message's payload. A close frame from the server ends the
    /// connection with [`ClientError::Closed`] (its echo is sent first). Not cancel-safe: drop
    /// the reader after cancelling it.
    pub async fn recv(&mut self) -> Result<Payload<'static>, ClientError> {
        loop {
            let writer = &self.writer;
            let frame = self
                .frames
                .read_frame(&mut |obligated: Frame<'static>| {
                    let writer = writer.clone();
                    async move {
                        // A pong or close echo that cannot be written (the server already shut
                        // the socket) must not hide the frame that asked for it.
                        let _ = writer.send_frame(obligated).await;
                        Ok::<(), fastwebsockets::WebSocketError>(())
                    }
                })
                .await?;
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    let Some(compressed) = &mut self.compressed else {
                        return Ok(frame.payload);
                    };
                    let arrived = compressed
                        .arrivals
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .pop_front();
                    return match arrived {
                        Some(Arrived::Plain) => Ok(frame.payload),
                        Some(Arrived::Compressed { text }) => {
                            let inflated = compressed.inflater.inflate(&frame.payload)?;
                            if text && std::str::from_utf8(&inflated).is_err() {
                                return Err(InflateError::NotUtf8.into());
                            }
                            self.wire.inflated.add(self.index, 1);
                            Ok(Payload::Owned(inflated))
                        }
                        None => Err(InflateError::Untracked.into()),
                    };
                }
                OpCode::Close => {
                    let code = (frame.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                    return Err(ClientError::Closed(CloseCode(code)));
                }
                _ => {}
            }
        }
    }

    /// Reads the `welcome` every connection starts with; returns its `client_id`.
    async fn welcome(&mut self) -> Result<String, ClientError> {
        let payload = self.recv().await?;
        match ServerMessage::parse(&payload) {
            Ok(ServerMessage::Welcome { client_id }) => Ok(client_id.into_owned()),
            Ok(other) => Err(ClientError::Unexpected(format!(
                "expected welcome, got {other:?}"
            ))),
            Err(error) => Err(ClientError::Unexpected(error.to_string())),
        }
    }

    /// Reads the `pusher:connection_established` a Pusher connection starts with; returns its
    /// socket id (a `pusher:error` instead, e.g. an unknown key, is the server's refusal).
    async fn pusher_welcome(&mut self) -> Result<String, ClientError> {
        let payload = self.recv().await?;
        match Event::parse(&payload) {
            Ok(Event::ConnectionEstablished { socket_id }) => Ok(socket_id),
            Ok(Event::Error { message }) => Err(ClientError::ServerError(message)),
            Ok(other) => Err(ClientError::Unexpected(format!(
                "expected pusher:connection_established, got {other:?}"
            ))),
            Err(error) => Err(ClientError::Unexpected(error.to_string())),
        }
    }
}

/// The sending half of a connection; clones share one socket.
#[derive(Clone)]
pub struct Writer {
    inner: Arc<Mutex<WebSocketWrite<WriteHalf<Io>>>>,
}

impl Writer {
    /// Sends one client message as a text frame.
    pub async fn send(&self, message: &ClientMessage<'_>) -> Result<(), ClientError> {
        let json = message.encode().map_err(ClientError::Encode)?;
        self.send_text(json).await
    }

    /// Sends an already encoded message as a text frame.
    pub async fn send_text(&self, json: Vec<u8>) -> Result<(), ClientError> {
        self.send_frame(Frame::text(Payload::Owned(json)))
            .await
            .map_err(ClientError::Ws)
    }

    /// Sends a close frame with code 1000 (once; later calls do nothing).
    pub async fn close(&self) -> Result<(), ClientError> {
        self.send_frame(Frame::close(1000, b""))
            .await
            .map_err(ClientError::Ws)
    }

    async fn send_frame(&self, frame: Frame<'_>) -> Result<(), fastwebsockets::WebSocketError> {
        let mut ws = self.inner.lock().await;
        if ws.is_closed() && frame.opcode == OpCode::Close {
            // A close frame went out already: a second one (e.g. the echo of the server's
            // answer to ours) must not be sent. Data frames fail with ConnectionClosed below.
            return Ok(());
        }
        ws.write_frame(frame).await?;
        // A no-op on plain TCP; pushes the TLS record out on wss://.
        ws.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
