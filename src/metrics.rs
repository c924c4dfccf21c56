//! `GET /metrics` in the Prometheus text format.
//!
//! What costs what: counters and the fan-out histogram are handles registered once at start-up
//! in a recorder owned by the server (not a process-global one, so several servers in one
//! process, as in the tests, keep apart). A counter is an atomic add, once per message or per
//! write syscall, never per recipient. The histogram appends each fan-out's duration to a
//! lock-free bucket (metrics-util's `AtomicBucket`: an atomic slot claim, and one block
//! allocation per 64 samples) that the scrape drains. These are single server-wide values: on
//! hosts with many cores, threads share their cache lines. Gauges (open connections, rooms, queued frames) and
//! the outbox counters are read from the live state when `/metrics` is scraped, so the hot
//! path pays nothing for them.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::admission::Refusal;
use crate::hub::Router;
use crate::outbox::OutboxStats;

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Message types counted in `roomcast_messages_in_total{type}`; the last is everything that
/// did not decode.
pub const MESSAGE_TYPES: [&str; 8] = [
    "broadcast",
    "join_room",
    "leave_room",
    "room_message",
    "private_message",
    "set_metadata",
    "history",
    "invalid",
];

/// The proxies to the application, as `roomcast_proxy_calls_total{proxy}` names them.
pub const PROXIES: [&str; 3] = ["connect", "join", "publish"];

/// What a proxy call came to, as `roomcast_proxy_calls_total{outcome}` names it: the app
/// allowed, allowed with a new message (publish only), refused, or gave no usable answer in
/// time (the call failed closed).
pub const PROXY_OUTCOMES: [&str; 4] = ["allowed", "rewritten", "refused", "unavailable"];

/// Every metric of a server.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub connections_accepted: Counter,
    refused: [Counter; 5],
    pub handshake_failures: Counter,
    messages_in: [Counter; MESSAGE_TYPES.len()],
    pub fanout_deliveries: Counter,
    pub fanout_seconds: Histogram,
    connections_open: Gauge,
    handshakes_pending: Gauge,
    rooms: Gauge,
    clients: Gauge,
    outbound_queue_frames: Gauge,
    outbound_queue_bytes: Gauge,
    frames_out: Counter,
    frames_compressed: Counter,
    slow_consumers_closed: Counter,
    frames_dropped: Counter,
    proxy_calls: [[Counter; PROXY_OUTCOMES.len()]; PROXIES.len()],
    /// 1 while the Redis broker's subscription connection is up (0 without Redis).
    pub redis_connected: Gauge,
    /// Publications for the other nodes that could not be handed to Redis.
    pub redis_publish_dropped: Counter,
    /// Commands Redis answered with an error (the rest of their pipeline ran).
    pub redis_refused: Counter,
    /// Members of dead nodes this node took out of their rooms.
    pub redis_reaped_members: Counter,
    /// Messages of rooms with history that Redis could not keep, delivered to this node's own
    /// members without an offset.
    pub redis_history_unkept: Counter,
    /// `roomcast_webhook_events_total{outcome}`: queued (accepted by the queue), delivered (in a
    /// batch answered 2xx), dropped (the queue was full, or its batch ran out of retries).
    pub webhook_events_queued: Counter,
    pub webhook_events_delivered: Counter,
    pub webhook_events_dropped: Counter,
    /// `roomcast_webhook_requests_total{outcome}`: POSTs answered 2xx, and attempts that failed.
    pub webhook_requests_ok: Counter,
    pub webhook_requests_failed: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("roomcast_fanout_seconds".into()),
                &[
                    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5,
                ],
            )
            .expect("buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let counter = |name: &'static str, help: &'static str| {
            recorder.describe_counter(name.into(), None, help.into());
            recorder.register_counter(&Key::from_static_name(name), &METADATA)
        };
        let labelled = |name: &'static str, label: &'static str, value: &'static str| {
            let key = Key::from_parts(name, vec![Label::from_static_parts(label, value)]);
            recorder.register_counter(&key, &METADATA)
        };
        let gauge = |name: &'static str, help: &'static str| {
            recorder.describe_gauge(name.into(), None, help.into());
            recorder.register_gauge(&Key::from_static_name(name), &METADATA)
        };
        recorder.describe_counter(
            "roomcast_connections_refused_total".into(),
            None,
            "Upgrades refused before the handshake, by reason.".into(),
        );
        recorder.describe_counter(
            "roomcast_messages_in_total".into(),
            None,
            "Client messages received, by type (`invalid`: did not decode).".into(),
        );
        recorder.describe_histogram(
            "roomcast_fanout_seconds".into(),
            None,
            "Time to hand one broadcast or room message to every recipient's queue.".into(),
        );
        recorder.describe_counter(
            "roomcast_webhook_events_total".into(),
            None,
            "Webhook events by outcome: queued, delivered (a 2xx answer), dropped (queue full \
             or retries exhausted)."
                .into(),
        );
        recorder.describe_counter(
            "roomcast_webhook_requests_total".into(),
            None,
            "Webhook POSTs by outcome: ok (2xx) or failed (another status, timeout, connection \
             error; each retry counts)."
                .into(),
        );
        let webhook_events =
            |outcome| labelled("roomcast_webhook_events_total", "outcome", outcome);
        let webhook_requests =
            |outcome| labelled("roomcast_webhook_requests_total", "outcome", outcome);
        let refused = [
            "too_many_from_address",
            "server_full",
            "origin",
            "unauthorized",
            "pending_handshakes",
        ]
        .map(|reason| labelled("roomcast_connections_refused_total", "reason", reason));
        let messages_in =
            MESSAGE_TYPES.map(|kind| labelled("roomcast_messages_in_total", "type", kind));
        recorder.describe_counter(
            "roomcast_proxy_calls_total".into(),
            None,
            "Calls to the application's proxies, by proxy and outcome.".into(),
        );
        let proxy_calls = PROXIES.map(|proxy| {
            PROXY_OUTCOMES.map(|outcome| {
                let key = Key::from_parts(
                    "roomcast_proxy_calls_total",
                    vec![
                        Label::from_static_parts("proxy", proxy),
                        Label::from_static_parts("outcome", outcome),
                    ],
                );
                recorder.register_counter(&key, &METADATA)
            })
        });
        let fanout_seconds = recorder
            .register_histogram(&Key::from_static_name("roomcast_fanout_seconds"), &METADATA);
        Arc::new(Self {
            connections_accepted: counter(
                "roomcast_connections_accepted_total",
                "WebSocket upgrades accepted.",
            ),
            handshake_failures: counter(
                "roomcast_handshake_failures_total",
                "Upgrade requests that were malformed or failed, and failed TLS handshakes.",
            ),
            fanout_deliveries: counter(
                "roomcast_fanout_deliveries_total",
                "Frames handed to recipients' queues by fan-outs (broadcasts, room and private \
                 messages, membership notices).",
            ),
            connections_open: gauge("roomcast_connections_open", "Open WebSocket connections."),
            handshakes_pending: gauge(
                "roomcast_handshakes_pending",
                "Connections that have not finished their HTTP request head.",
            ),
            rooms: gauge("roomcast_rooms", "Rooms with at least one member."),
            clients: gauge("roomcast_clients", "Clients in the directory."),
            outbound_queue_frames: gauge(
                "roomcast_outbound_queue_frames",
                "Frames waiting in all connections' outbound queues.",
            ),
            outbound_queue_bytes: gauge(
                "roomcast_outbound_queue_bytes",
                "Bytes waiting in all connections' outbound queues (a shared frame counts once \
                 per queue).",
            ),
            frames_out: counter(
                "roomcast_frames_out_total",
                "Frames written to sockets completely.",
            ),
            frames_compressed: counter(
                "roomcast_frames_compressed_total",
                "Frames compressed with permessage-deflate (--compression): once per frame, \
                 however many recipients share the compressed bytes.",
            ),
            slow_consumers_closed: counter(
                "roomcast_slow_consumers_closed_total",
                "Connections closed with 1013 because their outbound queue was full.",
            ),
            frames_dropped: counter(
                "roomcast_frames_dropped_total",
                "Frames dropped for full outbound queues (--slow-consumer drop).",
            ),
            webhook_events_queued: webhook_events("queued"),
            webhook_events_delivered: webhook_events("delivered"),
            webhook_events_dropped: webhook_events("dropped"),
            webhook_requests_ok: webhook_requests("ok"),
            webhook_requests_failed: webhook_requests("failed"),
            redis_connected: gauge(
                "roomcast_redis_connected",
                "1 while the Redis broker is subscribed (0 when down or without --redis).",
            ),
            redis_publish_dropped: counter(
                "roomcast_redis_publish_dropped_total",
                "Publications for other nodes dropped: Redis unreachable or too slow.",
            ),
            redis_refused: counter(
                "roomcast_redis_refused_total",
                "Commands Redis answered with an error (a script's, out of memory, a wrong key type); logged at debug.",
            ),
            redis_reaped_members: counter(
                "roomcast_redis_reaped_members_total",
                "Members of dead nodes (lease lapsed) this node took out of their rooms.",
            ),
            redis_history_unkept: counter(
                "roomcast_redis_history_unkept_total",
                "Messages of rooms with history that Redis could not keep: delivered to this node's members without an offset.",
            ),
            refused,
            proxy_calls,
            messages_in,
            fanout_seconds,
            handle,
            recorder,
        })
    }

    /// Counts a refused upgrade.
    pub fn refused(&self, refusal: &Refusal) {
        let index = match refusal {
            Refusal::TooManyFromAddress => 0,
            Refusal::ServerFull => 1,
            Refusal::OriginNotAllowed => 2,
            Refusal::Unauthorized(_) => 3,
            Refusal::TooManyPending => 4,
        };
        self.refused[index].increment(1);
    }

    /// Counts one call to the `proxy` (an index of [`PROXIES`]) that came to `outcome` (an
    /// index of [`PROXY_OUTCOMES`]).
    pub fn proxy_call(&self, proxy: usize, outcome: usize) {
        self.proxy_calls[proxy][outcome].increment(1);
    }

    /// Counts a client message of `kind` (one of [`MESSAGE_TYPES`]).
    #[inline]
    pub fn message_in(&self, kind: usize) {
        self.messages_in[kind].increment(1);
    }

    /// Counts one fan-out of `deliveries` frames that took `elapsed`.
    #[inline]
    pub fn fanout(&self, deliveries: usize, elapsed: Duration) {
        self.fanout_deliveries.increment(deliveries as u64);
        self.fanout_seconds.record(elapsed.as_secs_f64());
    }

    /// Folds the histogram samples recorded since the last call into their buckets. The
    /// recorder keeps every sample until then, so this must run periodically even when nobody
    /// scrapes `/metrics` (the server does it every few seconds), or memory grows.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The exposition text, with the gauges read from the live state first.
    pub fn render(
        &self,
        open: usize,
        pending: usize,
        router: &dyn Router,
        outbox: &OutboxStats,
    ) -> String {
        let (rooms, clients) = router.counts();
        let (mut queued, mut queued_bytes) = (0usize, 0usize);
        router.for_each_connection(&mut |connection| {
            queued += connection.outbox().queued();
            queued_bytes += connection.outbox().queued_bytes();
        });
        self.connections_open.set(open as f64);
        self.handshakes_pending.set(pending as f64);
        self.rooms.set(rooms as f64);
        self.clients.set(clients as f64);
        self.outbound_queue_frames.set(queued as f64);
        self.outbound_queue_bytes.set(queued_bytes as f64);
        let load = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        self.frames_out.absolute(outbox.frames_written.get());
        self.frames_compressed
            .absolute(load(&outbox.frames_compressed));
        self.slow_consumers_closed
            .absolute(load(&outbox.closed_slow));
        self.frames_dropped.absolute(load(&outbox.dropped));
        // Keep the recorder alive with the handles it backs.
        let _ = &self.recorder;
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::LocalHub;

    #[test]
    fn upkeep_folds_histogram_samples_into_the_exposition() {
        let metrics = Metrics::new();
        for _ in 0..1000 {
            metrics.fanout(10, Duration::from_micros(3));
        }
        metrics.upkeep();
        let text = metrics.render(0, 0, &LocalHub::new(), &OutboxStats::default());
        assert!(
            text.contains("roomcast_fanout_seconds_count 1000"),
            "{text}"
        );
        assert!(
            text.contains("roomcast_fanout_deliveries_total 10000"),
            "{text}"
        );
    }
}
