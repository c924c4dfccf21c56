//! The Pusher Channels protocol beside the native one, so that pusher-js, Laravel Echo and the
//! Pusher server SDKs work against roomcast unchanged: the apps (`--pusher-app`), the WebSocket
//! side at `/app/{key}` ([`session`]) with its frames in one place ([`wire`]), and the
//! signing its HTTP API ([`api`]) and private channels share ([`signing`]).
//!
//! A Pusher channel is not a native room: its members are Pusher connections of one app, in a
//! hub group of their own (`pusher/APP_ID/CHANNEL`), and its frames are Pusher's. The broker
//! carries a channel's events to every node with subscribers ([`crate::broker::Target::Group`]),
//! so with `--redis` or `--redis-cluster` a channel spans the cluster as a room does.

use crate::broker::{Delivery, Publication, Target};
use crate::node::Node;
use crate::protocol::{self, Body};

pub mod api;
pub mod channels;
pub mod session;
pub mod signing;
pub mod users;
pub mod webhooks;
pub mod wire;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::value::RawValue;

/// One app: what the SDKs call `app_id`, `key` and `secret`, and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// Numeric, as the SDKs require.
    pub id: Box<str>,
    pub key: Box<str>,
    pub secret: Box<str>,
    /// Whether subscribers may send `client-*` events (Reverb's and Pusher's switch).
    pub client_events: bool,
    /// This node's most connections of the app; `None`: only `--max-connections` caps them.
    pub max_connections: Option<usize>,
    /// Where its webhooks go, in Pusher's format.
    pub webhook_url: Option<Box<str>>,
}

/// The configured apps.
pub struct Apps {
    apps: Vec<App>,
    /// Each app's open connections on this node, for its `max_connections`.
    connections: Vec<AtomicUsize>,
    /// This process's part of every socket id (`PREFIX.CONN`): a socket id names one connection
    /// across nodes, and one of another process is never mistaken for one of ours.
    prefix: u32,
    /// This node's signed-in connections.
    pub users: users::Users,
    /// Each app's webhooks, when it has a `webhook_url` and [`Apps::start_webhooks`] ran.
    hooks: Vec<Option<webhooks::AppHooks>>,
    /// Their senders, until the server takes them to run.
    senders: std::sync::Mutex<Vec<crate::api::webhooks::Sender<webhooks::PusherFormat>>>,
}

impl std::fmt::Debug for Apps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apps")
            .field("apps", &self.apps)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Why an `--pusher-app` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadApp {
    #[error("--pusher-app must be ID:KEY:SECRET, got {0:?}")]
    Shape(String),
    #[error("--pusher-app {0:?}: the app id must be a number, as the Pusher SDKs require")]
    Id(String),
    #[error("--pusher-app: the key {0:?} may not hold '/', '?' or '#' (it is a path segment)")]
    Key(String),
    #[error("--pusher-app: app id or key {0:?} given twice")]
    Twice(String),
}

static NEXT_PREFIX: AtomicU32 = AtomicU32::new(0);

impl Apps {
    /// The apps of `--pusher-app` values and `[[pusher-apps]]` tables; `None` when there are
    /// none (the endpoint is off).
    pub fn parse(
        specs: &[String],
        tables: &[crate::config::PusherAppConfig],
    ) -> Result<Option<Apps>, BadApp> {
        let mut apps: Vec<App> = Vec::new();
        let from_flags = specs.iter().map(|spec| {
            let mut parts = spec.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(key), Some(secret)) => Ok((id, key, secret, true, None, None)),
                _ => Err(BadApp::Shape(redact(spec))),
            }
        });
        let from_tables = tables.iter().map(|app| {
            Ok((
                &*app.id,
                &*app.key,
                &*app.secret,
                app.client_events,
                app.max_connections,
                app.webhook_url.as_deref(),
            ))
        });
        for parsed in from_flags.chain(from_tables) {
            let (id, key, secret, client_events, max_connections, webhook_url) = parsed?;
            if id.is_empty() || key.is_empty() || secret.is_empty() {
                return Err(BadApp::Shape(format!("{id}:{key}:<secret>")));
            }
            if !id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BadApp::Id(id.to_owned()));
            }
            if key.contains(['/', '?', '#']) {
                return Err(BadApp::Key(key.to_owned()));
            }
            if apps.iter().any(|app| &*app.id == id) {
                return Err(BadApp::Twice(id.to_owned()));
            }
            if apps.iter().any(|app| &*app.key == key) {
                return Err(BadApp::Twice(key.to_owned()));
            }
            apps.push(App {
                id: id.into(),
                key: key.into(),
                secret: secret.into(),
                client_events,
                max_connections,
                webhook_url: webhook_url.map(Box::from),
            });
        }
        if apps.is_empty() {
            return Ok(None);
        }
        // Random per process, and distinct per server within one (the tests run several).
        let prefix = rand::random::<u32>()
            .wrapping_add(NEXT_PREFIX.fetch_add(1, Ordering::Relaxed))
            % 1_000_000_000;
        Ok(Some(Apps {
            connections: apps.iter().map(|_| AtomicUsize::new(0)).collect(),
            hooks: apps.iter().map(|_| None).collect(),
            senders: Default::default(),
            apps,
            prefix,
            users: users::Users::default(),
        }))
    }

    /// The app whose key a connection's path names, by its index.
    pub fn by_key(&self, key: &str) -> Option<u16> {
        self.apps
            .iter()
            .position(|app| &*app.key == key)
            .map(|at| at as u16)
    }

    pub fn by_id(&self, id: &str) -> Option<(u16, &App)> {
        let at = self.apps.iter().position(|app| &*app.id == id)?;
        Some((at as u16, &self.apps[at]))
    }

    pub fn get(&self, index: u16) -> &App {
        &self.apps[index as usize]
    }

    /// Starts the webhooks of every app with a `webhook_url` (their senders wait for
    /// [`Apps::take_webhook_senders`]).
    pub fn start_webhooks(
        &mut self,
        config: &crate::config::Config,
        metrics: &Arc<crate::metrics::Metrics>,
    ) {
        let mut senders = Vec::new();
        for (at, app) in self.apps.iter().enumerate() {
            let Some(url) = &app.webhook_url else {
                continue;
            };
            // Checked by the configuration's validation.
            if let Ok((hooks, sender)) =
                webhooks::AppHooks::start(config, url, &app.key, &app.secret, metrics.clone())
            {
                self.hooks[at] = Some(hooks);
                senders.push(sender);
            }
        }
        *self.senders.get_mut().unwrap_or_else(|e| e.into_inner()) = senders;
    }

    /// The webhook senders to run (once: later calls get none).
    pub fn take_webhook_senders(
        &self,
    ) -> Vec<crate::api::webhooks::Sender<webhooks::PusherFormat>> {
        std::mem::take(&mut *self.senders.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// App `index`'s webhooks, if it has them.
    pub fn hooks(&self, index: u16) -> Option<&webhooks::AppHooks> {
        self.hooks.get(index as usize)?.as_ref()
    }

    /// The webhooks of the app whose channel group `group` is (see [`group`]), if it has them,
    /// with the channel's name.
    pub fn hooks_of_group<'g>(&self, group: &'g str) -> Option<(&webhooks::AppHooks, &'g str)> {
        let (id, channel) = group.strip_prefix("pusher/")?.split_once('/')?;
        let (index, _) = self.by_id(id)?;
        Some((self.hooks(index)?, channel))
    }

    /// Whether any app has webhooks.
    pub fn has_webhooks(&self) -> bool {
        self.hooks.iter().any(Option::is_some)
    }

    /// Webhook events of every app not yet delivered.
    pub fn undelivered_hooks(&self) -> usize {
        self.hooks
            .iter()
            .flatten()
            .map(webhooks::AppHooks::undelivered)
            .sum()
    }

    /// Counts a new connection of app `index`; false (nothing counted) when the app has its
    /// `max_connections` on this node already.
    pub fn connect(&self, index: u16) -> bool {
        let count = &self.connections[index as usize];
        let Some(max) = self.apps[index as usize].max_connections else {
            count.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// A connection counted by [`Apps::connect`] ended.
    pub fn disconnect(&self, index: u16) {
        self.connections[index as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// The socket id of this node's connection `conn`.
    pub fn socket_id(&self, conn: u64) -> String {
        format!("{}.{conn}", self.prefix)
    }

    /// This node's connection that `socket_id` names, if it is one of ours.
    pub fn conn_of(&self, socket_id: &str) -> Option<u64> {
        let (prefix, conn) = socket_id.split_once('.')?;
        (prefix.parse::<u32>().ok()? == self.prefix)
            .then(|| conn.parse().ok())
            .flatten()
    }
}

/// The hub group of an app's channel, named by the app's id (not its place in this node's
/// list: nodes may list their apps in different orders).
pub fn group(app: &App, channel: &str) -> String {
    format!("pusher/{}/{channel}", app.id)
}

/// Publishes the event frame `text` to `channel` of `app` on every node, skipping the
/// connection of `skip` (a socket id, of any node: `""` none); the deliveries made here.
/// A cache channel's event is kept as its last, first.
pub fn publish(node: &Node, app: u16, channel: &str, text: &RawValue, skip: &str) -> usize {
    let Some(apps) = node.pusher.as_ref() else {
        return 0;
    };
    let except = apps.conn_of(skip);
    let group = group(apps.get(app), channel);
    if session::is_cache(channel) {
        node.broker.keep_last_event(&group, text);
    }
    let delivered = node.broker.publish(&Publication {
        target: Target::Group(&group),
        from: skip,
        message: Body::Raw(text),
        timestamp: protocol::timestamp(),
        except,
    });
    match delivered {
        Delivery::Done(Ok(delivered)) => delivered,
        _ => 0,
    }
}

/// A spec with its secret left out, for an error message.
fn redact(spec: &str) -> String {
    match spec.splitn(3, ':').collect::<Vec<_>>().as_slice() {
        [id, key, _] => format!("{id}:{key}:<secret>"),
        _ => "<not ID:KEY:SECRET>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn apps_are_id_key_secret_with_a_numeric_id_and_distinct_ids_and_keys() {
        let apps = Apps::parse(&specs(&["1:key:sec:ret", "22:other:s"]), &[])
            .unwrap()
            .unwrap();
        assert_eq!(apps.by_key("key"), Some(0));
        assert_eq!(&*apps.get(0).secret, "sec:ret");
        assert_eq!(apps.by_id("22").unwrap().1.key.as_ref(), "other");
        assert!(Apps::parse(&[], &[]).unwrap().is_none());
        assert!(matches!(
            Apps::parse(&specs(&["x:k:s"]), &[]),
            Err(BadApp::Id(_))
        ));
        assert!(matches!(
            Apps::parse(&specs(&["1:k"]), &[]),
            Err(BadApp::Shape(_))
        ));
        assert!(matches!(
            Apps::parse(&specs(&["1:a/b:s"]), &[]),
            Err(BadApp::Key(_))
        ));
        assert!(matches!(
            Apps::parse(&specs(&["1:k:s", "1:l:s"]), &[]),
            Err(BadApp::Twice(_))
        ));
        let error = Apps::parse(&specs(&["1:k:"]), &[]).unwrap_err().to_string();
        assert!(!error.contains("secret\""), "{error}");
    }

    #[test]
    fn config_file_apps_add_their_options_and_a_cap_counts_this_nodes_connections() {
        let table = crate::config::PusherAppConfig {
            id: "7".into(),
            key: "quiet".into(),
            secret: "s".into(),
            client_events: false,
            max_connections: Some(2),
            webhook_url: None,
        };
        let apps = Apps::parse(&specs(&["1:k:s"]), std::slice::from_ref(&table))
            .unwrap()
            .unwrap();
        assert!(apps.get(0).client_events && apps.get(0).max_connections.is_none());
        let (index, app) = apps.by_id("7").unwrap();
        assert!(!app.client_events);
        assert!(apps.connect(index) && apps.connect(index) && !apps.connect(index));
        apps.disconnect(index);
        assert!(apps.connect(index));
        assert!(matches!(
            Apps::parse(&specs(&["7:other:s"]), &[table]),
            Err(BadApp::Twice(_))
        ));
    }

    #[test]
    fn a_channel_group_names_its_apps_webhooks_and_channel_only_for_an_app_with_them() {
        let hooked = crate::config::PusherAppConfig {
            id: "7".into(),
            key: "hooked".into(),
            secret: "s".into(),
            client_events: true,
            max_connections: None,
            webhook_url: Some("http://127.0.0.1:9/hooks".into()),
        };
        let mut apps = Apps::parse(&specs(&["1:k:s"]), &[hooked]).unwrap().unwrap();
        assert!(!apps.has_webhooks());
        let config = crate::config::Config::with_listen("127.0.0.1:0".parse().unwrap());
        apps.start_webhooks(&config, &crate::metrics::Metrics::new());
        assert!(apps.has_webhooks());
        let (_, channel) = apps.hooks_of_group("pusher/7/presence-a/b").unwrap();
        assert_eq!(channel, "presence-a/b");
        let (_, app) = apps.by_id("7").unwrap();
        assert_eq!(group(app, channel), "pusher/7/presence-a/b");
        for other in ["pusher/1/news", "pusher/9/news", "pusher/7", "room", ""] {
            assert!(apps.hooks_of_group(other).is_none(), "{other}");
        }
    }

    #[test]
    fn a_socket_id_names_one_of_this_nodes_connections_and_no_other_nodes() {
        let apps = Apps::parse(&specs(&["1:k:s"]), &[]).unwrap().unwrap();
        let id = apps.socket_id(42);
        let (prefix, conn) = id.split_once('.').unwrap();
        assert!(prefix.bytes().all(|b| b.is_ascii_digit()) && conn == "42");
        assert_eq!(apps.conn_of(&id), Some(42));
        let other = Apps::parse(&specs(&["1:k:s"]), &[]).unwrap().unwrap();
        assert_eq!(other.conn_of(&id), None);
        assert_eq!(apps.conn_of("nonsense"), None);
    }
}
