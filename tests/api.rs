//! The server API: the application publishes into rooms, broadcasts, sends to a client or a
//! user, and lists rooms, over HTTP on the WebSocket port with `--api-key`.

mod common;

use std::net::SocketAddr;

use common::{pair_in_room, start_server, start_server_with, Client};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "app-secret";

async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    common::http_json(
        addr,
        "POST",
        path,
        &format!("Authorization: Bearer {KEY}"),
        &body.to_string(),
    )
    .await
}

async fn api_server() -> common::TestServer {
    start_server_with(|config| config.api_key = Some(KEY.into())).await
}

/// The raw text of the next message `client` receives.
async fn next_text(client: &mut Client) -> String {
    use futures_util::StreamExt;
    loop {
        let message = tokio::time::timeout(common::EXPECT, client.ws.next())
            .await
            .expect("a message")
            .expect("open")
            .expect("a frame");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return text;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_404_without_a_key_configured() {
    let server = start_server().await;
    let (status, body) = common::http_json(server.addr, "POST", "/api/publish", "", "{}").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_key_is_401_and_both_key_headers_work() {
    let server = api_server().await;
    let body = json!({"room": "r", "message": "m"}).to_string();
    for auth in [
        "",
        "Authorization: Bearer wrong",
        "X-API-Key: app-secre",
        "Authorization: app-secret",
    ] {
        let (status, reply) =
            common::http_json(server.addr, "POST", "/api/publish", auth, &body).await;
        assert_eq!(status, 401, "{auth}");
        assert_eq!(reply["error"], "API key required");
    }
    for auth in ["Authorization: Bearer app-secret", "X-API-Key: app-secret"] {
        let (status, reply) =
            common::http_json(server.addr, "POST", "/api/publish", auth, &body).await;
        assert_eq!(status, 200, "{auth}: {reply}");
        assert_eq!(reply, json!({"delivered": 0}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_every_member_as_a_room_message_from_server_verbatim() {
    let server = api_server().await;
    let (mut a, mut b) = pair_in_room(&server, "orders").await;
    let mut outsider = Client::connect(&server).await;
    let body = r#"{"room":"orders","message":{"order":42,"total":1E3}}"#;
    let auth = format!("Authorization: Bearer {KEY}");
    let (status, reply) = common::http_json(server.addr, "POST", "/api/publish", &auth, body).await;
    assert_eq!((status, reply), (200, json!({"delivered": 2})));
    for member in [&mut a, &mut b] {
        let text = next_text(member).await;
        let prefix = r#"{"type":"room_message","room":"orders","from":"server","message":{"order":42,"total":1E3},"timestamp":"#;
        assert!(text.starts_with(prefix), "{text}");
    }
    outsider.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_names_the_sender_given_and_an_empty_room_is_not_an_error() {
    let server = api_server().await;
    let (mut a, _b) = pair_in_room(&server, "news").await;
    let (status, _) = post(
        server.addr,
        "/api/publish",
        json!({"room": "news", "message": "hi", "from": "billing"}),
    )
    .await;
    assert_eq!(status, 200);
    let got: Value = serde_json::from_str(&next_text(&mut a).await).unwrap();
    assert_eq!(got["from"], "billing");
    assert_eq!(got["message"], "hi");
    let (status, reply) = post(
        server.addr,
        "/api/publish",
        json!({"room": "nobody-here", "message": 1}),
    )
    .await;
    assert_eq!((status, reply), (200, json!({"delivered": 0})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_connected_client() {
    let server = api_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let (status, reply) = post(
        server.addr,
        "/api/broadcast",
        json!({"message": "maintenance at 5"}),
    )
    .await;
    assert_eq!((status, reply), (200, json!({"delivered": 2})));
    for client in [&mut a, &mut b] {
        let got = client.recv().await;
        assert_eq!(common::keys(&got), ["from", "message", "timestamp", "type"]);
        assert_eq!(got["type"], "broadcast");
        assert_eq!(got["from"], "server");
        assert_eq!(got["message"], "maintenance at 5");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reaches_one_client_and_an_unknown_recipient_is_404() {
    let server = api_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let (status, reply) = post(
        server.addr,
        "/api/send",
        json!({"to": a.id, "message": {"n": 1}}),
    )
    .await;
    assert_eq!((status, reply), (200, json!({"delivered": 1})));
    let got = a.recv().await;
    assert_eq!(got["type"], "private_message");
    assert_eq!(got["from"], "server");
    assert_eq!(got["message"], json!({"n": 1}));
    b.expect_silence().await;
    let (status, reply) = post(
        server.addr,
        "/api/send",
        json!({"to": "client_nobody", "message": 1}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(reply["error"], "Recipient not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_body_is_400_saying_what_is_wrong() {
    let server = api_server().await;
    let auth = format!("Authorization: Bearer {KEY}");
    let (status, reply) =
        common::http_json(server.addr, "POST", "/api/publish", &auth, "{not json").await;
    assert_eq!(status, 400);
    assert!(
        reply["error"].as_str().unwrap().starts_with("invalid body"),
        "{reply}"
    );
    let (status, reply) = post(server.addr, "/api/publish", json!({"message": "no room"})).await;
    assert_eq!(status, 400);
    assert!(reply["error"].as_str().unwrap().contains("room"), "{reply}");
    let (status, reply) = post(
        server.addr,
        "/api/publish",
        json!({"room": "", "message": 1}),
    )
    .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("Room name required"))
    );
    let (status, reply) = post(server.addr, "/api/send", json!({"to": 5, "message": 1})).await;
    assert_eq!(status, 400, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413() {
    let server = start_server_with(|config| {
        config.api_key = Some(KEY.into());
        config.max_message_size = 1024;
        config.max_frame_size = 1024;
        config.outbound_queue_bytes = 64 * 1024;
    })
    .await;
    let big = "x".repeat(8 * 1024);
    let (status, reply) = post(
        server.addr,
        "/api/publish",
        json!({"room": "r", "message": big}),
    )
    .await;
    assert_eq!(status, 413, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_lists_rooms_with_member_counts_filtered_by_prefix() {
    let server = api_server().await;
    let (_a, _b) = pair_in_room(&server, "team:1").await;
    let mut c = Client::connect(&server).await;
    c.join("team:2").await;
    c.join("lobby").await;
    let auth = format!("Authorization: Bearer {KEY}");
    let (status, reply) = common::http_json(server.addr, "GET", "/api/rooms", &auth, "").await;
    assert_eq!(status, 200);
    assert_eq!(
        reply,
        json!({"rooms": [
            {"room": "lobby", "members": 1},
            {"room": "team:1", "members": 2},
            {"room": "team:2", "members": 1},
        ]})
    );
    let (_, reply) =
        common::http_json(server.addr, "GET", "/api/rooms?prefix=team%3A", &auth, "").await;
    assert_eq!(
        reply,
        json!({"rooms": [{"room": "team:1", "members": 2}, {"room": "team:2", "members": 1}]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_runs_each_command_in_order_with_one_result_each() {
    let server = api_server().await;
    let (mut a, _b) = pair_in_room(&server, "r").await;
    let batch = json!({"commands": [
        {"method": "publish", "params": {"room": "r", "message": "first"}},
        {"method": "send", "params": {"to": "client_nobody", "message": 1}},
        {"method": "publish", "params": {"room": "r", "message": "second", "from": "app"}},
        {"method": "explode", "params": {}},
    ]});
    let (status, reply) = post(server.addr, "/api/batch", batch).await;
    assert_eq!(status, 200);
    assert_eq!(
        reply,
        json!({"results": [
            {"delivered": 2},
            {"error": "Recipient not found", "status": 404},
            {"delivered": 2},
            {"error": "unknown method \"explode\"", "status": 400},
        ]})
    );
    assert_eq!(a.recv().await["message"], "first");
    let second = a.recv().await;
    assert_eq!(
        (second["message"].as_str(), second["from"].as_str()),
        (Some("second"), Some("app"))
    );
    let (status, _) = post(server.addr, "/api/batch", json!({"commands": "nope"})).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_presence_lists_each_member_with_its_metadata_as_sent() {
    let server = api_server().await;
    let mut a = Client::connect(&server).await;
    a.send_text(r#"{"type":"set_metadata","metadata":{"name":"ann","score":1E2}}"#)
        .await;
    assert_eq!(a.recv().await["type"], "metadata_updated");
    a.join("team room").await;
    let mut b = Client::connect(&server).await;
    b.join("team room").await;
    let auth = format!("Authorization: Bearer {KEY}");
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /api/rooms/team%20room HTTP/1.1\r\nHost: x\r\n{auth}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    let expected = format!(
        r#"{{"room":"team room","members":[{{"client_id":"{}","user_id":null,"metadata":{{"name":"ann","score":1E2}}}},{{"client_id":"{}","user_id":null,"metadata":{{}}}}]}}"#,
        a.id, b.id
    );
    assert_eq!(body, expected);
    let (status, reply) =
        common::http_json(server.addr, "GET", "/api/rooms/nowhere", &auth, "").await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("Room does not exist"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_a_client_with_the_code_and_reason_given() {
    let server = api_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let body = json!({"client_id": a.id, "code": 4321, "reason": "kicked by an admin"});
    let (status, reply) = post(server.addr, "/api/disconnect", body).await;
    assert_eq!((status, reply), (200, json!({"disconnected": 1})));
    let frame = a.recv_close(common::EXPECT).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 4321);
    assert_eq!(frame.reason, "kicked by an admin");
    b.expect_silence().await;
    // The default code, and refusals.
    let (status, _) = post(server.addr, "/api/disconnect", json!({"client_id": b.id})).await;
    assert_eq!(status, 200);
    assert_eq!(common::code(&b.recv_close(common::EXPECT).await), 4000);
    let (status, reply) = post(
        server.addr,
        "/api/disconnect",
        json!({"client_id": "client_x", "code": 1000}),
    )
    .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("code must be between 4000 and 4999"))
    );
    let (status, reply) = post(
        server.addr,
        "/api/disconnect",
        json!({"client_id": "client_nobody"}),
    )
    .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("Recipient not found"))
    );
    let (status, _) = post(server.addr, "/api/disconnect", json!({})).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_by_user_id_closes_every_connection_of_that_user() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    const SECRET: &str = "api-test-secret";
    let server = start_server_with(|config| {
        config.api_key = Some(KEY.into());
        config.jwt_secret = Some(SECRET.into());
    })
    .await;
    let token = |sub: &str| {
        encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": sub}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let (alice, bob) = (token("alice"), token("bob"));
    let mut phone = common::connect_with(&server, &format!("/?token={alice}"), &[])
        .await
        .unwrap();
    let mut laptop = common::connect_with(&server, &format!("/?token={alice}"), &[])
        .await
        .unwrap();
    let mut other = common::connect_with(&server, &format!("/?token={bob}"), &[])
        .await
        .unwrap();
    let (status, reply) = post(
        server.addr,
        "/api/disconnect",
        json!({"user_id": "alice", "code": 4100}),
    )
    .await;
    assert_eq!((status, reply), (200, json!({"disconnected": 2})));
    for client in [&mut phone, &mut laptop] {
        assert_eq!(common::code(&client.recv_close(common::EXPECT).await), 4100);
    }
    other.expect_silence().await;
    // A user id is not a client id.
    let (status, _) = post(server.addr, "/api/disconnect", json!({"client_id": "bob"})).await;
    assert_eq!(status, 404);
}
