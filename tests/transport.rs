//! HTTP and WebSocket framing: health check, the upgrade, fragments, pings, the close
//! handshake, and the close codes for frames that break RFC 6455 or the size limit.

mod common;

use common::{http_get, start_server, start_server_with, Client, RawClient};
use serde_json::json;

const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_200_on_the_websocket_port() {
    let server = start_server().await;
    let response = http_get(server.addr, "/healthz").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_get_of_root_without_upgrade_serves_the_demo_page() {
    let server = start_server().await;
    let response = http_get(server.addr, "/").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("text/html"), "{response}");
    let script = http_get(server.addr, "/roomcast.js").await;
    assert!(script.starts_with("HTTP/1.1 200"), "{script}");
    assert!(script.contains("text/javascript"), "{script}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_is_404() {
    let server = start_server().await;
    let response = http_get(server.addr, "/nope").await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_message_is_reassembled() {
    let server = start_server().await;
    let mut raw = RawClient::connect(&server).await;
    let text = json!({"type": "join_room", "room": "fragments"}).to_string();
    let (first, rest) = text.as_bytes().split_at(10);
    let (middle, last) = rest.split_at(10);
    raw.send_frame(TEXT, first).await;
    raw.send_frame(CONTINUATION, middle).await;
    // A ping may arrive between fragments and is answered at once.
    raw.send_frame(FIN | PING, b"mid").await;
    raw.send_frame(FIN | CONTINUATION, last).await;
    let pong = raw.read_frame().await.unwrap();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"mid"[..]));
    let joined = raw.read_frame().await.unwrap().json();
    assert_eq!(joined["type"], "room_joined");
    assert_eq!(joined["room"], "fragments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_answered_with_a_pong_carrying_the_same_payload() {
    let server = start_server().await;
    let mut raw = RawClient::connect(&server).await;
    raw.send_frame(FIN | PING, b"are you there").await;
    let pong = raw.read_frame().await.unwrap();
    assert!(pong.fin);
    assert_eq!(pong.opcode, 0xA);
    assert_eq!(pong.payload, b"are you there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_is_echoed_with_its_code() {
    let server = start_server().await;
    let mut raw = RawClient::connect(&server).await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    raw.send_frame(FIN | CLOSE, &payload).await;
    assert_eq!(raw.read_close_code().await, 1000);
    assert!(
        raw.read_frame().await.is_none(),
        "server closes the TCP connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let server = start_server().await;
    let mut raw = RawClient::connect(&server).await;
    raw.send_frame(FIN | TEXT, &[b'{', 0xff, 0xfe, b'}']).await;
    assert_eq!(raw.read_close_code().await, 1007);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_bits_close_with_1002() {
    let server = start_server().await;
    let mut raw = RawClient::connect(&server).await;
    raw.send_frame(FIN | 0x40 | TEXT, b"{}").await;
    assert_eq!(raw.read_close_code().await, 1002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_opcode_closes_with_1002() {
    let server = start_server().await;
    let mut raw = RawClient::connect(&server).await;
    raw.send_frame(FIN | 0x3, b"{}").await;
    assert_eq!(raw.read_close_code().await, 1002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_bit_length_with_its_top_bit_set_closes_with_1002_not_1009() {
    let server = start_server().await;
    let mut raw = RawClient::connect(&server).await;
    let mut header = vec![FIN | TEXT, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 63 | 2).to_be_bytes());
    header.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    raw.send_raw(&header).await;
    assert_eq!(raw.read_close_code().await, 1002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_the_size_limit_closes_with_1009() {
    let server = start_server_with(|config| config.max_message_size = 1024).await;
    let mut raw = RawClient::connect(&server).await;
    let mut big = br#"{"type":"broadcast","message":""#.to_vec();
    big.resize(2000, b'x');
    big.extend_from_slice(br#""}"#);
    raw.send_frame(FIN | TEXT, &big).await;
    assert_eq!(raw.read_close_code().await, 1009);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_message_over_the_size_limit_closes_with_1009() {
    let server = start_server_with(|config| config.max_message_size = 1024).await;
    let mut raw = RawClient::connect(&server).await;
    let chunk = vec![b'x'; 600];
    raw.send_frame(TEXT, &chunk).await;
    raw.send_frame(CONTINUATION, &chunk).await;
    raw.send_frame(FIN | CONTINUATION, &chunk).await;
    assert_eq!(raw.read_close_code().await, 1009);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_at_the_size_limit_is_accepted() {
    let server = start_server_with(|config| config.max_message_size = 1024).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let overhead = json!({"type": "broadcast", "message": ""})
        .to_string()
        .len();
    let body = "y".repeat(1024 - overhead);
    a.send(json!({"type": "broadcast", "message": body})).await;
    assert_eq!(
        b.recv().await["message"].as_str().unwrap().len(),
        body.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_client_does_not_disturb_the_others() {
    let server = start_server().await;
    let (mut a, mut b) = common::pair_in_room(&server, "r").await;
    let mut raw = RawClient::connect(&server).await;
    raw.send_raw(&[0xff; 64]).await;
    a.send(json!({"type": "room_message", "room": "r", "message": "still here"}))
        .await;
    assert_eq!(b.recv().await["message"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_going_away_1001_to_every_client() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.join("r").await;
    let shutdown = server.shutdown.clone();
    let stopping = tokio::spawn(server.stop());
    shutdown.cancel();
    for client in [&mut a, &mut b] {
        let frame = client.recv_close(common::EXPECT).await;
        assert_eq!(common::code(&frame), 1001);
        assert_eq!(frame.unwrap().reason, "server shutting down");
    }
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_port_in_use_refuses_to_start() {
    let server = start_server().await;
    let mut config = roomcast::Config::with_listen(server.addr);
    config.workers = 1;
    let error = roomcast::Server::bind(config, Default::default())
        .err()
        .expect("SO_REUSEPORT must not let a second server share the port silently");
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_violation_names_itself_in_the_close_frame() {
    let server = start_server().await;
    let mut raw = RawClient::connect(&server).await;
    raw.send_frame(FIN | 0x40 | TEXT, b"{}").await;
    let close = loop {
        let frame = raw.read_frame().await.expect("a close frame");
        if frame.opcode == 8 {
            break frame;
        }
    };
    assert_eq!(close.close_code(), 1002);
    assert_eq!(
        std::str::from_utf8(&close.payload[2..]).unwrap(),
        "reserved bits set without an extension"
    );
}
