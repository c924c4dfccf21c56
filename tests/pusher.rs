//! The Pusher endpoint (`--pusher-app`) driven by the unmodified pusher-js client and the
//! `pusher` REST SDK from npm (tests/pusher/*.test.mjs, versions pinned in its
//! package-lock.json), and by the `pusher` SDK and the Pysher client from PyPI
//! (tests/pusher/sdk_test.py, pinned in requirements.txt). `.ci/run` installs them; elsewhere a
//! suite says it was skipped unless CI is set, where missing packages fail it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::redis::{RedisCluster, RedisServer};
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
    if !dir.join("node_modules/pusher-js").exists()
        || !dir.join("node_modules/laravel-echo").exists()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "tests/pusher needs `npm ci` in CI (.ci/run runs it)"
        );
        eprintln!("skipped: run `npm ci --prefix tests/pusher` first");
        return false;
    }
    let mut command = std::process::Command::new("node");
    command
        // Force-exit: pusher-js leaves a 30 s close timer behind a socket the server closed.
        .args(["--test", "--test-force-exit", "--test-reporter=spec", suite])
        .current_dir(&dir)
        .env("ROOMCAST_HOST", nodes[0].addr.ip().to_string())
        .env("APP_ID", APP.0)
        .env("APP_KEY", APP.1)
        .env("APP_SECRET", APP.2);
    for (node, name) in nodes.iter().zip(["ROOMCAST_PORT", "ROOMCAST_PORT_B"]) {
        command.env(name, node.addr.port().to_string());
    }
    let report = run_reported(command).await;
    assert!(report.contains("fail 0"), "{report}");
    true
}

/// Runs a suite's `command` off the runtime's threads (the servers are served on them
/// meanwhile), prints what it said, and asserts it succeeded; returns what it said.
async fn run_reported(mut command: std::process::Command) -> String {
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the runner thread")
        .expect("the suite's runner starts");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    assert!(output.status.success(), "{report}");
    report
}

/// Runs tests/pusher/sdk_test.py (the PyPI `pusher` SDK and Pysher) against `node` with the
/// virtualenv `.ci/run` makes; `false` when it is not there (outside CI: skipped).
async fn run_python_suite(node: &common::TestServer) -> bool {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pusher");
    let python = dir.join(".venv/bin/python");
    if !python.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "tests/pusher needs its virtualenv in CI (.ci/run makes it)"
        );
        eprintln!("skipped: python3 -m venv tests/pusher/.venv and pip install -r tests/pusher/requirements.txt first");
        return false;
    }
    let mut command = std::process::Command::new(python);
    command
        .arg("sdk_test.py")
        .current_dir(&dir)
        .env("ROOMCAST_HOST", node.addr.ip().to_string())
        .env("ROOMCAST_PORT", node.addr.port().to_string())
        .env("APP_ID", APP.0)
        .env("APP_KEY", APP.1)
        .env("APP_SECRET", APP.2);
    let report = run_reported(command).await;
    assert!(report.contains("\nOK"), "{report}");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_and_pysher_pass_against_the_pusher_endpoint() {
    let server = pusher_server().await;
    run_python_suite(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_and_the_rest_sdk_pass_against_the_pusher_endpoint() {
    let server = pusher_server().await;
    run_suite("pusher.test.mjs", &[&server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laravel_echo_2_passes_against_the_pusher_endpoint() {
    let server = pusher_server().await;
    run_suite("echo.test.mjs", &[&server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_channels_span_two_nodes_on_redis_for_pusher_js_and_the_rest_sdk() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = pusher_nodes_on(&redis, 2).await;
    run_suite("pusher.cluster.test.mjs", &[&nodes[0], &nodes[1]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_channels_and_presence_span_two_nodes_on_a_redis_cluster_through_sharded_pubsub() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let urls = cluster.urls();
        nodes.push(
            start_server_with(|config| {
                config.pusher_app = vec![format!("{}:{}:{}", APP.0, APP.1, APP.2)];
                config.redis_cluster = urls;
            })
            .await,
        );
    }
    cluster.wait_for_subscribers("roomcast:broadcast", 2).await;
    run_suite("pusher.cluster.test.mjs", &[&nodes[0], &nodes[1]]).await;
}

/// `count` nodes with the test app on `redis`, once each has subscribed.
async fn pusher_nodes_on(redis: &RedisServer, count: usize) -> Vec<common::TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..count {
        let url = redis.url();
        nodes.push(
            start_server_with(|config| {
                config.pusher_app = vec![format!("{}:{}:{}", APP.0, APP.1, APP.2)];
                config.redis = Some(url);
            })
            .await,
        );
    }
    redis
        .wait_for_subscribers("roomcast:broadcast", count)
        .await;
    nodes
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
async fn bad_channel_names_are_refused_with_status_400_and_the_connection_stays() {
    let server = pusher_server().await;
    let mut ws = connect(&server, "?protocol=7").await;
    event(&mut ws).await;
    for channel in ["bad name", "slash/no", &"x".repeat(165)] {
        let subscribe = json!({"event": "pusher:subscribe", "data": {"channel": channel}});
        ws.send(Message::Text(subscribe.to_string())).await.unwrap();
        let error = event(&mut ws).await;
        assert_eq!(error["event"], "pusher:subscription_error", "{error}");
        assert_eq!(error["channel"], channel);
        assert_eq!(error["data"]["status"], 400, "{error}");
    }
    ws.send(Message::Text(r#"{"event":"pusher:ping","data":{}}"#.into()))
        .await
        .unwrap();
    assert_eq!(event(&mut ws).await["event"], "pusher:pong");
}

/// Connects to the Pusher endpoint at `addr`; the socket and its socket id.
async fn connect_at(addr: std::net::SocketAddr) -> (Ws, String) {
    let url = format!("ws://{addr}/app/{}?protocol=7", APP.1);
    let mut ws = tokio_tungstenite::connect_async(url).await.unwrap().0;
    let established = event(&mut ws).await;
    let data: Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
    (ws, data["socket_id"].as_str().unwrap().to_owned())
}

/// The `pusher:subscribe` of presence `channel` with `channel_data`, signed for `socket_id` as
/// the app's auth endpoint signs it.
fn presence_subscribe(socket_id: &str, channel: &str, channel_data: &Value) -> Message {
    let channel_data = channel_data.to_string();
    let signature =
        roomcast::pusher::signing::sign(APP.2, &format!("{socket_id}:{channel}:{channel_data}"));
    let subscribe = json!({"event": "pusher:subscribe", "data": {
        "channel": channel,
        "auth": format!("{}:{signature}", APP.1),
        "channel_data": channel_data,
    }});
    Message::Text(subscribe.to_string())
}

/// Subscribes to presence `channel` as `user`, signed as the app's auth endpoint signs it;
/// returns the members' ids from `subscription_succeeded`, sorted.
async fn join_presence(ws: &mut Ws, socket_id: &str, channel: &str, user: &str) -> Vec<String> {
    let channel_data = json!({"user_id": user, "user_info": {"name": user}});
    ws.send(presence_subscribe(socket_id, channel, &channel_data))
        .await
        .unwrap();
    loop {
        let succeeded = event(ws).await;
        if succeeded["event"] != "pusher_internal:subscription_succeeded" {
            continue; // a member event before its list: superseded by the list
        }
        let data: Value = serde_json::from_str(succeeded["data"].as_str().unwrap()).unwrap();
        let mut ids: Vec<String> = serde_json::from_value(data["presence"]["ids"].clone()).unwrap();
        ids.sort();
        return ids;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_nodes_presence_members_are_removed_once_and_a_user_still_connected_elsewhere_stays(
) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let url = redis.url();
    let app = format!("{}:{}:{}", APP.0, APP.1, APP.2);
    let survivor = start_server_with(|config| {
        config.pusher_app = vec![app.clone()];
        config.redis = Some(url.clone());
    })
    .await;
    let mut victim = common::ServerProcess::start(&["--redis", &url, "--pusher-app", &app], None);
    redis.wait_for_subscribers("roomcast:broadcast", 2).await;
    let channel = "presence-reaped";
    let (mut watcher, id) = connect_at(survivor.addr).await;
    assert_eq!(
        join_presence(&mut watcher, &id, channel, "watcher").await,
        ["watcher"]
    );
    // "both" has a connection on each node; "gone" and "gone2" only on the victim.
    let (mut both_here, id) = connect_at(survivor.addr).await;
    join_presence(&mut both_here, &id, channel, "both").await;
    let mut doomed = Vec::new();
    for user in ["both", "gone", "gone2"] {
        let (mut ws, id) = connect_at(victim.addr).await;
        join_presence(&mut ws, &id, channel, user).await;
        doomed.push(ws);
    }
    for user in ["both", "gone", "gone2"] {
        let added = event(&mut watcher).await;
        if user == "both" {
            continue; // its second connection: no event (checked below, in order)
        }
        assert_eq!(added["event"], "pusher_internal:member_added", "{added}");
        let data: Value = serde_json::from_str(added["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["user_id"], user, "{added}");
    }

    victim.child.kill().expect("SIGKILL");
    let killed = std::time::Instant::now();
    let mut removed = Vec::new();
    while removed.len() < 2 {
        let notice = tokio::time::timeout(Duration::from_secs(12), watcher.next())
            .await
            .expect("member_removed within the lease and a reaper's round")
            .unwrap()
            .unwrap();
        let notice: Value = serde_json::from_str(notice.to_text().unwrap()).unwrap();
        assert_eq!(
            notice["event"], "pusher_internal:member_removed",
            "{notice}"
        );
        let data: Value = serde_json::from_str(notice["data"].as_str().unwrap()).unwrap();
        removed.push(data["user_id"].as_str().unwrap().to_owned());
    }
    removed.sort();
    assert_eq!(removed, ["gone", "gone2"]);
    eprintln!(
        "member_removed heard {:?} after the SIGKILL",
        killed.elapsed()
    );
    // Once: no second removal, and "both" stays.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), watcher.next())
            .await
            .is_err(),
        "nothing more"
    );
    let (mut late, id) = connect_at(survivor.addr).await;
    assert_eq!(
        join_presence(&mut late, &id, channel, "late").await,
        ["both", "late", "watcher"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_app_the_app_path_is_an_ordinary_protocol_connection() {
    let server = start_server_with(|_| {}).await;
    let mut ws = connect(&server, "?protocol=7").await;
    assert_eq!(event(&mut ws).await["type"], "welcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_unreachable_a_presence_subscription_is_refused_with_503_and_the_connection_stays(
) {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let node = pusher_nodes_on(&redis, 1).await.remove(0);
    redis.kill();
    let (mut ws, socket_id) = connect_at(node.addr).await;
    let channel = "presence-away";
    ws.send(presence_subscribe(
        &socket_id,
        channel,
        &json!({"user_id": "u"}),
    ))
    .await
    .unwrap();
    // Within the script's answer timeout (4 s), not the harness's usual 5 s wait.
    let refused = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an answer while Redis is away")
        .unwrap()
        .unwrap();
    let refused: Value = serde_json::from_str(refused.to_text().unwrap()).unwrap();
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(refused["channel"], channel);
    assert_eq!(refused["data"]["status"], 503, "{refused}");
    // The connection is still served, and a public channel still works on this node.
    ws.send(Message::Text(r#"{"event":"pusher:ping","data":{}}"#.into()))
        .await
        .unwrap();
    assert_eq!(event(&mut ws).await["event"], "pusher:pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_empty_the_nodes_put_their_presence_members_back_and_not_one_that_left_meanwhile(
) {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let port = redis.addr.port();
    let nodes = pusher_nodes_on(&redis, 2).await;
    let channel = "presence-restart";
    let (mut a, id) = connect_at(nodes[0].addr).await;
    join_presence(&mut a, &id, channel, "on-a").await;
    let (mut b, id) = connect_at(nodes[1].addr).await;
    assert_eq!(
        join_presence(&mut b, &id, channel, "on-b").await,
        ["on-a", "on-b"]
    );
    let (mut leaver, id) = connect_at(nodes[1].addr).await;
    join_presence(&mut leaver, &id, channel, "leaver").await;

    redis.kill();
    // Its leave cannot reach Redis now.
    leaver.close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis = RedisServer::start_on(port).await;
    redis
        .wait_for_subscribers(&format!("roomcast:group:pusher/1001/{channel}"), 2)
        .await;
    // Each node puts its own back once connected; a joiner then sees exactly those present.
    let (mut late, id) = connect_at(nodes[0].addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ids = join_presence(&mut late, &id, channel, "late").await;
        if ids == ["late", "on-a", "on-b"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "members after the restart: {ids:?}"
        );
        let unsubscribe = json!({"event": "pusher:unsubscribe", "data": {"channel": channel}});
        late.send(Message::Text(unsubscribe.to_string()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        redis
            .command(&[
                "HLEN",
                &format!("roomcast:presence-users:pusher/1001/{channel}")
            ])
            .await
            .as_deref(),
        Some(":3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_entry_whose_leave_never_reached_redis_is_removed_when_the_node_reconnects() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let node = pusher_nodes_on(&redis, 1).await.remove(0);
    let channel = "presence-stale";
    let group = format!("pusher/1001/{channel}");
    let (mut watcher, id) = connect_at(node.addr).await;
    join_presence(&mut watcher, &id, channel, "watcher").await;
    // What a leave lost to an outage leaves behind: an entry of this node's in Redis and its
    // index, for a connection the node no longer has.
    let listed = redis
        .command(&["SMEMBERS", "roomcast:nodes"])
        .await
        .unwrap();
    let node_id = listed.lines().last().unwrap().to_owned();
    let entry = json!([group, channel, 999_999]).to_string();
    let index = format!("roomcast:node:{{{node_id}}}:presence");
    let ghost = format!("{node_id}:999999");
    for command in [
        vec!["SADD", &index, &entry],
        vec![
            "HSET",
            &format!("roomcast:presence:{group}"),
            &ghost,
            "ghost",
        ],
        vec![
            "HSET",
            &format!("roomcast:presence-users:{group}"),
            "ghost",
            "1",
        ],
        vec![
            "HSET",
            &format!("roomcast:presence-info:{group}"),
            "ghost",
            "null",
        ],
    ] {
        assert_eq!(
            redis.command(&command).await.as_deref(),
            Some(":1"),
            "{command:?}"
        );
    }
    // The node's subscription connection drops; on reconnecting it settles its entries.
    redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    let removed = tokio::time::timeout(Duration::from_secs(10), watcher.next())
        .await
        .expect("member_removed once the node is back")
        .unwrap()
        .unwrap();
    let removed: Value = serde_json::from_str(removed.to_text().unwrap()).unwrap();
    assert_eq!(
        removed["event"], "pusher_internal:member_removed",
        "{removed}"
    );
    assert_eq!(removed["data"], r#"{"user_id":"ghost"}"#);
    assert_eq!(
        redis
            .command(&["HLEN", &format!("roomcast:presence-users:{group}")])
            .await
            .as_deref(),
        Some(":1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_signed_in_user_may_subscribe_to_its_server_to_user_channel() {
    let server = pusher_server().await;
    let (mut ws, socket_id) = connect_at(server.addr).await;
    let subscribe = |channel: &str| {
        Message::Text(
            json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string(),
        )
    };
    ws.send(subscribe("#server-to-user-alice")).await.unwrap();
    let refused = event(&mut ws).await;
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(refused["data"]["status"], 403, "{refused}");

    let user_data = json!({"id": "alice"}).to_string();
    let signature =
        roomcast::pusher::signing::sign(APP.2, &format!("{socket_id}::user::{user_data}"));
    let signin = json!({"event": "pusher:signin", "data": {
        "auth": format!("{}:{signature}", APP.1),
        "user_data": user_data,
    }});
    ws.send(Message::Text(signin.to_string())).await.unwrap();
    let success = event(&mut ws).await;
    assert_eq!(success["event"], "pusher:signin_success", "{success}");
    let data: Value = serde_json::from_str(success["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["user_data"], user_data);

    ws.send(subscribe("#server-to-user-bob")).await.unwrap();
    assert_eq!(event(&mut ws).await["data"]["status"], 403);
    ws.send(subscribe("#server-to-user-alice")).await.unwrap();
    let succeeded = event(&mut ws).await;
    assert_eq!(succeeded["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(succeeded["channel"], "#server-to-user-alice");
}

/// A server with one app of `[[pusher-apps]]` options: client events off, at most 2
/// connections.
async fn quiet_app_server() -> common::TestServer {
    start_server_with(|config| {
        config.pusher_apps = vec![roomcast::config::PusherAppConfig {
            id: APP.0.into(),
            key: APP.1.into(),
            secret: APP.2.into(),
            client_events: false,
            max_connections: Some(2),
            webhook_url: None,
        }];
    })
    .await
}

/// Sends `subscribe` and waits for its success.
async fn subscribed(ws: &mut Ws, subscribe: &Value) {
    ws.send(Message::Text(subscribe.to_string())).await.unwrap();
    let succeeded = event(ws).await;
    assert_eq!(
        succeeded["event"], "pusher_internal:subscription_succeeded",
        "{succeeded}"
    );
}

/// Subscribes to `channel` (private, signed for the socket) and waits for its success.
async fn join_private(ws: &mut Ws, socket_id: &str, channel: &str) {
    let signature = roomcast::pusher::signing::sign(APP.2, &format!("{socket_id}:{channel}"));
    let subscribe = json!({"event": "pusher:subscribe", "data": {
        "channel": channel, "auth": format!("{}:{signature}", APP.1),
    }});
    subscribed(ws, &subscribe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_with_client_events_off_refuses_them_and_relays_nothing() {
    let server = quiet_app_server().await;
    let (mut sender, id) = connect_at(server.addr).await;
    join_private(&mut sender, &id, "private-quiet").await;
    let (mut other, id) = connect_at(server.addr).await;
    join_private(&mut other, &id, "private-quiet").await;
    let whisper = json!({"event": "client-typing", "channel": "private-quiet", "data": {}});
    sender
        .send(Message::Text(whisper.to_string()))
        .await
        .unwrap();
    let refused = event(&mut sender).await;
    assert_eq!(refused["event"], "pusher:error", "{refused}");
    assert_eq!(
        refused["data"]["message"],
        "Client events are not enabled for this app"
    );
    assert!(
        tokio::time::timeout(common::SILENCE, other.next())
            .await
            .is_err(),
        "the other subscriber got nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_at_its_max_connections_refuses_the_next_with_4004_until_one_leaves() {
    let server = quiet_app_server().await;
    let (first, _) = connect_at(server.addr).await;
    let (_second, _) = connect_at(server.addr).await;
    let mut third = connect(&server, "?protocol=7").await;
    let refused = event(&mut third).await;
    assert_eq!(refused["event"], "pusher:error", "{refused}");
    assert_eq!(refused["data"]["code"], 4004);
    assert_eq!(event(&mut third).await, json!({"closed": 4004}));
    drop(first);
    // Its slot frees once the server sees it gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut next = connect(&server, "?protocol=7").await;
        if event(&mut next).await["event"] == "pusher:connection_established" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_of_a_new_channel_waits_for_the_nodes_redis_subscription_not_only_the_first(
) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let node = pusher_nodes_on(&redis, 1).await.remove(0);
    let (mut first, _) = connect_at(node.addr).await;
    let (mut second, _) = connect_at(node.addr).await;
    // Redis holds every command for a moment: the node's SUBSCRIBE to the new channel too.
    let pause = Duration::from_millis(500);
    let paused = redis
        .command(&["CLIENT", "PAUSE", &pause.as_millis().to_string(), "ALL"])
        .await;
    assert_eq!(paused.as_deref(), Some("+OK"));
    let started = tokio::time::Instant::now();
    let subscribe = json!({"event": "pusher:subscribe", "data": {"channel": "together"}});
    for ws in [&mut first, &mut second] {
        ws.send(Message::Text(subscribe.to_string())).await.unwrap();
    }
    // Each one's answer timed as it arrives.
    let arrival = |mut ws: Ws| async move {
        let succeeded = event(&mut ws).await;
        (succeeded, started.elapsed())
    };
    let (a, b) = tokio::join!(arrival(first), arrival(second));
    for (succeeded, after) in [a, b] {
        assert_eq!(
            succeeded["event"], "pusher_internal:subscription_succeeded",
            "{succeeded}"
        );
        // Not before Redis took the subscription (less a margin for the clock).
        assert!(
            after >= pause - Duration::from_millis(100),
            "succeeded after {after:?}, before the node's subscription"
        );
    }
}

/// Whether the npm `pusher` SDK's webhook helper (`pusher.webhook({headers, rawBody})`), as
/// an app checks a Pusher webhook, finds `received` valid; its events. `None` when the SDK is
/// not installed (outside CI).
fn events_the_sdk_accepts(received: &common::app_stub::Received) -> Option<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pusher");
    if !dir.join("node_modules/pusher").exists() {
        return None;
    }
    let script = r#"
        import Pusher from 'pusher';
        const [key, secret, signature, type, body] = process.argv.slice(1);
        const pusher = new Pusher({ appId: '1', key, secret });
        const webhook = pusher.webhook({
          headers: { 'x-pusher-key': key, 'x-pusher-signature': signature, 'content-type': type },
          rawBody: body,
        });
        console.log(JSON.stringify({ valid: webhook.isValid(), events: webhook.getEvents() }));
    "#;
    let output = std::process::Command::new("node")
        .args(["--input-type=module", "-e", script])
        .arg(received.header("x-pusher-key").unwrap_or(""))
        .arg(APP.2)
        .arg(received.header("x-pusher-signature").unwrap_or(""))
        .arg(received.header("content-type").unwrap_or(""))
        .arg(String::from_utf8_lossy(&received.body).as_ref())
        .current_dir(&dir)
        .output()
        .expect("node runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["valid"], true, "{answer}");
    Some(answer["events"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_webhooks_come_in_pushers_format_signed_for_its_sdk_for_occupancy_members_and_client_events(
) {
    let mut stub =
        common::app_stub::AppStub::start(|_| common::app_stub::Answer::ok(json!({}))).await;
    let url = stub.url("/pusher/webhooks");
    let server = start_server_with(|config| {
        config.pusher_apps = vec![roomcast::config::PusherAppConfig {
            id: APP.0.into(),
            key: APP.1.into(),
            secret: APP.2.into(),
            client_events: true,
            max_connections: None,
            webhook_url: Some(url),
        }];
    })
    .await;
    let channel = "presence-hooked";
    let (mut ann, id) = connect_at(server.addr).await;
    join_presence(&mut ann, &id, channel, "ann").await;
    let (mut bo, bo_socket) = connect_at(server.addr).await;
    join_presence(&mut bo, &bo_socket, channel, "bo").await;
    let typing = json!({"event": "client-typing", "channel": channel, "data": {"on": true}});
    bo.send(Message::Text(typing.to_string())).await.unwrap();
    // Relayed (so told) before anyone leaves: a close on another worker could overtake it.
    loop {
        if event(&mut ann).await["event"] == "client-typing" {
            break;
        }
    }
    drop(ann);
    drop(bo);

    // Every event, in order, over however many batches the sender made.
    let mut events = Vec::new();
    while events.len() < 7 {
        let received = stub.next(Duration::from_secs(10)).await;
        assert_eq!(received.header("x-pusher-key"), Some(APP.1));
        let body = received.json();
        assert!(
            body["time_ms"].as_u64().unwrap() > 1_700_000_000_000,
            "{body}"
        );
        if let Some(checked) = events_the_sdk_accepts(&received) {
            assert_eq!(checked, body["events"], "the SDK reads the same events");
        }
        events.extend(body["events"].as_array().unwrap().iter().cloned());
    }
    let names: Vec<&str> = events.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(
        names[..4],
        [
            "channel_occupied",
            "member_added",
            "member_added",
            "client_event"
        ],
        "{events:?}"
    );
    assert_eq!(events[1]["user_id"], "ann");
    assert_eq!(events[2]["user_id"], "bo");
    assert_eq!(
        events[3],
        json!({"name": "client_event", "channel": channel, "event": "client-typing",
               "data": r#"{"on":true}"#, "socket_id": bo_socket, "user_id": "bo"})
    );
    // The two leave in either order; the channel is vacated after both.
    let mut removed: Vec<&str> = events[4..6]
        .iter()
        .map(|e| {
            assert_eq!(e["name"], "member_removed", "{e}");
            e["user_id"].as_str().unwrap()
        })
        .collect();
    removed.sort();
    assert_eq!(removed, ["ann", "bo"]);
    assert_eq!(
        events[6],
        json!({"name": "channel_vacated", "channel": channel})
    );
}

/// The app's table with its webhooks at `url`.
fn hooked_app(url: &str) -> roomcast::config::PusherAppConfig {
    roomcast::config::PusherAppConfig {
        id: APP.0.into(),
        key: APP.1.into(),
        secret: APP.2.into(),
        client_events: true,
        max_connections: None,
        webhook_url: Some(url.into()),
    }
}

/// `count` nodes on `redis` whose app sends its webhooks to `url`.
async fn hooked_nodes_on(redis: &RedisServer, url: &str, count: usize) -> Vec<common::TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..count {
        let redis_url = redis.url();
        nodes.push(
            start_server_with(|config| {
                config.pusher_apps = vec![hooked_app(url)];
                config.redis = Some(redis_url);
            })
            .await,
        );
    }
    nodes
}

/// The webhook events the app receives, each batch checked by the npm SDK, until `done` says
/// they are all there; then whatever else arrives within `late` (room for a duplicate).
async fn pusher_hooks_until(
    stub: &mut common::app_stub::AppStub,
    done: impl Fn(&[Value]) -> bool,
    late: Duration,
) -> Vec<Value> {
    let mut events = Vec::new();
    let take = |received: common::app_stub::Received, events: &mut Vec<Value>| {
        let body = received.json();
        if let Some(checked) = events_the_sdk_accepts(&received) {
            assert_eq!(checked, body["events"], "the SDK reads the same events");
        }
        events.extend(body["events"].as_array().unwrap().iter().cloned());
    };
    while !done(&events) {
        let received = stub.next(Duration::from_secs(15)).await;
        take(received, &mut events);
    }
    tokio::time::sleep(late).await;
    for received in stub.drain() {
        take(received, &mut events);
    }
    events
}

/// The `name` events of `channel` (their `user_id`, or `""`).
fn hooks_of<'a>(events: &'a [Value], name: &str, channel: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e["name"] == name && e["channel"] == channel)
        .map(|e| e["user_id"].as_str().unwrap_or(""))
        .collect()
}

/// Where in `events` the `name` event of `channel` for `user` ("" for none) is.
fn hook_position(events: &[Value], name: &str, channel: &str, user: &str) -> usize {
    events
        .iter()
        .position(|e| {
            e["name"] == name
                && e["channel"] == channel
                && e["user_id"].as_str().unwrap_or("") == user
        })
        .unwrap_or_else(|| panic!("no {name} of {channel} for {user:?} in {events:?}"))
}

/// Subscribes to the public `channel` and waits for its success.
async fn join_public(ws: &mut Ws, channel: &str) {
    let subscribe = json!({"event": "pusher:subscribe", "data": {"channel": channel}});
    subscribed(ws, &subscribe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_two_nodes_an_apps_webhooks_tell_each_channel_occupied_and_vacated_and_each_user_added_and_removed_once(
) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut stub =
        common::app_stub::AppStub::start(|_| common::app_stub::Answer::ok(json!({}))).await;
    let nodes = hooked_nodes_on(&redis, &stub.url("/pusher/webhooks"), 2).await;
    redis.wait_for_subscribers("roomcast:broadcast", 2).await;
    webhooks_once_per_cluster(&mut stub, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_an_apps_webhooks_tell_each_channel_and_user_event_once() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let mut stub =
        common::app_stub::AppStub::start(|_| common::app_stub::Answer::ok(json!({}))).await;
    let url = stub.url("/pusher/webhooks");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let urls = cluster.urls();
        nodes.push(
            start_server_with(|config| {
                config.pusher_apps = vec![hooked_app(&url)];
                config.redis_cluster = urls;
            })
            .await,
        );
    }
    cluster.wait_for_subscribers("roomcast:broadcast", 2).await;
    webhooks_once_per_cluster(&mut stub, &nodes).await;
}

/// A public channel with a subscriber on each of two nodes, a presence channel with one user
/// on both and one on the second; all leave at once: each event is told once.
async fn webhooks_once_per_cluster(
    stub: &mut common::app_stub::AppStub,
    nodes: &[common::TestServer],
) {
    let (public, presence) = ("news", "presence-team");
    let mut sockets = Vec::new();
    for node in nodes {
        let (mut ws, _) = connect_at(node.addr).await;
        join_public(&mut ws, public).await;
        sockets.push(ws);
    }
    // "ann" on both nodes, "bo" on the second.
    for (node, user) in [(&nodes[0], "ann"), (&nodes[1], "ann"), (&nodes[1], "bo")] {
        let (mut ws, id) = connect_at(node.addr).await;
        join_presence(&mut ws, &id, presence, user).await;
        sockets.push(ws);
    }
    // Every connection ends at once, on both nodes.
    drop(sockets);

    let vacated = |events: &[Value]| {
        [public, presence]
            .iter()
            .all(|channel| !hooks_of(events, "channel_vacated", channel).is_empty())
    };
    let events = pusher_hooks_until(stub, vacated, Duration::from_secs(2)).await;
    assert_eq!(
        hooks_of(&events, "channel_occupied", public),
        [""],
        "{events:?}"
    );
    assert_eq!(
        hooks_of(&events, "channel_vacated", public),
        [""],
        "{events:?}"
    );
    assert_eq!(
        hooks_of(&events, "channel_occupied", presence),
        [""],
        "{events:?}"
    );
    let mut added = hooks_of(&events, "member_added", presence);
    added.sort();
    assert_eq!(added, ["ann", "bo"], "{events:?}");
    let mut removed = hooks_of(&events, "member_removed", presence);
    removed.sort();
    assert_eq!(removed, ["ann", "bo"], "{events:?}");
    assert_eq!(
        hooks_of(&events, "channel_vacated", presence),
        [""],
        "{events:?}"
    );
    // Each node posts what it decided itself, so events decided on different nodes at the
    // same moment (the leaves) come in either order; occupied was told long before.
    assert!(
        hook_position(&events, "channel_occupied", public, "")
            < hook_position(&events, "channel_vacated", public, "")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_nodes_channels_are_vacated_and_its_users_removed_in_the_webhooks_once_by_its_reapers(
) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut stub =
        common::app_stub::AppStub::start(|_| common::app_stub::Answer::ok(json!({}))).await;
    let url = stub.url("/pusher/webhooks");
    // Two survivors: both look for the dead node, one claims it.
    let survivors = hooked_nodes_on(&redis, &url, 2).await;
    let config = std::env::temp_dir().join(format!("roomcast-hooked-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[[pusher-apps]]\nid = \"{}\"\nkey = \"{}\"\nsecret = \"{}\"\nwebhook-url = \"{url}\"\n",
            APP.0, APP.1, APP.2
        ),
    )
    .unwrap();
    let mut victim = common::ServerProcess::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--redis",
            &redis.url(),
        ],
        None,
    );
    redis.wait_for_subscribers("roomcast:broadcast", 3).await;
    // "shared" stays occupied by a survivor; "solo" and "presence-solo" are the victim's alone,
    // and in "presence-mixed" the user "both" has a connection on a survivor too.
    let (mut keeper, _) = connect_at(survivors[0].addr).await;
    join_public(&mut keeper, "shared").await;
    let (mut both_here, id) = connect_at(survivors[1].addr).await;
    join_presence(&mut both_here, &id, "presence-mixed", "both").await;
    let mut doomed = Vec::new();
    let (mut ws, _) = connect_at(victim.addr).await;
    join_public(&mut ws, "shared").await;
    join_public(&mut ws, "solo").await;
    doomed.push(ws);
    for (channel, user) in [
        ("presence-solo", "gone"),
        ("presence-mixed", "both"),
        ("presence-mixed", "gone"),
    ] {
        let (mut ws, id) = connect_at(victim.addr).await;
        join_presence(&mut ws, &id, channel, user).await;
        doomed.push(ws);
    }
    let joined = |events: &[Value]| {
        hooks_of(events, "channel_occupied", "solo").len() == 1
            && hooks_of(events, "member_added", "presence-solo") == ["gone"]
            && hooks_of(events, "member_added", "presence-mixed").len() == 2
    };
    let before = pusher_hooks_until(&mut stub, joined, Duration::ZERO).await;

    victim.child.kill().expect("SIGKILL");
    let reaped = |events: &[Value]| {
        !hooks_of(events, "channel_vacated", "solo").is_empty()
            && !hooks_of(events, "channel_vacated", "presence-solo").is_empty()
            && !hooks_of(events, "member_removed", "presence-mixed").is_empty()
    };
    let events = pusher_hooks_until(&mut stub, reaped, Duration::from_secs(2)).await;
    let _ = std::fs::remove_file(&config);
    assert_eq!(
        hooks_of(&events, "channel_vacated", "solo"),
        [""],
        "{events:?}"
    );
    assert_eq!(
        hooks_of(&events, "member_removed", "presence-solo"),
        ["gone"],
        "{events:?}"
    );
    assert_eq!(
        hooks_of(&events, "channel_vacated", "presence-solo"),
        [""],
        "{events:?}"
    );
    assert!(
        hook_position(&events, "member_removed", "presence-solo", "gone")
            < hook_position(&events, "channel_vacated", "presence-solo", "")
    );
    // "both" is still connected on a survivor; "shared" and "presence-mixed" stay occupied.
    assert_eq!(
        hooks_of(&events, "member_removed", "presence-mixed"),
        ["gone"],
        "{events:?}"
    );
    for channel in ["shared", "presence-mixed"] {
        assert!(
            hooks_of(&events, "channel_vacated", channel).is_empty(),
            "{events:?}"
        );
    }
    assert_eq!(
        hooks_of(&before, "channel_occupied", "shared"),
        [""],
        "{before:?}"
    );
    drop((keeper, both_here));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_left_while_redis_did_not_answer_is_vacated_in_the_webhooks_when_the_node_is_back(
) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut stub =
        common::app_stub::AppStub::start(|_| common::app_stub::Answer::ok(json!({}))).await;
    let node = hooked_nodes_on(&redis, &stub.url("/pusher/webhooks"), 1)
        .await
        .remove(0);
    redis.wait_for_subscribers("roomcast:broadcast", 1).await;
    let (mut leaver, _) = connect_at(node.addr).await;
    join_public(&mut leaver, "left-in-outage").await;
    let (mut keeper, _) = connect_at(node.addr).await;
    join_public(&mut keeper, "kept").await;
    let occupied = |events: &[Value]| {
        ["left-in-outage", "kept"]
            .iter()
            .all(|channel| hooks_of(events, "channel_occupied", channel).len() == 1)
    };
    pusher_hooks_until(&mut stub, occupied, Duration::ZERO).await;

    redis.pause();
    drop(leaver);
    // Its vacate goes unanswered (Redis's answers time out after 2 s).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(stub.drain().is_empty(), "nothing told while Redis is away");
    redis.resume();
    // The node's subscription drops; on reconnecting it puts its channels back.
    redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    let vacated =
        |events: &[Value]| !hooks_of(events, "channel_vacated", "left-in-outage").is_empty();
    let events = pusher_hooks_until(&mut stub, vacated, Duration::from_secs(1)).await;
    assert_eq!(
        hooks_of(&events, "channel_vacated", "left-in-outage"),
        [""],
        "{events:?}"
    );
    // The channel still held is neither vacated nor told occupied again.
    assert_eq!(events.len(), 1, "{events:?}");
    drop(keeper);
}
