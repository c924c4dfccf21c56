//! Questions a node asks every other node about their own connections, for the server API on
//! any node: which rooms they have members in, who the members of a room are, and closing a
//! client's or user's connections (a Pusher user's too). Each node answers from its own hub; the asking node merges
//! the answers with its own. The nodes are the truth for their connections (their metadata,
//! their user ids), so nothing of this is kept in Redis.
//!
//! A [`Query`] and an [`Answer`] are JSON on the wire (inside the broker's envelope); a
//! member's metadata travels as raw JSON, so a listing shows it byte for byte as the client
//! wrote it, on whichever node it is asked.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// How long the asking node waits for the other nodes' answers; a node that has not answered
/// by then is counted in [`Gathered::unanswered`].
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// A question for every node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    /// The rooms with members on the node whose name starts with `prefix`, and how many.
    Rooms { prefix: String },
    /// The node's members of `room`.
    Presence { room: String },
    /// Close the client with id `id` (or, `by_user`, every connection of that user) with
    /// `code` and `reason`.
    Disconnect {
        id: String,
        by_user: bool,
        code: u16,
        reason: String,
    },
    /// Close the node's Pusher connections signed in as `user` of the app with id `app`
    /// (`terminate_connections`).
    TerminatePusherUser { app: String, user: String },
    /// The node's groups (Pusher channels) whose name starts with `prefix`, and their sizes.
    Groups { prefix: String },
}

/// One member of a room in a node's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Member {
    pub client_id: String,
    pub user_id: Option<String>,
    /// Its metadata, a JSON object as the client wrote it; `None` when it set none.
    pub metadata: Option<Box<RawValue>>,
}

/// One node's answer. Externally tagged (`{"presence":{..}}`): an internally tagged enum is
/// buffered before it is read, which raw JSON values cannot be read from.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Rooms {
        rooms: Vec<(String, usize)>,
    },
    /// `None`: the room has no member on that node.
    Presence {
        members: Option<Vec<Member>>,
    },
    Disconnected {
        count: usize,
    },
    Groups {
        groups: Vec<(String, usize)>,
    },
}

/// The other nodes' answers.
#[derive(Debug)]
pub struct Gathered {
    pub answers: Vec<Answer>,
    /// Whether every node answered: false when some received the question but did not answer
    /// within [`ASK_TIMEOUT`], or when it could not be asked (Redis unreachable).
    pub complete: bool,
}

impl Gathered {
    /// Nothing to gather: this node is alone.
    pub fn alone() -> Self {
        Self {
            answers: Vec::new(),
            complete: true,
        }
    }
}

/// What answers a query on this node (the node's server API, from its own hub).
pub trait Responder: Send + Sync {
    fn answer(&self, query: &Query) -> Answer;
}
