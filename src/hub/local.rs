//! The in-memory, single-node [`Router`]: sharded maps of rooms and clients.
//!
//! Locking, and why it is shaped this way:
//! - `rooms` and `clients` are DashMaps (sharded RwLocks). A shard lock is held only to find or
//!   insert a room and clone its `Arc`, never while fanning out, so busy rooms do not block
//!   unrelated rooms that hash to the same shard.
//! - Each room has its own RwLock. Messages take it shared, so publishers in one room proceed in
//!   parallel; joins and leaves take it exclusive and notify under it, so every member sees
//!   joins, leaves and messages of a room in one consistent order with exact member counts.
//! - Delivery under a room lock is a non-blocking push per member (see `outbox`), so a lock is
//!   held for a bounded, short time.
//! - A room emptied by a leave is marked `closed` before it is removed from the map; a join that
//!   raced with the removal sees the mark and retries on a fresh room.
//!
//! Membership is a vector plus an index (conn id -> position): join, leave (swap-remove) and
//! membership checks are O(1), and fan-out walks contiguous memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;

use super::{
    ConnId, HistoryPage, JoinPoint, Joined, Local, Member, MemberChange, Presence,
    RecipientNotFound, RoomMessageError, Router, Since,
};
use crate::history::{HistoryConfig, HistoryPolicy, Recovery, RoomHistory};
use tokio::sync::oneshot;

use crate::broker::{Publication, Target};
use crate::outbox::{OutFrame, Outbox};
use crate::protocol;
use crate::protocol::Body;

#[derive(Default)]
struct Members {
    list: Vec<Member>,
    /// Beside `list`: whether each member opted in to offsets (joined with `since`), and how
    /// many did; while none did, the fan-out loop is the plain one.
    opted: Vec<bool>,
    opted_count: usize,
    index: HashMap<ConnId, usize>,
    /// Members whose join a cluster broker is still making (see [`Router::join_pending`]): not
    /// in the fan-out list yet, so the hot loop never looks at them.
    pending: Vec<Pending>,
    /// How many pending members are recovering joiners whose join came back before their place
    /// in the history did: what the room sends meanwhile is kept for them.
    awaiting: usize,
    /// Set when the room was removed from the map; joiners holding a stale `Arc` retry.
    closed: bool,
}

/// A member whose join is on its way round the cluster.
struct Pending {
    member: Member,
    /// Told when it becomes a member.
    activated: oneshot::Sender<()>,
    /// For a joiner that opted in to offsets where the cluster keeps the room's history.
    recovery: Option<Recovering>,
}

/// What a recovering joiner's activation needs: its join back in the room's order (`total`)
/// and its place in the history ([`JoinPoint`]), which come by two roads in either order.
#[derive(Default)]
struct Recovering {
    total: Option<usize>,
    point: Option<JoinPoint>,
    /// What the room sent after its join came back, while its point had not (the offset
    /// variant of each message; membership notices as they are).
    buffered: Vec<Bytes>,
}

impl Members {
    fn contains(&self, conn: ConnId) -> bool {
        self.index.contains_key(&conn)
    }

    fn is_pending(&self, conn: ConnId) -> bool {
        self.pending
            .iter()
            .any(|pending| pending.member.conn == conn)
    }

    fn pending_at(&self, conn: ConnId) -> Option<usize> {
        self.pending
            .iter()
            .position(|pending| pending.member.conn == conn)
    }

    /// Local members, pending ones included.
    fn len(&self) -> usize {
        self.list.len() + self.pending.len()
    }

    /// Makes the pending member `conn` a member: it gets `room_joined` with `total`, ahead of
    /// anything the room sends it after. A recovering joiner whose place in the history has
    /// not come yet waits on for it, hearing the room meanwhile (see [`Router::recovered`]);
    /// when `force`, it is made a member without it (not recovered). False when it was not
    /// pending.
    fn activate(&mut self, room_name: &str, conn: ConnId, total: usize, force: bool) -> bool {
        let Some(at) = self.pending_at(conn) else {
            return false;
        };
        if let Some(recovery) = &mut self.pending[at].recovery {
            if recovery.point.is_none() && !force {
                if recovery.total.is_none() {
                    recovery.total = Some(total);
                    self.awaiting += 1;
                }
                return true;
            }
        }
        let pending = self.pending.swap_remove(at);
        let opted = match pending.recovery {
            None => {
                pending
                    .member
                    .outbox
                    .push(protocol::room_joined(room_name, total));
                false
            }
            Some(recovery) => {
                if recovery.total.is_some() {
                    self.awaiting -= 1;
                }
                let mut point = recovery.point.unwrap_or_else(JoinPoint::unknown);
                if force && recovery.total.is_none() {
                    // Given up on before its own join notice came back: what the room sent
                    // after its place in the history was not kept for it, so a replay would
                    // end in a gap. It joins unrecovered.
                    point.replay = None;
                }
                let outbox = &pending.member.outbox;
                outbox.push(protocol::room_joined_at(
                    room_name,
                    recovery.total.unwrap_or(total),
                    point.offset,
                    &point.epoch,
                    point.replay.is_some(),
                ));
                for frame in point.replay.into_iter().flatten() {
                    outbox.push(frame);
                }
                for frame in recovery.buffered {
                    outbox.push(frame);
                }
                true
            }
        };
        self.insert(pending.member, opted);
        let _ = pending.activated.send(());
        true
    }

    /// Keeps `frame` for the recovering joiners that are waiting for their place in the
    /// history (see [`Members::activate`]); the caller checked `awaiting`.
    /// `about`: the member a membership notice is about, which does not hear of itself.
    fn keep_for_awaiting(&mut self, frame: &Bytes, about: Option<&str>) {
        for pending in &mut self.pending {
            if about == Some(&*pending.member.client_id) {
                continue;
            }
            if let Some(recovery) = &mut pending.recovery {
                if recovery.total.is_some() {
                    recovery.buffered.push(frame.clone());
                }
            }
        }
    }

    fn insert(&mut self, member: Member, opted: bool) {
        self.index.insert(member.conn, self.list.len());
        self.list.push(member);
        self.opted.push(opted);
        self.opted_count += usize::from(opted);
    }

    fn remove(&mut self, conn: ConnId) -> bool {
        let Some(position) = self.index.remove(&conn) else {
            return false;
        };
        self.list.swap_remove(position);
        self.opted_count -= usize::from(self.opted.swap_remove(position));
        if let Some(moved) = self.list.get(position) {
            self.index.insert(moved.conn, position);
        }
        true
    }

    /// Pushes `frame` to every member but `except`: the fan-out inner loop. Returns how many
    /// members it was handed to.
    fn deliver(&self, frame: &Bytes, except: Option<ConnId>) -> usize {
        let shared = OutFrame::shared(frame.clone());
        let mut delivered = 0;
        for member in &self.list {
            if Some(member.conn) != except {
                member.outbox.push_shared(shared.clone());
                delivered += 1;
            }
        }
        delivered
    }

    /// [`Members::deliver`] of a room message with history on: `frame` to the members,
    /// `with_offset` to those who opted in to offsets.
    fn deliver_with_offset(
        &self,
        frame: &Bytes,
        with_offset: &Bytes,
        except: Option<ConnId>,
    ) -> usize {
        if self.opted_count == 0 {
            return self.deliver(frame, except);
        }
        let (plain, offset) = (
            OutFrame::shared(frame.clone()),
            OutFrame::shared(with_offset.clone()),
        );
        let mut delivered = 0;
        for (member, opted) in self.list.iter().zip(&self.opted) {
            if Some(member.conn) != except {
                let frame = if *opted { &offset } else { &plain };
                member.outbox.push_shared(frame.clone());
                delivered += 1;
            }
        }
        delivered
    }
}

/// The rooms' histories (`--history-size`, `--history-ttl`), apart from the rooms: a history
/// outlives its room's members (a client that was the last one out recovers too) and goes
/// when idle past its TTL. Lock order: a room's members, then its history.
struct Histories {
    policy: HistoryPolicy,
    rooms: DashMap<Arc<str>, Arc<Kept>>,
}

/// One room's history and what it keeps.
struct Kept {
    config: HistoryConfig,
    history: Mutex<RoomHistory>,
}

impl Histories {
    /// `room`'s history; `None` for a room the policy keeps none of.
    fn of(&self, room: &str) -> Option<Arc<Kept>> {
        if let Some(kept) = self.rooms.get(room) {
            return Some(kept.clone());
        }
        let config = self.policy.for_room(room)?;
        let kept = self.rooms.entry(Arc::from(room)).or_insert_with(|| {
            Arc::new(Kept {
                config,
                history: Mutex::new(RoomHistory::new(Instant::now())),
            })
        });
        Some(kept.clone())
    }
}

fn locked(history: &Mutex<RoomHistory>) -> std::sync::MutexGuard<'_, RoomHistory> {
    // Each change is a few infallible steps: a panic elsewhere leaves it consistent.
    history.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Room {
    members: RwLock<Members>,
}

impl Room {
    // A poisoned lock means a panic happened while a member list was being changed; the list
    // itself is still consistent (every mutation is a few infallible steps), so keep serving.
    fn read(&self) -> RwLockReadGuard<'_, Members> {
        self.members.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Members> {
        self.members.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Single-node routing state. See the module documentation for the locking design.
#[derive(Default)]
pub struct LocalHub {
    rooms: DashMap<Arc<str>, Arc<Room>>,
    clients: DashMap<Arc<str>, Member>,
    /// Connections by the user id of their token (auth only).
    users: DashMap<Arc<str>, Vec<Member>>,
    /// The metadata of connections that set some (a JSON object's text): only those pay for
    /// an entry.
    metadata: DashMap<ConnId, Bytes>,
    /// Connections of protocols outside the rooms and the directory (echo, relay, Pusher), with
    /// whether the heartbeat keeps them.
    outside: DashMap<ConnId, (Outbox, bool)>,
    /// The groups' connections: a group's frame is handed to each, shared.
    groups: DashMap<Arc<str>, Vec<(ConnId, Outbox)>>,
    /// The rooms' histories, when on.
    history: Option<Histories>,
}

impl LocalHub {
    pub fn new() -> Self {
        Self::default()
    }

    /// A hub keeping each room's history as `policy` says (none: off, as [`LocalHub::new`]).
    pub fn with_history(policy: Option<impl Into<HistoryPolicy>>) -> Self {
        Self {
            history: policy.map(|policy| Histories {
                policy: policy.into(),
                rooms: DashMap::new(),
            }),
            ..Self::default()
        }
    }

    fn room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms.get(name).map(|room| room.clone())
    }

    /// Adds `member` to `room`: at once, telling the members (see [`Router::join`]), or, with
    /// `pending`, as a pending member (see [`Router::join_pending`]).
    fn add(
        &self,
        room_name: &str,
        member: &Member,
        pending: Option<(oneshot::Sender<()>, bool)>,
        since: Option<&Since>,
    ) -> Joined {
        loop {
            // Usually the room exists: a shared lookup, with no key to allocate and no shard
            // write lock; only a new room takes the entry path.
            let room = match self.room(room_name) {
                Some(room) => room,
                None => self
                    .rooms
                    .entry(Arc::from(room_name))
                    .or_default()
                    .value()
                    .clone(),
            };
            let mut members = room.write();
            if members.closed {
                continue; // emptied and removed between our lookup and our lock
            }
            if members.contains(member.conn) || members.is_pending(member.conn) {
                return Joined::AlreadyMember;
            }
            if let Some((activated, recovering)) = pending {
                members.pending.push(Pending {
                    member: member.clone(),
                    activated,
                    recovery: recovering.then(Recovering::default),
                });
                return Joined::Added {
                    members: members.len(),
                };
            }
            let history = since.zip(self.history.as_ref());
            members.insert(member.clone(), history.is_some());
            let count = members.list.len();
            match history {
                None => {
                    member.outbox.push(protocol::room_joined(room_name, count));
                }
                // Under the room's lock, which every message of the room takes first: what is
                // replayed and what comes live meet with no gap and no duplicate.
                Some((since, histories)) => {
                    Self::joined_at(room_name, member, count, since, histories)
                }
            }
            if count > 1 {
                let frame = protocol::member_joined(room_name, &member.client_id, count);
                members.deliver(&frame, Some(member.conn));
            }
            return Joined::Added { members: count };
        }
    }

    /// The `room_joined` of a client that opted in to offsets, then what it missed, if all of
    /// it is kept.
    fn joined_at(
        room_name: &str,
        member: &Member,
        count: usize,
        since: &Since,
        histories: &Histories,
    ) {
        let Some(kept) = histories.of(room_name) else {
            // A room kept without history: the seed's join.
            member.outbox.push(protocol::room_joined(room_name, count));
            return;
        };
        let mut history = locked(&kept.history);
        let replay = match since {
            Since::Now => None,
            Since::Saw { offset, epoch } => {
                match history.since(*offset, epoch, Instant::now(), &kept.config) {
                    Recovery::Recovered(frames) => Some(frames),
                    Recovery::NotRecovered => None,
                }
            }
        };
        member.outbox.push(protocol::room_joined_at(
            room_name,
            count,
            history.top(),
            history.epoch(),
            replay.is_some(),
        ));
        for frame in replay.unwrap_or_default() {
            member.outbox.push(frame);
        }
    }

    /// Removes `member` from `room`, telling the rest when `notify` (see [`Router::leave`]);
    /// `Some` of how many remain (were told), or `None` when it was not a member.
    fn remove(&self, room_name: &str, member: &Member, notify: bool) -> Option<usize> {
        let room = self.room(room_name)?;
        let mut members = room.write();
        let pending_at = members.pending_at(member.conn);
        let was_pending = pending_at.is_some();
        if let Some(at) = pending_at {
            let pending = members.pending.swap_remove(at);
            if pending
                .recovery
                .is_some_and(|recovery| recovery.total.is_some())
            {
                members.awaiting -= 1;
            }
        } else if !members.remove(member.conn) {
            return None;
        }
        if members.len() == 0 {
            members.closed = true;
            self.rooms
                .remove_if(room_name, |_, current| Arc::ptr_eq(current, &room));
            return Some(0);
        }
        if !notify || was_pending {
            return Some(members.len());
        }
        let frame = protocol::member_left(room_name, &member.client_id, members.list.len());
        if members.awaiting > 0 {
            members.keep_for_awaiting(&frame, None);
        }
        Some(members.deliver(&frame, Some(member.conn)))
    }
}

impl LocalHub {
    /// A room message with history on: appended to the room's history (members or not) with
    /// the next offset, and delivered, the seed's frame to the members and the offset-carrying
    /// one (encoded once, the one kept) to those who opted in.
    fn deliver_kept(&self, kept: &Kept, publication: &Publication<'_>, room_name: &str) -> usize {
        let frame = protocol::room_message(
            room_name,
            publication.from,
            &publication.message,
            publication.timestamp,
        );
        let room = self.room(room_name);
        let members = room.as_ref().map(|room| room.read());
        let mut history = locked(&kept.history);
        let with_offset = protocol::room_message_at(
            room_name,
            publication.from,
            &publication.message,
            publication.timestamp,
            history.next_offset(),
        );
        history.append(with_offset.clone(), Instant::now(), &kept.config);
        // Delivered before the history is let go: two publishers in one room deliver in the
        // order of their offsets.
        members.map_or(0, |members| {
            members.deliver_with_offset(&frame, &with_offset, publication.except)
        })
    }
}

impl Router for LocalHub {
    fn connect(&self, member: &Member) {
        self.clients
            .insert(member.client_id.clone(), member.clone());
        if let Some(user) = &member.user_id {
            self.users
                .entry(user.clone())
                .or_default()
                .push(member.clone());
        }
    }

    fn disconnect(&self, member: &Member) {
        self.clients
            .remove_if(&*member.client_id, |_, entry| entry.conn == member.conn);
        self.metadata.remove(&member.conn);
        if let Some(user) = &member.user_id {
            self.users.remove_if_mut(&**user, |_, connections| {
                connections.retain(|c| c.conn != member.conn);
                connections.is_empty()
            });
        }
    }

    fn join(&self, room_name: &str, member: &Member) -> Joined {
        self.add(room_name, member, None, None)
    }

    fn join_since(&self, room_name: &str, member: &Member, since: &Since) -> Joined {
        self.add(room_name, member, None, Some(since))
    }

    fn history(&self, room_name: &str, limit: usize, since: Option<u64>) -> Option<HistoryPage> {
        let histories = self.history.as_ref()?;
        let Some(kept) = histories.of(room_name) else {
            // A room the policy keeps no history of: nothing kept.
            return Some(HistoryPage {
                messages: Vec::new(),
                offset: 0,
                epoch: Arc::from(""),
            });
        };
        let mut history = locked(&kept.history);
        let (now, ttl) = (Instant::now(), kept.config.ttl);
        let frames = match since {
            None => history.last(limit, now, ttl),
            Some(since) => history.after(since, limit, now, ttl),
        };
        Some(HistoryPage {
            messages: frames.iter().map(protocol::frame_payload).collect(),
            offset: history.top(),
            epoch: history.epoch().clone(),
        })
    }

    fn expire_history(&self) {
        if let Some(histories) = &self.history {
            let now = Instant::now();
            // A room with members keeps its history (and epoch) however quiet: its opted-in
            // members hold offsets of that epoch.
            histories.rooms.retain(|room, kept| {
                self.rooms.contains_key(room)
                    || !locked(&kept.history).is_idle(now, kept.config.ttl)
            });
        }
    }

    fn join_pending(
        &self,
        room_name: &str,
        member: &Member,
        activated: oneshot::Sender<()>,
        recovering: bool,
    ) -> Joined {
        self.add(room_name, member, Some((activated, recovering)), None)
    }

    fn activate(&self, room_name: &str, member: &Member, total: usize) -> bool {
        match self.room(room_name) {
            Some(room) => room.write().activate(room_name, member.conn, total, true),
            None => false,
        }
    }

    fn recovered(&self, room_name: &str, member: &Member, point: JoinPoint) {
        let Some(room) = self.room(room_name) else {
            return; // it left meanwhile
        };
        let mut members = room.write();
        let Some(at) = members.pending_at(member.conn) else {
            return;
        };
        let Some(recovery) = &mut members.pending[at].recovery else {
            return;
        };
        recovery.point = Some(point);
        if let Some(total) = recovery.total {
            // Its join came back first: a member now, with what the room sent meanwhile.
            members.activate(room_name, member.conn, total, true);
        }
    }

    fn deliver_at(&self, publication: &Publication<'_>, offset: u64) -> usize {
        let Target::Room(room_name) = publication.target else {
            return 0;
        };
        let Some(room) = self.room(room_name) else {
            return 0;
        };
        let (from, message, timestamp) = (
            publication.from,
            &publication.message,
            publication.timestamp,
        );
        let frame = protocol::room_message(room_name, from, message, timestamp);
        let members = room.read();
        if members.opted_count == 0 && members.awaiting == 0 {
            return members.deliver(&frame, publication.except);
        }
        let with_offset = protocol::room_message_at(room_name, from, message, timestamp, offset);
        if members.awaiting == 0 {
            return members.deliver_with_offset(&frame, &with_offset, publication.except);
        }
        drop(members);
        // Calls for one room come in its order from one task: nothing overtakes here.
        let mut members = room.write();
        members.keep_for_awaiting(&with_offset, None);
        members.deliver_with_offset(&frame, &with_offset, publication.except)
    }

    fn leave(&self, room_name: &str, member: &Member) -> Option<usize> {
        self.remove(room_name, member, true)
    }

    fn leave_quietly(&self, room_name: &str, member: &Member) -> Option<usize> {
        self.remove(room_name, member, false)
    }

    fn announce(&self, room_name: &str, change: MemberChange<'_>) -> usize {
        let Some(room) = self.room(room_name) else {
            return 0;
        };
        let mut members = room.write();
        let (frame, client_id) = match change {
            MemberChange::Joined { client_id, total } => {
                // This node's pending joiner: its own join, in the room's order, makes it a
                // member, with room_joined instead of the notice.
                let joiner = members
                    .pending
                    .iter()
                    .find(|pending| &*pending.member.client_id == client_id)
                    .map(|pending| pending.member.conn);
                if let Some(conn) = joiner {
                    members.activate(room_name, conn, total, false);
                }
                (
                    protocol::member_joined(room_name, client_id, total),
                    client_id,
                )
            }
            MemberChange::Left { client_id, total } => (
                protocol::member_left(room_name, client_id, total),
                client_id,
            ),
        };
        if members.awaiting > 0 {
            members.keep_for_awaiting(&frame, Some(client_id));
        }
        // The member it is about (on this node) is skipped.
        let except = members
            .list
            .iter()
            .find(|member| &*member.client_id == client_id)
            .map(|member| member.conn);
        members.deliver(&frame, except)
    }

    fn check_sender(&self, room_name: &str, sender: &Member) -> Result<(), RoomMessageError> {
        let room = self.room(room_name).ok_or(RoomMessageError::NoSuchRoom)?;
        if room.read().contains(sender.conn) {
            Ok(())
        } else {
            Err(RoomMessageError::NotAMember)
        }
    }

    fn deliver(&self, publication: &Publication<'_>) -> Result<usize, RecipientNotFound> {
        let Publication {
            target,
            from,
            message,
            timestamp,
            except,
        } = publication;
        match *target {
            Target::Room(room_name) => {
                if let Some(kept) = self.history.as_ref().and_then(|h| h.of(room_name)) {
                    return Ok(self.deliver_kept(&kept, publication, room_name));
                }
                let Some(room) = self.room(room_name) else {
                    return Ok(0);
                };
                // Encoded before the lock is taken: a join waiting for it waits for the
                // fan-out only.
                let frame = protocol::room_message(room_name, from, message, *timestamp);
                let members = room.read();
                if members.awaiting == 0 {
                    return Ok(members.deliver(&frame, *except));
                }
                drop(members);
                let mut members = room.write();
                members.keep_for_awaiting(&frame, None);
                Ok(members.deliver(&frame, *except))
            }
            Target::Everyone => {
                let frame = protocol::broadcast(from, message, *timestamp);
                let shared = OutFrame::shared(frame);
                let mut delivered = 0;
                for client in self.clients.iter() {
                    if Some(client.conn) != *except {
                        client.outbox.push_shared(shared.clone());
                        delivered += 1;
                    }
                }
                Ok(delivered)
            }
            Target::Recipient(to) => {
                if let Some(recipient) = self.clients.get(to) {
                    recipient
                        .outbox
                        .push(protocol::private_message(from, message, *timestamp));
                    return Ok(1);
                }
                let connections = self.users.get(to).ok_or(RecipientNotFound)?;
                let shared = OutFrame::shared(protocol::private_message(from, message, *timestamp));
                for connection in connections.iter() {
                    connection.outbox.push_shared(shared.clone());
                }
                Ok(connections.len())
            }
            Target::Group(group) => {
                let text = match message {
                    Body::Raw(raw) => raw.get(),
                    Body::Text(text) => text,
                };
                let frame = protocol::data(false, text.as_bytes());
                Ok(self.send_to_group(group, &frame, *except))
            }
        }
    }

    fn connections_of(&self, id: &str) -> Vec<Member> {
        if let Some(client) = self.clients.get(id) {
            return vec![client.clone()];
        }
        self.users
            .get(id)
            .map(|connections| connections.clone())
            .unwrap_or_default()
    }

    fn set_metadata(&self, member: &Member, object: Bytes) {
        self.metadata.insert(member.conn, object);
    }

    fn presence(&self, room_name: &str) -> Option<Vec<Presence>> {
        let room = self.room(room_name)?;
        let members = room.read();
        Some(
            members
                .list
                .iter()
                .map(|member| Presence {
                    client_id: member.client_id.clone(),
                    user_id: member.user_id.clone(),
                    metadata: self.metadata.get(&member.conn).map(|m| m.clone()),
                })
                .collect(),
        )
    }

    fn room_size(&self, room_name: &str) -> usize {
        self.room(room_name)
            .map_or(0, |room| room.read().list.len())
    }

    fn counts(&self) -> (usize, usize) {
        (self.rooms.len(), self.clients.len())
    }

    fn top_rooms(&self, n: usize) -> Vec<(String, usize)> {
        let mut rooms: Vec<(String, usize)> = self
            .rooms
            .iter()
            .map(|entry| (entry.key().to_string(), entry.value().read().list.len()))
            .collect();
        rooms.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rooms.truncate(n);
        rooms
    }

    fn register_outside(&self, conn: ConnId, outbox: &Outbox, heartbeat: bool) {
        self.outside.insert(conn, (outbox.clone(), heartbeat));
    }

    fn unregister_outside(&self, conn: ConnId) {
        self.outside.remove(&conn);
    }

    fn join_group(&self, group: &str, conn: ConnId, outbox: &Outbox) -> Option<usize> {
        let mut members = match self.groups.get_mut(group) {
            Some(members) => members,
            None => self.groups.entry(Arc::from(group)).or_default(),
        };
        if members.iter().any(|(member, _)| *member == conn) {
            return None;
        }
        members.push((conn, outbox.clone()));
        Some(members.len())
    }

    fn leave_group(&self, group: &str, conn: ConnId) -> Option<usize> {
        let mut remaining = None;
        self.groups.remove_if_mut(group, |_, members| {
            let at = members.iter().position(|(member, _)| *member == conn);
            if let Some(at) = at {
                members.swap_remove(at);
                remaining = Some(members.len());
            }
            members.is_empty()
        });
        remaining
    }

    fn send_to_group(&self, group: &str, frame: &Bytes, except: Option<ConnId>) -> usize {
        let Some(members) = self.groups.get(group) else {
            return 0;
        };
        let shared = OutFrame::shared(frame.clone());
        let mut delivered = 0;
        for (conn, outbox) in members.iter() {
            if Some(*conn) != except {
                outbox.push_shared(shared.clone());
                delivered += 1;
            }
        }
        delivered
    }

    fn groups(&self, prefix: &str) -> Vec<(String, usize)> {
        self.groups
            .iter()
            .filter(|group| group.key().starts_with(prefix))
            .map(|group| (group.key().to_string(), group.value().len()))
            .collect()
    }

    fn for_each_connection(&self, f: &mut dyn FnMut(Local<'_>)) {
        for client in self.clients.iter() {
            f(Local::Client(client.value()));
        }
        for outside in self.outside.iter() {
            let (outbox, heartbeat) = outside.value();
            f(Local::Outside {
                outbox,
                heartbeat: *heartbeat,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{outbox, OutboxReceiver, OutboxStats, QueueLimits, SlowConsumerPolicy};
    use std::time::Duration;

    fn member(conn: ConnId, capacity: usize) -> (Member, OutboxReceiver) {
        let (tx, rx) = outbox(
            QueueLimits::frames(capacity),
            SlowConsumerPolicy::Drop,
            Arc::default(),
        );
        let member = Member {
            conn,
            client_id: format!("client_{conn}").into(),
            user_id: None,
            outbox: tx,
        };
        (member, rx)
    }

    fn drain(rx: &mut OutboxReceiver) -> Vec<Bytes> {
        std::iter::from_fn(|| rx.try_next()).collect()
    }

    #[test]
    fn fan_out_shares_one_encoded_frame_among_all_members() {
        let hub = LocalHub::new();
        let mut members: Vec<_> = (0..1000).map(|i| member(i, 4096)).collect();
        for (m, _) in &members {
            hub.join("lobby", m);
        }
        for (_, rx) in &mut members {
            drain(rx);
        }
        let publication = Publication {
            target: Target::Room("lobby"),
            from: "client_0",
            message: protocol::Body::Text("hello".into()),
            timestamp: 1,
            except: Some(members[0].0.conn),
        };
        assert_eq!(hub.deliver(&publication), Ok(999));

        assert!(drain(&mut members[0].1).is_empty(), "sender excluded");
        let first = drain(&mut members[1].1)[0].clone();
        assert_eq!(
            first,
            protocol::room_message("lobby", "client_0", &publication.message, 1)
        );
        for (_, rx) in &mut members[2..] {
            let got = drain(rx);
            assert_eq!(got.len(), 1);
            // Same allocation: encoded once, never copied per recipient.
            assert_eq!(got[0].as_ptr(), first.as_ptr());
        }
    }

    #[test]
    fn member_joined_is_encoded_once_per_join() {
        let hub = LocalHub::new();
        let mut members: Vec<_> = (0..50).map(|i| member(i, 4096)).collect();
        for (m, _) in &members[..49] {
            hub.join("r", m);
        }
        for (_, rx) in &mut members {
            drain(rx);
        }
        hub.join("r", &members[49].0);
        let pointers: Vec<_> = members[..49]
            .iter_mut()
            .map(|(_, rx)| drain(rx)[0].as_ptr())
            .collect();
        assert!(pointers.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn leaving_the_last_member_deletes_the_room() {
        let hub = LocalHub::new();
        let (a, _ra) = member(1, 16);
        assert_eq!(hub.join("r", &a), Joined::Added { members: 1 });
        assert_eq!(hub.join("r", &a), Joined::AlreadyMember);
        assert_eq!(hub.leave("r", &a), Some(0));
        assert_eq!(hub.leave("r", &a), None);
        assert_eq!(hub.counts().0, 0);
        assert_eq!(hub.join("r", &a), Joined::Added { members: 1 });
    }

    #[test]
    fn swap_remove_keeps_the_index_consistent() {
        let hub = LocalHub::new();
        let members: Vec<_> = (0..10).map(|i| member(i, 64)).collect();
        for (m, _) in &members {
            hub.join("r", m);
        }
        for i in [0, 5, 9, 3] {
            assert!(hub.leave("r", &members[i].0).is_some());
        }
        assert_eq!(hub.room_size("r"), 6);
        for i in [1, 2, 4, 6, 7, 8] {
            assert_eq!(hub.join("r", &members[i].0), Joined::AlreadyMember);
            assert!(hub.leave("r", &members[i].0).is_some());
        }
        assert_eq!(hub.counts().0, 0);
    }

    #[test]
    fn a_full_outbox_drops_under_the_drop_policy_and_counts_it() {
        let stats = Arc::new(OutboxStats::default());
        let (tx, _rx) = outbox(
            QueueLimits::frames(2),
            SlowConsumerPolicy::Drop,
            stats.clone(),
        );
        for _ in 0..5 {
            tx.push(Bytes::from_static(b"x"));
        }
        assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert!(!tx.is_closing());
    }

    #[test]
    fn a_full_outbox_asks_to_close_under_the_close_policy() {
        let stats = Arc::new(OutboxStats::default());
        let (tx, _rx) = outbox(
            QueueLimits::frames(2),
            SlowConsumerPolicy::Close,
            stats.clone(),
        );
        for _ in 0..5 {
            tx.push(Bytes::from_static(b"x"));
        }
        assert!(tx.is_closing());
        assert_eq!(
            stats.closed_slow.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    fn history_json(frame: &Bytes) -> serde_json::Value {
        serde_json::from_slice(&protocol::frame_payload(frame)).unwrap()
    }

    #[test]
    fn a_quiet_room_with_members_keeps_its_history_and_epoch_through_a_sweep() {
        let ttl = Duration::from_millis(5);
        let hub = LocalHub::with_history(Some(HistoryConfig {
            size: 10,
            ttl,
            max_recovery: 10,
        }));
        let (stays, mut stays_rx) = member(1, 16);
        hub.join_since("quiet", &stays, &Since::Now);
        let epoch = history_json(&drain(&mut stays_rx)[0])["epoch"].clone();
        let (gone, mut gone_rx) = member(2, 16);
        hub.join_since("emptied", &gone, &Since::Now);
        let gone_epoch = history_json(&drain(&mut gone_rx)[0])["epoch"].clone();
        hub.leave("emptied", &gone);
        std::thread::sleep(ttl * 3);
        hub.expire_history();
        let page = hub.history("quiet", 10, None).unwrap();
        assert_eq!(
            serde_json::json!(&*page.epoch),
            epoch,
            "kept: it has a member"
        );
        let page = hub.history("emptied", 10, None).unwrap();
        assert_ne!(
            serde_json::json!(&*page.epoch),
            gone_epoch,
            "idle and empty: a new one"
        );
    }

    /// A room message with its cluster offset, as the Redis broker hands it in.
    fn kept_message(hub: &LocalHub, room: &str, n: u64) {
        let text = format!("m{n}");
        let publication = Publication {
            target: Target::Room(room),
            from: "client_pub",
            message: crate::protocol::Body::Text(text.as_str().into()),
            timestamp: 1,
            except: None,
        };
        hub.deliver_at(&publication, n);
    }

    fn types_and_offsets(frames: &[Bytes]) -> Vec<(String, Option<u64>)> {
        frames
            .iter()
            .map(|frame| {
                let json = history_json(frame);
                (
                    json["type"].as_str().unwrap().to_owned(),
                    json["offset"].as_u64(),
                )
            })
            .collect()
    }

    fn point(offset: u64, replayed: &[u64]) -> JoinPoint {
        let replay = replayed
            .iter()
            .map(|n| {
                let text = format!("m{n}");
                let body = crate::protocol::Body::Text(text.as_str().into());
                protocol::room_message_at("r", "client_pub", &body, 1, *n)
            })
            .collect();
        JoinPoint {
            offset,
            epoch: Arc::from("e"),
            replay: Some(replay),
        }
    }

    #[test]
    fn a_recovering_joiner_whose_join_comes_back_first_gets_replay_then_what_came_meanwhile() {
        let hub = LocalHub::new();
        let (other, mut other_rx) = member(1, 64);
        hub.join("r", &other);
        drain(&mut other_rx);
        let (joiner, mut rx) = member(2, 64);
        let (activated, mut told) = oneshot::channel();
        hub.join_pending("r", &joiner, activated, true);
        // Its join comes back on the channel, then two live messages, then its place.
        hub.announce(
            "r",
            MemberChange::Joined {
                client_id: &joiner.client_id,
                total: 2,
            },
        );
        kept_message(&hub, "r", 4);
        kept_message(&hub, "r", 5);
        assert!(
            drain(&mut rx).is_empty(),
            "nothing before its place is known"
        );
        assert!(told.try_recv().is_err(), "not a member yet");
        hub.recovered("r", &joiner, point(3, &[2, 3]));
        assert!(told.try_recv().is_ok());
        let got = types_and_offsets(&drain(&mut rx));
        let expected: Vec<(String, Option<u64>)> = [
            ("room_joined", Some(3)),
            ("room_message", Some(2)),
            ("room_message", Some(3)),
            ("room_message", Some(4)),
            ("room_message", Some(5)),
        ]
        .into_iter()
        .map(|(kind, offset)| (kind.to_owned(), offset))
        .collect();
        assert_eq!(got, expected);
        // The other member heard the join and the two messages (the seed's frames), once.
        let heard = types_and_offsets(&drain(&mut other_rx));
        assert_eq!(heard.len(), 3, "{heard:?}");
        kept_message(&hub, "r", 6);
        assert_eq!(
            types_and_offsets(&drain(&mut rx)),
            [("room_message".to_owned(), Some(6))]
        );
    }

    #[test]
    fn a_recovering_joiner_whose_place_comes_first_is_made_a_member_when_its_join_comes_back() {
        let hub = LocalHub::new();
        let (joiner, mut rx) = member(2, 64);
        let (activated, _told) = oneshot::channel();
        hub.join_pending("r", &joiner, activated, true);
        hub.recovered("r", &joiner, point(1, &[1]));
        assert!(drain(&mut rx).is_empty(), "its join has not come back");
        hub.announce(
            "r",
            MemberChange::Joined {
                client_id: &joiner.client_id,
                total: 1,
            },
        );
        kept_message(&hub, "r", 2);
        let got = types_and_offsets(&drain(&mut rx));
        let kinds: Vec<_> = got
            .iter()
            .map(|(kind, offset)| (kind.as_str(), *offset))
            .collect();
        assert_eq!(
            kinds,
            [
                ("room_joined", Some(1)),
                ("room_message", Some(1)),
                ("room_message", Some(2))
            ]
        );
    }

    #[test]
    fn a_recovering_joiner_given_up_on_joins_unrecovered_with_what_came_meanwhile() {
        let hub = LocalHub::new();
        let (joiner, mut rx) = member(2, 64);
        let (activated, _told) = oneshot::channel();
        hub.join_pending("r", &joiner, activated, true);
        hub.announce(
            "r",
            MemberChange::Joined {
                client_id: &joiner.client_id,
                total: 1,
            },
        );
        kept_message(&hub, "r", 7);
        assert!(hub.activate("r", &joiner, 1));
        let frames = drain(&mut rx);
        let joined = history_json(&frames[0]);
        assert_eq!(joined["recovered"], false);
        assert_eq!(
            types_and_offsets(&frames[1..]),
            [("room_message".to_owned(), Some(7))]
        );
    }

    #[test]
    fn a_recovering_joiner_given_up_on_before_its_join_came_back_is_told_it_did_not_recover() {
        let hub = LocalHub::new();
        let (joiner, mut rx) = member(2, 64);
        let (activated, _told) = oneshot::channel();
        hub.join_pending("r", &joiner, activated, true);
        // Its place is known, but its join notice never comes: messages after offset 3 went by
        // unkept for it, so the replay of 2..3 must not be presented as a recovery.
        hub.recovered("r", &joiner, point(3, &[2, 3]));
        kept_message(&hub, "r", 4);
        assert!(hub.activate("r", &joiner, 1));
        let frames = drain(&mut rx);
        let joined = history_json(&frames[0]);
        assert_eq!(joined["type"], "room_joined");
        assert_eq!(joined["recovered"], false);
        assert_eq!(joined["offset"], 3);
        assert_eq!(
            frames.len(),
            1,
            "no replay: {:?}",
            types_and_offsets(&frames)
        );
    }
}
