//! Helpers of the history suites (tests/history.rs, tests/history_cluster.rs).

use serde_json::{json, Value};

use super::Client;

/// Joins `room` with `since` and returns the `room_joined` (the next frame, which must be it).
pub async fn join_since(client: &mut Client, room: &str, since: Value) -> Value {
    client
        .send(json!({"type": "join_room", "room": room, "since": since}))
        .await;
    let joined = client.recv().await;
    assert_eq!(joined["type"], "room_joined", "{joined}");
    joined
}

/// Sends `count` room messages `{"n": from..}` from `sender` (a member), and returns once they
/// are in the room's history: its `history` request, answered after them, is the barrier.
pub async fn publish(sender: &mut Client, room: &str, count: u64, from: u64) {
    for n in from..from + count {
        sender
            .send(json!({"type": "room_message", "room": room, "message": {"n": n}}))
            .await;
    }
    sender
        .send(json!({"type": "history", "room": room, "limit": 1}))
        .await;
    loop {
        if sender.recv().await["type"] == "history" {
            return;
        }
    }
}
