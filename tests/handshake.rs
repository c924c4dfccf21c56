//! The HTTP request before the upgrade: RFC 6455 4.2.1 checks, the request-head size limit,
//! the connection caps counted from the TCP accept, the pending-handshake cap, health on a
//! full server, and what a pending handshake costs.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{connect_with, http_get, start_server_with, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends `request` as it is and returns the status of the answer (0 if the server closed
/// without one).
async fn status_of(addr: SocketAddr, request: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(common::EXPECT, stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn upgrade(method: &str, version: &str, host: bool, key: &str, ws_version: &str) -> String {
    let host = if host { "Host: example.com\r\n" } else { "" };
    format!(
        "{method} / {version}\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {ws_version}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_formed_upgrade_gets_101_with_the_rfc_accept_key() {
    let server = start_server_with(|_| {}).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = upgrade("GET", "HTTP/1.1", true, KEY, "13");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
    // RFC 6455 1.3's own example.
    assert!(
        text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_by_post_put_or_head_is_refused_with_400() {
    let server = start_server_with(|_| {}).await;
    for method in ["POST", "PUT", "HEAD"] {
        let request = upgrade(method, "HTTP/1.1", true, KEY, "13");
        assert_eq!(status_of(server.addr, &request).await, 400, "{method}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_over_http_1_0_is_refused_with_400() {
    let server = start_server_with(|_| {}).await;
    let request = upgrade("GET", "HTTP/1.0", true, KEY, "13");
    assert_eq!(status_of(server.addr, &request).await, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_without_a_host_is_refused_with_400() {
    let server = start_server_with(|_| {}).await;
    let request = upgrade("GET", "HTTP/1.1", false, KEY, "13");
    assert_eq!(status_of(server.addr, &request).await, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_base64_of_16_bytes_is_refused_with_400() {
    let server = start_server_with(|_| {}).await;
    // Not base64; base64 of 15 bytes; base64 of 17 bytes.
    for key in [
        "not-a-key",
        "dGhlIHNhbXBsZSBub25j",
        "dGhlIHNhbXBsZSBub25jZTEy",
    ] {
        let request = upgrade("GET", "HTTP/1.1", true, key, "13");
        assert_eq!(status_of(server.addr, &request).await, 400, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_websocket_version_gets_426_naming_version_13() {
    let server = start_server_with(|_| {}).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = upgrade("GET", "HTTP/1.1", true, KEY, "8");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = tokio::time::timeout(common::EXPECT, stream.read_to_string(&mut response)).await;
    assert_eq!(status(&response), 426, "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_gets_431_without_being_read_to_its_end() {
    let server = start_server_with(|_| {}).await; // 8 KiB by default
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // The red team's ~390 KB of headers: the server answers after the first 8 KiB, so the
    // rest may not even be taken (the write is allowed to fail).
    let mut request = upgrade("GET", "HTTP/1.1", true, KEY, "13").replace("\r\n\r\n", "\r\n");
    request.push_str("X-Padding: ");
    request.push_str(&"a".repeat(390_000));
    request.push_str("\r\n\r\n");
    let writer = async {
        let _ = stream.write_all(request.as_bytes()).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    let mut response = vec![0; 4096];
    let n = tokio::time::timeout(common::EXPECT, stream.read(&mut response))
        .await
        .expect("an answer")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&response[..n]);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_head_limit_is_configurable() {
    let server = start_server_with(|config| config.max_request_head_size = 64 * 1024).await;
    let token_like = "a".repeat(20_000);
    let path = format!("/?pad={token_like}");
    assert!(connect_with(&server, &path, &[]).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_right_behind_the_upgrade_request_are_served() {
    let server = start_server_with(|_| {}).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // The request and a masked text frame `{"type":"join_room","room":"r"}` in one write.
    let payload = br#"{"type":"join_room","room":"r"}"#;
    let mask = [1u8, 2, 3, 4];
    let mut bytes = upgrade("GET", "HTTP/1.1", true, KEY, "13").into_bytes();
    bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0; 4096];
    let deadline = Instant::now() + common::EXPECT;
    while !String::from_utf8_lossy(&got).contains("room_joined") {
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&got)
        );
        let n = tokio::time::timeout(common::EXPECT, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
}

/// A connection that has had one plain request answered (and so is served by hyper now).
async fn kept_alive_after_a_health_check(server: &common::TestServer) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_kept_alive_after_a_plain_request_can_still_upgrade() {
    let server = start_server_with(|_| {}).await;
    let mut stream = kept_alive_after_a_health_check(&server).await;
    let mut buf = vec![0; 4096];
    let request = upgrade("GET", "HTTP/1.1", true, KEY, "13");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("welcome") {
        let n = tokio::time::timeout(common::EXPECT, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).contains("101 Switching Protocols"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_on_a_kept_alive_connection_closes_it() {
    // Kept open after a refusal, such a connection would hold no place under the caps.
    let server = start_server_with(|_| {}).await;
    let mut stream = kept_alive_after_a_health_check(&server).await;
    let request = upgrade("GET", "HTTP/1.1", true, KEY, "8");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(common::EXPECT, stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 426"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_defer_accept_connections_that_never_send_a_request_count_against_the_per_ip_cap() {
    let server = start_server_with(|config| {
        config.max_connections_per_ip = 3;
        config.defer_accept = Duration::ZERO;
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Give the server time to accept them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(connect_with(&server, "/", &[]).await.err(), Some(429));
    drop(idle.pop());
    let deadline = Instant::now() + common::EXPECT;
    loop {
        match connect_with(&server, "/", &[]).await {
            Ok(_) => break,
            Err(429) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(status) => panic!("place not given back: {status}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_defer_accept_connections_that_never_send_a_request_count_against_the_global_cap() {
    let server = start_server_with(|config| {
        config.max_connections = 3;
        config.defer_accept = Duration::ZERO;
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(connect_with(&server, "/", &[]).await.err(), Some(503));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_defer_accept_silent_connections_wait_in_the_kernel_and_are_served_once_they_speak() {
    // The default: the kernel keeps a connection until its first bytes arrive.
    let server = start_server_with(|config| config.max_connections = 3).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Not accepted, so they hold no place under the cap.
    let client = connect_with(&server, "/", &[]).await;
    assert!(client.is_ok(), "refused: {:?}", client.err());
    drop(client);
    // One that speaks late is accepted then and served like any other.
    let mut late = silent.pop().unwrap();
    let request = upgrade("GET", "HTTP/1.1", true, KEY, "13");
    late.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(common::EXPECT, late.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_still_answers_health_and_metrics() {
    let server = start_server_with(|config| config.max_connections = 2).await;
    let _a = connect_with(&server, "/", &[]).await.unwrap();
    let _b = connect_with(&server, "/", &[]).await.unwrap();
    assert_eq!(connect_with(&server, "/", &[]).await.err(), Some(503));
    assert_eq!(status(&http_get(server.addr, "/healthz").await), 200);
    assert_eq!(status(&http_get(server.addr, "/readyz").await), 200);
    assert_eq!(status(&http_get(server.addr, "/metrics").await), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_over_the_pending_cap_are_refused_with_503_and_counted() {
    let server = start_server_with(|config| config.max_pending_handshakes = 4).await;
    let mut pending = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        pending.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(connect_with(&server, "/", &[]).await.err(), Some(503));
    drop(pending);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = http_get(server.addr, "/metrics").await;
    assert!(
        metrics.contains(r#"roomcast_connections_refused_total{reason="pending_handshakes"} 1"#),
        "{metrics}"
    );
    assert!(connect_with(&server, "/", &[]).await.is_ok());
}

/// Waits until the server reports `n` pending handshakes (or a few seconds pass).
async fn wait_for_pending(addr: SocketAddr, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let wanted = format!("roomcast_handshakes_pending {n}\n");
    while Instant::now() < deadline {
        if http_get(addr, "/metrics").await.contains(&wanted) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The red team's finding: 16,000 slowloris requests held 512 MB (32 KiB each) and 3,000
/// unfinished 390 KB heads 1.6 GB. A pending handshake now holds what it has sent, in a
/// buffer sized to it. 4,000 of them, each 1 KiB into its head, must cost the server under
/// 5 KiB apiece, and a well-behaved client must still upgrade at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshakes_cost_little_memory_and_do_not_delay_a_good_client() {
    const PENDING: usize = 4_000;
    common::raise_open_file_limit();
    let server = common::ServerProcess::start(&["--handshake-timeout", "60s"], None);
    // Warm up: one connection of each kind, so first-use allocations are in the baseline.
    drop(connect_tungstenite(&server.url()).await);
    assert_eq!(status(&http_get(server.addr, "/healthz").await), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss();
    let partial = format!(
        "GET /?token=x HTTP/1.1\r\nHost: example.com\r\nX-Padding: {}",
        "p".repeat(1000)
    );
    let mut pending = Vec::with_capacity(PENDING);
    for _ in 0..PENDING {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(partial.as_bytes()).await.unwrap();
        pending.push(stream);
    }
    wait_for_pending(server.addr, PENDING).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_handshake = server.rss().saturating_sub(before) / PENDING;
    println!("{per_handshake} bytes of server RSS per pending handshake");
    assert!(
        per_handshake < 5 * 1024,
        "{per_handshake} bytes per pending handshake"
    );
    let started = Instant::now();
    drop(connect_tungstenite(&server.url()).await);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a good client waited {:?}",
        started.elapsed()
    );
    drop(pending);
}

async fn connect_tungstenite(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("a good client upgrades")
        .0
}

/// The red team's finding: with the default `--max-connections 0`, at the open-file limit
/// accept failed and `/healthz` and `/readyz` timed out for 28 s. The default cap is now the
/// open-file limit less a reserve: upgrades beyond it get 503 and health keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_open_file_limit_upgrades_get_503_and_health_still_answers() {
    common::raise_open_file_limit();
    let server = common::ServerProcess::start(&[], Some(400));
    let mut open = Vec::new();
    let refused = loop {
        assert!(open.len() < 450, "never refused");
        let attempt = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(server.url()),
        )
        .await;
        match attempt {
            Ok(Ok((ws, _))) => open.push(ws),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                break response.status().as_u16()
            }
            Ok(Err(other)) => panic!("after {} connections: {other}", open.len()),
            Err(_) => panic!("after {} connections an upgrade hung", open.len()),
        }
    };
    assert_eq!(refused, 503);
    // 400 less the 256 kept for health, metrics and the process itself.
    assert_eq!(open.len(), 144);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let started = Instant::now();
        assert_eq!(status(&http_get(server.addr, path).await), 200, "{path}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{path} was slow"
        );
    }
}
