//! One handler per client message type, found by its name. Each turns a decoded
//! [`Command`] into calls on the [`Router`] and replies to the sender, exactly as the seed does.

use std::collections::HashSet;
use std::sync::Arc;

use crate::hub::{Joined, Member, Router};
use crate::protocol::{self, Body, Command, DecodeError};

/// The protocol state of one connection: who it is, which rooms it is in, its metadata.
/// Owned by the connection's reader task, so none of it needs a lock.
pub struct Session {
    member: Member,
    router: Arc<dyn Router>,
    rooms: HashSet<Arc<str>>,
    metadata: serde_json::Map<String, serde_json::Value>,
}

impl Session {
    pub fn new(member: Member, router: Arc<dyn Router>) -> Self {
        Self {
            member,
            router,
            rooms: HashSet::new(),
            metadata: serde_json::Map::new(),
        }
    }

    pub fn member(&self) -> &Member {
        &self.member
    }

    /// Handles one client message (the payload of a text or binary message, parsed in place).
    pub fn handle_message(&mut self, payload: &mut [u8]) {
        match protocol::decode(payload) {
            Ok(command) => self.dispatch(command),
            Err(DecodeError::UnknownType(kind)) => {
                self.reply_error(&format!("{}{kind}", protocol::errors::UNKNOWN_TYPE_PREFIX));
            }
            Err(error) => self.reply_error(&error.to_string()),
        }
    }

    fn dispatch(&mut self, command: Command<'_>) {
        match command {
            Command::Broadcast { message } => self.broadcast(&message),
            Command::JoinRoom { room } => self.join_room(&room),
            Command::LeaveRoom { room } => self.leave_room(&room),
            Command::RoomMessage { room, message } => self.room_message(&room, &message),
            Command::PrivateMessage { to, message } => self.private_message(&to, &message),
            Command::SetMetadata { metadata } => self.set_metadata(metadata),
        }
    }

    fn reply_error(&self, message: &str) {
        self.member
            .outbox
            .push(protocol::error(message, protocol::timestamp()));
    }

    /// Every other connected client gets it; the sender gets nothing.
    fn broadcast(&self, message: &Body<'_>) {
        let frame = protocol::broadcast(&self.member.client_id, message, protocol::timestamp());
        self.router.broadcast(&self.member, frame);
    }

    fn join_room(&mut self, room: &str) {
        if room.is_empty() {
            return self.reply_error(protocol::errors::ROOM_REQUIRED);
        }
        if let Joined::Added { .. } = self.router.join(room, &self.member) {
            self.rooms.insert(Arc::from(room));
        }
    }

    /// Not a member, or no such room: nothing happens and nothing is sent.
    fn leave_room(&mut self, room: &str) {
        if self.router.leave(room, &self.member) {
            self.rooms.remove(room);
        }
    }

    fn room_message(&self, room: &str, message: &Body<'_>) {
        let frame =
            protocol::room_message(room, &self.member.client_id, message, protocol::timestamp());
        if let Err(refusal) = self.router.room_message(room, &self.member, frame) {
            self.reply_error(&refusal.to_string());
        }
    }

    /// The sender gets nothing; sending to yourself delivers to yourself.
    fn private_message(&self, to: &str, message: &Body<'_>) {
        let frame =
            protocol::private_message(&self.member.client_id, message, protocol::timestamp());
        if let Err(refusal) = self.router.private_message(to, frame) {
            self.reply_error(&refusal.to_string());
        }
    }

    /// Merged over the existing metadata (keys overwrite, new keys append), echoed back whole.
    fn set_metadata(&mut self, update: serde_json::Map<String, serde_json::Value>) {
        for (key, value) in update {
            self.metadata.insert(key, value);
        }
        self.member
            .outbox
            .push(protocol::metadata_updated(&self.metadata));
    }

    /// Leaves every room (members are told, as with `leave_room`) and the directory. Called
    /// once when the connection ends, for whatever reason.
    pub fn disconnect(&mut self) {
        for room in self.rooms.drain() {
            self.router.leave(&room, &self.member);
        }
        self.router.disconnect(&self.member);
    }
}
