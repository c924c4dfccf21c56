//! What goes over the wire: client messages out (serde_json), server messages in, and the
//! latency stamp carried inside a `room_message`'s `message` string. [`Framing`] is how the
//! fan-out picks its protocol's frames: [`Native`] here, [`crate::pusher::Pusher`] beside it.
//!
//! This module owns every protocol field name the load generator relies on (see the project's
//! `PROTOCOL.md`) and does no I/O, so it is unit-tested on its own. It depends on nothing of the
//! server crate: the generator drives any server that speaks the protocol.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A message the client sends, encoded with serde_json as
/// `{"type":"join_room","room":"..."}` and so on.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage<'a> {
    JoinRoom {
        room: &'a str,
        /// `Some`: `"since":{}`, opting in to offsets (a server with history then sends each
        /// room message's offset-carrying frame to this connection).
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<FromNow>,
    },
    LeaveRoom {
        room: &'a str,
    },
    RoomMessage {
        room: &'a str,
        message: &'a str,
    },
}

/// `{}`: a join's `since` that asks for offsets from now on.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FromNow {}

impl ClientMessage<'_> {
    /// The JSON text of the message.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

/// The fields of a server message the generator looks at; everything else is skipped unparsed.
#[derive(Deserialize)]
struct RawServerMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client_id: Option<Cow<'a, str>>,
    #[serde(default)]
    members: Option<u64>,
}

/// One server message, borrowed from the frame's payload where possible.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    /// `{"type":"welcome","client_id":...}`: the first message on every connection.
    Welcome { client_id: Cow<'a, str> },
    /// `{"type":"room_joined","room":...,"members":N}`: the reply to our `join_room`.
    RoomJoined { room: Cow<'a, str>, members: u64 },
    /// `{"type":"room_message",...,"message":M}`: a fan-out delivery. `message` is `None` when
    /// `M` is not a JSON string (another client may relay structured payloads).
    RoomMessage { message: Option<Cow<'a, str>> },
    /// `{"type":"error","message":...}`: the server refused something we sent.
    Error { message: String },
    /// Any other type (`member_joined`, `member_left`, `broadcast`, ...): not needed here.
    Other { kind: Cow<'a, str> },
}

/// A server frame that is not a protocol message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("server sent a message that is not protocol JSON: {0}")]
pub struct ParseError(String);

impl ParseError {
    pub fn new(reason: String) -> Self {
        Self(reason)
    }
}

impl<'a> ServerMessage<'a> {
    /// Parses a text frame's payload.
    pub fn parse(text: &'a [u8]) -> Result<Self, ParseError> {
        let raw: RawServerMessage<'a> =
            serde_json::from_slice(text).map_err(|e| ParseError(e.to_string()))?;
        Ok(match raw.kind.as_ref() {
            "welcome" => ServerMessage::Welcome {
                client_id: raw.client_id.unwrap_or_default(),
            },
            "room_joined" => ServerMessage::RoomJoined {
                room: raw.room.unwrap_or_default(),
                members: raw.members.unwrap_or(0),
            },
            "room_message" => ServerMessage::RoomMessage {
                message: raw.message.and_then(json_str),
            },
            "error" => ServerMessage::Error {
                message: raw
                    .message
                    .map(|m| json_str(m).map_or_else(|| m.get().to_owned(), Cow::into_owned))
                    .unwrap_or_default(),
            },
            _ => ServerMessage::Other { kind: raw.kind },
        })
    }
}

/// The string inside a raw JSON value, borrowed when it has no escapes; `None` if not a string.
pub fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(text).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// The frames of the fan-out's hot path in one protocol: a publisher's stamped message out, and
/// any server frame in, read as the [`ServerMessage`] the receivers account for (a delivery
/// is a `RoomMessage`). Static functions, so the scenario's loops are compiled once per
/// protocol and native mode pays nothing for the choice.
pub trait Framing {
    /// The frame that publishes `text` (the padded stamp) to `room`.
    fn room_message(room: &str, text: &str) -> Result<Vec<u8>, serde_json::Error>;
    /// A text frame's payload, as the fan-out reads it.
    fn parse(payload: &[u8]) -> Result<ServerMessage<'_>, ParseError>;
}

/// roomcast's own protocol: `room_message` out, [`ServerMessage::parse`] in.
pub struct Native;

impl Framing for Native {
    #[inline]
    fn room_message(room: &str, text: &str) -> Result<Vec<u8>, serde_json::Error> {
        ClientMessage::RoomMessage {
            room,
            message: text,
        }
        .encode()
    }

    #[inline]
    fn parse(payload: &[u8]) -> Result<ServerMessage<'_>, ParseError> {
        ServerMessage::parse(payload)
    }
}

/// What a publisher embeds in each message: who sent it, its sequence number, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Index of the publisher within this run.
    pub publisher: u32,
    /// 0, 1, 2... per publisher: gaps are losses, a smaller number than the last is a reorder.
    pub seq: u64,
    /// [`crate::clock::now_ns`] just before the frame was written.
    pub sent_ns: u64,
}

/// Every stamped message starts with this, so foreign room traffic is told apart.
const STAMP_PREFIX: &str = "lt:";

impl Stamp {
    /// Writes `lt:<publisher>:<seq>:<sent_ns>:` into `out` (cleared first), then pads it with `x`
    /// up to `size` bytes so payload size can be chosen; never shorter than the stamp itself.
    pub fn encode_into(&self, out: &mut String, size: usize) {
        out.clear();
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "{STAMP_PREFIX}{}:{}:{}:",
            self.publisher, self.seq, self.sent_ns
        );
        if out.len() < size {
            out.extend(std::iter::repeat('x').take(size - out.len()));
        }
    }

    /// Reads a stamp back; `None` for any text that is not one of ours.
    pub fn decode(text: &str) -> Option<Stamp> {
        let mut fields = text.strip_prefix(STAMP_PREFIX)?.splitn(4, ':');
        let publisher = fields.next()?.parse().ok()?;
        let seq = fields.next()?.parse().ok()?;
        let sent_ns = fields.next()?.parse().ok()?;
        // The fourth piece (padding) must exist: it proves the third field was terminated.
        fields.next()?;
        Some(Stamp {
            publisher,
            seq,
            sent_ns,
        })
    }
}

/// `--payload realistic`: appends to `out` a deterministic JSON broadcast event of about 1 KB,
/// shaped as a Laravel app broadcasts an `OrderShipped` event (the event name, its payload of
/// an order with customer, items, shipping and timestamps, a notification text, `socket`).
/// Its ids and order number follow `seq`, so consecutive messages differ as real ones do, and
/// nothing is random: a run compresses the same way every time.
pub fn realistic_body(out: &mut String, publisher: u32, seq: u64) {
    let order = 480_000 + seq;
    let customer = 10_000 + (seq * 7919) % 90_000;
    let minute = seq % 60;
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        concat!(
            r#"{{"event":"{event}","data":{{"order":{{"id":{order},"#,
            r#""number":"ORD-2024-{order:06}","status":"shipped","customer":{{"id":{customer},"#,
            r#""name":"Amelia Hartmann","email":"amelia.hartmann@example.com","locale":"de_DE"}},"#,
            r#""items":[{{"sku":"KB-104-BRN","name":"Mechanical keyboard, brown switches","#,
            r#""quantity":1,"unit_price":"89.00"}},{{"sku":"MS-220","name":"Wireless mouse","#,
            r#""quantity":2,"unit_price":"24.90"}},{{"sku":"CB-USB-C-2M","name":"USB-C cable 2 m","#,
            r#""quantity":1,"unit_price":"9.90"}}],"subtotal":"148.70","shipping_cost":"4.90","#,
            r#""total":"153.60","currency":"EUR","shipping":{{"carrier":"DHL","#,
            r#""service":"Paket","tracking_number":"JD01460000{order:010}","#,
            r#""estimated_delivery":"2024-05-14T16:00:00+02:00"}},"#,
            r#""created_at":"2024-05-12T09:31:07.000000Z","#,
            r#""updated_at":"2024-05-13T14:{minute:02}:55.000000Z"}},"#,
            r#""notification":{{"id":"9b1c6f0e-3d2a-4c8e-9f51-{order:012}","type":"order.shipped","#,
            r#""title":"Your order has shipped","#,
            r#""body":"Good news! Order ORD-2024-{order:06} has left our warehouse and is on its way with DHL. You can follow it with the tracking number below.","#,
            r#""action_url":"https://shop.example.com/account/orders/{order}","read_at":null}},"#,
            r#""channel":"private-App.Models.User.{customer}","publisher":{publisher}}},"socket":null}}"#
        ),
        // `App\Events\OrderShipped`, JSON-escaped (an argument: concat! would unescape it).
        event = r"App\\Events\\OrderShipped",
        order = order,
        customer = customer,
        minute = minute,
        publisher = publisher,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_have_the_protocol_shape() {
        let join = ClientMessage::JoinRoom {
            room: "r\"1",
            since: None,
        }
        .encode()
        .unwrap();
        assert_eq!(join, br#"{"type":"join_room","room":"r\"1"}"#);
        let msg = ClientMessage::RoomMessage {
            room: "lobby",
            message: "hi",
        }
        .encode()
        .unwrap();
        assert_eq!(
            msg,
            br#"{"type":"room_message","room":"lobby","message":"hi"}"#
        );
        let leave = ClientMessage::LeaveRoom { room: "lobby" }.encode().unwrap();
        assert_eq!(leave, br#"{"type":"leave_room","room":"lobby"}"#);
    }

    #[test]
    fn stamp_round_trips_through_padding_and_json() {
        let stamp = Stamp {
            publisher: 7,
            seq: 123_456,
            sent_ns: 9_876_543_210,
        };
        let mut text = String::new();
        stamp.encode_into(&mut text, 100);
        assert_eq!(text.len(), 100);
        assert!(text.starts_with("lt:7:123456:9876543210:x"));
        assert_eq!(Stamp::decode(&text), Some(stamp));

        // Smaller than the stamp: the stamp is kept whole.
        stamp.encode_into(&mut text, 0);
        assert_eq!(text, "lt:7:123456:9876543210:");
        assert_eq!(Stamp::decode(&text), Some(stamp));

        // Through the server's relay format.
        let frame = format!(
            r#"{{"type":"room_message","room":"r","from":"client_1","message":"{text}","timestamp":5}}"#
        );
        let ServerMessage::RoomMessage { message: Some(m) } =
            ServerMessage::parse(frame.as_bytes()).unwrap()
        else {
            panic!("not a room message")
        };
        assert!(matches!(m, Cow::Borrowed(_)), "no copy for plain strings");
        assert_eq!(Stamp::decode(&m), Some(stamp));
    }

    #[test]
    fn the_realistic_body_is_stamped_json_of_about_a_kilobyte() {
        let stamp = Stamp {
            publisher: 3,
            seq: 42,
            sent_ns: 123_456_789,
        };
        let mut text = String::new();
        stamp.encode_into(&mut text, 0);
        realistic_body(&mut text, 3, 42);
        assert!((900..1300).contains(&text.len()), "{}", text.len());
        assert_eq!(Stamp::decode(&text), Some(stamp));
        let body = text.strip_prefix("lt:3:42:123456789:").unwrap();
        let event: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(event["event"], "App\\Events\\OrderShipped");
        assert_eq!(event["data"]["order"]["id"], 480_042);
        // Deterministic, and the next message differs.
        let mut again = String::new();
        realistic_body(&mut again, 3, 42);
        assert_eq!(again, body);
        let mut next = String::new();
        realistic_body(&mut next, 3, 43);
        assert_ne!(next, body);
        // Through the relay it is an escaped string; the stamp still reads back.
        let frame = ClientMessage::RoomMessage {
            room: "r",
            message: &text,
        }
        .encode()
        .unwrap();
        let frame = String::from_utf8(frame).unwrap().replace(
            r#""type":"room_message""#,
            r#""type":"room_message","from":"c""#,
        );
        let ServerMessage::RoomMessage { message: Some(m) } =
            ServerMessage::parse(frame.as_bytes()).unwrap()
        else {
            panic!("not a room message")
        };
        assert_eq!(m, text);
        assert_eq!(Stamp::decode(&m), Some(stamp));
    }

    #[test]
    fn foreign_messages_are_not_stamps() {
        for text in [
            "",
            "hello",
            "lt:",
            "lt:1:2",
            "lt:1:2:3",
            "lt:a:2:3:",
            "lt:1:2:-3:",
        ] {
            assert_eq!(Stamp::decode(text), None, "{text}");
        }
    }

    #[test]
    fn server_messages_parse() {
        assert_eq!(
            ServerMessage::parse(br#"{"type":"welcome","client_id":"client_ab","timestamp":1}"#),
            Ok(ServerMessage::Welcome {
                client_id: "client_ab".into()
            })
        );
        assert_eq!(
            ServerMessage::parse(br#"{"type":"room_joined","room":"r","members":3}"#),
            Ok(ServerMessage::RoomJoined {
                room: "r".into(),
                members: 3
            })
        );
        assert_eq!(
            ServerMessage::parse(
                br#"{"type":"error","message":"You are not in this room","timestamp":1}"#
            ),
            Ok(ServerMessage::Error {
                message: "You are not in this room".into()
            })
        );
        assert_eq!(
            ServerMessage::parse(
                br#"{"type":"member_joined","room":"r","client_id":"c","total_members":2}"#
            ),
            Ok(ServerMessage::Other {
                kind: "member_joined".into()
            })
        );
        // Escapes and structured bodies.
        assert_eq!(
            ServerMessage::parse(br#"{"type":"room_message","message":"a\"b"}"#),
            Ok(ServerMessage::RoomMessage {
                message: Some("a\"b".into())
            })
        );
        assert_eq!(
            ServerMessage::parse(br#"{"type":"room_message","message":{"x":1}}"#),
            Ok(ServerMessage::RoomMessage { message: None })
        );
        assert!(ServerMessage::parse(b"not json").is_err());
        assert!(ServerMessage::parse(br#"{"no_type":1}"#).is_err());
    }
}
