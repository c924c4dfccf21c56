//! permessage-deflate (RFC 7692) behind `--compression`: the negotiation, compressed client
//! messages, fan-out frames compressed once and shared, the size limits on what a message
//! inflates to; with raw clients that see every bit of a frame (compressed with flate2, not
//! with the server's own code), and with the Python `websockets` client, unmodified
//! (tests/pusher/requirements.txt pins it; `.ci/run` installs it).

mod common;

use std::path::Path;

use common::{start_server_with, RawClient, TestServer};
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};

const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
const ACCEPTED: &str =
    "sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover";

async fn compressing_server() -> TestServer {
    start_server_with(|config| {
        config.compression = true;
        config.max_message_size = 64 * 1024;
    })
    .await
}

/// `payload` deflated on its own with a sync flush, without the trailing `00 00 ff ff`, as a
/// client sends it (RFC 7692 7.2.1).
fn deflated(payload: &[u8]) -> Vec<u8> {
    let mut deflater = Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    deflater
        .compress_vec(payload, &mut out, FlushCompress::Sync)
        .unwrap();
    assert_eq!(deflater.total_in() as usize, payload.len(), "room enough");
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A compressed message from the server inflated, with the tail put back.
fn inflated(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut inflater = Decompress::new(false);
    let mut out = Vec::with_capacity(1 << 20);
    inflater
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    assert_eq!(inflater.total_in() as usize, input.len());
    out
}

fn has_extension(head: &str) -> bool {
    head.to_ascii_lowercase().contains(ACCEPTED)
}

/// Connects offering permessage-deflate, asserting the server accepted it.
async fn compressing_client(server: &TestServer) -> RawClient {
    let (client, head) = RawClient::connect_with_headers(server, OFFER).await;
    assert!(has_extension(&head), "{head}");
    client
}

/// Sends `value` as one compressed text frame.
async fn send_compressed(client: &mut RawClient, value: &Value) {
    let text = value.to_string();
    client.send_frame(0xc1, &deflated(text.as_bytes())).await;
}

/// The next text message, inflated if it came compressed; and whether it did.
async fn next_message(client: &mut RawClient) -> (Value, bool) {
    let frame = client.read_frame().await.expect("a frame");
    assert_eq!(frame.opcode, 1, "{frame:?}");
    let payload = if frame.rsv1 {
        inflated(&frame.payload)
    } else {
        frame.payload.clone()
    };
    (serde_json::from_slice(&payload).unwrap(), frame.rsv1)
}

async fn join(client: &mut RawClient, room: &str) {
    send_compressed(client, &json!({"type": "join_room", "room": room})).await;
    loop {
        let (message, _) = next_message(client).await;
        if message["type"] == "room_joined" {
            return;
        }
    }
}

async fn compressed_frames(server: &TestServer) -> u64 {
    let metrics = common::http_get(server.addr, "/metrics").await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("roomcast_frames_compressed_total "))
        .map_or(0, |value| value.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_is_accepted_only_with_compression_on_and_only_in_a_form_we_honour() {
    let off = start_server_with(|_| {}).await;
    let (_, head) = RawClient::connect_with_headers(&off, OFFER).await;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{head}"
    );

    let on = compressing_server().await;
    let (_, head) = RawClient::connect_with_headers(&on, OFFER).await;
    assert!(has_extension(&head), "{head}");
    // A smaller window asked of the server is declined; the next offer is taken.
    let small = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n";
    let (_, head) = RawClient::connect_with_headers(&on, small).await;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{head}"
    );
    let then = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10, \
                permessage-deflate\r\n";
    let (_, head) = RawClient::connect_with_headers(&on, then).await;
    assert!(has_extension(&head), "{head}");
    // No offer, no extension.
    let (_, head) = RawClient::connect_with_headers(&on, "").await;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_room_message_reaches_every_compressing_member_compressed_once_and_the_rest_plain()
{
    let server = compressing_server().await;
    let mut sender = compressing_client(&server).await;
    join(&mut sender, "deflated").await;
    let mut compressing = Vec::new();
    for _ in 0..3 {
        let mut member = compressing_client(&server).await;
        join(&mut member, "deflated").await;
        compressing.push(member);
    }
    let mut plain = common::Client::connect(&server).await;
    plain.join("deflated").await;
    let before = compressed_frames(&server).await;

    let text = "the same words again and again; ".repeat(64);
    let message = json!({"type": "room_message", "room": "deflated", "message": text});
    send_compressed(&mut sender, &message).await;
    for member in &mut compressing {
        let (received, was_compressed) = loop {
            let next = next_message(member).await;
            if next.0["type"] == "room_message" {
                break next;
            }
        };
        assert!(
            was_compressed,
            "a large message to a compressing member is compressed"
        );
        assert_eq!(received["message"], text.as_str());
    }
    let received = loop {
        let next = plain.recv().await;
        if next["type"] == "room_message" {
            break next;
        }
    };
    assert_eq!(received["message"], text.as_str());
    assert_eq!(
        compressed_frames(&server).await - before,
        1,
        "one fan-out frame, compressed once for its three compressing recipients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_under_the_minimum_size_goes_uncompressed_to_a_compressing_client() {
    let server = compressing_server().await;
    let mut client = compressing_client(&server).await;
    join(&mut client, "small").await;
    let mut other = compressing_client(&server).await;
    join(&mut other, "small").await;
    send_compressed(
        &mut client,
        &json!({"type": "room_message", "room": "small", "message": "hi"}),
    )
    .await;
    let (received, was_compressed) = loop {
        let next = next_message(&mut other).await;
        if next.0["type"] == "room_message" {
            break next;
        }
    };
    assert_eq!(received["message"], "hi");
    assert!(!was_compressed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_message_inflating_past_the_size_limit_is_closed_with_1009() {
    let server = compressing_server().await;
    let mut client = compressing_client(&server).await;
    // 64 KiB is the limit; this inflates to 4 MiB from a few KiB.
    let bomb = deflated(&vec![b' '; 4 * 1024 * 1024]);
    assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
    client.send_frame(0xc1, &bomb).await;
    assert_eq!(client.read_close_code().await, 1009);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_frame_without_negotiation_or_that_does_not_inflate_closes_the_connection() {
    let server = compressing_server().await;
    // Compression on, but this client did not offer it: RSV1 is a protocol error.
    let mut client = RawClient::connect(&server).await;
    client.send_frame(0xc1, &deflated(b"{}")).await;
    assert_eq!(client.read_close_code().await, 1002);
    // Negotiated, but not DEFLATE data: invalid payload.
    let mut client = compressing_client(&server).await;
    client.send_frame(0xc1, &[0xff; 16]).await;
    assert_eq!(client.read_close_code().await, 1007);
    // A continuation frame never carries RSV1 (RFC 7692 6.1).
    let mut client = compressing_client(&server).await;
    let half = deflated(br#"{"type":"list_rooms"}"#);
    client.send_frame(0x41, &half).await;
    client.send_frame(0xc0, b"").await;
    assert_eq!(client.read_close_code().await, 1002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_message_in_fragments_is_inflated_once_whole() {
    let server = compressing_server().await;
    let mut client = compressing_client(&server).await;
    let compressed = deflated(br#"{"type":"join_room","room":"fragmented"}"#);
    let (first, rest) = compressed.split_at(compressed.len() / 2);
    client.send_frame(0x41, first).await; // RSV1 on the first frame only, no FIN
    client.send_frame(0x80, rest).await; // the final continuation
    let (joined, _) = next_message(&mut client).await;
    assert_eq!(joined["type"], "room_joined", "{joined}");
    assert_eq!(joined["room"], "fragmented");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_websockets_client_negotiates_compression_and_talks_through_it_unmodified() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pusher/.venv/bin/python");
    let installed = python.exists()
        && std::process::Command::new(&python)
            .args(["-c", "import websockets"])
            .status()
            .is_ok_and(|status| status.success());
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs tests/pusher/requirements.txt (websockets among them)"
        );
        eprintln!("skipped: install tests/pusher/requirements.txt into tests/pusher/.venv");
        return;
    }
    let server = compressing_server().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compression/client.py");
    let url = format!("ws://{}/", server.addr);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .arg(script)
            .arg(url)
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        report["extensions"],
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    assert_eq!(report["received"], report["sent"]);
    // Both ways compressed: the server compressed what it sent (its counter moved).
    assert!(compressed_frames(&server).await >= 1);
}
