//! Per-connection limits: each shows the limit working and the documented refusal.

mod common;

use common::{assert_error, start_server_with, Client, RawClient};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_rate_limit_get_rate_limit_exceeded() {
    let server = start_server_with(|config| {
        config.rate_limit = 1.0;
        config.rate_burst = 3;
    })
    .await;
    let mut a = Client::connect(&server).await;
    for i in 0..4 {
        a.send(json!({"type": "set_metadata", "metadata": {"n": i}}))
            .await;
    }
    for i in 0..3 {
        assert_eq!(a.recv().await["metadata"]["n"], i, "within the burst");
    }
    assert_error(&a.recv().await, "Rate limit exceeded");
    // The connection stays, and the bucket refills at one message per second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    a.send(json!({"type": "set_metadata", "metadata": {"n": 9}}))
        .await;
    assert_eq!(a.recv().await["metadata"]["n"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sustained_flood_is_closed_with_1008_and_others_are_served() {
    let server = start_server_with(|config| {
        config.rate_limit = 1.0;
        config.rate_burst = 5;
    })
    .await;
    let mut flooder = Client::connect(&server).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.join("r").await;
    b.join("r").await;
    for _ in 0..20 {
        flooder.send_text("{}").await;
    }
    let close = flooder.recv_close(common::EXPECT).await;
    assert_eq!(common::code(&close), 1008);
    a.recv().await; // b joined
    a.send(json!({"type": "room_message", "room": "r", "message": "fine"}))
        .await;
    assert_eq!(b.recv().await["message"], "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_rate_limit_ten_thousand_malformed_messages_each_get_an_error() {
    let server = start_server_with(|config| config.rate_limit = 0.0).await;
    let mut bad = Client::connect(&server).await;
    let (mut a, mut b) = common::pair_in_room(&server, "r").await;
    // In bursts of 100, reading the replies in between: a client that never reads its
    // replies would be a slow consumer, which is another test.
    let sending = async {
        for _ in 0..100 {
            for _ in 0..100 {
                bad.send_text("{not json").await;
            }
            for _ in 0..100 {
                assert_error(&bad.recv().await, "Invalid message format");
            }
        }
        bad
    };
    let others = async {
        a.send(json!({"type": "room_message", "room": "r", "message": "unaffected"}))
            .await;
        assert_eq!(b.recv().await["message"], "unaffected");
    };
    let (mut bad, ()) = tokio::join!(sending, others);
    bad.join("still-open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_more_rooms_than_allowed_gets_too_many_rooms() {
    let server = start_server_with(|config| config.max_rooms_per_connection = 2).await;
    let mut a = Client::connect(&server).await;
    a.join("one").await;
    a.join("two").await;
    a.send(json!({"type": "join_room", "room": "three"})).await;
    assert_error(&a.recv().await, "Too many rooms");
    // Rejoining a room you are in is still the seed's silence, and leaving makes room.
    a.send(json!({"type": "join_room", "room": "one"})).await;
    a.expect_silence().await;
    a.send(json!({"type": "leave_room", "room": "one"})).await;
    a.join("three").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_name_over_the_limit_gets_room_name_too_long() {
    let server = start_server_with(|config| config.max_room_name_length = 8).await;
    let mut a = Client::connect(&server).await;
    a.join("12345678").await;
    a.send(json!({"type": "join_room", "room": "123456789"}))
        .await;
    assert_error(&a.recv().await, "Room name too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_over_the_limit_gets_metadata_too_large_and_keeps_the_old_metadata() {
    let server = start_server_with(|config| config.max_metadata_size = 64).await;
    let mut a = Client::connect(&server).await;
    a.send(json!({"type": "set_metadata", "metadata": {"name": "ann"}}))
        .await;
    assert_eq!(a.recv().await["metadata"], json!({"name": "ann"}));
    a.send(json!({"type": "set_metadata", "metadata": {"bio": "x".repeat(100)}}))
        .await;
    assert_error(&a.recv().await, "Metadata too large");
    a.send(json!({"type": "set_metadata", "metadata": {"age": 3}}))
        .await;
    assert_eq!(a.recv().await["metadata"], json!({"name": "ann", "age": 3}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_frame_size_limit_closes_with_1009() {
    let server = start_server_with(|config| {
        config.max_frame_size = 100;
        config.max_message_size = 10_000;
    })
    .await;
    let mut raw = RawClient::connect(&server).await;
    raw.send_frame(0x81, &[b' '; 200]).await;
    assert_eq!(raw.read_close_code().await, 1009);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_frames_may_make_a_message_up_to_the_message_limit() {
    let server = start_server_with(|config| {
        config.max_frame_size = 100;
        config.max_message_size = 10_000;
    })
    .await;
    let mut raw = RawClient::connect(&server).await;
    let text = json!({"type": "join_room", "room": "r".repeat(100)}).to_string();
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(50).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 { 0x1 } else { 0x0 };
        let fin = if i == chunks.len() - 1 { 0x80 } else { 0 };
        raw.send_frame(fin | opcode, chunk).await;
    }
    assert_eq!(
        raw.read_frame().await.unwrap().json()["type"],
        "room_joined"
    );
}

/// What a reader saw: broadcasts received, and the close code if the server closed it.
async fn read_broadcasts_for(mut reader: Client, window: std::time::Duration) -> (usize, u16) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + window;
    let mut received = 0;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, reader.ws.next()).await {
        match message {
            Ok(Message::Text(text)) if text.contains(r#""type":"broadcast""#) => received += 1,
            Ok(Message::Close(frame)) => {
                return (received, frame.map_or(1005, |f| u16::from(f.code)));
            }
            Ok(_) => {}
            Err(_) => return (received, 1006),
        }
    }
    (received, 0)
}

/// The red team's finding: one client sending its whole message burst (200) at the largest
/// message size (64 KiB) put 12.8 MiB at once into every other client's 1 MiB queue, and
/// prompt readers were closed with 1013 while the sender went unpunished. With the default
/// byte budget the sender is refused instead and every reader keeps up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_senders_burst_of_large_broadcasts_refuses_the_sender_not_its_prompt_readers() {
    let server = start_server_with(|_| {}).await; // the defaults, as the red team ran them
    let readers: Vec<_> = futures_util::future::join_all((0..10).map(|_| Client::connect(&server)))
        .await
        .into_iter()
        .map(|reader| {
            tokio::spawn(read_broadcasts_for(
                reader,
                std::time::Duration::from_secs(4),
            ))
        })
        .collect();
    let mut sender = Client::connect(&server).await;
    let filler = "x".repeat(65536 - 64);
    let message = json!({"type": "broadcast", "message": filler}).to_string();
    assert!(message.len() <= 65536);
    for _ in 0..200 {
        sender.send_text(&message).await;
    }
    let mut refused = 0;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        futures_util::StreamExt::next(&mut sender.ws),
    )
    .await
    {
        if frame
            .to_text()
            .unwrap_or("")
            .contains("Rate limit exceeded")
        {
            refused += 1;
        }
    }
    assert!(refused > 0, "the sender over its byte budget is refused");
    let delivered = 200 - refused;
    for reader in readers {
        let (received, closed) = reader.await.unwrap();
        assert_eq!(
            closed, 0,
            "a prompt reader was closed (received {received})"
        );
        assert_eq!(
            received, delivered,
            "each reader gets every accepted broadcast"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_broadcast_off_a_broadcast_is_refused_and_nobody_receives_it() {
    let server = start_server_with(|config| config.client_broadcast = false).await;
    let mut sender = Client::connect(&server).await;
    let mut other = Client::connect(&server).await;
    sender
        .send(json!({"type": "broadcast", "message": "to all"}))
        .await;
    assert_error(&sender.recv().await, "Broadcast is disabled");
    other.expect_silence().await;
    // Rooms still work for the same client.
    let (mut a, mut b) = common::pair_in_room(&server, "still-open").await;
    a.send(json!({"type": "room_message", "room": "still-open", "message": "hi"}))
        .await;
    assert_eq!(b.recv().await["message"], "hi");
}
