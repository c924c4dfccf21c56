//! The Pusher endpoint (`--pusher-app`) driven by the unmodified pusher-js client and the
//! `pusher` REST SDK from npm (tests/pusher/pusher.test.mjs, versions pinned in its
//! package-lock.json). `.ci/run` installs them with `npm ci`; elsewhere the test says it was
//! skipped unless CI is set, where missing packages fail it.

mod common;

use std::path::Path;

use common::redis::RedisServer;
use common::start_server_with;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const APP: (&str, &str, &str) = ("1001", "roomcast-key", "roomcast-secret");

/// Runs the node test `suite` of tests/pusher against the nodes at `ports` (the first is
/// ROOMCAST_PORT, the second ROOMCAST_PORT_B) and asserts it passed; `false` when the
/// packages are not installed (outside CI: skipped).
async fn run_suite(suite: &str, nodes: &[&common::TestServer]) -> bool {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pusher");
    if !dir.join("node_modules/pusher-js").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "tests/pusher needs `npm ci` in CI (.ci/run runs it)"
        );
        eprintln!("skipped: run `npm ci --prefix tests/pusher` first");
        return false;
    }
    let mut command = std::process::Command::new("node");
    command
        .args(["--test", "--test-reporter=spec", suite])
        .current_dir(&dir)
        .env("ROOMCAST_HOST", nodes[0].addr.ip().to_string())
        .env("APP_ID", APP.0)
        .env("APP_KEY", APP.1)
        .env("APP_SECRET", APP.2);
    for (node, name) in nodes.iter().zip(["ROOMCAST_PORT", "ROOMCAST_PORT_B"]) {
        command.env(name, node.addr.port().to_string());
    }
    // Off the runtime's threads: the servers are served on them meanwhile.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the runner thread")
        .expect("node runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    assert!(output.status.success(), "{report}");
    assert!(report.contains("fail 0"), "{report}");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_and_the_rest_sdk_pass_against_the_pusher_endpoint() {
    let server = pusher_server().await;
    run_suite("pusher.test.mjs", &[&server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_channels_span_two_nodes_on_redis_for_pusher_js_and_the_rest_sdk() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let url = redis.url();
        nodes.push(
            start_server_with(|config| {
                config.pusher_app = vec![format!("{}:{}:{}", APP.0, APP.1, APP.2)];
                config.redis = Some(url);
            })
            .await,
        );
    }
    redis.wait_for_subscribers("roomcast:broadcast", 2).await;
    run_suite("pusher.cluster.test.mjs", &[&nodes[0], &nodes[1]]).await;
}

async fn pusher_server() -> common::TestServer {
    start_server_with(|config| {
        config.pusher_app = vec![format!("{}:{}:{}", APP.0, APP.1, APP.2)];
    })
    .await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &common::TestServer, query: &str) -> Ws {
    let url = format!("ws://{}/app/{}{query}", server.addr, APP.1);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next Pusher event, as JSON.
async fn event(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(common::EXPECT, ws.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("a valid frame");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Close(frame) => return json!({"closed": frame.map(|f| u16::from(f.code))}),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_established_carries_the_socket_id_and_activity_timeout_as_a_json_string() {
    let server = pusher_server().await;
    let mut ws = connect(&server, "?protocol=7&client=js&version=8.4.2").await;
    let established = event(&mut ws).await;
    assert_eq!(common::keys(&established), ["data", "event"]);
    assert_eq!(established["event"], "pusher:connection_established");
    let data: Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["activity_timeout"], 30);
    assert!(data["socket_id"].as_str().unwrap().contains('.'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_ping_gets_pong_and_a_malformed_message_an_error_with_the_connection_kept() {
    let server = pusher_server().await;
    let mut ws = connect(&server, "?protocol=7").await;
    event(&mut ws).await;
    ws.send(Message::Text("not json".into())).await.unwrap();
    let error = event(&mut ws).await;
    assert_eq!(error["event"], "pusher:error");
    assert_eq!(error["data"]["code"], 4200);
    ws.send(Message::Text(r#"{"event":"pusher:ping","data":{}}"#.into()))
        .await
        .unwrap();
    assert_eq!(
        event(&mut ws).await,
        json!({"event": "pusher:pong", "data": "{}"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocols_5_to_7_are_spoken_and_others_refused_with_4007() {
    let server = pusher_server().await;
    for version in ["5", "6", "7"] {
        let mut ws = connect(&server, &format!("?protocol={version}")).await;
        assert_eq!(
            event(&mut ws).await["event"],
            "pusher:connection_established"
        );
    }
    for query in ["?protocol=4", "?protocol=8", ""] {
        let mut ws = connect(&server, query).await;
        let error = event(&mut ws).await;
        assert_eq!(error["data"]["code"], 4007, "{query}: {error}");
        assert_eq!(event(&mut ws).await, json!({"closed": 4007}), "{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_cache_channels_are_refused_as_not_yet_supported_and_bad_names_as_invalid() {
    let server = pusher_server().await;
    let mut ws = connect(&server, "?protocol=7").await;
    event(&mut ws).await;
    for (channel, status) in [
        ("presence-room", 501),
        ("cache-last", 501),
        ("bad name", 400),
    ] {
        let subscribe = json!({"event": "pusher:subscribe", "data": {"channel": channel}});
        ws.send(Message::Text(subscribe.to_string())).await.unwrap();
        let error = event(&mut ws).await;
        assert_eq!(error["event"], "pusher:subscription_error", "{error}");
        assert_eq!(error["channel"], channel);
        assert_eq!(error["data"]["status"], status, "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_app_the_app_path_is_an_ordinary_protocol_connection() {
    let server = start_server_with(|_| {}).await;
    let mut ws = connect(&server, "?protocol=7").await;
    assert_eq!(event(&mut ws).await["type"], "welcome");
}
