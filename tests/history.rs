//! Room history and recovery on one node (`--history-size`, `--history-ttl`): a client that
//! rejoins with `since` gets exactly what it missed, in order, then live messages, or an
//! explicit `recovered: false` with nothing replayed; the `history` command; seed clients see
//! the frames they always saw.

mod common;

use std::time::Duration;

use common::history::{join_since, publish};
use common::{keys, start_server_with, Client, TestServer};
use serde_json::{json, Value};

async fn server(size: usize, ttl: Duration, max_recovery: usize) -> TestServer {
    start_server_with(|config| {
        config.history_size = size;
        config.history_ttl = ttl;
        config.history_recovery_max = max_recovery;
    })
    .await
}

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_missed_ten_messages_recovers_exactly_those_in_order_then_live_ones() {
    let server = server(100, MINUTE, 1000).await;
    let mut publisher = Client::connect(&server).await;
    publisher.join("news").await;
    let mut reader = Client::connect(&server).await;
    let joined = join_since(&mut reader, "news", json!({})).await;
    assert_eq!(
        keys(&joined),
        ["epoch", "members", "offset", "recovered", "room", "type"]
    );
    assert_eq!(joined["offset"], 0);
    assert_eq!(joined["recovered"], false);
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    assert_eq!(publisher.recv().await["type"], "member_joined");
    // One message while it is there: it comes with its offset.
    publish(&mut publisher, "news", 1, 0).await;
    let live = reader.recv().await;
    assert_eq!(live["offset"], 1, "{live}");
    reader.close().await;
    assert_eq!(publisher.recv().await["type"], "member_left");

    publish(&mut publisher, "news", 10, 1).await;
    let mut back = Client::connect(&server).await;
    let joined = join_since(&mut back, "news", json!({"offset": 1, "epoch": epoch})).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["offset"], 11);
    assert_eq!(joined["epoch"], epoch.as_str());
    for n in 1..=10u64 {
        let missed = back.recv().await;
        assert_eq!(missed["type"], "room_message", "{missed}");
        assert_eq!(missed["message"], json!({"n": n}));
        assert_eq!(missed["offset"], n + 1);
        assert_eq!(missed["from"], publisher.id);
    }
    assert_eq!(publisher.recv().await["type"], "member_joined");
    publish(&mut publisher, "news", 1, 11).await;
    let live = back.recv().await;
    assert_eq!(live["message"], json!({"n": 11}));
    assert_eq!(live["offset"], 12);
    back.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_larger_than_the_history_is_not_recovered_and_nothing_is_replayed() {
    let server = server(5, MINUTE, 1000).await;
    let mut publisher = Client::connect(&server).await;
    publisher.join("busy").await;
    let mut first = Client::connect(&server).await;
    let epoch = join_since(&mut first, "busy", json!({})).await["epoch"].clone();
    first.close().await;
    publish(&mut publisher, "busy", 8, 0).await;
    let mut back = Client::connect(&server).await;
    let joined = join_since(&mut back, "busy", json!({"offset": 0, "epoch": epoch})).await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(joined["offset"], 8);
    back.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_missed_messages_than_the_recovery_cap_are_not_recovered() {
    let server = server(100, MINUTE, 3).await;
    let mut publisher = Client::connect(&server).await;
    let epoch = join_since(&mut publisher, "capped", json!({})).await["epoch"].clone();
    let mut sender = Client::connect(&server).await;
    sender.join("capped").await;
    publish(&mut sender, "capped", 4, 0).await;
    let mut back = Client::connect(&server).await;
    let joined = join_since(&mut back, "capped", json!({"offset": 0, "epoch": epoch})).await;
    assert_eq!(joined["recovered"], false, "4 missed, at most 3 replayed");
    back.expect_silence().await;
    let mut close = Client::connect(&server).await;
    let joined = join_since(&mut close, "capped", json!({"offset": 1, "epoch": epoch})).await;
    assert_eq!(joined["recovered"], true, "3 missed");
    for offset in 2..=4 {
        assert_eq!(close.recv().await["offset"], offset);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_history_or_another_epoch_is_not_recovered() {
    let server = server(100, Duration::from_secs(1), 1000).await;
    let mut sender = Client::connect(&server).await;
    let epoch = join_since(&mut sender, "brief", json!({})).await["epoch"].clone();
    publish(&mut sender, "brief", 2, 0).await;
    let mut other = Client::connect(&server).await;
    let joined = join_since(&mut other, "brief", json!({"offset": 0, "epoch": "not-it"})).await;
    assert_eq!(joined["recovered"], false);
    other.expect_silence().await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let mut late = Client::connect(&server).await;
    let joined = join_since(&mut late, "brief", json!({"offset": 0, "epoch": epoch})).await;
    assert_eq!(joined["recovered"], false, "expired");
    late.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_clients_see_the_seed_frames_byte_for_byte_with_history_on() {
    let server = server(100, MINUTE, 1000).await;
    let mut seed = Client::connect(&server).await;
    let joined = seed.join("plain").await;
    assert_eq!(keys(&joined), ["members", "room", "type"]);
    let mut opted = Client::connect(&server).await;
    join_since(&mut opted, "plain", json!({})).await;
    assert_eq!(seed.recv().await["type"], "member_joined");
    opted
        .send(json!({"type": "room_message", "room": "plain", "message": "hi"}))
        .await;
    let message = seed.recv().await;
    assert_eq!(
        keys(&message),
        ["from", "message", "room", "timestamp", "type"]
    );
    seed.send(json!({"type": "room_message", "room": "plain", "message": "yo"}))
        .await;
    let message = opted.recv().await;
    assert_eq!(
        keys(&message),
        ["from", "message", "offset", "room", "timestamp", "type"]
    );
    assert_eq!(message["offset"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_gives_members_the_last_messages_and_others_the_seed_refusals() {
    let server = server(3, MINUTE, 1000).await;
    let mut member = Client::connect(&server).await;
    member.join("log").await;
    publish(&mut member, "log", 5, 0).await;
    member
        .send(json!({"type": "history", "room": "log", "limit": 2}))
        .await;
    let history = member.recv().await;
    assert_eq!(
        keys(&history),
        ["epoch", "messages", "offset", "room", "type"]
    );
    assert_eq!(history["offset"], 5);
    let messages = history["messages"].as_array().unwrap();
    let seen: Vec<(Value, Value)> = messages
        .iter()
        .map(|m| (m["message"].clone(), m["offset"].clone()))
        .collect();
    assert_eq!(
        seen,
        [(json!({"n": 3}), json!(4)), (json!({"n": 4}), json!(5))]
    );
    // Without a limit: all that is kept (3).
    member.send(json!({"type": "history", "room": "log"})).await;
    assert_eq!(member.recv().await["messages"].as_array().unwrap().len(), 3);

    let mut outsider = Client::connect(&server).await;
    outsider
        .send(json!({"type": "history", "room": "log"}))
        .await;
    common::assert_error(&outsider.recv().await, "You are not in this room");
    outsider
        .send(json!({"type": "history", "room": "nowhere"}))
        .await;
    common::assert_error(&outsider.recv().await, "Room does not exist");
    outsider
        .send(json!({"type": "history", "room": "log", "limit": 0}))
        .await;
    common::assert_error(&outsider.recv().await, "Limit must be a positive integer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_history_since_changes_nothing_and_history_is_an_unknown_type() {
    let server = common::start_server().await;
    let mut client = Client::connect(&server).await;
    client
        .send(json!({"type": "join_room", "room": "r", "since": {}}))
        .await;
    assert_eq!(keys(&client.recv().await), ["members", "room", "type"]);
    client.send(json!({"type": "history", "room": "r"})).await;
    common::assert_error(&client.recv().await, "Unknown message type: history");
    client
        .send(json!({"type": "join_room", "room": "s", "since": 5}))
        .await;
    common::assert_error(
        &client.recv().await,
        "Since must be {} or an object with offset and epoch",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_reads_a_rooms_history_last_or_after_an_offset() {
    let server = start_server_with(|config| {
        config.history_size = 10;
        config.history_ttl = MINUTE;
        config.api_key = Some("history-key".into());
    })
    .await;
    let mut member = Client::connect(&server).await;
    member.join("audit").await;
    publish(&mut member, "audit", 4, 0).await;
    let auth = "Authorization: Bearer history-key";
    let get = |path: &'static str| common::http_json(server.addr, "GET", path, auth, "");
    let (status, page) = get("/api/rooms/audit/history?limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(keys(&page), ["epoch", "messages", "offset", "room"]);
    assert_eq!(page["offset"], 4);
    let offsets: Vec<&Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["offset"])
        .collect();
    assert_eq!(offsets, [&json!(3), &json!(4)]);
    let (_, after) = get("/api/rooms/audit/history?since=1&limit=2").await;
    let offsets: Vec<&Value> = after["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["offset"])
        .collect();
    assert_eq!(offsets, [&json!(2), &json!(3)]);
    assert_eq!(after["messages"][0]["message"], json!({"n": 1}));
    let (status, _) = get("/api/rooms/audit/history?limit=nope").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_page_after_an_offset_past_the_top_is_empty_however_large_the_offset() {
    let server = start_server_with(|config| {
        config.history_size = 10;
        config.history_ttl = MINUTE;
        config.api_key = Some("history-key".into());
    })
    .await;
    let mut member = Client::connect(&server).await;
    member.join("far").await;
    publish(&mut member, "far", 2, 0).await;
    let auth = "Authorization: Bearer history-key";
    // Past 10^14 a Lua number prints as 1e+14: the offset must still be read as a number.
    for since in ["2", "100000000000000", "18446744073709551615"] {
        let path = format!("/api/rooms/far/history?since={since}");
        let (status, page) = common::http_json(server.addr, "GET", &path, auth, "").await;
        assert_eq!(status, 200, "since={since}: {page}");
        assert_eq!(page["messages"], json!([]), "since={since}");
        assert_eq!(page["offset"], 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_name_starts_with_a_closing_brace_keeps_and_recovers_its_history() {
    // On a Redis Cluster a room's keys share a hash tag made of its name: `}` first must not
    // leave the tag empty (each key in a slot of its own, every script refused).
    let server = server(100, MINUTE, 1000).await;
    let room = "}odd{room";
    let mut publisher = Client::connect(&server).await;
    publisher.join(room).await;
    let mut reader = Client::connect(&server).await;
    let joined = join_since(&mut reader, room, json!({})).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    assert_eq!(publisher.recv().await["type"], "member_joined");
    reader.close().await;
    assert_eq!(publisher.recv().await["type"], "member_left");
    publish(&mut publisher, room, 3, 0).await;
    let mut back = Client::connect(&server).await;
    let joined = join_since(&mut back, room, json!({"offset": 0, "epoch": epoch})).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    for n in 0..3u64 {
        let missed = back.recv().await;
        assert_eq!(missed["message"], json!({"n": n}), "{missed}");
        assert_eq!(missed["offset"], n + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_history_is_404_with_history_off() {
    let server = start_server_with(|config| config.api_key = Some("k".into())).await;
    let (status, answer) = common::http_json(
        server.addr,
        "GET",
        "/api/rooms/x/history",
        "X-API-Key: k",
        "",
    )
    .await;
    assert_eq!(status, 404, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_matching_a_history_rooms_pattern_keep_their_own_size_or_none() {
    let server = start_server_with(|config| {
        config.history_size = 100;
        config.history_ttl = MINUTE;
        config.history_rooms = vec![
            roomcast::config::HistoryRoom {
                pattern: "audit:*".into(),
                size: 2,
                ttl: MINUTE,
            },
            roomcast::config::HistoryRoom {
                pattern: "ephemeral".into(),
                size: 0,
                ttl: Duration::ZERO,
            },
        ];
    })
    .await;
    let mut member = Client::connect(&server).await;
    member.join("audit:payments").await;
    publish(&mut member, "audit:payments", 3, 0).await;
    member
        .send(json!({"type": "history", "room": "audit:payments"}))
        .await;
    let history = member.recv().await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        2,
        "{history}"
    );
    assert_eq!(history["offset"], 3);
    // No history at all for `ephemeral`: a join with since is the seed's join.
    let mut opted = Client::connect(&server).await;
    let joined = join_since(&mut opted, "ephemeral", json!({})).await;
    assert_eq!(keys(&joined), ["members", "room", "type"]);
    // Elsewhere the flags' size.
    let joined = join_since(&mut opted, "general", json!({})).await;
    assert_eq!(joined["recovered"], false);
}
