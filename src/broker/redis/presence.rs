//! Presence across nodes: a presence channel's members live in Redis, and every change to them
//! is one script that changes the tables and publishes the change on the channel's group
//! channel, so every node's members see one order of member events, and each user is added
//! once and removed once however many connections, on however many nodes, it has.
//!
//! Per channel (the group's name as hash tag, so one script's keys share a cluster slot):
//! - `PREFIX:presence:GROUP`, a hash of each connection (`NODE:CONN`) to its user;
//! - `PREFIX:presence-users:GROUP`, a hash of each user to its connection count;
//! - `PREFIX:presence-info:GROUP`, a hash of each user to its `user_info` (its first
//!   connection's: the one `member_added` told).
//!
//! A join publishes envelope `P` (its message `{"a": member_added frame or absent, "s": [id,
//! info, ...]}`, the members after it): every node sends `a` to its members but the joiner, and
//! the joiner's node sends the joiner `subscription_succeeded` with `s`. Member events before
//! `P` in the channel's order are in `s`; those after it reach the joiner after its list, so its
//! view is exact. A leave publishes envelope `L`, the `member_removed` frame, when it was the
//! user's last connection. Both come back to the sending node too: member events are delivered
//! from Redis only, in its order.
//!
//! Each node indexes its presence entries (`PREFIX:node:{NODE}:presence`, JSON `[group,
//! channel, conn]`), so a reaper takes a dead node's connections out with the same leave script.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::connection::Client;
use super::{
    answer_of, envelope_head, hooks_of, lock, value_of, Channels, Envelope, Outgoing, PusherApps,
    RedisBroker, Subscriber, Wants, ACTIVATION_GRACE, RESPONSE_TIMEOUT,
};
use crate::broker::{
    PresenceJoin, PresenceJoined, PresenceJoining, PresenceLeft, PresenceRefusal, Publication,
    Target,
};
use crate::hub::{ConnId, Router};
use crate::outbox::Outbox;
use crate::protocol::Body;
use crate::pusher::wire::{self, PresenceMember};

/// A connection joins: ARGV 1 its entry (`NODE:CONN`), 2 its user, 3 the user's info, 4 the
/// group's channel, 5 the publish verb, 6 the `P` envelope's head (up to its message), 7 the
/// `member_added` frame's text, 8 the most users, 9 `1` when it is put back (after Redis came
/// back), not joining. Answers 0 when the channel is full (nothing changed, nothing
/// published), else 1 (joined, or it was already: `P` again, without `a`, but for one put
/// back, which publishes only when it is new), plus [`USER_ADDED`] when the user is new to the
/// channel and [`CHANNEL_OCCUPIED`] when the channel had no connection before, anywhere.
const JOIN_SCRIPT: &str = r#"
local already = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if already and ARGV[9] == '1' then return 1 end
local added = nil
local answer = 1
if not already then
  local new = redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0
  if new and redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[8]) then return 0 end
  if redis.call('HLEN', KEYS[1]) == 0 then answer = answer + 4 end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  if new then
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
    added = ARGV[7]
    answer = answer + 2
  end
end
local members = redis.call('HGETALL', KEYS[3])
redis.call(ARGV[5], ARGV[4], ARGV[6] .. cjson.encode({a = added, s = members}) .. '}')
return answer
"#;

/// In a join's answer: its user is new to the channel (`member_added` was published).
const USER_ADDED: i64 = 2;
/// In a join's answer: the channel had no connection before it, on any node.
const CHANNEL_OCCUPIED: i64 = 4;

/// A connection leaves: ARGV 1 its entry, 2 the group's channel, 3 the publish verb, 4 the `L`
/// envelope's head, 5 the Pusher channel's name. Answers `{how, user}`: how -1 when it was
/// not in the channel (no user), 0 when its user has other connections there, 1 when it was the
/// user's last (`member_removed` published), 2 when it was also the channel's last connection,
/// anywhere.
const LEAVE_SCRIPT: &str = r#"
local user = redis.call('HGET', KEYS[1], ARGV[1])
if not user then return {-1} end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HINCRBY', KEYS[2], user, -1) > 0 then return {0, user} end
redis.call('HDEL', KEYS[2], user)
redis.call('HDEL', KEYS[3], user)
local data = cjson.encode({user_id = user})
local frame = cjson.encode({event = 'pusher_internal:member_removed', channel = ARGV[5], data = data})
redis.call(ARGV[3], ARGV[2], ARGV[4] .. frame .. '}')
if redis.call('HLEN', KEYS[1]) == 0 then return {2, user} end
return {1, user}
"#;

/// What the join script's `answer` says to the app's webhooks of `group`, when it has them:
/// `channel_occupied` and `member_added` for `user_id`, as the cluster decided them.
pub(super) fn tell_joined(apps: &PusherApps, group: &str, user_id: &str, answer: i64) {
    let Some((hooks, channel)) = hooks_of(apps, group) else {
        return;
    };
    if answer & CHANNEL_OCCUPIED != 0 {
        hooks.channel_occupied(channel);
    }
    if answer & USER_ADDED != 0 {
        hooks.member_added(channel, user_id);
    }
}

/// What the leave script's answer says to the app's webhooks of `group`, when it has them:
/// `member_removed`, and `channel_vacated` after it, as the cluster decided them.
pub(super) fn tell_left(apps: &PusherApps, group: &str, answer: Option<&redis::Value>) {
    let Some((hooks, channel)) = hooks_of(apps, group) else {
        return;
    };
    let Some(Ok((how, Some(user)))) = answer.map(redis::from_redis_value::<(i64, Option<String>)>)
    else {
        return;
    };
    if how >= 1 {
        hooks.member_removed(channel, &user);
    }
    if how == 2 {
        hooks.channel_vacated(channel);
    }
}

/// Whether `group` is a channel of an app whose webhooks would hear its leaves: only then is
/// a leave's answer waited for.
pub(super) fn is_heard(apps: &PusherApps, group: &str) -> bool {
    hooks_of(apps, group).is_some()
}

/// A presence entry: a connection of a node.
pub(super) fn entry(node: u64, conn: ConnId) -> String {
    format!("{node:016x}:{conn}")
}

/// An entry of a node's presence index, which a reaper reads.
pub(super) fn index_entry(group: &str, channel: &str, conn: ConnId) -> String {
    serde_json::to_string(&(group, channel, conn)).expect("an index entry serializes")
}

/// A presence index entry read back.
pub(super) type IndexEntry = (String, String, ConnId);

fn keys(command: &mut redis::Cmd, channels: &Channels, group: &str) {
    command
        .arg(3)
        .arg(channels.room_key("presence", group))
        .arg(channels.room_key("presence-users", group))
        .arg(channels.room_key("presence-info", group));
}

/// The join script for connection `conn` of node `node` (socket id `socket_id`).
#[allow(clippy::too_many_arguments)]
pub(super) fn join_command(
    channels: &Channels,
    node: u64,
    conn: ConnId,
    socket_id: &str,
    group: &str,
    user_id: &str,
    user_info: &str,
    member_added: &str,
    max_members: usize,
    put_back: bool,
) -> redis::Cmd {
    let mut command = redis::cmd("EVAL");
    command.arg(JOIN_SCRIPT);
    keys(&mut command, channels, group);
    command
        .arg(entry(node, conn))
        .arg(user_id)
        .arg(user_info)
        .arg(channels.group(group))
        .arg(channels.publish_verb())
        .arg(envelope_head(node, 'P', group, socket_id))
        .arg(member_added)
        .arg(max_members)
        .arg(u8::from(put_back));
    command
}

/// The leave script for connection `conn` of node `member_node`, published as by `publisher`
/// (a reaper speaks for a dead node's connections).
pub(super) fn leave_command(
    channels: &Channels,
    publisher: u64,
    member_node: u64,
    conn: ConnId,
    group: &str,
    channel: &str,
) -> redis::Cmd {
    let mut command = redis::cmd("EVAL");
    command.arg(LEAVE_SCRIPT);
    keys(&mut command, channels, group);
    command
        .arg(entry(member_node, conn))
        .arg(channels.group(group))
        .arg(channels.publish_verb())
        .arg(envelope_head(publisher, 'L', group, ""))
        .arg(channel);
    command
}

/// The message of a `P` envelope.
#[derive(Deserialize)]
pub(super) struct Joined<'a> {
    /// The `member_added` frame's text, when the user is new.
    #[serde(borrow, default)]
    pub a: Option<Cow<'a, str>>,
    /// The members after the join: id, info (JSON text), id, info, ...
    #[serde(borrow, default)]
    pub s: Members<'a>,
}

/// A join's member list: Lua's cjson writes an empty one as `{}`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Members<'a> {
    List(#[serde(borrow)] Vec<Cow<'a, str>>),
    Other(serde::de::IgnoredAny),
}

impl Default for Members<'_> {
    fn default() -> Self {
        Members::List(Vec::new())
    }
}

impl Members<'_> {
    /// The (id, info) pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        let list: &[Cow<'_, str>] = match self {
            Members::List(list) => list,
            Members::Other(_) => &[],
        };
        list.chunks_exact(2).map(|pair| (&*pair[0], &*pair[1]))
    }
}

/// A presence join whose script is on its way, by connection and group.
pub(super) type Pending = Arc<Mutex<HashMap<(ConnId, Arc<str>), Joining>>>;

/// This node's connections in presence channels, by connection and group: what it puts back
/// into Redis when Redis returns (see [`register`]).
pub(super) type Present = Arc<Mutex<HashMap<(ConnId, Arc<str>), Presence>>>;

/// One connection's place in a presence channel.
pub(super) struct Presence {
    channel: Arc<str>,
    socket_id: Box<str>,
    user_id: Box<str>,
    user_info: Box<RawValue>,
}

/// A presence join on its way: its `subscription_succeeded` goes out when its `P` comes back
/// (see [`on_joined`]), which may be before or after its script's answer.
pub(super) struct Joining {
    outbox: Outbox,
    channel: Arc<str>,
    answer: Option<oneshot::Sender<Result<PresenceJoined, PresenceRefusal>>>,
    /// It was this node's first connection in the group.
    first_here: bool,
    /// Its script answered: it is in Redis.
    answered: bool,
    /// Its `P` came back: it has its member list.
    listed: bool,
    /// It left before its script answered; the join's task sends its leave after the join.
    left: bool,
}

impl RedisBroker {
    fn presence_index(&self, verb: &str, group: &str, channel: &str, conn: ConnId) -> redis::Cmd {
        let mut command = redis::cmd(verb);
        command
            .arg(self.channels.node_presence(self.node))
            .arg(index_entry(group, channel, conn));
        command
    }

    pub(super) fn join_presence_here(&self, join: &PresenceJoin<'_>) -> PresenceJoining {
        let Some(size) = self.hub.join_group(join.group, join.conn, join.outbox) else {
            return PresenceJoining::AlreadyMember;
        };
        let group_channel = self.channels.group(join.group);
        let subscribed = self.want(group_channel.clone());
        let group: Arc<str> = Arc::from(join.group);
        let key = (join.conn, group.clone());
        let (answer, joined) = oneshot::channel();
        lock(&self.present).insert(
            key.clone(),
            Presence {
                channel: Arc::from(join.channel),
                socket_id: join.socket_id.into(),
                user_id: join.user_id.into(),
                user_info: join.user_info.to_owned(),
            },
        );
        lock(&self.presence).insert(
            key.clone(),
            Joining {
                outbox: join.outbox.clone(),
                channel: Arc::from(join.channel),
                answer: Some(answer),
                first_here: size == 1,
                answered: false,
                listed: false,
                left: false,
            },
        );
        // Indexed before the join, unindexed after the leave: the index holds at least every
        // entry Redis has of this node's, for a reaper.
        self.send_command(self.presence_index("SADD", join.group, join.channel, join.conn));
        let added = wire::member_added(join.channel, join.user_id, join.user_info);
        let script = join_command(
            &self.channels,
            self.node,
            join.conn,
            join.socket_id,
            join.group,
            join.user_id,
            join.user_info.get(),
            added.get(),
            join.max_members,
            false,
        );
        let undo = Undo {
            leave: leave_command(
                &self.channels,
                self.node,
                self.node,
                join.conn,
                join.group,
                join.channel,
            ),
            unindex: self.presence_index("SREM", join.group, join.channel, join.conn),
            hub: self.hub.clone(),
            wants: self.wants.clone(),
            group_channel,
            apps: self.apps.clone(),
        };
        let (queue, pending, present) = (
            self.publish.clone(),
            self.presence.clone(),
            self.present.clone(),
        );
        let user_id: Box<str> = join.user_id.into();
        tokio::spawn(async move {
            // Subscribed first: its `P` must come back here.
            if let Some(subscribed) = subscribed {
                let _ = tokio::time::timeout(RESPONSE_TIMEOUT, subscribed).await;
            }
            let answered = answer_of(&queue, script).await;
            if let Some(answer) = answered.filter(|answer| *answer >= 1) {
                tell_joined(&undo.apps, &key.1, &user_id, answer);
            }
            let refusal = {
                let mut map = lock(&pending);
                let Some(entry) = map.get_mut(&key) else {
                    return;
                };
                match answered {
                    _ if entry.left => {
                        // It left meanwhile (out of the group already): its leave, after this.
                        map.remove(&key);
                        None
                    }
                    Some(answer) if answer >= 1 && entry.listed => {
                        map.remove(&key);
                        return;
                    }
                    Some(answer) if answer >= 1 => {
                        entry.answered = true;
                        Some(None)
                    }
                    Some(0) => Some(Some(PresenceRefusal::Full)),
                    _ => Some(Some(PresenceRefusal::Unavailable)),
                }
            };
            let Some(refusal) = refusal else {
                undo.send(&queue, &key.1, answered != Some(0)).await;
                return;
            };
            let refusal = match refusal {
                Some(refusal) => refusal,
                None => {
                    // Joined; its `P` is late (the subscription lost?): after a grace, it is
                    // taken out again rather than left waiting for a member list forever.
                    tokio::time::sleep(ACTIVATION_GRACE).await;
                    let map = lock(&pending);
                    match map.get(&key) {
                        Some(entry) if !entry.listed => PresenceRefusal::Unavailable,
                        _ => return,
                    }
                }
            };
            let Some(mut entry) = lock(&pending).remove(&key) else {
                return;
            };
            lock(&present).remove(&key);
            undo.out_of_group(key.0, &key.1);
            if let Some(answer) = entry.answer.take() {
                let _ = answer.send(Err(refusal));
            }
            undo.send(&queue, &key.1, refusal == PresenceRefusal::Unavailable)
                .await;
        });
        PresenceJoining::Later(joined)
    }

    /// Whether it was its user's last connection is the cluster's to say (its leave script
    /// decides and tells the members): `user_gone` is `None`.
    pub(super) fn leave_presence_here(
        &self,
        group: &str,
        channel: &str,
        conn: ConnId,
    ) -> Option<PresenceLeft> {
        let key = (conn, Arc::from(group));
        lock(&self.present).remove(&key);
        {
            let mut map = lock(&self.presence);
            match map.get_mut(&key) {
                Some(entry) if !entry.answered => {
                    // Its join's task sends the leave after the join, so Redis sees them in
                    // order.
                    entry.left = true;
                    drop(map);
                    let remaining_here = self.hub.leave_group(group, conn)?;
                    let _ = self.unwant(&self.channels.group(group));
                    return Some(PresenceLeft {
                        remaining_here,
                        user_gone: None,
                    });
                }
                Some(_) => {
                    map.remove(&key);
                }
                None => {}
            }
        }
        let remaining_here = self.hub.leave_group(group, conn)?;
        let _ = self.unwant(&self.channels.group(group));
        let leave = leave_command(&self.channels, self.node, self.node, conn, group, channel);
        if is_heard(&self.apps, group) {
            // Its webhooks hear what the script decided.
            let (queue, apps, group) = (self.publish.clone(), self.apps.clone(), group.to_owned());
            tokio::spawn(async move {
                let answer = value_of(&queue, leave).await;
                tell_left(&apps, &group, answer.as_ref());
            });
        } else {
            self.send_command(leave);
        }
        self.send_command(self.presence_index("SREM", group, channel, conn));
        Some(PresenceLeft {
            remaining_here,
            user_gone: None,
        })
    }
}

/// What takes a joiner back out: of its group here, and of Redis.
struct Undo {
    leave: redis::Cmd,
    unindex: redis::Cmd,
    hub: Arc<dyn Router>,
    wants: Wants,
    group_channel: String,
    /// Whose webhooks hear what the join and its leave decided.
    apps: PusherApps,
}

impl Undo {
    fn out_of_group(&self, conn: ConnId, group: &str) {
        if self.hub.leave_group(group, conn).is_some() {
            let _ = self.wants.unwant(&self.group_channel);
        }
    }

    /// Its leave from `group`, when Redis may have it (`in_redis`), and its index entry's
    /// removal.
    async fn send(self, queue: &mpsc::Sender<Outgoing>, group: &str, in_redis: bool) {
        if in_redis {
            if is_heard(&self.apps, group) {
                let answer = value_of(queue, self.leave).await;
                tell_left(&self.apps, group, answer.as_ref());
            } else {
                let _ = queue.try_send(Outgoing::unanswered(self.leave));
            }
        }
        let _ = queue.try_send(Outgoing::unanswered(self.unindex));
    }
}

/// A `P` envelope: the join's `member_added` to every member here but the joiner, and to the
/// joiner, when it is this node's, its member list.
pub(super) fn on_joined(state: &Subscriber, envelope: &Envelope<'_>) {
    let Ok(joined) = serde_json::from_str::<Joined<'_>>(envelope.message.raw().get()) else {
        return;
    };
    let joiner = (envelope.node == state.node)
        .then(|| state.apps.as_ref()?.conn_of(&envelope.from))
        .flatten();
    if let Some(added) = &joined.a {
        if let Ok(text) = serde_json::from_str::<&RawValue>(added) {
            let _ = state.hub.deliver(&Publication {
                target: Target::Group(&envelope.target),
                from: &envelope.from,
                message: Body::Raw(text),
                timestamp: envelope.timestamp,
                except: joiner,
            });
        }
    }
    let Some(conn) = joiner else {
        return;
    };
    let key = (conn, Arc::from(&*envelope.target));
    let mut map = lock(&state.presence);
    let Some(entry) = map.get_mut(&key) else {
        return;
    };
    if entry.left || entry.listed {
        return;
    }
    let members = joined.s.pairs().map(|(user_id, info)| PresenceMember {
        user_id,
        user_info: serde_json::from_str(info).unwrap_or(RawValue::NULL),
    });
    entry
        .outbox
        .push(wire::presence_succeeded(&entry.channel, members));
    entry.listed = true;
    if let Some(answer) = entry.answer.take() {
        let _ = answer.send(Ok(PresenceJoined {
            first_here: entry.first_here,
            new_user: joined.a.is_some(),
        }));
    }
    if entry.answered {
        map.remove(&key);
    }
}

/// A `L` envelope: `member_removed` to every member here.
pub(super) fn on_left(state: &Subscriber, envelope: &Envelope<'_>) {
    let _ = state.hub.deliver(&Publication {
        target: Target::Group(&envelope.target),
        from: "",
        message: Body::Raw(envelope.message.raw()),
        timestamp: envelope.timestamp,
        except: None,
    });
}

/// After Redis came back (see `register_members`), puts this node's presence entries back, on a
/// connection of its own: each present connection's join again (a no-op where Redis has it;
/// where Redis lost it, restarted empty or a reaper took this node for dead, the others hear
/// `member_added` for a user that is new to them), and the leave of each entry of the node's
/// index that is no longer present (its leave never reached Redis). Returns the entries put
/// back, `None` when Redis did not take them.
pub(super) async fn register(
    client: &Client,
    channels: &Channels,
    node: u64,
    present: &Present,
    apps: &PusherApps,
) -> Option<usize> {
    let index = channels.node_presence(node);
    let work = async {
        let mut redis = client.commands().await?;
        let mut members = redis::cmd("SMEMBERS");
        members.arg(&index);
        let indexed: Vec<String> = redis.query(members).await?;
        let mut batch = Vec::new();
        // What each command of the batch tells the webhooks.
        let mut told: Vec<Told> = Vec::new();
        let mut registered = 0;
        {
            let present = lock(present);
            for entry in &indexed {
                let Ok((group, channel, conn)) = serde_json::from_str::<IndexEntry>(entry) else {
                    continue;
                };
                if !present.contains_key(&(conn, Arc::from(group.as_str()))) {
                    batch.push(leave_command(channels, node, node, conn, &group, &channel));
                    let mut unindex = redis::cmd("SREM");
                    unindex.arg(&index).arg(entry);
                    batch.push(unindex);
                    told.extend([Told::Left(group), Told::Nothing]);
                }
            }
            for ((conn, group), presence) in present.iter() {
                let mut reindex = redis::cmd("SADD");
                reindex
                    .arg(&index)
                    .arg(index_entry(group, &presence.channel, *conn));
                batch.push(reindex);
                told.extend([
                    Told::Nothing,
                    Told::Joined(group.to_string(), presence.user_id.to_string()),
                ]);
                let added =
                    wire::member_added(&presence.channel, &presence.user_id, &presence.user_info);
                batch.push(join_command(
                    channels,
                    node,
                    *conn,
                    &presence.socket_id,
                    group,
                    &presence.user_id,
                    presence.user_info.get(),
                    added.get(),
                    usize::MAX,
                    true,
                ));
                registered += 1;
            }
        }
        if !batch.is_empty() {
            let answers = redis.run(batch).await?;
            for (told, answer) in told.iter().zip(&answers) {
                match told {
                    Told::Left(group) => tell_left(apps, group, Some(answer)),
                    Told::Joined(group, user_id) => {
                        if let Ok(answer) = redis::from_redis_value::<i64>(answer) {
                            tell_joined(apps, group, user_id, answer);
                        }
                    }
                    Told::Nothing => {}
                }
            }
        }
        Ok::<_, redis::RedisError>(registered)
    };
    match tokio::time::timeout(RESPONSE_TIMEOUT * 2, work).await {
        Ok(Ok(registered)) => Some(registered),
        _ => None,
    }
}

/// What a command of [`register`]'s batch tells the webhooks.
enum Told {
    Nothing,
    /// A leave of the group.
    Left(String),
    /// A join of the group by the user.
    Joined(String, String),
}
