//! History in cluster mode (`--history-size` with `--redis`): a room's history lives in Redis,
//! so a client recovers on any node and after its node restarted; a kept room's messages have
//! one order (their offsets) on every node; a joiner recovering while messages flow misses none
//! and gets none twice; a history Redis lost comes back with a new epoch; while Redis is away, a
//! node's own members still get the room's messages, without an offset.
//! (The single-node suite, tests/history.rs, also runs over three nodes in CI:
//! `ROOMCAST_TEST_CLUSTER=1 cargo test --test history`.)

mod common;

use std::time::Duration;

use common::history::{join_since, publish};
use common::redis::RedisServer;
use common::{http_get, http_json, start_server_with, Client, TestServer, EXPECT};
use serde_json::{json, Value};

const KEY: &str = "history-cluster-key";

async fn node(redis: &RedisServer) -> TestServer {
    let url = redis.url();
    start_server_with(|config| {
        config.redis = Some(url);
        config.api_key = Some(KEY.into());
        config.history_size = 100;
        config.history_ttl = Duration::from_secs(60);
    })
    .await
}

async fn nodes(redis: &RedisServer, count: usize) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..count {
        nodes.push(node(redis).await);
    }
    redis
        .wait_for_subscribers("roomcast:broadcast", count)
        .await;
    nodes
}

/// Reads until a frame of `kind`, skipping others (membership notices).
async fn recv_type(client: &mut Client, kind: &str) -> Value {
    loop {
        let frame = client.recv().await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

/// Reads `count` room messages and returns their (offset, n).
async fn room_messages(client: &mut Client, count: usize) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = recv_type(client, "room_message").await;
        got.push((
            frame["offset"].as_u64().expect("an offset"),
            frame["message"]["n"].as_u64().expect("n"),
        ));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node_exactly_what_it_missed_then_live_ones() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut publisher = Client::connect(&nodes[1]).await;
    join_since(&mut publisher, "news", json!({})).await;
    let mut reader = Client::connect(&nodes[0]).await;
    let joined = join_since(&mut reader, "news", json!({})).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    assert_eq!(joined["recovered"], false, "since {{}} recovers nothing");
    publish(&mut publisher, "news", 1, 0).await;
    assert_eq!(room_messages(&mut reader, 1).await, [(1, 0)]);
    reader.close().await;
    recv_type(&mut publisher, "member_left").await;

    publish(&mut publisher, "news", 10, 1).await;
    let mut back = Client::connect(&nodes[2]).await;
    let joined = join_since(&mut back, "news", json!({"offset": 1, "epoch": epoch})).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["offset"], 11);
    assert_eq!(joined["epoch"], epoch.as_str());
    let expected: Vec<(u64, u64)> = (1..=10).map(|n| (n + 1, n)).collect();
    assert_eq!(room_messages(&mut back, 10).await, expected);
    publish(&mut publisher, "news", 1, 11).await;
    assert_eq!(room_messages(&mut back, 1).await, [(12, 11)]);
    back.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_after_the_node_it_was_on_restarted() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut nodes = nodes(&redis, 2).await;
    let mut publisher = Client::connect(&nodes[1]).await;
    publisher.join("feed").await;
    let mut reader = Client::connect(&nodes[0]).await;
    let joined = join_since(&mut reader, "feed", json!({})).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    publish(&mut publisher, "feed", 2, 0).await;
    assert_eq!(room_messages(&mut reader, 2).await, [(1, 0), (2, 1)]);

    // Its node stops (the drain closes it with 1001) and comes back as a new process would.
    nodes.remove(0).stop().await;
    recv_type(&mut publisher, "member_left").await;
    publish(&mut publisher, "feed", 5, 2).await;
    let restarted = node(&redis).await;
    let mut back = Client::connect(&restarted).await;
    let joined = join_since(&mut back, "feed", json!({"offset": 2, "epoch": epoch})).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["offset"], 7);
    let expected: Vec<(u64, u64)> = (2..7).map(|n| (n + 1, n)).collect();
    assert_eq!(room_messages(&mut back, 5).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_rooms_messages_from_two_nodes_arrive_in_one_order_on_every_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut readers = Vec::new();
    for node in &nodes {
        let mut reader = Client::connect(node).await;
        join_since(&mut reader, "race", json!({})).await;
        readers.push(reader);
    }
    let mut first = Client::connect(&nodes[0]).await;
    let mut second = Client::connect(&nodes[1]).await;
    first.join("race").await;
    second.join("race").await;
    redis.wait_for_subscribers("roomcast:room:race", 3).await;
    // Both at once, from two nodes: 0..50 and 100..150.
    tokio::join!(
        publish(&mut first, "race", 50, 0),
        publish(&mut second, "race", 50, 100)
    );
    let mut orders = Vec::new();
    for reader in &mut readers {
        let got = room_messages(reader, 100).await;
        let offsets: Vec<u64> = got.iter().map(|(offset, _)| *offset).collect();
        assert_eq!(offsets, (1..=100).collect::<Vec<_>>(), "no gap, no repeat");
        // Each sender's messages in the order sent.
        for start in [0, 100] {
            let own: Vec<u64> = got
                .iter()
                .map(|(_, n)| *n)
                .filter(|n| (start..start + 50).contains(n))
                .collect();
            assert_eq!(own, (start..start + 50).collect::<Vec<_>>());
        }
        orders.push(got);
    }
    assert_eq!(orders[0], orders[1], "node A and node B saw one order");
    assert_eq!(orders[0], orders[2], "node A and node C saw one order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_recovering_while_messages_flow_misses_none_and_gets_none_twice() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut publisher = Client::connect(&nodes[0]).await;
    publisher.join("flow").await;
    // Within the default rate limit's burst (200): none of them is refused.
    const TOTAL: u64 = 150;
    let flow = tokio::spawn(async move {
        for n in 0..TOTAL {
            publisher
                .send(json!({"type": "room_message", "room": "flow", "message": {"n": n}}))
                .await;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        publisher
    });
    // A reader that leaves and rejoins, on another node each time, while the flow goes on.
    let mut reader = Client::connect(&nodes[1]).await;
    let joined = join_since(&mut reader, "flow", json!({})).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let mut seen = joined["offset"].as_u64().unwrap();
    let mut offsets = Vec::new();
    for round in 0..6 {
        for _ in 0..10 {
            let frame = recv_type(&mut reader, "room_message").await;
            offsets.push(frame["offset"].as_u64().unwrap());
            seen = *offsets.last().unwrap();
        }
        reader.close().await;
        tokio::time::sleep(Duration::from_millis(15)).await;
        reader = Client::connect(&nodes[round % 3]).await;
        let since = json!({"offset": seen, "epoch": epoch});
        let joined = join_since(&mut reader, "flow", since).await;
        assert_eq!(joined["recovered"], true, "{joined}");
    }
    let _publisher = flow.await.unwrap();
    // Everything after the first join: replayed or live, each once, in order.
    let deadline = tokio::time::Instant::now() + EXPECT;
    while offsets.last() != Some(&TOTAL) {
        assert!(tokio::time::Instant::now() < deadline, "got {offsets:?}");
        let frame = recv_type(&mut reader, "room_message").await;
        offsets.push(frame["offset"].as_u64().unwrap());
    }
    let first = offsets[0];
    assert_eq!(offsets, (first..=TOTAL).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_redis_lost_comes_back_with_a_new_epoch_and_is_not_recovered() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut publisher = Client::connect(&nodes[0]).await;
    publisher.join("lost").await;
    let mut reader = Client::connect(&nodes[1]).await;
    let joined = join_since(&mut reader, "lost", json!({})).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    publish(&mut publisher, "lost", 3, 0).await;
    assert_eq!(room_messages(&mut reader, 3).await.len(), 3);
    reader.close().await;
    recv_type(&mut publisher, "member_left").await;

    // Redis loses everything (as a restart without persistence would).
    assert_eq!(redis.command(&["FLUSHALL"]).await.as_deref(), Some("+OK"));
    publish(&mut publisher, "lost", 1, 3).await;
    let mut back = Client::connect(&nodes[1]).await;
    let joined = join_since(&mut back, "lost", json!({"offset": 3, "epoch": epoch})).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_ne!(
        joined["epoch"],
        epoch.as_str(),
        "a new history, a new epoch"
    );
    assert_eq!(joined["offset"], 1, "numbered afresh");
    back.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_command_and_api_read_the_clusters_history_on_any_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut publisher = Client::connect(&nodes[0]).await;
    publisher.join("log").await;
    publish(&mut publisher, "log", 4, 0).await;
    let mut member = Client::connect(&nodes[2]).await;
    member.join("log").await;
    member
        .send(json!({"type": "history", "room": "log", "limit": 2}))
        .await;
    let page = recv_type(&mut member, "history").await;
    assert_eq!(page["offset"], 4);
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["offset"], 3);
    assert_eq!(messages[1]["message"], json!({"n": 3}));
    assert_eq!(messages[1]["from"], publisher.id);

    let auth = format!("Authorization: Bearer {KEY}");
    let path = "/api/rooms/log/history?since=1&limit=2";
    let (status, body) = http_json(nodes[1].addr, "GET", path, &auth, "").await;
    assert_eq!(status, 200, "{body}");
    let offsets: Vec<&Value> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["offset"])
        .collect();
    assert_eq!(offsets, [&json!(2), &json!(3)]);
    assert_eq!(body["epoch"], page["epoch"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_a_kept_room_still_reaches_this_nodes_members_without_an_offset() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 1).await;
    let mut publisher = Client::connect(&nodes[0]).await;
    publisher.join("local").await;
    let mut reader = Client::connect(&nodes[0]).await;
    join_since(&mut reader, "local", json!({})).await;
    recv_type(&mut publisher, "member_joined").await;

    redis.kill();
    let deadline = tokio::time::Instant::now() + EXPECT;
    while !http_get(nodes[0].addr, "/metrics")
        .await
        .contains("roomcast_redis_connected 0")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never saw Redis go"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publisher
        .send(json!({"type": "room_message", "room": "local", "message": "still here"}))
        .await;
    let got = recv_type(&mut reader, "room_message").await;
    assert_eq!(got["message"], "still here");
    assert!(got.get("offset").is_none(), "not kept: no offset ({got})");
    let metrics = http_get(nodes[0].addr, "/metrics").await;
    assert!(
        metrics.contains("roomcast_redis_history_unkept_total 1"),
        "counted"
    );
    publisher.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_history_whose_epoch_hash_was_lost_alone_starts_afresh_and_keeps_new_messages() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut publisher = Client::connect(&nodes[0]).await;
    publisher.join("evicted").await;
    publish(&mut publisher, "evicted", 5, 0).await;
    // The hash goes (evicted, say) while the stream with offsets 1..5 stays.
    let removed = redis
        .command(&["DEL", "roomcast:history-meta:evicted"])
        .await;
    assert_eq!(removed.as_deref(), Some(":1"));
    let mut reader = Client::connect(&nodes[1]).await;
    join_since(&mut reader, "evicted", json!({})).await;
    recv_type(&mut publisher, "member_joined").await;
    publish(&mut publisher, "evicted", 2, 5).await;
    assert_eq!(room_messages(&mut reader, 2).await, [(1, 5), (2, 6)]);
    reader
        .send(json!({"type": "history", "room": "evicted", "limit": 10}))
        .await;
    let page = recv_type(&mut reader, "history").await;
    let kept: Vec<&Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["message"]["n"])
        .collect();
    assert_eq!(
        kept,
        [&json!(5), &json!(6)],
        "the old entries went with the old epoch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redis_refuses_to_keep_reaches_this_nodes_members_unkept_and_others_still_work() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 1).await;
    // The room's stream key holds something else: Redis refuses every append to it.
    let epoch = redis
        .command(&[
            "HSET",
            "roomcast:history-meta:broken",
            "epoch",
            "e",
            "top",
            "0",
        ])
        .await;
    assert_eq!(epoch.as_deref(), Some(":2"));
    let set = redis
        .command(&["SET", "roomcast:history:broken", "x"])
        .await;
    assert_eq!(set.as_deref(), Some("+OK"));
    let mut publisher = Client::connect(&nodes[0]).await;
    publisher.join("broken").await;
    publisher.join("fine").await;
    let mut reader = Client::connect(&nodes[0]).await;
    join_since(&mut reader, "broken", json!({})).await;
    recv_type(&mut publisher, "member_joined").await;
    // A refused append and a kept one, queued together, and a join waiting on its answer.
    publisher
        .send(json!({"type": "room_message", "room": "broken", "message": "refused"}))
        .await;
    publisher
        .send(json!({"type": "room_message", "room": "fine", "message": "kept"}))
        .await;
    reader
        .send(json!({"type": "join_room", "room": "fine", "since": {}}))
        .await;
    // Its answer and the refused message come in either order.
    let (mut joined, mut got) = (reader.recv().await, reader.recv().await);
    if joined["type"] != "room_joined" {
        std::mem::swap(&mut joined, &mut got);
    }
    assert_eq!(joined["type"], "room_joined", "{joined}");
    assert_eq!(joined["members"], 2, "{joined}");
    assert_eq!(got["type"], "room_message", "{got}");
    assert_eq!(got["message"], "refused");
    assert!(got.get("offset").is_none(), "not kept: no offset ({got})");
    let metrics = http_get(nodes[0].addr, "/metrics").await;
    assert!(
        metrics.contains("roomcast_redis_refused_total 1"),
        "counted"
    );
    assert!(metrics.contains("roomcast_redis_history_unkept_total 1"));
    publisher
        .send(json!({"type": "room_message", "room": "fine", "message": "later"}))
        .await;
    // "kept" too, if the reader's join reached Redis before it.
    let mut later = recv_type(&mut reader, "room_message").await;
    if later["message"] == "kept" {
        later = recv_type(&mut reader, "room_message").await;
    }
    assert_eq!(later["message"], "later");
    assert_eq!(
        later["offset"], 2,
        "the other room's history went on: {later}"
    );
}
