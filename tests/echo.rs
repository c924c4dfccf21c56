//! `--echo-path`: the raw echo endpoint for RFC 6455 conformance suites.

mod common;

use common::{start_server_with, RawClient};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_path_returns_each_message_with_its_opcode_and_no_welcome() {
    let server = start_server_with(|config| config.echo_path = Some("/echo".into())).await;
    let url = format!("ws://{}/echo", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text("not even json".into()))
        .await
        .unwrap();
    ws.send(Message::Binary(vec![0, 159, 146, 150]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("not even json".into()),
        "no welcome first, the text back"
    );
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Binary(vec![0, 159, 146, 150])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_path_reassembles_fragments_like_the_protocol_path() {
    let server = start_server_with(|config| config.echo_path = Some("/echo".into())).await;
    // RawClient expects a welcome: the protocol path still sends one, the echo path does not.
    let mut protocol = RawClient::connect(&server).await;
    protocol.send_frame(0x89, b"p").await;
    assert_eq!(protocol.read_frame().await.unwrap().opcode, 0xA);

    let url = format!("ws://{}/echo", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // The server may close before the whole frame is written; either way is fine here.
    let _ = ws.send(Message::Text("x".repeat(100_000))).await;
    let echoed = ws.next().await.unwrap();
    // 100 KB is over the default 64 KiB message limit: the same limit, the same 1009.
    match echoed {
        Ok(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_option_the_echo_path_is_an_ordinary_protocol_connection() {
    let server = start_server_with(|_| {}).await;
    let url = format!("ws://{}/echo", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let first = ws.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("\"welcome\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_connections_are_closed_with_1001_at_shutdown_like_protocol_ones() {
    let server = start_server_with(|config| {
        config.echo_path = Some("/echo".into());
        // Far longer than the test waits: the close must come from the drain, not the timeout.
        config.drain_timeout = std::time::Duration::from_secs(30);
    })
    .await;
    let url = format!("ws://{}/echo", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text("before".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("before".into())
    );
    server.shutdown.cancel();
    let next = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
        .await
        .expect("a close frame within 5 s of the shutdown");
    match next {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1001);
            assert_eq!(frame.reason, "server shutting down");
        }
        other => panic!("expected close 1001, got {other:?}"),
    }
}
