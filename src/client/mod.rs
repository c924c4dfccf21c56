//! A client library for roomcast (and any server that speaks the seed protocol of
//! `shared/PROTOCOL.md`), with automatic reconnection.
//!
//! [`Client::connect`] checks the configuration and starts one background task that owns the
//! connection; it returns at once. Sending methods ([`Client::join_room`],
//! [`Client::room_message`], …) put a message in a bounded queue and return; the task sends it
//! as soon as it is connected. Everything that happens comes back as an [`Event`] from
//! [`Client::next_event`] (or the [`Stream`](futures_util::Stream) the client implements).
//!
//! ```no_run
//! use roomcast::client::{Client, ClientConfig, Event, ServerMessage};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = Client::connect(ClientConfig::new("ws://127.0.0.1:8080/").token("eyJ…"))?;
//! client.join_room("lobby")?;
//! client.room_message("lobby", "hello")?; // queued; sent once connected
//! while let Some(event) = client.next_event().await {
//!     match event {
//!         Event::Connected { client_id, .. } => println!("connected as {client_id}"),
//!         Event::Message(ServerMessage::RoomMessage { room, from, message, .. }) => {
//!             println!("[{room}] {from}: {message}")
//!         }
//!         Event::Disconnected { reason } => println!("disconnected: {reason}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Reconnecting
//! When the connection is lost (or an attempt fails) the client emits
//! [`Event::Disconnected`], waits as its [`ReconnectPolicy`] says (exponential backoff with a
//! cap and jitter; [`Event::Reconnecting`] tells how long) and tries again. Each new connection
//! is a new `client_id` on the server, so after the `welcome` ([`Event::Connected`]) the client
//! restores what the server forgot: it sends its metadata (everything it set, merged), joins
//! again every room it had joined and not left (each answers with a `room_joined` event), and
//! then sends what was queued meanwhile, in the order it was queued.
//!
//! An upgrade refused with an HTTP 4xx status other than 408 and 429 (a missing or expired
//! token, a forbidden origin) is not retried: the same request would be refused again. The
//! event stream then ends, as it does after [`Client::close`] or when
//! [`ReconnectPolicy::max_attempts`] is reached.
//!
//! # Recovering what was missed
//! Each join asks the server for offsets (`since`); the client remembers each room's last
//! offset and epoch from its `room_joined` and messages, and a rejoin after a reconnection
//! sends them. A server that keeps history (`--history-size`) replays what was missed right
//! after the rejoin's `room_joined`, whose `recovered` is `Some(true)`; `Some(false)` means
//! the gap could not be filled (reload the application's state); `None`, a server without
//! history. Nothing to do in the application but look at `recovered`.
//!
//! # Delivery
//! Messages leave in the order they were queued. While disconnected, at most
//! [`ClientConfig::queue_capacity`] messages wait; one more is refused with
//! [`ClientError::QueueFull`] (nothing is dropped silently). A message whose write fails is
//! sent again after reconnecting; one that was written but lost in flight with the connection is
//! not (the protocol has no acknowledgements). Mind the server's rate limit (by default a burst
//! of 200 messages, then 100/s) when the queue is large: everything queued goes out at once.
//!
//! # TLS
//! `wss://` URLs use rustls (ring provider) with Mozilla's root certificates
//! (webpki-roots), plus the certificates of [`ClientConfig::extra_root_pem`] for a private CA
//! or a self-signed server.

mod backoff;
pub mod cli;
mod task;
mod transport;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::protocol::typed::{ClientMessage, Position, ServerMessage};
pub use backoff::{Jitter, ReconnectPolicy};

/// Everything a [`Client`] needs; [`ClientConfig::new`] gives the defaults, the methods of the
/// same names as the fields change them.
///
/// ```
/// use std::time::Duration;
/// use roomcast::client::{ClientConfig, ReconnectPolicy};
///
/// let config = ClientConfig::new("wss://rt.example.com/")
///     .token("eyJhbGciOi…")
///     .queue_capacity(500)
///     .reconnect(ReconnectPolicy { max_delay: Duration::from_secs(10), ..Default::default() });
/// assert_eq!(config.queue_capacity, 500);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// `ws://host[:port][/path]` or `wss://…`.
    pub url: String,
    /// A token (JWT) sent as the `token` query parameter of the upgrade request.
    pub token: Option<String>,
    /// When to try again after a lost connection. Default: 500 ms doubling up to 30 s, full
    /// jitter, for ever.
    pub reconnect: ReconnectPolicy,
    /// Messages that may wait to be sent (while disconnected, or while a write is under way).
    /// Default 128.
    pub queue_capacity: usize,
    /// PEM certificates trusted for `wss://` besides Mozilla's roots (a private CA, a
    /// self-signed server). Default: none.
    pub extra_root_pem: Option<Vec<u8>>,
    /// How long one attempt may take, from TCP connect to the server's `welcome`; it also bounds
    /// how long one write may stall before the connection counts as lost. Default 10 s.
    pub connect_timeout: Duration,
    /// How often the client pings the server; silence (not even a pong) for two periods counts
    /// as a lost connection. `None`: no pings, a silent server is waited for. Default 20 s.
    pub keepalive: Option<Duration>,
    /// Events that may wait for [`Client::next_event`]. When they are not read the client stops
    /// reading the socket, and the server eventually drops it as a slow consumer. Default 1024.
    pub event_buffer: usize,
}

impl ClientConfig {
    /// The defaults, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: None,
            reconnect: ReconnectPolicy::default(),
            queue_capacity: 128,
            extra_root_pem: None,
            connect_timeout: Duration::from_secs(10),
            keepalive: Some(Duration::from_secs(20)),
            event_buffer: 1024,
        }
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    pub fn extra_root_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_root_pem = Some(pem.into());
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn keepalive(mut self, period: Option<Duration>) -> Self {
        self.keepalive = period;
        self
    }

    pub fn event_buffer(mut self, capacity: usize) -> Self {
        self.event_buffer = capacity;
        self
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("reconnect", &self.reconnect)
            .field("queue_capacity", &self.queue_capacity)
            .field("extra_root_pem", &self.extra_root_pem.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("keepalive", &self.keepalive)
            .field("event_buffer", &self.event_buffer)
            .finish()
    }
}

/// What a client reports, in order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A connection is up and the server's `welcome` arrived. `client_id` is new for every
    /// connection; `user_id` is the token's `sub` when the server requires tokens.
    Connected {
        client_id: String,
        user_id: Option<String>,
    },
    /// A message from the server.
    Message(ServerMessage),
    /// A connection was lost, an attempt failed, or the client was closed (`reason` says which).
    /// [`Event::Reconnecting`] follows unless the client is finished.
    Disconnected { reason: String },
    /// The client waits `delay` before attempt `attempt` (1 for the first retry).
    Reconnecting { attempt: u32, delay: Duration },
    /// A text frame that is not a message this version knows, as received (a newer server's
    /// message type, say).
    Other(String),
}

/// Why a message was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// [`ClientConfig::queue_capacity`] messages already wait (the client is disconnected or
    /// the server is not reading).
    #[error("the send queue is full: {capacity} messages already wait for the connection")]
    QueueFull { capacity: usize },
    /// [`Client::close`] was called, or the client gave up (see [`ReconnectPolicy`]).
    #[error("the client is closed")]
    Closed,
}

/// Why a client could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("extra root certificates: {0}")]
    Ca(String),
    #[error("queue_capacity and event_buffer must be at least 1")]
    ZeroCapacity,
    #[error("Client::connect must be called inside a Tokio runtime")]
    NoRuntime,
}

/// A connection to a roomcast server that reconnects by itself. See the [module](self) docs.
///
/// Sending methods queue and return at once; [`Client::sender`] gives a cloneable handle for
/// sending from other tasks while this one reads events.
pub struct Client {
    sender: ClientSender,
    events: mpsc::Receiver<Event>,
}

/// A cloneable handle that queues messages for a [`Client`]'s connection.
///
/// When the client and every sender are dropped, the background task closes the connection
/// (after sending what is queued, if connected) and ends.
#[derive(Clone)]
pub struct ClientSender {
    inner: Arc<Inner>,
}

struct Inner {
    queue: mpsc::Sender<ClientMessage>,
    capacity: usize,
    close: CancellationToken,
    finished: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close.cancel();
    }
}

impl Client {
    /// Checks `config` and starts the background task; returns at once (the connection comes
    /// up in the background, announced by [`Event::Connected`]). Must be called within a Tokio
    /// runtime.
    pub fn connect(config: ClientConfig) -> Result<Client, ConfigError> {
        if config.queue_capacity == 0 || config.event_buffer == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        let target = transport::Target::new(
            &config.url,
            config.token.as_deref(),
            config.extra_root_pem.as_deref(),
        )?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
        let (queue, commands) = mpsc::channel(config.queue_capacity);
        let (event_sender, events) = mpsc::channel(config.event_buffer);
        let close = CancellationToken::new();
        let finished = CancellationToken::new();
        let task = task::Task::new(
            target,
            &config,
            commands,
            event_sender,
            close.clone(),
            finished.clone(),
        );
        runtime.spawn(task.run());
        Ok(Client {
            sender: ClientSender {
                inner: Arc::new(Inner {
                    queue,
                    capacity: config.queue_capacity,
                    close,
                    finished,
                }),
            },
            events,
        })
    }

    /// The next event; `None` once the client is finished (closed, refused for good, or out of
    /// attempts) and every event before that was read.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// A handle for sending from elsewhere.
    pub fn sender(&self) -> ClientSender {
        self.sender.clone()
    }

    /// See [`ClientSender::send`].
    pub fn send(&self, message: ClientMessage) -> Result<(), ClientError> {
        self.sender.send(message)
    }

    /// See [`ClientSender::join_room`].
    pub fn join_room(&self, room: impl Into<String>) -> Result<(), ClientError> {
        self.sender.join_room(room)
    }

    /// See [`ClientSender::leave_room`].
    pub fn leave_room(&self, room: impl Into<String>) -> Result<(), ClientError> {
        self.sender.leave_room(room)
    }

    /// See [`ClientSender::room_message`].
    pub fn room_message(
        &self,
        room: impl Into<String>,
        message: impl Into<Value>,
    ) -> Result<(), ClientError> {
        self.sender.room_message(room, message)
    }

    /// See [`ClientSender::private_message`].
    pub fn private_message(
        &self,
        to: impl Into<String>,
        message: impl Into<Value>,
    ) -> Result<(), ClientError> {
        self.sender.private_message(to, message)
    }

    /// See [`ClientSender::broadcast`].
    pub fn broadcast(&self, message: impl Into<Value>) -> Result<(), ClientError> {
        self.sender.broadcast(message)
    }

    /// See [`ClientSender::set_metadata`].
    pub fn set_metadata(&self, metadata: Map<String, Value>) -> Result<(), ClientError> {
        self.sender.set_metadata(metadata)
    }

    /// See [`ClientSender::close`]. Events that arrive meanwhile can still be read afterwards.
    pub async fn close(&self) {
        self.sender.close().await
    }

    /// See [`ClientSender::is_closed`].
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

impl futures_util::Stream for Client {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().events.poll_recv(cx)
    }
}

impl ClientSender {
    /// Queues any message. Fails at once when the queue is full or the client is closed.
    pub fn send(&self, message: ClientMessage) -> Result<(), ClientError> {
        if self.inner.close.is_cancelled() {
            return Err(ClientError::Closed);
        }
        self.inner.queue.try_send(message).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ClientError::QueueFull {
                capacity: self.inner.capacity,
            },
            mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
        })
    }

    /// Joins `room` (the server answers with a `room_joined` event); the client joins it again
    /// after every reconnection until [`leave_room`](Self::leave_room).
    pub fn join_room(&self, room: impl Into<String>) -> Result<(), ClientError> {
        self.send(ClientMessage::join(room))
    }

    /// Leaves `room` (no reply).
    pub fn leave_room(&self, room: impl Into<String>) -> Result<(), ClientError> {
        self.send(ClientMessage::LeaveRoom { room: room.into() })
    }

    /// Sends `message` (a string or any JSON value) to the other members of `room`.
    pub fn room_message(
        &self,
        room: impl Into<String>,
        message: impl Into<Value>,
    ) -> Result<(), ClientError> {
        self.send(ClientMessage::RoomMessage {
            room: room.into(),
            message: message.into(),
        })
    }

    /// Sends `message` to the client (or, with token auth, every connection of the user) `to`.
    pub fn private_message(
        &self,
        to: impl Into<String>,
        message: impl Into<Value>,
    ) -> Result<(), ClientError> {
        self.send(ClientMessage::PrivateMessage {
            to: to.into(),
            message: message.into(),
        })
    }

    /// Sends `message` to every other connected client.
    pub fn broadcast(&self, message: impl Into<Value>) -> Result<(), ClientError> {
        self.send(ClientMessage::Broadcast {
            message: message.into(),
        })
    }

    /// Merges `metadata` over this client's metadata (the server answers with
    /// `metadata_updated`); the merged whole is sent again after every reconnection.
    pub fn set_metadata(&self, metadata: Map<String, Value>) -> Result<(), ClientError> {
        self.send(ClientMessage::SetMetadata { metadata })
    }

    /// Ends the client: if connected, sends what is queued and closes the connection (1000),
    /// waiting up to two seconds for the server's reply; if not, drops what is queued. Returns
    /// when the background task has finished; sending afterwards gives [`ClientError::Closed`].
    pub async fn close(&self) {
        self.inner.close.cancel();
        self.inner.finished.cancelled().await;
    }

    /// Whether the client was closed or has given up.
    pub fn is_closed(&self) -> bool {
        self.inner.close.is_cancelled() || self.inner.finished.is_cancelled()
    }
}
