//! Several nodes on one Redis (`--redis`): room messages and broadcasts reach members on every
//! node, exactly once, without the sender; private messages find a client or a user's
//! connections on any node, and "not found" means nobody anywhere; the server API publishes from
//! any node; a node subscribes to a room only while it has members; Redis going away and coming
//! back empty.
//! Each test starts its own redis-server on a free port and three roomcast nodes.

mod common;

use std::time::Duration;

use common::app_stub::{Answer, AppStub};
use common::redis::RedisServer;
use common::{http_json, start_server_with, Client, TestServer, EXPECT};
use serde_json::{json, Value};

const KEY: &str = "cluster-key";
const SECRET: &str = "cluster-secret-that-is-long-enough";

async fn nodes(redis: &RedisServer, count: usize) -> Vec<TestServer> {
    nodes_with(redis, count, |_| {}).await
}

async fn nodes_with(
    redis: &RedisServer,
    count: usize,
    tweak: impl Fn(&mut roomcast::Config),
) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..count {
        let url = redis.url();
        nodes.push(
            start_server_with(|config| {
                config.redis = Some(url);
                config.api_key = Some(KEY.into());
                tweak(config);
            })
            .await,
        );
    }
    // Every node subscribes to the broadcast channel once connected.
    redis
        .wait_for_subscribers("roomcast:broadcast", count)
        .await;
    nodes
}

/// Joins `room` and reads what the join sends back (room_joined) to this client; returns the
/// room's member count it reported.
async fn join(client: &mut Client, room: &str) -> u64 {
    common::joined_members(client, room).await
}

/// Reads the `member_joined` notices of `joiners`, in order, with the counts they report.
async fn heard_join_of(client: &mut Client, joiners: &[(&str, u64)]) {
    for (joiner, total) in joiners {
        let notice = client.recv().await;
        assert_eq!(notice["type"], "member_joined", "{notice}");
        assert_eq!(notice["client_id"], *joiner);
        assert_eq!(notice["total_members"], *total, "{notice}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_message_reaches_its_members_on_every_node_once_and_not_the_sender() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut sender = Client::connect(&nodes[0]).await;
    let mut same_node = Client::connect(&nodes[0]).await;
    let mut on_b = Client::connect(&nodes[1]).await;
    let mut on_c = Client::connect(&nodes[2]).await;
    let mut outsider = Client::connect(&nodes[1]).await;
    join(&mut sender, "chat").await;
    join(&mut same_node, "chat").await;
    join(&mut on_b, "chat").await;
    join(&mut on_c, "chat").await;
    redis.wait_for_subscribers("roomcast:room:chat", 3).await;
    let (s, b, c) = (same_node.id.clone(), on_b.id.clone(), on_c.id.clone());
    heard_join_of(&mut sender, &[(&s, 2), (&b, 3), (&c, 4)]).await;
    heard_join_of(&mut same_node, &[(&b, 3), (&c, 4)]).await;
    heard_join_of(&mut on_b, &[(&c, 4)]).await;

    sender
        .send(json!({"type": "room_message", "room": "chat", "message": {"n": 1}}))
        .await;
    for member in [&mut same_node, &mut on_b, &mut on_c] {
        let got = member.recv().await;
        assert_eq!(got["type"], "room_message");
        assert_eq!(got["room"], "chat");
        assert_eq!(got["from"], sender.id);
        assert_eq!(got["message"], json!({"n": 1}));
        member.expect_silence().await; // exactly once
    }
    sender.expect_silence().await;
    outsider.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_every_client_on_every_node_but_the_sender() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut sender = Client::connect(&nodes[1]).await;
    let mut others = Vec::new();
    for node in &nodes {
        others.push(Client::connect(node).await);
    }
    sender
        .send(json!({"type": "broadcast", "message": "to all"}))
        .await;
    for other in &mut others {
        let got = other.recv().await;
        assert_eq!(got["type"], "broadcast");
        assert_eq!(got["from"], sender.id);
        assert_eq!(got["message"], "to all");
        other.expect_silence().await;
    }
    sender.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_publishes_from_any_node_to_members_on_all_of_them() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut on_a = Client::connect(&nodes[0]).await;
    let mut on_c = Client::connect(&nodes[2]).await;
    join(&mut on_a, "orders").await;
    join(&mut on_c, "orders").await;
    redis.wait_for_subscribers("roomcast:room:orders", 2).await;
    let c = on_c.id.clone();
    heard_join_of(&mut on_a, &[(&c, 2)]).await;
    // Node B has no member: the app's publish still reaches A's and C's.
    let auth = format!("Authorization: Bearer {KEY}");
    let body = json!({"room": "orders", "message": {"order": 42}}).to_string();
    let (status, _) = http_json(nodes[1].addr, "POST", "/api/publish", &auth, &body).await;
    assert_eq!(status, 200);
    for member in [&mut on_a, &mut on_c] {
        let got = member.recv().await;
        assert_eq!(got["type"], "room_message");
        assert_eq!(got["from"], "server");
        assert_eq!(got["message"], json!({"order": 42}));
    }
    let body = json!({"message": "maintenance at noon", "from": "ops"}).to_string();
    let (status, _) = http_json(nodes[1].addr, "POST", "/api/broadcast", &auth, &body).await;
    assert_eq!(status, 200);
    for member in [&mut on_a, &mut on_c] {
        let got = member.recv().await;
        assert_eq!(got["type"], "broadcast");
        assert_eq!(got["from"], "ops");
        assert_eq!(got["message"], "maintenance at noon");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_subscribes_to_a_room_only_while_it_has_members_there() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let channel = "roomcast:room:lobby";
    assert_eq!(redis.subscribers(channel).await, 0);
    let mut first = Client::connect(&nodes[0]).await;
    let mut second = Client::connect(&nodes[0]).await;
    join(&mut first, "lobby").await;
    join(&mut second, "lobby").await;
    redis.wait_for_subscribers(channel, 1).await;
    let mut elsewhere = Client::connect(&nodes[1]).await;
    join(&mut elsewhere, "lobby").await;
    redis.wait_for_subscribers(channel, 2).await;
    // The first node keeps its subscription until its last member leaves.
    first
        .send(json!({"type": "leave_room", "room": "lobby"}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(redis.subscribers(channel).await, 2);
    second.close().await;
    redis.wait_for_subscribers(channel, 1).await;
    elsewhere
        .send(json!({"type": "leave_room", "room": "lobby"}))
        .await;
    redis.wait_for_subscribers(channel, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_senders_messages_arrive_in_order_on_other_nodes() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut sender = Client::connect(&nodes[0]).await;
    let mut reader = Client::connect(&nodes[1]).await;
    join(&mut sender, "seq").await;
    join(&mut reader, "seq").await;
    redis.wait_for_subscribers("roomcast:room:seq", 2).await;
    for n in 0..150 {
        sender
            .send(json!({"type": "room_message", "room": "seq", "message": n}))
            .await;
    }
    for n in 0..150 {
        assert_eq!(reader.recv().await["message"], n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_node_serves_its_own_members_and_after_redis_returns_empty_all_again() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let port = redis.addr.port();
    let nodes = nodes(&redis, 2).await;
    let (mut sender, mut local) = common::pair_in_room(&nodes[0], "ops").await;
    let mut remote = Client::connect(&nodes[1]).await;
    assert_eq!(join(&mut remote, "ops").await, 3);
    redis.wait_for_subscribers("roomcast:room:ops", 2).await;
    let r = remote.id.clone();
    heard_join_of(&mut sender, &[(&r, 3)]).await;
    heard_join_of(&mut local, &[(&r, 3)]).await;

    redis.kill();
    sender
        .send(json!({"type": "room_message", "room": "ops", "message": "during the outage"}))
        .await;
    assert_eq!(local.recv().await["message"], "during the outage");

    // Redis comes back with nothing: the nodes reconnect and subscribe again by themselves.
    let redis = RedisServer::start_on(port).await;
    redis.wait_for_subscribers("roomcast:room:ops", 2).await;
    sender
        .send(json!({"type": "room_message", "room": "ops", "message": "after"}))
        .await;
    assert_eq!(local.recv().await["message"], "after");
    // The outage's message may or may not have made it; "after" must.
    tokio::time::timeout(EXPECT, async {
        while remote.recv().await["message"] != "after" {}
    })
    .await
    .expect("the remote member gets the message sent after Redis came back");
    let metrics = common::http_get(nodes[0].addr, "/metrics").await;
    assert!(metrics.contains("roomcast_redis_connected 1"), "{metrics}");
}

/// Waits until a node has subscribed to the channel of `client`, which makes it reachable.
async fn reachable(redis: &RedisServer, client: &Client) {
    let channel = format!("roomcast:client:{}", client.id);
    redis.wait_for_subscribers(&channel, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_message_finds_a_client_on_another_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut sender = Client::connect(&nodes[0]).await;
    let mut recipient = Client::connect(&nodes[2]).await;
    reachable(&redis, &recipient).await;
    sender
        .send(json!({"type": "private_message", "to": recipient.id, "message": {"hi": 1}}))
        .await;
    let got = recipient.recv().await;
    assert_eq!(got["type"], "private_message");
    assert_eq!(got["from"], sender.id);
    assert_eq!(got["message"], json!({"hi": 1}));
    recipient.expect_silence().await;
    sender.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_nobody_has_on_any_node_is_recipient_not_found_and_later_replies_keep_their_order() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut sender = Client::connect(&nodes[0]).await;
    sender
        .send(json!({"type": "private_message", "to": "client_nobody", "message": "x"}))
        .await;
    // Sent right behind it, answered only after it: the seed's order of replies.
    sender
        .send(json!({"type": "join_room", "room": "after"}))
        .await;
    common::assert_error(&sender.recv().await, "Recipient not found");
    assert_eq!(sender.recv().await["type"], "room_joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_message_to_a_user_reaches_their_connections_on_every_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes_with(&redis, 3, |config| config.jwt_secret = Some(SECRET.into())).await;
    let token = |sub: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": sub, "exp": 4_000_000_000u64}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let alice = token("alice");
    let path = format!("/?token={alice}");
    let mut alice_on_a = common::connect_with(&nodes[0], &path, &[]).await.unwrap();
    let mut alice_on_b = common::connect_with(&nodes[1], &path, &[]).await.unwrap();
    redis.wait_for_subscribers("roomcast:user:alice", 2).await;
    let bob = token("bob");
    let mut bob_on_c = common::connect_with(&nodes[2], &format!("/?token={bob}"), &[])
        .await
        .unwrap();
    bob_on_c
        .send(json!({"type": "private_message", "to": "alice", "message": "hello alice"}))
        .await;
    for alice in [&mut alice_on_a, &mut alice_on_b] {
        let got = alice.recv().await;
        assert_eq!(got["type"], "private_message");
        assert_eq!(got["from"], bob_on_c.id);
        assert_eq!(got["message"], "hello alice");
        alice.expect_silence().await;
    }
    // From a node that has one of alice's connections: that one at once, the other through
    // Redis, each once.
    alice_on_a
        .send(json!({"type": "private_message", "to": "alice", "message": "note to self"}))
        .await;
    for alice in [&mut alice_on_a, &mut alice_on_b] {
        assert_eq!(alice.recv().await["message"], "note to self");
        alice.expect_silence().await;
    }
    bob_on_c.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_sends_to_a_client_on_another_node_and_404s_an_unknown_one() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut recipient = Client::connect(&nodes[1]).await;
    reachable(&redis, &recipient).await;
    let auth = format!("Authorization: Bearer {KEY}");
    let body = json!({"to": recipient.id, "message": "from the app"}).to_string();
    let (status, answer) = http_json(nodes[0].addr, "POST", "/api/send", &auth, &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"delivered": 1}));
    let got = recipient.recv().await;
    assert_eq!(got["type"], "private_message");
    assert_eq!(got["message"], "from the app");
    let body = json!({"to": "client_nobody", "message": "x"}).to_string();
    let (status, answer) = http_json(nodes[0].addr, "POST", "/api/send", &auth, &body).await;
    assert_eq!(status, 404);
    assert_eq!(answer, json!({"error": "Recipient not found"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_client_stops_being_reachable_from_other_nodes() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut sender = Client::connect(&nodes[0]).await;
    let gone = Client::connect(&nodes[1]).await;
    reachable(&redis, &gone).await;
    let id = gone.id.clone();
    gone.close().await;
    redis
        .wait_for_subscribers(&format!("roomcast:client:{id}"), 0)
        .await;
    sender
        .send(json!({"type": "private_message", "to": id, "message": "x"}))
        .await;
    common::assert_error(&sender.recv().await, "Recipient not found");
}

/// Waits until `/metrics` of `node` shows `line`.
async fn metric_shows(node: &TestServer, line: &str, within: Duration) {
    let started = std::time::Instant::now();
    loop {
        if common::http_get(node.addr, "/metrics").await.contains(line) {
            return;
        }
        assert!(started.elapsed() < within, "no `{line}` within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_is_noticed_and_used_again_once_it_answers() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut sender = Client::connect(&nodes[0]).await;
    let mut remote = Client::connect(&nodes[1]).await;
    join(&mut sender, "probe").await;
    join(&mut remote, "probe").await;
    redis.wait_for_subscribers("roomcast:room:probe", 2).await;
    metric_shows(&nodes[1], "roomcast_redis_connected 1", EXPECT).await;
    // Paused, its sockets stay open: only the probe (every 5 s, 2 s to answer) can tell.
    redis.pause();
    metric_shows(
        &nodes[1],
        "roomcast_redis_connected 0",
        Duration::from_secs(15),
    )
    .await;
    redis.resume();
    metric_shows(
        &nodes[1],
        "roomcast_redis_connected 1",
        Duration::from_secs(15),
    )
    .await;
    redis.wait_for_subscribers("roomcast:room:probe", 2).await;
    sender
        .send(json!({"type": "room_message", "room": "probe", "message": "again"}))
        .await;
    tokio::time::timeout(EXPECT, async {
        while remote.recv().await["message"] != "again" {}
    })
    .await
    .expect("messages cross nodes again");
}

/// Reads one `member_left` notice about `leaver` with `total` members left.
async fn heard_leave_of(client: &mut Client, leaver: &str, total: u64) {
    common::heard_member(client, "member_left", leaver, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_counts_and_notices_are_cluster_wide_as_on_one_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut a = Client::connect(&nodes[0]).await;
    let mut b = Client::connect(&nodes[1]).await;
    let mut c = Client::connect(&nodes[2]).await;
    let mut a2 = Client::connect(&nodes[0]).await;
    assert_eq!(join(&mut a, "team").await, 1);
    assert_eq!(join(&mut b, "team").await, 2);
    heard_join_of(&mut a, &[(&b.id.clone(), 2)]).await;
    assert_eq!(join(&mut c, "team").await, 3);
    assert_eq!(join(&mut a2, "team").await, 4);
    let (cid, a2id) = (c.id.clone(), a2.id.clone());
    heard_join_of(&mut a, &[(&cid, 3), (&a2id, 4)]).await;
    heard_join_of(&mut b, &[(&cid, 3), (&a2id, 4)]).await;
    heard_join_of(&mut c, &[(&a2id, 4)]).await;
    // Joining twice does nothing and sends nothing, as on one node.
    b.send(json!({"type": "join_room", "room": "team"})).await;
    b.expect_silence().await;

    // A leave: the others on every node hear it with the new count; the leaver hears nothing.
    let bid = b.id.clone();
    b.send(json!({"type": "leave_room", "room": "team"})).await;
    for member in [&mut a, &mut c, &mut a2] {
        heard_leave_of(member, &bid, 3).await;
    }
    b.expect_silence().await;
    // Leaving a room it is not in: nothing, as on one node.
    b.send(json!({"type": "leave_room", "room": "team"})).await;
    b.expect_silence().await;
    a.expect_silence().await;

    // A closed connection leaves its rooms the same way.
    c.close().await;
    for member in [&mut a, &mut a2] {
        heard_leave_of(member, &cid, 2).await;
    }
    // And the count goes on from there.
    assert_eq!(join(&mut b, "team").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_empty_the_nodes_register_their_members_again() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let port = redis.addr.port();
    let nodes = nodes(&redis, 2).await;
    let mut a = Client::connect(&nodes[0]).await;
    let mut b = Client::connect(&nodes[1]).await;
    join(&mut a, "kept").await;
    join(&mut b, "kept").await;
    redis.kill();
    let redis = RedisServer::start_on(port).await;
    redis.wait_for_subscribers("roomcast:room:kept", 2).await;
    // The set is rebuilt from the nodes, without any event.
    let started = std::time::Instant::now();
    while redis
        .command(&["SCARD", "roomcast:members:kept"])
        .await
        .as_deref()
        != Some(":2")
    {
        assert!(
            started.elapsed() < EXPECT,
            "the members are registered again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut late = Client::connect(&nodes[1]).await;
    assert_eq!(join(&mut late, "kept").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_while_its_join_goes_round_leaves_no_member_behind() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    for _ in 0..5 {
        let mut quick = Client::connect(&nodes[0]).await;
        quick
            .send(json!({"type": "join_room", "room": "brief"}))
            .await;
        quick.close().await;
    }
    let started = std::time::Instant::now();
    while redis
        .command(&["SCARD", "roomcast:members:brief"])
        .await
        .as_deref()
        != Some(":0")
    {
        assert!(started.elapsed() < EXPECT, "no member left behind in Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut later = Client::connect(&nodes[1]).await;
    assert_eq!(join(&mut later, "brief").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_is_told_a_room_exists_when_its_members_are_on_other_nodes() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut member = Client::connect(&nodes[0]).await;
    join(&mut member, "elsewhere").await;
    let mut outsider = Client::connect(&nodes[1]).await;
    outsider
        .send(json!({"type": "room_message", "room": "elsewhere", "message": "x"}))
        .await;
    common::assert_error(&outsider.recv().await, "You are not in this room");
    outsider
        .send(json!({"type": "room_message", "room": "nowhere", "message": "x"}))
        .await;
    common::assert_error(&outsider.recv().await, "Room does not exist");
    member.expect_silence().await;
}

/// A roomcast node of its own process on `redis` (so that it can be killed or stopped), with
/// `args`, once `nodes` nodes in all subscribe.
async fn process_node(redis: &RedisServer, nodes: usize, args: &[&str]) -> common::ServerProcess {
    let url = redis.url();
    let mut all = vec!["--redis", &url];
    all.extend_from_slice(args);
    let node = common::ServerProcess::start(&all, None);
    redis
        .wait_for_subscribers("roomcast:broadcast", nodes)
        .await;
    node
}

/// Reads `member_left` notices until every one of `leavers` has left; returns the counts they
/// reported, in the order heard. Panics if they do not all arrive within `within`.
async fn heard_leaves_of(client: &mut Client, leavers: &[&str], within: Duration) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + within;
    let mut waiting: Vec<&str> = leavers.to_vec();
    let mut totals = Vec::new();
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let notice = client.recv_within(left).await;
        assert_eq!(notice["type"], "member_left", "{notice}");
        let id = notice["client_id"].as_str().unwrap();
        let at = waiting
            .iter()
            .position(|w| *w == id)
            .expect("a leaver, once");
        waiting.remove(at);
        totals.push(notice["total_members"].as_u64().unwrap());
    }
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_nodes_members_leave_their_rooms_on_every_node_within_ten_seconds() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let victim = process_node(&redis, 3, &[]).await;
    let mut a = Client::connect(&nodes[0]).await;
    let mut b = Client::connect(&nodes[1]).await;
    join(&mut a, "watched").await;
    join(&mut b, "watched").await;
    heard_join_of(&mut a, &[(&b.id.clone(), 2)]).await;
    let mut doomed = Vec::new();
    for total in [3, 4] {
        let mut client = Client::connect_url(&victim.url()).await;
        assert_eq!(join(&mut client, "watched").await, total);
        heard_join_of(&mut a, &[(&client.id.clone(), total)]).await;
        heard_join_of(&mut b, &[(&client.id.clone(), total)]).await;
        doomed.push(client);
    }
    // One of them is in a second room, with nobody else: its set must empty too.
    doomed[1].join("alone").await;
    let ids: Vec<String> = doomed.iter().map(|c| c.id.clone()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();

    let mut victim = victim;
    victim.child.kill().expect("SIGKILL");
    let killed = std::time::Instant::now();
    let bound = Duration::from_secs(10);
    assert_eq!(heard_leaves_of(&mut a, &ids, bound).await, [3, 2]);
    assert!(killed.elapsed() < bound, "reaped in {:?}", killed.elapsed());
    eprintln!("member_left heard {:?} after the SIGKILL", killed.elapsed());
    assert_eq!(
        heard_leaves_of(&mut b, &ids, Duration::from_secs(1)).await,
        [3, 2]
    );
    // Reaped once: nobody hears it twice.
    a.expect_silence().await;
    b.expect_silence().await;
    assert_eq!(
        redis
            .command(&["SCARD", "roomcast:members:watched"])
            .await
            .as_deref(),
        Some(":2")
    );
    assert_eq!(
        redis
            .command(&["EXISTS", "roomcast:members:alone"])
            .await
            .as_deref(),
        Some(":0")
    );
    let mut late = Client::connect(&nodes[1]).await;
    assert_eq!(join(&mut late, "watched").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_longer_than_its_lease_is_reaped_and_its_members_join_again_when_it_resumes()
{
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 1).await;
    let stopped = process_node(&redis, 2, &[]).await;
    let mut a = Client::connect(&nodes[0]).await;
    join(&mut a, "watched").await;
    let mut v = Client::connect_url(&stopped.url()).await;
    assert_eq!(join(&mut v, "watched").await, 2);
    heard_join_of(&mut a, &[(&v.id.clone(), 2)]).await;

    let pid = stopped.child.id() as libc::pid_t;
    // SAFETY: signals to a child process this test owns.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    heard_leave_of_within(&mut a, &v.id, 1, Duration::from_secs(10)).await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // Back: the others hear it join again; it never heard anything leave, so it hears nothing.
    let back = a.recv_within(Duration::from_secs(5)).await;
    assert_eq!(back["type"], "member_joined", "{back}");
    assert_eq!(back["client_id"], v.id);
    assert_eq!(back["total_members"], 2);
    v.expect_silence().await;
    v.send(json!({"type": "room_message", "room": "watched", "message": "still here"}))
        .await;
    let relayed = a.recv().await;
    assert_eq!(relayed["message"], "still here", "{relayed}");
    assert_eq!(
        redis
            .command(&["SCARD", "roomcast:members:watched"])
            .await
            .as_deref(),
        Some(":2")
    );
}

/// [`heard_leave_of`] with a longer wait.
async fn heard_leave_of_within(client: &mut Client, leaver: &str, total: u64, within: Duration) {
    let notice = client.recv_within(within).await;
    assert_eq!(notice["type"], "member_left", "{notice}");
    assert_eq!(notice["client_id"], leaver);
    assert_eq!(notice["total_members"], total, "{notice}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_paused_longer_than_a_lease_makes_no_live_node_reap_another() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 2).await;
    let mut a = Client::connect(&nodes[0]).await;
    let mut b = Client::connect(&nodes[1]).await;
    join(&mut a, "calm").await;
    join(&mut b, "calm").await;
    heard_join_of(&mut a, &[(&b.id.clone(), 2)]).await;
    // Every lease lapses on Redis's clock while it is paused.
    redis.pause();
    tokio::time::sleep(Duration::from_secs(7)).await;
    redis.resume();
    // Three renewal rounds later, nobody was reaped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.expect_silence().await;
    b.expect_silence().await;
    assert_eq!(
        redis
            .command(&["SCARD", "roomcast:members:calm"])
            .await
            .as_deref(),
        Some(":2")
    );
    b.send(json!({"type": "room_message", "room": "calm", "message": "after"}))
        .await;
    assert_eq!(a.recv().await["message"], "after");
}

const WEBHOOK_SECRET: &str = "cluster-webhook-secret";

/// The webhook events the app gets, from every node, until `done` holds of them (or 15 s).
async fn webhook_events_until(app: &mut AppStub, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut events = Vec::new();
    while !done(&events) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let received = app.next(left).await;
        let body = received.json();
        events.extend(body["events"].as_array().expect("events").iter().cloned());
    }
    events
}

/// An app taking webhooks and `count` nodes posting them to it (and its URL).
async fn webhook_nodes(redis: &RedisServer, count: usize) -> (AppStub, String, Vec<TestServer>) {
    let app = AppStub::start(|_| Answer::ok(json!({}))).await;
    let url = app.url("/hooks");
    let nodes = nodes_with(redis, count, |config| {
        config.webhook_url = Some(url.clone());
        config.webhook_secret = Some(WEBHOOK_SECRET.into());
    })
    .await;
    (app, url, nodes)
}

/// `events` and whatever else the app got within `wait`.
async fn with_late_events(app: &mut AppStub, mut events: Vec<Value>, wait: Duration) -> Vec<Value> {
    tokio::time::sleep(wait).await;
    for received in app.drain() {
        events.extend(
            received.json()["events"]
                .as_array()
                .unwrap()
                .iter()
                .cloned(),
        );
    }
    events
}

/// How many of `events` are `event` for `room`, and by whom.
fn room_events<'a>(events: &'a [Value], event: &str, room: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e["event"] == event && e["room"] == room)
        .map(|e| e["client_id"].as_str().unwrap())
        .collect()
}

fn has_event(events: &[Value], event: &str, client_id: &str) -> bool {
    events
        .iter()
        .any(|e| e["event"] == event && e["client_id"] == client_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_occupied_and_room_vacated_fire_once_per_cluster_not_once_per_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (mut app, _, nodes) = webhook_nodes(&redis, 3).await;
    let mut members = Vec::new();
    for (at, node) in nodes.iter().enumerate() {
        let mut client = Client::connect(node).await;
        assert_eq!(join(&mut client, "hooked").await, at as u64 + 1);
        members.push(client);
    }
    let ids: Vec<String> = members.iter().map(|c| c.id.clone()).collect();
    // Leave in the order they came; the last one out empties the room.
    for member in &mut members {
        member
            .send(json!({"type": "leave_room", "room": "hooked"}))
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = webhook_events_until(&mut app, |events| {
        ids.iter().all(|id| has_event(events, "member_left", id))
            && !room_events(events, "room_vacated", "hooked").is_empty()
    })
    .await;
    // A moment more for any duplicate from another node.
    let events = with_late_events(&mut app, events, Duration::from_millis(500)).await;
    assert_eq!(
        room_events(&events, "room_occupied", "hooked"),
        [ids[0].as_str()]
    );
    assert_eq!(
        room_events(&events, "room_vacated", "hooked"),
        [ids[2].as_str()]
    );
    assert_eq!(room_events(&events, "member_joined", "hooked").len(), 3);
    assert_eq!(room_events(&events, "member_left", "hooked").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_nodes_connections_leave_and_end_in_the_webhooks_exactly_once() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    // Two survivors: both look for the dead node, one claims it.
    let (mut app, url, nodes) = webhook_nodes(&redis, 2).await;
    let hooks = ["--webhook-url", &url, "--webhook-secret", WEBHOOK_SECRET];
    let victim = process_node(&redis, 3, &hooks).await;
    let mut a = Client::connect(&nodes[0]).await;
    join(&mut a, "shared").await;
    let mut v = Client::connect_url(&victim.url()).await;
    assert_eq!(join(&mut v, "shared").await, 2);
    assert_eq!(join(&mut v, "solo").await, 1);
    let vid = v.id.clone();
    // The victim's own events reach the app before it dies.
    webhook_events_until(&mut app, |events| {
        room_events(events, "room_occupied", "solo") == [vid.as_str()]
    })
    .await;

    let mut victim = victim;
    victim.child.kill().expect("SIGKILL");
    let events = webhook_events_until(&mut app, |events| {
        has_event(events, "client_disconnected", &vid)
    })
    .await;
    // Room for a second reaper's duplicate.
    let events = with_late_events(&mut app, events, Duration::from_secs(2)).await;
    assert_eq!(
        room_events(&events, "member_left", "shared"),
        [vid.as_str()]
    );
    assert_eq!(room_events(&events, "member_left", "solo"), [vid.as_str()]);
    assert_eq!(room_events(&events, "room_vacated", "solo"), [vid.as_str()]);
    assert!(room_events(&events, "room_vacated", "shared").is_empty());
    let ended: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "client_disconnected" && e["client_id"] == vid)
        .collect();
    assert_eq!(ended.len(), 1, "{events:?}");
    // Its rooms first, then the connection, as from a live node.
    let position = |event: &str, room: Option<&str>| {
        events
            .iter()
            .position(|e| {
                e["event"] == event
                    && e["client_id"] == vid
                    && room.is_none_or(|room| e["room"] == room)
            })
            .unwrap()
    };
    assert!(position("member_left", Some("shared")) < position("client_disconnected", None));
    assert!(position("member_left", Some("solo")) < position("client_disconnected", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_lists_the_rooms_and_members_of_every_node_on_any_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 3).await;
    let mut a = Client::connect(&nodes[0]).await;
    a.send_text(r#"{"type":"set_metadata","metadata":{"name":"Ann","score":1.50}}"#)
        .await;
    assert_eq!(a.recv().await["type"], "metadata_updated");
    join(&mut a, "team").await;
    let mut b = Client::connect(&nodes[1]).await;
    join(&mut b, "team").await;
    let mut c = Client::connect(&nodes[2]).await;
    join(&mut c, "other").await;
    let auth = format!("Authorization: Bearer {KEY}");
    for node in &nodes {
        let (status, rooms) = http_json(node.addr, "GET", "/api/rooms", &auth, "").await;
        assert_eq!(status, 200, "{rooms}");
        assert_eq!(
            rooms,
            json!({"rooms": [{"room": "other", "members": 1}, {"room": "team", "members": 2}]})
        );
    }
    let (_, filtered) = http_json(nodes[1].addr, "GET", "/api/rooms?prefix=te", &auth, "").await;
    assert_eq!(filtered, json!({"rooms": [{"room": "team", "members": 2}]}));

    // Asked on a node with no member of the room: every member, metadata as written.
    let text = common::http_get_with(nodes[2].addr, "/api/rooms/team", &auth).await;
    assert!(
        text.contains(r#""metadata":{"name":"Ann","score":1.50}"#),
        "the metadata byte for byte: {text}"
    );
    let (status, presence) = http_json(nodes[2].addr, "GET", "/api/rooms/team", &auth, "").await;
    assert_eq!(status, 200);
    let mut ids: Vec<&str> = presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["client_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut expected = vec![a.id.as_str(), b.id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    assert!(presence.get("incomplete").is_none(), "{presence}");
    let (status, _) = http_json(nodes[0].addr, "GET", "/api/rooms/nowhere", &auth, "").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_disconnects_a_client_or_a_users_connections_on_other_nodes() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes_with(&redis, 3, |config| config.jwt_secret = Some(SECRET.into())).await;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "carol", "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let path = format!("/?token={token}");
    let mut carol_on_b = common::connect_with(&nodes[1], &path, &[]).await.unwrap();
    let mut carol_on_c = common::connect_with(&nodes[2], &path, &[]).await.unwrap();
    let mut other = common::connect_with(&nodes[1], &path, &[]).await.unwrap();
    let auth = format!("Authorization: Bearer {KEY}");

    let body = json!({"client_id": other.id, "code": 4001, "reason": "bye"}).to_string();
    let (status, answer) = http_json(nodes[0].addr, "POST", "/api/disconnect", &auth, &body).await;
    assert_eq!((status, answer), (200, json!({"disconnected": 1})));
    let close = other.recv_close(EXPECT).await;
    assert_eq!(common::code(&close), 4001);
    assert_eq!(close.unwrap().reason, "bye");

    let body = json!({"user_id": "carol", "code": 4002}).to_string();
    let (status, answer) = http_json(nodes[0].addr, "POST", "/api/disconnect", &auth, &body).await;
    assert_eq!((status, answer), (200, json!({"disconnected": 2})));
    for carol in [&mut carol_on_b, &mut carol_on_c] {
        assert_eq!(common::code(&carol.recv_close(EXPECT).await), 4002);
    }
    let body = json!({"client_id": "client_nobody"}).to_string();
    let (status, answer) = http_json(nodes[0].addr, "POST", "/api/disconnect", &auth, &body).await;
    assert_eq!(status, 404, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_says_it_is_incomplete_when_a_node_does_not_answer_in_time() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = nodes(&redis, 1).await;
    let stalled = process_node(&redis, 2, &[]).await;
    let mut a = Client::connect(&nodes[0]).await;
    join(&mut a, "here").await;
    let auth = format!("Authorization: Bearer {KEY}");
    let (_, rooms) = http_json(nodes[0].addr, "GET", "/api/rooms", &auth, "").await;
    assert_eq!(rooms, json!({"rooms": [{"room": "here", "members": 1}]}));

    let pid = stalled.child.id() as libc::pid_t;
    // SAFETY: signals to a child process this test owns.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let asked = std::time::Instant::now();
    let (status, rooms) = http_json(nodes[0].addr, "GET", "/api/rooms", &auth, "").await;
    assert_eq!(status, 200);
    assert_eq!(
        rooms,
        json!({"rooms": [{"room": "here", "members": 1}], "incomplete": true})
    );
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );
    unsafe { libc::kill(pid, libc::SIGCONT) };
}
