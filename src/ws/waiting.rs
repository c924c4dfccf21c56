//! What a session waits for before it can finish a message, and the messages that queue behind
//! it: the application's verdict on a join or a message (the join and publish proxies), a
//! delivery that the broker can only confirm later (a private message to a client on another
//! node), or a join going round the cluster. One thing is awaited at a time; everything the client sends meanwhile waits, in
//! arrival order, so one sender's messages keep their order and their replies come in the order
//! of their requests, as on the seed. Only a connection that is waiting has any of this (one
//! allocation, freed when the backlog is done).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::api::proxy::{self, Verdict};
use crate::hub::{HistoryPage, RecipientNotFound};

/// A connection stops reading once this many messages, or bytes, wait: enough to absorb a
/// burst, bounded per connection (TCP then pushes back on the client).
const BACKLOG_MESSAGES: usize = 256;
const BACKLOG_BYTES: usize = 256 * 1024;

/// What a proxy call is deciding.
pub enum Deferred {
    Join(Box<str>, Option<crate::protocol::Since>),
    RoomMessage {
        room: Box<str>,
        message: Box<RawValue>,
    },
    Broadcast(Box<RawValue>),
}

/// What is awaited.
pub enum Awaited {
    /// The application's verdict on `Deferred`.
    App(oneshot::Receiver<Verdict>, Deferred),
    /// Whether a private message found its recipient.
    Delivery(oneshot::Receiver<Result<usize, RecipientNotFound>>),
    /// A join going round the cluster (the hub sends `room_joined` when it is done).
    Join(oneshot::Receiver<()>),
    /// Whether a room with no member on this node has some elsewhere (for a non-member's
    /// room message: which error it gets).
    RoomExists(oneshot::Receiver<bool>),
    /// A room's history, read from where the cluster keeps it (for the `history` command).
    History(Box<str>, oneshot::Receiver<HistoryPage>),
}

/// What arrived.
pub enum Arrived {
    App(Verdict, Deferred),
    Delivery(Result<usize, RecipientNotFound>),
    Joined,
    RoomExists(bool),
    /// The room and its page, `None` when it could not be read.
    History(Box<str>, Option<HistoryPage>),
}

/// The awaited thing and the backlog behind it.
pub struct Waiting {
    awaited: Option<Awaited>,
    backlog: VecDeque<Box<[u8]>>,
    backlog_bytes: usize,
}

impl Waiting {
    pub fn new(awaited: Awaited) -> Box<Self> {
        Box::new(Self {
            awaited: Some(awaited),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
        })
    }

    /// Keeps a message that arrived meanwhile.
    pub fn queue(&mut self, payload: &[u8]) {
        self.backlog_bytes += payload.len();
        self.backlog.push_back(payload.into());
    }

    /// Whether the connection may read more while waiting.
    pub fn has_room(&self) -> bool {
        self.backlog.len() < BACKLOG_MESSAGES && self.backlog_bytes < BACKLOG_BYTES
    }

    /// Polls the awaited thing; once it arrived, returns it with the backlog to handle.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<(Arrived, VecDeque<Box<[u8]>>)> {
        let arrived = match self.awaited.take() {
            None => return Poll::Pending,
            Some(Awaited::App(mut verdict, deferred)) => match Pin::new(&mut verdict).poll(cx) {
                Poll::Pending => {
                    self.awaited = Some(Awaited::App(verdict, deferred));
                    return Poll::Pending;
                }
                // The call's task ended without a verdict (the runtime is stopping).
                Poll::Ready(verdict) => Arrived::App(
                    verdict
                        .unwrap_or_else(|_| Verdict::Deny(proxy::errors::APP_UNAVAILABLE.into())),
                    deferred,
                ),
            },
            Some(Awaited::Delivery(mut delivery)) => match Pin::new(&mut delivery).poll(cx) {
                Poll::Pending => {
                    self.awaited = Some(Awaited::Delivery(delivery));
                    return Poll::Pending;
                }
                // The broker's task ended without saying: nothing to tell the sender.
                Poll::Ready(delivered) => Arrived::Delivery(delivered.unwrap_or(Ok(0))),
            },
            Some(Awaited::Join(mut joined)) => match Pin::new(&mut joined).poll(cx) {
                Poll::Pending => {
                    self.awaited = Some(Awaited::Join(joined));
                    return Poll::Pending;
                }
                // Done, or given up (the member left meanwhile): either way, go on.
                Poll::Ready(_) => Arrived::Joined,
            },
            Some(Awaited::RoomExists(mut exists)) => match Pin::new(&mut exists).poll(cx) {
                Poll::Pending => {
                    self.awaited = Some(Awaited::RoomExists(exists));
                    return Poll::Pending;
                }
                // No answer (Redis away): as this node sees it.
                Poll::Ready(exists) => Arrived::RoomExists(exists.unwrap_or(false)),
            },
            Some(Awaited::History(room, mut page)) => match Pin::new(&mut page).poll(cx) {
                Poll::Pending => {
                    self.awaited = Some(Awaited::History(room, page));
                    return Poll::Pending;
                }
                Poll::Ready(page) => Arrived::History(room, page.ok()),
            },
        };
        self.backlog_bytes = 0;
        Poll::Ready((arrived, std::mem::take(&mut self.backlog)))
    }

    /// This wait with `rest` (what was left of the previous backlog) queued behind it, ahead
    /// of anything that arrives later.
    pub fn requeue(mut self: Box<Self>, rest: VecDeque<Box<[u8]>>) -> Box<Self> {
        self.backlog_bytes += rest.iter().map(|message| message.len()).sum::<usize>();
        let arrived_meanwhile = std::mem::replace(&mut self.backlog, rest);
        self.backlog.extend(arrived_meanwhile);
        self
    }
}
