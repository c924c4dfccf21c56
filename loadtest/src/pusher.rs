//! The Pusher Channels protocol (version 7), as the generator speaks it with
//! `--protocol pusher`: the app (`--pusher-app ID:KEY:SECRET`), the upgrade path
//! (`/app/KEY?protocol=7`), `pusher:connection_established` and its socket id (the "welcome"),
//! signed `pusher:subscribe` to a private channel and its
//! `pusher_internal:subscription_succeeded` (the "room_joined"), and the client event
//! `client-msg` that carries the fan-out's stamp (the "room_message").
//!
//! A publisher sends `{"event":"client-msg","channel":C,"data":S}` where `S` is the very JSON
//! string the native mode puts in `room_message`'s `message` (the stamp, padded to `--size`);
//! the server relays it to the channel's other subscribers as it was sent, and receivers read
//! the stamp back from `data` just as they read `message`. Pusher envelopes carry `data` as a
//! JSON string holding JSON for the server's own events (`connection_established`), and as an
//! object in roomcast's `pusher:error` and `pusher:subscription_error`: both are accepted.
//!
//! Like [`crate::message`], this module does no I/O and depends on nothing of the server crate.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;

use crate::message::{json_str, Framing, ParseError, ServerMessage};

/// The protocol version asked for in the upgrade's query string.
pub const PROTOCOL_VERSION: u8 = 7;

/// The client event every publisher sends.
pub const CLIENT_EVENT: &str = "client-msg";

/// Client events are allowed on private (and presence) channels only; the generator uses
/// private ones, which have no member events.
pub const CHANNEL_PREFIX: &str = "private-";

/// `--pusher-app ID:KEY:SECRET`: the same value roomcast is started with.
#[derive(Clone, PartialEq, Eq)]
pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
}

/// The secret stays out of `--help` defaults, debug output and error messages.
impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("secret", &"<secret>")
            .finish()
    }
}

impl FromStr for App {
    type Err = String;

    /// `ID:KEY:SECRET`; the secret may itself hold `:` (as roomcast parses it).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut parts = spec.splitn(3, ':');
        let (Some(id), Some(key), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("expected ID:KEY:SECRET".to_owned());
        };
        if id.is_empty() || key.is_empty() || secret.is_empty() {
            return Err("expected ID:KEY:SECRET, none of them empty".to_owned());
        }
        if !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("the app id must be a number, got {id:?}"));
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        {
            return Err(format!(
                "the key {key:?} must be letters, digits and -_.~ (it is a path segment)"
            ));
        }
        Ok(App {
            id: id.to_owned(),
            key: key.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl App {
    /// The upgrade request's target: `/app/KEY?protocol=7`.
    pub fn path(&self) -> String {
        format!("/app/{}?protocol={PROTOCOL_VERSION}", self.key)
    }

    /// A private channel's `auth`: `KEY:hex(HMAC-SHA256(secret, "SOCKET_ID:CHANNEL"))`.
    pub fn channel_auth(&self, socket_id: &str, channel: &str) -> String {
        let signature = sign(&self.secret, &format!("{socket_id}:{channel}"));
        format!("{}:{signature}", self.key)
    }

    /// `{"event":"pusher:subscribe","data":{"channel":C,"auth":A}}`, signed for `socket_id`.
    pub fn subscribe(&self, socket_id: &str, channel: &str) -> Result<Vec<u8>, serde_json::Error> {
        #[derive(Serialize)]
        struct Data<'a> {
            channel: &'a str,
            auth: &'a str,
        }
        let auth = self.channel_auth(socket_id, channel);
        serde_json::to_vec(&Outgoing {
            event: "pusher:subscribe",
            channel: None,
            data: Data {
                channel,
                auth: &auth,
            },
        })
    }
}

/// `hex(HMAC-SHA256(secret, text))`, lowercase.
pub fn sign(secret: &str, text: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(text.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A frame the client sends.
#[derive(Serialize)]
struct Outgoing<'a, D: Serialize> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    data: D,
}

/// `{"event":"client-msg","channel":CHANNEL,"data":TEXT}`: `TEXT` as a JSON string.
pub fn client_event(channel: &str, text: &str) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Outgoing {
        event: CLIENT_EVENT,
        channel: Some(channel),
        data: text,
    })
}

/// The envelope of every server frame; `data` is left unparsed until needed.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// One server frame, borrowed from the payload where possible.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// `pusher:connection_established`: the first frame; its socket id signs subscriptions.
    ConnectionEstablished { socket_id: String },
    /// `pusher_internal:subscription_succeeded`: the reply to our subscribe.
    SubscriptionSucceeded { channel: Cow<'a, str> },
    /// `pusher:subscription_error`: the subscribe was refused (bad auth, bad name...).
    SubscriptionError {
        channel: Cow<'a, str>,
        error: String,
    },
    /// A client event relayed from another subscriber; `data` is `None` when it is not a JSON
    /// string (not one of ours).
    Relayed {
        event: Cow<'a, str>,
        data: Option<Cow<'a, str>>,
    },
    /// `pusher:error`: the server refused something we sent (`code: message`).
    Error { message: String },
    /// Anything else (`pusher:pong`, server events...): not needed here.
    Other { event: Cow<'a, str> },
}

impl<'a> Event<'a> {
    /// Parses a text frame's payload.
    pub fn parse(text: &'a [u8]) -> Result<Self, ParseError> {
        let raw: RawEvent<'a> =
            serde_json::from_slice(text).map_err(|e| ParseError::new(e.to_string()))?;
        Ok(match raw.event.as_ref() {
            event if event.starts_with("client-") => Event::Relayed {
                data: raw.data.and_then(json_str),
                event: raw.event,
            },
            "pusher:connection_established" => Event::ConnectionEstablished {
                socket_id: socket_id(raw.data)?,
            },
            "pusher_internal:subscription_succeeded" => Event::SubscriptionSucceeded {
                channel: raw.channel.unwrap_or_default(),
            },
            "pusher:subscription_error" => Event::SubscriptionError {
                channel: raw.channel.unwrap_or_default(),
                error: describe(raw.data),
            },
            "pusher:error" => Event::Error {
                message: describe(raw.data),
            },
            _ => Event::Other { event: raw.event },
        })
    }
}

/// The socket id in `connection_established`'s data: a JSON string holding an object
/// (an object itself is accepted too).
fn socket_id(data: Option<&RawValue>) -> Result<String, ParseError> {
    #[derive(Deserialize)]
    struct Established {
        socket_id: String,
    }
    let data = data.ok_or_else(|| ParseError::new("connection_established has no data".into()))?;
    let inner = match json_str(data) {
        Some(text) => serde_json::from_str::<Established>(&text),
        None => serde_json::from_str::<Established>(data.get()),
    };
    inner.map(|e| e.socket_id).map_err(|e| {
        ParseError::new(format!(
            "connection_established without a socket_id ({e}): {}",
            data.get()
        ))
    })
}

/// A readable account of an error's data: `code: message` (roomcast's `pusher:error`),
/// `type status: error` (a `subscription_error`), else the text as sent.
fn describe(data: Option<&RawValue>) -> String {
    #[derive(Deserialize)]
    struct Fields {
        code: Option<u64>,
        message: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
        error: Option<String>,
        status: Option<u64>,
    }
    let Some(data) = data else {
        return String::new();
    };
    let text = json_str(data).unwrap_or(Cow::Borrowed(data.get()));
    let Ok(fields) = serde_json::from_str::<Fields>(&text) else {
        return text.into_owned();
    };
    match fields {
        Fields {
            code: Some(code),
            message,
            ..
        } => format!("{code}: {}", message.unwrap_or_default()),
        Fields {
            kind: Some(kind),
            error,
            status,
            ..
        } => format!(
            "{kind}{}: {}",
            status.map_or_else(String::new, |s| format!(" {s}")),
            error.unwrap_or_default()
        ),
        _ => text.into_owned(),
    }
}

/// The fan-out's messages as Pusher client events (see the module's doc).
pub struct Pusher;

impl Framing for Pusher {
    #[inline]
    fn room_message(channel: &str, text: &str) -> Result<Vec<u8>, serde_json::Error> {
        client_event(channel, text)
    }

    /// `client-msg` is the fan-out's delivery; any other client event is foreign traffic;
    /// both kinds of refusal are errors; the rest is counted as other traffic.
    #[inline]
    fn parse(payload: &[u8]) -> Result<ServerMessage<'_>, ParseError> {
        Ok(match Event::parse(payload)? {
            Event::Relayed { event, data } if event == CLIENT_EVENT => {
                ServerMessage::RoomMessage { message: data }
            }
            Event::Relayed { .. } => ServerMessage::RoomMessage { message: None },
            Event::Error { message } => ServerMessage::Error { message },
            Event::SubscriptionError { channel, error } => ServerMessage::Error {
                message: format!("subscription to {channel} refused: {error}"),
            },
            Event::ConnectionEstablished { socket_id } => ServerMessage::Welcome {
                client_id: Cow::Owned(socket_id),
            },
            Event::SubscriptionSucceeded { .. } => ServerMessage::Other {
                kind: Cow::Borrowed("pusher_internal:subscription_succeeded"),
            },
            Event::Other { event } => ServerMessage::Other { kind: event },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Stamp;

    fn app() -> App {
        "1001:278d425bdf160c739803:7ad3773142a6692b25b8"
            .parse()
            .unwrap()
    }

    #[test]
    fn signing_matches_pushers_documented_example() {
        // pusher.com/docs/channels/library_auth_reference/auth-signatures
        assert_eq!(
            sign("7ad3773142a6692b25b8", "1234.1234:private-foobar"),
            "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        assert_eq!(
            app().channel_auth("1234.1234", "private-foobar"),
            "278d425bdf160c739803:\
             58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }

    #[test]
    fn subscribe_is_signed_for_the_socket_and_channel() {
        let frame = app().subscribe("1234.1234", "private-foobar").unwrap();
        assert_eq!(
            frame,
            br#"{"event":"pusher:subscribe","data":{"channel":"private-foobar","auth":"278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"}}"#
        );
    }

    #[test]
    fn apps_are_id_key_secret() {
        let app: App = "1:key:sec:ret".parse().unwrap();
        assert_eq!((&*app.id, &*app.key, &*app.secret), ("1", "key", "sec:ret"));
        assert_eq!(app.path(), "/app/key?protocol=7");
        assert!(!format!("{app:?}").contains("sec:ret"));
        for bad in ["", "1:key", "1::s", "x:key:s", "1:a/b:s", "1:a?b:s"] {
            assert!(bad.parse::<App>().is_err(), "{bad}");
        }
    }

    #[test]
    fn connection_established_gives_the_socket_id() {
        let frame = br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"123.45\",\"activity_timeout\":30}"}"#;
        assert_eq!(
            Event::parse(frame),
            Ok(Event::ConnectionEstablished {
                socket_id: "123.45".into()
            })
        );
        // Through the fan-out's parser: the welcome.
        assert_eq!(
            Pusher::parse(frame),
            Ok(ServerMessage::Welcome {
                client_id: "123.45".into()
            })
        );
        // Data as an object is read too; without a socket id it is an error.
        assert_eq!(
            Event::parse(
                br#"{"event":"pusher:connection_established","data":{"socket_id":"1.2"}}"#
            ),
            Ok(Event::ConnectionEstablished {
                socket_id: "1.2".into()
            })
        );
        assert!(Event::parse(br#"{"event":"pusher:connection_established","data":"{}"}"#).is_err());
        assert!(Event::parse(br#"{"event":"pusher:connection_established"}"#).is_err());
    }

    #[test]
    fn a_client_event_carries_the_stamp_as_its_data_string() {
        let stamp = Stamp {
            publisher: 3,
            seq: 42,
            sent_ns: 1_000_000_007,
        };
        let mut text = String::new();
        stamp.encode_into(&mut text, 40);
        let frame = Pusher::room_message("private-room-0", &text).unwrap();
        assert_eq!(
            std::str::from_utf8(&frame).unwrap(),
            format!(r#"{{"event":"client-msg","channel":"private-room-0","data":"{text}"}}"#)
        );
    }

    #[test]
    fn a_relayed_client_event_is_a_delivery() {
        let stamp = Stamp {
            publisher: 0,
            seq: 7,
            sent_ns: 99,
        };
        let mut text = String::new();
        stamp.encode_into(&mut text, 64);
        // What roomcast relays: the sender's frame, `data` as sent.
        let relayed =
            format!(r#"{{"event":"client-msg","channel":"private-room-0","data":"{text}"}}"#);
        let ServerMessage::RoomMessage { message: Some(m) } =
            Pusher::parse(relayed.as_bytes()).unwrap()
        else {
            panic!("not a delivery")
        };
        assert!(matches!(m, Cow::Borrowed(_)), "no copy for plain strings");
        assert_eq!(Stamp::decode(&m), Some(stamp));
        // On a presence channel roomcast adds the sender's user_id: still a delivery.
        let with_user =
            br#"{"event":"client-msg","channel":"presence-x","data":"lt:0:1:2:x","user_id":"u"}"#;
        assert!(matches!(
            Pusher::parse(with_user),
            Ok(ServerMessage::RoomMessage { message: Some(_) })
        ));
        // Structured data, or another client event: foreign.
        assert_eq!(
            Pusher::parse(br#"{"event":"client-msg","channel":"private-a","data":{"x":1}}"#),
            Ok(ServerMessage::RoomMessage { message: None })
        );
        assert_eq!(
            Pusher::parse(br#"{"event":"client-other","channel":"private-a","data":"lt:0:1:2:"}"#),
            Ok(ServerMessage::RoomMessage { message: None })
        );
    }

    #[test]
    fn subscriptions_and_errors_parse() {
        assert_eq!(
            Event::parse(
                br#"{"event":"pusher_internal:subscription_succeeded","channel":"private-a","data":"{}"}"#
            ),
            Ok(Event::SubscriptionSucceeded {
                channel: "private-a".into()
            })
        );
        assert_eq!(
            Event::parse(
                br#"{"event":"pusher:subscription_error","channel":"private-a","data":{"type":"AuthError","error":"Invalid signature","status":401}}"#
            ),
            Ok(Event::SubscriptionError {
                channel: "private-a".into(),
                error: "AuthError 401: Invalid signature".into()
            })
        );
        let over_rate = br#"{"event":"pusher:error","data":{"code":4301,"message":"Client event rejected due to rate limit"}}"#;
        assert_eq!(
            Pusher::parse(over_rate),
            Ok(ServerMessage::Error {
                message: "4301: Client event rejected due to rate limit".into()
            })
        );
        assert_eq!(
            Pusher::parse(br#"{"event":"pusher:pong","data":"{}"}"#),
            Ok(ServerMessage::Other {
                kind: "pusher:pong".into()
            })
        );
        assert!(Event::parse(b"not json").is_err());
        assert!(Event::parse(br#"{"type":"welcome"}"#).is_err());
    }
}
