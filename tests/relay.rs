//! `--relay-path`: the seed's Swoole variant on the protocol seam. A connection there gets
//! `{"type":"welcome","fd":N}`, and every message it sends reaches every connection on that
//! path verbatim, the sender included; it is apart from the seed protocol's rooms and
//! broadcasts, and keeps the server's limits.

mod common;

use common::{keys, start_server_with, Client, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn relay_server() -> TestServer {
    start_server_with(|config| config.relay_path = Some("/relay".into())).await
}

/// Connects to the relay path and returns the socket and its welcome.
async fn connect(server: &TestServer) -> (Ws, Value) {
    let url = format!("ws://{}/relay", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let welcome = next(&mut ws).await;
    let Message::Text(text) = welcome else {
        panic!("expected a text welcome, got {welcome:?}");
    };
    (ws, serde_json::from_str(&text).unwrap())
}

async fn next(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(common::EXPECT, ws.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("a valid frame");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

async fn expect_silence(ws: &mut Ws) {
    if let Ok(Some(message)) = tokio::time::timeout(common::SILENCE, ws.next()).await {
        panic!("expected silence, got {message:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_connection_is_welcomed_with_its_fd_as_the_swoole_server_does() {
    let server = relay_server().await;
    let (_first, welcome) = connect(&server).await;
    assert_eq!(keys(&welcome), ["fd", "type"]);
    assert_eq!(welcome["type"], "welcome");
    let fd = welcome["fd"].as_u64().expect("a number");
    let (_second, welcome) = connect(&server).await;
    assert_ne!(
        welcome["fd"].as_u64().unwrap(),
        fd,
        "each connection its own fd"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_reaches_every_relay_connection_the_sender_included_verbatim() {
    let server = relay_server().await;
    let (mut a, _) = connect(&server).await;
    let (mut b, _) = connect(&server).await;
    let (mut c, _) = connect(&server).await;
    // Not JSON: the relay does not read what it relays.
    a.send(Message::Text("hello {not json".into()))
        .await
        .unwrap();
    b.send(Message::Binary(vec![0, 255, 1])).await.unwrap();
    for ws in [&mut a, &mut b, &mut c] {
        let mut got = vec![next(ws).await, next(ws).await];
        got.sort_by_key(|m| matches!(m, Message::Binary(_)));
        assert_eq!(
            got,
            [
                Message::Text("hello {not json".into()),
                Message::Binary(vec![0, 255, 1])
            ]
        );
    }
    expect_silence(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_and_the_seed_protocol_do_not_hear_each_other() {
    let server = relay_server().await;
    let (mut relay, _) = connect(&server).await;
    let mut seed = Client::connect(&server).await;
    let mut other = Client::connect(&server).await;
    seed.send(json!({"type": "broadcast", "message": "to seed clients"}))
        .await;
    assert_eq!(other.recv().await["message"], "to seed clients");
    relay
        .send(Message::Text("to the relay".into()))
        .await
        .unwrap();
    assert_eq!(next(&mut relay).await, Message::Text("to the relay".into()));
    expect_silence(&mut relay).await;
    seed.expect_silence().await;
    other.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_connection_that_leaves_is_relayed_to_no_more() {
    let server = relay_server().await;
    let (mut a, _) = connect(&server).await;
    let (mut b, _) = connect(&server).await;
    a.send(Message::Text("both".into())).await.unwrap();
    assert_eq!(next(&mut b).await, Message::Text("both".into()));
    assert_eq!(next(&mut a).await, Message::Text("both".into()));
    b.close(None).await.unwrap();
    while let Some(Ok(_)) = b.next().await {}
    for n in 0..3 {
        a.send(Message::Text(format!("m{n}"))).await.unwrap();
        assert_eq!(next(&mut a).await, Message::Text(format!("m{n}")));
    }
    // Two deliveries for the first message, then one for each of the three.
    let metrics = common::http_get(server.addr, "/metrics").await;
    assert!(
        metrics.contains("roomcast_fanout_deliveries_total 5"),
        "{}",
        metrics
            .lines()
            .find(|l| l.starts_with("roomcast_fanout_deliveries_total"))
            .unwrap_or("")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_flood_is_closed_with_1008_like_a_seed_clients() {
    let server = start_server_with(|config| {
        config.relay_path = Some("/relay".into());
        config.rate_limit = 1.0;
        config.rate_burst = 5;
    })
    .await;
    let (mut flooder, _) = connect(&server).await;
    let (mut calm, _) = connect(&server).await;
    for n in 0..20 {
        flooder.send(Message::Text(format!("f{n}"))).await.unwrap();
    }
    let code = loop {
        match next(&mut flooder).await {
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            _ => continue,
        }
    };
    assert_eq!(code, Some(1008));
    // The burst went through to the others; the rest was dropped.
    let mut heard = 0;
    while let Ok(Some(Ok(Message::Text(_)))) =
        tokio::time::timeout(common::SILENCE, calm.next()).await
    {
        heard += 1;
    }
    assert!((1..=6).contains(&heard), "heard {heard}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_option_the_relay_path_is_an_ordinary_protocol_connection() {
    let server = start_server_with(|_| {}).await;
    let url = format!("ws://{}/relay", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let Message::Text(first) = next(&mut ws).await else {
        panic!("a text welcome");
    };
    let welcome: Value = serde_json::from_str(&first).unwrap();
    assert!(welcome["client_id"].is_string(), "{welcome}");
}
