//! The client library (`roomcast::client`) and the command-line clients (`roomcast client`,
//! `roomcast publish`) against the real server: rooms, private messages, reconnection to a
//! restarted server with the rooms, metadata and offline messages restored (after a graceful
//! stop, a killed server process, and a frozen one only the keepalive notices), the bounded
//! queue, tokens, wss://.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{start_server, start_server_with, Client as RawClient, TestServer, EXPECT};
use roomcast::client::{
    Client, ClientConfig, ClientError, Event, Jitter, ReconnectPolicy, ServerMessage,
};
use serde_json::{json, Value};

/// Reads events until one matches, panicking (with what was seen) after [`EXPECT`].
async fn expect_event(
    client: &mut Client,
    what: &str,
    mut wanted: impl FnMut(&Event) -> bool,
) -> Event {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + EXPECT;
    loop {
        match tokio::time::timeout_at(deadline, client.next_event()).await {
            Ok(Some(event)) if wanted(&event) => return event,
            Ok(Some(event)) => seen.push(event),
            Ok(None) => panic!("the event stream ended waiting for {what}; saw {seen:#?}"),
            Err(_) => panic!("no {what} within {EXPECT:?}; saw {seen:#?}"),
        }
    }
}

async fn connected(client: &mut Client) -> (String, Option<String>) {
    match expect_event(client, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await
    {
        Event::Connected { client_id, user_id } => (client_id, user_id),
        _ => unreachable!(),
    }
}

async fn joined(client: &mut Client, room: &str) -> u64 {
    match expect_event(
        client,
        "room_joined",
        |e| matches!(e, Event::Message(ServerMessage::RoomJoined { room: r, .. }) if r == room),
    )
    .await
    {
        Event::Message(ServerMessage::RoomJoined { members, .. }) => members,
        _ => unreachable!(),
    }
}

/// Waits for a `room_message` with this text and returns its sender.
async fn room_message(client: &mut Client, room: &str, text: &str) -> String {
    let event = expect_event(client, &format!("room_message {text:?}"), |e| {
        matches!(e, Event::Message(ServerMessage::RoomMessage { room: r, message, .. })
            if r == room && message == text)
    })
    .await;
    match event {
        Event::Message(ServerMessage::RoomMessage { from, .. }) => from,
        _ => unreachable!(),
    }
}

/// Reads raw messages until one of `type`, skipping others.
async fn recv_type(raw: &mut RawClient, kind: &str) -> Value {
    loop {
        let message = raw.recv().await;
        if message["type"] == kind {
            return message;
        }
    }
}

/// A server on `addr` (a port a stopped server used): waits briefly until the address can be
/// bound again with the server's socket options, then starts it there.
async fn start_server_on(addr: SocketAddr) -> TestServer {
    start_server_on_with(addr, |_| {}).await
}

/// [`start_server_on`] with `tweak` applied to the configuration.
async fn start_server_on_with(
    addr: SocketAddr,
    tweak: impl FnOnce(&mut roomcast::Config),
) -> TestServer {
    let mut tweak = Some(tweak);
    for _ in 0..50 {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.set_reuse_port(true).unwrap();
        if socket.bind(&addr.into()).is_ok() {
            drop(socket);
            let tweak = tweak.take().expect("used once");
            return start_server_with(|config| {
                tweak(config);
                config.listen = addr;
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{addr} did not become free");
}

/// Waits for the client to report its connection lost, and returns the reason it gives.
async fn disconnect_reason(client: &mut Client) -> String {
    match expect_event(client, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await
    {
        Event::Disconnected { reason } => reason,
        _ => unreachable!("expect_event returns the matching event"),
    }
}

/// A raw client in room "ops" of a restarted server, joined before the reconnecting client is
/// back (it is alone there).
async fn alone_in_ops(server: &TestServer) -> RawClient {
    let mut observer = RawClient::connect(server).await;
    assert_eq!(
        observer.join("ops").await["members"],
        1,
        "the observer joined before the client came back"
    );
    observer
}

/// After a server restart: the client is back by itself under a new id, with its `metadata`
/// and its room "ops" restored, the message it queued while offline delivered to `observer`
/// (already in the room), and it receives the room's messages again.
async fn assert_back_with_state(
    client: &mut Client,
    observer: &mut RawClient,
    first_id: &str,
    metadata: Value,
) {
    let (second_id, _) = connected(client).await;
    assert_ne!(second_id, first_id);
    let event = expect_event(client, "metadata_updated after reconnecting", |e| {
        matches!(e, Event::Message(ServerMessage::MetadataUpdated { .. }))
    })
    .await;
    assert_eq!(
        event,
        Event::Message(ServerMessage::MetadataUpdated {
            metadata: metadata.as_object().unwrap().clone()
        })
    );
    assert_eq!(joined(client, "ops").await, 2);
    let rejoined = recv_type(observer, "member_joined").await;
    assert_eq!(rejoined["client_id"], second_id.as_str());
    assert_eq!(rejoined["total_members"], 2);
    let queued = recv_type(observer, "room_message").await;
    assert_eq!(queued["from"], second_id.as_str());
    assert_eq!(queued["message"], "sent while offline");
    observer
        .send(json!({"type": "room_message", "room": "ops", "message": "welcome back"}))
        .await;
    assert_eq!(
        room_message(client, "ops", "welcome back").await,
        observer.id
    );
}

/// After the rejoin of "feed": its `room_joined` says recovered at offset 6, and the five
/// messages "missed 0".."missed 4" (offsets 2..6) follow in order.
async fn rejoined_with_missed_feed(client: &mut Client) {
    let rejoined = expect_event(
        client,
        "the rejoin's room_joined",
        |e| matches!(e, Event::Message(ServerMessage::RoomJoined { room, .. }) if room == "feed"),
    )
    .await;
    let Event::Message(ServerMessage::RoomJoined {
        recovered, offset, ..
    }) = rejoined
    else {
        unreachable!()
    };
    assert_eq!(recovered, Some(true), "told that the gap was recovered");
    assert_eq!(offset, Some(6));
    for n in 0..5 {
        let event = expect_event(client, "a replayed message", |e| {
            matches!(e, Event::Message(ServerMessage::RoomMessage { .. }))
        })
        .await;
        let Event::Message(ServerMessage::RoomMessage {
            message, offset, ..
        }) = event
        else {
            unreachable!()
        };
        assert_eq!(message, json!(format!("missed {n}")));
        assert_eq!(offset, Some(n + 2));
    }
}

fn quick_retries() -> ReconnectPolicy {
    ReconnectPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        ..ReconnectPolicy::default()
    }
}

/// An address nobody listens on: bound for a moment to get a free port, then released.
fn unused_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_joins_a_room_and_receives_another_clients_message() {
    let server = start_server().await;
    let mut client = Client::connect(ClientConfig::new(server.url())).unwrap();
    // Queued before the connection is up; sent once it is.
    client.join_room("lobby").unwrap();
    let (my_id, user_id) = connected(&mut client).await;
    assert!(my_id.starts_with("client_"));
    assert_eq!(user_id, None);
    assert_eq!(joined(&mut client, "lobby").await, 1);

    let mut other = RawClient::connect(&server).await;
    other.join("lobby").await;
    match expect_event(&mut client, "member_joined", |e| {
        matches!(e, Event::Message(ServerMessage::MemberJoined { .. }))
    })
    .await
    {
        Event::Message(ServerMessage::MemberJoined {
            client_id,
            total_members,
            ..
        }) => {
            assert_eq!(client_id, other.id);
            assert_eq!(total_members, 2);
        }
        _ => unreachable!(),
    }
    other
        .send(json!({"type": "room_message", "room": "lobby", "message": "hello"}))
        .await;
    assert_eq!(room_message(&mut client, "lobby", "hello").await, other.id);

    // And the other way, with a structured body.
    client
        .room_message("lobby", json!({"kind": "greeting", "n": 1}))
        .unwrap();
    let received = recv_type(&mut other, "room_message").await;
    assert_eq!(received["from"], my_id.as_str());
    assert_eq!(received["message"], json!({"kind": "greeting", "n": 1}));

    // Server errors arrive as messages; the connection stays.
    client.room_message("nowhere", "x").unwrap();
    expect_event(&mut client, "error", |e| {
        matches!(e, Event::Message(ServerMessage::Error { message, .. }) if message == "Room does not exist")
    })
    .await;

    // close() leaves the room like any disconnection.
    client.close().await;
    let left = recv_type(&mut other, "member_left").await;
    assert_eq!(left["client_id"], my_id.as_str());
    assert_eq!(
        client.room_message("lobby", "late"),
        Err(ClientError::Closed)
    );
    expect_event(
        &mut client,
        "the final Disconnected",
        |e| matches!(e, Event::Disconnected { reason } if reason.contains("closed by the client")),
    )
    .await;
    assert_eq!(client.next_event().await, None, "the stream ends");
    other.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_messages_and_broadcasts_both_ways() {
    let server = start_server().await;
    let mut client = Client::connect(ClientConfig::new(server.url())).unwrap();
    let (my_id, _) = connected(&mut client).await;
    let mut other = RawClient::connect(&server).await;

    other
        .send(json!({"type": "private_message", "to": my_id, "message": "psst"}))
        .await;
    let event = expect_event(&mut client, "private_message", |e| {
        matches!(e, Event::Message(ServerMessage::PrivateMessage { .. }))
    })
    .await;
    assert!(
        matches!(event, Event::Message(ServerMessage::PrivateMessage { from, message, .. })
        if from == other.id && message == "psst")
    );

    client.private_message(other.id.clone(), "back").unwrap();
    let received = recv_type(&mut other, "private_message").await;
    assert_eq!(
        (received["from"].as_str(), received["message"].as_str()),
        (Some(my_id.as_str()), Some("back"))
    );

    client.broadcast("to all").unwrap();
    let received = recv_type(&mut other, "broadcast").await;
    assert_eq!(received["message"], "to all");

    client.private_message("client_nobody", "?").unwrap();
    expect_event(&mut client, "Recipient not found", |e| {
        matches!(e, Event::Message(ServerMessage::Error { message, .. }) if message == "Recipient not found")
    })
    .await;
    client.close().await;
    other.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_to_a_restarted_server_and_restores_its_state() {
    let first = start_server().await;
    let addr = first.addr;
    // A fixed 1.5 s between attempts, so the observer below is in the room before the client
    // comes back.
    let policy = ReconnectPolicy {
        initial_delay: Duration::from_millis(1500),
        max_delay: Duration::from_millis(1500),
        jitter: Jitter::None,
        ..ReconnectPolicy::default()
    };
    let mut client = Client::connect(ClientConfig::new(first.url()).reconnect(policy)).unwrap();
    let (first_id, _) = connected(&mut client).await;
    client.join_room("ops").unwrap();
    joined(&mut client, "ops").await;
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), json!("ann"));
    client.set_metadata(metadata).unwrap();
    let mut metadata = serde_json::Map::new();
    metadata.insert("role".into(), json!("oncall"));
    client.set_metadata(metadata).unwrap();
    expect_event(&mut client, "metadata_updated", |e| {
        matches!(e, Event::Message(ServerMessage::MetadataUpdated { metadata }) if metadata.len() == 2)
    })
    .await;

    // The server goes away (close 1001); the client notices and starts its backoff.
    first.stop().await;
    let reason = disconnect_reason(&mut client).await;
    assert!(reason.contains("1001"), "{reason}");
    expect_event(&mut client, "Reconnecting", |e| {
        matches!(e, Event::Reconnecting { attempt: 1, delay } if *delay == Duration::from_millis(1500))
    })
    .await;

    // Sent while disconnected: waits in the queue.
    client.room_message("ops", "sent while offline").unwrap();

    // A new server on the same port, and an observer in the room before the client is back.
    let second = start_server_on(addr).await;
    let mut observer = alone_in_ops(&second).await;

    // The client reconnects by itself: a new client id, the merged metadata sent again, the
    // room joined again, then the queued message.
    assert_back_with_state(
        &mut client,
        &mut observer,
        &first_id,
        json!({"name": "ann", "role": "oncall"}),
    )
    .await;
    client.close().await;
    observer.close().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_offline_queue_refuses_with_a_clear_error() {
    // A port nobody listens on.
    let addr = unused_addr();
    let mut client = Client::connect(
        ClientConfig::new(format!("ws://{addr}/"))
            .queue_capacity(3)
            .reconnect(quick_retries()),
    )
    .unwrap();
    for n in 0..3 {
        client.room_message("r", n).unwrap();
    }
    let error = client.room_message("r", 3).unwrap_err();
    assert_eq!(error, ClientError::QueueFull { capacity: 3 });
    assert!(error.to_string().contains("queue is full"), "{error}");
    // The attempts fail and are retried, each one reported.
    let reason = disconnect_reason(&mut client).await;
    assert!(reason.contains("cannot connect"), "{reason}");
    expect_event(&mut client, "Reconnecting", |e| {
        matches!(e, Event::Reconnecting { attempt: 1, .. })
    })
    .await;
    expect_event(&mut client, "Reconnecting", |e| {
        matches!(e, Event::Reconnecting { attempt: 2, .. })
    })
    .await;
    client.close().await;
    assert!(client.is_closed());
    assert_eq!(client.join_room("r"), Err(ClientError::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_ends_the_client() {
    let addr = unused_addr();
    let policy = ReconnectPolicy {
        max_attempts: Some(2),
        ..quick_retries()
    };
    let mut client =
        Client::connect(ClientConfig::new(format!("ws://{addr}/")).reconnect(policy)).unwrap();
    let mut failures = 0;
    while let Some(event) = tokio::time::timeout(EXPECT, client.next_event())
        .await
        .expect("the client gives up in time")
    {
        if matches!(event, Event::Disconnected { .. }) {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "the first attempt and two retries");
    assert_eq!(client.broadcast("x"), Err(ClientError::Closed));
}

mod auth {
    use super::*;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    const SECRET: &str = "client-test-secret-long-enough";

    fn token(sub: &str) -> String {
        let exp = roomcast::protocol::timestamp() + 300;
        encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": sub, "exp": exp}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_token_goes_in_the_query_string_and_a_refusal_is_final() {
        let server = start_server_with(|config| config.jwt_secret = Some(SECRET.into())).await;
        let mut client =
            Client::connect(ClientConfig::new(server.url()).token(token("user-7"))).unwrap();
        let (_, user_id) = connected(&mut client).await;
        assert_eq!(user_id.as_deref(), Some("user-7"));
        client.close().await;

        // Without a token: 401, not retried (it would be refused again); the stream ends.
        let mut refused =
            Client::connect(ClientConfig::new(server.url()).reconnect(quick_retries())).unwrap();
        let event = expect_event(&mut refused, "Disconnected", |e| {
            matches!(e, Event::Disconnected { .. })
        })
        .await;
        assert!(
            matches!(&event, Event::Disconnected { reason } if reason.contains("401")),
            "{event:?}"
        );
        let end = tokio::time::timeout(EXPECT, refused.next_event()).await;
        assert_eq!(end, Ok(None), "no retry after a 401");
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_an_extra_trusted_certificate() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("roomcast-client-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.key_pair.serialize_pem()).unwrap();
    let server = start_server_with(|config| {
        config.tls_cert = Some(cert_path.to_string_lossy().into_owned());
        config.tls_key = Some(key_path.to_string_lossy().into_owned());
    })
    .await;
    let url = format!("wss://localhost:{}/", server.addr.port());

    let mut client = Client::connect(
        ClientConfig::new(url.clone()).extra_root_pem(certified.cert.pem().into_bytes()),
    )
    .unwrap();
    client.join_room("secure").unwrap();
    connected(&mut client).await;
    assert_eq!(joined(&mut client, "secure").await, 1);
    client.close().await;

    // Without the certificate the server is not trusted, and the attempt says why.
    let mut untrusted =
        Client::connect(ClientConfig::new(url).reconnect(ReconnectPolicy::never())).unwrap();
    let event = expect_event(&mut untrusted, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(&event, Event::Disconnected { reason } if reason.contains("TLS")),
        "{event:?}"
    );
    server.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}

// ---- the command-line clients, run as the built binary ----

fn roomcast() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_roomcast"));
    command.env_remove("ROOMCAST_TOKEN").env_remove("RUST_LOG");
    command
}

/// Runs a command to completion off the runtime's threads (the server runs on them).
async fn output(mut command: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().expect("run roomcast"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_sends_one_message_and_exits_0() {
    let server = start_server().await;
    let mut watcher = RawClient::connect(&server).await;
    watcher.join("news").await;

    let mut command = roomcast();
    command.args([
        "publish",
        &server.url(),
        "--room",
        "news",
        "deploy finished",
    ]);
    let out = output(command).await;
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let joined = recv_type(&mut watcher, "member_joined").await;
    let message = recv_type(&mut watcher, "room_message").await;
    assert_eq!(message["message"], "deploy finished");
    assert_eq!(message["from"], joined["client_id"]);
    let left = recv_type(&mut watcher, "member_left").await;
    assert_eq!(left["client_id"], joined["client_id"]);

    // --json sends the value itself.
    let mut command = roomcast();
    command.args([
        "publish",
        &server.url(),
        "--room",
        "news",
        "--json",
        r#"{"build": 42}"#,
    ]);
    assert!(output(command).await.status.success());
    let message = recv_type(&mut watcher, "room_message").await;
    assert_eq!(message["message"], json!({"build": 42}));
    watcher.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fails_with_a_reason() {
    // Nothing listening: retried until --timeout, then exit 1 with the last failure.
    let addr = unused_addr();
    let mut command = roomcast();
    command.args([
        "publish",
        &format!("ws://{addr}/"),
        "--room",
        "r",
        "x",
        "--timeout",
        "1s",
    ]);
    let out = output(command).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("timed out after 1s") && stderr.contains("cannot connect"),
        "{stderr}"
    );

    // Refused by the server (a token is required): at once, with the HTTP status.
    let server = start_server_with(|config| config.jwt_secret = Some("s".repeat(32))).await;
    let mut command = roomcast();
    command.args(["publish", &server.url(), "--room", "r", "x"]);
    let out = output(command).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");

    // A bad URL is a usage error.
    let mut command = roomcast();
    command.args(["publish", "http://example.com/", "--room", "r", "x"]);
    let out = output(command).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ws:// or wss://"));
    server.stop().await;
}

/// Lines of a child's stdout, read on a thread.
fn stdout_lines(stdout: std::process::ChildStdout) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

async fn expect_line(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + EXPECT;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) if wanted(&line) => return line,
            Ok(Some(line)) => seen.push(line),
            _ => panic!("no such line; saw {seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interactive_client_prints_messages_and_sends_what_is_typed() {
    let server = start_server().await;
    let mut watcher = RawClient::connect(&server).await;
    watcher.join("lobby").await;

    let mut child = roomcast()
        .args(["client", &server.url(), "--room", "lobby"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = stdout_lines(child.stdout.take().unwrap());

    let joined = recv_type(&mut watcher, "member_joined").await;
    let cli_id = joined["client_id"].as_str().unwrap().to_owned();
    expect_line(&mut lines, |l| l == "[lobby] * joined (2 members)").await;

    watcher
        .send(json!({"type": "room_message", "room": "lobby", "message": "hi cli"}))
        .await;
    let short = watcher.id[..15].to_owned();
    expect_line(&mut lines, |l| l == format!("[lobby] {short}…: hi cli")).await;

    writeln!(stdin, "hello watcher").unwrap();
    let message = recv_type(&mut watcher, "room_message").await;
    assert_eq!(message["message"], "hello watcher");
    assert_eq!(message["from"], cli_id.as_str());

    // A /pm to the displayed (shortened) id reaches the watcher.
    writeln!(stdin, "/pm {short}… psst").unwrap();
    let message = recv_type(&mut watcher, "private_message").await;
    assert_eq!(message["message"], "psst");

    writeln!(stdin, "/meta name=cli").unwrap();
    expect_line(&mut lines, |l| l == r#"* metadata: {"name":"cli"}"#).await;

    writeln!(stdin, "/join second").unwrap();
    expect_line(&mut lines, |l| l == "[second] * joined (1 member)").await;
    writeln!(stdin, "/leave").unwrap();
    writeln!(stdin, "back in the lobby").unwrap();
    let message = recv_type(&mut watcher, "room_message").await;
    assert_eq!(message["message"], "back in the lobby");

    writeln!(stdin, "/quit").unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let left = recv_type(&mut watcher, "member_left").await;
    assert_eq!(left["client_id"], cli_id.as_str());
    watcher.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_client_prints_raw_messages_and_sends_piped_input_before_exiting() {
    let server = start_server().await;
    let mut watcher = RawClient::connect(&server).await;
    watcher.join("feed").await;

    // All of stdin is given (and closed) before the connection is even up: the lines wait in
    // the queue, go out once connected, and the client exits 0 at end of input.
    let mut command = roomcast();
    command
        .args(["client", &server.url(), "--room", "feed", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"one\ntwo\n/broadcast three\n").unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for text in ["one", "two"] {
        let message = recv_type(&mut watcher, "room_message").await;
        assert_eq!(message["message"], text);
    }
    assert_eq!(
        recv_type(&mut watcher, "broadcast").await["message"],
        "three"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first: Value = serde_json::from_str(stdout.lines().next().unwrap_or("")).unwrap();
    assert_eq!(
        first,
        json!({"type": "room_joined", "room": "feed", "members": 2})
    );
    watcher.close().await;
    server.stop().await;
}

/// The real `roomcast` binary serving on `addr`, so a test can kill or freeze the whole process
/// (an in-process server can only be stopped gracefully). Killed when dropped, so a failing
/// test leaves no server behind.
struct ServerProcess {
    child: std::process::Child,
}

impl ServerProcess {
    async fn start(addr: SocketAddr) -> ServerProcess {
        let mut child = roomcast()
            .args(["--listen", &addr.to_string(), "--workers", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start roomcast");
        let deadline = tokio::time::Instant::now() + EXPECT;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("roomcast exited before listening on {addr}: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "roomcast not listening on {addr} within {EXPECT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ServerProcess { child }
    }

    /// SIGKILL: no close frame, no drain; the kernel ends the sockets.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGSTOP: the process stops answering, but its sockets stay open and the kernel keeps
    /// ACKing, so the client sees neither FIN nor RST: a half-open connection as far as the
    /// application can tell.
    fn freeze(&mut self) {
        let status = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status()
            .expect("run kill -STOP");
        assert!(status.success());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_the_server_process_is_killed_and_restores_its_state() {
    let addr = unused_addr();
    let mut first = ServerProcess::start(addr).await;
    // A fixed 3 s between attempts, so the observer below is in the room before the client
    // comes back and sees the queued message.
    let policy = ReconnectPolicy {
        initial_delay: Duration::from_millis(3000),
        max_delay: Duration::from_millis(3000),
        jitter: Jitter::None,
        ..ReconnectPolicy::default()
    };
    let mut client =
        Client::connect(ClientConfig::new(format!("ws://{addr}/")).reconnect(policy)).unwrap();
    let (first_id, _) = connected(&mut client).await;
    client.join_room("ops").unwrap();
    assert_eq!(joined(&mut client, "ops").await, 1);
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), json!("ann"));
    client.set_metadata(metadata).unwrap();
    expect_event(&mut client, "metadata_updated", |e| {
        matches!(e, Event::Message(ServerMessage::MetadataUpdated { .. }))
    })
    .await;

    // The process dies without a close frame: the client notices the end of the stream.
    first.kill();
    let reason = disconnect_reason(&mut client).await;
    assert!(reason.starts_with("connection lost"), "{reason}");
    expect_event(&mut client, "Reconnecting", |e| {
        matches!(e, Event::Reconnecting { attempt: 1, .. })
    })
    .await;
    client.room_message("ops", "sent while offline").unwrap();

    let second = start_server_on(addr).await;
    let mut observer = alone_in_ops(&second).await;

    // Back by itself: new id, metadata and room restored, then the queued message.
    assert_back_with_state(
        &mut client,
        &mut observer,
        &first_id,
        json!({"name": "ann"}),
    )
    .await;
    client.close().await;
    observer.close().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_notices_a_frozen_server_and_the_client_reconnects() {
    let addr = unused_addr();
    let mut first = ServerProcess::start(addr).await;
    let keepalive = Duration::from_millis(250);
    let mut client = Client::connect(
        ClientConfig::new(format!("ws://{addr}/"))
            .keepalive(Some(keepalive))
            // Attempts against the frozen process get a TCP connection but never a welcome.
            .connect_timeout(Duration::from_secs(1))
            .reconnect(quick_retries()),
    )
    .unwrap();
    let (first_id, _) = connected(&mut client).await;
    client.join_room("ops").unwrap();
    joined(&mut client, "ops").await;

    // No FIN, no RST, no pong: only the keepalive can tell the server is gone.
    first.freeze();
    let frozen_at = tokio::time::Instant::now();
    let reason = disconnect_reason(&mut client).await;
    assert!(reason.contains("(keepalive)"), "{reason}");
    // Silence for two periods, checked at each tick: at most three periods, plus slack for a
    // loaded machine.
    assert!(
        frozen_at.elapsed() < keepalive * 3 + Duration::from_secs(3),
        "noticed after {:?}",
        frozen_at.elapsed()
    );

    first.kill();
    let second = start_server_on(addr).await;
    let (second_id, _) = connected(&mut client).await;
    assert_ne!(second_id, first_id);
    joined(&mut client, "ops").await;
    let mut observer = RawClient::connect(&second).await;
    observer.join("ops").await;
    observer
        .send(json!({"type": "room_message", "room": "ops", "message": "still there?"}))
        .await;
    assert_eq!(
        room_message(&mut client, "ops", "still there?").await,
        observer.id
    );
    client.close().await;
    observer.close().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_dropped_connection_the_library_recovers_the_missed_messages_by_itself() {
    let server = start_server_with(|config| {
        config.history_size = 100;
        config.history_ttl = Duration::from_secs(60);
        config.api_key = Some("recover-key".into());
    })
    .await;
    // Back after 1 s: the five messages below are all out by then (each is one frame).
    let slow = ReconnectPolicy {
        initial_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(1),
        jitter: Jitter::None,
        ..ReconnectPolicy::default()
    };
    let config = ClientConfig::new(server.url()).reconnect(slow);
    let mut client = Client::connect(config).unwrap();
    let (first_id, _) = connected(&mut client).await;
    client.join_room("feed").unwrap();
    joined(&mut client, "feed").await;
    let mut publisher = RawClient::connect(&server).await;
    publisher.join("feed").await;
    publisher
        .send(json!({"type": "room_message", "room": "feed", "message": "before"}))
        .await;
    room_message(&mut client, "feed", "before").await;

    // The connection is cut (as a network drop would); five messages go out meanwhile.
    let body = json!({"client_id": first_id, "code": 4000}).to_string();
    let auth = "Authorization: Bearer recover-key";
    let (status, _) = common::http_json(server.addr, "POST", "/api/disconnect", auth, &body).await;
    assert_eq!(status, 200);
    assert_eq!(
        recv_type(&mut publisher, "member_left").await["client_id"],
        first_id
    );
    for n in 0..5 {
        publisher
            .send(json!({"type": "room_message", "room": "feed", "message": format!("missed {n}")}))
            .await;
    }
    // Answered after them: they are in the room's history.
    publisher
        .send(json!({"type": "history", "room": "feed", "limit": 1}))
        .await;
    recv_type(&mut publisher, "history").await;
    // Back under a new id: its rejoin says what it saw, and the server replays the rest.
    rejoined_with_missed_feed(&mut client).await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_the_library_recovers_what_it_missed_while_its_node_restarted() {
    let Some(redis) = common::redis::RedisServer::start().await else {
        return;
    };
    let url = redis.url();
    let in_cluster = move |config: &mut roomcast::Config| {
        config.redis = Some(url.clone());
        config.history_size = 100;
        config.history_ttl = Duration::from_secs(60);
    };
    let mut node_a = Some(start_server_with(in_cluster.clone()).await);
    let node_b = start_server_with(in_cluster.clone()).await;
    redis.wait_for_subscribers("roomcast:broadcast", 2).await;
    let addr = node_a.as_ref().unwrap().addr;
    let config = ClientConfig::new(format!("ws://{addr}/")).reconnect(quick_retries());
    let mut client = Client::connect(config).unwrap();
    connected(&mut client).await;
    client.join_room("feed").unwrap();
    joined(&mut client, "feed").await;
    let mut publisher = RawClient::connect(&node_b).await;
    publisher.join("feed").await;
    publisher
        .send(json!({"type": "room_message", "room": "feed", "message": "before"}))
        .await;
    room_message(&mut client, "feed", "before").await;

    // Its node stops; five messages go out on the other node meanwhile; a new process takes
    // the old one's address.
    node_a.take().unwrap().stop().await;
    recv_type(&mut publisher, "member_left").await;
    for n in 0..5 {
        publisher
            .send(json!({"type": "room_message", "room": "feed", "message": format!("missed {n}")}))
            .await;
    }
    publisher
        .send(json!({"type": "history", "room": "feed", "limit": 1}))
        .await;
    recv_type(&mut publisher, "history").await;
    let _restarted = start_server_on_with(addr, in_cluster).await;
    rejoined_with_missed_feed(&mut client).await;
    client.close().await;
}
