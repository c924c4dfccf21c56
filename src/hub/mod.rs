//! The hub: this node's rooms, its client directory, the registry of every local connection,
//! and delivery to local connections.
//!
//! [`Router`] is what connections and the broker see of it; [`LocalHub`] is the in-memory
//! implementation. Publications come in through [`Router::deliver`] (called by the
//! [`crate::broker`], never by a session directly), and the hub encodes each one into a wire
//! frame once, by the `protocol` module, into one [`bytes::Bytes`]; each recipient's [`Outbox`]
//! receives a clone of it (a reference-count increment). Membership notices (`room_joined`,
//! `member_joined`, `member_left`) are produced here too, under the room's lock, so every
//! member sees one order of events with exact counts.

mod local;

use std::sync::Arc;

use bytes::Bytes;

use crate::broker::Publication;
use crate::outbox::Outbox;
pub use local::LocalHub;

/// Process-unique number of a connection; cheap to compare and hash.
pub type ConnId = u64;

/// A connection as routing sees it: how to identify it and where its frames go.
#[derive(Clone)]
pub struct Member {
    pub conn: ConnId,
    /// The protocol-level id (`client_…`), the address of private messages.
    pub client_id: Arc<str>,
    /// The token's `sub` when auth is on: private messages to it reach every connection of
    /// that user.
    pub user_id: Option<Arc<str>>,
    pub outbox: Outbox,
}

/// A local connection as the registry lists it.
#[derive(Clone, Copy)]
pub enum Local<'a> {
    /// A seed-protocol client: in the directory, maybe in rooms.
    Client(&'a Member),
    /// A connection of a protocol outside the rooms and the directory: an `--echo-path` one
    /// (a conformance suite's: no heartbeat), or the relay's or Pusher's, which the heartbeat
    /// pings and times out as it does clients.
    Outside { outbox: &'a Outbox, heartbeat: bool },
}

impl Local<'_> {
    pub fn outbox(&self) -> &Outbox {
        match self {
            Local::Client(member) => &member.outbox,
            Local::Outside { outbox, .. } => outbox,
        }
    }
}

/// One member of a room as the server API lists it.
#[derive(Debug, Clone)]
pub struct Presence {
    pub client_id: Arc<str>,
    pub user_id: Option<Arc<str>>,
    /// The member's metadata as a JSON object's text, values as the client wrote them; `None`
    /// when it set none.
    pub metadata: Option<bytes::Bytes>,
}

pub use crate::protocol::Since;

/// The last messages of a room's history, for the `history` command and the server API.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// Each message's JSON object (the opted-in `room_message`, with its offset), oldest first.
    pub messages: Vec<bytes::Bytes>,
    /// The offset of the room's last message (0: none yet).
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// Where a recovering joiner stands in a room's history that the cluster keeps (read in one
/// step with its join, see [`Router::recovered`]).
#[derive(Debug, Clone)]
pub struct JoinPoint {
    /// The offset of the room's last message at the join: live ones follow from the next.
    pub offset: u64,
    pub epoch: Arc<str>,
    /// What it missed, in order (possibly nothing), when recovered; `None`: not recovered.
    pub replay: Option<Vec<bytes::Bytes>>,
}

impl JoinPoint {
    /// The place of a joiner whose history could not be read (Redis away): not recovered, and
    /// no epoch to hold on to.
    pub fn unknown() -> Self {
        Self {
            offset: 0,
            epoch: Arc::from(""),
            replay: None,
        }
    }
}

/// Result of [`Router::join`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Added; `members` is the room's size including the new member.
    Added { members: usize },
    /// Already a member: the seed does nothing and sends nothing.
    AlreadyMember,
}

/// A join or leave somewhere in the cluster, with the room's cluster-wide member count, for
/// [`Router::announce`].
#[derive(Debug, Clone, Copy)]
pub enum MemberChange<'a> {
    Joined { client_id: &'a str, total: usize },
    Left { client_id: &'a str, total: usize },
}

/// Why a room message was refused, in the seed's order of checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomMessageError {
    #[error("Room does not exist")]
    NoSuchRoom,
    #[error("You are not in this room")]
    NotAMember,
}

/// No connected client has the requested id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Recipient not found")]
pub struct RecipientNotFound;

/// Rooms, directory and fan-out. Implementations must deliver the frames of one call to each
/// recipient in call order, and the frames from one sender in the order of its calls.
pub trait Router: Send + Sync + 'static {
    /// Makes a connection reachable by broadcasts and private messages.
    fn connect(&self, member: &Member);

    /// Removes a connection from the directory. Rooms are left separately, with
    /// notifications, by [`Router::leave`].
    fn disconnect(&self, member: &Member);

    /// Adds `member` to `room`, creating the room if new. On success the member receives
    /// `room_joined` and every other member `member_joined`.
    fn join(&self, room: &str, member: &Member) -> Joined;

    /// Removes `member` from `room`; the remaining members receive `member_left`, and an empty
    /// room is deleted. Returns how many were told, or `None` (having done nothing) if it was
    /// not a member.
    fn leave(&self, room: &str, member: &Member) -> Option<usize>;

    /// [`Router::join`] for a client that opted in to offsets (`since`): with history on, its
    /// `room_joined` carries the room's offset and epoch and whether what it missed was
    /// recovered (then replayed right after it, before anything newer), and the room's messages
    /// reach it with their offsets. Without history, a plain join.
    fn join_since(&self, room: &str, member: &Member, _since: &Since) -> Joined {
        self.join(room, member)
    }

    /// The last `limit` messages of `room`'s history, or with `since` the first `limit` after
    /// that offset; `None` when history is off.
    fn history(&self, _room: &str, _limit: usize, _since: Option<u64>) -> Option<HistoryPage> {
        None
    }

    /// Drops the histories that have been idle past their TTL (called now and then).
    fn expire_history(&self) {}

    /// Adds `member` to `room` as pending, for a broker that spans nodes: it is counted in
    /// `Joined::Added` (local members, pending ones included) but receives nothing, and nobody
    /// is told, until its own join comes back in the room's order ([`Router::announce`]) or the
    /// broker gives up waiting for that ([`Router::activate`]); then it gets `room_joined` with
    /// the cluster-wide count, and `activated` is told. A `recovering` joiner (one that opted
    /// in to offsets, in a room whose history the cluster keeps) also needs its place in the
    /// history ([`Router::recovered`]) before it is made a member; what the room sends between
    /// its join coming back and that is kept for it, so it misses nothing.
    fn join_pending(
        &self,
        room: &str,
        member: &Member,
        activated: tokio::sync::oneshot::Sender<()>,
        recovering: bool,
    ) -> Joined;

    /// The place in `room`'s history of its recovering pending `member`: it becomes a member
    /// with `room_joined` (offset, epoch, recovered), what it missed, then what the room sent
    /// since its join, once its join has come back too.
    fn recovered(&self, room: &str, member: &Member, point: JoinPoint);

    /// A room message whose offset the cluster's history gave: the seed's frame to the room's
    /// members here, the offset-carrying one to those who opted in (each encoded at most once).
    /// Returns how many got it.
    fn deliver_at(&self, publication: &Publication<'_>, offset: u64) -> usize;

    /// Makes the pending `member` of `room` a member with `total` in its `room_joined` (a
    /// recovering one without its place, if that has not come: not recovered); false when it
    /// was not pending (already activated, or gone).
    fn activate(&self, room: &str, member: &Member, total: usize) -> bool;

    /// [`Router::leave`] without telling anyone (a pending member too); `Some` of how many local
    /// members remain.
    fn leave_quietly(&self, room: &str, member: &Member) -> Option<usize>;

    /// Tells `room`'s local members (but the one it is about) of a join or leave, with the
    /// cluster-wide count; a join of this node's pending member activates it. Returns how many
    /// were told.
    fn announce(&self, room: &str, change: MemberChange<'_>) -> usize;

    /// Whether `sender` may send to `room`, checked in the seed's order: the room must exist,
    /// then the sender must be in it.
    fn check_sender(&self, room: &str, sender: &Member) -> Result<(), RoomMessageError>;

    /// Delivers a publication to this node's recipients, encoding its frame once; returns
    /// how many got it. A room with no members here is not an error; a private message to
    /// an id nobody here has is `RecipientNotFound`.
    fn deliver(&self, publication: &Publication<'_>) -> Result<usize, RecipientNotFound>;

    /// The connections a client id (one) or else a user id (all of the user's) names.
    fn connections_of(&self, id: &str) -> Vec<Member>;

    /// Records `member`'s metadata (a JSON object's text) for presence listings.
    fn set_metadata(&self, member: &Member, object: bytes::Bytes);

    /// The members of `room` with their metadata, or `None` when it does not exist.
    fn presence(&self, room: &str) -> Option<Vec<Presence>>;

    /// Number of members of `room` (0 when it does not exist).
    fn room_size(&self, room: &str) -> usize;

    /// Number of rooms and connected clients.
    fn counts(&self) -> (usize, usize);

    /// Lists a connection of a protocol outside the rooms and the directory (the echo, the
    /// relay, Pusher's): reachable by no publication, but a local connection all the same,
    /// which the shutdown and the metrics must see, and the heartbeat too when `heartbeat`.
    fn register_outside(&self, conn: ConnId, outbox: &Outbox, heartbeat: bool);

    /// Removes what [`Router::register_outside`] listed. Idempotent.
    fn unregister_outside(&self, conn: ConnId);

    /// Puts a connection in this node's `group` (a protocol's own fan-out set: the relay's
    /// path, a Pusher channel); returns the group's size with it, `None` (nothing done) if it
    /// was in it.
    fn join_group(&self, group: &str, conn: ConnId, outbox: &Outbox) -> Option<usize>;

    /// Takes a connection out of `group`; returns how many remain, `None` if it was not in
    /// it. An empty group is dropped.
    fn leave_group(&self, group: &str, conn: ConnId) -> Option<usize>;

    /// Hands `frame` (encoded once, shared) to every connection of this node's `group` but
    /// `except`; returns how many got it. A group is node-local: what crosses to other nodes
    /// is a [`crate::broker::Target::Group`] publication, which comes here on each.
    fn send_to_group(&self, group: &str, frame: &Bytes, except: Option<ConnId>) -> usize;

    /// This node's groups whose name starts with `prefix`, with their sizes (it visits every
    /// group: for listings, not the hot path).
    fn groups(&self, prefix: &str) -> Vec<(String, usize)>;

    /// Calls `f` for every connection of this node, clients and outside ones (for the
    /// heartbeat, the shutdown which closes them all, and the queue gauges).
    fn for_each_connection(&self, f: &mut dyn FnMut(Local<'_>));

    /// The `n` rooms with the most members, largest first (for the admin stats endpoint; it
    /// visits every room).
    fn top_rooms(&self, n: usize) -> Vec<(String, usize)>;
}
