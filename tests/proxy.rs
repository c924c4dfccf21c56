//! The proxies to the application (`--connect-proxy`, `--join-proxy`, `--publish-proxy`),
//! against an app stub on a free port that plays the PHP application: it reads its own session
//! cookie, allows, refuses, rewrites, answers slowly or not at all.

mod common;

use std::time::{Duration, Instant};

use common::app_stub::{Answer, AppStub};
use common::{assert_error, connect_with, http_get, start_server_with, Client, EXPECT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "test-api-key";

/// The app's connect endpoint: a good session cookie is user 42 with metadata and two rooms;
/// anything else is 401 with Laravel's body.
fn connect_app(received: &common::app_stub::Received) -> Answer {
    let cookie = received.header("cookie").unwrap_or("");
    if cookie.contains("laravel_session=good") {
        Answer::ok(json!({
            "user_id": 42,
            "metadata": {"name": "Ann", "plan": "pro"},
            "rooms": ["public", "user.42.*"],
        }))
    } else if cookie.contains("laravel_session=banned") {
        Answer::status(403, json!({"error": "Banned."}))
    } else {
        Answer::status(401, json!({"message": "Unauthenticated."}))
    }
}

/// Sends an upgrade request with `headers` and reads the whole answer (a refusal closes).
async fn raw_upgrade(addr: std::net::SocketAddr, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /?room=x HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(EXPECT, stream.read_to_end(&mut answer))
        .await
        .expect("the refusal closes the connection")
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let status = common::status(&answer);
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

fn metric(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn connect_proxy_gives_the_apps_user_id_metadata_and_rooms_to_a_client_with_its_session_cookie(
) {
    let mut app = AppStub::start(connect_app).await;
    let url = app.url("/ws/connect");
    let server = start_server_with(|config| {
        config.connect_proxy = Some(url);
        config.api_key = Some(KEY.into());
    })
    .await;
    let mut client = connect_with(
        &server,
        "/?token=abc&lang=en",
        &[
            ("cookie", "laravel_session=good; theme=dark"),
            ("origin", "https://app.example"),
            ("user-agent", "test-agent/1"),
        ],
    )
    .await
    .expect("the app accepted the session cookie");
    assert_eq!(
        client.welcome["user_id"], "42",
        "the welcome carries the app's user id"
    );

    let asked = app.next(EXPECT).await;
    assert_eq!(asked.path, "/ws/connect");
    assert_eq!(asked.header("content-type"), Some("application/json"));
    assert_eq!(
        asked.header("cookie"),
        Some("laravel_session=good; theme=dark")
    );
    let body = asked.json();
    assert_eq!(body["client_ip"], "127.0.0.1");
    assert_eq!(
        body["headers"]["cookie"],
        "laravel_session=good; theme=dark"
    );
    assert_eq!(body["headers"]["origin"], "https://app.example");
    assert_eq!(body["headers"]["user-agent"], "test-agent/1");
    assert_eq!(body["query"], json!({"token": "abc", "lang": "en"}));

    // `rooms` restricts joins exactly like the token's claim.
    client
        .send(json!({"type": "join_room", "room": "admin"}))
        .await;
    assert_error(&client.recv().await, "Not allowed to join this room");
    assert_eq!(client.join("user.42.inbox").await["type"], "room_joined");
    assert_eq!(client.join("public").await["type"], "room_joined");

    // The metadata starts from the app's: presence lists it, set_metadata merges over it.
    let presence = api_get(&server, "/api/rooms/public").await;
    assert_eq!(
        presence["members"][0]["metadata"],
        json!({"name": "Ann", "plan": "pro"})
    );
    assert_eq!(presence["members"][0]["user_id"], "42");
    client
        .send(json!({"type": "set_metadata", "metadata": {"plan": "free", "x": 1}}))
        .await;
    let updated = client.recv().await;
    assert_eq!(
        updated["metadata"],
        json!({"name": "Ann", "plan": "free", "x": 1})
    );
}

async fn api_get(server: &common::TestServer, path: &str) -> Value {
    let auth = format!("Authorization: Bearer {KEY}");
    let (status, body) = common::http_json(server.addr, "GET", path, &auth, "").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn connect_proxy_refuses_a_client_without_the_session_with_the_apps_status_and_body() {
    let app = AppStub::start(connect_app).await;
    let url = app.url("/connect");
    let server = start_server_with(|config| config.connect_proxy = Some(url)).await;
    let (status, body) = raw_upgrade(server.addr, "").await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"message": "Unauthenticated."})
    );
    let (status, body) = raw_upgrade(server.addr, "Cookie: laravel_session=banned\r\n").await;
    assert_eq!(status, 403);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"error": "Banned."})
    );
    // The same through the tungstenite client: no connection was opened.
    assert_eq!(connect_with(&server, "/", &[]).await.err(), Some(401));
    let metrics = http_get(server.addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"roomcast_proxy_calls_total{proxy="connect",outcome="refused"}"#
        ),
        3.0
    );
}

#[tokio::test]
async fn connect_proxy_fails_closed_with_503_when_the_app_is_down_or_too_slow() {
    // Down: a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}/connect", closed.local_addr().unwrap());
    drop(closed);
    let server = start_server_with(|config| config.connect_proxy = Some(down)).await;
    let (status, body) = raw_upgrade(server.addr, "Cookie: laravel_session=good\r\n").await;
    assert_eq!(status, 503);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"error": "Application unavailable"})
    );

    // Slow: the app answers after the proxy timeout.
    let slow = AppStub::start(|_| Answer::ok(json!({})).after(Duration::from_secs(3))).await;
    let url = slow.url("/connect");
    let server = start_server_with(|config| {
        config.connect_proxy = Some(url);
        config.proxy_timeout = Duration::from_millis(300);
    })
    .await;
    let started = Instant::now();
    let (status, _) = raw_upgrade(server.addr, "").await;
    assert_eq!(status, 503);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "refused at the proxy timeout, not when the app answered"
    );
    let metrics = http_get(server.addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"roomcast_proxy_calls_total{proxy="connect",outcome="unavailable"}"#
        ),
        1.0
    );
}

/// The app's join endpoint: `vip` is refused with a reason, `closed` without one.
fn join_app(received: &common::app_stub::Received) -> Answer {
    match received.json()["room"].as_str() {
        Some("vip") => Answer::status(403, json!({"error": "VIPs only"})),
        Some("closed") => Answer::status(403, json!({})),
        _ => Answer::ok(json!({})),
    }
}

#[tokio::test]
async fn join_proxy_allows_or_refuses_each_join_with_the_apps_error() {
    let mut app = AppStub::start(join_app).await;
    let url = app.url("/join");
    let server = start_server_with(|config| config.join_proxy = Some(url)).await;
    let mut client = connect_with(
        &server,
        "/?token=tok-1",
        &[("cookie", "laravel_session=good")],
    )
    .await
    .unwrap();
    client
        .send(json!({"type": "set_metadata", "metadata": {"name": "Ann"}}))
        .await;
    client.recv().await;
    assert_eq!(client.join("lobby").await["type"], "room_joined");
    let asked = app.next(EXPECT).await;
    assert_eq!(
        asked.json(),
        json!({"client_id": client.id, "user_id": null, "room": "lobby", "metadata": {"name": "Ann"}})
    );
    // The connection's own cookie, and its token as a bearer, so the app's auth middleware
    // sees the user.
    assert_eq!(asked.header("cookie"), Some("laravel_session=good"));
    assert_eq!(asked.header("authorization"), Some("Bearer tok-1"));

    client
        .send(json!({"type": "join_room", "room": "vip"}))
        .await;
    assert_error(&client.recv().await, "VIPs only");
    client
        .send(json!({"type": "join_room", "room": "closed"}))
        .await;
    assert_error(&client.recv().await, "Not allowed to join this room");
    // A refused join left no membership: the room does not exist.
    client
        .send(json!({"type": "room_message", "room": "vip", "message": "hi"}))
        .await;
    assert_error(&client.recv().await, "Room does not exist");
    // Joining a room it is in asks nothing and sends nothing, as in the seed.
    app.drain();
    client
        .send(json!({"type": "join_room", "room": "lobby"}))
        .await;
    client.expect_silence().await;
    assert!(
        app.drain().is_empty(),
        "a member's second join is not asked"
    );
}

#[tokio::test]
async fn join_proxy_outage_refuses_the_join_with_application_unavailable() {
    let slow = AppStub::start(|_| Answer::ok(json!({})).after(Duration::from_secs(3))).await;
    let url = slow.url("/join");
    let server = start_server_with(|config| {
        config.join_proxy = Some(url);
        config.proxy_timeout = Duration::from_millis(200);
    })
    .await;
    let mut client = Client::connect(&server).await;
    client
        .send(json!({"type": "join_room", "room": "lobby"}))
        .await;
    assert_error(&client.recv().await, "Application unavailable");
    client
        .send(json!({"type": "room_message", "room": "lobby", "message": "hi"}))
        .await;
    assert_error(&client.recv().await, "Room does not exist");
}

/// The app's publish endpoint: stores messages (adding an id), refuses spam, relays the rest.
fn publish_app(received: &common::app_stub::Received) -> Answer {
    let body = received.json();
    match body["message"]["text"].as_str() {
        Some("spam") => Answer::status(422, json!({"error": "No spam"})),
        Some("quiet-refusal") => Answer::status(403, json!({})),
        Some("store") => Answer::ok(json!({"message": {"id": 1, "text": "store"}})),
        Some(text) if text.starts_with("slow") => {
            Answer::ok(json!({})).after(Duration::from_millis(400))
        }
        _ => Answer::ok(json!({})),
    }
}

async fn publish_server(app: &AppStub) -> common::TestServer {
    let url = app.url("/publish");
    start_server_with(|config| config.publish_proxy = Some(url)).await
}

#[tokio::test]
async fn publish_proxy_relays_rewrites_or_refuses_room_messages() {
    let mut app = AppStub::start(publish_app).await;
    let server = publish_server(&app).await;
    let (mut sender, mut reader) = common::pair_in_room(&server, "chat").await;

    sender
        .send(json!({"type": "room_message", "room": "chat", "message": {"text":  "as is"}}))
        .await;
    let got = reader.recv().await;
    assert_eq!(got["type"], "room_message");
    assert_eq!(got["from"], sender.id);
    assert_eq!(got["message"], json!({"text": "as is"}));
    let asked = app.next(EXPECT).await;
    assert_eq!(
        asked.json(),
        json!({"type": "room_message", "client_id": sender.id, "user_id": null, "room": "chat",
               "message": {"text": "as is"}})
    );

    sender
        .send(json!({"type": "room_message", "room": "chat", "message": {"text": "store"}}))
        .await;
    assert_eq!(
        reader.recv().await["message"],
        json!({"id": 1, "text": "store"}),
        "the app's message is relayed instead"
    );

    sender
        .send(json!({"type": "room_message", "room": "chat", "message": {"text": "spam"}}))
        .await;
    assert_error(&sender.recv().await, "No spam");
    sender
        .send(json!({"type": "room_message", "room": "chat", "message": {"text": "quiet-refusal"}}))
        .await;
    assert_error(&sender.recv().await, "Message rejected");
    reader.expect_silence().await;

    // The seed's own refusals come first, without asking the app.
    app.drain();
    sender
        .send(json!({"type": "room_message", "room": "elsewhere", "message": "x"}))
        .await;
    assert_error(&sender.recv().await, "Room does not exist");
    assert!(app.drain().is_empty());

    let metrics = http_get(server.addr, "/metrics").await;
    for (outcome, count) in [("allowed", 1.0), ("rewritten", 1.0), ("refused", 2.0)] {
        let line = format!(r#"roomcast_proxy_calls_total{{proxy="publish",outcome="{outcome}"}}"#);
        assert_eq!(metric(&metrics, &line), count, "{outcome}");
    }
}

#[tokio::test]
async fn publish_proxy_decides_broadcasts_too() {
    let mut app = AppStub::start(publish_app).await;
    let server = publish_server(&app).await;
    let mut sender = Client::connect(&server).await;
    let mut other = Client::connect(&server).await;
    sender
        .send(json!({"type": "broadcast", "message": {"text": "store"}}))
        .await;
    let got = other.recv().await;
    assert_eq!(got["type"], "broadcast");
    assert_eq!(got["message"], json!({"id": 1, "text": "store"}));
    let asked = app.next(EXPECT).await.json();
    assert_eq!(asked["type"], "broadcast");
    assert!(asked.get("room").is_none(), "a broadcast call has no room");
    sender
        .send(json!({"type": "broadcast", "message": {"text": "spam"}}))
        .await;
    assert_error(&sender.recv().await, "No spam");
    other.expect_silence().await;
}

#[tokio::test]
async fn publish_proxy_keeps_one_senders_messages_in_order_while_the_app_is_slow() {
    let app = AppStub::start(publish_app).await;
    let server = publish_server(&app).await;
    let (mut sender, mut reader) = common::pair_in_room(&server, "chat").await;
    // The first waits 400 ms on the app; everything after it (room messages the app answers at
    // once, a private message the app is not asked about) must still arrive after it, in order.
    sender
        .send(json!({"type": "room_message", "room": "chat", "message": {"text": "slow 0"}}))
        .await;
    for n in 1..20 {
        sender
            .send(json!({"type": "room_message", "room": "chat", "message": {"text": format!("msg {n}")}}))
            .await;
    }
    sender
        .send(json!({"type": "private_message", "to": reader.id, "message": "last"}))
        .await;
    let first = reader.recv().await;
    assert_eq!(first["message"]["text"], "slow 0");
    for n in 1..20 {
        assert_eq!(reader.recv().await["message"]["text"], format!("msg {n}"));
    }
    let last = reader.recv().await;
    assert_eq!(last["type"], "private_message");
    assert_eq!(last["message"], "last");
}

#[tokio::test]
async fn a_connection_waiting_on_the_app_does_not_stall_other_connections() {
    let app = AppStub::start(|received| {
        if received.json()["message"] == "wait" {
            Answer::ok(json!({})).after(Duration::from_secs(3))
        } else {
            Answer::ok(json!({}))
        }
    })
    .await;
    let url = app.url("/publish");
    let server = start_server_with(|config| {
        config.publish_proxy = Some(url);
        config.proxy_timeout = Duration::from_secs(10);
    })
    .await;
    let (mut slow, mut reader) = common::pair_in_room(&server, "chat").await;
    let mut quick = Client::connect(&server).await;
    quick.join("chat").await;
    slow.recv().await; // member_joined
    reader.recv().await;
    slow.send(json!({"type": "room_message", "room": "chat", "message": "wait"}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    quick
        .send(json!({"type": "room_message", "room": "chat", "message": "now"}))
        .await;
    let got = reader.recv().await;
    assert_eq!(
        got["message"], "now",
        "the other sender's message is not held back"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "relayed long before the slow call's answer"
    );
    assert_eq!(reader.recv().await["message"], "wait");
}

#[tokio::test]
async fn publish_proxy_outage_refuses_the_message_and_relays_nothing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}/publish", closed.local_addr().unwrap());
    drop(closed);
    let server = start_server_with(|config| config.publish_proxy = Some(down)).await;
    let (mut sender, mut reader) = common::pair_in_room(&server, "chat").await;
    sender
        .send(json!({"type": "room_message", "room": "chat", "message": "hi"}))
        .await;
    assert_error(&sender.recv().await, "Application unavailable");
    reader.expect_silence().await;
    // The connection stays usable: what the app is not asked about still works.
    sender
        .send(json!({"type": "private_message", "to": reader.id, "message": "direct"}))
        .await;
    assert_eq!(reader.recv().await["message"], "direct");
}

#[tokio::test]
async fn proxy_urls_that_cannot_be_called_are_refused_at_start() {
    let mut config = roomcast::Config::with_listen("127.0.0.1:0".parse().unwrap());
    config.join_proxy = Some("ftp://app/join".into());
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("--join-proxy"), "{error}");
    config.join_proxy = Some("not a url".into());
    assert!(config.validate().is_err());
    config.join_proxy = Some("http://127.0.0.1:8000/broadcasting/join".into());
    config.validate().unwrap();
}
