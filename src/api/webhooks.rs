//! Webhooks: what happened to connections and rooms on this node, POSTed to the application
//! (`--webhook-url`) in signed batches, retried until delivered or given up on.
//!
//! This module owns the whole road from an event to the app: [`Webhooks`], the handle a session
//! emits through, and [`WebhookSender`], the one task that encodes, signs and POSTs. They are
//! joined by a bounded queue, and that shape is the point of the design:
//!
//! - **Emitting never waits.** A session calls [`Webhooks::emit`] from its connection's task,
//!   which must never block on the app: the event goes into the queue with a `try_send`, and
//!   when the queue is full (`--webhook-queue`, the app is slow or down) it is dropped, counted
//!   in `roomcast_webhook_events_total{outcome="dropped"}` and logged at most once per
//!   [`DROP_WARNING_INTERVAL`]. Memory stays bounded whatever the app does.
//! - **One batch in flight.** The sender takes what is queued (up to `--webhook-batch` events,
//!   after a [`LINGER`] that lets a burst gather), POSTs it, and takes the next batch only when
//!   this one was delivered or given up on: events reach the app in the order they happened on
//!   this node, and batches grow by themselves while the app is slow.
//! - **At-least-once, deduplicated by id.** A batch that gets no 2xx answer (another status, no
//!   answer within `--webhook-timeout`, a connection error) is sent again after an exponential
//!   backoff (`--webhook-retry-backoff` doubling up to [`MAX_BACKOFF`]), byte for byte: the same
//!   ids and the same signature, so an app that did process a batch whose answer was lost can
//!   recognise it. Ids are a random 64-bit prefix drawn at start-up and a sequence number, so
//!   they stay unique across restarts. After `--webhook-retries` retries the batch is dropped,
//!   counted and logged.
//! - **Signed.** `X-Roomcast-Signature` is the lowercase hex HMAC-SHA256 of the exact body with
//!   `--webhook-secret`: the app checks that the call comes from us before trusting it.
//!
//! The queue and the sender are generic over a [`Format`] (the body and the headers that sign
//! it): roomcast's own is [`RoomcastFormat`]; the Pusher apps' webhooks are another format on
//! the same road.
//!
//! Without `--webhook-url` none of this exists: `Node::webhooks` is `None`, no task runs, and a
//! connect, join or leave pays one `Option` check.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{StatusCode, Uri};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::app_client::{AppClient, AppError, BadUrl};
use crate::config::Config;
use crate::hub::Member;
use crate::metrics::Metrics;

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "x-roomcast-signature";

/// How long the sender waits after the first event of a batch for more to arrive, so that a
/// connect followed by joins goes in one POST rather than one each. Short enough that an app
/// hears of an event well within a human's notice; under load, batches form during the POST
/// anyway and this costs nothing more.
pub const LINGER: Duration = Duration::from_millis(10);

/// The longest wait between two attempts of one batch: the doubling stops here, so an app that
/// comes back is heard from again within this long.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// At most one "events dropped" warning per this long: a full queue drops events at the rate
/// they happen, and a log line each would be a second flood.
pub const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(5);

/// The largest answer body read from the app (it is not used, but read whole so that the
/// kept-alive connection can carry the next batch). A larger one counts as a failed attempt.
const MAX_ANSWER: usize = 64 * 1024;

/// What happened, as the `event` field names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A seed-protocol connection opened (got its welcome). Echo connections send nothing.
    ClientConnected,
    /// A connection ended, whatever the reason; after the `member_left` of each of its rooms.
    ClientDisconnected,
    /// A connection joined a room.
    MemberJoined,
    /// A connection left a room, by `leave_room` or by ending.
    MemberLeft,
    /// A room got its first member: on one node, sent just before that member's
    /// `member_joined`; in a cluster, once, by the node whose join made the cluster-wide count 1
    /// (the broker sends it, see [`crate::broker::Broker::reports_room_events`]).
    RoomOccupied,
    /// A room's last member left: on one node, sent just after that member's `member_left`; in
    /// a cluster, once, by the node whose leave (or reaping) made the count 0.
    RoomVacated,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ClientConnected => "client_connected",
            EventKind::ClientDisconnected => "client_disconnected",
            EventKind::MemberJoined => "member_joined",
            EventKind::MemberLeft => "member_left",
            EventKind::RoomOccupied => "room_occupied",
            EventKind::RoomVacated => "room_vacated",
        }
    }
}

/// One event waiting in the queue. Its id is given by the sender when it is batched, so an
/// event dropped at a full queue uses no number and emitting touches no shared counter.
#[derive(Debug)]
pub struct Event {
    kind: EventKind,
    client_id: Arc<str>,
    user_id: Option<Arc<str>>,
    room: Option<Arc<str>>,
    time_ms: u64,
}

/// Why one attempt to deliver a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The app answered, but not with a 2xx.
    #[error("the app answered {0}")]
    Status(StatusCode),
    /// No usable answer: a timeout, a connection error, an answer too large.
    #[error(transparent)]
    Call(#[from] AppError),
}

/// Why webhooks cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookConfigError {
    #[error("--webhook-url {0}")]
    BadUrl(#[from] BadUrl),
    /// `Config::validate` refuses this first; kept for embedders that skip it.
    #[error("--webhook-url needs --webhook-secret")]
    NoSecret,
}

/// How a batch of events is written for the receiver: its body and the headers that sign it.
/// roomcast's own webhooks are one format ([`RoomcastFormat`]); the Pusher protocol's are
/// another (`crate::pusher::webhooks`), delivered by the same [`Sender`].
pub trait Format: Send + 'static {
    type Event: Send + 'static;
    /// The body of `batch` (called once per batch: retries send the same bytes).
    fn encode(&mut self, batch: &[Self::Event]) -> Bytes;
    /// The headers sent with `body` (its signature).
    fn headers(&self, body: &[u8]) -> Vec<(HeaderName, HeaderValue)>;
}

/// The emitting side of one format's webhooks: a bounded queue that never waits.
pub struct Queue<E> {
    queue: mpsc::Sender<E>,
    metrics: Arc<Metrics>,
    /// The origin of `last_drop_warning`.
    started: Instant,
    /// Milliseconds after `started` of the last "events dropped" warning, plus one (0: never).
    last_drop_warning: AtomicU64,
    /// Events dropped since that warning, for the next one.
    dropped_unreported: AtomicU64,
    /// Events of the batch the sender holds (being sent or waiting to be retried): what a
    /// shutdown that stops the sender mid-batch leaves undelivered besides the queue.
    in_flight: Arc<AtomicUsize>,
}

/// A queue and the sender that delivers it to `url` in `format`, with `config`'s queue size,
/// batch size, timeout and retries (`--webhook-*`).
pub fn channel<F: Format>(
    config: &Config,
    url: Uri,
    format: F,
    metrics: Arc<Metrics>,
) -> (Queue<F::Event>, Sender<F>) {
    let (queue, events) = mpsc::channel(config.webhook_queue.max(1));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let sender = Sender {
        events,
        format,
        client: AppClient::new(),
        url,
        batch: config.webhook_batch.max(1),
        timeout: config.webhook_timeout,
        retries: config.webhook_retries,
        backoff: config.webhook_retry_backoff,
        metrics: metrics.clone(),
        in_flight: in_flight.clone(),
    };
    let queue = Queue {
        queue,
        metrics,
        started: Instant::now(),
        last_drop_warning: AtomicU64::new(0),
        dropped_unreported: AtomicU64::new(0),
        in_flight,
    };
    (queue, sender)
}

/// roomcast's own webhooks, in `Node::webhooks`: shared by every connection of the node.
pub struct Webhooks {
    queue: Queue<Event>,
}

/// The task delivering roomcast's own webhooks.
pub type WebhookSender = Sender<RoomcastFormat>;

impl Webhooks {
    /// The handle and its sender for `config`, or `None` without `--webhook-url`. The URL is
    /// checked here, at start-up, so that a bad one stops the server rather than every batch.
    pub fn from_config(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<Option<(Webhooks, WebhookSender)>, WebhookConfigError> {
        let Some(url) = &config.webhook_url else {
            return Ok(None);
        };
        let url = AppClient::parse_url(url)?;
        let secret = config
            .webhook_secret
            .as_deref()
            .ok_or(WebhookConfigError::NoSecret)?;
        let format = RoomcastFormat {
            key: Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .expect("HMAC takes keys of any length"),
            prefix: rand::random(),
            next_seq: 0,
        };
        let (queue, sender) = channel(config, url, format, metrics);
        Ok(Some((Webhooks { queue }, sender)))
    }

    /// Queues `kind` for `member` (in `room`, for room events) without ever waiting: when the
    /// queue is full the event is dropped and counted. Costs two reference-count increments,
    /// one allocation for a room name, a clock read and the queue's atomic operations.
    pub fn emit(&self, kind: EventKind, member: &Member, room: Option<&str>) {
        self.emit_for(kind, &member.client_id, member.user_id.as_ref(), room);
    }

    /// [`Webhooks::emit`] for a connection known by its ids only (one on a dead node, which a
    /// reaper speaks for).
    pub fn emit_for(
        &self,
        kind: EventKind,
        client_id: &Arc<str>,
        user_id: Option<&Arc<str>>,
        room: Option<&str>,
    ) {
        self.queue.push(Event {
            kind,
            client_id: client_id.clone(),
            user_id: user_id.cloned(),
            room: room.map(Arc::from),
            time_ms: unix_millis(),
        });
    }

    /// Events not yet delivered: queued, plus the batch the sender holds.
    pub fn undelivered(&self) -> usize {
        self.queue.undelivered()
    }
}

impl<E> Queue<E> {
    /// Queues `event` without ever waiting: when the queue is full it is dropped and counted.
    pub fn push(&self, event: E) {
        match self.queue.try_send(event) {
            Ok(()) => self.metrics.webhook_events_queued.increment(1),
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped(),
            // The sender has stopped: a connection that outlived the shutdown's deadline. The
            // server logged what was left undelivered then.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.webhook_events_dropped.increment(1)
            }
        }
    }

    /// Counts an event the full queue refused, and warns now and then.
    fn dropped(&self) {
        self.metrics.webhook_events_dropped.increment(1);
        self.dropped_unreported.fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_drop_warning.load(Ordering::Relaxed);
        let interval = DROP_WARNING_INTERVAL.as_millis() as u64;
        if last != 0 && now.saturating_sub(last) < interval {
            return;
        }
        // One thread wins the right to warn; the others count on.
        if self
            .last_drop_warning
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let dropped = self.dropped_unreported.swap(0, Ordering::Relaxed);
            warn!(
                dropped,
                queue = self.queue.max_capacity(),
                "webhook queue full: events dropped (the app is slow or down)"
            );
        }
    }

    /// Events not yet delivered: queued, plus the batch the sender holds.
    pub fn undelivered(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity() + self.in_flight.load(Ordering::Relaxed)
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The task that delivers the queued events, one batch at a time; see the module doc.
pub struct Sender<F: Format> {
    events: mpsc::Receiver<F::Event>,
    format: F,
    client: AppClient,
    url: Uri,
    batch: usize,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    metrics: Arc<Metrics>,
    in_flight: Arc<AtomicUsize>,
}

/// roomcast's own body (`{"events":[...]}`, each with an id) and `X-Roomcast-Signature`.
pub struct RoomcastFormat {
    /// The HMAC state after the key: cloned for each batch instead of hashing the key again.
    key: Hmac<Sha256>,
    /// The random half of every id, drawn at start-up.
    prefix: u64,
    next_seq: u64,
}

impl Format for RoomcastFormat {
    type Event = Event;

    /// The body of `batch` with fresh ids.
    fn encode(&mut self, batch: &[Event]) -> Bytes {
        let events = batch
            .iter()
            .map(|event| {
                let seq = self.next_seq;
                self.next_seq += 1;
                WireEvent {
                    id: format!("{:016x}-{seq}", self.prefix),
                    event: event.kind.as_str(),
                    client_id: &event.client_id,
                    user_id: event.user_id.as_deref(),
                    room: event.room.as_deref(),
                    time_ms: event.time_ms,
                }
            })
            .collect();
        let body = serde_json::to_vec(&Body { events }).expect("events serialize");
        Bytes::from(body)
    }

    fn headers(&self, body: &[u8]) -> Vec<(HeaderName, HeaderValue)> {
        let signature = HeaderValue::from_str(&sign(&self.key, body)).expect("hex is ASCII");
        vec![(HeaderName::from_static(SIGNATURE_HEADER), signature)]
    }
}

/// The body's shape, borrowed from the events.
#[derive(Serialize)]
struct Body<'a> {
    events: Vec<WireEvent<'a>>,
}

#[derive(Serialize)]
struct WireEvent<'a> {
    id: String,
    event: &'static str,
    client_id: &'a str,
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    time_ms: u64,
}

/// The lowercase hex HMAC-SHA256 of `body` under `key`.
pub fn sign(key: &Hmac<Sha256>, body: &[u8]) -> String {
    let mut mac = key.clone();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The wait before retry number `retry` (1 for the first): `initial` doubled each time, at most
/// [`MAX_BACKOFF`].
fn backoff(initial: Duration, retry: u32) -> Duration {
    let factor = 1u32 << retry.saturating_sub(1).min(16);
    initial.saturating_mul(factor).min(MAX_BACKOFF)
}

impl<F: Format> Sender<F> {
    /// The host the webhooks go to, for the start-up log line (the URL itself may carry
    /// credentials).
    pub fn host(&self) -> &str {
        self.url.host().unwrap_or("")
    }

    /// Delivers batches until `done` is cancelled, then what is still queued, and returns once
    /// the queue is empty. The server cancels `done` after its drain (so the disconnects of the
    /// drained connections are queued by then) and stops waiting for this task at the drain
    /// deadline: a batch still being retried then is not waited for.
    pub async fn run(mut self, done: CancellationToken) {
        let mut batch = Vec::with_capacity(self.batch);
        loop {
            if done.is_cancelled() {
                self.take_queued(&mut batch);
                if batch.is_empty() {
                    return;
                }
            } else {
                tokio::select! {
                    biased;
                    taken = self.events.recv_many(&mut batch, self.batch) => {
                        if taken == 0 {
                            return; // every handle is gone: nothing more can come
                        }
                    }
                    _ = done.cancelled() => continue,
                }
                if batch.len() < self.batch {
                    tokio::time::sleep(LINGER).await;
                    self.take_queued(&mut batch);
                }
            }
            self.in_flight.store(batch.len(), Ordering::Relaxed);
            self.deliver(&batch).await;
            self.in_flight.store(0, Ordering::Relaxed);
            batch.clear();
        }
    }

    /// Moves queued events into `batch` up to the batch size, without waiting.
    fn take_queued(&mut self, batch: &mut Vec<F::Event>) {
        while batch.len() < self.batch {
            match self.events.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => return,
            }
        }
    }

    /// Sends one batch until a 2xx answer or the last retry; the same bytes every time.
    async fn deliver(&mut self, batch: &[F::Event]) {
        let body = self.format.encode(batch);
        let headers = self.format.headers(&body);
        let count = batch.len() as u64;
        let mut retry = 0;
        loop {
            let error = match self
                .client
                .post_json(&self.url, body.clone(), &headers, self.timeout, MAX_ANSWER)
                .await
            {
                Ok(answer) if answer.status.is_success() => {
                    self.metrics.webhook_requests_ok.increment(1);
                    self.metrics.webhook_events_delivered.increment(count);
                    if retry > 0 {
                        debug!(
                            events = count,
                            retry, "webhook batch delivered after retries"
                        );
                    }
                    return;
                }
                Ok(answer) => DeliveryError::Status(answer.status),
                Err(error) => DeliveryError::Call(error),
            };
            self.metrics.webhook_requests_failed.increment(1);
            if retry == self.retries {
                self.metrics.webhook_events_dropped.increment(count);
                warn!(
                    events = count,
                    attempts = retry + 1,
                    %error,
                    "webhook batch dropped: no attempt was answered with a 2xx"
                );
                return;
            }
            retry += 1;
            let wait = backoff(self.backoff, retry);
            // The first failure of a batch is worth a line; the rest of its retries are in
            // the metrics and at debug.
            if retry == 1 {
                warn!(events = count, %error, retry_in = ?wait, "webhook batch failed: retrying");
            } else {
                debug!(events = count, %error, retry, retry_in = ?wait, "webhook batch failed");
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let initial = Duration::from_millis(500);
        let waits: Vec<u64> = (1..=9)
            .map(|retry| backoff(initial, retry).as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(backoff(initial, u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_body_lists_the_events_with_unique_ids_and_a_room_only_for_room_events() {
        let mut config = Config::with_listen("127.0.0.1:0".parse().unwrap());
        config.webhook_url = Some("http://127.0.0.1:9/hooks".into());
        config.webhook_secret = Some("s".into());
        let (_webhooks, mut sender) = Webhooks::from_config(&config, Metrics::new())
            .unwrap()
            .unwrap();
        let event = |kind, room: Option<&str>| Event {
            kind,
            client_id: Arc::from("client_1"),
            user_id: None,
            room: room.map(Arc::from),
            time_ms: 1_700_000_000_000,
        };
        let batch = [
            event(EventKind::ClientConnected, None),
            event(EventKind::RoomOccupied, Some("lobby")),
        ];
        let first: serde_json::Value =
            serde_json::from_slice(&sender.format.encode(&batch)).unwrap();
        let prefix = format!("{:016x}", sender.format.prefix);
        assert_eq!(
            first,
            serde_json::json!({"events": [
                {"id": format!("{prefix}-0"), "event": "client_connected",
                 "client_id": "client_1", "user_id": null, "time_ms": 1_700_000_000_000u64},
                {"id": format!("{prefix}-1"), "event": "room_occupied",
                 "client_id": "client_1", "user_id": null, "room": "lobby",
                 "time_ms": 1_700_000_000_000u64},
            ]})
        );
        let second: serde_json::Value =
            serde_json::from_slice(&sender.format.encode(&batch)).unwrap();
        assert_eq!(second["events"][0]["id"], format!("{prefix}-2"));
    }

    #[test]
    fn the_signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        let key = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        assert_eq!(
            sign(&key, b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
