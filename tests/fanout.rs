//! Fan-out at scale, ordering, and the slow-consumer policies of the bounded outbound queue.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{start_server, start_server_routed, start_server_with, Client, RawClient};
use futures_util::StreamExt;
use roomcast::outbox::SlowConsumerPolicy;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_in_one_room_all_receive_one_room_message() {
    let server = start_server().await;
    let mut sender = Client::connect(&server).await;
    sender.join("big").await;
    let mut members = Vec::new();
    for _ in 0..999 {
        let mut member = Client::connect(&server).await;
        member
            .send(json!({"type": "join_room", "room": "big"}))
            .await;
        members.push(member);
    }
    // Joins were sent without waiting; the sender sees the last one arrive.
    loop {
        let notice = sender.recv().await;
        if notice["total_members"] == 1000 {
            break;
        }
    }
    assert_eq!(server.server.router().room_size("big"), 1000);
    // Every member's queue holds its room_joined and the member_joined of later joiners; read
    // up to the message, concurrently, so no socket buffer fills.
    sender
        .send(json!({"type": "room_message", "room": "big", "message": "to all"}))
        .await;
    let readers = members.into_iter().map(|mut member| {
        tokio::spawn(async move {
            // Skip the membership notices cheaply: 1,000 joins make ~500,000 of them.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout_at(deadline, member.ws.next()).await
            {
                if let Message::Text(text) = message {
                    if text.contains(r#""type":"room_message""#) {
                        let got: serde_json::Value = serde_json::from_str(&text).unwrap();
                        return got["message"] == "to all";
                    }
                }
            }
            false
        })
    });
    let mut received = 0;
    for reader in readers {
        if reader.await.unwrap() {
            received += 1;
        }
    }
    let closed = server
        .server
        .outbox_stats()
        .closed_slow
        .load(Ordering::Relaxed);
    assert_eq!(received, 999, "slow consumers closed: {closed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_one_sender_arrive_in_order_at_every_member() {
    // 2,000 messages as fast as possible: well over the default rate limit, which is not what
    // this test is about.
    // A queue that holds all of them: on a loaded machine the debug-build test clients can fall
    // 1,000 frames behind, and slow consumers are another test.
    let server = start_server_with(|config| {
        config.rate_limit = 0.0;
        config.outbound_queue = 4096;
    })
    .await;
    let mut sender = Client::connect(&server).await;
    sender.join("ordered").await;
    let mut members = Vec::new();
    for _ in 0..5 {
        let mut member = Client::connect(&server).await;
        member.join("ordered").await;
        members.push(member);
    }
    // Members read while the sender sends, as real clients do: one that waited for all 2,000
    // would be a slow consumer, which is another test.
    let readers: Vec<_> = members
        .into_iter()
        .map(|mut member| {
            tokio::spawn(async move {
                let mut expected = 0;
                while expected < 2000 {
                    let got = member.recv().await;
                    if got["type"] == "room_message" {
                        assert_eq!(got["message"], expected.to_string());
                        expected += 1;
                    }
                }
            })
        })
        .collect();
    for i in 0..2000 {
        sender
            .send(json!({"type": "room_message", "room": "ordered", "message": i.to_string()}))
            .await;
    }
    for reader in readers {
        reader.await.expect("every member got all 2,000 in order");
    }
}

/// Fills the socket of a client that never reads: large messages until the kernel buffers and
/// the outbound queue are full.
async fn flood(publisher: &mut Client, room: &str, count: usize) {
    let body = "z".repeat(60_000);
    for _ in 0..count {
        publisher
            .send(json!({"type": "room_message", "room": room, "message": body}))
            .await;
    }
}

/// `sleeper` gets close 1013 "slow consumer" (after whatever the kernel had buffered), and it
/// is the only connection the server closed as one.
async fn assert_closed_as_the_one_slow_consumer(server: &common::TestServer, sleeper: &mut Client) {
    let frame = sleeper.recv_close(Duration::from_secs(20)).await;
    assert_eq!(common::code(&frame), 1013);
    assert_eq!(frame.unwrap().reason, "slow consumer");
    assert_eq!(
        server
            .server
            .outbox_stats()
            .closed_slow
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_1013_and_the_others_keep_receiving() {
    let server = start_server_with(|config| {
        config.outbound_queue = 16;
        config.slow_consumer = SlowConsumerPolicy::Close;
        config.rate_limit = 0.0;
        // The sleeper starts reading only after the 600 round trips below, which on a loaded
        // machine can outlast the default 10 s: a client that has not taken its close frame
        // by the drain timeout is reset, and this test is about the close frame.
        config.drain_timeout = Duration::from_secs(120);
    })
    .await;
    let mut publisher = Client::connect(&server).await;
    let mut reader = Client::connect(&server).await;
    let mut sleeper = Client::connect(&server).await;
    publisher.join("flood").await;
    reader.join("flood").await;
    sleeper.join("flood").await;
    publisher.recv().await;
    publisher.recv().await;
    reader.recv().await;

    // The reader takes each message before the next is sent; the sleeper reads nothing, so
    // its socket buffers and then its 16-frame queue fill up.
    let body = "z".repeat(60_000);
    for i in 0..600 {
        publisher
            .send(json!({"type": "room_message", "room": "flood", "message": body}))
            .await;
        // The sleeper's departure (member_left) may come in between.
        let mut got = reader.recv().await;
        if got["type"] == "member_left" {
            got = reader.recv().await;
        }
        assert_eq!(
            got["type"], "room_message",
            "message {i} reached the reader"
        );
    }

    assert_closed_as_the_one_slow_consumer(&server, &mut sleeper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_when_its_queue_holds_more_bytes_than_the_byte_bound() {
    // Room for 4,096 frames but only 256 KiB: large messages reach the byte bound long before
    // the frame bound.
    let server = start_server_with(|config| {
        config.outbound_queue = 4096;
        config.outbound_queue_bytes = 256 * 1024;
        config.slow_consumer = SlowConsumerPolicy::Close;
        config.rate_limit = 0.0;
        // As above: the sleeper reads only after the whole flood.
        config.drain_timeout = Duration::from_secs(120);
    })
    .await;
    let (mut publisher, mut sleeper) = common::pair_in_room(&server, "flood").await;
    flood(&mut publisher, "flood", 600).await;

    // Whatever the kernel buffered arrives first; then the close.
    assert_closed_as_the_one_slow_consumer(&server, &mut sleeper).await;
    // The publisher was never held up, and is told the sleeper left.
    let left = publisher.recv().await;
    assert_eq!(left["type"], "member_left", "{left}");
    assert_eq!(left["total_members"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_under_the_drop_policy_stays_connected_and_drops_are_counted() {
    let server = start_server_with(|config| {
        config.outbound_queue = 16;
        config.slow_consumer = SlowConsumerPolicy::Drop;
        config.rate_limit = 0.0;
    })
    .await;
    let (mut publisher, mut sleeper) = common::pair_in_room(&server, "flood").await;
    flood(&mut publisher, "flood", 600).await;
    let deadline = std::time::Instant::now() + common::EXPECT;
    while server.server.outbox_stats().dropped.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "frames were dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Now read everything that was kept: the connection is still open and still served.
    let mut received = 0;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(500), sleeper.ws.next()).await
    {
        if let Message::Text(_) = message {
            received += 1;
        }
    }
    assert!(received > 0 && received < 600, "received {received} of 600");
    publisher
        .send(json!({"type": "room_message", "room": "flood", "message": "after"}))
        .await;
    assert_eq!(sleeper.recv().await["message"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_sharing_one_router_serve_one_room_across_both() {
    // The Router is the seam a multi-node backplane plugs into: here two listeners share one
    // in-process hub, and nothing in the connection or protocol code notices. (Sharing a
    // LocalHub makes them one node, not two: either's shutdown would close every connection
    // of the hub, and both count them all in /metrics. A backplane's Router keeps each
    // node's own connections and carries only deliveries between nodes.)
    let router: std::sync::Arc<dyn roomcast::hub::Router> =
        std::sync::Arc::new(roomcast::hub::LocalHub::new());
    let node_a = start_server_routed(|_| {}, router.clone()).await;
    let node_b = start_server_routed(|_| {}, router).await;
    let mut ann = Client::connect(&node_a).await;
    let mut bob = Client::connect(&node_b).await;
    ann.join("shared").await;
    assert_eq!(bob.join("shared").await["members"], 2);
    assert_eq!(ann.recv().await["type"], "member_joined");
    ann.send(json!({"type": "room_message", "room": "shared", "message": "across"}))
        .await;
    let got = bob.recv().await;
    assert_eq!(got["message"], "across");
    assert_eq!(got["from"], ann.id.as_str());
    bob.send(json!({"type": "private_message", "to": ann.id, "message": "back"}))
        .await;
    assert_eq!(ann.recv().await["message"], "back");
}

/// One TCP socket of `/proc/net/tcp` (IPv4; the test servers listen on 127.0.0.1).
#[derive(Debug)]
struct KernelSocket {
    local_port: u16,
    remote_port: u16,
    /// `st`: 01 established, 04 FIN-WAIT-1, 06 TIME-WAIT, 0A listen...
    state: u8,
    /// Bytes in the send queue (written, not yet acknowledged).
    tx_queue: u64,
}

fn kernel_sockets() -> Vec<KernelSocket> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |address: &str| u16::from_str_radix(address.rsplit(':').next().unwrap(), 16);
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (tx, _rx) = fields.get(4)?.split_once(':')?;
            Some(KernelSocket {
                local_port: port(fields.get(1)?).ok()?,
                remote_port: port(fields.get(2)?).ok()?,
                state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
                tx_queue: u64::from_str_radix(tx, 16).ok()?,
            })
        })
        .collect()
}

/// The server's own sockets (local port `server_port`) to the clients at `client_ports`.
fn server_side_sockets(server_port: u16, client_ports: &[u16]) -> Vec<KernelSocket> {
    kernel_sockets()
        .into_iter()
        .filter(|s| s.local_port == server_port && client_ports.contains(&s.remote_port))
        .collect()
}

/// Raw clients that upgrade, join `room`, and from then on never read.
async fn non_readers(server: &common::TestServer, room: &str, count: usize) -> Vec<RawClient> {
    let join = json!({"type": "join_room", "room": room}).to_string();
    let mut clients = Vec::new();
    for _ in 0..count {
        let mut client = RawClient::connect(server).await;
        client.send_frame(0x81, join.as_bytes()).await;
        loop {
            let frame = client.read_frame().await.expect("room_joined");
            if frame.opcode == 1 && frame.json()["type"] == "room_joined" {
                break;
            }
        }
        clients.push(client);
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_slow_consumer_is_reset_after_the_drain_timeout() {
    // The red team's attack, small: clients that never read are closed as slow consumers,
    // and their sockets must not stay in FIN-WAIT-1 holding their send buffers while the
    // clients keep them open: after --drain-timeout the server resets them.
    const SLEEPERS: usize = 30;
    let server = start_server_with(|config| {
        config.drain_timeout = Duration::from_secs(1);
        // The byte bound closes the sleepers; room for many frames keeps the publisher, told
        // of 30 departures at once while it is busy sending, from being one.
        config.outbound_queue = 4096;
        config.outbound_queue_bytes = 256 * 1024;
        config.slow_consumer = SlowConsumerPolicy::Close;
        config.rate_limit = 0.0;
    })
    .await;
    let mut publisher = Client::connect(&server).await;
    publisher.join("flood").await;
    let sleepers = non_readers(&server, "flood", SLEEPERS).await;
    let ports: Vec<u16> = sleepers
        .iter()
        .map(|c| c.stream.local_addr().unwrap().port())
        .collect();
    flood(&mut publisher, "flood", 200).await;

    let closed_slow = || {
        server
            .server
            .outbox_stats()
            .closed_slow
            .load(Ordering::Relaxed)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while closed_slow() < SLEEPERS as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {SLEEPERS} closed as slow consumers",
            closed_slow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Drain timeout (1 s) plus a generous margin for a loaded machine; the clients still hold
    // their sockets open and unread all along.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = server_side_sockets(server.addr.port(), &ports);
        if left.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let held: u64 = left.iter().map(|s| s.tx_queue).sum();
            let fin_wait_1 = left.iter().filter(|s| s.state == 0x04).count();
            panic!(
                "{} of {SLEEPERS} server sockets left ({fin_wait_1} in FIN-WAIT-1), holding \
                 {held} bytes unsent: {:?}\n{}",
                left.len(),
                &left[..left.len().min(3)],
                std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(sleepers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_buffer_of_a_client_that_never_reads_stays_bounded() {
    // The default --socket-send-buffer (128 KiB, which Linux doubles for its bookkeeping):
    // a client that reads nothing makes the server's socket hold about that much, however
    // much is sent to it (autotuning alone lets it grow to tcp_wmem's maximum, 4 MiB).
    // The drop policy keeps the connection open to look at.
    let server = start_server_with(|config| {
        config.slow_consumer = SlowConsumerPolicy::Drop;
        config.rate_limit = 0.0;
    })
    .await;
    let mut publisher = Client::connect(&server).await;
    publisher.join("flood").await;
    let sleepers = non_readers(&server, "flood", 1).await;
    let ports = [sleepers[0].stream.local_addr().unwrap().port()];
    flood(&mut publisher, "flood", 200).await;
    // The server has taken every message once its drops are counted; the kernel queue is
    // then as full as it gets.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while server.server.outbox_stats().dropped.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "frames were dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sockets = server_side_sockets(server.addr.port(), &ports);
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    // Twice the setting, plus the one write the kernel lets overshoot (measured: 265,216
    // bytes; 3,896,320 autotuned).
    assert!(
        sockets[0].tx_queue <= 3 * 131_072,
        "the server's socket holds {} bytes unsent",
        sockets[0].tx_queue
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_slow_consumer_keeps_its_place_under_the_per_ip_cap_until_it_is_reset() {
    // A connection's admission permit lives as long as its task: a client cannot free its
    // place by leaving its old socket closing (and holding server memory) and open another.
    let server = start_server_with(|config| {
        config.max_connections_per_ip = 2;
        config.drain_timeout = Duration::from_secs(5);
        config.outbound_queue = 4096;
        config.outbound_queue_bytes = 256 * 1024;
        config.rate_limit = 0.0;
    })
    .await;
    let mut publisher = Client::connect(&server).await;
    publisher.join("flood").await;
    let sleepers = non_readers(&server, "flood", 1).await;
    let ports = [sleepers[0].stream.local_addr().unwrap().port()];
    flood(&mut publisher, "flood", 200).await;
    let closed = std::time::Instant::now() + Duration::from_secs(30);
    while server
        .server
        .outbox_stats()
        .closed_slow
        .load(Ordering::Relaxed)
        == 0
    {
        assert!(std::time::Instant::now() < closed, "the sleeper was closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        common::connect_with(&server, "/", &[]).await.err(),
        Some(429),
        "a connection still closing counts"
    );
    // After the drain timeout the sleeper is reset and its place is free.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match common::connect_with(&server, "/", &[]).await {
            Ok(_) => break,
            Err(429) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(status) => panic!("place not given back: {status}"),
        }
    }
    assert!(
        server_side_sockets(server.addr.port(), &ports).is_empty(),
        "the place is given back when the socket is reset"
    );
    drop(sleepers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_close_handshake_still_ends_with_a_fin() {
    // The server closes (1001 on shutdown), the client answers and reads to EOF: the server
    // closes first and gracefully, so its socket waits in TIME-WAIT. A reset would leave none.
    let server = start_server().await;
    let server_port = server.addr.port();
    let mut client = Client::connect(&server).await;
    let port = match client.ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(stream) => stream.local_addr().unwrap().port(),
        _ => unreachable!("ws:// is plain TCP"),
    };
    let stopped = tokio::spawn(server.stop());
    assert_eq!(common::code(&client.recv_close(common::EXPECT).await), 1001);
    stopped.await.unwrap();
    drop(client);
    let deadline = std::time::Instant::now() + common::EXPECT;
    loop {
        let sockets = server_side_sockets(server_port, &[port]);
        if sockets.iter().any(|s| s.state == 0x06) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server's socket is in TIME-WAIT: {sockets:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
