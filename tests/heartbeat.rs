//! Server pings, the idle timeout and token expiry over a connection's life.

mod common;

use std::time::Duration;

use common::{connect_with, start_server_with, RawClient};
use futures_util::StreamExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_pings_and_a_client_that_answers_stays_connected() {
    let server = start_server_with(|config| {
        config.ping_interval = Duration::from_secs(1);
        config.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let mut client = connect_with(&server, "/", &[]).await.unwrap();
    // tungstenite answers each ping with a pong while it is being read.
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(4500);
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, client.ws.next()).await {
        match message.expect("connection stays open") {
            Message::Ping(_) => pings += 1,
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
    assert!(pings >= 3, "pinged {pings} times in 4.5 s");
    client.join("still-here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_answers_no_ping_is_closed_with_4000() {
    let server = start_server_with(|config| {
        config.ping_interval = Duration::from_secs(1);
        config.idle_timeout = Duration::from_secs(2);
    })
    .await;
    // A raw client never answers pings.
    let mut raw = RawClient::connect(&server).await;
    let started = std::time::Instant::now();
    let mut pings = 0;
    let code = loop {
        let frame = raw.read_frame().await.expect("a close frame before EOF");
        match frame.opcode {
            0x9 => pings += 1,
            0x8 => break frame.close_code(),
            other => panic!("unexpected opcode {other}"),
        }
    };
    assert_eq!(code, 4000);
    assert!(pings >= 1, "was pinged before being closed");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_with_4001_when_its_token_expires() {
    const SECRET: &str = "heartbeat-test-secret";
    let server = start_server_with(|config| {
        config.jwt_secret = Some(SECRET.into());
        // Without the default 5 s of clock-skew leeway, which extends a token's life.
        config.jwt_leeway = Duration::ZERO;
    })
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "short-lived", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut client = connect_with(&server, &format!("/?token={token}"), &[])
        .await
        .unwrap();
    let frame = client.recv_close(Duration::from_secs(6)).await;
    assert_eq!(common::code(&frame), 4001);
}

/// The red team saw closes 2.0-2.96 s after the last frame with a 3 s idle timeout: the
/// heartbeat's clock counted whole seconds. Clients here go silent at different fractions of
/// a second, so a clock that rounds would close some of them early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_within_one_ping_interval_after_its_idle_timeout_never_before(
) {
    const IDLE: Duration = Duration::from_secs(3);
    const PING: Duration = Duration::from_secs(1);
    let server = start_server_with(|config| {
        config.ping_interval = PING;
        config.idle_timeout = IDLE;
    })
    .await;
    let mut silent = Vec::new();
    for i in 0..6u64 {
        let server_addr = &server;
        let mut raw = RawClient::connect(server_addr).await;
        tokio::time::sleep(Duration::from_millis(170 * i)).await;
        // The client's last frame: a message the server reads (and answers with an error).
        raw.send_frame(0x81, b"{}").await;
        let last_frame = std::time::Instant::now();
        silent.push(tokio::spawn(async move {
            loop {
                // Pings go unanswered: a raw client is silent.
                let frame = raw.read_frame().await.expect("a close frame before EOF");
                if frame.opcode == 0x8 {
                    return (frame.close_code(), last_frame.elapsed());
                }
            }
        }));
    }
    for client in silent {
        let (code, after) = client.await.unwrap();
        assert_eq!(code, 4000);
        assert!(after >= IDLE, "closed {after:?} after the last frame");
        // One ping interval, plus scheduling slack on a loaded CI machine.
        assert!(
            after <= IDLE + PING + Duration::from_millis(750),
            "closed {after:?} after the last frame"
        );
    }
}
