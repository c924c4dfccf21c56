//! Routing benchmarks: fan-out of one frame to a room, join/leave under contention, and a join
//! storm, all against [`roomcast::hub::LocalHub`] with real outboxes (no sockets).
//!
//! # What is measured, and why
//!
//! * `fanout/<members>/hub_room_message`: one `room_message` publication delivered by
//!   [`Router::deliver`] to 100, 1,000 and 10,000 recipients of one room (plus the sender,
//!   which is skipped). The hub encodes the frame once (since the broker seam; before it, the
//!   frame came in pre-encoded, so the figures of earlier runs leave out one encode of
//!   ~0.1-0.3 us). This is the hot path of a busy room: a shared room-lock read, then per
//!   recipient a `Bytes` clone (reference count) and a non-blocking push into its bounded
//!   outbox. Throughput is `Elements(recipients)`, so criterion prints deliveries per second.
//!   The receivers are drained after every iteration, outside the timed region, so the queues
//!   never fill up and every push takes the normal (queued) path.
//!
//! * `fanout/<members>/naive_to_vec_per_member`: the naive baseline, a server that serializes
//!   the JSON once per recipient: the message is built once as a `serde_json::Value`, then
//!   `serde_json::to_vec` runs per recipient into a `Vec<Vec<u8>>` (no queue, no WebSocket
//!   header; the buffers are freed outside the timed region). This is the same work the seed
//!   does per recipient, and is what `hub_room_message` avoids.
//!
//! * `fanout/<members>/naive_encode_and_push_per_member`: the same per-recipient serialization,
//!   but each result is pushed into the recipient's real outbox, i.e. apples to apples with
//!   `hub_room_message` except for encoding once vs once per recipient.
//!
//! * `join_leave/{same_room,distinct_rooms}/<threads>`: 1, 2 and 4 threads, each joining and
//!   leaving its own member (the "churner") in a loop, either all in one room or each in its own
//!   room. This is the cost of membership churn and how it scales when churn is concurrent: a
//!   join takes the rooms map's shard lock (`DashMap::entry`) and then the room's write lock,
//!   and notifies the other members under it; a leave does the same with `member_left`. Each
//!   thread also owns a "resident" member that stays in its room for the whole run, so rooms
//!   are not created and deleted on every pair and every join/leave has someone to notify (in
//!   `same_room` with T threads, up to 2T-1 members). Each thread drains its resident's and its
//!   churner's outboxes after every pair, inside the timed region, so every push takes the normal
//!   queued path. Throughput is `Elements(threads)`: one element is one join + leave pair, so
//!   criterion prints pairs per second summed over the threads. Timed from a barrier that all
//!   threads pass to the last thread's finish; thread spawn is outside. On a 2-core machine,
//!   4 threads are oversubscribed and anything else running steals cores: compare these lines
//!   only within one run on a quiet machine.
//!
//! * `join_storm/1000_members`: 1,000 members join one empty room one after another. Each join
//!   sends `room_joined` to the joiner and `member_joined` to everyone already present, so the
//!   storm delivers 1,000 + 999·1000/2 = 500,500 frames (and encodes 1,999). This is the
//!   quadratic worst case of the protocol (a class starting at once). Throughput is
//!   `Elements(500_500)` (frames delivered). Outboxes hold 1,024 frames, so nothing is dropped;
//!   the hub and the queued frames are freed outside the timed region.
//!
//! * `history/1000/room_message_appended`: `fanout/1000/hub_room_message` with history on
//!   (`--history-size`): the publication is also encoded with its offset and appended to the
//!   room's history under its lock (the members are seed clients, so they get the seed frame).
//!   Compare with `fanout/1000/hub_room_message` of the same run.
//!
//! * `history/recover_1000`: a client that missed 1,000 messages rejoins with `since`: its
//!   `room_joined` and the 1,000 kept frames pushed to its outbox, under the room's lock.
//!   Throughput is the 1,000 replayed messages.
//!
//! The benches use mimalloc, the global allocator of the server binary, so allocation costs
//! (frames, `Arc<str>` keys, rooms) are those of production.
//!
//! Run: `cargo bench --bench hub` (add `-- --quick` for a fast, rougher pass).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use roomcast::broker::{Publication, Target};
use roomcast::history::HistoryConfig;
use roomcast::hub::{ConnId, LocalHub, Member, Router, Since};
use roomcast::outbox::{outbox, OutboxReceiver, QueueLimits, SlowConsumerPolicy};
use roomcast::protocol::Body;

// The allocator of the server binary (`src/main.rs`), so allocation costs match production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: u64 = 1_700_000_000;
const ROOM: &str = "lobby";
const CHAT_LINE: &str = "Hello room, anyone?!"; // 20 bytes

fn member(conn: ConnId, capacity: usize) -> (Member, OutboxReceiver) {
    let (tx, rx) = outbox(
        QueueLimits::frames(capacity),
        SlowConsumerPolicy::Drop,
        Arc::default(),
    );
    let member = Member {
        conn,
        client_id: format!("client_{conn:013x}").into(),
        user_id: None,
        outbox: tx,
    };
    (member, rx)
}

fn drain(receivers: &mut [OutboxReceiver]) {
    for rx in receivers {
        while let Some(frame) = rx.try_next() {
            drop(frame);
        }
    }
}

/// A hub with one room of `recipients + 1` members (the last one is the sender), and every
/// outbox drained.
fn room_of(recipients: usize) -> (LocalHub, Member, Vec<Member>, Vec<OutboxReceiver>) {
    room_in(LocalHub::new(), recipients)
}

/// [`room_of`] in `hub`.
fn room_in(
    hub: LocalHub,
    recipients: usize,
) -> (LocalHub, Member, Vec<Member>, Vec<OutboxReceiver>) {
    let mut members = Vec::with_capacity(recipients);
    let mut receivers = Vec::with_capacity(recipients + 1);
    // Capacity 64: plenty for one message per iteration. The join notifications of the setup
    // overflow it and are dropped; the drain below empties every queue before measuring.
    for conn in 0..recipients as ConnId {
        let (m, rx) = member(conn, 64);
        hub.join(ROOM, &m);
        members.push(m);
        receivers.push(rx);
    }
    let (sender, rx) = member(recipients as ConnId, 64);
    hub.join(ROOM, &sender);
    receivers.push(rx);
    drain(&mut receivers);
    assert_eq!(hub.room_size(ROOM), recipients + 1);
    (hub, sender, members, receivers)
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    for recipients in [100usize, 1_000, 10_000] {
        let (hub, sender, members, mut receivers) = room_of(recipients);
        let publication = Publication {
            target: Target::Room(ROOM),
            from: &sender.client_id,
            message: Body::Text(CHAT_LINE.into()),
            timestamp: NOW,
            except: Some(sender.conn),
        };
        group.throughput(Throughput::Elements(recipients as u64));

        // Sanity: one call queues exactly one frame per recipient, none for the sender.
        hub.deliver(&publication).unwrap();
        let queued: usize = receivers
            .iter_mut()
            .map(|rx| std::iter::from_fn(|| rx.try_next()).count())
            .sum();
        assert_eq!(queued, recipients);

        group.bench_function(
            BenchmarkId::new(recipients.to_string(), "hub_room_message"),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        hub.deliver(&publication).unwrap();
                        total += start.elapsed();
                        drain(&mut receivers);
                    }
                    total
                })
            },
        );

        let naive_message = |from: &str| {
            serde_json::json!({
                "type": "room_message",
                "room": ROOM,
                "from": from,
                "message": CHAT_LINE,
                "timestamp": NOW,
            })
        };
        group.bench_function(
            BenchmarkId::new(recipients.to_string(), "naive_to_vec_per_member"),
            |b| {
                let mut out: Vec<Vec<u8>> = Vec::with_capacity(recipients);
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let value = naive_message(black_box(&sender.client_id));
                        for _ in &members {
                            out.push(serde_json::to_vec(&value).unwrap());
                        }
                        total += start.elapsed();
                        black_box(&out);
                        out.clear();
                    }
                    total
                })
            },
        );

        group.bench_function(
            BenchmarkId::new(recipients.to_string(), "naive_encode_and_push_per_member"),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let value = naive_message(black_box(&sender.client_id));
                        for m in &members {
                            m.outbox.push(serde_json::to_vec(&value).unwrap().into());
                        }
                        total += start.elapsed();
                        drain(&mut receivers);
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

/// A JSON message such as an app broadcasts (an order update, ~1 KB), to compare a fan-out
/// to compressing recipients (permessage-deflate, `--compression`) with a plain one.
fn realistic_message() -> String {
    let items: Vec<_> = (0..8)
        .map(|i| {
            serde_json::json!({
                "sku": format!("SKU-{:05}", 10_000 + i * 37),
                "name": format!("Organic oat milk, 1 l, pack of {}", i + 1),
                "quantity": i % 3 + 1,
                "unit_price": {"amount": 249 + i * 10, "currency": "EUR"},
            })
        })
        .collect();
    serde_json::json!({
        "event": "App\\Events\\OrderShipped",
        "order": {"id": 981_223, "status": "shipped", "customer": {"id": 4411, "name": "Ana Souza"},
                  "carrier": "DHL", "tracking": "JJD0099912345678", "items": items},
        "sent_at": "2026-12-03T17:45:00Z",
    })
    .to_string()
}

/// A fan-out of [`realistic_message`] to 1,000 members, each taking its frame as its socket
/// would: plain, or compressed (the first recipient deflates, the rest share the bytes).
fn fanout_compressed(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_realistic_json");
    let text = serde_json::value::RawValue::from_string(realistic_message()).unwrap();
    for compressing in [false, true] {
        let (hub, sender, _members, mut receivers) = room_of(1_000);
        if compressing {
            for rx in &mut receivers {
                rx.compress_from(256);
            }
        }
        let publication = Publication {
            target: Target::Room(ROOM),
            from: &sender.client_id,
            message: Body::Raw(&text),
            timestamp: NOW,
            except: Some(sender.conn),
        };
        hub.deliver(&publication).unwrap();
        let sizes: Vec<usize> = receivers
            .iter_mut()
            .filter_map(|rx| rx.try_next())
            .map(|frame| frame.len())
            .collect();
        assert_eq!(sizes.len(), 1_000);
        eprintln!(
            "fanout_realistic_json: {} bytes per frame {}",
            sizes[0],
            if compressing { "compressed" } else { "plain" }
        );
        group.throughput(Throughput::Elements(1_000));
        let name = if compressing {
            "1000/deflate"
        } else {
            "1000/plain"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    hub.deliver(&publication).unwrap();
                    for rx in &mut receivers {
                        black_box(rx.try_next());
                    }
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

/// One thread's share of the churn: its resident (a member that stays in the room) and its
/// churner (the member that joins and leaves), each with its receiver.
struct Worker {
    room: String,
    resident_rx: OutboxReceiver,
    churner: Member,
    churner_rx: OutboxReceiver,
}

/// Every worker runs `iters` join + leave pairs of its churner in its room, on its own thread;
/// returns the time from the start barrier to the last thread's finish.
fn churn(hub: &LocalHub, workers: &mut [Worker], iters: u64) -> Duration {
    let barrier = Barrier::new(workers.len());
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|w| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        hub.join(&w.room, &w.churner);
                        hub.leave(&w.room, &w.churner);
                        // The notifications this pair and the other threads' pairs queued.
                        while w.churner_rx.try_next().is_some() {}
                        while w.resident_rx.try_next().is_some() {}
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = spans.iter().map(|s| s.0).min().unwrap();
    let last = spans.iter().map(|s| s.1).max().unwrap();
    last - first
}

fn join_leave(c: &mut Criterion) {
    let mut group = c.benchmark_group("join_leave");
    for (layout, distinct) in [("same_room", false), ("distinct_rooms", true)] {
        for threads in [1usize, 2, 4] {
            let hub = LocalHub::new();
            let mut residents = Vec::with_capacity(threads);
            let mut workers: Vec<Worker> = (0..threads)
                .map(|t| {
                    let room = if distinct {
                        format!("room_{t}")
                    } else {
                        ROOM.to_owned()
                    };
                    // Capacity 4,096: a pair queues a handful of frames per member, drained
                    // after every pair; only a thread descheduled for long could overflow it.
                    let (resident, resident_rx) = member(t as ConnId, 4_096);
                    hub.join(&room, &resident);
                    residents.push(resident);
                    let (churner, churner_rx) = member(1_000 + t as ConnId, 4_096);
                    Worker {
                        room,
                        resident_rx,
                        churner,
                        churner_rx,
                    }
                })
                .collect();
            group.throughput(Throughput::Elements(threads as u64));
            group.bench_function(BenchmarkId::new(layout, threads), |b| {
                b.iter_custom(|iters| churn(&hub, &mut workers, iters))
            });
        }
    }
    group.finish();
}

fn join_storm(c: &mut Criterion) {
    const MEMBERS: usize = 1_000;
    const FRAMES: u64 = (MEMBERS + MEMBERS * (MEMBERS - 1) / 2) as u64;
    // Sanity: the storm delivers exactly FRAMES frames, none dropped.
    {
        let hub = LocalHub::new();
        let (members, mut receivers): (Vec<_>, Vec<_>) = (0..MEMBERS as ConnId)
            .map(|conn| member(conn, 1_024))
            .unzip();
        for m in &members {
            hub.join(ROOM, m);
        }
        let delivered: usize = receivers
            .iter_mut()
            .map(|rx| std::iter::from_fn(|| rx.try_next()).count())
            .sum();
        assert_eq!(delivered as u64, FRAMES);
    }
    let mut group = c.benchmark_group("join_storm");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(FRAMES));
    group.bench_function(format!("{MEMBERS}_members"), |b| {
        b.iter_batched(
            || {
                // Capacity 1,024 >= the 1,000 frames the first joiner receives: no drops.
                let (members, receivers): (Vec<_>, Vec<_>) = (0..MEMBERS as ConnId)
                    .map(|conn| member(conn, 1_024))
                    .unzip();
                (LocalHub::new(), members, receivers)
            },
            |(hub, members, receivers)| {
                for m in &members {
                    hub.join(ROOM, m);
                }
                // Returned, so the hub and the 500k queued frames are freed untimed.
                (hub, members, receivers)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// A hub keeping each room's last `size` messages for a minute.
fn hub_with_history(size: usize) -> LocalHub {
    LocalHub::with_history(Some(HistoryConfig {
        size,
        ttl: Duration::from_secs(60),
        max_recovery: size,
    }))
}

fn history(c: &mut Criterion) {
    let mut group = c.benchmark_group("history");
    // The fan-out of `fanout/1000/hub_room_message` with history on: each publication is also
    // encoded with its offset and appended (the members are seed clients).
    let (hub, sender, _members, mut receivers) = room_in(hub_with_history(100), 1_000);
    let publication = Publication {
        target: Target::Room(ROOM),
        from: &sender.client_id,
        message: Body::Text(CHAT_LINE.into()),
        timestamp: NOW,
        except: Some(sender.conn),
    };
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("1000/room_message_appended", |b| {
        b.iter_custom(|iterations| {
            let mut spent = Duration::ZERO;
            for _ in 0..iterations {
                let started = Instant::now();
                black_box(hub.deliver(&publication).unwrap());
                spent += started.elapsed();
                drain(&mut receivers);
            }
            spent
        })
    });

    // A client that missed 1,000 messages rejoins: room_joined plus the 1,000 kept frames
    // pushed to its outbox (then it leaves again, untimed).
    let hub = hub_with_history(1_000);
    let (publisher, mut publisher_rx) = member(0, 64);
    hub.join(ROOM, &publisher);
    let epoch = {
        let (first, mut first_rx) = member(1, 64);
        hub.join_since(ROOM, &first, &Since::Now);
        let joined = first_rx.try_next().expect("room_joined");
        hub.leave(ROOM, &first);
        let text = String::from_utf8_lossy(&joined[2..]).into_owned();
        let joined: serde_json::Value = serde_json::from_str(&text).unwrap();
        joined["epoch"].as_str().unwrap().to_owned()
    };
    let publication = Publication {
        target: Target::Room(ROOM),
        from: &publisher.client_id,
        message: Body::Text(CHAT_LINE.into()),
        timestamp: NOW,
        except: Some(publisher.conn),
    };
    for _ in 0..1_000 {
        hub.deliver(&publication).unwrap();
    }
    while publisher_rx.try_next().is_some() {}
    let since = Since::Saw {
        offset: 0,
        epoch: epoch.into(),
    };
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("recover_1000", |b| {
        b.iter_custom(|iterations| {
            let mut spent = Duration::ZERO;
            for n in 0..iterations {
                let (back, mut back_rx) = member(10 + n, 2_048);
                let started = Instant::now();
                black_box(hub.join_since(ROOM, &back, &since));
                spent += started.elapsed();
                let replayed = std::iter::from_fn(|| back_rx.try_next()).count();
                assert_eq!(replayed, 1_001, "room_joined and the 1,000 missed");
                hub.leave(ROOM, &back);
                while publisher_rx.try_next().is_some() {}
            }
            spent
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short defaults so the whole suite runs in a few minutes; the command line overrides them.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = fanout, fanout_compressed, join_leave, join_storm, history
}
criterion_main!(benches);
