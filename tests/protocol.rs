//! One test per row of `shared/PROTOCOL.md`, against the real server over a real WebSocket.
//! Silences (who receives nothing) are asserted by watching for a short window.

mod common;

use common::{assert_error, keys, start_server, Client};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_carries_a_random_client_id_and_a_timestamp() {
    let server = start_server().await;
    let a = Client::connect(&server).await;
    let b = Client::connect(&server).await;
    assert_eq!(keys(&a.welcome), ["client_id", "timestamp", "type"]);
    assert!(a.id.starts_with("client_"), "{}", a.id);
    assert!(a.id.len() >= "client_".len() + 32, "unguessable: {}", a.id);
    assert_ne!(a.id, b.id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ts = a.welcome["timestamp"].as_u64().unwrap();
    assert!(ts.abs_diff(now) <= 2, "timestamp is Unix seconds: {ts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_json_gets_invalid_message_format_and_connection_stays() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send_text("this is not json").await;
    assert_error(&a.recv().await, "Invalid message format");
    a.send(json!({"type": "set_metadata", "metadata": {"k": 1}}))
        .await;
    assert_eq!(a.recv().await["type"], "metadata_updated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_that_is_not_an_object_gets_invalid_message_format() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    for text in ["[]", "[1,2]", "42", "\"broadcast\"", "null", "true", "{}"] {
        a.send_text(text).await;
        assert_error(&a.recv().await, "Invalid message format");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_without_type_gets_invalid_message_format() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send(json!({"room": "lobby"})).await;
    assert_error(&a.recv().await, "Invalid message format");
    a.send(json!({"type": null})).await;
    assert_error(&a.recv().await, "Invalid message format");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_gets_unknown_message_type_error() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send(json!({"type": "dance"})).await;
    assert_error(&a.recv().await, "Unknown message type: dance");
    a.send(json!({"type": ""})).await;
    assert_error(&a.recv().await, "Unknown message type: ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_string_type_gets_invalid_message_format() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    // PHP's loose comparison would treat `true` as "broadcast"; roomcast refuses it clearly.
    a.send(json!({"type": true, "message": "x"})).await;
    assert_error(&a.recv().await, "Invalid message format");
    a.send(json!({"type": 7})).await;
    assert_error(&a.recv().await, "Invalid message format");
    b.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_other_client_and_not_the_sender() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let mut c = Client::connect(&server).await;
    a.send(json!({"type": "broadcast", "message": "hello all"}))
        .await;
    for receiver in [&mut b, &mut c] {
        let got = receiver.recv().await;
        assert_eq!(keys(&got), ["from", "message", "timestamp", "type"]);
        assert_eq!(got["type"], "broadcast");
        assert_eq!(got["from"], a.id.as_str());
        assert_eq!(got["message"], "hello all");
    }
    a.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_clients_in_no_room() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.join("only-a").await;
    a.send(json!({"type": "broadcast", "message": "x"})).await;
    assert_eq!(b.recv().await["message"], "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_message_is_relayed_as_the_empty_string() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.send(json!({"type": "broadcast"})).await;
    assert_eq!(b.recv().await["message"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_string_message_is_relayed_verbatim() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let payload = json!({"text": "hi", "n": [1, 2.5, true, null], "nested": {"k": "v"}});
    a.send(json!({"type": "broadcast", "message": payload.clone()}))
        .await;
    assert_eq!(b.recv().await["message"], payload);
    a.send(json!({"type": "broadcast", "message": 42})).await;
    assert_eq!(b.recv().await["message"], 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_room_without_a_name_gets_room_name_required() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send(json!({"type": "join_room"})).await;
    assert_error(&a.recv().await, "Room name required");
    a.send(json!({"type": "join_room", "room": ""})).await;
    assert_error(&a.recv().await, "Room name required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_room_replies_room_joined_and_tells_the_other_members() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let mut outsider = Client::connect(&server).await;

    let first = a.join("lobby").await;
    assert_eq!(
        first,
        json!({"type": "room_joined", "room": "lobby", "members": 1})
    );

    let second = b.join("lobby").await;
    assert_eq!(
        second,
        json!({"type": "room_joined", "room": "lobby", "members": 2})
    );
    let notice = a.recv().await;
    assert_eq!(
        notice,
        json!({"type": "member_joined", "room": "lobby", "client_id": b.id, "total_members": 2})
    );
    // The joiner gets no member_joined about itself, outsiders get nothing.
    b.expect_silence().await;
    outsider.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_a_room_twice_sends_nothing_to_anyone() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.join("lobby").await;
    b.join("lobby").await;
    a.recv().await; // member_joined for b
    b.send(json!({"type": "join_room", "room": "lobby"})).await;
    b.expect_silence().await;
    a.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_room_tells_the_remaining_members_and_not_the_leaver() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let mut c = Client::connect(&server).await;
    a.join("lobby").await;
    b.join("lobby").await;
    c.join("lobby").await;
    a.recv().await; // b joined
    a.recv().await; // c joined
    b.recv().await; // c joined

    c.send(json!({"type": "leave_room", "room": "lobby"})).await;
    let expected =
        json!({"type": "member_left", "room": "lobby", "client_id": c.id, "total_members": 2});
    assert_eq!(a.recv().await, expected);
    assert_eq!(b.recv().await, expected);
    c.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_a_room_you_are_not_in_sends_nothing() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    b.join("lobby").await;
    a.send(json!({"type": "leave_room", "room": "lobby"})).await;
    a.send(json!({"type": "leave_room", "room": "no-such-room"}))
        .await;
    a.send(json!({"type": "leave_room"})).await;
    a.expect_silence().await;
    b.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_member_leaving_deletes_the_room() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.join("lobby").await;
    assert_eq!(server.server.router().room_size("lobby"), 1);
    a.send(json!({"type": "leave_room", "room": "lobby"})).await;
    a.send(json!({"type": "room_message", "room": "lobby", "message": "x"}))
        .await;
    assert_error(&a.recv().await, "Room does not exist");
    assert_eq!(server.server.router().counts().0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_message_to_a_missing_room_gets_room_does_not_exist() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send(json!({"type": "room_message", "room": "nowhere", "message": "x"}))
        .await;
    assert_error(&a.recv().await, "Room does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_message_from_a_non_member_gets_you_are_not_in_this_room() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    b.join("lobby").await;
    a.send(json!({"type": "room_message", "room": "lobby", "message": "x"}))
        .await;
    assert_error(&a.recv().await, "You are not in this room");
    b.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_message_reaches_the_other_members_only() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let mut outsider = Client::connect(&server).await;
    a.join("lobby").await;
    b.join("lobby").await;
    a.recv().await; // b joined
    outsider.join("elsewhere").await;

    a.send(json!({"type": "room_message", "room": "lobby", "message": "hi room"}))
        .await;
    let got = b.recv().await;
    assert_eq!(keys(&got), ["from", "message", "room", "timestamp", "type"]);
    assert_eq!(got["type"], "room_message");
    assert_eq!(got["room"], "lobby");
    assert_eq!(got["from"], a.id.as_str());
    assert_eq!(got["message"], "hi room");
    a.expect_silence().await;
    outsider.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_message_reaches_only_the_recipient() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let mut c = Client::connect(&server).await;
    a.send(json!({"type": "private_message", "to": b.id, "message": "psst"}))
        .await;
    let got = b.recv().await;
    assert_eq!(keys(&got), ["from", "message", "timestamp", "type"]);
    assert_eq!(got["type"], "private_message");
    assert_eq!(got["from"], a.id.as_str());
    assert_eq!(got["message"], "psst");
    a.expect_silence().await;
    c.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_message_to_an_unknown_id_gets_recipient_not_found() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send(json!({"type": "private_message", "to": "client_nobody", "message": "x"}))
        .await;
    assert_error(&a.recv().await, "Recipient not found");
    a.send(json!({"type": "private_message", "message": "x"}))
        .await;
    assert_error(&a.recv().await, "Recipient not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_message_to_yourself_is_delivered_to_yourself() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let to = a.id.clone();
    a.send(json!({"type": "private_message", "to": to, "message": "note to self"}))
        .await;
    let got = a.recv().await;
    assert_eq!(got["type"], "private_message");
    assert_eq!(got["from"], to.as_str());
    assert_eq!(got["message"], "note to self");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_metadata_merges_over_earlier_metadata_and_echoes_it() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.send(json!({"type": "set_metadata", "metadata": {"name": "ann", "age": 30}}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"type": "metadata_updated", "metadata": {"name": "ann", "age": 30}})
    );
    a.send(json!({"type": "set_metadata", "metadata": {"age": 31, "city": "Oslo"}}))
        .await;
    let merged = a.recv().await;
    assert_eq!(
        merged,
        json!({"type": "metadata_updated", "metadata": {"name": "ann", "age": 31, "city": "Oslo"}})
    );
    assert_eq!(keys(&merged), ["metadata", "type"]);
    b.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_metadata_is_sent_as_an_object() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send(json!({"type": "set_metadata"})).await;
    let reply = a.recv().await;
    assert_eq!(reply, json!({"type": "metadata_updated", "metadata": {}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_is_not_an_object_gets_an_error_and_connection_stays() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send(json!({"type": "set_metadata", "metadata": "nope"}))
        .await;
    assert_error(&a.recv().await, "Metadata must be an object");
    a.send(json!({"type": "set_metadata", "metadata": [1, 2]}))
        .await;
    assert_error(&a.recv().await, "Metadata must be an object");
    a.send(json!({"type": "set_metadata", "metadata": {"ok": true}}))
        .await;
    assert_eq!(a.recv().await["metadata"], json!({"ok": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_room_or_recipient_gets_an_error_instead_of_crashing() {
    // The seed dies on these (an uncaught PHP TypeError); roomcast answers and keeps serving.
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send(json!({"type": "join_room", "room": ["a"]})).await;
    assert_error(&a.recv().await, "Room name must be a string");
    a.send(json!({"type": "room_message", "room": {"x": 1}, "message": "m"}))
        .await;
    assert_error(&a.recv().await, "Room name must be a string");
    a.send(json!({"type": "private_message", "to": ["x"], "message": "m"}))
        .await;
    assert_error(&a.recv().await, "Recipient id must be a string");
    a.join("still-alive").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_name_zero_is_accepted() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    assert_eq!(a.join("0").await["room"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_leaves_all_its_rooms_with_member_left() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let c = Client::connect(&server).await;
    let c_id = c.id.clone();
    let mut c = c;
    a.join("one").await;
    b.join("two").await;
    c.join("one").await;
    c.join("two").await;
    c.join("solo").await;
    a.recv().await; // c joined one
    b.recv().await; // c joined two
    c.close().await;
    assert_eq!(
        a.recv().await,
        json!({"type": "member_left", "room": "one", "client_id": c_id, "total_members": 1})
    );
    assert_eq!(
        b.recv().await,
        json!({"type": "member_left", "room": "two", "client_id": c_id, "total_members": 1})
    );
    // The room only c was in is gone, and c is no longer an address.
    assert_eq!(server.server.router().room_size("solo"), 0);
    a.send(json!({"type": "private_message", "to": c_id, "message": "x"}))
        .await;
    assert_error(&a.recv().await, "Recipient not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tcp_connection_is_cleaned_up_like_a_close() {
    let server = start_server().await;
    let (mut a, b) = common::pair_in_room(&server, "r").await;
    let b_id = b.id.clone();
    drop(b); // no close frame: the TCP connection just goes away
    assert_eq!(
        a.recv().await,
        json!({"type": "member_left", "room": "r", "client_id": b_id, "total_members": 1})
    );
    let deadline = std::time::Instant::now() + common::EXPECT;
    while server.server.router().counts().1 != 1 {
        assert!(std::time::Instant::now() < deadline, "directory cleaned up");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_handled_like_text_frames() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    // Ratchet hands binary messages to the same handler; so does roomcast.
    let bytes = json!({"type": "join_room", "room": "bin"})
        .to_string()
        .into_bytes();
    a.ws.send(Message::Binary(bytes)).await.unwrap();
    assert_eq!(a.recv().await["type"], "room_joined");
    a.ws.send(Message::Binary(vec![0xff, 0x00, 0x80]))
        .await
        .unwrap();
    assert_error(&a.recv().await, "Invalid message format");
}

/// The next text frame exactly as the server wrote it (not parsed), skipping pings.
async fn recv_text(client: &mut Client) -> String {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let next = tokio::time::timeout(common::EXPECT, client.ws.next())
            .await
            .expect("a message within the deadline")
            .expect("connection open")
            .expect("valid frame");
        match next {
            Message::Text(text) => return text,
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_message_is_relayed_byte_for_byte() {
    let server = start_server().await;
    let (mut a, mut b) = common::pair_in_room(&server, "r").await;
    a.send_text(r#"{"type":"room_message","room":"r","message":1E5}"#)
        .await;
    let text = recv_text(&mut b).await;
    assert!(text.contains(r#","message":1E5,"#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_decimal_is_not_rounded() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.send_text(r#"{"type":"broadcast","message":3.141592653589793238}"#)
        .await;
    let text = recv_text(&mut b).await;
    assert!(
        text.contains(r#","message":3.141592653589793238,"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integer_beyond_64_bits_is_relayed() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let message = format!(
        r#"{{"type":"private_message","to":"{}","message":-123456789012345678901234567890}}"#,
        b.id
    );
    a.send_text(&message).await;
    let text = recv_text(&mut b).await;
    assert!(text.starts_with(r#"{"type":"private_message","#), "{text}");
    assert!(
        text.contains(r#","message":-123456789012345678901234567890,"#),
        "{text}"
    );
    a.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_message_keeps_its_spacing_and_escapes_as_sent() {
    let server = start_server().await;
    let (mut a, mut b) = common::pair_in_room(&server, "r").await;
    let message = r#"{ "price" : 1.50, "tags" : ["caf\u00e9", "a\/b"] }"#;
    a.send_text(&format!(
        r#"{{"type":"room_message","room":"r","message": {message} }}"#
    ))
    .await;
    let text = recv_text(&mut b).await;
    assert!(
        text.contains(&format!(r#","message":{message},"#)),
        "{text}"
    );
    a.send_text(r#"{"type":"room_message","room":"r","message":"caf\u00e9 \ud83d\ude00"}"#)
        .await;
    let text = recv_text(&mut b).await;
    assert!(
        text.contains(r#","message":"caf\u00e9 \ud83d\ude00","#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_duplicate_key_wins() {
    let server = start_server().await;
    let (mut a, mut b) = common::pair_in_room(&server, "r").await;
    // type: the first says "dance", the last room_message; room: the first names a room
    // nobody is in.
    a.send_text(
        r#"{"type":"dance","room":"elsewhere","type":"room_message","message":"one","room":"r","message":"two"}"#,
    )
    .await;
    let got = b.recv().await;
    assert_eq!(got["type"], "room_message", "{got}");
    assert_eq!(got["room"], "r", "{got}");
    assert_eq!(got["message"], "two", "{got}");
    a.send_text(r#"{"type":"join_room","type":"dance"}"#).await;
    assert_error(&a.recv().await, "Unknown message type: dance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_numbers_are_echoed_as_sent() {
    let server = start_server().await;
    let mut a = Client::connect(&server).await;
    a.send_text(
        r#"{"type":"set_metadata","metadata":{"score":1E5,"pi":3.141592653589793238,"id":123456789012345678901234567890}}"#,
    )
    .await;
    assert_eq!(
        recv_text(&mut a).await,
        r#"{"type":"metadata_updated","metadata":{"score":1E5,"pi":3.141592653589793238,"id":123456789012345678901234567890}}"#
    );
    // A later merge keeps the untouched values as they were; within one update the last
    // value of a repeated key wins.
    a.send_text(r#"{"type":"set_metadata","metadata":{"score":2.50,"score":3.0E0}}"#)
        .await;
    assert_eq!(
        recv_text(&mut a).await,
        r#"{"type":"metadata_updated","metadata":{"score":3.0E0,"pi":3.141592653589793238,"id":123456789012345678901234567890}}"#
    );
}
