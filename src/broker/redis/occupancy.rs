//! Pusher channels' occupancy across nodes, for their apps' webhooks: `channel_occupied` when a
//! channel gets its first connection on any node, `channel_vacated` when it loses its last,
//! once per cluster, however many nodes have it.
//!
//! Only channels of an app with a `webhook-url` are counted (nothing else needs it, and it
//! costs a round trip for a node's first and last connection in a channel). Such a channel has
//! a set of the nodes with connections in it (`PREFIX:occupied:GROUP`, the group as hash tag
//! on a cluster): a node adds itself with its first connection and takes itself out with its
//! last, each in one script whose answer says whether the set was empty before, or is after.
//! Each node indexes its channels (`PREFIX:node:{NODE}:groups`, written before the script adds
//! the node, cleared after it takes it out), so a reaper takes a dead node out of its channels
//! with the same script, and a node puts its channels back when Redis returns (restarted
//! empty, or after a reaper took the node for dead), and takes out those it left meanwhile.
//!
//! A presence channel's occupancy is its presence table's own, decided by the join and leave
//! scripts with its member events (see `presence.rs`), so it has no set here.
//!
//! Only Redis's answers decide: while Redis does not answer, no occupancy webhook is sent, and
//! when it is back the put-back tells what it changed: a channel this node left meanwhile is
//! vacated if no node is in it now (its index entry stays until a vacate is answered), and one
//! it still has is occupied if no node was in it (after a reaper took this node for dead, or
//! after Redis lost its data: then a channel occupied throughout is told occupied again, and
//! one left meanwhile is not told, its index lost with the rest). So around an outage an event
//! can be missed or told twice: an app reads them as states, not as counts.

use tracing::debug;

use super::connection::{Client, Commands};
use super::{answer_of, hooks_of, Channels, PusherApps, RedisBroker, RESPONSE_TIMEOUT};
use crate::hub::Router;

/// ARGV 1: a node. Adds it to the channel's set; answers 1 when the set was empty before (the
/// channel is occupied), else 0.
const OCCUPY_SCRIPT: &str = r#"
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 1 then
  return 1
end
return 0
"#;

/// ARGV 1: a node. Takes it out of the channel's set; answers 1 when the set is empty after
/// (the channel is vacated), else 0.
const VACATE_SCRIPT: &str = r#"
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 0 then
  return 1
end
return 0
"#;

/// ARGV 1: a node whose vacate went unanswered (it may or may not have reached Redis). Takes
/// it out of the channel's set if it is still there; answers 1 when the set is empty after.
/// Not [`VACATE_SCRIPT`]: a vacate that reached Redis late took the node out without being
/// told, and this one tells it (twice, in the rare case where another node's vacate was told
/// in between).
const SETTLE_SCRIPT: &str = r#"
redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) == 0 then return 1 end
return 0
"#;

/// Whether the occupancy of `group` is counted here: a channel, not a presence one, of an app
/// whose webhooks hear it.
pub(super) fn is_counted(apps: &PusherApps, group: &str) -> bool {
    hooks_of(apps, group).is_some_and(|(_, channel)| !channel.starts_with("presence-"))
}

fn node_name(node: u64) -> String {
    format!("{node:016x}")
}

fn script(script: &str, channels: &Channels, node: u64, group: &str) -> redis::Cmd {
    let mut command = redis::cmd("EVAL");
    command
        .arg(script)
        .arg(1)
        .arg(channels.room_key("occupied", group))
        .arg(node_name(node));
    command
}

/// Node `node` into `group`'s set (see [`OCCUPY_SCRIPT`]).
fn occupy_command(channels: &Channels, node: u64, group: &str) -> redis::Cmd {
    script(OCCUPY_SCRIPT, channels, node, group)
}

/// Node `node` out of `group`'s set (see [`VACATE_SCRIPT`]).
fn vacate_command(channels: &Channels, node: u64, group: &str) -> redis::Cmd {
    script(VACATE_SCRIPT, channels, node, group)
}

/// `SADD` or `SREM` of `group` in node `node`'s channel index.
fn index_command(channels: &Channels, verb: &str, node: u64, group: &str) -> redis::Cmd {
    let mut command = redis::cmd(verb);
    command
        .arg(channels.node_key(&node_name(node), "groups"))
        .arg(group);
    command
}

/// Tells `group`'s app that the channel is occupied (`true`) or vacated.
fn tell(apps: &PusherApps, group: &str, occupied: bool) {
    let Some((hooks, channel)) = hooks_of(apps, group) else {
        return;
    };
    if occupied {
        hooks.channel_occupied(channel);
    } else {
        hooks.channel_vacated(channel);
    }
}

impl RedisBroker {
    /// This node has its first connection in `group`: it joins the channel's set, and the
    /// webhooks hear when it made the channel occupied.
    pub(super) fn occupy(&self, group: &str) {
        // Indexed before the script: the index holds every set this node may be in.
        self.send_command(index_command(&self.channels, "SADD", self.node, group));
        let occupy = occupy_command(&self.channels, self.node, group);
        let (queue, apps, group) = (self.publish.clone(), self.apps.clone(), group.to_owned());
        tokio::spawn(async move {
            if answer_of(&queue, occupy).await == Some(1) {
                tell(&apps, &group, true);
            }
        });
    }

    /// This node's last connection left `group`: it leaves the channel's set, and the webhooks
    /// hear when that vacated the channel.
    pub(super) fn vacate(&self, group: &str) {
        let vacate = vacate_command(&self.channels, self.node, group);
        let unindex = index_command(&self.channels, "SREM", self.node, group);
        let (queue, apps, group) = (self.publish.clone(), self.apps.clone(), group.to_owned());
        tokio::spawn(async move {
            let Some(vacated) = answer_of(&queue, vacate).await else {
                // Maybe still in the set: the entry stays for the put-back to take it out
                // when Redis is back.
                return;
            };
            let _ = queue.try_send(super::Outgoing::unanswered(unindex));
            if vacated == 1 {
                tell(&apps, &group, false);
            }
        });
    }
}

/// After Redis came back, on a connection of its own: puts this node back into the set of
/// each channel it has connections in, and takes it out of each one its index names that it
/// has none in now (it left them while Redis did not answer), telling the webhooks what that
/// changed. Returns the channels put back, `None` when Redis did not take them.
pub(super) async fn register(
    client: &Client,
    channels: &Channels,
    node: u64,
    hub: &dyn Router,
    apps: &PusherApps,
) -> Option<usize> {
    if !apps.as_deref().is_some_and(|apps| apps.has_webhooks()) {
        return Some(0);
    }
    let work = async {
        let mut redis = client.commands().await?;
        let mut members = redis::cmd("SMEMBERS");
        members.arg(channels.node_key(&node_name(node), "groups"));
        let indexed: Vec<String> = redis.query(members).await?;
        let here: Vec<String> = hub
            .groups("pusher/")
            .into_iter()
            .filter(|(group, size)| *size > 0 && is_counted(apps, group))
            .map(|(group, _)| group)
            .collect();
        let mut batch = Vec::new();
        // Each script's group and whether it occupies, by its place in the batch.
        let mut scripts = Vec::new();
        for group in indexed.iter().filter(|group| !here.contains(group)) {
            scripts.push((batch.len(), group, false));
            batch.push(script(SETTLE_SCRIPT, channels, node, group));
            batch.push(index_command(channels, "SREM", node, group));
        }
        for group in &here {
            batch.push(index_command(channels, "SADD", node, group));
            scripts.push((batch.len(), group, true));
            batch.push(occupy_command(channels, node, group));
        }
        if batch.is_empty() {
            return Ok(0);
        }
        let answers = redis.run(batch).await?;
        for (at, group, occupies) in scripts {
            if answers
                .get(at)
                .is_some_and(|answer| redis::from_redis_value::<i64>(answer) == Ok(1))
            {
                tell(apps, group, occupies);
            }
        }
        Ok::<_, redis::RedisError>(here.len())
    };
    match tokio::time::timeout(RESPONSE_TIMEOUT * 2, work).await {
        Ok(Ok(registered)) => Some(registered),
        Ok(Err(error)) => {
            debug!(%error, "pusher channels not put back");
            None
        }
        Err(_) => None,
    }
}

/// Takes the dead `node` out of one batch of its indexed channels, `groups`, telling the
/// webhooks of each channel that it vacated; the second of two overlapping reapers finds the
/// node out already and tells nothing. Returns the channels taken out.
pub(super) async fn reap_batch(
    redis: &mut Commands,
    channels: &Channels,
    apps: &PusherApps,
    node: u64,
    groups: &[String],
) -> redis::RedisResult<usize> {
    let mut batch = Vec::with_capacity(groups.len() * 2);
    for group in groups {
        batch.push(vacate_command(channels, node, group));
        batch.push(index_command(channels, "SREM", node, group));
    }
    let answers = redis.run(batch).await?;
    for (group, answer) in groups.iter().zip(answers.iter().step_by(2)) {
        if redis::from_redis_value::<i64>(answer) == Ok(1) {
            tell(apps, group, false);
        }
    }
    Ok(groups.len())
}
