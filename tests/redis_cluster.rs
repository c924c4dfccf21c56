//! Nodes on a Redis Cluster (`--redis-cluster`): three masters started on loopback, three
//! roomcast nodes; rooms, counts, private messages and broadcasts cross nodes through sharded
//! pub/sub (`SSUBSCRIBE` / `SPUBLISH`, never plain `SUBSCRIBE`), and a SIGKILLed node is reaped.

mod common;

use std::time::Duration;

use common::redis::RedisCluster;
use common::{start_server_with, Client, ServerProcess, TestServer};
use serde_json::json;

async fn nodes(cluster: &RedisCluster, count: usize) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..count {
        let urls = cluster.urls();
        nodes.push(start_server_with(|config| config.redis_cluster = urls).await);
    }
    cluster
        .wait_for_subscribers("roomcast:broadcast", count)
        .await;
    nodes
}

use common::joined_members as join;

async fn heard_join_of(client: &mut Client, joiner: &str, total: u64) {
    common::heard_member(client, "member_joined", joiner, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_messages_and_member_counts_cross_nodes_through_sharded_pubsub() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let nodes = nodes(&cluster, 3).await;
    let mut a = Client::connect(&nodes[0]).await;
    let mut b = Client::connect(&nodes[1]).await;
    let mut c = Client::connect(&nodes[2]).await;
    assert_eq!(join(&mut a, "team").await, 1);
    assert_eq!(join(&mut b, "team").await, 2);
    heard_join_of(&mut a, &b.id.clone(), 2).await;
    assert_eq!(join(&mut c, "team").await, 3);
    heard_join_of(&mut a, &c.id.clone(), 3).await;
    heard_join_of(&mut b, &c.id.clone(), 3).await;
    // The room's channel is a shard channel, hash-tagged with the room, on its shard only.
    assert_eq!(cluster.subscribers("roomcast:room:{r:team}").await, (3, 0));
    assert_eq!(
        cluster
            .command(&["SCARD", "roomcast:members:{r:team}"])
            .await
            .as_deref(),
        Some(":3")
    );

    a.send(json!({"type": "room_message", "room": "team", "message": {"n": 1}}))
        .await;
    for member in [&mut b, &mut c] {
        let got = member.recv().await;
        assert_eq!(got["type"], "room_message", "{got}");
        assert_eq!(got["from"], a.id);
        assert_eq!(got["message"], json!({"n": 1}));
        member.expect_silence().await;
    }
    a.expect_silence().await;

    let bid = b.id.clone();
    b.send(json!({"type": "leave_room", "room": "team"})).await;
    for member in [&mut a, &mut c] {
        common::heard_member(member, "member_left", &bid, 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_messages_and_broadcasts_cross_nodes_through_sharded_pubsub() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let nodes = nodes(&cluster, 2).await;
    let mut sender = Client::connect(&nodes[0]).await;
    let mut recipient = Client::connect(&nodes[1]).await;
    let channel = format!("roomcast:client:{}", recipient.id);
    cluster.wait_for_subscribers(&channel, 1).await;
    sender
        .send(json!({"type": "private_message", "to": recipient.id, "message": "psst"}))
        .await;
    let got = recipient.recv().await;
    assert_eq!(got["type"], "private_message", "{got}");
    assert_eq!(got["from"], sender.id);
    assert_eq!(got["message"], "psst");
    // Nobody anywhere: the shards' count of receivers says so.
    sender
        .send(json!({"type": "private_message", "to": "client_nobody", "message": "x"}))
        .await;
    common::assert_error(&sender.recv().await, "Recipient not found");

    sender
        .send(json!({"type": "broadcast", "message": "all"}))
        .await;
    let got = recipient.recv().await;
    assert_eq!(got["type"], "broadcast", "{got}");
    assert_eq!(got["message"], "all");
    sender.expect_silence().await;
    recipient.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_node_on_a_redis_cluster_is_reaped_within_ten_seconds() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let nodes = nodes(&cluster, 1).await;
    let urls = cluster.urls().join(",");
    let mut victim = ServerProcess::start(&["--redis-cluster", &urls], None);
    cluster.wait_for_subscribers("roomcast:broadcast", 2).await;
    let mut a = Client::connect(&nodes[0]).await;
    join(&mut a, "watched").await;
    let mut doomed = Client::connect_url(&victim.url()).await;
    assert_eq!(join(&mut doomed, "watched").await, 2);
    heard_join_of(&mut a, &doomed.id.clone(), 2).await;

    victim.child.kill().expect("SIGKILL");
    let killed = std::time::Instant::now();
    let notice = a.recv_within(Duration::from_secs(10)).await;
    assert_eq!(notice["type"], "member_left", "{notice}");
    assert_eq!(notice["client_id"], doomed.id);
    assert_eq!(notice["total_members"], 1);
    eprintln!("member_left heard {:?} after the SIGKILL", killed.elapsed());
    a.expect_silence().await;
    assert_eq!(
        cluster
            .command(&["SCARD", "roomcast:members:{r:watched}"])
            .await
            .as_deref(),
        Some(":1")
    );
}
