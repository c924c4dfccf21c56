//! `fanout`: subscribers spread over rooms, publishers sending stamped `room_message`s at a
//! fixed rate (or as fast as a bounded in-flight window allows); every receiver computes the
//! latency from the stamp and checks sequence numbers.
//!
//! Phases: connect everyone, join (wait for every `room_joined`), settle (let the
//! `member_joined` storm drain), publish (the measured phase), grace (wait for in-flight
//! deliveries), then count: expected deliveries are each message times the live receivers of
//! its room at the moment it was sent, so loss is exact.
//!
//! Client `i < subscribers` is a subscriber of room `i % rooms`; publisher `p` is in room
//! `p % rooms`. Publishers are room members too (the protocol requires it), so they also receive
//! and measure the other publishers' messages.
//!
//! With `--protocol pusher` a room is the private channel `private-<room name>`, a join a signed
//! subscribe, and a message the client event `client-msg` ([`crate::pusher`]); the phases and
//! the accounting are the same. The receive and publish loops are generic over
//! [`Framing`], picked once per client, so native mode runs the code it always ran. Private
//! channels have no member events and report no member count: the settle phase just sees
//! 200 ms of quiet, and the membership check (other clients in our rooms) is not made.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{await_joins, drain, open_connections, wait_until, Env, Outcome};
use crate::cli::{FanoutArgs, PayloadKind, Protocol};
use crate::client::{Cause, ClientError, Conn, Reader, Writer};
use crate::clock::now_ns;
use crate::message::{realistic_body, Framing, Native, ServerMessage, Stamp};
use crate::pusher::{Pusher, CHANNEL_PREFIX};
use crate::report::{per, round2, round3, CompressionReport, FanoutResults, Results};
use crate::stats::{secs, Counter, Latencies, LatencySummary};
use crate::sysinfo::Meter;

/// A fan-out run that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("--rooms must be at least 1")]
    NoRooms,
    #[error("--publishers must be at least 1")]
    NoPublishers,
    #[error("--rate must be a finite number >= 0")]
    BadRate,
    #[error("--window must be at least 1")]
    NoWindow,
}

/// One publisher's accounting, shared with the receivers of its room.
#[derive(Default)]
struct Publisher {
    /// Messages written to the socket.
    sent: AtomicU64,
    /// Deliveries owed: for each message, the live receivers of the room when it was sent.
    expected: AtomicU64,
    /// Deliveries seen (saturated mode only) plus those forgiven when a receiver died.
    delivered: AtomicU64,
    /// Receivers wake the waiting publisher once `delivered` reaches this.
    wake_at: AtomicU64,
    wake: Notify,
    max_lag_ns: AtomicU64,
}

#[derive(Default)]
struct Room {
    /// The room (Pusher: the channel) every message of it names.
    name: String,
    /// Our connections that joined.
    joined: AtomicU64,
    /// Our receivers whose connection ended early.
    dead: AtomicU64,
    /// Largest `members` any room_joined reported (Pusher: none is).
    members_seen: AtomicU64,
}

impl Room {
    /// Receivers of a message one member sends now.
    fn live_receivers(&self) -> u64 {
        (self.joined.load(Ordering::Relaxed))
            .saturating_sub(1)
            .saturating_sub(self.dead.load(Ordering::Relaxed))
    }
}

struct Shared {
    args: FanoutArgs,
    protocol: Protocol,
    saturated: bool,
    reply_timeout: Duration,
    rooms: Vec<Room>,
    publishers: Vec<Publisher>,
    latencies: Arc<Latencies>,
    received: Counter,
    reordered: Counter,
    foreign: Counter,
    /// Other server messages (member_joined...), to see when the join storm has drained.
    other: Counter,
    joined: AtomicU64,
    join_failed: AtomicU64,
    publishers_ready: AtomicU64,
    publishers_done: AtomicU64,
    disconnected: AtomicU64,
    /// Longest `message` string a publisher sent, in bytes.
    message_bytes: AtomicU64,
    /// Publishing starts when this is cancelled.
    go: CancellationToken,
    /// Receivers stop when this is cancelled.
    stop: CancellationToken,
    /// Ctrl-C.
    interrupt: CancellationToken,
    errors: Arc<crate::stats::ErrorTally>,
}

impl Shared {
    fn room_of(&self, client: usize) -> usize {
        let subscribers = self.args.subscribers;
        if client < subscribers {
            client % self.args.rooms
        } else {
            (client - subscribers) % self.args.rooms
        }
    }

    /// Publishers of room `r` are `r, r + rooms, r + 2 rooms...`; their count.
    fn publishers_in(&self, room: usize) -> usize {
        let (p, k) = (self.args.publishers, self.args.rooms);
        if room < p {
            (p - room).div_ceil(k)
        } else {
            0
        }
    }
}

pub async fn run(env: &mut Env, args: FanoutArgs) -> Result<Outcome, FanoutError> {
    if args.rooms == 0 {
        return Err(FanoutError::NoRooms);
    }
    if args.publishers == 0 {
        return Err(FanoutError::NoPublishers);
    }
    if !args.rate.is_finite() || args.rate < 0.0 {
        return Err(FanoutError::BadRate);
    }
    if args.window == 0 {
        return Err(FanoutError::NoWindow);
    }
    let protocol = env.common.protocol;
    let channel_prefix = match protocol {
        Protocol::Native => "",
        Protocol::Pusher => CHANNEL_PREFIX,
    };
    let rooms = (0..args.rooms)
        .map(|r| Room {
            name: format!("{channel_prefix}{}-{}-{r}", args.room_prefix, env.run_id),
            ..Room::default()
        })
        .collect();
    let shared = Arc::new(Shared {
        protocol,
        saturated: args.rate == 0.0,
        reply_timeout: env.common.timeout,
        rooms,
        publishers: (0..args.publishers).map(|_| Publisher::default()).collect(),
        latencies: Arc::new(Latencies::default()),
        received: Counter::default(),
        reordered: Counter::default(),
        foreign: Counter::default(),
        other: Counter::default(),
        joined: AtomicU64::new(0),
        join_failed: AtomicU64::new(0),
        publishers_ready: AtomicU64::new(0),
        publishers_done: AtomicU64::new(0),
        disconnected: AtomicU64::new(0),
        message_bytes: AtomicU64::new(0),
        go: CancellationToken::new(),
        stop: CancellationToken::new(),
        interrupt: env.interrupt.clone(),
        errors: env.errors.clone(),
        args: args.clone(),
    });

    // Connect and join.
    let storm_started = Instant::now();
    let tracker = TaskTracker::new();
    let total = args.subscribers + args.publishers;
    let handler_shared = shared.clone();
    let ramp = open_connections(
        env,
        total,
        args.ramp,
        args.concurrency,
        None,
        &tracker,
        move |index, conn| client(handler_shared.clone(), index, conn),
    )
    .await;
    let established = ramp.summary.established;
    let s = shared.clone();
    await_joins(env, established, move || {
        (
            s.joined.load(Ordering::Relaxed),
            s.join_failed.load(Ordering::Relaxed),
        )
    })
    .await;
    let mut warnings = Vec::new();
    if protocol == Protocol::Native {
        check_membership(&shared, &mut warnings);
    }

    // Settle: let the member_joined storm of the join phase drain before measuring (Pusher's
    // private channels have none: 200 ms of quiet).
    env.progress.phase("settle", 0, || (0, String::new()));
    let mut last_other = u64::MAX;
    let mut quiet_since = Instant::now();
    wait_until(
        &env.interrupt,
        env.common.timeout,
        Duration::from_millis(20),
        || {
            let now = shared.other.get();
            if now != last_other {
                last_other = now;
                quiet_since = Instant::now();
            }
            quiet_since.elapsed() >= Duration::from_millis(200)
        },
    )
    .await;

    let join_storm_seconds = quiet_since.saturating_duration_since(storm_started);
    let join_storm_notices = shared.other.get();

    // Publish: the measured phase starts here.
    let publishers_ready = shared.publishers_ready.load(Ordering::Relaxed);
    let meter = Meter::start(&env.common.server_pid);
    // Wire bytes and inflated messages of the measured phase: counted from here to the end of
    // the grace period, as the server's CPU is.
    let wire = env.connector.clone();
    let wire_before = (wire.wire().bytes_read.get(), wire.wire().inflated.get());
    let publish_started = Instant::now();
    shared.go.cancel();
    {
        let s = shared.clone();
        let duration = args.duration;
        env.progress
            .phase("publish", duration.as_secs().max(1), move || {
                let elapsed = publish_started.elapsed();
                let sent: u64 = s
                    .publishers
                    .iter()
                    .map(|p| p.sent.load(Ordering::Relaxed))
                    .sum();
                let received = s.received.get();
                (
                    elapsed.as_secs(),
                    format!(
                        "sent {sent}, received {received} ({:.0}/s)",
                        per(received as f64, elapsed.as_secs_f64())
                    ),
                )
            });
    }
    // Publishers stop at the deadline; a blocked write or stalled window ends within the reply
    // timeout after it.
    wait_until(
        &env.interrupt,
        args.duration + env.common.timeout + Duration::from_secs(1),
        Duration::from_millis(10),
        || shared.publishers_done.load(Ordering::Relaxed) >= publishers_ready,
    )
    .await;
    let publish_seconds = publish_started.elapsed();

    // Grace: wait for deliveries still in flight.
    let expected_total = || -> u64 {
        shared
            .publishers
            .iter()
            .map(|p| p.expected.load(Ordering::Relaxed))
            .sum()
    };
    let mut last_received = shared.received.get();
    let mut last_delivery = Instant::now();
    {
        let s = shared.clone();
        env.progress
            .phase("grace", args.grace.as_millis() as u64, move || {
                let expected: u64 = s
                    .publishers
                    .iter()
                    .map(|p| p.expected.load(Ordering::Relaxed))
                    .sum();
                (0, format!("received {} of {expected}", s.received.get()))
            });
    }
    let grace_deadline = Instant::now() + args.grace;
    loop {
        let received = shared.received.get();
        if received != last_received {
            last_received = received;
            last_delivery = Instant::now();
        }
        if received >= expected_total()
            || Instant::now() >= grace_deadline
            || env.interrupt.is_cancelled()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let usage = meter.stop();
    let wire_bytes = wire.wire().bytes_read.get() - wire_before.0;
    let inflated = wire.wire().inflated.get() - wire_before.1;
    shared.stop.cancel();
    env.progress.finish();

    let received = shared.received.get();
    let expected = expected_total();
    let published: u64 = shared
        .publishers
        .iter()
        .map(|p| p.sent.load(Ordering::Relaxed))
        .sum();
    let max_lag_ns = shared
        .publishers
        .iter()
        .map(|p| p.max_lag_ns.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let delivery_seconds = if received > 0 {
        last_delivery.saturating_duration_since(publish_started)
    } else {
        publish_seconds
    };
    let server_cpu_us_per_delivery = usage
        .server_cpu()
        .filter(|_| received > 0)
        .map(|cpu| round3(cpu.as_secs_f64() * 1e6 / received as f64));

    // Close everything; receivers send a close frame each on their way out.
    if !drain(&tracker, env.common.timeout).await {
        warnings.push("some connections did not close within --timeout".to_owned());
    }
    // After the drain: each receiver flushed its last latencies when it ended.
    let latency = LatencySummary::of(&shared.latencies.merged());
    let lost = expected.saturating_sub(received);
    let results = FanoutResults {
        protocol: protocol.name(),
        subscribers: args.subscribers,
        publishers: args.publishers,
        rooms: args.rooms,
        rate_per_publisher: args.rate,
        payload: args.payload.name(),
        message_size: match shared.message_bytes.load(Ordering::Relaxed) {
            0 => args.size,
            sent => sent as usize,
        },
        compression: CompressionReport {
            offered: env.connector.compression(),
            negotiated: env.connector.compression()
                && ramp.summary.established > 0
                && env.connector.wire().negotiated() == ramp.summary.established,
            connections_negotiated: env.connector.wire().negotiated(),
            extension: env.connector.wire().agreed.get().cloned(),
            inflated_messages: inflated,
        },
        connect: ramp.summary,
        joined: shared.joined.load(Ordering::Relaxed),
        join_storm_seconds: secs(join_storm_seconds),
        join_storm_notices,
        publish_seconds: secs(publish_seconds),
        published,
        publish_rate: round2(per(published as f64, publish_seconds.as_secs_f64())),
        publisher_max_lag_ms: round2(max_lag_ns as f64 / 1e6),
        expected,
        received,
        wire_bytes,
        wire_bytes_per_delivery: (received > 0)
            .then(|| round2(wire_bytes as f64 / received as f64)),
        lost,
        loss_ratio: per(lost as f64, expected as f64),
        reordered: shared.reordered.get(),
        foreign: shared.foreign.get(),
        delivery_seconds: secs(delivery_seconds),
        deliveries_per_second: round2(per(received as f64, delivery_seconds.as_secs_f64())),
        latency,
        receivers_disconnected: shared.disconnected.load(Ordering::Relaxed),
        server_cpu_us_per_delivery,
    };
    if received > expected {
        warnings.push(format!(
            "received {} more deliveries than expected: duplicates, or clients other than ours \
             publishing stamped messages",
            received - expected
        ));
    }
    let slow_consumers: u64 = env
        .errors
        .snapshot()
        .iter()
        .filter(|e| e.cause == Cause::Closed && e.example.contains("1013"))
        .map(|e| e.count)
        .sum();
    if slow_consumers > 0 {
        warnings.push(format!(
            "WARNING: {slow_consumers} receivers were closed by the server as slow consumers \
             (1013): they fell further behind than the server's outbound queue allows (with \
             --rate 0, keep --window below that queue's size)"
        ));
    }
    Ok(Outcome {
        results: Results::Fanout(results),
        usage,
        warnings,
    })
}

fn check_membership(shared: &Shared, warnings: &mut Vec<String>) {
    for room in &shared.rooms {
        let ours = room.joined.load(Ordering::Relaxed);
        let seen = room.members_seen.load(Ordering::Relaxed);
        if ours > 0 && seen > ours {
            warnings.push(format!(
                "room {} reported {seen} members but only {ours} are ours: other clients share it",
                room.name
            ));
        } else if ours > 0 && seen < ours {
            warnings.push(format!(
                "room {}: {ours} of our clients joined but room_joined never reported more than \
                 {seen} members",
                room.name
            ));
        }
    }
}

/// One client's life, in the run's protocol.
async fn client(shared: Arc<Shared>, index: usize, conn: Conn) {
    match shared.protocol {
        Protocol::Native => client_speaking::<Native>(shared, index, conn).await,
        Protocol::Pusher => client_speaking::<Pusher>(shared, index, conn).await,
    }
}

/// Join its room, then receive (and, for a publisher, publish) until the run stops.
async fn client_speaking<F: Framing>(shared: Arc<Shared>, index: usize, mut conn: Conn) {
    let room_index = shared.room_of(index);
    let room = &shared.rooms[room_index];
    match conn
        .join(&room.name, shared.args.since, shared.reply_timeout)
        .await
    {
        Ok(members) => {
            if let Some(members) = members {
                room.members_seen.fetch_max(members, Ordering::Relaxed);
            }
            room.joined.fetch_add(1, Ordering::Relaxed);
            shared.joined.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => {
            shared.errors.record("join", &error);
            shared.join_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let Conn { reader, writer, .. } = conn;
    let receiving = receive::<F>(&shared, index, room_index, reader);
    if index < shared.args.subscribers {
        receiving.await;
    } else {
        let publisher = index - shared.args.subscribers;
        shared.publishers_ready.fetch_add(1, Ordering::Relaxed);
        let publishing = async {
            publish::<F>(&shared, publisher, room_index, &writer).await;
            shared.publishers_done.fetch_add(1, Ordering::Relaxed);
        };
        tokio::join!(receiving, publishing);
    }
    // Best effort: the run is over, a slow close only delays the drain.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.close()).await;
}

/// Reads until the run stops, recording every stamped delivery.
async fn receive<F: Framing>(shared: &Shared, index: usize, room_index: usize, mut reader: Reader) {
    let args = &shared.args;
    let rooms = args.rooms;
    let local_publishers = shared.publishers_in(room_index);
    // Per publisher of this room (local index p / rooms): next expected seq, deliveries seen.
    let mut next_seq = vec![0u64; local_publishers];
    let mut seen = vec![0u64; local_publishers];
    let mut recorder = shared.latencies.recorder(index);
    let error = loop {
        let payload = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return,
            payload = reader.recv() => payload,
        };
        let payload = match payload {
            Ok(payload) => payload,
            Err(error) => break error,
        };
        let now = now_ns();
        match F::parse(&payload) {
            Ok(ServerMessage::RoomMessage {
                message: Some(text),
            }) => match Stamp::decode(&text) {
                Some(stamp)
                    if (stamp.publisher as usize) < args.publishers
                        && stamp.publisher as usize % rooms == room_index =>
                {
                    recorder.record(now.saturating_sub(stamp.sent_ns));
                    shared.received.add(index, 1);
                    let local = stamp.publisher as usize / rooms;
                    if stamp.seq < next_seq[local] {
                        shared.reordered.add(index, 1);
                    } else {
                        next_seq[local] = stamp.seq + 1;
                    }
                    seen[local] += 1;
                    if shared.saturated {
                        delivered(&shared.publishers[stamp.publisher as usize], 1);
                    }
                }
                _ => shared.foreign.add(index, 1),
            },
            Ok(ServerMessage::RoomMessage { message: None }) => shared.foreign.add(index, 1),
            Ok(ServerMessage::Error { message }) => {
                shared.errors.record_cause("receive", Cause::Protocol, || {
                    format!("server replied with error: {message}")
                });
            }
            Ok(_) => shared.other.add(index, 1),
            Err(error) => shared
                .errors
                .record_cause("receive", Cause::Protocol, || error.to_string()),
        }
    };
    recorder.flush();
    if shared.stop.is_cancelled() {
        return;
    }
    // The connection died during the run: count it, and stop owing it deliveries.
    shared.errors.record("receive", &error);
    shared.disconnected.fetch_add(1, Ordering::Relaxed);
    let room = &shared.rooms[room_index];
    room.dead.fetch_add(1, Ordering::Relaxed);
    if shared.saturated {
        for (local, got) in seen.iter().enumerate() {
            let publisher = &shared.publishers[room_index + local * rooms];
            let sent = publisher.sent.load(Ordering::Relaxed);
            delivered(publisher, sent.saturating_sub(*got));
        }
    }
}

/// Adds `n` deliveries to a publisher's window and wakes it when it waits for them.
fn delivered(publisher: &Publisher, n: u64) {
    let total = publisher.delivered.fetch_add(n, Ordering::Relaxed) + n;
    if total >= publisher.wake_at.load(Ordering::Relaxed) {
        publisher.wake_at.store(u64::MAX, Ordering::Relaxed);
        publisher.wake.notify_one();
    }
}

/// Sends stamped messages until the duration or count is reached.
async fn publish<F: Framing>(shared: &Shared, index: usize, room_index: usize, writer: &Writer) {
    tokio::select! {
        _ = shared.go.cancelled() => {}
        _ = shared.stop.cancelled() => return,
    }
    let args = &shared.args;
    let me = &shared.publishers[index];
    let room = &shared.rooms[room_index];
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut text = String::with_capacity(args.size.max(48));
    // The realistic event follows the bare stamp; `x` padding is for `--payload stamp`.
    let padded_to = match args.payload {
        PayloadKind::Stamp => args.size,
        PayloadKind::Realistic => 0,
    };
    let mut seq = 0u64;
    loop {
        if (args.messages > 0 && seq >= args.messages) || shared.interrupt.is_cancelled() {
            break;
        }
        if shared.saturated {
            if Instant::now() >= deadline || !wait_window(shared, me, room, deadline).await {
                break;
            }
        } else {
            // Publishers are spread evenly over one period, so P publishers at R msg/s make a
            // steady P x R msg/s rather than P-message bursts R times a second.
            let phase = index as f64 / (args.publishers as f64 * args.rate);
            let due = started + Duration::from_secs_f64(phase + seq as f64 / args.rate);
            if due >= deadline {
                break;
            }
            let now = Instant::now();
            if due > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = shared.interrupt.cancelled() => break,
                }
            } else {
                me.max_lag_ns
                    .fetch_max((now - due).as_nanos() as u64, Ordering::Relaxed);
            }
        }
        let receivers = room.live_receivers();
        Stamp {
            publisher: index as u32,
            seq,
            sent_ns: now_ns(),
        }
        .encode_into(&mut text, padded_to);
        if args.payload == PayloadKind::Realistic {
            realistic_body(&mut text, index as u32, seq);
        }
        shared
            .message_bytes
            .fetch_max(text.len() as u64, Ordering::Relaxed);
        let frame = match F::room_message(&room.name, &text) {
            Ok(frame) => frame,
            Err(error) => {
                shared.errors.record("publish", &ClientError::Encode(error));
                break;
            }
        };
        // Owed before it is sent, so a fast receiver never sees more delivered than expected.
        me.expected.fetch_add(receivers, Ordering::Relaxed);
        let sent = tokio::time::timeout(shared.reply_timeout, writer.send_text(frame)).await;
        let error = match sent {
            Ok(Ok(())) => {
                me.sent.fetch_add(1, Ordering::Relaxed);
                seq += 1;
                continue;
            }
            Ok(Err(error)) => error,
            Err(_) => ClientError::Timeout("writing a message (the server stopped reading)"),
        };
        me.expected.fetch_sub(receivers, Ordering::Relaxed);
        shared.errors.record("publish", &error);
        break;
    }
}

/// Saturated mode: waits until fewer than `--window` messages per receiver are in flight.
/// Returns false when the deadline passes, Ctrl-C, or no delivery arrives for the reply timeout.
async fn wait_window(shared: &Shared, me: &Publisher, room: &Room, deadline: Instant) -> bool {
    let allowed = shared.args.window * room.live_receivers().max(1);
    loop {
        let expected = me.expected.load(Ordering::Relaxed);
        if expected.saturating_sub(me.delivered.load(Ordering::Relaxed)) < allowed {
            return true;
        }
        // Wake when half the window is free again.
        let target = expected.saturating_sub(allowed / 2);
        me.wake_at.store(target, Ordering::Relaxed);
        if me.delivered.load(Ordering::Relaxed) >= target {
            continue;
        }
        tokio::select! {
            _ = me.wake.notified() => {}
            _ = tokio::time::sleep_until(deadline.into()) => return false,
            _ = shared.interrupt.cancelled() => return false,
            _ = tokio::time::sleep(shared.reply_timeout) => {
                shared.errors.record_cause("publish", Cause::Timeout, || {
                    format!(
                        "no delivery for {:?} with the window full: receivers stalled",
                        shared.reply_timeout
                    )
                });
                return false;
            }
        }
    }
}
