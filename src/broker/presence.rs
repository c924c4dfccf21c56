//! Presence on one node: who is in each presence channel, counted per user, for the memory
//! broker. A channel's join or leave changes its table, its hub group and tells its members in
//! one step under the channel's lock, so every member sees the channel's member events in one
//! order, and a joiner's `subscription_succeeded` lists exactly the users before its place in
//! it. (Across nodes the same table lives in Redis: see `redis/presence.rs`.)

use std::collections::BTreeMap;
use std::sync::Arc;

use dashmap::DashMap;
use serde_json::value::RawValue;

use super::{
    PresenceJoin, PresenceJoined, PresenceJoining, PresenceLeft, PresenceRefusal, Publication,
    Target,
};
use crate::hub::{ConnId, Router};
use crate::protocol::{self, Body};
use crate::pusher::wire::{self, PresenceMember};

/// A presence channel's users on this node.
#[derive(Default)]
struct Channel {
    /// Each user's info (as its first connection gave it) and how many connections it has in
    /// the channel; in id order, as the snapshot lists them.
    users: BTreeMap<Box<str>, User>,
    /// Each connection's user.
    conns: Vec<(ConnId, Box<str>)>,
}

struct User {
    info: Box<RawValue>,
    connections: usize,
}

/// The presence channels of one node, by group.
#[derive(Default)]
pub struct LocalPresence {
    channels: DashMap<Arc<str>, Channel>,
}

impl LocalPresence {
    pub fn join(&self, hub: &dyn Router, join: &PresenceJoin<'_>) -> PresenceJoining {
        // The channel's lock is held across the group change and the frames, so no other join
        // or leave of this channel comes between them.
        let mut channel = self.channels.entry(Arc::from(join.group)).or_default();
        if channel.conns.iter().any(|(conn, _)| *conn == join.conn) {
            return PresenceJoining::AlreadyMember;
        }
        let new_user = !channel.users.contains_key(join.user_id);
        if new_user && channel.users.len() >= join.max_members {
            let empty = channel.users.is_empty();
            drop(channel);
            if empty {
                self.channels
                    .remove_if(join.group, |_, c| c.users.is_empty());
            }
            return PresenceJoining::Done(Err(PresenceRefusal::Full));
        }
        let Some(size) = hub.join_group(join.group, join.conn, join.outbox) else {
            return PresenceJoining::AlreadyMember;
        };
        channel.conns.push((join.conn, join.user_id.into()));
        let user = channel
            .users
            .entry(join.user_id.into())
            .or_insert_with(|| User {
                info: join.user_info.to_owned(),
                connections: 0,
            });
        user.connections += 1;
        if new_user {
            let added = wire::member_added(join.channel, join.user_id, join.user_info);
            tell(hub, join.group, &added, join.socket_id, Some(join.conn));
        }
        let members = channel.users.iter().map(|(id, user)| PresenceMember {
            user_id: id,
            user_info: &user.info,
        });
        join.outbox
            .push(wire::presence_succeeded(join.channel, members));
        PresenceJoining::Done(Ok(PresenceJoined {
            first_here: size == 1,
            new_user,
        }))
    }

    /// The channel's user ids, in order.
    pub fn users(&self, group: &str) -> Vec<String> {
        self.channels
            .get(group)
            .map(|channel| channel.users.keys().map(|id| id.to_string()).collect())
            .unwrap_or_default()
    }

    pub fn leave(
        &self,
        hub: &dyn Router,
        group: &str,
        channel_name: &str,
        conn: ConnId,
    ) -> Option<PresenceLeft> {
        let mut channel = self.channels.get_mut(group)?;
        let at = channel.conns.iter().position(|(c, _)| *c == conn)?;
        let (_, user_id) = channel.conns.swap_remove(at);
        let remaining_here = hub.leave_group(group, conn).unwrap_or(0);
        let last = match channel.users.get_mut(&user_id) {
            Some(user) => {
                user.connections -= 1;
                user.connections == 0
            }
            None => false,
        };
        if last {
            channel.users.remove(&user_id);
            let removed = wire::member_removed(channel_name, &user_id);
            tell(hub, group, &removed, "", None);
        }
        let empty = channel.conns.is_empty();
        drop(channel);
        if empty {
            self.channels
                .remove_if(group, |_, channel| channel.conns.is_empty());
        }
        Some(PresenceLeft {
            remaining_here,
            user_gone: Some(last),
        })
    }
}

/// Sends a member event's frame text to the group's connections but `except`.
fn tell(hub: &dyn Router, group: &str, text: &RawValue, from: &str, except: Option<ConnId>) {
    let _ = hub.deliver(&Publication {
        target: Target::Group(group),
        from,
        message: Body::Raw(text),
        timestamp: protocol::timestamp(),
        except,
    });
}
