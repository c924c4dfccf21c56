//! One handler per client message type, found by its name. Each turns a decoded
//! [`Command`] into calls on the [`Router`] and replies to the sender, exactly as the seed does.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use crate::admission::RoomPolicy;
use crate::api::webhooks::EventKind;
use crate::broker::{Publication, Target};
use crate::hub::{Joined, Member};
use crate::limits::{self, Rate, RateLimiter};
use crate::node::Node;
use crate::outbox::CloseRequest;
use crate::protocol::{self, close_code, Body, Command, DecodeError, Metadata, MetadataUpdate};

/// `metrics::MESSAGE_TYPES` index of messages that did not decode.
const INVALID: usize = 6;

/// The protocol state of one connection: who it is, which rooms it is in, its metadata, its
/// rate limit. Owned by the connection's task, so none of it needs a lock.
pub struct Session {
    member: Member,
    /// The node: its hub, broker, limits and metrics.
    node: Arc<Node>,
    rate: Option<RateLimiter>,
    /// The rooms the token allows (auth only); `None` allows every room. Boxed: only tokens
    /// with a `rooms` claim have one, and every connection pays for the field (see the size
    /// guard in `ws::session`).
    allowed_rooms: Option<Box<RoomPolicy>>,
    rooms: HashSet<Arc<str>>,
    metadata: Metadata,
    /// Set once the session asked its connection to close: later messages are ignored.
    closing: bool,
    /// Set by the first `disconnect`, which alone tells the webhooks.
    disconnected: bool,
}

impl Session {
    pub fn new(member: Member, node: Arc<Node>, allowed_rooms: Option<RoomPolicy>) -> Self {
        let rate = RateLimiter::new(&node.session_limits, Instant::now());
        Self {
            member,
            node,
            rate,
            allowed_rooms: allowed_rooms.map(Box::new),
            rooms: HashSet::new(),
            metadata: Metadata::default(),
            closing: false,
            disconnected: false,
        }
    }

    pub fn member(&self) -> &Member {
        &self.member
    }

    /// Handles one client message (the payload of a text or binary message).
    pub fn handle_message(&mut self, payload: &[u8]) {
        if self.closing || !self.within_rate(payload.len()) {
            return;
        }
        match protocol::decode(payload) {
            Ok(command) => self.dispatch(command),
            Err(DecodeError::UnknownType(kind)) => {
                self.node.metrics.message_in(INVALID);
                self.reply_error(&format!("{}{kind}", protocol::errors::UNKNOWN_TYPE_PREFIX));
            }
            Err(error) => {
                self.node.metrics.message_in(INVALID);
                self.reply_error(&error.to_string());
            }
        }
    }

    fn dispatch(&mut self, command: Command<'_>) {
        // The index into metrics::MESSAGE_TYPES.
        let kind = match &command {
            Command::Broadcast { .. } => 0,
            Command::JoinRoom { .. } => 1,
            Command::LeaveRoom { .. } => 2,
            Command::RoomMessage { .. } => 3,
            Command::PrivateMessage { .. } => 4,
            Command::SetMetadata { .. } => 5,
        };
        self.node.metrics.message_in(kind);
        // Disabled unless RUST_LOG asks for debug: then one check of a cached level per message.
        tracing::debug!(
            client_id = %self.member.client_id,
            kind = crate::metrics::MESSAGE_TYPES[kind],
            "message"
        );
        match command {
            Command::Broadcast { message } => self.broadcast(message),
            Command::JoinRoom { room } => self.join_room(&room),
            Command::LeaveRoom { room } => self.leave_room(&room),
            Command::RoomMessage { room, message } => self.room_message(&room, message),
            Command::PrivateMessage { to, message } => self.private_message(&to, message),
            Command::SetMetadata { metadata } => self.set_metadata(metadata),
        }
    }

    /// Takes one message of `len` bytes from the connection's budget. Over the limit (message
    /// rate or bytes) the message gets an error reply; a client that keeps sending a whole
    /// burst's worth while limited is closed with 1008.
    fn within_rate(&mut self, len: usize) -> bool {
        let Some(rate) = self.rate.as_mut() else {
            return true;
        };
        match rate.take(len, &self.node.session_limits, Instant::now()) {
            Rate::Allowed => true,
            Rate::Refused => {
                self.reply_error(limits::errors::RATE_LIMITED);
                false
            }
            Rate::Flooding => {
                self.closing = true;
                self.member.outbox.request_close(CloseRequest {
                    code: Some(close_code::POLICY_VIOLATION),
                    flush: true,
                });
                false
            }
        }
    }

    fn reply_error(&self, message: &str) {
        tracing::debug!(client_id = %self.member.client_id, error = message, "refused");
        self.member
            .outbox
            .push(protocol::error(message, protocol::timestamp()));
    }

    /// Every other connected client gets it; the sender gets nothing. Refused when
    /// `--client-broadcast false`.
    fn broadcast(&self, message: Body<'_>) {
        if !self.node.session_limits.client_broadcast {
            return self.reply_error(limits::errors::BROADCAST_DISABLED);
        }
        let started = Instant::now();
        let delivered = self.publish(Target::Everyone, message).unwrap_or(0);
        self.node.metrics.fanout(delivered, started.elapsed());
    }

    /// Hands one of this client's messages to the broker, which delivers it on every node.
    fn publish(
        &self,
        target: Target<'_>,
        message: Body<'_>,
    ) -> Result<usize, crate::hub::RecipientNotFound> {
        self.node.broker.publish(&Publication {
            target,
            from: &self.member.client_id,
            message,
            timestamp: protocol::timestamp(),
            // A room message or broadcast skips its sender; a private message to yourself
            // reaches you.
            except: match target {
                Target::Recipient(_) => None,
                Target::Room(_) | Target::Everyone => Some(self.member.conn),
            },
        })
    }

    fn join_room(&mut self, room: &str) {
        if room.is_empty() {
            return self.reply_error(protocol::errors::ROOM_REQUIRED);
        }
        if room.len() > self.node.session_limits.max_room_name_length {
            return self.reply_error(limits::errors::ROOM_NAME_TOO_LONG);
        }
        if self.rooms.contains(room) {
            return; // already a member: the seed sends nothing
        }
        if let Some(policy) = &self.allowed_rooms {
            if !policy.allows(room) {
                return self.reply_error(protocol::errors::ROOM_NOT_ALLOWED);
            }
        }
        if self.rooms.len() >= self.node.session_limits.max_rooms {
            return self.reply_error(limits::errors::TOO_MANY_ROOMS);
        }
        if let Joined::Added { members } = self.node.router.join(room, &self.member) {
            if members == 1 {
                // The room's first member on this node.
                self.node.broker.subscribe(room);
                self.webhook(EventKind::RoomOccupied, Some(room));
            }
            self.webhook(EventKind::MemberJoined, Some(room));
            self.rooms.insert(Arc::from(room));
            // room_joined to the joiner, member_joined to the others.
            self.node
                .metrics
                .fanout_deliveries
                .increment(members as u64);
        }
    }

    /// Not a member, or no such room: nothing happens and nothing is sent.
    fn leave_room(&mut self, room: &str) {
        if let Some(told) = self.node.router.leave(room, &self.member) {
            self.left(room, told);
            self.rooms.remove(room);
            self.node.metrics.fanout_deliveries.increment(told as u64);
        }
    }

    fn room_message(&self, room: &str, message: Body<'_>) {
        let started = Instant::now();
        if let Err(refusal) = self.node.router.check_sender(room, &self.member) {
            return self.reply_error(&refusal.to_string());
        }
        let delivered = self.publish(Target::Room(room), message).unwrap_or(0);
        self.node.metrics.fanout(delivered, started.elapsed());
    }

    /// The sender gets nothing; sending to yourself delivers to yourself.
    fn private_message(&self, to: &str, message: Body<'_>) {
        match self.publish(Target::Recipient(to), message) {
            Ok(delivered) => self
                .node
                .metrics
                .fanout_deliveries
                .increment(delivered as u64),
            Err(refusal) => self.reply_error(&refusal.to_string()),
        }
    }

    /// Merged over the existing metadata (keys overwrite, new keys append), echoed back whole,
    /// each value as the client wrote it. A merge that would exceed the size limit is refused
    /// and changes nothing.
    fn set_metadata(&mut self, update: MetadataUpdate<'_>) {
        let merged = self.metadata.merged(&update);
        let reply = protocol::metadata_updated(&merged);
        if protocol::metadata_size(&reply) > self.node.session_limits.max_metadata_size {
            return self.reply_error(limits::errors::METADATA_TOO_LARGE);
        }
        self.metadata = merged;
        self.node
            .router
            .set_metadata(&self.member, protocol::metadata_object(&reply));
        self.member.outbox.push(reply);
    }

    /// After leaving `room` with `told` members told: the last local member out unsubscribes.
    fn left(&self, room: &str, told: usize) {
        self.webhook(EventKind::MemberLeft, Some(room));
        if told == 0 {
            self.node.broker.unsubscribe(room);
            self.webhook(EventKind::RoomVacated, Some(room));
        }
    }

    /// Tells the app, if webhooks are on, that `kind` happened to this connection.
    fn webhook(&self, kind: EventKind, room: Option<&str>) {
        self.node.webhook(kind, &self.member, room);
    }

    /// Leaves every room (members are told, as with `leave_room`) and the directory. Called
    /// once when the connection ends, for whatever reason.
    pub fn disconnect(&mut self) {
        for room in std::mem::take(&mut self.rooms) {
            if let Some(told) = self.node.router.leave(&room, &self.member) {
                self.left(&room, told);
                self.node.metrics.fanout_deliveries.increment(told as u64);
            }
        }
        self.node.router.disconnect(&self.member);
        if !std::mem::replace(&mut self.disconnected, true) {
            self.webhook(EventKind::ClientDisconnected, None);
        }
    }
}
