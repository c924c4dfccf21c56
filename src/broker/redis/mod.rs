//! The Redis broker (`--redis URL`, or `--redis-cluster URL,...`): nodes behind a load balancer
//! share rooms and broadcasts through Redis pub/sub (on a cluster, sharded pub/sub; how either
//! is spoken is in [`connection`]).
//!
//! How a publication travels, and why this way:
//! - **Local members first, synchronously.** The sending node delivers to its own recipients
//!   straight into its hub, exactly as the memory broker does, then hands one encoded envelope
//!   to Redis for the other nodes. Local members keep the single-node semantics to the letter
//!   (who receives what, in which order relative to joins and leaves) and pay no round trip to
//!   Redis; a node whose Redis is down still serves its own clients. The exception is a room
//!   that keeps history (`--history-size`): its messages take their offsets from Redis, and
//!   every node, the sender's too, delivers them from the room's channel (see [`history`]).
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
//! - **Membership.** A room's members are a set in Redis (`PREFIX:members:ROOM`, entries
//!   `NODE:CLIENT_ID`); a join or leave is one Lua script that changes the set, counts it and
//!   publishes the `member_joined` / `member_left` envelope with that count, so every node's
//!   members hear of every change once, in the room channel's order, with exact cluster-wide
//!   counts. The joiner waits in the hub as pending (receiving nothing) until its own join
//!   comes back on the channel; that is where it gets `room_joined` with the count, so it sees
//!   exactly what the room sends after its join, as on one node. When Redis does not count a
//!   change (down), the node's own members are told with the node's own count. After Redis
//!   comes back empty, each node puts its members back into the sets.
//!
//! - **Crashes.** Each node holds a lease in Redis and indexes its members; a node whose lease
//!   lapses is reaped by one live node, its members' `member_left` told everywhere (see
//!   [`lease`]: about 7 s after a `SIGKILL`).
//! - **Room events.** The webhooks' `room_occupied` / `room_vacated` come from here, not the
//!   session: sent by the node whose membership script answered a count of 1 after a join or 0
//!   after a leave, so once per cluster.
//!
//! - **Questions.** The server API's listings and disconnects are put to every node on the
//!   queries channel (all nodes subscribe); each answers on the asker's answers channel from
//!   its own hub, and the `PUBLISH`'s count of receivers says how many answers to wait for
//!   (see [`super::query`]).
//!
//! A client's channel is subscribed asynchronously,
//! so for a moment after its welcome it is not reachable from other nodes; its close frame
//! waits for the unsubscription, so once its close completes nothing counts it as reachable.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

mod connection;
mod history;
mod lease;
mod occupancy;
mod presence;

pub use connection::Endpoint;
use connection::{Client, Commands, SubscriptionSink, SubscriptionStream};

use super::query::{Answer, Gathered, Query, Responder, ASK_TIMEOUT};
use super::{
    Broker, CachedEvent, Delivery, GroupJoined, HistoryRead, Joining, PresenceJoin,
    PresenceJoining, PresenceLeft, PresenceUsers, Publication, Target, CACHE_TTL,
};
use crate::api::webhooks::{EventKind, Webhooks};
use crate::history::{HistoryConfig, HistoryPolicy};
use crate::hub::{
    ConnId, HistoryPage, JoinPoint, Joined, Member, MemberChange, RecipientNotFound, Router, Since,
};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::Body;
use crate::pusher::{webhooks::AppHooks, Apps};

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
/// count map says when it gets to it, and then answers on the sender, if any.
struct Control(Arc<str>, Option<oneshot::Sender<()>>);

/// One command for the publisher task (a `PUBLISH`, a membership script); `reply` wants its
/// answer (the receiving nodes, the room's member count, a script's array).
struct Outgoing {
    command: redis::Cmd,
    reply: Option<oneshot::Sender<redis::Value>>,
    /// A kept room message's envelope, which this node delivers to its own members (without an
    /// offset, not kept) when the command surely never reached Redis.
    unsent: Option<Bytes>,
}

impl Outgoing {
    fn unanswered(command: redis::Cmd) -> Self {
        Self {
            command,
            reply: None,
            unsent: None,
        }
    }
}

/// A join or leave, in one step on Redis: the member into (`SADD`) or out of (`SREM`, the
/// command in ARGV[5]) the room's set, the set's size, and, when the set changed, the
/// `member_joined` / `member_left` envelope (head .. size .. tail) on the room's channel for
/// every node (`PUBLISH`, or on a cluster `SPUBLISH`, in ARGV[6]: the channel shares the set's
/// slot). The answer is the room's cluster-wide size.
const MEMBERSHIP_SCRIPT: &str = r#"
local changed = redis.call(ARGV[5], KEYS[1], ARGV[1])
local total = redis.call('SCARD', KEYS[1])
if changed == 1 then redis.call(ARGV[6], ARGV[2], ARGV[3] .. total .. ARGV[4]) end
return total
"#;

/// Which way a membership changes.
#[derive(Clone, Copy)]
enum Change {
    Join,
    Leave,
    /// A member of a node that was reaped while cut off from Redis, put back when it returns:
    /// a join for the other nodes (whose members heard it leave), nothing for its own.
    Rejoin,
}

/// The membership script for `client_id` of node `member_node` joining or leaving `room`, its
/// envelope sent as by node `publisher` (a reaper speaks for a dead node's members).
fn membership_command(
    channels: &Channels,
    publisher: u64,
    change: Change,
    room: &str,
    member_node: u64,
    client_id: &str,
) -> redis::Cmd {
    let mut command = redis::cmd("EVAL");
    command
        .arg(MEMBERSHIP_SCRIPT)
        .arg(1)
        .arg(channels.members(room));
    for arg in membership_args(channels, publisher, change, room, member_node, client_id) {
        command.arg(arg);
    }
    command
}

/// The membership script's ARGV (see [`MEMBERSHIP_SCRIPT`]), which the join-with-`since`
/// script takes too.
fn membership_args(
    channels: &Channels,
    publisher: u64,
    change: Change,
    room: &str,
    member_node: u64,
    client_id: &str,
) -> [String; 6] {
    let (kind, set_command) = match change {
        Change::Join => ('j', "SADD"),
        Change::Rejoin => ('J', "SADD"),
        Change::Leave => ('l', "SREM"),
    };
    [
        member_entry(member_node, client_id),
        channels.room(room),
        envelope_head(publisher, kind, room, client_id),
        "}".to_owned(),
        set_command.to_owned(),
        channels.publish_verb().to_owned(),
    ]
}

/// An envelope's text up to its message (`...,"m":`), for a script to finish: the message it
/// writes (a count, a member list) and the closing brace follow.
fn envelope_head(publisher: u64, kind: char, target: &str, from: &str) -> String {
    let mut head = serde_json::to_string(&EnvelopeHead {
        n: publisher,
        k: kind,
        t: target,
        f: from,
        ts: 0,
    })
    .expect("an envelope head serializes");
    head.pop(); // its closing brace
    head.push_str(r#","m":"#);
    head
}

/// A member in a room's member set: its node and client id.
fn member_entry(node: u64, client_id: &str) -> String {
    format!("{node:016x}:{client_id}")
}

/// An entry of a node's index: a JSON array of the client id, the room (in the members index)
/// or nothing (in the clients index), and the user id, which a reaper needs to tell the
/// application's webhooks who left.
fn index_entry(client_id: &str, room: Option<&str>, user_id: Option<&str>) -> String {
    serde_json::to_string(&(client_id, room, user_id)).expect("an index entry serializes")
}

/// Tells the webhooks, if there are any, of a room event the cluster's count decided.
fn room_event(webhooks: &Option<Arc<Webhooks>>, kind: EventKind, member: &Member, room: &str) {
    if let Some(webhooks) = webhooks {
        webhooks.emit(kind, member, Some(room));
    }
}

/// How long a joiner waits for its own join to come back on the room's channel (which makes it
/// a member in the room's order) once Redis counted it; then it is made one anyway.
const ACTIVATION_GRACE: Duration = Duration::from_secs(1);

/// The fields of an envelope before its message, for a membership envelope whose message (the
/// count) the script writes.
#[derive(Serialize)]
struct EnvelopeHead<'a> {
    n: u64,
    k: char,
    t: &'a str,
    f: &'a str,
    ts: u64,
}

/// One publication on its way between nodes.
#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    /// The node that published it.
    #[serde(rename = "n")]
    node: u64,
    /// `r` a room, `b` everyone, `p` a client or user (private message), `g` a protocol's
    /// group (`f`: the socket id of the connection it skips); `j` and `l` a member
    /// (`f`) joined or left the room, `m` being its cluster-wide count; `P` and `L` a
    /// connection joined or left a presence channel (see [`presence`]).
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
    /// A kept room message's sending connection, which its node skips (the other nodes have no
    /// such connection).
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    except: Option<ConnId>,
    /// A kept room message's offset in its room's history, which the append script writes last.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
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

/// Channel and key names under `--redis-prefix`, and how to publish on them.
struct Channels {
    prefix: String,
    /// A cluster's shard channels: `SPUBLISH`, and a room's name as the hash tag of its
    /// channel and member set (`PREFIX:room:{ROOM}`, `PREFIX:members:{ROOM}`), so that the
    /// membership script, which changes the one and publishes on the other, runs on one shard.
    sharded: bool,
}

impl Channels {
    fn room(&self, room: &str) -> String {
        self.room_key("room", room)
    }

    /// A protocol group's channel (a Pusher channel's), hash-tagged as a room's keys are.
    fn group(&self, group: &str) -> String {
        self.room_key("group", group)
    }

    /// `PREFIX:WHAT:ROOM`, on a cluster with a hash tag made of the room (`PREFIX:WHAT:{r:ROOM}`),
    /// so a room's keys and channel share a slot. The `r:` keeps the tag from being empty: a
    /// room named `}x` would give `{}x}`, which Redis hashes whole, so each of its keys would
    /// land in a slot of its own and every script on them would fail with CROSSSLOT.
    fn room_key(&self, what: &str, room: &str) -> String {
        if self.sharded {
            format!("{}:{what}:{{r:{room}}}", self.prefix)
        } else {
            format!("{}:{what}:{room}", self.prefix)
        }
    }

    fn publish_verb(&self) -> &'static str {
        if self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The command publishing `payload` on `channel`.
    fn publish(&self, channel: &str, payload: &[u8]) -> redis::Cmd {
        let mut command = redis::cmd(self.publish_verb());
        command.arg(channel).arg(payload);
        command
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

    /// The key of a room's member set (entries `NODE:CLIENT_ID`).
    fn members(&self, room: &str) -> String {
        self.room_key("members", room)
    }

    /// A cache channel's last event (a string key with the cache's TTL).
    fn cache(&self, group: &str) -> String {
        self.room_key("cache", group)
    }

    /// A kept room's history stream (see [`history`]).
    fn history(&self, room: &str) -> String {
        self.room_key("history", room)
    }

    /// A kept room's history epoch and top offset.
    fn history_meta(&self, room: &str) -> String {
        self.room_key("history-meta", room)
    }

    /// Where every node hears the others' queries (server API listings, disconnects).
    fn queries(&self) -> String {
        format!("{}:queries", self.prefix)
    }

    /// Where a node hears the answers to its queries.
    fn answers(&self, node: u64) -> String {
        format!("{}:answers:{node:016x}", self.prefix)
    }

    /// The set of live (or not yet reaped) nodes' ids, in hex.
    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// A key about one node (`lease`, `members`, `reaper`, `reaped`), its id as hash tag so
    /// they share a Redis Cluster slot.
    fn node_key(&self, node: &str, what: &str) -> String {
        format!("{}:node:{{{node}}}:{what}", self.prefix)
    }

    /// A node's member index: an entry for each of its members in each room.
    fn node_members(&self, node: u64) -> String {
        self.node_key(&format!("{node:016x}"), "members")
    }

    /// A node's clients index: an entry for each of its connections.
    fn node_clients(&self, node: u64) -> String {
        self.node_key(&format!("{node:016x}"), "clients")
    }

    /// A node's presence index: an entry for each of its connections in each presence channel.
    fn node_presence(&self, node: u64) -> String {
        self.node_key(&format!("{node:016x}"), "presence")
    }
}

/// A join on its way: the connection and the room.
type JoinKey = (ConnId, Arc<str>);

/// The broker: local delivery, plus Redis for the other nodes.
pub struct RedisBroker {
    hub: Arc<dyn Router>,
    /// This node's id in envelopes, random per process.
    node: u64,
    channels: Arc<Channels>,
    publish: mpsc::Sender<Outgoing>,
    wants: Wants,
    /// Joins whose script is on its way (connection, room): a leave meanwhile hands its own
    /// script to the join's task, so that Redis sees the join before the leave.
    joining: Arc<Mutex<HashSet<JoinKey>>>,
    metrics: Arc<Metrics>,
    /// For the room events the cluster's counts decide, and a reaper's events for the dead.
    webhooks: Option<Arc<Webhooks>>,
    queries: Arc<Queries>,
    /// Which rooms keep history, in Redis (`--history-size`): `None`, off.
    history: Option<HistoryPolicy>,
    /// Whether the subscription connection is up: a kept room's messages reach this node's own
    /// members through it.
    subscribed: Arc<AtomicBool>,
    unsent: Unsent,
    /// Presence joins on their way (see [`presence`]).
    presence: presence::Pending,
    /// This node's connections in presence channels.
    present: presence::Present,
    apps: PusherApps,
    /// Held while the broker lives: the lease task ends when it is gone.
    _alive: Arc<()>,
}

/// The Pusher apps (`None`: no Pusher endpoint, no groups across nodes): their socket ids name
/// the connection a group publication skips on the node that has it, and their webhooks hear
/// what the cluster decides of their channels (see [`occupancy`]).
pub(super) type PusherApps = Option<Arc<Apps>>;

/// The webhooks of `group`'s app, when it has them, with the channel's name.
fn hooks_of<'a>(apps: &'a PusherApps, group: &'a str) -> Option<(&'a AppHooks, &'a str)> {
    apps.as_deref()?.hooks_of_group(group)
}

impl RedisBroker {
    /// Connects lazily: the tasks start now and reach Redis when it answers; meanwhile local
    /// delivery works. Must be called within the tokio runtime.
    pub fn start(
        endpoint: Endpoint,
        prefix: &str,
        hub: Arc<dyn Router>,
        metrics: Arc<Metrics>,
        webhooks: Option<Arc<Webhooks>>,
        history: Option<HistoryPolicy>,
        apps: PusherApps,
    ) -> Self {
        let client = Client::open(&endpoint).expect("checked by Config::validate");
        let node = rand::random::<u64>();
        let channels = Arc::new(Channels {
            prefix: prefix.to_owned(),
            sharded: client.sharded(),
        });
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        let (control, commands) = mpsc::unbounded_channel();
        let wanted = Arc::new(Mutex::new(HashMap::new()));
        let waiting = Waiting::default();
        let sessions = Arc::new(AtomicU64::new(0));
        let unsent = Unsent {
            hub: hub.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(publisher(
            client.clone(),
            queue,
            sessions.clone(),
            metrics.clone(),
            unsent.clone(),
        ));
        let alive = Arc::new(());
        if let Some(policy) = &history {
            tokio::spawn(history::keep_alive(
                publish.clone(),
                channels.clone(),
                policy.clone(),
                hub.clone(),
                Arc::downgrade(&alive),
            ));
        }
        let subscribed = Arc::new(AtomicBool::new(false));
        let presence = presence::Pending::default();
        let present = presence::Present::default();
        tokio::spawn(lease::run(lease::Lease {
            client: client.clone(),
            node,
            channels: channels.clone(),
            metrics: metrics.clone(),
            hub: hub.clone(),
            webhooks: webhooks.clone(),
            apps: apps.clone(),
            present: present.clone(),
            alive: Arc::downgrade(&alive),
        }));
        let queries = Arc::new(Queries::default());
        tokio::spawn(subscriber(Subscriber {
            client,
            publish: publish.clone(),
            queries: queries.clone(),
            sessions,
            node,
            channels: channels.clone(),
            commands,
            wanted: wanted.clone(),
            waiting: waiting.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
            subscribed: subscribed.clone(),
            apps: apps.clone(),
            presence: presence.clone(),
            present: present.clone(),
        }));
        info!(
            node = format_args!("{node:016x}"),
            prefix,
            sharded = channels.sharded,
            "redis broker started"
        );
        Self {
            hub,
            node,
            channels,
            publish,
            wants: Wants {
                wanted,
                waiting,
                control,
            },
            joining: Arc::default(),
            metrics,
            webhooks,
            queries,
            history,
            subscribed,
            unsent,
            presence,
            present,
            apps,
            _alive: alive,
        }
    }

    /// What `room` keeps, when history is on and its pattern keeps any.
    fn kept(&self, room: &str) -> Option<HistoryConfig> {
        self.history.as_ref()?.for_room(room)
    }

    /// One more reason to be subscribed to `channel`; when it is the first, what answers once
    /// the subscription is in.
    fn want(&self, channel: String) -> Option<oneshot::Receiver<()>> {
        self.wants.want(channel)
    }

    /// One reason fewer; the last one unsubscribes.
    fn unwant(&self, channel: &str) -> Option<oneshot::Receiver<()>> {
        self.wants.unwant(channel)
    }
}

/// The channels this node needs, and the way to the subscriber task that follows them.
#[derive(Clone)]
struct Wants {
    /// The channels this node needs (rooms with local members, local clients and users), with
    /// how many reasons it has for each: the subscriber task resubscribes to these after a
    /// reconnection.
    wanted: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    /// Channels whose subscription is on its way, with the later wanters waiting for it too
    /// (the first one waits on its [`Control`]): a second subscriber of a channel is not told
    /// it hears the other nodes before the node does.
    waiting: Waiting,
    control: mpsc::UnboundedSender<Control>,
}

/// See [`Wants::waiting`].
type Waiting = Arc<Mutex<HashMap<Arc<str>, Vec<oneshot::Sender<()>>>>>;

/// The subscription to `channel` is in (or given up on): its waiters are answered (or, given
/// up on, dropped, which answers them too).
fn settle(waiting: &Waiting, channel: &str, subscribed: bool) {
    let Some(waiters) = lock(waiting).remove(channel) else {
        return;
    };
    if subscribed {
        for waiter in waiters {
            let _ = waiter.send(());
        }
    }
}

impl Wants {
    /// One more reason to be subscribed to `channel`; when it is the first, what answers once
    /// the subscription is in.
    fn want(&self, channel: String) -> Option<oneshot::Receiver<()>> {
        let mut wanted = lock(&self.wanted);
        let channel: Arc<str> = Arc::from(channel);
        let count = wanted.entry(channel.clone()).or_insert(0);
        *count += 1;
        let (done, subscribed) = oneshot::channel();
        let mut waiting = lock(&self.waiting);
        if *count > 1 {
            // Still on its way: this one waits for it too.
            let waiters = waiting.get_mut(&channel)?;
            waiters.push(done);
            return Some(subscribed);
        }
        waiting.insert(channel.clone(), Vec::new());
        let _ = self.control.send(Control(channel, Some(done)));
        Some(subscribed)
    }

    /// One reason fewer; the last one unsubscribes.
    fn unwant(&self, channel: &str) -> Option<oneshot::Receiver<()>> {
        let mut wanted = lock(&self.wanted);
        let (key, count) = wanted
            .get_key_value(channel)
            .map(|(k, c)| (k.clone(), *c))?;
        if count > 1 {
            if let Some(count) = wanted.get_mut(channel) {
                *count -= 1;
            }
            return None;
        }
        wanted.remove(channel);
        lock(&self.waiting).remove(channel);
        let (done, unsubscribed) = oneshot::channel();
        let _ = self.control.send(Control(key, Some(done)));
        Some(unsubscribed)
    }
}

impl RedisBroker {
    /// The envelope of `publication`, serialized once.
    fn envelope(&self, publication: &Publication<'_>) -> Bytes {
        let (kind, target) = match publication.target {
            Target::Room(room) => ('r', room),
            Target::Everyone => ('b', ""),
            Target::Recipient(id) => ('p', id),
            Target::Group(group) => ('g', group),
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
            except: None,
            offset: None,
        };
        Bytes::from(serde_json::to_vec(&envelope).expect("an envelope serializes"))
    }

    /// A room message with history on: the append script gives it its offset and publishes
    /// it, and every node delivers it from the room's channel, this one too (see [`history`]).
    fn publish_kept(
        &self,
        room: &str,
        config: &HistoryConfig,
        publication: &Publication<'_>,
    ) -> Delivery {
        // Recipients here, as the room stands: delivery is on its way.
        let local = self
            .hub
            .room_size(room)
            .saturating_sub(usize::from(publication.except.is_some()));
        let mut envelope = self.envelope(publication).to_vec();
        envelope.pop(); // its closing brace: the sender's connection and the offset follow
        if let Some(except) = publication.except {
            envelope.extend_from_slice(format!(r#","x":{except}"#).as_bytes());
        }
        let plain = {
            let mut plain = envelope.clone();
            plain.push(b'}');
            Bytes::from(plain)
        };
        envelope.extend_from_slice(br#","o":"#);
        let outgoing = Outgoing {
            command: history::append_command(&self.channels, room, config, &envelope, b"}"),
            reply: None,
            unsent: Some(plain),
        };
        if !self.subscribed.load(Ordering::Acquire) {
            // The node would not hear it back: its members get it now, not kept.
            self.unsent.deliver_here(outgoing);
            return Delivery::Done(Ok(local));
        }
        if let Err(full) = self.publish.try_send(outgoing) {
            self.metrics.redis_publish_dropped.increment(1);
            self.unsent.deliver_here(full.into_inner());
        }
        Delivery::Done(Ok(local))
    }

    /// Queues one `PUBLISH` without waiting; a full queue drops it, counted.
    fn send(&self, channel: String, payload: Bytes) {
        self.send_command(self.channels.publish(&channel, &payload));
    }

    /// Queues `command` without waiting for it or its answer.
    fn send_command(&self, command: redis::Cmd) {
        if self
            .publish
            .try_send(Outgoing::unanswered(command))
            .is_err()
        {
            self.metrics.redis_publish_dropped.increment(1);
        }
    }

    /// The membership script for `member` (of this node) joining or leaving `room`.
    fn membership(&self, change: Change, room: &str, member: &Member) -> redis::Cmd {
        membership_command(
            &self.channels,
            self.node,
            change,
            room,
            self.node,
            &member.client_id,
        )
    }

    /// Puts the entry of `member` in `room` into (join) or out of (leave) this node's member
    /// index, which a reaper reads if this node dies. Sent before a join's script and after a
    /// leave's, so the index holds at least every member this node has in Redis.
    fn index(&self, change: Change, room: &str, member: &Member) -> redis::Cmd {
        let mut command = redis::cmd(match change {
            Change::Join | Change::Rejoin => "SADD",
            Change::Leave => "SREM",
        });
        command
            .arg(self.channels.node_members(self.node))
            .arg(index_entry(
                &member.client_id,
                Some(room),
                member.user_id.as_deref(),
            ));
        command
    }

    /// Puts `member` into (`SADD`) or out of (`SREM`) this node's clients index.
    fn index_client(&self, set_command: &str, member: &Member) -> redis::Cmd {
        let mut command = redis::cmd(set_command);
        command
            .arg(self.channels.node_clients(self.node))
            .arg(index_entry(
                &member.client_id,
                None,
                member.user_id.as_deref(),
            ));
        command
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
        let to_client = self.channels.publish(&self.channels.client(id), &payload);
        let to_user = self.channels.publish(&self.channels.user(id), &payload);
        tokio::spawn(async move {
            // No count back: Redis did not take it (down), and the sender is not told "not
            // found" of a recipient that may well exist.
            let Some(received) = answer_of(&queue, to_client).await else {
                return;
            };
            if received > 0 {
                let _ = answer.send(Ok(1));
                return;
            }
            let Some(received) = answer_of(&queue, to_user).await else {
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

/// Sends `command` through the publisher task (in order with everything queued before) and
/// returns its integer answer, or `None` when Redis did not answer it in time.
async fn answer_of(queue: &mpsc::Sender<Outgoing>, command: redis::Cmd) -> Option<i64> {
    redis::from_redis_value(&value_of(queue, command).await?).ok()
}

/// [`answer_of`] for any answer.
async fn value_of(queue: &mpsc::Sender<Outgoing>, command: redis::Cmd) -> Option<redis::Value> {
    let (reply, answer) = oneshot::channel();
    let outgoing = Outgoing {
        command,
        reply: Some(reply),
        unsent: None,
    };
    queue.send(outgoing).await.ok()?;
    tokio::time::timeout(RESPONSE_TIMEOUT * 2, answer)
        .await
        .ok()?
        .ok()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map is a few counters changed in single steps: a panic elsewhere leaves it
    // consistent.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker for RedisBroker {
    fn publish(&self, publication: &Publication<'_>) -> Delivery {
        let channel = match publication.target {
            Target::Room(room) => {
                if let Some(config) = self.kept(room) {
                    return self.publish_kept(room, &config, publication);
                }
                self.channels.room(room)
            }
            Target::Everyone => self.channels.broadcast(),
            Target::Recipient(id) => return self.publish_private(id, publication),
            Target::Group(group) => self.channels.group(group),
        };
        let local = self.hub.deliver(publication);
        self.send(channel, self.envelope(publication));
        Delivery::Done(local)
    }

    fn join(&self, room: &str, member: &Member, since: Option<&Since>) -> Joining {
        // A joiner that opted in to offsets, in a room whose history Redis keeps: its join
        // reads its place in the history in the same step.
        let recovering = since.zip(self.kept(room));
        let (activated, joined) = oneshot::channel();
        let local_members =
            match self
                .hub
                .join_pending(room, member, activated, recovering.is_some())
            {
                Joined::AlreadyMember => return Joining::Done(Joined::AlreadyMember),
                Joined::Added { members } => members,
            };
        let subscribed = (local_members == 1)
            .then(|| self.want(self.channels.room(room)))
            .flatten();
        self.send_command(self.index(Change::Join, room, member));
        let script = match recovering {
            None => self.membership(Change::Join, room, member),
            Some((since, config)) => {
                let args = membership_args(
                    &self.channels,
                    self.node,
                    Change::Join,
                    room,
                    self.node,
                    &member.client_id,
                );
                let seen = match since {
                    Since::Now => None,
                    Since::Saw { offset, epoch } => Some((*offset, &**epoch)),
                };
                history::join_since_command(&self.channels, room, &config, &args, seen)
            }
        };
        let recovering = recovering.is_some();
        let leave = self.membership(Change::Leave, room, member);
        let unindex = self.index(Change::Leave, room, member);
        let room: Arc<str> = Arc::from(room);
        lock(&self.joining).insert((member.conn, room.clone()));
        let (queue, hub, joining) = (self.publish.clone(), self.hub.clone(), self.joining.clone());
        let webhooks = self.webhooks.clone();
        let member = member.clone();
        tokio::spawn(async move {
            // Subscribed first: the join's own event must come back here, where it makes the
            // joiner a member in the room's order (see `deliver`).
            if let Some(subscribed) = subscribed {
                let _ = tokio::time::timeout(RESPONSE_TIMEOUT, subscribed).await;
            }
            let counted = if recovering {
                // Its place in the history, or, when Redis did not answer, none: it is not
                // recovered, and is made a member (below) as without history.
                let answer = value_of(&queue, script).await;
                let (total, point) = match answer.as_ref().and_then(history::join_point) {
                    Some((total, point)) => (Some(total as i64), point),
                    None => (None, JoinPoint::unknown()),
                };
                hub.recovered(&room, &member, point);
                total
            } else {
                answer_of(&queue, script).await
            };
            // The room's first member anywhere (or here, when Redis did not count it).
            if counted.map_or(local_members == 1, |total| total == 1) {
                room_event(&webhooks, EventKind::RoomOccupied, &member, &room);
            }
            if !lock(&joining).remove(&(member.conn, room.clone())) {
                // It left while its join was on the way, and left this task its leave.
                let left = answer_of(&queue, leave).await;
                let _ = queue.try_send(Outgoing::unanswered(unindex));
                if left.map_or(local_members == 1, |total| total == 0) {
                    room_event(&webhooks, EventKind::RoomVacated, &member, &room);
                }
                return;
            }
            match counted {
                Some(total) if total > 0 => {
                    tokio::time::sleep(ACTIVATION_GRACE).await;
                    // Its own event did not come back in time (a subscription not yet in):
                    // a member now, with Redis's count.
                    hub.activate(&room, &member, total as usize);
                }
                _ => {
                    // Redis did not count it: this node's members are told with this node's
                    // count, and it joins with that.
                    let change = MemberChange::Joined {
                        client_id: &member.client_id,
                        total: local_members,
                    };
                    hub.announce(&room, change);
                }
            }
        });
        Joining::Later {
            local_members,
            joined,
        }
    }

    fn leave(&self, room: &str, member: &Member) -> Option<usize> {
        let remaining = self.hub.leave_quietly(room, member)?;
        let still_joining = lock(&self.joining).remove(&(member.conn, Arc::from(room)));
        if remaining == 0 {
            let _ = self.unwant(&self.channels.room(room));
        }
        if still_joining {
            // Its join's task sends the leave after the join, so Redis sees them in order.
            return Some(remaining);
        }
        let leave = self.membership(Change::Leave, room, member);
        let unindex = self.index(Change::Leave, room, member);
        let (queue, hub) = (self.publish.clone(), self.hub.clone());
        let webhooks = self.webhooks.clone();
        let room: Arc<str> = Arc::from(room);
        let member = member.clone();
        tokio::spawn(async move {
            let counted = answer_of(&queue, leave).await;
            let _ = queue.try_send(Outgoing::unanswered(unindex));
            // The room's last member anywhere (or here, when Redis did not count it).
            if counted.map_or(remaining == 0, |total| total == 0) {
                room_event(&webhooks, EventKind::RoomVacated, &member, &room);
            }
            if counted.is_none() && remaining > 0 {
                let client_id = &member.client_id;
                // Redis did not count it: this node's members are told with this node's count.
                let change = MemberChange::Left {
                    client_id,
                    total: remaining,
                };
                hub.announce(&room, change);
            }
        });
        Some(remaining)
    }

    fn history(&self, room: &str, limit: usize, since: Option<u64>) -> HistoryRead {
        let Some(policy) = &self.history else {
            return HistoryRead::Off;
        };
        let Some(config) = policy.for_room(room) else {
            // A room the policy keeps no history of: nothing kept.
            return HistoryRead::Done(HistoryPage {
                messages: Vec::new(),
                offset: 0,
                epoch: Arc::from(""),
            });
        };
        let (answer, page) = oneshot::channel();
        let (queue, channels, room) =
            (self.publish.clone(), self.channels.clone(), room.to_owned());
        tokio::spawn(async move {
            if let Some(read) = history::read(&queue, &channels, &room, &config, limit, since).await
            {
                let _ = answer.send(read);
            }
        });
        HistoryRead::Later(page)
    }

    fn join_group(&self, group: &str, conn: ConnId, outbox: &Outbox) -> Option<GroupJoined> {
        // One reason to hear the group's channel per local member, as for a room.
        let size = self.hub.join_group(group, conn, outbox)?;
        if size == 1 && occupancy::is_counted(&self.apps, group) {
            self.occupy(group);
        }
        Some(GroupJoined {
            first_here: size == 1,
            heard: self.want(self.channels.group(group)),
        })
    }

    fn leave_group(&self, group: &str, conn: ConnId) -> Option<usize> {
        let remaining = self.hub.leave_group(group, conn)?;
        let _ = self.unwant(&self.channels.group(group));
        if remaining == 0 && occupancy::is_counted(&self.apps, group) {
            self.vacate(group);
        }
        Some(remaining)
    }

    fn join_presence(&self, join: &PresenceJoin<'_>) -> PresenceJoining {
        self.join_presence_here(join)
    }

    fn leave_presence(&self, group: &str, channel: &str, conn: ConnId) -> Option<PresenceLeft> {
        self.leave_presence_here(group, channel, conn)
    }

    fn keep_last_event(&self, group: &str, text: &RawValue) {
        // Queued before the event's own publish: a subscriber that reads the key after it
        // heard the event reads this one or a later one.
        let mut set = redis::cmd("SET");
        set.arg(self.channels.cache(group))
            .arg(text.get())
            .arg("PX")
            .arg(CACHE_TTL.as_millis() as u64);
        self.send_command(set);
    }

    fn presence_users(&self, group: &str) -> PresenceUsers {
        let (answer, users) = oneshot::channel();
        let queue = self.publish.clone();
        let mut keys = redis::cmd("HKEYS");
        keys.arg(self.channels.room_key("presence-users", group));
        tokio::spawn(async move {
            let Some(value) = value_of(&queue, keys).await else {
                return; // not answered: the API says so
            };
            let mut users: Vec<String> = redis::from_redis_value(&value).unwrap_or_default();
            users.sort();
            let _ = answer.send(users);
        });
        PresenceUsers::Later(users)
    }

    fn last_event(&self, group: &str) -> CachedEvent {
        let (answer, event) = oneshot::channel();
        let queue = self.publish.clone();
        let mut get = redis::cmd("GET");
        get.arg(self.channels.cache(group));
        tokio::spawn(async move {
            let Some(value) = value_of(&queue, get).await else {
                return; // not answered: the session says so
            };
            let text: Option<String> = redis::from_redis_value(&value).ok().flatten();
            let _ = answer.send(text.and_then(|text| RawValue::from_string(text).ok()));
        });
        CachedEvent::Later(event)
    }

    fn room_exists(&self, room: &str) -> Option<oneshot::Receiver<bool>> {
        let (answer, exists) = oneshot::channel();
        let queue = self.publish.clone();
        let mut command = redis::cmd("EXISTS");
        command.arg(self.channels.members(room));
        tokio::spawn(async move {
            if let Some(found) = answer_of(&queue, command).await {
                let _ = answer.send(found > 0);
            }
        });
        Some(exists)
    }

    fn reports_room_events(&self) -> bool {
        true
    }

    fn ask(&self, query: &Query) -> Option<oneshot::Receiver<Gathered>> {
        Some(self.ask_nodes(query))
    }

    fn answer_queries_with(&self, responder: Weak<dyn Responder>) {
        let _ = self.queries.responder.set(responder);
    }

    fn connected(&self, member: &Member) {
        self.send_command(self.index_client("SADD", member));
        // Not waited for: a client is reachable from other nodes a moment after its welcome.
        let _ = self.want(self.channels.client(&member.client_id));
        if let Some(user) = &member.user_id {
            let _ = self.want(self.channels.user(user));
        }
    }

    fn disconnected(&self, member: &Member) -> Option<oneshot::Receiver<()>> {
        // After its rooms' leaves (the session leaves them first), in the queue's order.
        self.send_command(self.index_client("SREM", member));
        if let Some(user) = &member.user_id {
            let _ = self.unwant(&self.channels.user(user));
        }
        self.unwant(&self.channels.client(&member.client_id))
    }
}

/// Where a kept room message that never reached Redis goes: to this node's own members, without
/// an offset (it is in no history), counted.
#[derive(Clone)]
struct Unsent {
    hub: Arc<dyn Router>,
    metrics: Arc<Metrics>,
}

impl Unsent {
    fn deliver_here(&self, outgoing: Outgoing) {
        let Some(payload) = outgoing.unsent else {
            return;
        };
        let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(&payload) else {
            return;
        };
        self.metrics.redis_history_unkept.increment(1);
        let _ = self.hub.deliver(&Publication {
            target: Target::Room(&envelope.target),
            from: &envelope.from,
            message: Body::Raw(envelope.message.raw()),
            timestamp: envelope.timestamp,
            except: envelope.except,
        });
    }
}

fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(BACKOFF_MAX)
}

/// Sends queued commands, many per round trip, until the broker is dropped.
async fn publisher(
    client: Client,
    mut queue: mpsc::Receiver<Outgoing>,
    sessions: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    unsent: Unsent,
) {
    let mut connection: Option<Commands> = None;
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
            match client.commands().await {
                Ok(commands) => {
                    backoff = BACKOFF_FIRST;
                    connection = Some(commands);
                }
                Err(error) => {
                    debug!(%error, "redis publisher cannot connect");
                    // This batch and what waited meanwhile cannot be sent: dropped, counted
                    // (a private message waiting on a count learns it from its reply's end);
                    // then a pause before the next attempt.
                    let mut dropped = batch.len() as u64;
                    for outgoing in batch.drain(..) {
                        unsent.deliver_here(outgoing);
                    }
                    while let Ok(outgoing) = queue.try_recv() {
                        unsent.deliver_here(outgoing);
                        dropped += 1;
                    }
                    metrics.redis_publish_dropped.increment(dropped);
                    tokio::time::sleep(backoff).await;
                    backoff = next_backoff(backoff);
                    continue;
                }
            }
        }
        let mut commands = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for outgoing in batch.drain(..) {
            commands.push(outgoing.command);
            waiting.push(Outgoing {
                command: redis::Cmd::new(),
                ..outgoing
            });
        }
        let redis = connection.as_mut().expect("connected above");
        match redis.run(commands).await {
            Ok(answers) => {
                for (outgoing, answer) in waiting.into_iter().zip(answers) {
                    if let redis::Value::ServerError(error) = &answer {
                        // Redis refused this one command (the others of the batch ran): its
                        // waiter, if any, learns it from the reply's end, as for an outage. A
                        // refused append published nothing (publishing is its last step), so
                        // its message reaches this node's members, unkept.
                        debug!(code = error.code(), detail = ?error.details(), "redis refused a command");
                        metrics.redis_refused.increment(1);
                        unsent.deliver_here(outgoing);
                    } else if let Some(reply) = outgoing.reply {
                        let _ = reply.send(answer);
                    }
                }
            }
            Err(error) => {
                // The connection reconnects by itself on the next command; the replies dropped
                // here tell whoever waits that Redis did not take it.
                // A command may have reached Redis: a kept message is not delivered here a
                // second time.
                debug!(%error, commands = waiting.len(), "redis pipeline failed");
                metrics
                    .redis_publish_dropped
                    .increment(waiting.len() as u64);
            }
        }
    }
}

/// The subscriber task's state.
struct Subscriber {
    client: Client,
    /// For this node's answers to other nodes' queries.
    publish: mpsc::Sender<Outgoing>,
    queries: Arc<Queries>,
    /// Counts the subscription sessions (one per connection made): the publisher makes a new
    /// connection when it changes.
    sessions: Arc<AtomicU64>,
    node: u64,
    channels: Arc<Channels>,
    commands: mpsc::UnboundedReceiver<Control>,
    wanted: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    waiting: Waiting,
    hub: Arc<dyn Router>,
    metrics: Arc<Metrics>,
    subscribed: Arc<AtomicBool>,
    apps: PusherApps,
    presence: presence::Pending,
    present: presence::Present,
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
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, state.client.subscription()).await;
        let subscription = match connected {
            Ok(Ok(subscription)) => subscription,
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
        match serve(&mut state, subscription).await {
            Ended::BrokerGone => return,
            Ended::Lost => {
                state.subscribed.store(false, Ordering::Release);
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
            command = state.commands.recv() => match command {
                None => return false,
                // Not subscribed now: its waiters hear the other nodes once connected, and
                // this node's own events meanwhile.
                Some(Control(channel, _)) => settle(&state.waiting, &channel, false),
            },
        }
    }
}

/// Subscribes, then delivers and follows subscription changes until the connection ends.
async fn serve(
    state: &mut Subscriber,
    (mut sink, mut stream): (SubscriptionSink, SubscriptionStream),
) -> Ended {
    // Changes queued before this point are in the map already; their wanters are answered
    // once the map's channels are subscribed.
    let mut queued = Vec::new();
    while let Ok(Control(_, done)) = state.commands.try_recv() {
        queued.extend(done);
    }
    let channels: Vec<Arc<str>> = lock(&state.wanted).keys().cloned().collect();
    let broadcast = state.channels.broadcast();
    let (queries, answers) = (state.channels.queries(), state.channels.answers(state.node));
    if !answered(sink.subscribe(&[&broadcast, &queries, &answers])).await {
        return Ended::Lost;
    }
    for chunk in channels.chunks(512) {
        let chunk: Vec<&str> = chunk.iter().map(|channel| &**channel).collect();
        if !answered(sink.subscribe(&chunk)).await {
            return Ended::Lost;
        }
    }
    for done in queued {
        let _ = done.send(());
    }
    for channel in &channels {
        settle(&state.waiting, channel, true);
    }
    let Some(registered) =
        register_members(&state.client, &state.channels, state.node, &*state.hub).await
    else {
        return Ended::Lost;
    };
    let (client, keys, node) = (&state.client, &state.channels, state.node);
    let Some(present) = presence::register(client, keys, node, &state.present, &state.apps).await
    else {
        return Ended::Lost;
    };
    if occupancy::register(client, keys, node, &*state.hub, &state.apps)
        .await
        .is_none()
    {
        return Ended::Lost;
    }
    state.sessions.fetch_add(1, Ordering::Release);
    state.subscribed.store(true, Ordering::Release);
    state.metrics.redis_connected.set(1.0);
    info!(
        channels = channels.len() + 1,
        members = registered,
        presence = present,
        "redis connected: subscribed, members registered"
    );
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await; // the first tick is at once
    loop {
        tokio::select! {
            _ = probe.tick() => {
                if !answered(sink.subscribe(&[&broadcast])).await {
                    return Ended::Lost;
                }
            }
            command = state.commands.recv() => {
                let Some(Control(channel, done_reply)) = command else { return Ended::BrokerGone };
                // Acted on as the map says now: a subscribe overtaken by the channel's last
                // unwant (or the reverse) settles on the map's state.
                let wanted = lock(&state.wanted).contains_key(&channel);
                let done = if wanted {
                    answered(sink.subscribe(&[&channel])).await
                } else {
                    answered(sink.unsubscribe(&channel)).await
                };
                if !done {
                    return Ended::Lost;
                }
                if let Some(reply) = done_reply {
                    let _ = reply.send(());
                }
                if wanted {
                    settle(&state.waiting, &channel, true);
                }
            }
            message = stream.next() => {
                let Some(message) = message else { return Ended::Lost };
                deliver(state, message.channel(), message.payload());
            }
        }
    }
}

/// Puts every local member of every local room into its room's member set and this node's
/// member index again (a no-op where they are; after Redis restarted empty, the cluster's
/// counts come back without any event: the nodes are the truth for their own connections), on
/// a connection of its own, just made (the publisher's may still be finding out that the old
/// one died). When a reaper took this node for dead meanwhile (cut off longer than its lease),
/// the other nodes' members heard its members leave, so they are put back with a join each.
/// Returns how many were registered, `None` when Redis did not take them.
async fn register_members(
    client: &Client,
    channels: &Channels,
    node: u64,
    hub: &dyn Router,
) -> Option<usize> {
    let node_hex = format!("{node:016x}");
    let reaped_key = channels.node_key(&node_hex, "reaped");
    let index = channels.node_members(node);
    let register = async {
        let mut redis = client.commands().await?;
        let mut exists = redis::cmd("EXISTS");
        exists.arg(&reaped_key);
        let reaped: bool = redis.query(exists).await?;
        let mut batch = Vec::new();
        let mut registered = 0;
        for (room, _) in hub.top_rooms(usize::MAX) {
            let Some(members) = hub.presence(&room) else {
                continue;
            };
            if members.is_empty() {
                continue;
            }
            let mut entries = redis::cmd("SADD");
            entries.arg(&index);
            for member in &members {
                entries.arg(index_entry(
                    &member.client_id,
                    Some(&room),
                    member.user_id.as_deref(),
                ));
            }
            batch.push(entries);
            if reaped {
                for member in &members {
                    batch.push(membership_command(
                        channels,
                        node,
                        Change::Rejoin,
                        &room,
                        node,
                        &member.client_id,
                    ));
                }
            } else {
                let mut set = redis::cmd("SADD");
                set.arg(channels.members(&room));
                for member in &members {
                    set.arg(member_entry(node, &member.client_id));
                }
                batch.push(set);
            }
            registered += members.len();
        }
        let mut clients = redis::cmd("SADD");
        clients.arg(channels.node_clients(node));
        let mut connections = 0;
        hub.for_each_connection(&mut |local| {
            if let crate::hub::Local::Client(member) = local {
                clients.arg(index_entry(
                    &member.client_id,
                    None,
                    member.user_id.as_deref(),
                ));
                connections += 1;
            }
        });
        if connections > 0 {
            batch.push(clients);
        }
        if reaped {
            let mut unmark = redis::cmd("DEL");
            unmark.arg(&reaped_key);
            batch.push(unmark);
            warn!(
                members = registered,
                "this node was taken for dead while cut off from redis: its members join again"
            );
        }
        redis.run(batch).await?;
        Ok::<_, redis::RedisError>(registered)
    };
    match tokio::time::timeout(RESPONSE_TIMEOUT * 2, register).await {
        Ok(Ok(registered)) => Some(registered),
        _ => None,
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
    if let 'q' | 'a' = envelope.kind {
        return on_query_envelope(state, &envelope);
    }
    // A presence channel's member events: from Redis only, to every node, this one too.
    match envelope.kind {
        'P' => return presence::on_joined(state, &envelope),
        'L' => return presence::on_left(state, &envelope),
        _ => {}
    }
    if envelope.kind == 'J' && envelope.node == state.node {
        return; // our members' return: our own members never heard them leave
    }
    if let 'j' | 'J' | 'l' = envelope.kind {
        // Every node's members hear of a join or leave from Redis, this node's too: one order
        // of membership events, with the count the script gave; a join of this node's pending
        // member makes it a member at that point of the order.
        let Ok(total) = envelope.message.raw().get().parse::<usize>() else {
            return;
        };
        let change = match envelope.kind {
            'j' | 'J' => MemberChange::Joined {
                client_id: &envelope.from,
                total,
            },
            _ => MemberChange::Left {
                client_id: &envelope.from,
                total,
            },
        };
        state.hub.announce(&envelope.target, change);
        return;
    }
    if let ('r', Some(offset)) = (envelope.kind, envelope.offset) {
        // A kept room's message: every node delivers it from here, in the offsets' order, the
        // sender's skipping the sending connection.
        let except = envelope.except.filter(|_| envelope.node == state.node);
        let publication = Publication {
            target: Target::Room(&envelope.target),
            from: &envelope.from,
            message: Body::Raw(envelope.message.raw()),
            timestamp: envelope.timestamp,
            except,
        };
        state.hub.deliver_at(&publication, offset);
        return;
    }
    if envelope.node == state.node {
        return; // our own, delivered locally when published
    }
    let (target, except) = match envelope.kind {
        'r' => (Target::Room(&envelope.target), None),
        'b' => (Target::Everyone, None),
        'p' => (Target::Recipient(&envelope.target), None),
        // The connection it skips, when it is one of ours.
        'g' => (
            Target::Group(&envelope.target),
            state
                .apps
                .as_ref()
                .and_then(|apps| apps.conn_of(&envelope.from)),
        ),
        _ => return,
    };
    let _ = state.hub.deliver(&Publication {
        target,
        from: &envelope.from,
        message: Body::Raw(envelope.message.raw()),
        timestamp: envelope.timestamp,
        except,
    });
}

/// Queries this node asked and is gathering answers to, and what answers other nodes' queries.
#[derive(Default)]
struct Queries {
    asking: Mutex<HashMap<u64, Asking>>,
    responder: OnceLock<Weak<dyn Responder>>,
}

/// One query on its way round.
struct Asking {
    /// How many other nodes received it (known once Redis answered the `PUBLISH`).
    expected: Option<usize>,
    answers: Vec<Answer>,
    done: oneshot::Sender<Gathered>,
}

impl Queries {
    /// Hands the answers to the asker when all expected have come (or `force`, at the
    /// deadline, with what there is).
    fn settle(&self, id: u64, force: bool) {
        let mut asking = lock(&self.asking);
        let Some(entry) = asking.get(&id) else {
            return;
        };
        let complete = entry
            .expected
            .is_some_and(|expected| entry.answers.len() >= expected);
        if !(complete || force) {
            return;
        }
        let entry = asking.remove(&id).expect("present above");
        let _ = entry.done.send(Gathered {
            answers: entry.answers,
            complete,
        });
    }
}

impl RedisBroker {
    /// An envelope of a query or an answer: `t` the query's id, `m` its JSON.
    fn query_envelope(node: u64, kind: char, id: u64, message: &impl Serialize) -> Bytes {
        let message = serde_json::value::to_raw_value(message).expect("a query serializes");
        let id = id.to_string();
        let envelope = Envelope {
            node,
            kind,
            target: Cow::Borrowed(&id),
            from: Cow::Borrowed(""),
            timestamp: 0,
            message: Message::Owned(message),
            except: None,
            offset: None,
        };
        Bytes::from(serde_json::to_vec(&envelope).expect("an envelope serializes"))
    }

    fn ask_nodes(&self, query: &Query) -> oneshot::Receiver<Gathered> {
        let id = rand::random::<u64>();
        let (done, gathered) = oneshot::channel();
        lock(&self.queries.asking).insert(
            id,
            Asking {
                expected: None,
                answers: Vec::new(),
                done,
            },
        );
        let payload = Self::query_envelope(self.node, 'q', id, query);
        let command = self.channels.publish(&self.channels.queries(), &payload);
        let (queue, queries) = (self.publish.clone(), self.queries.clone());
        tokio::spawn(async move {
            match answer_of(&queue, command).await {
                // Every node subscribes to the queries channel, this one too.
                Some(received) => {
                    if let Some(entry) = lock(&queries.asking).get_mut(&id) {
                        entry.expected = Some((received as usize).saturating_sub(1));
                    }
                    queries.settle(id, false);
                    tokio::time::sleep(ASK_TIMEOUT).await;
                    queries.settle(id, true);
                }
                // Not asked (Redis away): this node's own answer, marked incomplete.
                None => queries.settle(id, true),
            }
        });
        gathered
    }
}

/// A query from another node (answered from this node's hub, on the asker's answers channel)
/// or an answer to one of this node's.
fn on_query_envelope(state: &Subscriber, envelope: &Envelope<'_>) {
    let Ok(id) = envelope.target.parse::<u64>() else {
        return;
    };
    let raw = envelope.message.raw().get();
    match envelope.kind {
        'q' if envelope.node != state.node => {
            let Ok(query) = serde_json::from_str::<Query>(raw) else {
                debug!("a query this node does not understand: ignored");
                return;
            };
            let Some(responder) = state.queries.responder.get().and_then(Weak::upgrade) else {
                return; // not serving yet, or stopping: the asker's deadline covers it
            };
            let answer = responder.answer(&query);
            let payload = RedisBroker::query_envelope(state.node, 'a', id, &answer);
            let command = state
                .channels
                .publish(&state.channels.answers(envelope.node), &payload);
            if state
                .publish
                .try_send(Outgoing::unanswered(command))
                .is_err()
            {
                state.metrics.redis_publish_dropped.increment(1);
            }
        }
        'a' => {
            let Ok(answer) = serde_json::from_str::<Answer>(raw) else {
                return;
            };
            if let Some(entry) = lock(&state.queries.asking).get_mut(&id) {
                entry.answers.push(answer);
            }
            state.queries.settle(id, false);
        }
        _ => {}
    }
}
