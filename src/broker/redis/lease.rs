//! Node liveness and reaping: how a node's members leave when the node dies without saying so.
//!
//! Each node holds a lease in Redis (`PREFIX:node:{ID}:lease`, a key with a time to live of
//! [`LEASE_TTL`], renewed every [`RENEW_EVERY`]) and is listed in `PREFIX:nodes`. The lease
//! runs on Redis's clock, not the nodes': a node whose clock jumps, or that stops, cannot keep
//! it. Every node also keeps indexes of its members (`PREFIX:node:{ID}:members`, an entry per
//! member per room, written before a join's script and after a leave's) and of its connections
//! (`PREFIX:node:{ID}:clients`), each entry with the client and user ids; a reaper tells the
//! webhooks, once, what the dead connections did last (left their rooms, ended).
//!
//! Every live node looks, each time it renews, for listed nodes whose lease is gone. A node
//! found without a lease on two checks in a row is dead: one live node claims it (a `SET NX`
//! with a time to live, so a reaper that dies itself is replaced) and takes its members out of
//! their rooms in batches, each with the membership script of a leave, so every remaining
//! member hears `member_left` with the new count, once (the script publishes only when it
//! removed the member: two reapers could never tell a leave twice). Then the dead node is
//! unlisted.
//!
//! The bound, from a `SIGKILL` to the last `member_left`: the lease outlives the last renewal
//! by at most [`LEASE_TTL`], a reaper notices within two checks ([`RENEW_EVERY`] apart), and a
//! batch of [`REAP_BATCH`] members takes one round trip: about 7 s for a few thousand members.
//!
//! A reaper only acts when its own previous renewal went through: after Redis was paused or
//! unreachable, every lease may have lapsed, and the nodes that held them are alive and about
//! to renew. A node that really was cut off longer than its lease is reaped like a dead one; it
//! finds a `reaped` mark when it reconnects and puts its members back, with a join for the
//! other nodes.

use std::collections::HashSet;
use std::sync::Weak;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::connection::{Client, Commands};
use super::{
    membership_command, occupancy, presence, register_members, Change, Channels, PusherApps,
};
use crate::api::webhooks::{EventKind, Webhooks};
use crate::hub::Router;
use crate::metrics::Metrics;
use std::sync::Arc;

/// A command and its arguments.
macro_rules! command {
    ($name:expr $(, $arg:expr)* $(,)?) => {{
        let mut command = redis::cmd($name);
        $(command.arg($arg);)*
        command
    }};
}

/// How long a node's lease outlives its last renewal.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(5);

/// How often a node renews its lease and looks for dead nodes.
pub(super) const RENEW_EVERY: Duration = Duration::from_secs(1);

/// How long a reaper's claim on a dead node lasts without being renewed (each batch renews
/// it): a reaper that dies mid-way is replaced after this.
const CLAIM_TTL: Duration = Duration::from_secs(15);

/// How long the `reaped` mark waits for a node that was only cut off to come back.
const REAPED_MARK_TTL: Duration = Duration::from_secs(24 * 3600);

/// Members taken out of their rooms per round trip.
const REAP_BATCH: usize = 256;

/// What the lease task needs.
pub(super) struct Lease {
    pub client: Client,
    pub node: u64,
    pub channels: Arc<Channels>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<dyn Router>,
    /// Told of what a reaped node's connections did last: leave their rooms, end.
    pub webhooks: Option<Arc<Webhooks>>,
    /// The Pusher apps, whose webhooks hear what a reaper's leaves decide of their channels.
    pub apps: PusherApps,
    /// This node's presence entries, put back when it finds itself reaped.
    pub present: presence::Present,
    /// Gone when the broker is dropped: the task ends.
    pub alive: Weak<()>,
}

/// Renews this node's lease and reaps dead nodes until the broker is dropped.
pub(super) async fn run(lease: Lease) {
    let me = format!("{:016x}", lease.node);
    let mut connection: Option<Commands> = None;
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether the previous renewal went through: only then are lapsed leases evidence.
    let mut renewed_before = false;
    // Nodes found without a lease on the previous check.
    let mut suspects: HashSet<String> = HashSet::new();
    loop {
        tick.tick().await;
        if lease.alive.upgrade().is_none() {
            return;
        }
        if connection.is_none() {
            match lease.client.commands().await {
                Ok(manager) => connection = Some(manager),
                Err(error) => {
                    debug!(%error, "redis lease cannot connect");
                    renewed_before = false;
                    continue;
                }
            }
        }
        let redis = connection.as_mut().expect("connected above");
        let reaped = match renew(redis, &lease.channels, &me).await {
            Ok(reaped) => reaped,
            Err(error) => {
                debug!(%error, "redis lease not renewed");
                renewed_before = false;
                suspects.clear();
                continue;
            }
        };
        if reaped {
            // Taken for dead while it could not renew (stopped, or cut off without its
            // subscription noticing): its members go back, with a join for the others.
            let (client, channels, node) = (&lease.client, &*lease.channels, lease.node);
            let _ = register_members(client, channels, node, &*lease.hub).await;
            let _ = presence::register(client, channels, node, &lease.present, &lease.apps).await;
            let _ = occupancy::register(client, channels, node, &*lease.hub, &lease.apps).await;
        }
        if !renewed_before {
            renewed_before = true;
            suspects.clear();
            continue;
        }
        let lapsed = match lapsed_nodes(redis, &lease.channels, &me).await {
            Ok(lapsed) => lapsed,
            Err(error) => {
                debug!(%error, "redis lease check failed");
                continue;
            }
        };
        for node in lapsed.intersection(&suspects) {
            let hooks = Hooks {
                webhooks: &lease.webhooks,
                apps: &lease.apps,
            };
            match reap(redis, &lease.channels, &hooks, lease.node, &me, node).await {
                Ok(Some(members)) => {
                    lease.metrics.redis_reaped_members.increment(members as u64);
                    warn!(node = %node, members, "dead node reaped: its members left their rooms");
                }
                Ok(None) => debug!(node = %node, "dead node claimed by another reaper"),
                Err(error) => debug!(%error, node = %node, "reaping interrupted; retried"),
            }
        }
        suspects = lapsed;
    }
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// This node's lease for another [`LEASE_TTL`], and its place in the node list; true when it
/// finds itself marked as reaped.
async fn renew(redis: &mut Commands, channels: &Channels, me: &str) -> redis::RedisResult<bool> {
    let answers = redis
        .run(vec![
            command!("EXISTS", &channels.node_key(me, "reaped")),
            command!(
                "SET",
                &channels.node_key(me, "lease"),
                &1,
                &"PX",
                &millis(LEASE_TTL)
            ),
            command!("SADD", &channels.nodes(), &me),
        ])
        .await?;
    redis::from_redis_value(&answers[0])
}

/// The listed nodes, other than this one, whose lease is gone.
async fn lapsed_nodes(
    redis: &mut Commands,
    channels: &Channels,
    me: &str,
) -> redis::RedisResult<HashSet<String>> {
    let nodes: Vec<String> = redis.query(command!("SMEMBERS", &channels.nodes())).await?;
    let others: Vec<String> = nodes.into_iter().filter(|node| node != me).collect();
    let checks = others
        .iter()
        .map(|node| command!("EXISTS", &channels.node_key(node, "lease")))
        .collect();
    let alive = redis.run(checks).await?;
    Ok(others
        .into_iter()
        .zip(alive)
        .filter(|(_, alive)| !redis::from_redis_value::<bool>(alive).unwrap_or(true))
        .map(|(node, _)| node)
        .collect())
}

/// Takes the dead `node`'s members out of their rooms, if this node wins the claim on it
/// (`None` when another reaper has it). Stops, leaving the rest, if the node renews its lease
/// meanwhile (it was only cut off).
/// Who hears what a reaper's leaves decide.
struct Hooks<'a> {
    webhooks: &'a Option<Arc<Webhooks>>,
    apps: &'a PusherApps,
}

async fn reap(
    redis: &mut Commands,
    channels: &Channels,
    hooks: &Hooks<'_>,
    reaper: u64,
    me: &str,
    node: &str,
) -> redis::RedisResult<Option<usize>> {
    let claim = channels.node_key(node, "reaper");
    let claimed: Option<String> = redis
        .query(command!(
            "SET",
            &claim,
            &me,
            &"NX",
            &"PX",
            &millis(CLAIM_TTL)
        ))
        .await?;
    if claimed.is_none() {
        let holder: Option<String> = redis.query(command!("GET", &claim)).await?;
        if holder.as_deref() != Some(me) {
            return Ok(None);
        }
    }
    let Ok(node_id) = u64::from_str_radix(node, 16) else {
        // Not one of ours: unlisted, nothing else touched.
        redis
            .run(vec![command!("SREM", &channels.nodes(), &node)])
            .await?;
        return Ok(Some(0));
    };
    // Marked first: a node that was only cut off and returns mid-way knows to put its
    // members back with a join each.
    redis
        .run(vec![command!(
            "SET",
            &channels.node_key(node, "reaped"),
            &me,
            &"PX",
            &millis(REAPED_MARK_TTL)
        )])
        .await?;
    let lease = channels.node_key(node, "lease");
    let mut reaped = 0;
    // Rooms and presence channels first, then connections: the application hears each member
    // leave its rooms before it hears the connection end, as from a live node.
    for index in [
        channels.node_key(node, "members"),
        channels.node_key(node, "presence"),
        channels.node_key(node, "groups"),
        channels.node_key(node, "clients"),
    ] {
        loop {
            let alive: bool = redis.query(command!("EXISTS", &lease)).await?;
            if alive {
                info!(
                    node,
                    members = reaped,
                    "a node taken for dead renewed its lease: reaping stopped"
                );
                return Ok(Some(reaped));
            }
            let entries: Vec<String> = redis
                .query(command!("SRANDMEMBER", &index, REAP_BATCH))
                .await?;
            if entries.is_empty() {
                break;
            }
            reaped += if index.ends_with(":presence") {
                let apps = hooks.apps;
                reap_presence_batch(redis, channels, apps, reaper, node_id, &index, &entries)
                    .await?
            } else if index.ends_with(":groups") {
                occupancy::reap_batch(redis, channels, hooks.apps, node_id, &entries).await?
            } else {
                let webhooks = hooks.webhooks;
                reap_batch(redis, channels, webhooks, reaper, node_id, &index, &entries).await?
            };
            redis
                .run(vec![command!("PEXPIRE", &claim, millis(CLAIM_TTL))])
                .await?;
        }
    }
    redis
        .run(vec![
            command!("SREM", &channels.nodes(), &node),
            command!("DEL", &claim),
        ])
        .await?;
    Ok(Some(reaped))
}

/// Takes one batch of a dead node's index `entries` out: for a room entry, the leave script
/// (every remaining member hears `member_left`); for each entry, its removal from the index,
/// whose answer says whether this reaper removed it, so that the webhooks hear of each
/// (`member_left` and, for a room left empty, `room_vacated`; `client_disconnected` for a
/// connection) exactly once even if two reapers overlap. Returns the room entries reaped.
async fn reap_batch(
    redis: &mut Commands,
    channels: &Channels,
    webhooks: &Option<Arc<Webhooks>>,
    reaper: u64,
    node: u64,
    index: &str,
    entries: &[String],
) -> redis::RedisResult<usize> {
    type Entry = (String, Option<String>, Option<String>);
    let parsed: Vec<Option<Entry>> = entries
        .iter()
        .map(|entry| serde_json::from_str(entry).ok())
        .collect();
    let mut batch = Vec::with_capacity(entries.len() * 2);
    for (entry, parsed) in entries.iter().zip(&parsed) {
        if let Some((client_id, Some(room), _)) = parsed {
            batch.push(membership_command(
                channels,
                reaper,
                Change::Leave,
                room,
                node,
                client_id,
            ));
        }
        batch.push(command!("SREM", index, entry));
    }
    let answers = redis.run(batch).await?;
    let mut answers = answers.iter().map(redis::from_redis_value::<i64>);
    let mut reaped = 0;
    for parsed in parsed {
        let total = match &parsed {
            Some((_, Some(_), _)) => answers.next(),
            _ => None,
        };
        let removed = matches!(answers.next(), Some(Ok(1)));
        let Some((client_id, room, user_id)) = parsed else {
            continue; // not an entry of ours: dropped from the index, nothing told
        };
        if !removed {
            continue; // another reaper had it
        }
        let Some(webhooks) = webhooks else {
            reaped += usize::from(room.is_some());
            continue;
        };
        let client_id: Arc<str> = Arc::from(client_id);
        let user_id: Option<Arc<str>> = user_id.map(Arc::from);
        match room {
            Some(room) => {
                reaped += 1;
                let user = user_id.as_ref();
                webhooks.emit_for(EventKind::MemberLeft, &client_id, user, Some(&room));
                if let Some(Ok(0)) = total {
                    webhooks.emit_for(EventKind::RoomVacated, &client_id, user, Some(&room));
                }
            }
            None => webhooks.emit_for(
                EventKind::ClientDisconnected,
                &client_id,
                user_id.as_ref(),
                None,
            ),
        }
    }
    Ok(reaped)
}

/// Takes one batch of a dead node's presence index `entries` out: the leave script for each
/// (its channel's members hear `member_removed` when it was its user's last connection; a
/// second reaper's finds it gone and publishes nothing), and its removal from the index.
/// Returns the entries reaped.
async fn reap_presence_batch(
    redis: &mut Commands,
    channels: &Channels,
    apps: &PusherApps,
    reaper: u64,
    node: u64,
    index: &str,
    entries: &[String],
) -> redis::RedisResult<usize> {
    let mut batch = Vec::with_capacity(entries.len() * 2);
    // Each leave's group, by its place in the batch.
    let mut leaves = Vec::new();
    for entry in entries {
        if let Ok((group, channel, conn)) = serde_json::from_str::<presence::IndexEntry>(entry) {
            batch.push(presence::leave_command(
                channels, reaper, node, conn, &group, &channel,
            ));
            leaves.push((batch.len() - 1, group));
        }
        batch.push(command!("SREM", index, entry));
    }
    let answers = redis.run(batch).await?;
    for (at, group) in &leaves {
        // The webhooks hear each user removed, and each channel vacated, once: a second
        // reaper's leave finds the entry gone and answers -1.
        presence::tell_left(apps, group, answers.get(*at));
    }
    Ok(leaves.len())
}
