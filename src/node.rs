//! The node: what a connection's session, the heartbeat and the HTTP endpoints may use of the
//! running server, and nothing of how it listens. It sits below [`crate::server`] (which owns
//! the listeners, TLS and the task tracker) so that [`crate::ws`] and the HTTP side depend on
//! it, not on the server, and the server on all of them: data flows one way.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::api::proxy::Proxies;
use crate::api::webhooks::{EventKind, Webhooks};
use crate::broker::{self, Broker};
use crate::config::Config;
use crate::heartbeat::CoarseClock;
use crate::hub::{Member, Router};
use crate::limits::SessionLimits;
use crate::metrics::Metrics;
use crate::outbox::OutboxStats;

/// The shared state of one running server.
pub struct Node {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    /// The heartbeat's clock: when each connection was last heard from.
    pub clock: Arc<CoarseClock>,
    pub admission: Arc<Admission>,
    pub session_limits: Arc<SessionLimits>,
    /// This node's rooms, directory and local delivery.
    pub router: Arc<dyn Router>,
    /// Where publications go: to the local hub, or (with a backplane) to every node.
    pub broker: Arc<dyn Broker>,
    pub outbox_stats: Arc<OutboxStats>,
    /// Cancelled when the server stops accepting and starts closing connections: a connection
    /// that finishes its upgrade after this closes itself at once.
    pub closing: CancellationToken,
    /// What `/readyz` answers: false from the moment shutdown begins.
    pub ready: AtomicBool,
    /// Close reasons the server API gave (`POST /api/disconnect`), by connection number, until
    /// the connection writes its close frame: only connections being disconnected that way
    /// have an entry, so the others pay nothing for the feature.
    pub close_reasons: DashMap<u64, Box<str>>,
    /// The application's proxies (`--connect-proxy`, `--join-proxy`, `--publish-proxy`), when
    /// any is configured.
    pub proxies: Option<Arc<Proxies>>,
    /// The webhooks' queue (`--webhook-url`), made by the server with the task that empties
    /// it; `None` without webhooks. Emit through [`Node::webhook`]. The broker holds it too,
    /// for the room events it counts cluster-wide.
    pub webhooks: Option<Arc<Webhooks>>,
    /// The Pusher apps (`--pusher-app`); `None`: the Pusher endpoint is off.
    pub pusher: Option<Arc<crate::pusher::Apps>>,
}

impl Node {
    /// A node for `config` delivering through `router`, with its admission policy built, its
    /// webhooks (made with `metrics`) and the broker the configuration names.
    pub fn new(
        config: Config,
        router: Arc<dyn Router>,
        admission: Admission,
        metrics: Arc<Metrics>,
        webhooks: Option<Arc<Webhooks>>,
    ) -> Self {
        // Checked by the configuration's validation.
        let pusher = crate::pusher::Apps::parse(&config.pusher_app, &config.pusher_apps)
            .unwrap_or_default()
            .map(|mut apps| {
                apps.start_webhooks(&config, &metrics);
                Arc::new(apps)
            });
        let broker = broker::from_config(
            &config,
            router.clone(),
            metrics.clone(),
            webhooks.clone(),
            pusher.clone(),
        );
        Self {
            pusher,
            broker,
            proxies: Proxies::from_config(&config, metrics.clone()).map(Arc::new),
            metrics,
            clock: Arc::default(),
            admission: Arc::new(admission),
            session_limits: Arc::new(SessionLimits::from_config(&config)),
            config,
            router,
            outbox_stats: Arc::default(),
            closing: CancellationToken::new(),
            ready: AtomicBool::new(true),
            close_reasons: DashMap::new(),
            webhooks,
        }
    }

    /// Tells the app (through the webhooks, if there are any) that `kind` happened to
    /// `member`, in `room` for room events. Never waits; without webhooks, one branch.
    #[inline]
    pub fn webhook(&self, kind: EventKind, member: &Member, room: Option<&str>) {
        if let Some(webhooks) = &self.webhooks {
            webhooks.emit(kind, member, room);
        }
    }
}
