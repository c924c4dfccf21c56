//! Listening, accepting and HTTP: one SO_REUSEPORT listener per worker, each with the
//! [`crate::poller`] that its accepted sockets read and write through, admission at accept,
//! the first request head read by [`crate::handshake`] (which answers WebSocket upgrades
//! itself), hyper for every other HTTP/1.1 request, and the hand-off of upgraded connections
//! to [`crate::ws::session`].

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admission::{Admission, Permit, Refusal};
use crate::api::webhooks::{WebhookSender, Webhooks};
use crate::api::{self, closing, proxy};
use crate::config::Config;
use crate::handshake::{self, Prefixed};
use crate::heartbeat::{self, Heartbeat};
use crate::hub::{LocalHub, Router};
use crate::node::Node;
use crate::outbox::OutboxStats;
use crate::poller::{self, Poller, PollerTask};
use crate::proxy_protocol;
use crate::tls;
use crate::ws;
use crate::ws::protocol::Route;
use crate::ws::session::Handshake;
use crate::ws::transport::Transport;

/// Refusals at accept that may be written at once, each by a small task for up to a second;
/// past this many (a flood), refused connections are closed without an answer.
const MAX_LINGERING_REFUSALS: usize = 1024;

/// How long a refusal at accept waits for the client to take the answer and close.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Connection backlog of each listener: generous, so a reconnect storm is queued by the kernel
/// rather than refused.
const LISTEN_BACKLOG: i32 = 4096;

/// What the server's own tasks share: the [`Node`] that sessions and endpoints see, and what
/// only the server needs (TLS, the stop signal, the task tracker).
pub struct Context {
    pub node: Arc<Node>,
    /// Set when serving wss://.
    pub tls: Option<TlsAcceptor>,
    /// Cancelled by the owner to stop the server (SIGTERM). The server then turns unready and
    /// keeps serving for `--shutdown-delay` before `node.closing`.
    pub shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Refusals at accept still being written (see [`refuse_at_accept`]).
    refusing: std::sync::atomic::AtomicUsize,
}

/// A view of a running server's state.
#[derive(Clone)]
pub struct ServerHandle {
    ctx: Arc<Context>,
}

impl ServerHandle {
    /// The routing state (rooms, directory).
    pub fn router(&self) -> &dyn Router {
        &*self.ctx.node.router
    }

    /// Slow-consumer counters.
    pub fn outbox_stats(&self) -> &OutboxStats {
        &self.ctx.node.outbox_stats
    }
}

/// One SO_REUSEPORT listener and the epoll instance of the connections it accepts.
struct Listener {
    socket: AsyncFd<mio::net::TcpListener>,
    poller: Poller,
    poller_task: PollerTask,
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    listeners: Vec<Listener>,
    local_addr: SocketAddr,
    ctx: Arc<Context>,
    /// The task that delivers webhooks, started by `run`; `None` without `--webhook-url`.
    webhook_sender: Option<WebhookSender>,
}

impl Server {
    /// Binds `config.workers` listeners to `config.listen` with SO_REUSEPORT, so the kernel
    /// spreads incoming connections over them. With port 0, the first listener picks the port
    /// and the others join it. Must be called inside a tokio runtime. Rooms and clients live
    /// in this process ([`LocalHub`]).
    pub fn bind(config: Config, shutdown: CancellationToken) -> io::Result<Self> {
        // With Redis, history lives there (the broker's); alone, in the hub.
        let kept_here = config.broker() == crate::broker::BrokerKind::Memory;
        let hub = LocalHub::with_history(config.history_policy().filter(|_| kept_here));
        Self::bind_with_router(config, shutdown, Arc::new(hub))
    }

    /// [`bind`](Self::bind) with the given [`Router`]: where a multi-node backplane plugs in.
    pub fn bind_with_router(
        config: Config,
        shutdown: CancellationToken,
        router: Arc<dyn Router>,
    ) -> io::Result<Self> {
        config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        ensure_port_is_free(config.listen)?;
        let first = reuseport_listener(&config, config.listen)?;
        let local_addr = first.socket.get_ref().local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..config.workers {
            listeners.push(reuseport_listener(&config, local_addr)?);
        }
        let admission = Admission::from_config(&config)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(
                tls::acceptor(cert, key)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            ),
            _ => None,
        };
        let metrics = crate::metrics::Metrics::new();
        let (webhooks, webhook_sender) = match Webhooks::from_config(&config, metrics.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        {
            Some((webhooks, sender)) => (Some(Arc::new(webhooks)), Some(sender)),
            None => (None, None),
        };
        let node = Arc::new(Node::new(config, router, admission, metrics, webhooks));
        // Other nodes' questions (the server API's listings) are answered by this node's.
        let responder: std::sync::Weak<dyn crate::broker::query::Responder> =
            Arc::downgrade(&node) as _;
        node.broker.answer_queries_with(responder);
        let ctx = Arc::new(Context {
            node,
            tls,
            shutdown,
            tasks: TaskTracker::new(),
            refusing: Default::default(),
        });
        Ok(Self {
            listeners,
            local_addr,
            ctx,
            webhook_sender,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stays valid while [`run`](Server::run) owns the server: for embedders and
    /// tests that want to look inside.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            ctx: self.ctx.clone(),
        }
    }

    /// Accepts and serves until the shutdown token is cancelled, then closes every client with
    /// 1001 (Going Away), waits up to the drain timeout for them and, within the same deadline,
    /// for the webhooks to deliver what they queued (the drained connections' last events
    /// included), and returns.
    pub async fn run(self) {
        let Server {
            listeners,
            ctx,
            local_addr,
            webhook_sender,
        } = self;
        info!(
            addr = %local_addr,
            tls = ctx.tls.is_some(),
            workers = listeners.len(),
            max_connections = ctx.node.admission.max_connections(),
            broker = ?ctx.node.config.broker(),
            "roomcast listening"
        );
        let heartbeat = tokio::spawn(heartbeat::run(
            Heartbeat {
                ping_interval: ctx.node.config.ping_interval,
                idle_timeout: ctx.node.config.idle_timeout,
                check_expiry: ctx.node.admission.auth_enabled(),
            },
            ctx.node.clock.clone(),
            ctx.node.router.clone(),
            ctx.node.closing.clone(),
        ));
        let upkeep = tokio::spawn(metrics_upkeep(ctx.clone()));
        // Not stopped by `closing` like the tasks above: it delivers through the drain, and is
        // told when no more events can come (`webhooks_done`).
        let webhooks_done = CancellationToken::new();
        let webhooks = webhook_sender.map(|sender| {
            info!(host = sender.host(), "webhooks on");
            tokio::spawn(sender.run(webhooks_done.clone()))
        });
        // The Pusher apps' webhooks, on the same terms.
        let pusher_webhooks = TaskTracker::new();
        if let Some(apps) = &ctx.node.pusher {
            for sender in apps.take_webhook_senders() {
                info!(host = sender.host(), "pusher app webhooks on");
                pusher_webhooks.spawn(sender.run(webhooks_done.clone()));
            }
        }
        pusher_webhooks.close();
        let accept_loops = TaskTracker::new();
        // The pollers serve their connections through the drain, and end after it.
        let pollers_done = CancellationToken::new();
        for listener in listeners {
            tokio::spawn(listener.poller_task.run(pollers_done.clone()));
            accept_loops.spawn(accept_loop(listener.socket, listener.poller, ctx.clone()));
        }
        accept_loops.close();
        let _pollers_done = pollers_done.drop_guard();

        ctx.shutdown.cancelled().await;
        ctx.node.ready.store(false, Ordering::Release);
        let delay = ctx.node.config.shutdown_delay;
        if !delay.is_zero() {
            info!(
                ?delay,
                "shutdown requested: /readyz answers 503, still serving until the delay ends"
            );
            tokio::time::sleep(delay).await;
        }
        ctx.node.closing.cancel();
        accept_loops.wait().await;
        let _ = heartbeat.await;
        let _ = upkeep.await;

        ctx.tasks.close();
        let open = ctx.tasks.len();
        info!(
            open,
            "shutting down: closing connections with 1001 (Going Away)"
        );
        // Connections still in the HTTP phase stop through hyper's graceful shutdown; upgraded
        // ones are told here, and one upgraded after this point closes itself on start.
        ctx.node.router.for_each_connection(&mut |connection| {
            connection.outbox().request_close(ws::session::going_away());
        });
        let deadline = tokio::time::Instant::now() + ctx.node.config.drain_timeout;
        if tokio::time::timeout_at(deadline, ctx.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                left = ctx.tasks.len(),
                "drain timeout reached with connections still open"
            );
        }
        if let Some(mut webhooks) = webhooks {
            // The drained connections have queued their member_left and client_disconnected:
            // the sender delivers what is queued, within what is left of the drain's deadline.
            webhooks_done.cancel();
            if tokio::time::timeout_at(deadline, &mut webhooks)
                .await
                .is_err()
            {
                webhooks.abort();
                let undelivered = ctx
                    .node
                    .webhooks
                    .as_ref()
                    .map_or(0, |webhooks| webhooks.undelivered());
                warn!(
                    undelivered,
                    "drain timeout reached with webhook events undelivered"
                );
            }
        }
        webhooks_done.cancel();
        if tokio::time::timeout_at(deadline, pusher_webhooks.wait())
            .await
            .is_err()
        {
            let undelivered = ctx
                .node
                .pusher
                .as_ref()
                .map_or(0, |apps| apps.undelivered_hooks());
            warn!(
                undelivered,
                "drain timeout reached with pusher webhook events undelivered"
            );
        }
    }
}

/// Folds recorded histogram samples into buckets every few seconds, so that they do not pile
/// up between scrapes (or forever, without a scraper).
async fn metrics_upkeep(ctx: Arc<Context>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(5));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.node.closing.cancelled() => return,
            _ = ticks.tick() => ctx.node.metrics.upkeep(),
        }
    }
}

/// SO_REUSEPORT lets a second server started on the same port by mistake share it silently,
/// the kernel splitting connections between the two. A plain bind (without SO_REUSEPORT) fails
/// while anyone listens there, so try one first and refuse to start.
fn ensure_port_is_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|error| {
        if error.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{addr} is already in use (is another roomcast running?)"),
            )
        } else {
            error
        }
    })
}

fn reuseport_listener(config: &Config, addr: SocketAddr) -> io::Result<Listener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    ws::transport::configure_listener(&socket, config.socket_send_buffer, config.defer_accept)?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    let listener = mio::net::TcpListener::from_std(socket.into());
    let (poller, poller_task) = Poller::new()?;
    // SAFETY: the mio listener owns its descriptor for as long as it lives, and the `AsyncFd`
    // owns the listener.
    let socket =
        unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE)? };
    Ok(Listener {
        socket,
        poller,
        poller_task,
    })
}

/// The next connection: accept4(2) gives it non-blocking, registered nowhere yet.
async fn accept(
    listener: &AsyncFd<mio::net::TcpListener>,
) -> io::Result<(mio::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|listener| listener.get_ref().accept()) {
            return accepted;
        }
    }
}

async fn accept_loop(listener: AsyncFd<mio::net::TcpListener>, poller: Poller, ctx: Arc<Context>) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.node.closing.cancelled() => return,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                // No Nagle (the outbox batches frames) and the kernel memory a client that
                // stops reading can hold (--socket-send-buffer): inherited from the listener
                // where the system does so, else set here.
                let bytes = ctx.node.config.socket_send_buffer;
                if let Err(error) = ws::transport::configure_accepted(&stream, bytes) {
                    debug!(%peer, %error, "socket options not set");
                }
                let stream = match poller.register(stream) {
                    Ok(stream) => stream,
                    Err(error) => {
                        warn!(%peer, %error, "accepted connection not registered");
                        continue;
                    }
                };
                // Counted from here: a connection that never finishes its request holds a
                // place like any other.
                match ctx.node.admission.accept(peer.ip()) {
                    Ok(permit) => {
                        // One budget for the PROXY header, TLS and the request head.
                        let deadline =
                            tokio::time::Instant::now() + ctx.node.config.handshake_timeout;
                        ctx.tasks
                            .spawn(serve_tcp(stream, peer, permit, deadline, ctx.clone()));
                    }
                    Err(refusal) => {
                        ctx.node.metrics.refused(&refusal);
                        debug!(%peer, %refusal, "connection refused at accept");
                        refuse_at_accept(stream, &refusal, &ctx);
                    }
                }
            }
            Err(error) => {
                // Out of file descriptors or similar: back off instead of spinning, and keep
                // serving the connections we have.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Refuses a connection the caps have no place for. The answer is written by a small task
/// that then reads (and discards) what the client sent until it closes, for up to a second:
/// closing with unread bytes would send a reset that can overtake the answer. At most
/// [`MAX_LINGERING_REFUSALS`] at once; past that, and over TLS (nothing readable can be said
/// before a TLS handshake), the connection is just closed.
fn refuse_at_accept(stream: poller::Socket, refusal: &Refusal, ctx: &Arc<Context>) {
    let lingering = ctx.refusing.fetch_add(1, Ordering::AcqRel);
    if ctx.tls.is_some() || lingering >= MAX_LINGERING_REFUSALS {
        ctx.refusing.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let answer = handshake::refusal(refusal.status(), &refusal.to_string());
    let task_ctx = ctx.clone();
    ctx.tasks.spawn(async move {
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            use tokio::io::AsyncReadExt;
            handshake::write_and_close(&mut stream, &answer).await;
            let mut sink = [0u8; 512];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        task_ctx.refusing.fetch_sub(1, Ordering::AcqRel);
    });
}

/// One accepted TCP connection: the PROXY header from a trusted load balancer if it sends one,
/// TLS if configured, then HTTP.
async fn serve_tcp(
    mut stream: poller::Socket,
    peer: SocketAddr,
    mut permit: Permit,
    deadline: tokio::time::Instant,
    ctx: Arc<Context>,
) {
    let peer = if ctx.node.admission.is_trusted(peer.ip()) {
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        match proxy_protocol::client_address(&mut stream, peer, timeout).await {
            Ok(client) => client,
            Err(error) => {
                ctx.node.metrics.handshake_failures.increment(1);
                return debug!(%peer, %error, "PROXY header refused");
            }
        }
    } else {
        peer
    };
    // Behind a PROXY header the client's own address counts under the per-IP cap.
    if !ctx.node.admission.is_trusted(peer.ip()) {
        if let Err(refusal) = ctx.node.admission.claim_address(&mut permit, peer.ip()) {
            ctx.node.metrics.refused(&refusal);
            debug!(%peer, %refusal, "connection refused");
            if ctx.tls.is_none() {
                refuse(&mut stream, refusal.status(), &refusal.to_string(), &ctx).await;
            }
            return;
        }
    }
    match ctx.tls.clone() {
        None => serve_connection(stream, peer, permit, deadline, ctx).await,
        // Boxed, so plain connections do not carry room for the TLS state (see above).
        Some(acceptor) => Box::pin(serve_tls(acceptor, stream, peer, permit, deadline, ctx)).await,
    }
}

/// The TLS handshake, bounded by the handshake timeout like the HTTP request, then HTTP.
async fn serve_tls(
    acceptor: TlsAcceptor,
    stream: poller::Socket,
    peer: SocketAddr,
    permit: Permit,
    deadline: tokio::time::Instant,
    ctx: Arc<Context>,
) {
    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
    match handshake.await {
        Ok(Ok(tls_stream)) => serve_connection(tls_stream, peer, permit, deadline, ctx).await,
        Ok(Err(error)) => {
            ctx.node.metrics.handshake_failures.increment(1);
            debug!(%peer, %error, "TLS handshake failed");
        }
        Err(_) => {
            ctx.node.metrics.handshake_failures.increment(1);
            debug!(%peer, "TLS handshake timed out");
        }
    }
}

/// Reads the connection's first request head (bounded in size and time), then answers a
/// WebSocket upgrade itself or hands anything else to hyper.
async fn serve_connection<S>(
    mut io: S,
    peer: SocketAddr,
    mut permit: Permit,
    deadline: tokio::time::Instant,
    ctx: Arc<Context>,
) where
    S: AsyncRead + AsyncWrite + ws::transport::Transport + Unpin + Send + 'static,
{
    let max = ctx.node.config.max_request_head_size;
    let head = tokio::select! {
        head = tokio::time::timeout_at(deadline, handshake::read_head(&mut io, max)) => head,
        // A shutdown does not wait for clients still sending their request.
        _ = ctx.node.closing.cancelled() => return,
    };
    let head = match head {
        Ok(Ok(head)) => head,
        Ok(Err(error)) => {
            ctx.node.metrics.handshake_failures.increment(1);
            debug!(%peer, %error, "request head refused");
            if let Some(status) = error.status() {
                refuse(&mut io, status, &error.to_string(), &ctx).await;
            }
            return;
        }
        Err(_) => {
            ctx.node.metrics.handshake_failures.increment(1);
            return debug!(%peer, "request head timed out");
        }
    };
    permit.handshake_done();
    // Boxed: a future holds room for its largest stage, and hyper's connection state is
    // several KiB; unboxed, every pending handshake would carry it while it waits for its
    // head.
    if handshake::is_upgrade(&head.headers) {
        Box::pin(upgrade_direct(io, head, peer, permit, ctx)).await;
    } else {
        let io = Prefixed::new(head.into_bytes(), io);
        Box::pin(serve_http(io, peer, permit, ctx)).await;
    }
}

/// Answers `status` with a one-line `reason` and closes, within the drain timeout.
async fn refuse<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: StatusCode,
    reason: &str,
    ctx: &Context,
) {
    let answer = handshake::refusal(status, reason);
    let write = handshake::write_and_close(io, &answer);
    let _ = tokio::time::timeout(ctx.node.config.drain_timeout, write).await;
}

/// Completes a WebSocket handshake read by [`handshake::read_head`]: RFC 6455 checks,
/// admission, then the connection's task, which sends the 101 in its first write together
/// with the welcome.
async fn upgrade_direct<S>(
    mut io: S,
    head: handshake::Head,
    peer: SocketAddr,
    mut permit: Permit,
    ctx: Arc<Context>,
) where
    S: AsyncRead + AsyncWrite + ws::transport::Transport + Unpin + Send + 'static,
{
    let key = match handshake::check_upgrade(&head.method, head.version, &head.headers) {
        Ok(key) => key,
        Err(error) => {
            ctx.node.metrics.handshake_failures.increment(1);
            debug!(%peer, %error, "bad upgrade request");
            let reason = format!("bad upgrade request: {error}");
            return refuse(&mut io, error.status(), &reason, &ctx).await;
        }
    };
    let route = Route::of(&ctx.node, &head.uri);
    let mut identity = match ctx.node.admission.admit(
        &head.uri,
        &head.headers,
        peer,
        &mut permit,
        route.needs_token(),
    ) {
        Ok(identity) => identity,
        Err(refusal) => {
            ctx.node.metrics.refused(&refusal);
            debug!(%peer, %refusal, "upgrade refused");
            return refuse(&mut io, refusal.status(), &refusal.to_string(), &ctx).await;
        }
    };
    if route.asks_the_app() {
        let asked = proxy::on_upgrade(&ctx.node, &head.uri, &head.headers, peer, &mut identity);
        let verdict = tokio::select! {
            verdict = asked => verdict,
            _ = ctx.node.closing.cancelled() => return,
        };
        if let Err(refusal) = verdict {
            debug!(%peer, status = %refusal.status, "upgrade refused by the application");
            let answer =
                handshake::refusal_with(refusal.status, refusal.content_type, &refusal.body);
            let write = handshake::write_and_close(&mut io, &answer);
            let _ = tokio::time::timeout(ctx.node.config.drain_timeout, write).await;
            return;
        }
    }
    let extensions = handshake::extensions(&head.headers, ctx.node.config.compression);
    let response = handshake::switching_protocols(key, extensions);
    let prebuffered = Bytes::copy_from_slice(head.rest());
    drop(head);
    permit.upgraded();
    ctx.node.metrics.connections_accepted.increment(1);
    // Its own task, so that nothing of this one (the head, the timeout) stays alive beside
    // the connection.
    route.spawn(
        &ctx.tasks,
        io,
        Handshake {
            response: Some(response),
            deflate: extensions.is_some(),
        },
        prebuffered,
        ctx.node.clone(),
        peer,
        permit,
        identity,
    );
}

/// Serves HTTP/1.1 on one connection (plain or TLS) with hyper until it ends, or until it is
/// upgraded (a WebSocket asked for on a connection kept alive after another request).
async fn serve_http<S>(stream: Prefixed<S>, peer: SocketAddr, permit: Permit, ctx: Arc<Context>)
where
    S: AsyncRead + AsyncWrite + Transport + Unpin + Send + 'static,
{
    let service_ctx = ctx.clone();
    // The connection's permit, for the request that upgrades it (if any).
    let permit = Arc::new(std::sync::Mutex::new(Some(permit)));
    let service = service_fn(move |request| {
        let ctx = service_ctx.clone();
        let permit = permit.clone();
        async move { Ok::<_, Infallible>(route::<S>(request, peer, permit, ctx).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.node.config.handshake_timeout)
        // The direct path's limits for later requests too (hyper's buffer cannot be under
        // 8 KiB, its own minimum).
        .max_buf_size(ctx.node.config.max_request_head_size.max(8192))
        .max_headers(handshake::MAX_HEADERS)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = ctx.node.closing.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(%peer, %error, "http connection ended with an error");
    }
}

async fn route<S>(
    mut request: Request<Incoming>,
    peer: SocketAddr,
    permit: Arc<std::sync::Mutex<Option<Permit>>>,
    ctx: Arc<Context>,
) -> Response<Full<Bytes>>
where
    S: AsyncRead + AsyncWrite + Transport + Unpin + Send + 'static,
{
    if handshake::is_upgrade(request.headers()) {
        let route = Route::of(&ctx.node, request.uri());
        return upgrade::<S>(&mut request, peer, &permit, ctx, route).await;
    }
    api::respond(request, &ctx.node).await
}

/// An upgrade asked for on a connection hyper serves (one kept alive after a first plain
/// request): the same checks as [`upgrade_direct`], with hyper writing the 101. The
/// connection's permit stays in `slot` until the upgrade is certain, and a refusal closes the
/// connection (as on the direct path), so a refused upgrade never leaves a connection open
/// without its place under the caps.
async fn upgrade<S>(
    request: &mut Request<Incoming>,
    peer: SocketAddr,
    slot: &std::sync::Mutex<Option<Permit>>,
    ctx: Arc<Context>,
    route: Route,
) -> Response<Full<Bytes>>
where
    S: AsyncRead + AsyncWrite + Transport + Unpin + Send + 'static,
{
    if let Err(error) =
        handshake::check_upgrade(request.method(), request.version(), request.headers())
    {
        ctx.node.metrics.handshake_failures.increment(1);
        let mut response = closing(error.status(), &format!("bad upgrade request: {error}\n"));
        if error == handshake::UpgradeError::BadVersion {
            response.headers_mut().insert(
                "sec-websocket-version",
                hyper::header::HeaderValue::from_static("13"),
            );
        }
        return response;
    }
    let admitted = match slot.lock() {
        Err(_) => Err(closing(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error\n",
        )),
        Ok(mut slot) => match slot.as_mut() {
            None => Err(closing(
                StatusCode::BAD_REQUEST,
                "connection already upgraded\n",
            )),
            Some(permit) => ctx
                .node
                .admission
                .admit(
                    request.uri(),
                    request.headers(),
                    peer,
                    permit,
                    route.needs_token(),
                )
                .map_err(|refusal| {
                    ctx.node.metrics.refused(&refusal);
                    debug!(%peer, %refusal, "upgrade refused");
                    closing(refusal.status(), &format!("{refusal}\n"))
                }),
        },
    };
    let mut identity = match admitted {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    if route.asks_the_app() {
        let asked = proxy::on_upgrade(
            &ctx.node,
            request.uri(),
            request.headers(),
            peer,
            &mut identity,
        );
        if let Err(refusal) = asked.await {
            debug!(%peer, status = %refusal.status, "upgrade refused by the application");
            let mut response = api::with_type(refusal.body, refusal.content_type);
            *response.status_mut() = refusal.status;
            response.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            return response;
        }
    }
    let extensions = handshake::extensions(request.headers(), ctx.node.config.compression);
    let (mut response, upgrading) = match fastwebsockets::upgrade::upgrade(request) {
        Ok(pair) => pair,
        Err(error) => {
            ctx.node.metrics.handshake_failures.increment(1);
            return closing(
                StatusCode::BAD_REQUEST,
                &format!("bad upgrade request: {error}\n"),
            );
        }
    };
    let Some(mut permit) = slot.lock().ok().and_then(|mut slot| slot.take()) else {
        return closing(StatusCode::BAD_REQUEST, "connection already upgraded\n");
    };
    if let Some(extensions) = extensions {
        response.headers_mut().insert(
            hyper::header::SEC_WEBSOCKET_EXTENSIONS,
            hyper::header::HeaderValue::from_static(extensions),
        );
    }
    ctx.node.metrics.connections_accepted.increment(1);
    permit.upgraded();
    // This task only waits for hyper to hand the connection over, then spawns the
    // connection's own task (small, see ws::session::start) and ends.
    let tasks = ctx.tasks.clone();
    tasks.spawn(async move {
        let upgraded = match upgrading.await {
            Ok(websocket) => websocket.into_inner().into_inner(),
            Err(error) => {
                ctx.node.metrics.handshake_failures.increment(1);
                return debug!(%error, "upgrade failed");
            }
        };
        // We served hyper a `TokioIo<S>`, so that is what comes back. Bytes read past the
        // request (rare) are copied out: `read_buf` points into hyper's whole read buffer,
        // which an idle connection should not keep alive.
        match upgraded.downcast::<TokioIo<Prefixed<S>>>() {
            Ok(parts) => {
                let (unread, io) = parts.io.into_inner().into_parts();
                let mut prebuffered = Vec::with_capacity(unread.len() + parts.read_buf.len());
                prebuffered.extend_from_slice(&parts.read_buf);
                prebuffered.extend_from_slice(&unread);
                drop(parts.read_buf);
                route.spawn(
                    &ctx.tasks,
                    io,
                    Handshake {
                        response: None,
                        deflate: extensions.is_some(),
                    },
                    Bytes::from(prebuffered),
                    ctx.node.clone(),
                    peer,
                    permit,
                    identity,
                );
            }
            Err(_) => warn!("upgraded connection is not the stream we served"),
        }
    });
    response.map(|_| Full::default())
}
