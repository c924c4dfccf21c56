//! Room history in cluster mode (`--history-size` with `--redis` or `--redis-cluster`): each
//! kept room's messages in a Redis stream, so a client recovers on any node, and after the node
//! it was on restarted.
//!
//! Keys, hash-tagged with the room on a cluster (`{r:ROOM}`, see `Channels::room_key`) so every
//! script below runs on one shard with the room's channel and member set:
//! - `PREFIX:history:ROOM`, a stream: entry id `0-OFFSET`, fields `e` (the message's envelope,
//!   offset included, as every node received it) and `t` (Redis's clock at the append, in ms,
//!   for the TTL); trimmed to the room's size (`MAXLEN`) at each append.
//! - `PREFIX:history-meta:ROOM`, a hash: `epoch` (drawn by the node that first needed one)
//!   and `top` (the last offset given). Both keys live for the room's TTL after its last
//!   message; the nodes with members renew the hash (see [`keep_alive`]), so a quiet room with
//!   members keeps its epoch, as on one node. A history lost (expired, flushed, Redis restarted
//!   empty) comes back with a new epoch: no client's old offset is taken for one of it. Each
//!   script that gives a room a new epoch also deletes its stream: were the hash lost alone
//!   (evicted), the offsets start again at 1, below the old entries' ids, and `XADD` would
//!   refuse every message until they caught up.
//!
//! Offsets travel as the decimal strings the nodes send: the scripts compare them as stream
//! ids (`(0-N`, exclusive) rather than doing arithmetic on them, which Lua does in doubles and
//! prints as `1e+14` past 10^14.
//!
//! Order: with history on, a room message is not delivered by the sending node at once; the
//! append script gives it the next offset and publishes its envelope, and every node, the
//! sender's too, delivers what arrives on the room's channel, which is the offsets' order.
//! A join with `since` is one script with the membership change: it reads the room's top and
//! what the joiner missed at the point where its `member_joined` is published, so what is
//! replayed and what arrives live after that notice meet with no gap and no duplicate (the hub
//! keeps the live part for the joiner until the replay is in, see
//! [`crate::hub::Router::recovered`]).

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use tokio::sync::mpsc;

use super::{value_of, Channels, Envelope, Outgoing};
use crate::history::{HistoryConfig, HistoryPolicy};
use crate::hub::{HistoryPage, JoinPoint, Router};
use crate::protocol::{self, Body};

/// Appends one message: KEYS[1] the stream, KEYS[2] the meta hash; ARGV[1] an epoch for a room
/// that has none, ARGV[2] the room's size, ARGV[3] its TTL in ms, ARGV[4] .. offset .. ARGV[5]
/// the envelope, published with ARGV[6] (`PUBLISH` or `SPUBLISH`) on channel ARGV[7]. Answers
/// the offset.
const APPEND_SCRIPT: &str = r#"
if redis.call('HSETNX', KEYS[2], 'epoch', ARGV[1]) == 1 then redis.call('DEL', KEYS[1]) end
local top = redis.call('HINCRBY', KEYS[2], 'top', 1)
local now = redis.call('TIME')
local ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
local envelope = ARGV[4] .. top .. ARGV[5]
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '0-' .. top, 'e', envelope, 't', ms)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[6], ARGV[7], envelope)
return top
"#;

/// A join with `since`: the membership script's join (KEYS[1] the member set, ARGV[1..6] as
/// there), then, in the same step, the room's place: KEYS[2] the stream, KEYS[3] the meta hash;
/// ARGV[7] an epoch for a room that has none, ARGV[8] the TTL in ms, ARGV[9] the offset the
/// joiner saw ('' for none: from now on), ARGV[10] its epoch, ARGV[11] the most one recovery
/// replays. Answers {count, top, epoch, recovered (0/1), envelopes missed...}: recovered only
/// when every message after the offset seen is still kept, unexpired, and not too many.
const JOIN_SINCE_SCRIPT: &str = r#"
local changed = redis.call(ARGV[5], KEYS[1], ARGV[1])
local total = redis.call('SCARD', KEYS[1])
if changed == 1 then redis.call(ARGV[6], ARGV[2], ARGV[3] .. total .. ARGV[4]) end
if redis.call('HSETNX', KEYS[3], 'epoch', ARGV[7]) == 1 then redis.call('DEL', KEYS[2]) end
redis.call('PEXPIRE', KEYS[3], ARGV[8])
local meta = redis.call('HMGET', KEYS[3], 'epoch', 'top')
local epoch, top = meta[1], tonumber(meta[2] or '0')
local reply = {total, top, epoch, 0}
if ARGV[9] == '' or ARGV[10] ~= epoch then return reply end
local seen = tonumber(ARGV[9])
if seen == nil or seen > top or top - seen > tonumber(ARGV[11]) then return reply end
if seen == top then reply[4] = 1 return reply end
local entries = redis.call('XRANGE', KEYS[2], '(0-' .. ARGV[9], '+')
if #entries ~= top - seen then return reply end
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[8])
local fields = entries[1][2]
if tonumber(fields[4]) < cutoff then return reply end
reply[4] = 1
for i, entry in ipairs(entries) do reply[4 + i] = entry[2][2] end
return reply
"#;

/// A page of history: KEYS[1] the stream, KEYS[2] the meta hash; ARGV[1] how many, ARGV[2] the
/// offset to start after ('' for the last ones), ARGV[3] the TTL in ms, ARGV[4] an epoch for a
/// room that has none. Answers {top, epoch, envelopes..., oldest first}, expired ones left out.
const READ_SCRIPT: &str = r#"
if redis.call('HSETNX', KEYS[2], 'epoch', ARGV[4]) == 1 then
  redis.call('DEL', KEYS[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'top')
local reply = {tonumber(meta[2] or '0'), meta[1]}
local entries
if ARGV[2] == '' then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
else
  entries = redis.call('XRANGE', KEYS[1], '(0-' .. ARGV[2], '+', 'COUNT', ARGV[1])
end
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[3])
local kept = {}
for _, entry in ipairs(entries) do
  if tonumber(entry[2][4]) >= cutoff then table.insert(kept, entry[2][2]) end
end
if ARGV[2] == '' then
  for i = #kept, 1, -1 do table.insert(reply, kept[i]) end
else
  for _, envelope in ipairs(kept) do table.insert(reply, envelope) end
end
return reply
"#;

/// A new epoch, offered to Redis for a room that has none yet.
fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn millis(ttl: Duration) -> u64 {
    ttl.as_millis().max(1) as u64
}

/// The append of one room message whose envelope is `head` .. offset .. `tail`.
pub(super) fn append_command(
    channels: &Channels,
    room: &str,
    config: &HistoryConfig,
    head: &[u8],
    tail: &[u8],
) -> redis::Cmd {
    let mut command = redis::cmd("EVAL");
    command
        .arg(APPEND_SCRIPT)
        .arg(2)
        .arg(channels.history(room))
        .arg(channels.history_meta(room))
        .arg(new_epoch())
        .arg(config.size)
        .arg(millis(config.ttl))
        .arg(head)
        .arg(tail)
        .arg(channels.publish_verb())
        .arg(channels.room(room));
    command
}

/// The join-with-`since` script: the membership script's arguments (`membership_args`), then
/// the history's; `seen` is what the joiner says it saw (`None`: from now on).
pub(super) fn join_since_command(
    channels: &Channels,
    room: &str,
    config: &HistoryConfig,
    membership_args: &[String],
    seen: Option<(u64, &str)>,
) -> redis::Cmd {
    let mut command = redis::cmd("EVAL");
    command
        .arg(JOIN_SINCE_SCRIPT)
        .arg(3)
        .arg(channels.members(room))
        .arg(channels.history(room))
        .arg(channels.history_meta(room));
    for arg in membership_args {
        command.arg(arg);
    }
    let (offset, epoch) = match seen {
        Some((offset, epoch)) => (offset.to_string(), epoch),
        None => (String::new(), ""),
    };
    command
        .arg(new_epoch())
        .arg(millis(config.ttl))
        .arg(offset)
        .arg(epoch)
        .arg(config.max_recovery);
    command
}

/// The offset-carrying `room_message` frame of a kept envelope; `None` for what is not one.
pub(super) fn kept_frame(payload: &[u8]) -> Option<(u64, Bytes)> {
    let envelope: Envelope<'_> = serde_json::from_slice(payload).ok()?;
    let offset = envelope.offset?;
    let frame = protocol::room_message_at(
        &envelope.target,
        &envelope.from,
        &Body::Raw(envelope.message.raw()),
        envelope.timestamp,
        offset,
    );
    Some((offset, frame))
}

fn integer(value: &Value) -> Option<i64> {
    redis::from_redis_value(value).ok()
}

fn bytes(value: &Value) -> Option<Vec<u8>> {
    redis::from_redis_value(value).ok()
}

fn text(value: &Value) -> Option<String> {
    redis::from_redis_value(value).ok()
}

/// A join-with-`since` script's answer: the room's count and the joiner's place.
pub(super) fn join_point(answer: &Value) -> Option<(usize, JoinPoint)> {
    let Value::Array(items) = answer else {
        return None;
    };
    let total = integer(items.first()?)?;
    let top = integer(items.get(1)?)?;
    let epoch = text(items.get(2)?)?;
    let recovered = integer(items.get(3)?)? == 1;
    let replay = recovered.then(|| {
        items[4..]
            .iter()
            .filter_map(|item| kept_frame(&bytes(item)?).map(|(_, frame)| frame))
            .collect()
    });
    let point = JoinPoint {
        offset: top.max(0) as u64,
        epoch: Arc::from(epoch),
        replay,
    };
    Some((total.max(0) as usize, point))
}

/// Reads a page of `room`'s history (see [`crate::broker::Broker::history`]); `None` when
/// Redis did not answer.
pub(super) async fn read(
    queue: &mpsc::Sender<Outgoing>,
    channels: &Channels,
    room: &str,
    config: &HistoryConfig,
    limit: usize,
    since: Option<u64>,
) -> Option<HistoryPage> {
    let mut command = redis::cmd("EVAL");
    command
        .arg(READ_SCRIPT)
        .arg(2)
        .arg(channels.history(room))
        .arg(channels.history_meta(room))
        .arg(limit.min(config.size))
        .arg(since.map(|since| since.to_string()).unwrap_or_default())
        .arg(millis(config.ttl))
        .arg(new_epoch());
    let Value::Array(items) = value_of(queue, command).await? else {
        return None;
    };
    let offset = integer(items.first()?)?.max(0) as u64;
    let epoch = text(items.get(1)?)?;
    let messages = items[2..]
        .iter()
        .filter_map(|item| kept_frame(&bytes(item)?))
        .map(|(_, frame)| protocol::frame_payload(&frame))
        .collect();
    Some(HistoryPage {
        messages,
        offset,
        epoch: Arc::from(epoch),
    })
}

/// How often the nodes renew their rooms' history epochs: often enough for the shortest TTL.
fn renew_every(policy: &HistoryPolicy) -> Duration {
    let shortest = policy
        .rooms
        .iter()
        .filter(|rule| rule.size > 0)
        .map(|rule| rule.ttl)
        .chain([policy.base.ttl])
        .min()
        .unwrap_or(policy.base.ttl);
    (shortest / 3).clamp(Duration::from_millis(200), Duration::from_secs(30))
}

/// Renews, for each room with members here that keeps history, its meta hash's time to live,
/// until the broker is gone: a quiet room keeps its epoch while anyone is in it, as on one node
/// (its messages still expire one by one).
pub(super) async fn keep_alive(
    queue: mpsc::Sender<Outgoing>,
    channels: Arc<Channels>,
    policy: HistoryPolicy,
    hub: Arc<dyn Router>,
    alive: Weak<()>,
) {
    let mut every = tokio::time::interval(renew_every(&policy));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if alive.upgrade().is_none() {
            return;
        }
        for (room, _) in hub.top_rooms(usize::MAX) {
            let Some(config) = policy.for_room(&room) else {
                continue;
            };
            let mut renew = redis::cmd("PEXPIRE");
            renew
                .arg(channels.history_meta(&room))
                .arg(millis(config.ttl));
            if queue.try_send(Outgoing::unanswered(renew)).is_err() {
                break; // Redis slow or away: the next round tries again
            }
        }
    }
}
