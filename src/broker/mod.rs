//! The broker: how a publication reaches every node that has recipients for it.
//!
//! A [`Publication`] is protocol-neutral: what is sent (the raw JSON of `message`), by whom, to
//! which room, client or user, and which connection it must skip. It is encoded into a wire
//! frame only at delivery, by the hub, once per fan-out (and once per wire protocol when there
//! is more than one), so a publication from a client and one from the application's API take
//! the same road.
//!
//! [`Broker`] is the seam for running several nodes: a publication goes to the broker, and
//! what the broker receives (its inbound side) is delivered into the local hub. The
//! [`MemoryBroker`] is the single-node default: its inbound side is its outbound side. A Redis
//! broker is a second implementation of the same trait, picked in config; nothing in the
//! sessions or the API changes with it. Membership (rooms, counts) stays in the hub.

mod cache;
mod memory;
mod presence;
pub mod query;
mod redis;

use std::sync::{Arc, Weak};

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::api::webhooks::Webhooks;
use crate::config::Config;

use crate::hub::{ConnId, HistoryPage, Joined, Member, RecipientNotFound, Router, Since};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::Body;
use crate::pusher::Apps;
use query::{Gathered, Query, Responder};

pub use memory::MemoryBroker;
pub use redis::{
    check_url as check_redis_url, BadRedisUrl, Endpoint as RedisEndpoint, RedisBroker,
};

/// Which broker a node runs, as [`Config::broker`] decides from the configuration: a new
/// broker is a variant here, a file beside `memory.rs`, and the option that selects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// This node alone: publications are delivered straight into its hub.
    Memory,
    /// Nodes sharing rooms through Redis pub/sub (`--redis`).
    Redis,
    /// Nodes sharing rooms through a Redis Cluster's sharded pub/sub (`--redis-cluster`).
    RedisCluster,
}

/// The broker `config` asks for, delivering what it receives into `hub`. Within the runtime:
/// a backplane's broker starts its tasks here.
/// `apps`: the Pusher apps, whose socket ids name the connection a group publication from
/// another node skips.
pub fn from_config(
    config: &Config,
    hub: Arc<dyn Router>,
    metrics: Arc<Metrics>,
    webhooks: Option<Arc<Webhooks>>,
    apps: Option<Arc<Apps>>,
) -> Arc<dyn Broker> {
    let endpoint = match (config.broker(), &config.redis) {
        (BrokerKind::Redis, Some(url)) => RedisEndpoint::Single(url.clone()),
        (BrokerKind::RedisCluster, _) => RedisEndpoint::Cluster(config.redis_cluster.clone()),
        _ => return Arc::new(MemoryBroker::new(hub)),
    };
    Arc::new(RedisBroker::start(
        endpoint,
        &config.redis_prefix,
        hub,
        metrics,
        webhooks,
        config.history_policy(),
        apps,
    ))
}

/// Who a publication is for.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// The members of a room (none, when it does not exist: not an error).
    Room(&'a str),
    /// Every connected client.
    Everyone,
    /// One client by its id, or else every connection of a user by the user id.
    Recipient(&'a str),
    /// The connections of a protocol's group (a Pusher channel: `pusher/APP_ID/CHANNEL`) on
    /// every node. Its `message` is the whole frame's text, already in the group's protocol
    /// (the hub only frames it), and its `from` the socket id of the connection it skips
    /// (`""`: none), which names a connection on any node (see [`from_config`]'s `apps`).
    Group(&'a str),
}

/// One message to deliver, before any wire protocol encodes it.
#[derive(Debug)]
pub struct Publication<'a> {
    pub target: Target<'a>,
    /// The sender's client id, or the name the application publishes under.
    pub from: &'a str,
    /// The message as it will be relayed: the sender's raw JSON, or text.
    pub message: Body<'a>,
    /// Unix seconds.
    pub timestamp: u64,
    /// The sending connection, which a room message or broadcast skips.
    pub except: Option<ConnId>,
}

/// What a publish came to.
#[derive(Debug)]
pub enum Delivery {
    /// Known at once: the deliveries made on this node, or nobody has the private message's id.
    Done(Result<usize, RecipientNotFound>),
    /// Known later: whether a private message found its recipient on another node (`Ok(1)`
    /// when found).
    Later(oneshot::Receiver<Result<usize, RecipientNotFound>>),
}

impl Delivery {
    /// The deliveries known at once (a room message or broadcast is always `Done`).
    pub fn local(&self) -> usize {
        match self {
            Delivery::Done(Ok(delivered)) => *delivered,
            _ => 0,
        }
    }
}

/// What a join came to.
#[derive(Debug)]
pub enum Joining {
    /// Done, the joiner sent its `room_joined` and the members their `member_joined`.
    Done(Joined),
    /// Added here as pending (`local_members` with it); it gets `room_joined` with the room's
    /// cluster-wide count when the join has gone round, and `joined` is told then.
    Later {
        local_members: usize,
        joined: oneshot::Receiver<()>,
    },
}

/// What reading a room's history came to.
#[derive(Debug)]
pub enum HistoryRead {
    /// History is off.
    Off,
    /// Read here.
    Done(HistoryPage),
    /// Read from where the cluster keeps it; the sender dropped without a page means it could
    /// not be read (Redis away).
    Later(oneshot::Receiver<HistoryPage>),
}

/// A connection joining a presence channel (Pusher's `presence-`): the channel's group, and who
/// the connection is for its members.
pub struct PresenceJoin<'a> {
    /// The channel's group (see [`Target::Group`]).
    pub group: &'a str,
    /// The channel's name, for the frames.
    pub channel: &'a str,
    pub conn: ConnId,
    /// Its socket id: the `member_added` its join causes skips it, on its node.
    pub socket_id: &'a str,
    pub outbox: &'a Outbox,
    pub user_id: &'a str,
    /// What the app said of the user (JSON; `null` when it said nothing).
    pub user_info: &'a RawValue,
    /// Users a channel may hold; a new user beyond them is refused.
    pub max_members: usize,
}

/// Why a presence join was refused (the connection is out of the channel's group again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceRefusal {
    /// The channel has its most users already.
    Full,
    /// Where the cluster keeps presence (Redis) did not answer.
    Unavailable,
}

/// A presence join that was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PresenceJoined {
    /// The connection is this node's first in the channel's group.
    pub first_here: bool,
    /// Its user was not in the channel before (the members were told `member_added`).
    pub new_user: bool,
}

/// What a presence leave came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceLeft {
    /// This node's connections left in the channel's group.
    pub remaining_here: usize,
    /// Whether it was its user's last connection there (`member_removed` was told); `None`:
    /// the cluster decides, and this node is not told here.
    pub user_gone: Option<bool>,
}

/// A connection put in a group.
#[derive(Debug)]
pub struct GroupJoined {
    /// It is this node's first connection in the group.
    pub first_here: bool,
    /// For a broker spanning nodes, what answers once this node hears the group's
    /// publications from the others (`None`: it does already).
    pub heard: Option<oneshot::Receiver<()>>,
}

/// What a presence join came to. Once joined, the broker has sent the joiner its
/// `subscription_succeeded` with the channel's members, at the joiner's place in the order of
/// the channel's member events, and the other members `member_added` if the user is new.
#[derive(Debug)]
pub enum PresenceJoining {
    /// The connection is in the channel already: nothing done.
    AlreadyMember,
    Done(Result<PresenceJoined, PresenceRefusal>),
    Later(oneshot::Receiver<Result<PresenceJoined, PresenceRefusal>>),
}

/// How long a cache channel keeps its last event (Pusher's 30 minutes).
pub const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// A cache channel's last event (its frame's text), if one is kept.
pub type LastEvent = Option<Box<RawValue>>;

/// What reading a cache channel's last event came to.
#[derive(Debug)]
pub enum CachedEvent {
    Done(LastEvent),
    /// Read from the cluster; the sender dropped without an answer: Redis did not answer.
    Later(oneshot::Receiver<LastEvent>),
}

/// What reading a presence channel's users came to.
#[derive(Debug)]
pub enum PresenceUsers {
    Done(Vec<String>),
    /// Read from the cluster; the sender dropped without an answer: Redis did not answer.
    Later(oneshot::Receiver<Vec<String>>),
}

/// Carries publications to every node with recipients for them; delivers those that arrive
/// into the local hub.
pub trait Broker: Send + Sync + 'static {
    /// Publishes to every node. A private message to an id nobody has anywhere is
    /// `RecipientNotFound`, possibly known only later.
    fn publish(&self, publication: &Publication<'_>) -> Delivery;

    /// Whether `room`, which has no member on this node, has some on another: `None` when only
    /// this node counts (the answer is no), else the answer to come.
    fn room_exists(&self, _room: &str) -> Option<oneshot::Receiver<bool>> {
        None
    }

    /// Whether this broker tells the webhooks, by the cluster's counts (once per cluster), when
    /// a room gets its first member and loses its last, and when a Pusher channel is occupied
    /// or vacated and a presence channel's user is added or removed; when not, the session
    /// does, by its node's counts.
    fn reports_room_events(&self) -> bool {
        false
    }

    /// Asks every other node `query` about its own connections; `None` when this node is
    /// alone (its own answer is all there is).
    fn ask(&self, _query: &Query) -> Option<oneshot::Receiver<Gathered>> {
        None
    }

    /// Where this node's answers to other nodes' queries come from (its server API); given
    /// once the node exists.
    fn answer_queries_with(&self, _responder: Weak<dyn Responder>) {}

    /// A connection of this node is in the directory (it can receive private messages).
    fn connected(&self, _member: &Member) {}

    /// It left the directory. A broker that must tell other nodes answers, on the receiver,
    /// once they can no longer reach it: the connection's close frame waits for that (bounded
    /// by the drain), so that when a client's close completes, it is gone everywhere.
    fn disconnected(&self, _member: &Member) -> Option<oneshot::Receiver<()>> {
        None
    }

    /// `member` joins `room` (the session made every other check). One node: the hub adds it
    /// and tells the members at once. Several: the broker also counts it cluster-wide, tells
    /// every node's members, and answers the joiner's count later.
    /// `since`: the client opted in to the room's history (see [`Router::join_since`]).
    fn join(&self, room: &str, member: &Member, since: Option<&Since>) -> Joining;

    /// The last `limit` messages of `room`'s history, or with `since` the first `limit` after
    /// that offset (see [`Router::history`]), from wherever the broker keeps history.
    fn history(&self, room: &str, limit: usize, since: Option<u64>) -> HistoryRead;

    /// `member` leaves `room`: `Some` of how many local members remain, `None` (nothing done)
    /// when it was not a member. Its room-mates on every node are told.
    fn leave(&self, room: &str, member: &Member) -> Option<usize>;

    /// Puts a connection in `group` (see [`Target::Group`]): it receives the group's
    /// publications from every node. `None` when the connection was in the group already.
    fn join_group(&self, group: &str, conn: ConnId, outbox: &Outbox) -> Option<GroupJoined>;

    /// Takes a connection out of `group`; `Some` of how many remain on this node, `None` if it
    /// was not in it.
    fn leave_group(&self, group: &str, conn: ConnId) -> Option<usize>;

    /// Puts a connection in a presence channel: in its group (as [`Broker::join_group`]) and
    /// among its members, cluster-wide (see [`PresenceJoining`]).
    fn join_presence(&self, join: &PresenceJoin<'_>) -> PresenceJoining;

    /// Takes a connection out of a presence channel `group` (named `channel`); when it was its
    /// user's last connection there, anywhere, the remaining members get `member_removed`.
    fn leave_presence(&self, group: &str, channel: &str, conn: ConnId) -> Option<PresenceLeft>;

    /// Keeps `text`, an event frame's text just published to the cache channel `group`, as its
    /// last event, for [`CACHE_TTL`], where every node reads it.
    fn keep_last_event(&self, group: &str, text: &RawValue);

    /// The last event kept for the cache channel `group`.
    fn last_event(&self, group: &str) -> CachedEvent;

    /// The user ids in the presence channel `group`, cluster-wide.
    fn presence_users(&self, group: &str) -> PresenceUsers;
}
