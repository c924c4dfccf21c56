//! One WebSocket connection after the upgrade, served by one task that both reads and writes.
//!
//! Why one hand-polled task instead of a reader task and a writer task: an idle connection
//! should cost as little memory as possible. This task owns no read buffer (it reads into a
//! per-thread scratch buffer and keeps only a frame that a read cut off), no write buffer
//! (the outbox gathers frames in a per-thread batch and keeps only what the socket refused),
//! and no timers or futures while open. When woken it
//! 1. starts closing if someone asked it to (slow consumer, shutdown),
//! 2. writes everything queued in vectored writes ([`OutboxReceiver::poll_flush`]),
//! 3. reads what arrived and hands each message to the connection's [`Protocol`] (the seed
//!    protocol's [`super::commands::Session`], the echo, ...),
//!
//! and loops until both the socket and the queue have nothing for it. Replies, pongs and the
//! close frame go through the outbox like any other frame, which keeps one order for everything
//! a client receives.
//!
//! Closing: the task leaves every room and the directory at once, writes what the close
//! request keeps plus the close frame, shuts its write side, then reads until the peer answers
//! with its close frame or closes its side (so our close frame is not lost to a TCP reset),
//! all under `--drain-timeout`. Only such a completed close handshake ends with a graceful FIN:
//! a connection that ends any other way (the deadline passed with our close frame or the
//! peer's unsent, EOF or an error instead of the peer's close frame, the task dropped) is
//! reset, so a peer that stopped reading cannot keep its socket's send buffer in the kernel
//! (FIN-WAIT-1) after the connection is gone. See [`Transport`].

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tracing::{debug, debug_span, info};

use super::frame::{Event, FrameError, FrameReader, PeerClose};
use super::protocol::{Opening, Protocol, Route};
use super::transport::Transport;
use crate::admission::{Identity, Permit};
use crate::node::Node;
use crate::outbox::{self, CloseRequest, OutboxReceiver};
use crate::protocol::{self, close_code};

/// A connection's opening or closing line: `info` under `--log-connections`, else `debug`.
macro_rules! log_connection {
    ($on:expr, $($line:tt)+) => {
        if $on {
            info!($($line)+)
        } else {
            debug!($($line)+)
        }
    };
}

/// Source of process-unique connection numbers.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Bytes one socket read may take. Per thread, shared by every connection the thread serves.
const SCRATCH_SIZE: usize = 64 * 1024;

/// Socket reads one wake-up may do before the task yields, so a client that sends without
/// pause cannot keep a worker thread to itself.
const READS_PER_POLL: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// A fresh, unguessable client id: `client_` and 128 random bits in hex. The seed's
/// `uniqid()` is time-based and guessable, and the id is the only address of private messages.
fn new_client_id() -> Arc<str> {
    format!("client_{:032x}", rand::random::<u128>()).into()
}

/// Sets up one upgraded connection and returns the future that serves it until it closes, to
/// be spawned as the connection's task. `response` is the 101 when the HTTP layer left it to
/// the connection (it then goes out in the same write as the welcome). `prebuffered` holds
/// bytes the HTTP layer read past the upgrade request; they are the start of the WebSocket
/// stream. `permit` holds the
/// connection's place under the connection caps until it ends.
///
/// The task is a plain struct rather than an `async` block: an idle connection's task holds
/// exactly this ([`ConnectionTask`], guarded in the tests), where an `async fn` chain from the
/// upgrade to here kept every argument and intermediate state alive beside the connection
/// (1,256 bytes measured, against 512 for the connection itself).
#[allow(clippy::too_many_arguments)]
pub fn start<S, P>(
    io: S,
    handshake: Handshake,
    prebuffered: Bytes,
    ctx: Arc<Node>,
    peer: SocketAddr,
    permit: Permit,
    identity: Identity,
    route: Route,
) -> ConnectionTask<S, P>
where
    S: AsyncRead + AsyncWrite + Transport + Unpin,
    P: Protocol,
{
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let client_id = new_client_id();
    // Only a connection whose lines are logged keeps what they need (the closing line's
    // fields, and a debug span: with RUST_LOG=roomcast=debug every line of a connection
    // carries its id); at the default level an idle connection keeps an empty pointer.
    let log = (ctx.config.log_connections || tracing::enabled!(tracing::Level::DEBUG)).then(|| {
        Box::new(ConnectionLog {
            client_id: client_id.clone(),
            peer,
            opened: Instant::now(),
            span: debug_span!("conn", id = %client_id),
        })
    });
    let _entered = log.as_ref().map(|log| log.span.enter());
    log_connection!(ctx.config.log_connections, client_id = %client_id, %peer, user_id = ?identity.user_id, protocol = P::NAME, "connection opened");
    let mut connection = Connection::open(
        io,
        handshake,
        ctx,
        conn,
        client_id.clone(),
        identity,
        permit,
        route,
    );
    if !prebuffered.is_empty() {
        let mut prebuffered = prebuffered.to_vec();
        if let Some(end) = connection.on_bytes(&mut prebuffered) {
            connection.end_reading(end);
        }
    }
    drop(_entered);
    ConnectionTask { connection, log }
}

/// What the opening handshake settled for a connection.
pub struct Handshake {
    /// The 101 response, when the connection's task writes it (with its first frames); `None`
    /// when hyper wrote it.
    pub response: Option<Bytes>,
    /// permessage-deflate was negotiated (see [`super::deflate`]).
    pub deflate: bool,
}

/// The task of one connection: the connection itself, and what its log lines need when they
/// are logged.
pub struct ConnectionTask<S: Transport, P: Protocol> {
    connection: Connection<S, P>,
    log: Option<Box<ConnectionLog>>,
}

/// What a logged connection's closing line and debug span need.
struct ConnectionLog {
    client_id: Arc<str>,
    peer: SocketAddr,
    opened: Instant,
    span: tracing::Span,
}

impl<S: AsyncRead + AsyncWrite + Transport + Unpin, P: Protocol> Future for ConnectionTask<S, P> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let _entered = this.log.as_ref().map(|log| log.span.enter());
        ready!(this.connection.poll(cx));
        if let Some(log) = &this.log {
            log_connection!(
                this.connection.handler.node().config.log_connections,
                client_id = %log.client_id,
                peer = %log.peer,
                reason = %this.connection.ended_by(),
                duration_ms = log.opened.elapsed().as_millis() as u64,
                reset = this.connection.resets(),
                "connection closed"
            );
        }
        Poll::Ready(())
    }
}

/// Why a connection ended, for its closing log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndedBy {
    /// The client sent a close frame with this code.
    Peer(Option<u16>),
    /// The client broke RFC 6455 or a limit.
    Violation(FrameError),
    /// Someone asked the connection to close with this code (shutdown, slow consumer,
    /// heartbeat, rate limit).
    Request(Option<u16>),
    /// The TCP connection ended or failed without a close handshake.
    Lost,
}

impl std::fmt::Display for EndedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndedBy::Peer(code) => write!(f, "client closed ({})", code.unwrap_or(1005)),
            EndedBy::Violation(error) => write!(f, "{error} ({})", error.close_code()),
            EndedBy::Request(code) => {
                let why = match code.unwrap_or(0) {
                    close_code::GOING_AWAY => "server shutting down",
                    close_code::TRY_AGAIN_LATER => "slow consumer",
                    close_code::POLICY_VIOLATION => "rate limit flood",
                    close_code::IDLE_TIMEOUT => "idle timeout",
                    close_code::TOKEN_EXPIRED => "token expired",
                    _ => "closed by the server",
                };
                write!(f, "{why} ({})", code.unwrap_or(1005))
            }
            EndedBy::Lost => f.write_str("connection lost"),
        }
    }
}

/// `None` while open; closing, boxed: every open connection pays for the field.
type State = Option<Box<Closing>>;

struct Connection<S: Transport, P: Protocol> {
    io: S,
    reader: FrameReader,
    outbox: OutboxReceiver,
    /// The protocol it speaks: what its messages mean.
    handler: P,
    state: State,
    /// The connection's place under `--max-connections` and `--max-connections-per-ip`, held
    /// until the task ends and the socket is closed or reset: a connection that is still
    /// closing (up to `--drain-timeout`) keeps counting, so clients cannot open new ones while
    /// their old sockets still hold server memory.
    _permit: Permit,
}

/// Writing the close frame (`finished` once written and the write side shut), then waiting
/// for the peer to go, until `deadline`.
struct Closing {
    deadline: Pin<Box<Sleep>>,
    finished: bool,
    /// The close handshake completed: the socket closes gracefully. Every other state at drop
    /// resets it.
    completed: bool,
    /// What began the close; the peer's own close frame makes its EOF complete the handshake.
    ended_by: EndedBy,
    /// Answers once other nodes can no longer reach this client (a cluster broker); the close
    /// frame waits for it.
    unreachable: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// What reading stopped on.
enum ReadEnd {
    /// The peer sent a close frame: echo it.
    PeerClosed(PeerClose),
    /// The peer broke RFC 6455 or a limit: close with the matching code.
    Violation(FrameError),
    /// The transport is gone (EOF or error): nothing more can be sent.
    Gone,
}

impl<S: AsyncRead + AsyncWrite + Transport + Unpin, P: Protocol> Connection<S, P> {
    #[allow(clippy::too_many_arguments)]
    fn open(
        io: S,
        handshake: Handshake,
        ctx: Arc<Node>,
        conn: u64,
        client_id: Arc<str>,
        identity: Identity,
        permit: Permit,
        route: Route,
    ) -> Self {
        let config = &ctx.config;
        let limits = outbox::QueueLimits {
            frames: config.outbound_queue,
            bytes: config.outbound_queue_bytes,
        };
        let (own_outbox, mut outbox) =
            outbox::outbox(limits, config.slow_consumer, ctx.outbox_stats.clone());
        let reader = if handshake.deflate {
            outbox.compress_from(config.compression_min_size);
            FrameReader::with_deflate(config.max_frame_size, config.max_message_size)
        } else {
            FrameReader::new(config.max_frame_size, config.max_message_size)
        };
        if let Some(response) = handshake.response {
            outbox.push_handshake_response(response);
        }
        let handler = P::open(Opening {
            node: &ctx,
            conn,
            client_id,
            identity,
            outbox: own_outbox,
            writer: &mut outbox,
            route,
        });
        // A shutdown that began while this client was upgrading has not seen it in the hub's
        // lists: close it here.
        if ctx.closing.is_cancelled() {
            handler.outbox().request_close(going_away());
        }
        Self {
            io,
            reader,
            outbox,
            handler,
            state: None,
            _permit: permit,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut reads = 0;
        loop {
            match &mut self.state {
                None => {
                    if let Some(request) = self.outbox.poll_close_request(cx) {
                        // A reason the server API gave, else the code's own.
                        let given = self
                            .handler
                            .node()
                            .close_reasons
                            .remove(&self.handler.conn());
                        let reason = given.as_ref().map_or_else(
                            || close_code::reason(request.code),
                            |(_, reason)| &**reason,
                        );
                        self.start_closing(request, reason, EndedBy::Request(request.code));
                        continue;
                    }
                    self.outbox.queue_requested_ping(protocol::empty_ping);
                    let may_read = self.handler.poll_waiting(cx);
                    match self.outbox.poll_flush(cx, &mut self.io) {
                        Poll::Ready(Err(error)) => {
                            debug!(%error, "write failed");
                            return Poll::Ready(());
                        }
                        Poll::Ready(Ok(())) | Poll::Pending => {}
                    }
                    if !may_read {
                        // Waiting on the application with a full backlog: its verdict wakes
                        // the task (the outbox's close request and flush are registered too).
                        return Poll::Pending;
                    }
                    if reads == READS_PER_POLL {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    reads += 1;
                    match self.poll_read(cx) {
                        Poll::Pending => return Poll::Pending,
                        // Frames were handled: flush the replies they queued, read on.
                        Poll::Ready(None) => continue,
                        Poll::Ready(Some(end)) => {
                            if !self.end_reading(end) {
                                return Poll::Ready(());
                            }
                        }
                    }
                }
                Some(closing) => {
                    let Closing {
                        deadline,
                        finished,
                        completed,
                        ended_by,
                        unreachable,
                    } = &mut **closing;
                    if *completed {
                        return Poll::Ready(());
                    }
                    // Ending in `Closing` resets the socket (see `Drop`).
                    if deadline.as_mut().poll(cx).is_ready() {
                        debug!("close did not complete in time: resetting");
                        return Poll::Ready(());
                    }
                    // The close frame goes out once other nodes can no longer reach us.
                    if let Some(gone) = unreachable {
                        ready!(Pin::new(gone).poll(cx)).ok();
                        *unreachable = None;
                    }
                    if !*finished {
                        match self.outbox.poll_finish(cx, &mut self.io) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Err(_)) => return Poll::Ready(()),
                            Poll::Ready(Ok(())) => *finished = true,
                        }
                    }
                    let peer_closed = matches!(ended_by, EndedBy::Peer(_));
                    let end = ready!(poll_until_peer_closes(cx, &mut self.io, &mut self.reader));
                    if end == PeerEnd::CloseFrame || (end == PeerEnd::Eof && peer_closed) {
                        *completed = true;
                    } else {
                        debug!(?end, "peer left without its close frame: resetting");
                    }
                    return Poll::Ready(());
                }
            }
        }
    }

    /// Acts on why reading stopped: starts the close handshake, or returns false when the
    /// transport is gone and the task should end.
    fn end_reading(&mut self, end: ReadEnd) -> bool {
        match end {
            ReadEnd::PeerClosed(close) => {
                // The echo carries the peer's code and no reason of ours.
                self.start_closing(
                    CloseRequest {
                        code: close.code,
                        flush: true,
                    },
                    "",
                    EndedBy::Peer(close.code),
                );
                true
            }
            ReadEnd::Violation(error) => {
                // Replies to the frames before the bad one still go out first.
                self.start_closing(
                    CloseRequest {
                        code: Some(error.close_code()),
                        flush: true,
                    },
                    &error.to_string(),
                    EndedBy::Violation(error),
                );
                true
            }
            ReadEnd::Gone => false,
        }
    }

    /// One socket read into the per-thread scratch buffer, and the frames it completed.
    /// `Ready(None)`: bytes were handled, read again.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<ReadEnd>> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(error)) => {
                    debug!(%error, "read failed");
                    Poll::Ready(Some(ReadEnd::Gone))
                }
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    if n == 0 {
                        return Poll::Ready(Some(ReadEnd::Gone));
                    }
                    let now = self.handler.node().clock.now();
                    self.handler.outbox().touch(now);
                    Poll::Ready(self.on_bytes(&mut scratch[..n]))
                }
            }
        })
    }

    /// Handles every frame `bytes` completes.
    fn on_bytes(&mut self, bytes: &mut [u8]) -> Option<ReadEnd> {
        let handler = &mut self.handler;
        let result = self.reader.feed(bytes, &mut |event| match event {
            Event::Message { binary, payload } => handler.on_message(binary, payload),
            Event::Ping(payload) => {
                handler.outbox().push(protocol::pong(payload));
            }
        });
        match result {
            Ok(None) => None,
            Ok(Some(close)) => Some(ReadEnd::PeerClosed(close)),
            Err(error) => Some(ReadEnd::Violation(error)),
        }
    }

    /// Whether dropping the connection resets the socket: anything but a completed close
    /// handshake.
    fn resets(&self) -> bool {
        !self.state.as_ref().is_some_and(|closing| closing.completed)
    }

    /// Why the connection ended, for its closing line: what began its close, or a lost
    /// transport when it ended without one.
    fn ended_by(&self) -> EndedBy {
        self.state
            .as_ref()
            .map_or(EndedBy::Lost, |closing| closing.ended_by)
    }

    /// `reason` goes in the close frame (at most 123 bytes by RFC 6455; ours are short).
    fn start_closing(&mut self, request: CloseRequest, reason: &str, ended_by: EndedBy) {
        // Leave rooms and the directory now: members learn at once, and nothing more is
        // queued for a connection that is going.
        let unreachable = self.handler.disconnect();
        self.outbox
            .begin_close(request, protocol::close(request.code, reason));
        self.state = Some(Box::new(Closing {
            deadline: Box::pin(tokio::time::sleep(self.handler.node().config.drain_timeout)),
            finished: false,
            completed: false,
            ended_by,
            unreachable,
        }));
    }
}

impl<S: Transport, P: Protocol> Drop for Connection<S, P> {
    fn drop(&mut self) {
        // Whatever ended the task (error, EOF, runtime shutdown, a panic), the connection
        // leaves its rooms and the directory. `disconnect` is idempotent.
        let _ = self.handler.disconnect();
        // A reason given for a close this connection never got to write.
        self.handler
            .node()
            .close_reasons
            .remove(&self.handler.conn());
        // Unless the close handshake completed, the peer may not be reading: reset rather
        // than leave the kernel a FIN to deliver behind an unread send buffer. The socket
        // itself closes when `io` drops, after this; `_permit` goes with it.
        if !self.state.as_ref().is_some_and(|closing| closing.completed) {
            self.io.reset_on_drop();
        }
    }
}

/// The shutdown close: 1001 Going Away, after flushing what is queued.
pub fn going_away() -> CloseRequest {
    CloseRequest {
        code: Some(close_code::GOING_AWAY),
        flush: true,
    }
}

/// How the peer left a closing connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerEnd {
    /// Its close frame (after ours, or a second one).
    CloseFrame,
    /// EOF: it closed its side.
    Eof,
    /// A read error or a protocol violation.
    Broken,
}

/// Reads until the peer answers our close frame with its own, closes its side, or breaks the
/// protocol; data frames that were already on their way are discarded.
fn poll_until_peer_closes<S: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    io: &mut S,
    reader: &mut FrameReader,
) -> Poll<PeerEnd> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        for _ in 0..READS_PER_POLL {
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    let n = buf.filled().len();
                    match reader.feed(&mut scratch[..n], &mut |_| {}) {
                        Ok(None) => continue,
                        Ok(Some(_)) => return Poll::Ready(PeerEnd::CloseFrame),
                        Err(_) => return Poll::Ready(PeerEnd::Broken),
                    }
                }
                Poll::Ready(Ok(())) => return Poll::Ready(PeerEnd::Eof),
                Poll::Ready(Err(_)) => return Poll::Ready(PeerEnd::Broken),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::commands::Session;

    /// The connection state is what every idle connection pays for (with the tokio task header,
    /// the socket's registration and its outbound queue). Guard it against silent growth.
    #[test]
    fn connection_state_stays_small() {
        type Socket = crate::poller::Socket;
        // mio keeps a selector id in every socket in debug builds: 8 bytes more there.
        let debug = if cfg!(debug_assertions) { 8 } else { 0 };
        let size = std::mem::size_of::<Connection<Socket, Session>>();
        println!("Connection<Socket> is {size} bytes");
        assert!(size <= 264 + debug, "Connection is {size} bytes");
        // The whole task's future: the connection plus an empty pointer for its log lines.
        // tokio's task cell is 128-byte aligned; with the task tracker's 8-byte token, a
        // future of at most 272 bytes makes a 384-byte cell, one more byte a 512-byte one
        // (measured with tokio 1.54).
        let size = std::mem::size_of::<ConnectionTask<Socket, Session>>();
        println!("ConnectionTask<Socket> is {size} bytes");
        assert!(size <= 272 + debug, "ConnectionTask is {size} bytes");
    }
}
