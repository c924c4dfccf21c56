//! One handler per client message type, found by its name. Each turns a decoded
//! [`Command`] into calls on the [`Router`] and replies to the sender, exactly as the seed does.
//!
//! With `--join-proxy` or `--publish-proxy`, a join or a client's room message or broadcast
//! first asks the application ([`crate::api::proxy`]). The call runs in a task of its own; the
//! connection's task polls its verdict ([`Session::poll_waiting`]) and acts on it then. Until
//! then every later message of this connection waits in a backlog (`super::waiting`), in
//! arrival order, so one sender's messages keep their order whatever the app takes; other
//! connections are not involved. A full backlog stops the connection's reads (TCP pushes back
//! on the client) rather than refusing messages.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::protocol::{heartbeat_from_now, Opening, Protocol};
use super::waiting::{Arrived, Awaited, Deferred, Waiting};
use crate::admission::RoomPolicy;
use crate::api::proxy::{self, Forwarded, Proxies, Proxy, Verdict};
use crate::api::webhooks::EventKind;
use crate::broker::{Delivery, HistoryRead, Joining, Publication, Target};
use crate::hub::{ConnId, HistoryPage, Joined, Member, RecipientNotFound, RoomMessageError};
use crate::limits::{self, Rate, RateLimiter};
use crate::node::Node;
use crate::outbox::{CloseRequest, Outbox};
use crate::protocol::{
    self, close_code, Body, Command, DecodeError, Metadata, MetadataUpdate, Since,
};

/// `metrics::MESSAGE_TYPES` index of messages that did not decode.
const INVALID: usize = 7;

/// A connection's link to the join and publish proxies.
struct AppLink {
    proxies: Arc<Proxies>,
    /// The upgrade request's `Cookie` and `Authorization`, sent with every call.
    forwarded: Arc<Forwarded>,
}

/// The join proxy's request body.
#[derive(Serialize)]
struct JoinCall<'a> {
    client_id: &'a str,
    user_id: Option<&'a str>,
    room: &'a str,
    metadata: &'a RawValue,
}

/// The publish proxy's request body.
#[derive(Serialize)]
struct PublishCall<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    client_id: &'a str,
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    message: &'a RawValue,
}

/// A session's rooms. SipHash with fixed keys rather than per-set random ones: the hasher
/// then takes no room in every connection's state (16 bytes less), and a client choosing
/// colliding names (at most `--max-rooms-per-connection` of them) slows only its own set.
type Rooms = HashSet<Arc<str>, BuildHasherDefault<DefaultHasher>>;

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
    /// Created by the first join: an idle connection keeps only the empty pointer.
    rooms: Option<Box<Rooms>>,
    metadata: Metadata,
    /// Set once the session asked its connection to close: later messages are ignored.
    closing: bool,
    /// Only with `--join-proxy` or `--publish-proxy`. Boxed like `allowed_rooms`.
    app: Option<Box<AppLink>>,
    /// What this session waits for, and the messages behind it; only while it waits.
    waiting: Option<Box<Waiting>>,
    /// Set by the first `disconnect`, which alone tells the webhooks.
    disconnected: bool,
}

impl Session {
    /// A session for `member`. `metadata` is where its metadata starts (the connect proxy's
    /// grant); `forwarded` the headers the join and publish proxies send, when on.
    pub fn new(
        member: Member,
        node: Arc<Node>,
        allowed_rooms: Option<RoomPolicy>,
        metadata: Option<Metadata>,
        forwarded: Option<Arc<Forwarded>>,
    ) -> Self {
        let rate = RateLimiter::new(&node.session_limits, Instant::now());
        let app = match (&node.proxies, forwarded) {
            (Some(proxies), Some(forwarded)) if proxies.forwards_headers() => {
                Some(Box::new(AppLink {
                    proxies: proxies.clone(),
                    forwarded,
                }))
            }
            _ => None,
        };
        let session = Self {
            member,
            node,
            rate,
            allowed_rooms: allowed_rooms.map(Box::new),
            rooms: None,
            metadata: metadata.unwrap_or_default(),
            closing: false,
            app,
            waiting: None,
            disconnected: false,
        };
        if !session.metadata.is_empty() {
            let reply = protocol::metadata_updated(&session.metadata);
            session
                .node
                .router
                .set_metadata(&session.member, protocol::metadata_object(&reply));
        }
        session
    }

    pub fn member(&self) -> &Member {
        &self.member
    }

    /// Handles one client message (the payload of a text or binary message).
    pub fn handle_message(&mut self, payload: &[u8]) {
        if self.closing || !self.within_rate(payload.len()) {
            return;
        }
        if let Some(waiting) = self.waiting.as_mut() {
            return waiting.queue(payload);
        }
        self.process(payload);
    }

    /// Acts on what the session waited for once it arrived, then on the messages that waited
    /// behind it, until one waits again. Returns whether the connection may read more messages
    /// (its backlog has room); when it may not, the arrival wakes the task.
    pub fn poll_waiting(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let Some(waiting) = self.waiting.as_mut() else {
                return true;
            };
            let (arrived, mut backlog) = match waiting.poll(cx) {
                Poll::Pending => return waiting.has_room(),
                Poll::Ready(ready) => ready,
            };
            self.waiting = None;
            // Progress on the connection's behalf: not idle, though its reads were paused.
            self.member.outbox.touch(self.node.clock.now());
            match arrived {
                Arrived::App(verdict, deferred) => self.conclude(deferred, verdict),
                Arrived::Delivery(delivered) => self.delivered(delivered),
                // The hub sent its room_joined.
                Arrived::Joined => {}
                Arrived::RoomExists(exists) => {
                    let refusal = if exists {
                        RoomMessageError::NotAMember
                    } else {
                        RoomMessageError::NoSuchRoom
                    };
                    self.reply_error(&refusal.to_string());
                }
                Arrived::History(room, page) => self.history_read(&room, page),
            }
            while let Some(next) = backlog.pop_front() {
                if self.closing {
                    break;
                }
                self.process(&next);
                if let Some(waiting) = self.waiting.take() {
                    // A message waits again: the rest of the backlog queues behind it.
                    self.waiting = Some(waiting.requeue(backlog));
                    break;
                }
            }
        }
    }

    /// Does what the app's verdict says with what it decided.
    fn conclude(&mut self, deferred: Deferred, verdict: Verdict) {
        if let Verdict::Deny(text) = &verdict {
            return self.reply_error(text);
        }
        match deferred {
            Deferred::Join(room, since) => self.complete_join(&room, since.as_ref()),
            Deferred::RoomMessage { room, message } => {
                let message = match &verdict {
                    Verdict::Replace(new) => new,
                    _ => &message,
                };
                self.relay_room_message(&room, Body::Raw(message));
            }
            Deferred::Broadcast(message) => {
                let message = match &verdict {
                    Verdict::Replace(new) => new,
                    _ => &message,
                };
                self.relay_broadcast(Body::Raw(message));
            }
        }
    }

    /// Starts a call to `proxy` about `deferred` with `body`; the verdict is polled by
    /// [`Session::poll_waiting`].
    fn ask_app(&mut self, proxy: Proxy, body: String, deferred: Deferred) {
        let Some(app) = self.app.as_ref() else {
            return;
        };
        let verdict = proxy::spawn_call(
            app.proxies.clone(),
            proxy,
            Bytes::from(body),
            app.forwarded.clone(),
        );
        self.waiting = Some(Waiting::new(Awaited::App(verdict, deferred)));
    }

    /// Whether `proxy` decides this connection's messages of its kind.
    fn asks(&self, proxy: Proxy) -> bool {
        self.app
            .as_ref()
            .is_some_and(|app| app.proxies.enabled(proxy))
    }

    /// Decodes one message and handles it.
    fn process(&mut self, payload: &[u8]) {
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
            Command::History { .. } => 6,
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
            Command::JoinRoom { room, since } => self.join_room(&room, since),
            Command::LeaveRoom { room } => self.leave_room(&room),
            Command::RoomMessage { room, message } => self.room_message(&room, message),
            Command::PrivateMessage { to, message } => self.private_message(&to, message),
            Command::SetMetadata { metadata } => self.set_metadata(metadata),
            Command::History { room, limit } => self.history(&room, limit),
        }
    }

    /// `history`: the room's last messages, for its members, with history on; without it the
    /// seed's answer to a type it does not know.
    fn history(&mut self, room: &str, limit: Option<u64>) {
        if self.node.config.history().is_none() {
            return self.reply_error("Unknown message type: history");
        }
        if let Err(refusal) = self.node.router.check_sender(room, &self.member) {
            return self.refuse_non_member(room, refusal);
        }
        // At most what the room keeps (its own size, which may differ from the flags').
        let limit = limit.map_or(usize::MAX, |limit| limit.min(usize::MAX as u64) as usize);
        match self.node.broker.history(room, limit, None) {
            HistoryRead::Off => {}
            HistoryRead::Done(page) => self.history_read(room, Some(page)),
            HistoryRead::Later(page) => {
                self.waiting = Some(Waiting::new(Awaited::History(room.into(), page)));
            }
        }
    }

    /// The `history` reply, or the error when it could not be read.
    fn history_read(&mut self, room: &str, page: Option<HistoryPage>) {
        match page {
            Some(page) => {
                let reply = protocol::history(room, &page.messages, page.offset, &page.epoch);
                self.member.outbox.push(reply);
            }
            None => self.reply_error(protocol::errors::HISTORY_UNAVAILABLE),
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
    fn broadcast(&mut self, message: Body<'_>) {
        if !self.node.session_limits.client_broadcast {
            return self.reply_error(limits::errors::BROADCAST_DISABLED);
        }
        if self.asks(Proxy::Publish) {
            let message = owned(&message);
            let body = self.publish_call("broadcast", None, &message);
            return self.ask_app(Proxy::Publish, body, Deferred::Broadcast(message));
        }
        self.relay_broadcast(message);
    }

    fn relay_broadcast(&self, message: Body<'_>) {
        let started = Instant::now();
        let delivered = self.publish(Target::Everyone, message).local();
        self.node.metrics.fanout(delivered, started.elapsed());
    }

    /// Hands one of this client's messages to the broker, which delivers it on every node.
    fn publish(&self, target: Target<'_>, message: Body<'_>) -> Delivery {
        self.node.broker.publish(&Publication {
            target,
            from: &self.member.client_id,
            message,
            timestamp: protocol::timestamp(),
            // A room message or broadcast skips its sender; a private message to yourself
            // reaches you.
            except: match target {
                Target::Recipient(_) => None,
                Target::Room(_) | Target::Everyone | Target::Group(_) => Some(self.member.conn),
            },
        })
    }

    fn join_room(&mut self, room: &str, since: Option<Since>) {
        if room.is_empty() {
            return self.reply_error(protocol::errors::ROOM_REQUIRED);
        }
        if room.len() > self.node.session_limits.max_room_name_length {
            return self.reply_error(limits::errors::ROOM_NAME_TOO_LONG);
        }
        if self
            .rooms
            .as_ref()
            .is_some_and(|rooms| rooms.contains(room))
        {
            return; // already a member: the seed sends nothing
        }
        if let Some(policy) = &self.allowed_rooms {
            if !policy.allows(room) {
                return self.reply_error(protocol::errors::ROOM_NOT_ALLOWED);
            }
        }
        if self.rooms.as_ref().map_or(0, |rooms| rooms.len()) >= self.node.session_limits.max_rooms
        {
            return self.reply_error(limits::errors::TOO_MANY_ROOMS);
        }
        if self.asks(Proxy::Join) {
            let metadata = protocol::metadata_object(&protocol::metadata_updated(&self.metadata));
            let metadata = raw_json(&metadata);
            let body = serde_json::to_string(&JoinCall {
                client_id: &self.member.client_id,
                user_id: self.member.user_id.as_deref(),
                room,
                metadata: &metadata,
            })
            .expect("a join call serializes");
            return self.ask_app(Proxy::Join, body, Deferred::Join(room.into(), since));
        }
        self.complete_join(room, since.as_ref());
    }

    /// The join, once every check (and the app, when asked) allowed it.
    fn complete_join(&mut self, room: &str, since: Option<&Since>) {
        match self.node.broker.join(room, &self.member, since) {
            Joining::Done(Joined::AlreadyMember) => {}
            Joining::Done(Joined::Added { members }) => {
                self.joined(room, members);
                // room_joined to the joiner, member_joined to the others.
                self.node
                    .metrics
                    .fanout_deliveries
                    .increment(members as u64);
            }
            Joining::Later {
                local_members,
                joined,
            } => {
                self.joined(room, local_members);
                // What the client sends meanwhile waits until its room_joined is out.
                self.waiting = Some(Waiting::new(Awaited::Join(joined)));
            }
        }
    }

    /// After `room` counted this connection in, with `local_members` on this node.
    fn joined(&mut self, room: &str, local_members: usize) {
        if local_members == 1 && !self.node.broker.reports_room_events() {
            // The room's first member on this node, which is all there is.
            self.webhook(EventKind::RoomOccupied, Some(room));
        }
        self.webhook(EventKind::MemberJoined, Some(room));
        self.rooms
            .get_or_insert_with(Box::default)
            .insert(Arc::from(room));
    }

    /// Not a member, or no such room: nothing happens and nothing is sent.
    fn leave_room(&mut self, room: &str) {
        if let Some(told) = self.node.broker.leave(room, &self.member) {
            self.left(room, told);
            if let Some(rooms) = &mut self.rooms {
                rooms.remove(room);
            }
            self.node.metrics.fanout_deliveries.increment(told as u64);
        }
    }

    fn room_message(&mut self, room: &str, message: Body<'_>) {
        if self.asks(Proxy::Publish) {
            // Refusals the seed gives (no such room, not a member) come before the app's say.
            if let Err(refusal) = self.node.router.check_sender(room, &self.member) {
                return self.refuse_non_member(room, refusal);
            }
            let message = owned(&message);
            let body = self.publish_call("room_message", Some(room), &message);
            let deferred = Deferred::RoomMessage {
                room: room.into(),
                message,
            };
            return self.ask_app(Proxy::Publish, body, deferred);
        }
        self.relay_room_message(room, message);
    }

    fn relay_room_message(&mut self, room: &str, message: Body<'_>) {
        let started = Instant::now();
        if let Err(refusal) = self.node.router.check_sender(room, &self.member) {
            return self.refuse_non_member(room, refusal);
        }
        let delivered = self.publish(Target::Room(room), message).local();
        self.node.metrics.fanout(delivered, started.elapsed());
    }

    /// Answers a room message (or `history`) the local hub refused. A room with no member here
    /// may have some on other nodes: the broker says, later, whether it exists at all, which
    /// decides between the seed's two texts (the sender is not in it either way).
    fn refuse_non_member(&mut self, room: &str, refusal: RoomMessageError) {
        if refusal == RoomMessageError::NoSuchRoom {
            if let Some(exists) = self.node.broker.room_exists(room) {
                self.waiting = Some(Waiting::new(Awaited::RoomExists(exists)));
                return;
            }
        }
        self.reply_error(&refusal.to_string());
    }

    /// The publish proxy's request body for one of this client's messages.
    fn publish_call(&self, kind: &'static str, room: Option<&str>, message: &RawValue) -> String {
        serde_json::to_string(&PublishCall {
            kind,
            client_id: &self.member.client_id,
            user_id: self.member.user_id.as_deref(),
            room,
            message,
        })
        .expect("a publish call serializes")
    }

    /// The sender gets nothing; sending to yourself delivers to yourself.
    fn private_message(&mut self, to: &str, message: Body<'_>) {
        match self.publish(Target::Recipient(to), message) {
            Delivery::Done(delivered) => self.delivered(delivered),
            // Only a broker for several nodes knows later (the recipient may be elsewhere).
            Delivery::Later(delivery) => {
                self.waiting = Some(Waiting::new(Awaited::Delivery(delivery)));
            }
        }
    }

    /// A private message's outcome: counted, or the sender told nobody has that id.
    fn delivered(&self, delivered: Result<usize, RecipientNotFound>) {
        match delivered {
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
    fn left(&self, room: &str, remaining: usize) {
        self.webhook(EventKind::MemberLeft, Some(room));
        if remaining == 0 && !self.node.broker.reports_room_events() {
            self.webhook(EventKind::RoomVacated, Some(room));
        }
    }

    /// Tells the app, if webhooks are on, that `kind` happened to this connection.
    fn webhook(&self, kind: EventKind, room: Option<&str>) {
        self.node.webhook(kind, &self.member, room);
    }

    /// Leaves every room (members are told, as with `leave_room`) and the directory. Called
    /// once when the connection ends, for whatever reason.
    /// Returns, on the first call, what answers when other nodes can no longer reach this
    /// connection (see [`crate::broker::Broker::disconnected`]).
    pub fn disconnect(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        // A call still out is abandoned (its task sees the verdict's receiver go), and what
        // waited behind it is dropped with the connection.
        self.waiting = None;
        for room in self.rooms.take().into_iter().flat_map(|rooms| *rooms) {
            if let Some(told) = self.node.broker.leave(&room, &self.member) {
                self.left(&room, told);
                self.node.metrics.fanout_deliveries.increment(told as u64);
            }
        }
        self.node.router.disconnect(&self.member);
        // Once: the broker counts what it subscribes for this connection.
        if std::mem::replace(&mut self.disconnected, true) {
            return None;
        }
        let unreachable = self.node.broker.disconnected(&self.member);
        self.webhook(EventKind::ClientDisconnected, None);
        unreachable
    }
}

/// The seed protocol: the welcome first, then the client is in the directory (and the broker's
/// view), and its commands go to the session.
impl Protocol for Session {
    const NAME: &'static str = "rooms";

    fn open(opening: Opening<'_>) -> Self {
        let Opening {
            node,
            conn,
            client_id,
            identity,
            outbox,
            writer,
            ..
        } = opening;
        // Ahead of everything, and without creating the queue: nobody else can reach this
        // connection yet, and one that is never sent anything more never allocates a queue.
        writer.push_direct(protocol::welcome(
            &client_id,
            identity.user_id.as_deref(),
            protocol::timestamp(),
        ));
        heartbeat_from_now(node, &outbox, &identity);
        let member = Member {
            conn,
            client_id,
            user_id: identity.user_id,
            outbox,
        };
        node.router.connect(&member);
        node.broker.connected(&member);
        node.webhook(EventKind::ClientConnected, &member, None);
        Session::new(
            member,
            node.clone(),
            identity.rooms,
            identity.metadata,
            identity.forwarded,
        )
    }

    fn conn(&self) -> ConnId {
        self.member.conn
    }

    fn outbox(&self) -> &Outbox {
        &self.member.outbox
    }

    fn node(&self) -> &Arc<Node> {
        &self.node
    }

    fn on_message(&mut self, _binary: bool, payload: &mut [u8]) {
        // The seed (Ratchet) hands binary messages to the same handler as text.
        self.handle_message(payload);
    }

    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> bool {
        Session::poll_waiting(self, cx)
    }

    fn disconnect(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        Session::disconnect(self)
    }
}

/// A message as JSON text of its own, to keep while the app decides.
fn owned(message: &Body<'_>) -> Box<RawValue> {
    match message {
        Body::Raw(raw) => (*raw).to_owned(),
        Body::Text(text) => serde_json::value::to_raw_value(text).expect("a string serializes"),
    }
}

/// JSON text the server wrote itself (a metadata object) as a raw value.
fn raw_json(text: &Bytes) -> Box<RawValue> {
    let text = String::from_utf8_lossy(text).into_owned();
    RawValue::from_string(text).unwrap_or_else(|_| {
        serde_json::value::to_raw_value(&serde_json::Map::new()).expect("{} serializes")
    })
}
