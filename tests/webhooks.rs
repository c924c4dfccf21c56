//! Webhooks (`--webhook-url`): signed batches of connection and room events POSTed to the app,
//! in order, retried with the same body, never in a client's way, bounded in memory, and
//! flushed at shutdown within the drain deadline. The app is [`AppStub`].

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::app_stub::{Answer, AppStub, Received};
use common::{start_server_with, Client, TestServer, EXPECT};
use hmac::{Hmac, Mac};
use roomcast::Config;
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "webhook-test-secret";

/// A server posting its webhooks to `app`, with a test-sized backoff, after `tweak`.
async fn server_for(app: &AppStub, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let url = app.url("/hooks");
    start_server_with(move |config| {
        config.webhook_url = Some(url);
        config.webhook_secret = Some(SECRET.into());
        config.webhook_retry_backoff = Duration::from_millis(50);
        tweak(config);
    })
    .await
}

/// Whether `received` carries the HMAC-SHA256 of its exact body under [`SECRET`].
fn signature_verifies(received: &Received) -> bool {
    let Some(signature) = received.header("x-roomcast-signature") else {
        return false;
    };
    let Ok(signature) = hex::decode(signature) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&received.body);
    mac.verify_slice(&signature).is_ok()
}

/// The events of every request the app gets, in order, until one is `last` for `client_id`.
/// Each request must be a signed POST of `{"events": [...]}` to the webhook path.
async fn events_until(app: &mut AppStub, last: &str, client_id: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let received = app.next(EXPECT).await;
        assert_eq!(received.path, "/hooks");
        assert_eq!(received.header("content-type"), Some("application/json"));
        assert!(signature_verifies(&received), "bad signature: {received:?}");
        let body = received.json();
        assert_eq!(common::keys(&body), ["events"], "{body}");
        let batch = body["events"]
            .as_array()
            .expect("events is an array")
            .clone();
        assert!(!batch.is_empty(), "an empty batch was sent");
        events.extend(batch);
        if events
            .iter()
            .any(|e| e["event"] == last && e["client_id"] == client_id)
        {
            return events;
        }
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The value of the Prometheus sample `series` (name and labels) on `server`.
async fn metric(server: &TestServer, series: &str) -> u64 {
    let text = common::http_get(server.addr, "/metrics").await;
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Polls `series` until it reaches at least `at_least`, for up to [`EXPECT`]; its last value.
async fn metric_reaches(server: &TestServer, series: &str, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + EXPECT;
    loop {
        let value = metric(server, series).await;
        if value >= at_least || tokio::time::Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_s_events_arrive_in_order_with_their_fields_and_a_valid_signature() {
    let mut app = AppStub::start(|_| Answer::ok(json!({}))).await;
    let server = server_for(&app, |_| {}).await;
    let before = unix_millis();
    let mut client = Client::connect(&server).await;
    client.join("first").await;
    client
        .send(json!({"type": "leave_room", "room": "first"}))
        .await;
    client.join("second").await;
    let (id, welcome) = (client.id.clone(), client.welcome.clone());
    // Leaving "second" is the disconnect's doing.
    client.close().await;
    let events = events_until(&mut app, "client_disconnected", &id).await;
    let after = unix_millis();

    let names: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["room"].as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("client_connected", None),
            ("room_occupied", Some("first")),
            ("member_joined", Some("first")),
            ("member_left", Some("first")),
            ("room_vacated", Some("first")),
            ("room_occupied", Some("second")),
            ("member_joined", Some("second")),
            ("member_left", Some("second")),
            ("room_vacated", Some("second")),
            ("client_disconnected", None),
        ]
    );
    let mut ids = std::collections::HashSet::new();
    let mut last_time = 0;
    for event in &events {
        let room_event = event.get("room").is_some();
        let expected_keys: &[&str] = if room_event {
            &["client_id", "event", "id", "room", "time_ms", "user_id"]
        } else {
            &["client_id", "event", "id", "time_ms", "user_id"]
        };
        assert_eq!(common::keys(event), expected_keys, "{event}");
        assert_eq!(event["client_id"], welcome["client_id"], "{event}");
        assert_eq!(event["user_id"], Value::Null, "no auth, no user: {event}");
        let time = event["time_ms"].as_u64().expect("time_ms is a number");
        assert!(
            (before..=after).contains(&time),
            "{event}: {before}..{after}"
        );
        assert!(time >= last_time, "time goes forward: {event}");
        last_time = time;
        assert!(
            ids.insert(event["id"].as_str().expect("id is a string").to_owned()),
            "duplicate id: {event}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_room_s_first_member_occupies_it_and_only_its_last_vacates_it() {
    let mut app = AppStub::start(|_| Answer::ok(json!({}))).await;
    let server = server_for(&app, |_| {}).await;
    let mut first = Client::connect(&server).await;
    let mut second = Client::connect(&server).await;
    first.join("shared").await;
    second.join("shared").await;
    first.recv().await; // member_joined of the second
    let (first_id, second_id) = (first.id.clone(), second.id.clone());
    first.close().await;
    second.close().await;
    let events = events_until(&mut app, "client_disconnected", &second_id).await;
    let room_events: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["room"] == "shared")
        .map(|e| {
            let who = if e["client_id"] == first_id.as_str() {
                "first"
            } else {
                "second"
            };
            (e["event"].as_str().unwrap(), who)
        })
        .collect();
    assert_eq!(
        room_events,
        [
            ("room_occupied", "first"),
            ("member_joined", "first"),
            ("member_joined", "second"),
            ("member_left", "first"),
            ("member_left", "second"),
            ("room_vacated", "second"),
        ]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_is_sent_again_with_the_same_ids_body_and_signature() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let mut app = AppStub::start(move |_| {
        if counted.fetch_add(1, Ordering::SeqCst) < 2 {
            Answer::status(500, json!({"error": "try later"}))
        } else {
            Answer::ok(json!({}))
        }
    })
    .await;
    let server = server_for(&app, |_| {}).await;
    let client = Client::connect(&server).await;
    let first = app.next(EXPECT).await;
    let second = app.next(EXPECT).await;
    let third = app.next(EXPECT).await;
    assert_eq!(first.json()["events"][0]["event"], "client_connected");
    for again in [&second, &third] {
        assert_eq!(again.body, first.body, "the very same bytes, ids included");
        assert_eq!(
            again.header("x-roomcast-signature"),
            first.header("x-roomcast-signature")
        );
    }
    assert!(signature_verifies(&third));
    let ok = r#"roomcast_webhook_requests_total{outcome="ok"}"#;
    assert_eq!(metric_reaches(&server, ok, 1).await, 1);
    let failed = r#"roomcast_webhook_requests_total{outcome="failed"}"#;
    assert_eq!(metric(&server, failed).await, 2);
    let delivered = r#"roomcast_webhook_events_total{outcome="delivered"}"#;
    assert_eq!(metric_reaches(&server, delivered, 1).await, 1);
    client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_runs_out_of_retries_is_dropped_counted_and_the_next_one_goes_out() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    // The first batch fails all three attempts; whatever comes after is accepted.
    let mut app = AppStub::start(move |_| {
        if counted.fetch_add(1, Ordering::SeqCst) < 3 {
            Answer::status(503, json!({}))
        } else {
            Answer::ok(json!({}))
        }
    })
    .await;
    let server = server_for(&app, |config| config.webhook_retries = 2).await;
    let client = Client::connect(&server).await;
    let first = app.next(EXPECT).await;
    for _ in 0..2 {
        assert_eq!(app.next(EXPECT).await.body, first.body);
    }
    let dropped = r#"roomcast_webhook_events_total{outcome="dropped"}"#;
    assert_eq!(metric_reaches(&server, dropped, 1).await, 1);
    let id = client.id.clone();
    client.close().await;
    let events = events_until(&mut app, "client_disconnected", &id).await;
    assert_eq!(
        events.len(),
        1,
        "the dropped batch is not sent again: {events:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_never_answers_does_not_delay_room_messages() {
    let mut app = AppStub::start(|_| Answer::ok(json!({})).after(Duration::from_secs(60))).await;
    let server = server_for(&app, |config| {
        config.webhook_timeout = Duration::from_secs(60);
        config.drain_timeout = Duration::from_millis(500);
    })
    .await;
    let (mut a, mut b) = common::pair_in_room(&server, "busy").await;
    // The sender is stuck on its first POST.
    app.next(EXPECT).await;
    let started = std::time::Instant::now();
    for n in 0..20 {
        a.send(json!({"type": "room_message", "room": "busy", "message": n}))
            .await;
        let got = b.recv().await;
        assert_eq!(got["type"], "room_message", "{got}");
        assert_eq!(got["message"], n, "{got}");
    }
    println!(
        "20 room messages with a stalled app: {:?}",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_the_queue_bound_are_dropped_and_counted() {
    let mut app = AppStub::start(|_| Answer::ok(json!({})).after(Duration::from_secs(60))).await;
    let server = server_for(&app, |config| {
        config.webhook_queue = 5;
        config.webhook_timeout = Duration::from_secs(60);
        config.drain_timeout = Duration::from_millis(500);
    })
    .await;
    let mut client = Client::connect(&server).await;
    // The sender holds client_connected in its stalled POST; the queue is empty.
    app.next(EXPECT).await;
    for n in 0..20 {
        client.join(&format!("room-{n}")).await;
    }
    // 40 events (room_occupied and member_joined each), 5 places.
    let dropped = r#"roomcast_webhook_events_total{outcome="dropped"}"#;
    assert_eq!(metric_reaches(&server, dropped, 35).await, 35);
    let queued = r#"roomcast_webhook_events_total{outcome="queued"}"#;
    assert_eq!(metric(&server, queued).await, 1 + 5);
    // The client was served throughout.
    client
        .send(json!({"type": "leave_room", "room": "room-0"}))
        .await;
    client.join("one-more").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_delivers_the_events_of_the_connections_it_closes() {
    let mut app = AppStub::start(|_| Answer::ok(json!({}))).await;
    let server = server_for(&app, |_| {}).await;
    let mut client = Client::connect(&server).await;
    client.join("lobby").await;
    let id = client.id.clone();
    events_until(&mut app, "member_joined", &id).await;
    // Answer the server's close frame, as a browser would.
    let reader = tokio::spawn(async move { client.recv_close(EXPECT).await });
    server.stop().await;
    assert_eq!(common::code(&reader.await.unwrap()), 1001);
    // Delivered before the server returned: the app has recorded them all by now.
    let events: Vec<Value> = app
        .drain()
        .iter()
        .flat_map(|received| received.json()["events"].as_array().unwrap().clone())
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["member_left", "room_vacated", "client_disconnected"],
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_app_does_not_hold_the_shutdown_past_the_drain_timeout() {
    let mut app = AppStub::start(|_| Answer::ok(json!({})).after(Duration::from_secs(60))).await;
    let server = server_for(&app, |config| {
        config.webhook_timeout = Duration::from_secs(60);
        config.drain_timeout = Duration::from_millis(300);
    })
    .await;
    let mut client = Client::connect(&server).await;
    client.join("lobby").await;
    app.next(EXPECT).await;
    let reader = tokio::spawn(async move { client.recv_close(EXPECT).await });
    let started = std::time::Instant::now();
    server.stop().await;
    let took = started.elapsed();
    println!("shutdown with a stalled app took {took:?} (drain timeout 300ms)");
    // Generous for a loaded machine; held by the app, it would be a minute.
    assert!(took < Duration::from_secs(5), "{took:?}");
    let _ = reader.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_connections_send_no_webhooks() {
    let mut app = AppStub::start(|_| Answer::ok(json!({}))).await;
    let server = server_for(&app, |config| config.echo_path = Some("/echo".into())).await;
    let (echo, _) = tokio_tungstenite::connect_async(format!("ws://{}/echo", server.addr))
        .await
        .expect("echo handshake");
    drop(echo);
    // A protocol client after it: its events are the first the app hears.
    let client = Client::connect(&server).await;
    let id = client.id.clone();
    client.close().await;
    let events = events_until(&mut app, "client_disconnected", &id).await;
    assert!(
        events.iter().all(|e| e["client_id"] == id.as_str()),
        "{events:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_webhook_url_that_is_not_http_is_refused_at_start_up() {
    for url in ["ftp://app.example/hooks", "not a url", "/hooks"] {
        let mut config = Config::with_listen("127.0.0.1:0".parse().unwrap());
        config.webhook_url = Some(url.into());
        config.webhook_secret = Some(SECRET.into());
        let error = roomcast::Server::bind(config, Default::default())
            .err()
            .unwrap_or_else(|| panic!("{url} was accepted"));
        assert!(error.to_string().contains("--webhook-url"), "{error}");
        assert!(error.to_string().contains(url), "{error}");
    }
}
