//! The Redis broker (`--redis URL`): nodes behind a load balancer share rooms and broadcasts
//! through Redis pub/sub.
//!
//! How a publication travels, and why this way:
//! - **Local members first, synchronously.** The sending node delivers to its own recipients
//!   straight into its hub, exactly as the memory broker does, then hands one encoded envelope
//!   to Redis for the other nodes. Local members keep the single-node semantics to the letter
//!   (who receives what, in which order relative to joins and leaves) and pay no round trip to
//!   Redis; a node whose Redis is down still serves its own clients.
//! - **Once across Redis, once encoded per receiving node.** The envelope (origin node, target,
//!   sender, timestamp, the message's raw JSON) is serialized once per publication; each node
//!   that receives it decodes it once and its hub encodes the wire frame once for all its
//!   recipients. A node skips envelopes it sent itself (pub/sub hands them back once).
//! - **Subscribed only where needed.** A node subscribes to a room's channel while it has local
//!   members (the hub tells it of the first join and the last leave; calls are counted, as they
//!   can interleave), to the broadcast channel always, and to one channel per local client and
//!   per user with local connections, which is how a private message finds its recipient.
//! - **Private messages.** To a client or user of this node: delivered here at once (a user's
//!   other nodes get the envelope on the user's channel). Otherwise the id is published on the
//!   client channel, then the user channel; Redis answers how many nodes received it, so "not
//!   found" is exact and needs no directory that a crashed node could leave stale (its
//!   subscriptions end with its connection). The sender's session waits for that answer, its
//!   later messages queued behind, so its replies keep their order.
//! - **Order.** One sender's publications go out on one connection in order, and Redis keeps a
//!   channel's order, so every node sees one sender's messages in the order sent. A room has no
//!   single total order across nodes: two senders on two nodes may be seen in different orders
//!   on their own nodes (one total order would cost every local delivery a Redis round trip).
//! - **Faults.** Publishing goes through a bounded queue to one task that pipelines `PUBLISH`es
//!   on a reconnecting connection; when Redis is unreachable or the queue is full, publications
//!   for the other nodes are dropped and counted (local delivery is unaffected). The subscriber
//!   task reconnects with backoff and subscribes again to every room it has members in. Each
//!   change of state is logged and shown in `roomcast_redis_connected`.
//!
//! Not yet across nodes (the next steps of the cluster issue): member counts, presence and the
//! webhooks' room events are per node.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{Broker, Delivery, Publication, Target};
use crate::hub::{Member, RecipientNotFound, Router};
use crate::metrics::Metrics;
use crate::protocol::Body;

/// Publications waiting for the publisher task; beyond this (Redis slow or down) they are
/// dropped for the other nodes.
const PUBLISH_QUEUE: usize = 65_536;

/// `PUBLISH`es sent in one pipeline, one round trip.
const PIPELINE: usize = 256;

/// Reconnection backoff: from the first, doubling up to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How long connecting to Redis, and one round trip, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often an idle subscription connection proves it is alive (a `SUBSCRIBE` of the broadcast
/// channel again, which Redis answers and otherwise ignores): a connection that died without a
/// FIN (a partition, a paused VM) is noticed within this plus [`RESPONSE_TIMEOUT`].
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// A URL `--redis` cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRedisUrl(String);

/// Checks `url` the way the broker will open it.
pub fn check_url(url: &str) -> Result<(), BadRedisUrl> {
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| BadRedisUrl(e.to_string()))
}

/// A channel whose subscription may have to change: the subscriber task settles it on what the
/// count map says when it gets to it.
struct Control(Arc<str>);

/// One `PUBLISH` for the publisher task; `reply` wants the number of nodes that received it.
struct Outgoing {
    channel: String,
    payload: Bytes,
    reply: Option<oneshot::Sender<i64>>,
}

/// One publication on its way between nodes.
#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    /// The node that published it.
    #[serde(rename = "n")]
    node: u64,
    /// `r` a room, `b` everyone, `p` a client or user (private message).
    #[serde(rename = "k")]
    kind: char,
    /// The room, or the client or user id.
    #[serde(rename = "t", borrow, default)]
    target: Cow<'a, str>,
    #[serde(rename = "f", borrow)]
    from: Cow<'a, str>,
    #[serde(rename = "ts")]
    timestamp: u64,
    #[serde(rename = "m", borrow)]
    message: Message<'a>,
}

/// A message body inside an envelope: raw JSON, as it will be relayed (a server's text,
/// written as a JSON string).
enum Message<'a> {
    Raw(&'a RawValue),
    Owned(Box<RawValue>),
}

impl Message<'_> {
    fn raw(&self) -> &RawValue {
        match self {
            Message::Raw(raw) => raw,
            Message::Owned(owned) => owned,
        }
    }
}

impl Serialize for Message<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.raw().serialize(serializer)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Message<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(deserializer).map(Message::Raw)
    }
}

/// Channel names under `--redis-prefix`.
struct Channels {
    prefix: String,
}

impl Channels {
    fn room(&self, room: &str) -> String {
        format!("{}:room:{room}", self.prefix)
    }

    fn broadcast(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }

    fn client(&self, id: &str) -> String {
        format!("{}:client:{id}", self.prefix)
    }

    fn user(&self, id: &str) -> String {
        format!("{}:user:{id}", self.prefix)
    }
}

/// The broker: local delivery, plus Redis for the other nodes.
pub struct RedisBroker {
    hub: Arc<dyn Router>,
    /// This node's id in envelopes, random per process.
    node: u64,
    channels: Arc<Channels>,
    publish: mpsc::Sender<Outgoing>,
    control: mpsc::UnboundedSender<Control>,
    /// The channels this node needs (rooms with local members, local clients and users), with
    /// how many reasons it has for each: the subscriber task resubscribes to these after a
    /// reconnection.
    wanted: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    metrics: Arc<Metrics>,
}

impl RedisBroker {
    /// Connects lazily: the tasks start now and reach Redis when it answers; meanwhile local
    /// delivery works. Must be called within the tokio runtime.
    pub fn start(url: &str, prefix: &str, hub: Arc<dyn Router>, metrics: Arc<Metrics>) -> Self {
        let client = redis::Client::open(url).expect("checked by Config::validate");
        let node = rand::random::<u64>();
        let channels = Arc::new(Channels {
            prefix: prefix.to_owned(),
        });
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        let (control, commands) = mpsc::unbounded_channel();
        let wanted = Arc::new(Mutex::new(HashMap::new()));
        let sessions = Arc::new(AtomicU64::new(0));
        tokio::spawn(publisher(
            client.clone(),
            queue,
            sessions.clone(),
            metrics.clone(),
        ));
        tokio::spawn(subscriber(Subscriber {
            client,
            sessions,
            node,
            channels: channels.clone(),
            commands,
            wanted: wanted.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
        }));
        info!(
            node = format_args!("{node:016x}"),
            prefix, "redis broker started"
        );
        Self {
            hub,
            node,
            channels,
            publish,
            control,
            wanted,
            metrics,
        }
    }

    /// One more reason to be subscribed to `channel`.
    fn want(&self, channel: String) {
        let mut wanted = lock(&self.wanted);
        let channel: Arc<str> = Arc::from(channel);
        let count = wanted.entry(channel.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            let _ = self.control.send(Control(channel));
        }
    }

    /// One reason fewer; the last one unsubscribes.
    fn unwant(&self, channel: &str) {
        let mut wanted = lock(&self.wanted);
        let Some((key, count)) = wanted.get_key_value(channel).map(|(k, c)| (k.clone(), *c)) else {
            return;
        };
        if count <= 1 {
            wanted.remove(channel);
            let _ = self.control.send(Control(key));
        } else if let Some(count) = wanted.get_mut(channel) {
            *count -= 1;
        }
    }

    /// The envelope of `publication`, serialized once.
    fn envelope(&self, publication: &Publication<'_>) -> Bytes {
        let (kind, target) = match publication.target {
            Target::Room(room) => ('r', room),
            Target::Everyone => ('b', ""),
            Target::Recipient(id) => ('p', id),
        };
        let message = match &publication.message {
            Body::Raw(raw) => Message::Raw(raw),
            Body::Text(text) => {
                Message::Owned(serde_json::value::to_raw_value(text).expect("a string serializes"))
            }
        };
        let envelope = Envelope {
            node: self.node,
            kind,
            target: Cow::Borrowed(target),
            from: Cow::Borrowed(publication.from),
            timestamp: publication.timestamp,
            message,
        };
        Bytes::from(serde_json::to_vec(&envelope).expect("an envelope serializes"))
    }

    /// Queues one `PUBLISH` without waiting; a full queue drops it, counted.
    fn send(&self, channel: String, payload: Bytes) {
        let outgoing = Outgoing {
            channel,
            payload,
            reply: None,
        };
        if self.publish.try_send(outgoing).is_err() {
            self.metrics.redis_publish_dropped.increment(1);
        }
    }

    /// A private message: here at once when the id is a local client, or a user with local
    /// connections (whose other nodes get it on the user's channel); otherwise Redis says
    /// whether any node has the client, then the user.
    fn publish_private(&self, id: &str, publication: &Publication<'_>) -> Delivery {
        let local = self.hub.deliver(publication);
        let is_local_client = local.is_ok()
            && self
                .hub
                .connections_of(id)
                .iter()
                .any(|member| &*member.client_id == id);
        if is_local_client {
            return Delivery::Done(local);
        }
        let payload = self.envelope(publication);
        if let Ok(delivered) = local {
            self.send(self.channels.user(id), payload);
            return Delivery::Done(Ok(delivered));
        }
        let (answer, delivery) = oneshot::channel();
        let queue = self.publish.clone();
        let (client, user) = (self.channels.client(id), self.channels.user(id));
        tokio::spawn(async move {
            // No count back: Redis did not take it (down), and the sender is not told "not
            // found" of a recipient that may well exist.
            let Some(received) = publish_counted(&queue, client, payload.clone()).await else {
                return;
            };
            if received > 0 {
                let _ = answer.send(Ok(1));
                return;
            }
            let Some(received) = publish_counted(&queue, user, payload).await else {
                return;
            };
            let _ = answer.send(if received > 0 {
                Ok(received as usize)
            } else {
                Err(RecipientNotFound)
            });
        });
        Delivery::Later(delivery)
    }
}

/// Publishes through the publisher task (in order with everything queued before) and returns
/// how many nodes received it, or `None` when Redis did not take it.
async fn publish_counted(
    queue: &mpsc::Sender<Outgoing>,
    channel: String,
    payload: Bytes,
) -> Option<i64> {
    let (reply, received) = oneshot::channel();
    let outgoing = Outgoing {
        channel,
        payload,
        reply: Some(reply),
    };
    queue.send(outgoing).await.ok()?;
    received.await.ok()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map is a few counters changed in single steps: a panic elsewhere leaves it
    // consistent.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker for RedisBroker {
    fn publish(&self, publication: &Publication<'_>) -> Delivery {
        let channel = match publication.target {
            Target::Room(room) => self.channels.room(room),
            Target::Everyone => self.channels.broadcast(),
            Target::Recipient(id) => return self.publish_private(id, publication),
        };
        let local = self.hub.deliver(publication);
        self.send(channel, self.envelope(publication));
        Delivery::Done(local)
    }

    fn subscribe(&self, room: &str) {
        self.want(self.channels.room(room));
    }

    fn unsubscribe(&self, room: &str) {
        self.unwant(&self.channels.room(room));
    }

    fn connected(&self, member: &Member) {
        self.want(self.channels.client(&member.client_id));
        if let Some(user) = &member.user_id {
            self.want(self.channels.user(user));
        }
    }

    fn disconnected(&self, member: &Member) {
        self.unwant(&self.channels.client(&member.client_id));
        if let Some(user) = &member.user_id {
            self.unwant(&self.channels.user(user));
        }
    }
}

fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(BACKOFF_MAX)
}

/// Sends queued envelopes, many `PUBLISH`es per round trip, until the broker is dropped.
async fn publisher(
    client: redis::Client,
    mut queue: mpsc::Receiver<Outgoing>,
    sessions: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT);
    let mut connection: Option<ConnectionManager> = None;
    // The subscriber's session the connection was made in: a newer one means Redis went away
    // meanwhile, and this connection (whose next command would fail to find that out) is
    // replaced before it is used, so the first publications after a Redis restart go through.
    let mut made_in = u64::MAX;
    let mut backoff = BACKOFF_FIRST;
    let mut batch: Vec<Outgoing> = Vec::with_capacity(PIPELINE);
    loop {
        if queue.recv_many(&mut batch, PIPELINE).await == 0 {
            return; // the broker is gone
        }
        let session = sessions.load(Ordering::Acquire);
        if session != made_in {
            connection = None;
        }
        if connection.is_none() {
            made_in = session;
            match client
                .get_connection_manager_with_config(config.clone())
                .await
            {
                Ok(manager) => {
                    backoff = BACKOFF_FIRST;
                    connection = Some(manager);
                }
                Err(error) => {
                    debug!(%error, "redis publisher cannot connect");
                    // This batch and what waited meanwhile cannot be sent: dropped, counted
                    // (a private message waiting on a count learns it from its reply's end);
                    // then a pause before the next attempt.
                    let mut dropped = batch.len() as u64;
                    batch.clear();
                    while queue.try_recv().is_ok() {
                        dropped += 1;
                    }
                    metrics.redis_publish_dropped.increment(dropped);
                    tokio::time::sleep(backoff).await;
                    backoff = next_backoff(backoff);
                    continue;
                }
            }
        }
        let mut pipe = redis::pipe();
        for outgoing in &batch {
            pipe.cmd("PUBLISH")
                .arg(&outgoing.channel)
                .arg(outgoing.payload.as_ref());
        }
        let manager = connection.as_mut().expect("connected above");
        match pipe.query_async::<Vec<i64>>(manager).await {
            Ok(received) => {
                for (outgoing, received) in batch.drain(..).zip(received) {
                    if let Some(reply) = outgoing.reply {
                        let _ = reply.send(received);
                    }
                }
            }
            Err(error) => {
                // The manager reconnects by itself on the next command; the replies dropped
                // with the batch tell whoever waits that Redis did not take it.
                debug!(%error, publications = batch.len(), "redis publish failed");
                metrics.redis_publish_dropped.increment(batch.len() as u64);
            }
        }
        batch.clear();
    }
}

/// The subscriber task's state.
struct Subscriber {
    client: redis::Client,
    /// Counts the subscription sessions (one per connection made): the publisher makes a new
    /// connection when it changes.
    sessions: Arc<AtomicU64>,
    node: u64,
    channels: Arc<Channels>,
    commands: mpsc::UnboundedReceiver<Control>,
    wanted: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    hub: Arc<dyn Router>,
    metrics: Arc<Metrics>,
}

/// Why a subscription connection ended.
enum Ended {
    /// The broker was dropped: stop.
    BrokerGone,
    /// The connection failed: connect again.
    Lost,
}

/// Keeps one pub/sub connection subscribed to the broadcast channel and every room with local
/// members, delivering what arrives into the hub; reconnects with backoff.
async fn subscriber(mut state: Subscriber) {
    let mut backoff = BACKOFF_FIRST;
    let mut warned = false;
    loop {
        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT, state.client.get_async_pubsub()).await;
        let pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(error)) => {
                if !warned {
                    warn!(%error, "redis unreachable: serving local clients only, retrying");
                    warned = true;
                }
                if !wait_or_stop(&mut state, backoff).await {
                    return;
                }
                backoff = next_backoff(backoff);
                continue;
            }
            Err(_) => {
                if !warned {
                    warn!("redis connection timed out: serving local clients only, retrying");
                    warned = true;
                }
                if !wait_or_stop(&mut state, backoff).await {
                    return;
                }
                backoff = next_backoff(backoff);
                continue;
            }
        };
        match serve(&mut state, pubsub).await {
            Ended::BrokerGone => return,
            Ended::Lost => {
                state.metrics.redis_connected.set(0.0);
                warn!("redis connection lost: serving local clients only, reconnecting");
                warned = true;
                backoff = BACKOFF_FIRST;
            }
        }
    }
}

/// Sleeps `backoff` while dropping subscription changes (the room map is the truth, read again
/// on connecting); false when the broker is gone.
async fn wait_or_stop(state: &mut Subscriber, backoff: Duration) -> bool {
    let sleep = tokio::time::sleep(backoff);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            command = state.commands.recv() => if command.is_none() { return false },
        }
    }
}

/// Subscribes, then delivers and follows subscription changes until the connection ends.
async fn serve(state: &mut Subscriber, pubsub: redis::aio::PubSub) -> Ended {
    let (mut sink, mut stream) = pubsub.split();
    // Changes queued before this point are in the map already.
    while state.commands.try_recv().is_ok() {}
    let channels: Vec<Arc<str>> = lock(&state.wanted).keys().cloned().collect();
    let broadcast = state.channels.broadcast();
    if !answered(sink.subscribe(&broadcast)).await {
        return Ended::Lost;
    }
    for chunk in channels.chunks(512) {
        let chunk: Vec<&str> = chunk.iter().map(|channel| &**channel).collect();
        if !answered(sink.subscribe(chunk)).await {
            return Ended::Lost;
        }
    }
    state.sessions.fetch_add(1, Ordering::Release);
    state.metrics.redis_connected.set(1.0);
    info!(channels = channels.len() + 1, "redis connected: subscribed");
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await; // the first tick is at once
    loop {
        tokio::select! {
            _ = probe.tick() => {
                if !answered(sink.subscribe(&broadcast)).await {
                    return Ended::Lost;
                }
            }
            command = state.commands.recv() => {
                let Some(Control(channel)) = command else { return Ended::BrokerGone };
                // Acted on as the map says now: a subscribe overtaken by the channel's last
                // unwant (or the reverse) settles on the map's state.
                let wanted = lock(&state.wanted).contains_key(&channel);
                let done = if wanted {
                    answered(sink.subscribe(&*channel)).await
                } else {
                    answered(sink.unsubscribe(&*channel)).await
                };
                if !done {
                    return Ended::Lost;
                }
            }
            message = stream.next() => {
                let Some(message) = message else { return Ended::Lost };
                deliver(state, message.get_channel_name(), message.get_payload_bytes());
            }
        }
    }
}

/// Whether a subscription change was answered within [`RESPONSE_TIMEOUT`].
async fn answered(request: impl std::future::Future<Output = redis::RedisResult<()>>) -> bool {
    matches!(
        tokio::time::timeout(RESPONSE_TIMEOUT, request).await,
        Ok(Ok(()))
    )
}

/// Delivers one envelope from another node into the local hub.
fn deliver(state: &Subscriber, channel: &str, payload: &[u8]) {
    let envelope: Envelope<'_> = match serde_json::from_slice(payload) {
        Ok(envelope) => envelope,
        Err(error) => {
            debug!(channel, %error, "not a roomcast envelope: ignored");
            return;
        }
    };
    if envelope.node == state.node {
        return; // our own, delivered locally when published
    }
    let target = match envelope.kind {
        'r' => Target::Room(&envelope.target),
        'b' => Target::Everyone,
        'p' => Target::Recipient(&envelope.target),
        _ => return,
    };
    let _ = state.hub.deliver(&Publication {
        target,
        from: &envelope.from,
        message: Body::Raw(envelope.message.raw()),
        timestamp: envelope.timestamp,
        except: None,
    });
}
