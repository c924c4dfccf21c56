//! Test harness: starts the real server on `127.0.0.1:0` and drives it with a real WebSocket
//! client (tokio-tungstenite), plus a raw-socket client for frame-level tests.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub mod app_stub;
pub mod history;
pub mod redis;

use futures_util::{SinkExt, StreamExt};
use roomcast::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Sorted keys of a JSON object.
pub fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// Asserts that `reply` is the seed's `error` message with exactly this text.
pub fn assert_error(reply: &Value, text: &str) {
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["message"], text, "{reply}");
    assert!(reply["timestamp"].is_u64(), "{reply}");
    assert_eq!(keys(reply), ["message", "timestamp", "type"]);
}

/// A plain HTTP GET on the server's port; the whole response as text.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    http_get_with(addr, path, "").await
}

/// [`http_get`] with one more header line (`Name: value`), the whole response as text.
pub async fn http_get_with(addr: SocketAddr, path: &str, header: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let header = if header.is_empty() {
        String::new()
    } else {
        format!("{header}\r\n")
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(EXPECT, stream.read_to_string(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    response
}

/// The status code of an HTTP response.
pub fn status(response: &str) -> u16 {
    response
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"))
}

/// One HTTP request; the status and the body parsed as JSON.
pub async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    body: &str,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = if auth.is_empty() {
        String::new()
    } else {
        format!("{auth}\r\n")
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(EXPECT, stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    let status = status(&text);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, json)
}

/// How long a test waits for a message it expects.
pub const EXPECT: Duration = Duration::from_secs(5);
/// How long a test watches for a message that must NOT arrive (the seed's silences).
pub const SILENCE: Duration = Duration::from_millis(300);

/// A server running inside the test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub server: roomcast::server::ServerHandle,
    task: JoinHandle<()>,
    /// The allow-all application of `ROOMCAST_TEST_CONNECT_PROXY` runs.
    _app: Option<app_stub::AppStub>,
    /// `ROOMCAST_TEST_CLUSTER`: every node's address (`addr` is the first), handed out
    /// round-robin by [`TestServer::url`], the other nodes, and their Redis.
    cluster: Vec<SocketAddr>,
    next_node: std::sync::atomic::AtomicUsize,
    _others: Vec<TestServer>,
    /// The cluster's Redis: a [`redis::RedisServer`] or a [`redis::RedisCluster`].
    _redis: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl TestServer {
    /// The WebSocket URL; in a cluster, of the next node in turn, so that a test's clients are
    /// spread over the nodes.
    pub fn url(&self) -> String {
        if self.cluster.is_empty() {
            return format!("ws://{}/", self.addr);
        }
        let next = self
            .next_node
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("ws://{}/", self.cluster[next % self.cluster.len()])
    }

    /// In a cluster, waits until a node has subscribed to the channel of client `id` (which
    /// it does just after the welcome): from then on the client is reachable from every node,
    /// so a test's private message to it right after connecting is not a race.
    pub async fn wait_reachable(&self, id: &str) {
        let Some(redis) = &self._redis else {
            return;
        };
        let channel = format!("roomcast:client:{id}");
        let started = std::time::Instant::now();
        loop {
            let subscribed = if let Some(single) = redis.downcast_ref::<redis::RedisServer>() {
                single.subscribers(&channel).await > 0
            } else if let Some(cluster) = redis.downcast_ref::<redis::RedisCluster>() {
                cluster.subscribers(&channel).await.0 > 0
            } else {
                return;
            };
            if subscribed {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{channel} not subscribed after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Cancels the server and waits for it to finish its drain.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server stops within its drain timeout")
            .expect("server task did not panic");
    }
}

/// Starts a server with the default configuration on a free port.
pub async fn start_server() -> TestServer {
    start_server_with(|_| {}).await
}

/// Raises this process's soft open-file limit to its hard limit, once. Server and clients of a
/// test share the process, so a 1,000-client test needs over 2,000 descriptors, more than the
/// common soft default of 1,024. The `roomcast` binary does the same at start-up.
pub fn raise_open_file_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
            eprintln!("could not raise the open-file limit: {error}");
        }
    });
}

/// Starts a server after `tweak` adjusted the defaults.
///
/// `ROOMCAST_TEST_CLUSTER=1`: three nodes on one Redis (a redis-server of the test's own)
/// instead, the test's clients spread over them round-robin; CI runs the seed protocol suite
/// once more this way, to show that the cluster keeps its behaviour.
/// `ROOMCAST_TEST_CLUSTER=redis-cluster`: the same on a Redis Cluster of three masters
/// (`--redis-cluster`, sharded pub/sub).
pub async fn start_server_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
    if std::env::var_os("ROOMCAST_TEST_CLUSTER").is_some() {
        return start_cluster(tweak).await;
    }
    start_server_on(tweak, None).await
}

async fn start_cluster(tweak: impl FnOnce(&mut Config)) -> TestServer {
    const NODES: usize = 3;
    let sharded = std::env::var("ROOMCAST_TEST_CLUSTER").as_deref() == Ok("redis-cluster");
    let (single, sharded) = if sharded {
        let cluster = redis::RedisCluster::start()
            .await
            .expect("ROOMCAST_TEST_CLUSTER needs redis-server");
        (None, Some(cluster))
    } else {
        let redis = redis::RedisServer::start()
            .await
            .expect("ROOMCAST_TEST_CLUSTER needs redis-server");
        (Some(redis), None)
    };
    let mut template = None;
    let mut tweak = Some(tweak);
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        let node = match &template {
            None => {
                let tweak = tweak.take().expect("first node");
                start_server_routed(
                    |config| {
                        tweak(config);
                        match (&single, &sharded) {
                            (Some(redis), _) => config.redis = Some(redis.url()),
                            (_, Some(cluster)) => config.redis_cluster = cluster.urls(),
                            _ => unreachable!("one of them"),
                        }
                        template = Some(config.clone());
                    },
                    Arc::new(roomcast::hub::LocalHub::new()),
                )
                .await
            }
            Some(first) => {
                let first: Config = first.clone();
                start_server_routed(
                    |config| {
                        *config = first;
                        config.listen = "127.0.0.1:0".parse().unwrap();
                    },
                    Arc::new(roomcast::hub::LocalHub::new()),
                )
                .await
            }
        };
        nodes.push(node);
    }
    match (&single, &sharded) {
        (Some(redis), _) => {
            redis
                .wait_for_subscribers("roomcast:broadcast", NODES)
                .await
        }
        (_, Some(cluster)) => {
            cluster
                .wait_for_subscribers("roomcast:broadcast", NODES)
                .await
        }
        _ => unreachable!("one of them"),
    }
    let mut nodes = nodes.into_iter();
    let mut first = nodes.next().expect("a node");
    first.cluster.push(first.addr);
    for node in nodes {
        first.cluster.push(node.addr);
        first._others.push(node);
    }
    first._redis = match (single, sharded) {
        (Some(redis), _) => Some(Box::new(redis)),
        (_, Some(cluster)) => Some(Box::new(cluster)),
        _ => None,
    };
    first
}

/// Starts a server that delivers through `router`. Servers sharing one `LocalHub` act as one
/// node: a shutdown closes every connection of the hub.
pub async fn start_server_routed(
    tweak: impl FnOnce(&mut Config),
    router: Arc<dyn roomcast::hub::Router>,
) -> TestServer {
    start_server_on(tweak, Some(router)).await
}

/// Starts a server delivering through `router`, or through the hub its configuration makes
/// (with the rooms' history when configured).
async fn start_server_on(
    tweak: impl FnOnce(&mut Config),
    router: Option<Arc<dyn roomcast::hub::Router>>,
) -> TestServer {
    raise_open_file_limit();
    let mut config = Config::with_listen("127.0.0.1:0".parse().unwrap());
    config.workers = 2;
    // ROOMCAST_TEST_CONNECT_PROXY=1: every upgrade of the test first asks an application that
    // allows everyone (and grants nothing), so a suite shows that the connect proxy changes no
    // behaviour of the protocol. CI runs the seed protocol tests once more this way.
    let app = match std::env::var_os("ROOMCAST_TEST_CONNECT_PROXY") {
        Some(_) => {
            let app = app_stub::AppStub::start(|_| app_stub::Answer::ok(json!({}))).await;
            config.connect_proxy = Some(app.url("/connect"));
            Some(app)
        }
        None => None,
    };
    // ROOMCAST_TEST_HISTORY=1: every room keeps a history, so a suite shows that seed clients
    // (who never send `since`) see the very frames they saw without it.
    if std::env::var_os("ROOMCAST_TEST_HISTORY").is_some() {
        config.history_size = 100;
        config.history_ttl = Duration::from_secs(60);
    }
    tweak(&mut config);
    let shutdown = CancellationToken::new();
    let server = match router {
        Some(router) => roomcast::Server::bind_with_router(config, shutdown.clone(), router),
        None => roomcast::Server::bind(config, shutdown.clone()),
    }
    .expect("bind");
    let addr = server.local_addr();
    let handle = server.handle();
    let task = tokio::spawn(server.run());
    TestServer {
        addr,
        shutdown,
        server: handle,
        task,
        _app: app,
        cluster: Vec::new(),
        next_node: std::sync::atomic::AtomicUsize::new(0),
        _others: Vec::new(),
        _redis: None,
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A connected protocol client that has read its `welcome`.
pub struct Client {
    pub ws: Ws,
    pub id: String,
    pub welcome: Value,
}

impl Client {
    /// Connects and reads the welcome message.
    pub async fn connect(server: &TestServer) -> Client {
        let client = Client::connect_url(&server.url()).await;
        server.wait_reachable(&client.id).await;
        client
    }

    /// Connects to a server given by its URL (one in another process) and reads the welcome.
    pub async fn connect_url(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket handshake");
        let mut client = Client {
            ws,
            id: String::new(),
            welcome: Value::Null,
        };
        let welcome = client.recv().await;
        assert_eq!(welcome["type"], "welcome", "first message is welcome");
        client.id = welcome["client_id"].as_str().expect("client_id").to_owned();
        client.welcome = welcome;
        client
    }

    pub async fn send(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned()))
            .await
            .expect("send");
    }

    /// The next text message as JSON; panics after [`EXPECT`].
    pub async fn recv(&mut self) -> Value {
        self.recv_within(EXPECT).await
    }

    /// The next text message as JSON; panics after `within`.
    pub async fn recv_within(&mut self, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a message within the deadline")
                .expect("connection open")
                .expect("valid frame");
            match next {
                Message::Text(text) => {
                    return serde_json::from_str(&text).expect("server sends JSON")
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Asserts that nothing arrives within [`SILENCE`].
    pub async fn expect_silence(&mut self) {
        if let Ok(Some(message)) = tokio::time::timeout(SILENCE, self.ws.next()).await {
            panic!("expected silence, got {message:?}");
        }
    }

    /// Reads until the server's close frame and returns it (skipping data frames).
    pub async fn recv_close(&mut self, within: Duration) -> Option<CloseFrame<'static>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("no close frame within {within:?}"),
                Ok(None) => return None,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    // Keep polling, as a real client does, so the close reply goes out and the
                    // handshake completes.
                    let _ = tokio::time::timeout_at(deadline, async {
                        while let Some(Ok(_)) = self.ws.next().await {}
                    })
                    .await;
                    return frame;
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) => return None,
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join_room", "room": room})).await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "room_joined", "{reply}");
        reply
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Wait for the server's echo so the server has processed the close.
        let _ = tokio::time::timeout(EXPECT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Close code of a close frame as a number.
/// Joins `room`, asserts the `room_joined`, and returns the member count it reports.
pub async fn joined_members(client: &mut Client, room: &str) -> u64 {
    let joined = client.join(room).await;
    assert_eq!(joined["type"], "room_joined", "{joined}");
    joined["members"].as_u64().unwrap()
}

/// Reads one `kind` notice (`member_joined`, `member_left`) about `id` reporting `total`.
pub async fn heard_member(client: &mut Client, kind: &str, id: &str, total: u64) {
    let notice = client.recv().await;
    assert_eq!(notice["type"], kind, "{notice}");
    assert_eq!(notice["client_id"], id, "{notice}");
    assert_eq!(notice["total_members"], total, "{notice}");
}

pub fn code(frame: &Option<CloseFrame<'static>>) -> u16 {
    frame.as_ref().map_or(0, |f| u16::from(f.code))
}

pub fn close_code(code: u16) -> CloseCode {
    CloseCode::from(code)
}

/// Two clients that have both joined `room`; the first has already read the second's
/// `member_joined`, so both start with nothing waiting.
pub async fn pair_in_room(server: &TestServer, room: &str) -> (Client, Client) {
    let mut a = Client::connect(server).await;
    let mut b = Client::connect(server).await;
    a.join(room).await;
    b.join(room).await;
    a.recv().await; // b joined
    (a, b)
}

/// A WebSocket client on a bare TCP socket, for sending frames a well-behaved library will not
/// (fragments, bad UTF-8, reserved bits) and reading the server's frames byte by byte.
pub struct RawClient {
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

/// A frame as read by [`RawClient`].
#[derive(Debug)]
pub struct RawFrame {
    pub fin: bool,
    /// RSV1: a compressed message (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn json(&self) -> Value {
        assert_eq!(self.opcode, 1, "text frame");
        serde_json::from_slice(&self.payload).expect("JSON payload")
    }

    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, 8, "close frame, got {self:?}");
        u16::from_be_bytes([self.payload[0], self.payload[1]])
    }
}

impl RawClient {
    /// Does the HTTP upgrade by hand and reads the welcome frame.
    pub async fn connect(server: &TestServer) -> RawClient {
        Self::connect_with_headers(server, "").await.0
    }

    /// The same, with `headers` (each line ending in CRLF) added to the request; the client
    /// and the 101 response's head.
    pub async fn connect_with_headers(server: &TestServer, headers: &str) -> (RawClient, String) {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n",
            server.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buffer = Vec::new();
        let header_end = loop {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(EXPECT, stream.read(&mut chunk))
                .await
                .expect("upgrade response in time")
                .unwrap();
            assert!(n > 0, "server closed during the upgrade");
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buffer.drain(..header_end);
        let mut client = RawClient { stream, buffer };
        let welcome = client.read_frame().await.expect("welcome");
        assert_eq!(welcome.json()["type"], "welcome");
        (client, head)
    }

    /// Sends one masked frame with the given first byte (FIN, RSV and opcode bits).
    pub async fn send_frame(&mut self, first_byte: u8, payload: &[u8]) {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![first_byte];
        let len = payload.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.send_raw(&frame).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        // The server may already have closed; a failed write shows up in the next read.
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads the next frame, or `None` when the server closed the TCP connection.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buffer) {
                self.buffer.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = match tokio::time::timeout(EXPECT, self.stream.read(&mut chunk))
                .await
                .expect("a frame within the deadline")
            {
                Ok(n) => n,
                Err(_) => return None,
            };
            if n == 0 {
                return None;
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until a close frame and returns its code.
    pub async fn read_close_code(&mut self) -> u16 {
        loop {
            let frame = self.read_frame().await.expect("a close frame before EOF");
            if frame.opcode == 8 {
                return frame.close_code();
            }
        }
    }
}

fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
    let (len, start) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < start + len {
        return None;
    }
    Some((
        RawFrame {
            fin: buf[0] & 0x80 != 0,
            rsv1: buf[0] & 0x40 != 0,
            opcode: buf[0] & 0x0f,
            payload: buf[start..start + len].to_vec(),
        },
        start + len,
    ))
}

/// Connects with a hand-built upgrade request (extra headers, query string). Returns the HTTP
/// status of a refusal as `Err`.
pub async fn connect_with(
    server: &TestServer,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<Client, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Error;
    let url = format!("ws://{}{}", server.addr, path_and_query);
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => {
            let mut client = Client {
                ws,
                id: String::new(),
                welcome: Value::Null,
            };
            let welcome = client.recv().await;
            assert_eq!(welcome["type"], "welcome");
            client.id = welcome["client_id"].as_str().unwrap().to_owned();
            client.welcome = welcome;
            Ok(client)
        }
        Err(Error::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("unexpected handshake error: {other}"),
    }
}

/// The `roomcast` binary running as its own process (so its memory can be measured apart
/// from the test's clients), killed when dropped.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the binary on a free port with `args`; with `open_files`, under that open-file
    /// limit (soft and hard), as a deployment's `LimitNOFILE` would set it.
    pub fn start(args: &[&str], open_files: Option<u64>) -> ServerProcess {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_roomcast"));
        command
            .args(["--listen", &listen, "--workers", "1"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(limit) = open_files {
            // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("start the roomcast binary");
        let addr: SocketAddr = listen.parse().unwrap();
        let deadline = std::time::Instant::now() + EXPECT;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        ServerProcess { child, addr }
    }

    /// The process's resident memory in bytes (VmRSS).
    pub fn rss(&self) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server process is alive");
        let kib: usize = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on: bound for a moment, then released.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
