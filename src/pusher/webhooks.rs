//! Webhooks in Pusher's format, per app (`webhook-url` of a `[[pusher-apps]]` table): the
//! body `{"time_ms", "events": [...]}` with `X-Pusher-Key` and `X-Pusher-Signature` (hex
//! HMAC-SHA256 of the body with the app's secret), which the Pusher server SDKs' webhook
//! helpers check. Events: `channel_occupied`, `channel_vacated`, `member_added`,
//! `member_removed`, `client_event`. They travel the road of roomcast's own webhooks
//! ([`crate::api::webhooks`]: a bounded queue that never waits, batches, retries with
//! backoff); only the format differs.
//!
//! Who decides them: on one node, the session, by its node's counts; with Redis, the broker,
//! by the cluster's (`broker/redis/occupancy.rs` for a channel's occupancy, the presence
//! scripts for members and presence channels' occupancy), so each is told once per cluster.
//! A client event is told by the node of its sender.

use std::sync::Arc;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use hyper::header::{HeaderName, HeaderValue};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::Sha256;

use crate::api::app_client::{AppClient, BadUrl};
use crate::api::webhooks::{self, Format, Queue, Sender};
use crate::config::Config;
use crate::metrics::Metrics;

/// One event for the app.
#[derive(Debug)]
pub struct Hook {
    name: &'static str,
    channel: Box<str>,
    user_id: Option<Box<str>>,
    /// A client event's name, data (the JSON the client sent, which Pusher's webhook carries
    /// as a string) and sender.
    event: Option<Box<str>>,
    data: Option<Box<str>>,
    socket_id: Option<Box<str>>,
}

#[derive(Serialize)]
struct WireHook<'a> {
    name: &'a str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Body<'a> {
    time_ms: u64,
    events: Vec<WireHook<'a>>,
}

/// Pusher's body and headers for one app.
pub struct PusherFormat {
    key: HeaderValue,
    mac: Hmac<Sha256>,
}

impl Format for PusherFormat {
    type Event = Hook;

    fn encode(&mut self, batch: &[Hook]) -> Bytes {
        let events = batch
            .iter()
            .map(|hook| WireHook {
                name: hook.name,
                channel: &hook.channel,
                user_id: hook.user_id.as_deref(),
                event: hook.event.as_deref(),
                data: hook.data.as_deref(),
                socket_id: hook.socket_id.as_deref(),
            })
            .collect();
        let body = Body {
            time_ms: crate::protocol::timestamp() * 1000,
            events,
        };
        Bytes::from(serde_json::to_vec(&body).expect("hooks serialize"))
    }

    fn headers(&self, body: &[u8]) -> Vec<(HeaderName, HeaderValue)> {
        let signature = webhooks::sign(&self.mac, body);
        vec![
            (HeaderName::from_static("x-pusher-key"), self.key.clone()),
            (
                HeaderName::from_static("x-pusher-signature"),
                HeaderValue::from_str(&signature).expect("hex is ASCII"),
            ),
        ]
    }
}

/// An app's webhooks: what its sessions tell.
pub struct AppHooks {
    queue: Queue<Hook>,
}

impl std::fmt::Debug for AppHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppHooks")
    }
}

impl AppHooks {
    /// The hooks of an app with `key` and `secret` posting to `url`, and their sender.
    pub fn start(
        config: &Config,
        url: &str,
        key: &str,
        secret: &str,
        metrics: Arc<Metrics>,
    ) -> Result<(AppHooks, Sender<PusherFormat>), BadUrl> {
        let url = AppClient::parse_url(url)?;
        let format = PusherFormat {
            key: HeaderValue::from_str(key).expect("an app key is a header value"),
            mac: Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length"),
        };
        let (queue, sender) = webhooks::channel(config, url, format, metrics);
        Ok((AppHooks { queue }, sender))
    }

    fn push(&self, name: &'static str, channel: &str, user_id: Option<&str>) {
        self.queue.push(Hook {
            name,
            channel: channel.into(),
            user_id: user_id.map(Box::from),
            event: None,
            data: None,
            socket_id: None,
        });
    }

    pub fn channel_occupied(&self, channel: &str) {
        self.push("channel_occupied", channel, None);
    }

    pub fn channel_vacated(&self, channel: &str) {
        self.push("channel_vacated", channel, None);
    }

    pub fn member_added(&self, channel: &str, user_id: &str) {
        self.push("member_added", channel, Some(user_id));
    }

    pub fn member_removed(&self, channel: &str, user_id: &str) {
        self.push("member_removed", channel, Some(user_id));
    }

    /// A client event as its sender sent it (`data` the raw JSON), with the sender's socket id
    /// and, on a presence channel, its user.
    pub fn client_event(
        &self,
        channel: &str,
        event: &str,
        data: &RawValue,
        socket_id: &str,
        user_id: Option<&str>,
    ) {
        self.queue.push(Hook {
            name: "client_event",
            channel: channel.into(),
            user_id: user_id.map(Box::from),
            event: Some(event.into()),
            data: Some(data.get().into()),
            socket_id: Some(socket_id.into()),
        });
    }

    /// Events not yet delivered.
    pub fn undelivered(&self) -> usize {
        self.queue.undelivered()
    }
}
