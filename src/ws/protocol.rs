//! The seam between a connection's task and the wire protocol it speaks once upgraded.
//!
//! The task ([`super::session`]) owns what every protocol shares: the socket, the frame reader
//! and writer, pings, the outbound queue, the limits and the close handshake. A [`Protocol`]
//! owns what the messages mean: its greeting, its commands, what it registers in the hub and
//! takes out again. Which protocol an upgrade gets is decided by its path, in one table
//! ([`Route::of`]); a new protocol is a module implementing [`Protocol`], its switch in the
//! configuration and its line in that table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Context;

use bytes::Bytes;
use hyper::Uri;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;

use super::commands::Session;
use super::echo::Echo;
use super::relay::Relay;
use super::session::{self, Handshake};
use super::transport::Transport;
use crate::admission::{Identity, Permit};
use crate::hub::ConnId;
use crate::node::Node;
use crate::outbox::{Outbox, OutboxReceiver};
use crate::pusher::session::PusherSession;

/// What a protocol is handed when its connection opens.
pub struct Opening<'a> {
    pub node: &'a Arc<Node>,
    pub conn: ConnId,
    /// The connection's id in logs (the seed protocol's `client_…`, its address).
    pub client_id: Arc<str>,
    /// What admission (token, connect proxy) granted.
    pub identity: Identity,
    /// The connection's queue: the handle the hub and the protocol push frames into.
    pub outbox: Outbox,
    /// The queue's writing end, for a greeting that goes out ahead of everything, in the same
    /// write as the 101, without creating the queue ([`OutboxReceiver::push_direct`]).
    pub writer: &'a mut OutboxReceiver,
    /// What the request's path and query selected.
    pub route: Route,
}

/// Puts a connection the heartbeat keeps on its clock: heard from now (for `--idle-timeout`),
/// and closed with 4001 when its token expires.
pub fn heartbeat_from_now(node: &Node, outbox: &Outbox, identity: &Identity) {
    outbox.touch(node.clock.now());
    if let Some(expires_at) = identity.expires_at {
        outbox.set_expires_at(expires_at);
    }
}

/// One wire protocol's side of a connection. Its value lives inside the connection's task for
/// the connection's life, so what it holds every idle connection pays for.
pub trait Protocol: Sized + Send + Unpin + 'static {
    /// The protocol's name in the connection's log lines.
    const NAME: &'static str;

    /// Greets the client and makes the connection reachable (hub, directory, broker).
    fn open(opening: Opening<'_>) -> Self;

    /// The connection's number.
    fn conn(&self) -> ConnId;

    /// The connection's queue.
    fn outbox(&self) -> &Outbox;

    /// The node the connection belongs to. The protocol keeps it (it needs it for almost
    /// everything it does); the connection borrows it from here rather than hold a second
    /// pointer.
    fn node(&self) -> &Arc<Node>;

    /// One complete data message from the client (text unless `binary`).
    fn on_message(&mut self, binary: bool, payload: &mut [u8]);

    /// Acts on what the protocol waited for (a proxy's verdict, a delivery) once it arrived;
    /// false while the connection should not read, its backlog being full.
    fn poll_waiting(&mut self, _cx: &mut Context<'_>) -> bool {
        true
    }

    /// Takes the connection out of everything `open` put it in. Called when it starts closing
    /// and again when its task ends: must be idempotent. Returns, on the first call, what
    /// answers once other nodes can no longer reach it (the close frame waits for that).
    fn disconnect(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>>;
}

/// The protocol an upgrade request's path selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The seed protocol: welcome, rooms, broadcasts, private messages (any other path).
    Rooms,
    /// `--echo-path`: every message straight back, for conformance suites.
    Echo,
    /// `--relay-path`: the seed's Swoole variant, every message to every connection there.
    Relay,
    /// `/app/{key}` with `--pusher-app`: the Pusher protocol, for the app of that key (`None`:
    /// no such app, refused in the protocol), in the `protocol` version the query asked for.
    Pusher {
        app: Option<u16>,
        protocol: Option<u8>,
    },
}

impl Route {
    /// The one table of paths.
    pub fn of(node: &Node, uri: &Uri) -> Route {
        let path = uri.path();
        let on = |flag: &Option<String>| flag.as_deref() == Some(path);
        if on(&node.config.echo_path) {
            return Route::Echo;
        }
        if on(&node.config.relay_path) {
            return Route::Relay;
        }
        if let (Some(apps), Some(key)) = (&node.pusher, path.strip_prefix("/app/")) {
            let protocol = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .find(|(name, _)| name == "protocol")
                .and_then(|(_, version)| version.parse().ok());
            return Route::Pusher {
                app: apps.by_key(key),
                protocol,
            };
        }
        Route::Rooms
    }

    /// Whether the native token (`--auth-secret`) is asked for: a Pusher client has none; its
    /// private channels are authorized by the app's own signature instead.
    pub fn needs_token(self) -> bool {
        !matches!(self, Route::Pusher { .. })
    }

    /// Whether the application's connect proxy decides on the upgrade: the seed protocol's
    /// clients are the application's users (the relay's are too, but the proxy's answer
    /// grants rooms and metadata it has no use for: the token is its check); a conformance
    /// suite is not.
    pub fn asks_the_app(self) -> bool {
        matches!(self, Route::Rooms)
    }

    /// Spawns the connection's task, speaking this route's protocol (see [`session::start`]).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn<S>(
        self,
        tasks: &TaskTracker,
        io: S,
        handshake: Handshake,
        prebuffered: Bytes,
        node: Arc<Node>,
        peer: SocketAddr,
        permit: Permit,
        identity: Identity,
    ) where
        S: AsyncRead + AsyncWrite + Transport + Unpin + Send + 'static,
    {
        let spawn = match self {
            Route::Rooms => spawn_speaking::<S, Session>,
            Route::Echo => spawn_speaking::<S, Echo>,
            Route::Relay => spawn_speaking::<S, Relay>,
            Route::Pusher { .. } => spawn_speaking::<S, PusherSession>,
        };
        spawn(
            tasks,
            self,
            Start {
                io,
                handshake,
                prebuffered,
                node,
                peer,
                permit,
                identity,
            },
        );
    }
}

/// What [`session::start`] takes.
struct Start<S> {
    io: S,
    handshake: Handshake,
    prebuffered: Bytes,
    node: Arc<Node>,
    peer: SocketAddr,
    permit: Permit,
    identity: Identity,
}

fn spawn_speaking<S, P>(tasks: &TaskTracker, route: Route, start: Start<S>)
where
    S: AsyncRead + AsyncWrite + Transport + Unpin + Send + 'static,
    P: Protocol,
{
    tasks.spawn(session::start::<S, P>(
        start.io,
        start.handshake,
        start.prebuffered,
        start.node,
        start.peer,
        start.permit,
        start.identity,
        route,
    ));
}
