//! A Pusher connection (`/app/{key}`): `pusher:connection_established` with its socket id,
//! then `pusher:ping`/`pusher:pong`, `pusher:subscribe`/`pusher:unsubscribe` for public,
//! private and presence channels (HMAC auth against the app's secret, over the presence
//! `channel_data` too), and client events (`client-*`) on private and presence channels from
//! their subscribers. Its channels are hub groups of the app ([`super::group`]); what a channel
//! is sent is encoded once ([`super::wire::event`]); a presence channel's members are the
//! broker's ([`crate::broker::Broker::join_presence`]), so they are exact across nodes.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::users::server_to_user;
use super::wire::{self, code, ChannelData, Incoming, Signin, Subscribe, Unsubscribe, UserData};
use super::{group, signing};
use crate::broker::{
    CachedEvent, LastEvent, PresenceJoin, PresenceJoined, PresenceJoining, PresenceRefusal,
};
use crate::hub::ConnId;
use crate::limits::{Rate, RateLimiter};
use crate::node::Node;
use crate::outbox::{CloseRequest, Outbox};
use crate::ws::protocol::{heartbeat_from_now, Opening, Protocol, Route};

/// What pusher-js is told to wait, in seconds, before it pings a quiet connection.
const ACTIVITY_TIMEOUT: u64 = 30;

/// The protocol versions spoken: 7 (pusher-js 4 and later), and 5 and 6 (older clients such
/// as pysher), which differ from it in nothing roomcast sends.
pub const PROTOCOLS: std::ops::RangeInclusive<u8> = 5..=7;

/// Pusher's limit on channel names, and the characters it allows in them.
const MAX_CHANNEL: usize = 164;

/// Users a presence channel holds at most: Pusher's limit, so what works on Pusher works here,
/// and a join's member list stays small.
pub const MAX_PRESENCE_MEMBERS: usize = 100;

/// Limits on a presence member's `user_id` (Pusher's) and `user_info` (its JSON, in bytes).
const MAX_USER_ID: usize = 128;
const MAX_USER_INFO: usize = 2048;

/// Whether `name` is a channel name: Pusher's characters, or a user's `#server-to-user-ID`.
pub fn valid_channel(name: &str) -> bool {
    let rest = server_to_user(name).unwrap_or(name);
    !rest.is_empty()
        && name.len() <= MAX_CHANNEL
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
}

/// The kind of channel a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Public,
    Private,
    /// `private-encrypted-`: the publisher encrypts; relayed as it is, no client events.
    Encrypted,
    /// `presence-`: private, and its members know who is there.
    Presence,
}

fn kind_of(channel: &str) -> Kind {
    if channel.starts_with("private-encrypted-") {
        Kind::Encrypted
    } else if channel.starts_with("private-") {
        Kind::Private
    } else if channel.starts_with("presence-") {
        Kind::Presence
    } else {
        Kind::Public
    }
}

/// Whether a channel is a cache channel (`cache-`, `private-cache-`,
/// `private-encrypted-cache-`, `presence-cache-`): its last event is kept for 30 minutes, and a
/// subscriber gets it (or `pusher:cache_miss`) after `subscription_succeeded`.
pub fn is_cache(channel: &str) -> bool {
    [
        "cache-",
        "private-cache-",
        "private-encrypted-cache-",
        "presence-cache-",
    ]
    .iter()
    .any(|prefix| channel.starts_with(prefix))
}

/// A channel the connection is in.
struct Subscribed {
    name: Box<str>,
    kind: Kind,
    /// On a presence channel, the user it is there as: its client events carry it.
    user_id: Option<Box<str>>,
}

/// What a subscription waits for before it succeeds.
enum Waiting {
    /// The node's subscription to the channel's events from other nodes: once in, an event
    /// published anywhere after `subscription_succeeded` reaches the client.
    Heard(oneshot::Receiver<()>),
    /// A presence join going round the cluster: the broker sends `subscription_succeeded`
    /// with the members, or it is refused.
    Presence(oneshot::Receiver<Result<PresenceJoined, PresenceRefusal>>),
    /// Subscribed to a cache channel: its last event, read from the cluster, follows.
    LastEvent(oneshot::Receiver<LastEvent>),
}

pub struct PusherSession {
    outbox: Outbox,
    conn: ConnId,
    node: Arc<Node>,
    /// The app's index in the configuration; `None`: the key was unknown, and the connection
    /// is closing.
    app: Option<u16>,
    /// Its channels, by name (few per connection: a list is smaller than a set).
    channels: Vec<Subscribed>,
    /// Channels joined whose `subscription_succeeded` waits for the broker (see [`Waiting`]).
    subscribing: Vec<(Box<str>, Waiting)>,
    rate: Option<RateLimiter>,
    closing: bool,
    /// The user it signed in as (`pusher:signin`).
    user: Option<Box<str>>,
    /// Whether it counts against its app's `max_connections` (until it disconnects).
    counted: bool,
}

impl PusherSession {
    fn refuse_and_close(outbox: &Outbox, error: u16, message: &str) {
        outbox.push(wire::error(error, message));
        outbox.request_close(CloseRequest {
            code: Some(error),
            flush: true,
        });
    }

    fn apps(&self) -> &super::Apps {
        self.node
            .pusher
            .as_ref()
            .expect("a Pusher connection has apps")
    }

    fn socket_id(&self) -> String {
        let apps = self
            .node
            .pusher
            .as_ref()
            .expect("a Pusher connection has apps");
        apps.socket_id(self.conn)
    }

    fn group(&self, channel: &str) -> String {
        let apps = self.node.pusher.as_ref().expect("apps");
        group(apps.get(self.app.unwrap_or_default()), channel)
    }

    fn handle(&mut self, text: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Incoming<'_>>(text) else {
            self.outbox
                .push(wire::error(code::BAD_MESSAGE, "Invalid message format"));
            return;
        };
        match &*message.event {
            "pusher:ping" => {
                self.outbox.push(wire::pong());
            }
            "pusher:pong" => {}
            "pusher:subscribe" => match parse::<Subscribe<'_>>(message.data) {
                Some(subscribe) => self.subscribe(subscribe),
                None => {
                    let error = "Invalid subscribe data";
                    self.outbox.push(wire::error(code::BAD_MESSAGE, error));
                }
            },
            "pusher:unsubscribe" => {
                if let Some(unsubscribe) = parse::<Unsubscribe<'_>>(message.data) {
                    self.unsubscribe(&unsubscribe.channel);
                }
            }
            "pusher:signin" => match parse::<Signin<'_>>(message.data) {
                Some(signin) => self.sign_in(&signin),
                None => {
                    let error = "Invalid signin data";
                    self.outbox.push(wire::error(code::BAD_MESSAGE, error));
                }
            },
            event if event.starts_with("client-") => self.client_event(&message),
            // Other `pusher:` events (signin, ...) and anything else: not answered, as Pusher
            // ignores events it does not know.
            _ => {}
        }
    }

    /// `pusher:signin`: `user_data` signed for this socket; a bad one gets `pusher:error` 4009
    /// and the connection is closed, as Pusher does.
    fn sign_in(&mut self, signin: &Signin<'_>) {
        let apps = self.node.pusher.clone().expect("apps");
        let index = self.app.unwrap_or_default();
        let app = apps.get(index);
        let socket_id = self.socket_id();
        let signed = signing::signin_is_valid(
            &app.key,
            &app.secret,
            &signin.auth,
            &socket_id,
            &signin.user_data,
        );
        let user = serde_json::from_str::<UserData<'_>>(&signin.user_data)
            .ok()
            .map(|data| data.id.into_owned())
            .filter(|id| !id.is_empty() && id.len() <= MAX_USER_ID);
        let (true, Some(user)) = (signed, user) else {
            self.closing = true;
            let error = "Invalid signin: the auth is not this socket's, or user_data has no id";
            return Self::refuse_and_close(&self.outbox, code::UNAUTHORIZED, error);
        };
        if let Some(previous) = self.user.take() {
            apps.users.sign_out(index, &previous, self.conn);
        }
        apps.users.sign_in(index, &user, self.conn, &self.outbox);
        self.user = Some(user.into());
        self.outbox.push(wire::signin_success(&signin.user_data));
    }

    fn subscribe(&mut self, subscribe: Subscribe<'_>) {
        let channel = &*subscribe.channel;
        if !valid_channel(channel) {
            let error = "Invalid channel name";
            self.outbox.push(wire::subscription_error(
                channel,
                "InvalidChannel",
                error,
                400,
            ));
            return;
        }
        if let Some(user) = server_to_user(channel) {
            if self.user.as_deref() != Some(user) {
                let error = "Not signed in as this user";
                self.outbox
                    .push(wire::subscription_error(channel, "AuthError", error, 403));
                return;
            }
        }
        let kind = kind_of(channel);
        let channel_data = subscribe.channel_data.as_deref();
        match kind {
            Kind::Private | Kind::Encrypted | Kind::Presence => {
                let apps = self.node.pusher.as_ref().expect("apps");
                let app = apps.get(self.app.unwrap_or_default());
                let signed = (kind == Kind::Presence).then_some(channel_data.unwrap_or(""));
                let valid = subscribe.auth.as_deref().is_some_and(|auth| {
                    signing::channel_auth_is_valid(
                        &app.key,
                        &app.secret,
                        auth,
                        &self.socket_id(),
                        channel,
                        signed,
                    )
                });
                if !valid {
                    let error = "Invalid signature: the auth is not this socket's for this channel";
                    self.outbox
                        .push(wire::subscription_error(channel, "AuthError", error, 401));
                    return;
                }
            }
            Kind::Public => {}
        }
        if self.channels.iter().any(|known| &*known.name == channel) {
            // Subscribed already, or on its way (it succeeds once, when in).
            if !self.subscribing.iter().any(|(name, _)| &**name == channel)
                && kind != Kind::Presence
            {
                self.outbox.push(wire::subscription_succeeded(channel));
            }
            return;
        }
        if kind == Kind::Presence {
            return self.join_presence(channel, channel_data.unwrap_or(""));
        }
        let joined = self
            .node
            .broker
            .join_group(&self.group(channel), self.conn, &self.outbox);
        self.channels.push(Subscribed {
            name: channel.into(),
            kind,
            user_id: None,
        });
        let heard = joined.and_then(|joined| {
            if joined.first_here {
                self.occupancy_hooks(|hooks| hooks.channel_occupied(channel));
            }
            joined.heard
        });
        match heard {
            Some(heard) => self
                .subscribing
                .push((channel.into(), Waiting::Heard(heard))),
            None => {
                self.outbox.push(wire::subscription_succeeded(channel));
                self.after_succeeded(channel);
            }
        }
    }

    /// Tells the app's webhooks, when it has them.
    fn hooks(&self, tell: impl FnOnce(&super::webhooks::AppHooks)) {
        if let Some(hooks) = self.apps().hooks(self.app.unwrap_or_default()) {
            tell(hooks);
        }
    }

    /// Tells the app's webhooks of a channel's occupancy or members, by this node's counts,
    /// when the broker does not tell them by the cluster's.
    fn occupancy_hooks(&self, tell: impl FnOnce(&super::webhooks::AppHooks)) {
        if !self.node.broker.reports_room_events() {
            self.hooks(tell);
        }
    }

    /// The webhooks a presence join decided: the channel's first connection here, the
    /// channel's new user.
    fn presence_joined(&self, channel: &str, user_id: &str, joined: PresenceJoined) {
        self.occupancy_hooks(|hooks| {
            if joined.first_here {
                hooks.channel_occupied(channel);
            }
            if joined.new_user {
                hooks.member_added(channel, user_id);
            }
        });
    }

    /// Once `subscription_succeeded` is sent: on a cache channel, its last event, or
    /// `pusher:cache_miss` when none is kept.
    fn after_succeeded(&mut self, channel: &str) {
        if !is_cache(channel) {
            return;
        }
        match self.node.broker.last_event(&self.group(channel)) {
            CachedEvent::Done(last) => send_last_event(&self.outbox, channel, last),
            CachedEvent::Later(last) => self
                .subscribing
                .push((channel.into(), Waiting::LastEvent(last))),
        }
    }

    /// A signed presence subscription: its `channel_data` names the user; the broker makes it
    /// a member and sends `subscription_succeeded` with the members.
    fn join_presence(&mut self, channel: &str, channel_data: &str) {
        let data = match serde_json::from_str::<ChannelData<'_>>(channel_data) {
            Ok(data) => data,
            Err(_) => {
                let error = "Invalid channel_data: a JSON object with a user_id";
                return self.presence_refused(channel, "InvalidChannelData", error, 400);
            }
        };
        let user_id = data.user_id.into_string();
        let user_info = data.user_info.unwrap_or(RawValue::NULL);
        if user_id.is_empty() || user_id.len() > MAX_USER_ID {
            let error = "Invalid user_id: 1 to 128 characters";
            return self.presence_refused(channel, "InvalidChannelData", error, 400);
        }
        if user_info.get().len() > MAX_USER_INFO {
            let error = "Invalid user_info: over 2 KB";
            return self.presence_refused(channel, "InvalidChannelData", error, 400);
        }
        let joining = self.node.broker.join_presence(&PresenceJoin {
            group: &self.group(channel),
            channel,
            conn: self.conn,
            socket_id: &self.socket_id(),
            outbox: &self.outbox,
            user_id: &user_id,
            user_info,
            max_members: MAX_PRESENCE_MEMBERS,
        });
        let joined = match joining {
            PresenceJoining::AlreadyMember => return,
            PresenceJoining::Done(Err(refusal)) => return self.presence_refusal(channel, refusal),
            PresenceJoining::Done(Ok(done)) => {
                self.presence_joined(channel, &user_id, done);
                None
            }
            PresenceJoining::Later(joined) => Some(joined),
        };
        self.channels.push(Subscribed {
            name: channel.into(),
            kind: Kind::Presence,
            user_id: Some(user_id.into()),
        });
        match joined {
            Some(joined) => self
                .subscribing
                .push((channel.into(), Waiting::Presence(joined))),
            None => self.after_succeeded(channel),
        }
    }

    fn presence_refused(&self, channel: &str, kind: &str, error: &str, status: u16) {
        self.outbox
            .push(wire::subscription_error(channel, kind, error, status));
    }

    fn presence_refusal(&self, channel: &str, refusal: PresenceRefusal) {
        match refusal {
            PresenceRefusal::Full => {
                let error = "The presence channel has its most members (100)";
                self.presence_refused(channel, "LimitReached", error, 403);
            }
            PresenceRefusal::Unavailable => {
                let error = "Presence is unavailable: the cluster's store did not answer";
                self.presence_refused(channel, "PresenceUnavailable", error, 503);
            }
        }
    }

    fn unsubscribe(&mut self, channel: &str) {
        let Some(at) = self
            .channels
            .iter()
            .position(|known| &*known.name == channel)
        else {
            return;
        };
        let left = self.channels.swap_remove(at);
        self.subscribing.retain(|(name, _)| &**name != channel);
        self.leave(&self.node, &left);
    }

    fn leave(&self, node: &Node, channel: &Subscribed) {
        let group = self.group(&channel.name);
        let remaining = if channel.kind == Kind::Presence {
            let left = node.broker.leave_presence(&group, &channel.name, self.conn);
            if let (Some(left), Some(user)) = (left, &channel.user_id) {
                if left.user_gone == Some(true) {
                    self.occupancy_hooks(|hooks| hooks.member_removed(&channel.name, user));
                }
            }
            left.map(|left| left.remaining_here)
        } else {
            node.broker.leave_group(&group, self.conn)
        };
        if remaining == Some(0) {
            self.occupancy_hooks(|hooks| hooks.channel_vacated(&channel.name));
        }
    }

    /// A `client-*` event: relayed to the channel's other subscribers when the sender is one,
    /// on a private channel; otherwise refused with `pusher:error`.
    fn client_event(&mut self, message: &Incoming<'_>) {
        let Some(channel) = message.channel.as_deref() else {
            return;
        };
        let subscribed = self.channels.iter().find(|known| &*known.name == channel);
        let enabled = self.apps().get(self.app.unwrap_or_default()).client_events;
        let refusal = match subscribed.map(|known| known.kind) {
            _ if !enabled => Some("Client events are not enabled for this app"),
            None => Some("Client event rejected: not subscribed to the channel"),
            Some(Kind::Private | Kind::Presence) => None,
            Some(_) => {
                Some("Client event rejected: only supported on private and presence channels")
            }
        };
        if let Some(refusal) = refusal {
            self.outbox.push(wire::error(code::BAD_MESSAGE, refusal));
            return;
        }
        let user_id = subscribed.and_then(|known| known.user_id.as_deref());
        let data = message.data.unwrap_or(RawValue::NULL);
        let text = wire::client_event(&message.event, channel, data, user_id);
        self.hooks(|hooks| {
            hooks.client_event(channel, &message.event, data, &self.socket_id(), user_id)
        });
        let app = self.app.unwrap_or_default();
        let told = super::publish(&self.node, app, channel, &text, &self.socket_id());
        self.node.metrics.fanout_deliveries.increment(told as u64);
    }

    /// The rate limit, as on the native protocol: over it a message is refused with
    /// `pusher:error` 4301; a sustained flood closes the connection with 4100 (pusher-js backs
    /// off before it reconnects).
    fn within_rate(&mut self, len: usize) -> bool {
        let Some(rate) = self.rate.as_mut() else {
            return true;
        };
        match rate.take(len, &self.node.session_limits, Instant::now()) {
            Rate::Allowed => true,
            Rate::Refused => {
                self.outbox.push(wire::error(
                    code::OVER_RATE,
                    "Client event rejected due to rate limit",
                ));
                false
            }
            Rate::Flooding => {
                self.closing = true;
                Self::refuse_and_close(&self.outbox, code::OVER_CAPACITY, "Flooding: closed");
                false
            }
        }
    }
}

/// A cache channel's last event to a new subscriber, or `pusher:cache_miss`.
fn send_last_event(outbox: &Outbox, channel: &str, last: LastEvent) {
    match last {
        Some(text) => outbox.push(wire::frame_of(&text)),
        None => outbox.push(wire::cache_miss(channel)),
    };
}

fn parse<'a, T: serde::Deserialize<'a>>(
    data: Option<&'a serde_json::value::RawValue>,
) -> Option<T> {
    serde_json::from_str(data?.get()).ok()
}

impl Protocol for PusherSession {
    const NAME: &'static str = "pusher";

    fn open(opening: Opening<'_>) -> Self {
        let Opening {
            node,
            conn,
            identity,
            outbox,
            writer,
            route,
            ..
        } = opening;
        node.router.register_outside(conn, &outbox, true);
        heartbeat_from_now(node, &outbox, &identity);
        let (app, protocol) = match route {
            Route::Pusher { app, protocol } => (app, protocol),
            _ => (None, None),
        };
        let session = PusherSession {
            outbox,
            conn,
            node: node.clone(),
            app,
            channels: Vec::new(),
            subscribing: Vec::new(),
            rate: RateLimiter::new(&node.session_limits, Instant::now()),
            closing: false,
            user: None,
            counted: false,
        };
        let mut session = session;
        if app.is_none() {
            let message = "App key not in this cluster. Did you forget to specify the cluster?";
            Self::refuse_and_close(&session.outbox, code::APP_UNKNOWN, message);
        } else if !protocol.is_some_and(|version| PROTOCOLS.contains(&version)) {
            let message = "Unsupported protocol version";
            Self::refuse_and_close(&session.outbox, code::UNSUPPORTED_PROTOCOL, message);
        } else if !session.apps().connect(session.app.unwrap_or_default()) {
            session.closing = true;
            let message = "Application is over connection quota";
            Self::refuse_and_close(&session.outbox, code::OVER_QUOTA, message);
        } else {
            session.counted = true;
            writer.push_direct(wire::connection_established(
                &session.socket_id(),
                ACTIVITY_TIMEOUT,
            ));
        }
        session
    }

    fn conn(&self) -> ConnId {
        self.conn
    }

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn node(&self) -> &Arc<Node> {
        &self.node
    }

    fn on_message(&mut self, _binary: bool, payload: &mut [u8]) {
        if self.closing || self.app.is_none() || !self.within_rate(payload.len()) {
            return;
        }
        self.handle(payload);
    }

    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> bool {
        let mut refused = Vec::new();
        let mut succeeded = Vec::new();
        let mut presence_joined = Vec::new();
        let outbox = &self.outbox;
        self.subscribing
            .retain_mut(|(channel, waiting)| match waiting {
                Waiting::Heard(heard) => match std::pin::Pin::new(heard).poll(cx) {
                    Poll::Pending => true,
                    // In, or the broker gave up (Redis away: it subscribes when back): the
                    // channel's local events flow either way.
                    Poll::Ready(_) => {
                        outbox.push(wire::subscription_succeeded(channel));
                        succeeded.push(channel.clone());
                        false
                    }
                },
                Waiting::Presence(joined) => match std::pin::Pin::new(joined).poll(cx) {
                    Poll::Pending => true,
                    // Joined: the broker sent `subscription_succeeded`.
                    Poll::Ready(Ok(Ok(joined))) => {
                        presence_joined.push((channel.clone(), joined));
                        succeeded.push(channel.clone());
                        false
                    }
                    Poll::Ready(Ok(Err(refusal))) => {
                        refused.push((channel.clone(), refusal));
                        false
                    }
                    Poll::Ready(Err(_)) => {
                        refused.push((channel.clone(), PresenceRefusal::Unavailable));
                        false
                    }
                },
                Waiting::LastEvent(last) => match std::pin::Pin::new(last).poll(cx) {
                    Poll::Pending => true,
                    // Not read (Redis away): a miss, so the app fetches what it needs itself.
                    Poll::Ready(last) => {
                        send_last_event(outbox, channel, last.ok().flatten());
                        false
                    }
                },
            });
        for (channel, joined) in presence_joined {
            let user = self
                .channels
                .iter()
                .find(|known| known.name == channel)
                .and_then(|known| known.user_id.clone());
            if let Some(user) = user {
                self.presence_joined(&channel, &user, joined);
            }
        }
        for channel in succeeded {
            self.after_succeeded(&channel);
        }
        for (channel, refusal) in refused {
            // The broker took it out of the channel's group; it is not subscribed.
            self.channels.retain(|known| known.name != channel);
            self.presence_refusal(&channel, refusal);
        }
        true
    }

    fn disconnect(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let node = self.node.clone();
        self.subscribing.clear();
        if let (Some(user), Some(apps)) = (self.user.take(), node.pusher.as_ref()) {
            apps.users
                .sign_out(self.app.unwrap_or_default(), &user, self.conn);
        }
        if std::mem::take(&mut self.counted) {
            self.apps().disconnect(self.app.unwrap_or_default());
        }
        for channel in std::mem::take(&mut self.channels) {
            self.leave(&node, &channel);
        }
        node.router.unregister_outside(self.conn);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_pushers_characters_up_to_164_bytes() {
        assert!(valid_channel("private-orders.42_a-b=c@d,e;f"));
        assert!(!valid_channel(""));
        assert!(!valid_channel("has space"));
        assert!(!valid_channel("slash/no"));
        assert!(!valid_channel(&"x".repeat(165)));
        assert!(valid_channel("#server-to-user-42"));
        assert!(!valid_channel("#server-to-user-") && !valid_channel("#other"));
        assert_eq!(kind_of("private-encrypted-x"), Kind::Encrypted);
        assert_eq!(kind_of("private-x"), Kind::Private);
        assert_eq!(kind_of("presence-x"), Kind::Presence);
        assert_eq!(kind_of("private-cache-x"), Kind::Private);
        assert_eq!(kind_of("presence-cache-x"), Kind::Presence);
        assert_eq!(kind_of("private-encrypted-cache-x"), Kind::Encrypted);
        assert!(is_cache("cache-x") && is_cache("private-cache-x"));
        assert!(is_cache("private-encrypted-cache-x") && is_cache("presence-cache-x"));
        assert!(!is_cache("private-x") && !is_cache("news-cache-x"));
        assert_eq!(kind_of("news"), Kind::Public);
    }
}
