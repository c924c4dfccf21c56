//! `GET /metrics`: every documented metric is present, and moves with traffic.

mod common;

use common::{connect_with, start_server, start_server_with, Client};
use serde_json::json;

async fn scrape(addr: std::net::SocketAddr) -> String {
    let response = common::http_get(addr, "/metrics").await;
    assert_eq!(common::status(&response), 200, "{response}");
    response
}

/// The value of the sample whose name and labels start the line with `series`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_present_and_move_with_traffic() {
    let server = start_server().await;
    let before = scrape(server.addr).await;
    for name in [
        "roomcast_connections_open",
        "roomcast_connections_accepted_total",
        "roomcast_rooms",
        "roomcast_clients",
        "roomcast_outbound_queue_frames",
        "roomcast_outbound_queue_bytes",
        "roomcast_frames_out_total",
        "roomcast_fanout_deliveries_total",
        "roomcast_slow_consumers_closed_total",
        "roomcast_frames_dropped_total",
        "roomcast_handshake_failures_total",
        "roomcast_webhook_events_total",
        "roomcast_webhook_requests_total",
    ] {
        assert!(
            before.contains(&format!("# TYPE {name} ")),
            "{name} missing"
        );
    }
    assert_eq!(value(&before, "roomcast_connections_open"), 0.0);

    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.join("m").await;
    b.join("m").await;
    a.recv().await;
    a.send(json!({"type": "room_message", "room": "m", "message": "x"}))
        .await;
    b.recv().await;
    a.send_text("not json").await;
    a.recv().await;

    let after = scrape(server.addr).await;
    assert_eq!(value(&after, "roomcast_connections_open"), 2.0);
    assert_eq!(value(&after, "roomcast_connections_accepted_total"), 2.0);
    assert_eq!(value(&after, "roomcast_rooms"), 1.0);
    assert_eq!(
        value(&after, r#"roomcast_messages_in_total{type="room_message"}"#),
        1.0
    );
    assert_eq!(
        value(&after, r#"roomcast_messages_in_total{type="join_room"}"#),
        2.0
    );
    assert_eq!(
        value(&after, r#"roomcast_messages_in_total{type="invalid"}"#),
        1.0
    );
    // room_joined x2, member_joined x1, the room message x1.
    assert_eq!(value(&after, "roomcast_fanout_deliveries_total"), 4.0);
    assert!(value(&after, "roomcast_frames_out_total") >= 7.0, "{after}");
    assert_eq!(value(&after, "roomcast_fanout_seconds_count"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_queue_gauges_show_a_client_that_stopped_reading() {
    let server = start_server_with(|config| {
        config.rate_limit = 0.0;
        config.outbound_queue = 4096;
        config.outbound_queue_bytes = 64 * 1024 * 1024;
    })
    .await;
    let (mut publisher, _sleeper) = common::pair_in_room(&server, "q").await;
    // Far more than the kernel's socket buffers hold, far less than the queue's bounds.
    let body = "z".repeat(60_000);
    for _ in 0..400 {
        publisher
            .send(json!({"type": "room_message", "room": "q", "message": body}))
            .await;
    }
    let deadline = std::time::Instant::now() + common::EXPECT;
    loop {
        let text = scrape(server.addr).await;
        let frames = value(&text, "roomcast_outbound_queue_frames");
        let bytes = value(&text, "roomcast_outbound_queue_bytes");
        // The two gauges are read one after the other: retry while the writer still drains.
        if frames > 0.0 && bytes >= frames * 60_000.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "queued: {frames} frames in {bytes} bytes"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_are_counted_by_reason() {
    let server = start_server_with(|config| {
        config.allowed_origins = Some(vec!["https://ok.example".into()]);
    })
    .await;
    assert_eq!(
        connect_with(&server, "/", &[("origin", "https://evil.example")])
            .await
            .err(),
        Some(403)
    );
    let text = scrape(server.addr).await;
    assert_eq!(
        value(
            &text,
            r#"roomcast_connections_refused_total{reason="origin"}"#
        ),
        1.0
    );
}

async fn get_with(addr: std::net::SocketAddr, path: &str, authorization: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_stats_is_off_without_an_api_key() {
    let server = start_server().await;
    let response = common::http_get(server.addr, "/api/stats").await;
    assert_eq!(common::status(&response), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_stats_needs_the_key_and_lists_the_largest_rooms() {
    let server = start_server_with(|config| config.api_key = Some("s3cret".into())).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.join("big").await;
    b.join("big").await;
    b.join("small").await;
    for wrong in ["Bearer nope", "Bearer s3cre", "s3cret"] {
        let response = get_with(server.addr, "/api/stats", wrong).await;
        assert_eq!(common::status(&response), 401, "{wrong}");
    }
    let response = get_with(server.addr, "/api/stats", "Bearer s3cret").await;
    assert_eq!(common::status(&response), 200, "{response}");
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    let stats: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(stats["connections"], 2);
    assert_eq!(stats["rooms"], 2);
    assert_eq!(
        stats["top_rooms"],
        json!([{"room": "big", "members": 2}, {"room": "small", "members": 1}])
    );
}
