//! Hostile input: each kind of garbage gets its documented answer, and after each one two
//! other clients still exchange messages.

mod common;

use std::time::Duration;

use common::{start_server_with, Client, RawClient, TestServer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn still_served(a: &mut Client, b: &mut Client, after: &str) {
    a.send(json!({"type": "room_message", "room": "bystanders", "message": after}))
        .await;
    assert_eq!(b.recv().await["message"], after, "served after {after}");
}

/// Sends `bytes` after the upgrade and returns the close code the server answers with.
async fn close_code_for(server: &TestServer, bytes: &[u8]) -> u16 {
    let mut raw = RawClient::connect(server).await;
    raw.send_raw(bytes).await;
    raw.read_close_code().await
}

fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [9u8, 8, 7, 6];
    let mut frame = vec![first];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_garbage_gets_its_answer_and_the_others_are_still_served() {
    let server = start_server_with(|config| {
        config.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    let (mut a, mut b) = common::pair_in_room(&server, "bystanders").await;

    // Frames that break RFC 6455: 1002.
    let unmasked = [0x81, 0x02, b'{', b'}'];
    assert_eq!(close_code_for(&server, &unmasked).await, 1002, "unmasked");
    still_served(&mut a, &mut b, "after an unmasked frame").await;

    let long_ping = masked(0x89, &[b'p'; 200]);
    assert_eq!(close_code_for(&server, &long_ping).await, 1002, "long ping");
    still_served(&mut a, &mut b, "after a 200-byte ping").await;

    let fragmented_ping = masked(0x09, b"p");
    assert_eq!(close_code_for(&server, &fragmented_ping).await, 1002);
    still_served(&mut a, &mut b, "after a fragmented ping").await;

    assert_eq!(close_code_for(&server, &masked(0xF1, b"{}")).await, 1002);
    still_served(&mut a, &mut b, "after reserved bits").await;

    assert_eq!(close_code_for(&server, &masked(0x8B, b"{}")).await, 1002);
    still_served(&mut a, &mut b, "after an unknown opcode").await;

    assert_eq!(close_code_for(&server, &masked(0x80, b"{}")).await, 1002);
    still_served(&mut a, &mut b, "after a stray continuation").await;

    // Invalid UTF-8: 1007.
    assert_eq!(
        close_code_for(&server, &masked(0x81, &[0xc3, 0x28])).await,
        1007
    );
    still_served(&mut a, &mut b, "after invalid UTF-8").await;

    // A truncated frame, then the client vanishes: the connection is cleaned up.
    let mut raw = RawClient::connect(&server).await;
    let truncated = masked(0x81, &[b'x'; 100]);
    raw.send_raw(&truncated[..20]).await;
    drop(raw);
    still_served(&mut a, &mut b, "after a truncated frame").await;

    // Not HTTP at all on the WebSocket port.
    let mut junk = TcpStream::connect(server.addr).await.unwrap();
    junk.write_all(&[0u8, 1, 2, 3, 0xff, 0xfe, b'\r', b'\n', b'\r', b'\n'])
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(common::EXPECT, junk.read_to_end(&mut reply)).await;
    assert!(
        reply.is_empty() || reply.starts_with(b"HTTP/1.1 400"),
        "junk gets a 400 or a closed socket"
    );
    still_served(&mut a, &mut b, "after binary junk").await;

    // Half a request (slowloris): dropped within the handshake timeout.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut sink)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a half-sent request is dropped within the handshake timeout"
    );
    still_served(&mut a, &mut b, "after a slowloris request").await;
}
