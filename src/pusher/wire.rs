//! The Pusher protocol's frames, in one place: every frame roomcast sends a Pusher client, and
//! what it reads from one. Pusher's envelope is `{"event", "channel"?, "data"}`; `data` is a
//! JSON string holding JSON for the server's own events, an object in errors, and whatever
//! the publisher gave for an app's events.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::protocol;

/// Error codes of `pusher:error` (Pusher's ranges: 4000-4099 do not reconnect, 4100-4199
/// reconnect after backing off, 4200-4299 reconnect at once).
pub mod code {
    /// The path's app key is not configured.
    pub const APP_UNKNOWN: u16 = 4001;
    /// The app has its `max_connections` on this node (Pusher's "over connection quota").
    pub const OVER_QUOTA: u16 = 4004;
    /// The `protocol` query parameter is missing or not one we speak.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    /// A sign-in that failed, or a user's connections the app terminated.
    pub const UNAUTHORIZED: u16 = 4009;
    /// A sustained flood: closed, and pusher-js backs off before it reconnects.
    pub const OVER_CAPACITY: u16 = 4100;
    /// A message over the rate limit (refused; the connection stays).
    pub const OVER_RATE: u16 = 4301;
    /// A message that is not a Pusher event.
    pub const BAD_MESSAGE: u16 = 4200;
}

/// A message a client sent.
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(borrow, default)]
    pub channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// `pusher:subscribe`'s data.
#[derive(Debug, Deserialize)]
pub struct Subscribe<'a> {
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
    #[serde(borrow, default)]
    pub auth: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub channel_data: Option<Cow<'a, str>>,
}

/// `pusher:unsubscribe`'s data.
#[derive(Debug, Deserialize)]
pub struct Unsubscribe<'a> {
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
}

fn frame(value: &Value) -> Bytes {
    protocol::data(false, value.to_string().as_bytes())
}

pub fn connection_established(socket_id: &str, activity_timeout: u64) -> Bytes {
    let data = json!({"socket_id": socket_id, "activity_timeout": activity_timeout});
    frame(&json!({"event": "pusher:connection_established", "data": data.to_string()}))
}

pub fn pong() -> Bytes {
    frame(&json!({"event": "pusher:pong", "data": "{}"}))
}

pub fn subscription_succeeded(channel: &str) -> Bytes {
    frame(&json!({
        "event": "pusher_internal:subscription_succeeded",
        "channel": channel,
        "data": "{}",
    }))
}

/// Why a subscription failed, as pusher-js reports it to the application.
pub fn subscription_error(channel: &str, kind: &str, error: &str, status: u16) -> Bytes {
    frame(&json!({
        "event": "pusher:subscription_error",
        "channel": channel,
        "data": {"type": kind, "error": error, "status": status},
    }))
}

/// `pusher:signin`'s data.
#[derive(Debug, Deserialize)]
pub struct Signin<'a> {
    #[serde(borrow)]
    pub auth: Cow<'a, str>,
    #[serde(borrow)]
    pub user_data: Cow<'a, str>,
}

/// `user_data` of a sign-in: the user's `id` (a non-empty string, as pusher-js requires).
#[derive(Debug, Deserialize)]
pub struct UserData<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
}

/// `pusher:signin_success`, with the user data as signed.
pub fn signin_success(user_data: &str) -> Bytes {
    let data = json!({ "user_data": user_data }).to_string();
    frame(&json!({"event": "pusher:signin_success", "data": data}))
}

/// `pusher:cache_miss`: a cache channel has no last event kept.
pub fn cache_miss(channel: &str) -> Bytes {
    frame(&json!({"event": "pusher:cache_miss", "channel": channel, "data": "{}"}))
}

/// The frame of an event's text (see [`event`]), for one connection.
pub fn frame_of(text: &RawValue) -> Bytes {
    protocol::data(false, text.get().as_bytes())
}

pub fn error(code: u16, message: &str) -> Bytes {
    frame(&json!({"event": "pusher:error", "data": {"code": code, "message": message}}))
}

/// An event on a channel, encoded once for all its subscribers.
#[derive(Serialize)]
struct Event<'a> {
    event: &'a str,
    channel: &'a str,
    data: &'a RawValue,
    /// A client event's sender on a presence channel (pusher-js hands it to the handler).
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
}

/// An event whose `data` is the JSON value `data` (a string, for what the HTTP API publishes;
/// as the client sent it, for a client event): the text of its frame, which the hub frames
/// once for all of the channel's subscribers on each node (a [`crate::broker::Target::Group`]
/// publication).
pub fn event(name: &str, channel: &str, data: &RawValue) -> Box<RawValue> {
    client_event(name, channel, data, None)
}

/// A client event, with its sender's `user_id` on a presence channel.
pub fn client_event(
    name: &str,
    channel: &str,
    data: &RawValue,
    user_id: Option<&str>,
) -> Box<RawValue> {
    let event = Event {
        event: name,
        channel,
        data,
        user_id,
    };
    serde_json::value::to_raw_value(&event).expect("an event serializes")
}

/// `channel_data` of a presence subscription: who the connection is for the channel's members.
/// Laravel sends a numeric `user_id`; it is a string on the wire (`ids`, the `hash`'s keys).
#[derive(Debug, Deserialize)]
pub struct ChannelData<'a> {
    pub user_id: UserId,
    #[serde(borrow, default)]
    pub user_info: Option<&'a RawValue>,
}

/// A presence member's id: a string, or a number the app gave (written as a string).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UserId {
    Text(String),
    Number(serde_json::Number),
}

impl UserId {
    pub fn into_string(self) -> String {
        match self {
            UserId::Text(text) => text,
            UserId::Number(number) => number.to_string(),
        }
    }
}

/// A presence channel's member for the frames: its id and what the app said of it (JSON).
pub struct PresenceMember<'a> {
    pub user_id: &'a str,
    pub user_info: &'a RawValue,
}

/// `pusher_internal:subscription_succeeded` of a presence channel: its members as they stand
/// at the joiner's place in the channel's order.
pub fn presence_succeeded<'a>(
    channel: &str,
    members: impl IntoIterator<Item = PresenceMember<'a>>,
) -> Bytes {
    struct Hash<'a>(&'a [PresenceMember<'a>]);
    impl Serialize for Hash<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(self.0.iter().map(|m| (m.user_id, m.user_info)))
        }
    }
    #[derive(Serialize)]
    struct Presence<'a> {
        ids: Vec<&'a str>,
        hash: Hash<'a>,
        count: usize,
    }
    #[derive(Serialize)]
    struct Data<'a> {
        presence: Presence<'a>,
    }
    let members: Vec<PresenceMember<'a>> = members.into_iter().collect();
    let data = Data {
        presence: Presence {
            ids: members.iter().map(|member| member.user_id).collect(),
            hash: Hash(&members),
            count: members.len(),
        },
    };
    let data = serde_json::to_string(&data).expect("presence serializes");
    frame(&json!({
        "event": "pusher_internal:subscription_succeeded",
        "channel": channel,
        "data": data,
    }))
}

/// `pusher_internal:member_added`: a user's first connection joined (the frame's text, for a
/// group publication).
pub fn member_added(channel: &str, user_id: &str, user_info: &RawValue) -> Box<RawValue> {
    #[derive(Serialize)]
    struct Added<'a> {
        user_id: &'a str,
        user_info: &'a RawValue,
    }
    let data = serde_json::to_string(&Added { user_id, user_info }).expect("serializes");
    let data = serde_json::value::to_raw_value(&data).expect("a string serializes");
    event("pusher_internal:member_added", channel, &data)
}

/// `pusher_internal:member_removed`: a user's last connection left.
pub fn member_removed(channel: &str, user_id: &str) -> Box<RawValue> {
    let data = json!({"user_id": user_id}).to_string();
    let data = serde_json::value::to_raw_value(&data).expect("a string serializes");
    event("pusher_internal:member_removed", channel, &data)
}
