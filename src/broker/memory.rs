//! The single-node broker: a publication is delivered straight into the local hub, with
//! nothing in between (the hot path of a one-node deployment costs one virtual call more), and
//! a join or leave is the hub's, which tells the room's members at once; presence is a table
//! here ([`super::presence`]), and so are cache channels' last events ([`super::cache`]).

use std::sync::Arc;

use serde_json::value::RawValue;

use super::cache::LastEvents;
use super::presence::LocalPresence;
use super::{
    Broker, CachedEvent, Delivery, GroupJoined, HistoryRead, Joining, PresenceJoin,
    PresenceJoining, PresenceLeft, PresenceUsers, Publication,
};
use crate::hub::{ConnId, Member, Router, Since};
use crate::outbox::Outbox;

/// Delivers every publication to the local hub; subscriptions need no bookkeeping.
pub struct MemoryBroker {
    hub: Arc<dyn Router>,
    presence: LocalPresence,
    last_events: LastEvents,
}

impl MemoryBroker {
    pub fn new(hub: Arc<dyn Router>) -> Self {
        Self {
            hub,
            presence: LocalPresence::default(),
            last_events: LastEvents::default(),
        }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, publication: &Publication<'_>) -> Delivery {
        Delivery::Done(self.hub.deliver(publication))
    }

    fn join(&self, room: &str, member: &Member, since: Option<&Since>) -> Joining {
        Joining::Done(match since {
            Some(since) => self.hub.join_since(room, member, since),
            None => self.hub.join(room, member),
        })
    }

    fn leave(&self, room: &str, member: &Member) -> Option<usize> {
        self.hub.leave(room, member)
    }

    fn history(&self, room: &str, limit: usize, since: Option<u64>) -> HistoryRead {
        match self.hub.history(room, limit, since) {
            Some(page) => HistoryRead::Done(page),
            None => HistoryRead::Off,
        }
    }

    fn join_group(&self, group: &str, conn: ConnId, outbox: &Outbox) -> Option<GroupJoined> {
        let size = self.hub.join_group(group, conn, outbox)?;
        Some(GroupJoined {
            first_here: size == 1,
            heard: None,
        })
    }

    fn leave_group(&self, group: &str, conn: ConnId) -> Option<usize> {
        self.hub.leave_group(group, conn)
    }

    fn join_presence(&self, join: &PresenceJoin<'_>) -> PresenceJoining {
        self.presence.join(&*self.hub, join)
    }

    fn leave_presence(&self, group: &str, channel: &str, conn: ConnId) -> Option<PresenceLeft> {
        self.presence.leave(&*self.hub, group, channel, conn)
    }

    fn keep_last_event(&self, group: &str, text: &RawValue) {
        self.last_events.keep(group, text);
    }

    fn last_event(&self, group: &str) -> CachedEvent {
        CachedEvent::Done(self.last_events.get(group))
    }

    fn presence_users(&self, group: &str) -> PresenceUsers {
        PresenceUsers::Done(self.presence.users(group))
    }
}
