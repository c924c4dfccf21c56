//! The seed wire format, in one place: decoding client JSON and encoding server frames.
//!
//! This module owns every field name and every error text of the protocol in
//! `shared/PROTOCOL.md` (the Ratchet seed server's contract). It does no I/O.
//!
//! Decoding reads the top-level object of a client's text with serde_json and keeps every
//! field as a slice of the received payload: `message` and the values of `metadata` are relayed
//! byte for byte, as the client wrote them, never re-encoded. Encoding writes the JSON of a
//! server message *and* the complete, unmasked WebSocket frame header into one buffer, so a
//! message that fans out to many recipients is serialized exactly once and shared as [`Bytes`].

use std::borrow::Cow;
use std::collections::hash_map::{Entry, HashMap};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use thin_vec::ThinVec;

/// Error texts of the seed, verbatim. Clients match on these strings.
pub mod errors {
    pub const INVALID_FORMAT: &str = "Invalid message format";
    pub const UNKNOWN_TYPE_PREFIX: &str = "Unknown message type: ";
    pub const ROOM_REQUIRED: &str = "Room name required";
    pub const ROOM_NOT_FOUND: &str = "Room does not exist";
    pub const NOT_IN_ROOM: &str = "You are not in this room";
    pub const RECIPIENT_NOT_FOUND: &str = "Recipient not found";
    // The seed crashes on these inputs (a PHP TypeError); roomcast answers instead.
    pub const ROOM_NOT_STRING: &str = "Room name must be a string";
    pub const RECIPIENT_NOT_STRING: &str = "Recipient id must be a string";
    pub const METADATA_NOT_OBJECT: &str = "Metadata must be an object";
    // Only with token auth: the token's `rooms` claim does not list the room.
    pub const ROOM_NOT_ALLOWED: &str = "Not allowed to join this room";
    // Only with history on, in cluster mode: Redis, which keeps it, did not answer.
    pub const HISTORY_UNAVAILABLE: &str = "History is unavailable";
}

/// A message body: what goes after `"message":` in the frames relayed to the recipients.
#[derive(Debug)]
pub enum Body<'a> {
    /// A string, written escaped (how the server's own Rust callers pass text).
    Text(Cow<'a, str>),
    /// JSON text written byte for byte: the client's `message` exactly as it arrived (any value:
    /// a string with its escapes as sent, a number with all its digits, an object with its
    /// spacing), a slice of the received payload.
    Raw(&'a RawValue),
}

impl Body<'_> {
    fn empty() -> Self {
        Body::Text(Cow::Borrowed(""))
    }
}

/// One decoded client command. Borrowed from the frame's payload buffer.
#[derive(Debug)]
pub enum Command<'a> {
    Broadcast {
        message: Body<'a>,
    },
    JoinRoom {
        room: Cow<'a, str>,
        /// `since`, when the client opted in to the room's offsets (history).
        since: Option<Since>,
    },
    LeaveRoom {
        room: Cow<'a, str>,
    },
    RoomMessage {
        room: Cow<'a, str>,
        message: Body<'a>,
    },
    PrivateMessage {
        to: Cow<'a, str>,
        message: Body<'a>,
    },
    SetMetadata {
        metadata: MetadataUpdate<'a>,
    },
    /// `{"type":"history","room":R,"limit":N}` (with history on): the room's last messages.
    History {
        room: Cow<'a, str>,
        limit: Option<u64>,
    },
}

/// What a joining client says it saw of a room's history (`join_room`'s `since`): it opts in
/// to offsets on that room's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// `"since":{}`: nothing yet, offsets from now on.
    Now,
    /// `"since":{"offset":O,"epoch":E}`: it saw up to `offset` of the history with `epoch`.
    Saw { offset: u64, epoch: Box<str> },
}

/// The `since` object: `{}`, or `offset` (an integer, 0 or more) and `epoch` (a string)
/// together.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinceFields {
    offset: Option<u64>,
    epoch: Option<Box<str>>,
}

fn since_field(value: Option<&RawValue>) -> Result<Option<Since>, DecodeError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let fields: SinceFields =
        serde_json::from_str(value.get()).map_err(|_| DecodeError::InvalidSince)?;
    match (fields.offset, fields.epoch) {
        (None, None) => Ok(Some(Since::Now)),
        (Some(offset), Some(epoch)) => Ok(Some(Since::Saw { offset, epoch })),
        _ => Err(DecodeError::InvalidSince),
    }
}

fn limit_field(value: Option<&RawValue>) -> Result<Option<u64>, DecodeError> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.get().parse::<u64>() {
        Ok(limit) if limit > 0 => Ok(Some(limit)),
        _ => Err(DecodeError::InvalidLimit),
    }
}

/// The `metadata` object of one `set_metadata`, borrowed from the payload: keys unescaped, each
/// value the client's JSON text, in the order sent (a key sent twice appears twice; merging
/// keeps the last value).
#[derive(Debug, Default)]
pub struct MetadataUpdate<'a> {
    entries: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> MetadataUpdate<'a> {
    /// The entries as sent.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.entries
            .iter()
            .map(|(key, value)| (key.as_ref(), *value))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A connection's metadata: each key once, in the order first set, with the JSON text its
/// last `set_metadata` gave it, kept verbatim (`1E5` stays `1E5`). A thin vector: one pointer,
/// and no allocation while empty, since every connection holds one.
#[derive(Debug, Default, Clone)]
pub struct Metadata {
    entries: ThinVec<(Box<str>, Box<RawValue>)>,
}

impl Metadata {
    /// `self` with `update` merged over it, as PHP's `array_merge`: a key already there keeps
    /// its place and takes the new value, a new key is appended; within `update` the last of
    /// a repeated key wins. `self` is left as it was, so a refused merge changes nothing.
    pub fn merged(&self, update: &MetadataUpdate<'_>) -> Metadata {
        let mut entries = self.entries.clone();
        let mut place: HashMap<&str, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(at, (key, _))| (key.as_ref(), at))
            .collect();
        for (key, value) in &update.entries {
            match place.entry(key.as_ref()) {
                Entry::Occupied(at) => entries[*at.get()].1 = (*value).to_owned(),
                Entry::Vacant(slot) => {
                    slot.insert(entries.len());
                    entries.push((Box::from(key.as_ref()), (*value).to_owned()));
                }
            }
        }
        Metadata { entries }
    }

    /// The entries, in order, each value as JSON text.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.entries
            .iter()
            .map(|(key, value)| (key.as_ref(), value.as_ref()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Why a client's text could not become a [`Command`]. Each maps to the `error` reply text the
/// client receives; the connection always stays open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON, not an object, or no usable `type`.
    #[error("Invalid message format")]
    InvalidFormat,
    /// A `type` string the protocol does not know.
    #[error("Unknown message type: {0}")]
    UnknownType(String),
    /// `room` present but not a string.
    #[error("Room name must be a string")]
    RoomNotString,
    /// `to` present but not a string.
    #[error("Recipient id must be a string")]
    RecipientNotString,
    /// `metadata` present but not an object.
    #[error("Metadata must be an object")]
    MetadataNotObject,
    /// `since` present but not `{}` or `{"offset": N, "epoch": "E"}`.
    #[error("Since must be {{}} or an object with offset and epoch")]
    InvalidSince,
    /// `limit` present but not a positive integer.
    #[error("Limit must be a positive integer")]
    InvalidLimit,
}

/// Decodes one client message. Nothing is copied or rewritten: the command's strings (when
/// they hold no escapes), its `message` and its metadata values are slices of `payload`.
///
/// The whole payload must be one JSON object (valid UTF-8, nothing after it but whitespace).
/// Of a key sent more than once the last occurrence counts, as with PHP's `json_decode`.
pub fn decode(payload: &[u8]) -> Result<Command<'_>, DecodeError> {
    let mut reader = serde_json::Deserializer::from_slice(payload);
    let fields = reader
        .deserialize_map(FieldsVisitor)
        .map_err(|_| DecodeError::InvalidFormat)?;
    reader.end().map_err(|_| DecodeError::InvalidFormat)?;
    // Missing or null `type` is the seed's "Invalid message format"; a non-string `type` is
    // refused the same way instead of PHP's loose comparison.
    let kind = fields
        .kind
        .and_then(json_string)
        .ok_or(DecodeError::InvalidFormat)?;
    let command = match kind.as_ref() {
        "broadcast" => Command::Broadcast {
            message: body(fields.message),
        },
        "join_room" => Command::JoinRoom {
            room: string_field(fields.room, DecodeError::RoomNotString)?,
            since: since_field(fields.since)?,
        },
        "history" => Command::History {
            room: string_field(fields.room, DecodeError::RoomNotString)?,
            limit: limit_field(fields.limit)?,
        },
        "leave_room" => Command::LeaveRoom {
            room: string_field(fields.room, DecodeError::RoomNotString)?,
        },
        "room_message" => Command::RoomMessage {
            room: string_field(fields.room, DecodeError::RoomNotString)?,
            message: body(fields.message),
        },
        "private_message" => Command::PrivateMessage {
            to: string_field(fields.to, DecodeError::RecipientNotString)?,
            message: body(fields.message),
        },
        "set_metadata" => Command::SetMetadata {
            metadata: metadata_field(fields.metadata)?,
        },
        _ => return Err(DecodeError::UnknownType(kind.into_owned())),
    };
    Ok(command)
}

/// The fields of a client message the protocol reads, each the raw JSON text of its value
/// (`null` counts as missing). Interpreted only once the whole object has been read, so the
/// last of a repeated key wins for every field alike.
#[derive(Default)]
struct Fields<'a> {
    kind: Option<&'a RawValue>,
    room: Option<&'a RawValue>,
    to: Option<&'a RawValue>,
    message: Option<&'a RawValue>,
    metadata: Option<&'a RawValue>,
    since: Option<&'a RawValue>,
    limit: Option<&'a RawValue>,
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            // Every value is read as raw text, unknown keys' too: serde_json then checks that
            // it is valid UTF-8, which it does not for a skipped value.
            let value: &'de RawValue = map.next_value()?;
            let value = (value.get() != "null").then_some(value);
            match key {
                Key::Type => fields.kind = value,
                Key::Room => fields.room = value,
                Key::To => fields.to = value,
                Key::Message => fields.message = value,
                Key::Metadata => fields.metadata = value,
                Key::Since => fields.since = value,
                Key::Limit => fields.limit = value,
                Key::Other => {}
            }
        }
        Ok(fields)
    }
}

/// A top-level key, matched after unescaping (`"typ\u0065"` is `type`).
enum Key {
    Type,
    Room,
    To,
    Message,
    Metadata,
    Since,
    Limit,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "type" => Key::Type,
                    "room" => Key::Room,
                    "to" => Key::To,
                    "message" => Key::Message,
                    "metadata" => Key::Metadata,
                    "since" => Key::Since,
                    "limit" => Key::Limit,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// The text of a JSON string value, unescaped: borrowed from the payload when it holds no
/// escape. `None` when the value is not a string.
fn json_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let json = raw.get();
    // `raw` is one whole, valid JSON value: one that starts with a quote is a string, and ends
    // with its closing quote.
    let inner = json.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.as_bytes().contains(&b'\\') {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(json).ok().map(Cow::Owned)
}

fn body(value: Option<&RawValue>) -> Body<'_> {
    value.map_or_else(Body::empty, Body::Raw)
}

fn string_field(
    value: Option<&RawValue>,
    not_string: DecodeError,
) -> Result<Cow<'_, str>, DecodeError> {
    match value {
        None => Ok(Cow::Borrowed("")),
        Some(value) => json_string(value).ok_or(not_string),
    }
}

fn metadata_field(value: Option<&RawValue>) -> Result<MetadataUpdate<'_>, DecodeError> {
    let Some(value) = value else {
        return Ok(MetadataUpdate::default());
    };
    serde_json::Deserializer::from_str(value.get())
        .deserialize_any(MetadataVisitor)
        .map_err(|_| DecodeError::MetadataNotObject)
}

/// Reads a metadata object that did not come from a client (the connect proxy's answer) into
/// entries to merge, values kept as written.
pub fn metadata_entries(value: &RawValue) -> Result<MetadataUpdate<'_>, DecodeError> {
    metadata_field(Some(value))
}

/// Reads a `metadata` value (already checked to be valid JSON) into its entries.
struct MetadataVisitor;

impl<'de> Visitor<'de> for MetadataVisitor {
    type Value = MetadataUpdate<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(MetadataKey(key)) = map.next_key()? {
            entries.push((key, map.next_value::<&'de RawValue>()?));
        }
        Ok(MetadataUpdate { entries })
    }

    /// PHP clients encode an empty object as `[]`: accept it as "nothing to merge".
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        match seq.next_element::<IgnoredAny>()? {
            None => Ok(MetadataUpdate::default()),
            Some(_) => Err(de::Error::custom("a non-empty array")),
        }
    }
}

/// A metadata key, borrowed from the payload unless it holds escapes.
struct MetadataKey<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for MetadataKey<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = MetadataKey<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Self::Value, E> {
                Ok(MetadataKey(Cow::Borrowed(key)))
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
                Ok(MetadataKey(Cow::Owned(key.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Unix time in whole seconds, as the seed's `time()`.
pub fn timestamp() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// WebSocket opcodes the server sends.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub enum OpCode {
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// Room left at the front of every frame buffer for the largest header an unmasked server frame
/// needs (2 + 8 bytes); the unused part is skipped when the frame is finished.
pub const MAX_HEADER: usize = 10;

/// Builds one complete server frame: payload first, then the header in front of it, in one
/// allocation, so the finished frame is a single [`Bytes`] any number of recipients can share.
pub struct FrameBuilder {
    buf: BytesMut,
}

impl FrameBuilder {
    pub fn with_capacity(payload_hint: usize) -> Self {
        let mut buf = BytesMut::with_capacity(MAX_HEADER + payload_hint);
        buf.put_bytes(0, MAX_HEADER);
        Self { buf }
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    fn string(&mut self, text: &str) -> &mut Self {
        // serde_json writes a `str` as an escaped JSON string; writing into memory cannot fail.
        let _ = serde_json::to_writer((&mut self.buf).writer(), text);
        self
    }

    fn number(&mut self, n: u64) -> &mut Self {
        let mut digits = itoa::Buffer::new();
        self.raw(digits.format(n).as_bytes())
    }

    fn body(&mut self, body: &Body<'_>) -> &mut Self {
        match body {
            Body::Text(text) => self.string(text),
            Body::Raw(json) => self.raw(json.get().as_bytes()),
        }
    }

    /// Writes the header in front of the payload and returns the finished frame.
    pub fn finish(mut self, opcode: OpCode) -> Bytes {
        let len = self.buf.len() - MAX_HEADER;
        // FIN + opcode; server frames are never masked.
        let (header, header_len) = frame_header(0x80 | opcode as u8, len);
        let start = MAX_HEADER - header_len;
        self.buf[start..MAX_HEADER].copy_from_slice(&header[..header_len]);
        let mut frame = self.buf.freeze();
        bytes::Buf::advance(&mut frame, start);
        frame
    }
}

/// A server frame's header (unmasked): its first byte (FIN, RSV bits, opcode) and the payload
/// length in the shortest form; the header and how many of its bytes are used.
pub fn frame_header(first: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut header = [0u8; MAX_HEADER];
    header[0] = first;
    let header_len = if len < 126 {
        header[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        header[1] = 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (header, header_len)
}

fn body_len_hint(body: &Body<'_>) -> usize {
    match body {
        Body::Text(text) => text.len() + 2,
        Body::Raw(json) => json.get().len(),
    }
}

/// `{"type":"welcome","client_id":…,"timestamp":…}`, with `"user_id":…` after the client id
/// when the connection authenticated with a token.
pub fn welcome(client_id: &str, user_id: Option<&str>, now: u64) -> Bytes {
    let mut f = FrameBuilder::with_capacity(96 + user_id.map_or(0, str::len));
    f.raw(br#"{"type":"welcome","client_id":"#)
        .string(client_id);
    if let Some(user_id) = user_id {
        f.raw(br#","user_id":"#).string(user_id);
    }
    f.raw(br#","timestamp":"#).number(now).raw(b"}");
    f.finish(OpCode::Text)
}

/// `{"type":"error","message":…,"timestamp":…}`
pub fn error(message: &str, now: u64) -> Bytes {
    let mut f = FrameBuilder::with_capacity(64 + message.len());
    f.raw(br#"{"type":"error","message":"#)
        .string(message)
        .raw(br#","timestamp":"#)
        .number(now)
        .raw(b"}");
    f.finish(OpCode::Text)
}

/// `{"type":"broadcast","from":…,"message":…,"timestamp":…}`
pub fn broadcast(from: &str, message: &Body<'_>, now: u64) -> Bytes {
    let mut f = FrameBuilder::with_capacity(80 + from.len() + body_len_hint(message));
    f.raw(br#"{"type":"broadcast","from":"#)
        .string(from)
        .raw(br#","message":"#)
        .body(message)
        .raw(br#","timestamp":"#)
        .number(now)
        .raw(b"}");
    f.finish(OpCode::Text)
}

/// `{"type":"room_joined","room":…,"members":N}` (no timestamp, as in the seed)
pub fn room_joined(room: &str, members: usize) -> Bytes {
    let mut f = FrameBuilder::with_capacity(48 + room.len());
    f.raw(br#"{"type":"room_joined","room":"#)
        .string(room)
        .raw(br#","members":"#)
        .number(members as u64)
        .raw(b"}");
    f.finish(OpCode::Text)
}

/// `{"type":"room_joined","room":…,"members":N,"offset":O,"epoch":E,"recovered":B}`: the
/// reply to a `join_room` with `since`, with history on.
pub fn room_joined_at(
    room: &str,
    members: usize,
    offset: u64,
    epoch: &str,
    recovered: bool,
) -> Bytes {
    let mut f = FrameBuilder::with_capacity(96 + room.len() + epoch.len());
    f.raw(br#"{"type":"room_joined","room":"#)
        .string(room)
        .raw(br#","members":"#)
        .number(members as u64)
        .raw(br#","offset":"#)
        .number(offset)
        .raw(br#","epoch":"#)
        .string(epoch)
        .raw(if recovered {
            br#","recovered":true}"#.as_slice()
        } else {
            br#","recovered":false}"#.as_slice()
        });
    f.finish(OpCode::Text)
}

/// `{"type":"history","room":…,"messages":[…],"offset":O,"epoch":E}`: each message the JSON
/// object of its offset-carrying `room_message`.
pub fn history(room: &str, messages: &[Bytes], offset: u64, epoch: &str) -> Bytes {
    let size: usize = messages.iter().map(|m| m.len() + 1).sum();
    let mut f = FrameBuilder::with_capacity(96 + room.len() + epoch.len() + size);
    f.raw(br#"{"type":"history","room":"#)
        .string(room)
        .raw(br#","messages":["#);
    for (at, message) in messages.iter().enumerate() {
        if at > 0 {
            f.raw(b",");
        }
        f.raw(message);
    }
    f.raw(br#"],"offset":"#)
        .number(offset)
        .raw(br#","epoch":"#)
        .string(epoch)
        .raw(b"}");
    f.finish(OpCode::Text)
}

/// The JSON text a server frame carries (past its 2-, 4- or 10-byte header).
pub fn frame_payload(frame: &Bytes) -> Bytes {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.slice(header.min(frame.len())..)
}

/// `{"type":"member_joined","room":…,"client_id":…,"total_members":N}`
pub fn member_joined(room: &str, client_id: &str, total_members: usize) -> Bytes {
    member_change(
        br#"{"type":"member_joined","room":"#,
        room,
        client_id,
        total_members,
    )
}

/// `{"type":"member_left","room":…,"client_id":…,"total_members":N}`
pub fn member_left(room: &str, client_id: &str, total_members: usize) -> Bytes {
    member_change(
        br#"{"type":"member_left","room":"#,
        room,
        client_id,
        total_members,
    )
}

fn member_change(prefix: &[u8], room: &str, client_id: &str, total: usize) -> Bytes {
    let mut f = FrameBuilder::with_capacity(80 + room.len() + client_id.len());
    f.raw(prefix)
        .string(room)
        .raw(br#","client_id":"#)
        .string(client_id)
        .raw(br#","total_members":"#)
        .number(total as u64)
        .raw(b"}");
    f.finish(OpCode::Text)
}

/// `{"type":"room_message","room":…,"from":…,"message":…,"timestamp":…}`
pub fn room_message(room: &str, from: &str, message: &Body<'_>, now: u64) -> Bytes {
    room_message_frame(room, from, message, now, None)
}

/// [`room_message`] with `"offset":O` after the timestamp: the frame of clients that opted in
/// to a room's history (the seed's frame stays byte for byte what it was).
pub fn room_message_at(room: &str, from: &str, message: &Body<'_>, now: u64, offset: u64) -> Bytes {
    room_message_frame(room, from, message, now, Some(offset))
}

fn room_message_frame(
    room: &str,
    from: &str,
    message: &Body<'_>,
    now: u64,
    offset: Option<u64>,
) -> Bytes {
    let mut f = FrameBuilder::with_capacity(112 + room.len() + from.len() + body_len_hint(message));
    f.raw(br#"{"type":"room_message","room":"#)
        .string(room)
        .raw(br#","from":"#)
        .string(from)
        .raw(br#","message":"#)
        .body(message)
        .raw(br#","timestamp":"#)
        .number(now);
    if let Some(offset) = offset {
        f.raw(br#","offset":"#).number(offset);
    }
    f.raw(b"}");
    f.finish(OpCode::Text)
}

/// `{"type":"private_message","from":…,"message":…,"timestamp":…}`
pub fn private_message(from: &str, message: &Body<'_>, now: u64) -> Bytes {
    let mut f = FrameBuilder::with_capacity(80 + from.len() + body_len_hint(message));
    f.raw(br#"{"type":"private_message","from":"#)
        .string(from)
        .raw(br#","message":"#)
        .body(message)
        .raw(br#","timestamp":"#)
        .number(now)
        .raw(b"}");
    f.finish(OpCode::Text)
}

/// `{"type":"metadata_updated","metadata":{…}}` (no timestamp, as in the seed)
///
/// Keys are written escaped by the server, values byte for byte as the client sent them.
pub fn metadata_updated(metadata: &Metadata) -> Bytes {
    let size: usize = metadata
        .entries()
        .map(|(key, value)| key.len() + value.get().len() + 4)
        .sum();
    let mut f = FrameBuilder::with_capacity(48 + size);
    f.raw(br#"{"type":"metadata_updated","metadata":{"#);
    for (at, (key, value)) in metadata.entries().enumerate() {
        if at > 0 {
            f.raw(b",");
        }
        f.string(key).raw(b":").raw(value.get().as_bytes());
    }
    f.raw(b"}}");
    f.finish(OpCode::Text)
}

/// The metadata object (`{…}`) inside a `metadata_updated` frame, sharing the frame's buffer:
/// what presence listings show, without a second encode.
pub fn metadata_object(frame: &Bytes) -> Bytes {
    const PREFIX: usize = r#"{"type":"metadata_updated","metadata":"#.len();
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.slice(header + PREFIX..frame.len() - 1)
}

/// Bytes of the metadata object inside a `metadata_updated` frame.
pub fn metadata_size(frame: &Bytes) -> usize {
    metadata_object(frame).len()
}

/// A text or binary message carrying `payload` as it is (the echo endpoint).
pub fn data(binary: bool, payload: &[u8]) -> Bytes {
    let mut f = FrameBuilder::with_capacity(payload.len());
    f.raw(payload);
    f.finish(if binary { OpCode::Binary } else { OpCode::Text })
}

/// The heartbeat's ping, without payload: a static frame, no allocation.
pub fn empty_ping() -> Bytes {
    const FRAME: [u8; 2] = [0x80 | OpCode::Ping as u8, 0];
    Bytes::from_static(&FRAME)
}

/// A ping with a payload (at most 125 bytes).
pub fn ping(payload: &[u8]) -> Bytes {
    let mut f = FrameBuilder::with_capacity(payload.len());
    f.raw(payload);
    f.finish(OpCode::Ping)
}

/// A pong answering a ping, echoing its payload (at most 125 bytes, checked by the reader).
pub fn pong(payload: &[u8]) -> Bytes {
    let mut f = FrameBuilder::with_capacity(payload.len());
    f.raw(payload);
    f.finish(OpCode::Pong)
}

/// A close frame with a status code (none when `code` is `None`, as RFC 6455 allows).
pub fn close(code: Option<u16>, reason: &str) -> Bytes {
    let mut f = FrameBuilder::with_capacity(2 + reason.len());
    if let Some(code) = code {
        f.raw(&code.to_be_bytes()).raw(reason.as_bytes());
    }
    f.finish(OpCode::Close)
}

/// Close codes roomcast sends (RFC 6455 section 7.4.1).
pub mod close_code {
    /// Normal closure, and the echo of a client's close without a code.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down: reconnect elsewhere.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame broke RFC 6455 (reserved bits, bad continuation, fragmented control frame...).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The client kept sending far over its rate limit.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// The client answered no ping within `--idle-timeout`.
    pub const IDLE_TIMEOUT: u16 = 4000;
    /// The token the connection authenticated with has expired (`exp`).
    pub const TOKEN_EXPIRED: u16 = 4001;

    /// The short reason sent in the close frame with `code`, for people reading a client's
    /// logs; empty for codes that explain themselves or echo the peer's.
    pub fn reason(code: Option<u16>) -> &'static str {
        match code {
            Some(GOING_AWAY) => "server shutting down",
            Some(MESSAGE_TOO_BIG) => "message too big",
            Some(POLICY_VIOLATION) => "rate limit exceeded",
            Some(TRY_AGAIN_LATER) => "slow consumer",
            Some(IDLE_TIMEOUT) => "idle timeout",
            Some(TOKEN_EXPIRED) => "token expired",
            _ => "",
        }
    }
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message exceeded the configured maximum size.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The client did not read its messages fast enough and its outbound queue filled up.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> serde_json::Value {
        let (len, start) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert_eq!(frame.len(), start + len, "header length matches payload");
        serde_json::from_slice(&frame[start..]).unwrap()
    }

    fn decode_str(text: &str) -> Result<String, DecodeError> {
        decode(text.as_bytes()).map(|c| format!("{c:?}"))
    }

    /// The JSON text of a server frame with a 2-byte header.
    fn text(frame: &Bytes) -> &str {
        std::str::from_utf8(&frame[2..]).unwrap()
    }

    /// The `message` of a broadcast of `json`, as the server relays it.
    fn relayed(json: &str) -> String {
        let input = format!(r#"{{"type":"broadcast","message":{json}}}"#);
        let Command::Broadcast { message } = decode(input.as_bytes()).unwrap() else {
            panic!("not a broadcast")
        };
        let frame = broadcast("c", &message, 1);
        let text = text(&frame);
        let inner = text
            .strip_prefix(r#"{"type":"broadcast","from":"c","message":"#)
            .and_then(|rest| rest.strip_suffix(r#","timestamp":1}"#))
            .unwrap_or_else(|| panic!("{text}"));
        inner.to_owned()
    }

    /// The metadata a fresh connection has after one `set_metadata` of `json`.
    fn metadata(json: &str) -> Metadata {
        let input = format!(r#"{{"type":"set_metadata","metadata":{json}}}"#);
        let Command::SetMetadata { metadata } = decode(input.as_bytes()).unwrap() else {
            panic!("not set_metadata")
        };
        Metadata::default().merged(&metadata)
    }

    #[test]
    fn frames_carry_fin_text_and_exact_length_for_every_header_size() {
        for size in [0usize, 125, 126, 65_535, 65_536, 200_000] {
            let text = "x".repeat(size);
            let frame = error(&text, 7);
            assert_eq!(frame[0], 0x81);
            assert_eq!(payload(&frame)["message"], text.as_str());
        }
    }

    #[test]
    fn the_static_empty_ping_is_the_encoded_empty_ping() {
        assert_eq!(empty_ping(), ping(b""));
        assert_eq!(&empty_ping()[..], &[0x89, 0x00]);
    }

    #[test]
    fn seed_field_order_and_names_are_kept() {
        let frame = room_message("lobby", "client_1", &Body::Text("hi".into()), 5);
        let json = std::str::from_utf8(&frame[2..]).unwrap();
        assert_eq!(
            json,
            r#"{"type":"room_message","room":"lobby","from":"client_1","message":"hi","timestamp":5}"#
        );
        let frame = member_left("r", "client_2", 3);
        assert_eq!(
            std::str::from_utf8(&frame[2..]).unwrap(),
            r#"{"type":"member_left","room":"r","client_id":"client_2","total_members":3}"#
        );
    }

    #[test]
    fn strings_are_escaped() {
        let frame = error("quote \" and \n newline", 1);
        assert_eq!(payload(&frame)["message"], "quote \" and \n newline");
    }

    #[test]
    fn the_metadata_object_is_sliced_out_of_its_frame() {
        let buf = br#"{"type":"set_metadata","metadata":{"n":1E5,"name":"ann"}}"#.to_vec();
        let Command::SetMetadata { metadata } = decode(&buf).unwrap() else {
            panic!("not set_metadata");
        };
        let frame = metadata_updated(&Metadata::default().merged(&metadata));
        assert_eq!(&metadata_object(&frame)[..], br#"{"n":1E5,"name":"ann"}"#);
        let empty = metadata_updated(&Metadata::default());
        assert_eq!(&metadata_object(&empty)[..], b"{}");
    }

    #[test]
    fn non_string_message_is_relayed_verbatim() {
        let buf = br#"{"type":"broadcast","message":{"a":[1,2.5,true,null]}}"#;
        let Command::Broadcast { message } = decode(buf).unwrap() else {
            panic!("not a broadcast")
        };
        let frame = broadcast("client_x", &message, 1);
        assert_eq!(
            payload(&frame)["message"],
            serde_json::json!({"a":[1,2.5,true,null]})
        );
    }

    #[test]
    fn every_message_is_relayed_byte_for_byte() {
        for json in [
            "1E5",
            "3.141592653589793238",
            "123456789012345678901234567890",
            "-0.0",
            "1e-400",
            r#""caf\u00e9 \n \/""#,
            r#""café""#,
            r#"{ "n" : [1.10, 2E+3] ,"s":"\""}"#,
            "[ ]",
            "true",
        ] {
            assert_eq!(relayed(json), json);
        }
        // Whitespace around the value is not part of it.
        assert_eq!(
            relayed(" \n 1.50 \t").as_str(),
            "1.50",
            "no surrounding whitespace"
        );
        // Missing and null are the seed's empty string.
        assert_eq!(relayed("null"), r#""""#);
        let Command::Broadcast { message } = decode(br#"{"type":"broadcast"}"#).unwrap() else {
            panic!()
        };
        assert_eq!(
            text(&broadcast("c", &message, 1)),
            r#"{"type":"broadcast","from":"c","message":"","timestamp":1}"#
        );
    }

    #[test]
    fn the_last_of_a_repeated_key_wins_for_every_field() {
        assert_eq!(
            decode_str(r#"{"type":"dance","type":"join_room","room":"a","room":"b"}"#),
            decode_str(r#"{"type":"join_room","room":"b"}"#)
        );
        assert_eq!(
            decode_str(r#"{"type":"join_room","type":"dance"}"#),
            Err(DecodeError::UnknownType("dance".into()))
        );
        // An earlier value of the wrong kind does not count, nor does a later valid one rescue
        // a type that ends up wrong.
        assert!(decode_str(r#"{"type":"join_room","room":5,"room":"x"}"#).is_ok());
        assert_eq!(
            decode_str(r#"{"type":"join_room","room":"x","room":5}"#),
            Err(DecodeError::RoomNotString)
        );
        assert_eq!(
            decode_str(r#"{"type":"private_message","to":"a","to":"b"}"#),
            decode_str(r#"{"type":"private_message","to":"b"}"#)
        );
        assert_eq!(relayed(r#""first","message":2"#), "2");
        // null is "missing": the last occurrence, null, wins.
        assert_eq!(relayed(r#""first","message":null"#), r#""""#);
        assert_eq!(
            decode_str(r#"{"type":"set_metadata","metadata":"x","metadata":{"k":1}}"#).map(|_| ()),
            Ok(())
        );
        assert_eq!(
            decode_str(r#"{"type":"set_metadata","metadata":{"k":1},"metadata":"x"}"#),
            Err(DecodeError::MetadataNotObject)
        );
        // Within metadata: the key keeps its first place, the last value wins.
        let merged = metadata(r#"{"a":1,"b":2,"a":3}"#);
        assert_eq!(
            text(&metadata_updated(&merged)),
            r#"{"type":"metadata_updated","metadata":{"a":3,"b":2}}"#
        );
    }

    #[test]
    fn since_is_an_empty_object_or_an_offset_with_an_epoch() {
        let since = |text: &str| match decode(text.as_bytes()) {
            Ok(Command::JoinRoom { since, .. }) => Ok(since),
            Ok(other) => panic!("{other:?}"),
            Err(error) => Err(error),
        };
        assert_eq!(since(r#"{"type":"join_room","room":"r"}"#), Ok(None));
        assert_eq!(
            since(r#"{"type":"join_room","room":"r","since":{}}"#),
            Ok(Some(Since::Now))
        );
        assert_eq!(
            since(r#"{"type":"join_room","room":"r","since":{"offset":7,"epoch":"e1"}}"#),
            Ok(Some(Since::Saw {
                offset: 7,
                epoch: "e1".into()
            }))
        );
        for bad in [
            r#"{"offset":7}"#,
            r#"{"epoch":"e"}"#,
            r#"{"offset":-1,"epoch":"e"}"#,
            r#"{"offset":1,"epoch":"e","extra":1}"#,
            r#"[]"#,
            r#""x""#,
        ] {
            let text = format!(r#"{{"type":"join_room","room":"r","since":{bad}}}"#);
            assert_eq!(since(&text), Err(DecodeError::InvalidSince), "{bad}");
        }
    }

    #[test]
    fn string_fields_are_unescaped_and_borrowed_when_they_can_be() {
        let input = br#"{"type":"join_room","room":"lobby"}"#;
        let Command::JoinRoom { room, .. } = decode(input).unwrap() else {
            panic!()
        };
        assert!(matches!(room, Cow::Borrowed("lobby")));
        let input = br#"{"typ\u0065":"join_\u0072oom","room":"l\u00f6bby \"1\""}"#;
        let Command::JoinRoom { room, .. } = decode(input).unwrap() else {
            panic!()
        };
        assert_eq!(room, "löbby \"1\"");
    }

    #[test]
    fn the_whole_payload_must_be_one_valid_json_object() {
        for bad in [
            r#"{"type":"broadcast"} x"#,
            r#"{"type":"broadcast"}{}"#,
            r#"{"type":"broadcast"},"#,
            r#"{"type":"broadcast","message":1E}"#,
            r#"{"type":"broadcast","message":01}"#,
            r#"{"type":"broadcast","message":"unterminated}"#,
            r#"{"type":"broadcast","other":[1,}"#,
            r#"{"type":"broadcast",}"#,
        ] {
            assert_eq!(decode_str(bad), Err(DecodeError::InvalidFormat), "{bad}");
        }
        assert!(decode_str(" \n{\"type\":\"broadcast\"} \r\n\t").is_ok());
    }

    #[test]
    fn invalid_utf8_anywhere_is_invalid_format() {
        for bad in [
            &b"\xff"[..],
            b"{\"type\":\"broadcast\",\"message\":\"\xff\"}",
            b"{\"type\":\"broadcast\",\"message\":[\"\xc3\"]}",
            b"{\"type\":\"broadcast\",\"other\":\"\xed\xa0\x80\"}",
            b"{\"type\":\"broadcast\",\"\xff\":1}",
            b"{\"type\":\"join_room\",\"room\":\"\xf0\x28\"}",
            b"{\"type\":\"set_metadata\",\"metadata\":{\"k\":\"\xfe\"}}",
        ] {
            assert_eq!(
                decode(bad).map(|_| ()),
                Err(DecodeError::InvalidFormat),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn metadata_values_are_kept_verbatim_and_merged_last_wins() {
        let first = metadata(r#"{"score":1E5,"pi":3.141592653589793238,"name":"ann"}"#);
        let update = br#"{"type":"set_metadata","metadata":{"big":123456789012345678901234567890,"score":2.50}}"#;
        let Command::SetMetadata { metadata: update } = decode(update).unwrap() else {
            panic!()
        };
        let merged = first.merged(&update);
        assert_eq!(
            text(&metadata_updated(&first)),
            r#"{"type":"metadata_updated","metadata":{"score":1E5,"pi":3.141592653589793238,"name":"ann"}}"#,
            "merging leaves the original as it was"
        );
        let frame = metadata_updated(&merged);
        let json = std::str::from_utf8(&frame[4..]).unwrap();
        assert_eq!(
            json,
            r#"{"type":"metadata_updated","metadata":{"score":2.50,"pi":3.141592653589793238,"name":"ann","big":123456789012345678901234567890}}"#
        );
        assert_eq!(merged.len(), 4);
        // Keys are compared unescaped and written escaped.
        let merged = metadata(r#"{"k\u00e9":1,"ké":2,"q\"":3}"#);
        assert_eq!(
            text(&metadata_updated(&merged)),
            r#"{"type":"metadata_updated","metadata":{"ké":2,"q\"":3}}"#
        );
    }

    #[test]
    fn invalid_inputs_map_to_seed_errors() {
        for bad in [
            "",
            "nope",
            "[]",
            "[1]",
            "{}",
            r#"{"type":null}"#,
            r#"{"type":true}"#,
            "42",
        ] {
            assert_eq!(decode_str(bad), Err(DecodeError::InvalidFormat), "{bad}");
        }
        assert_eq!(
            decode_str(r#"{"type":"dance"}"#),
            Err(DecodeError::UnknownType("dance".into()))
        );
        assert_eq!(
            decode_str(r#"{"type":"join_room","room":["a"]}"#),
            Err(DecodeError::RoomNotString)
        );
        assert_eq!(
            decode_str(r#"{"type":"private_message","to":5}"#),
            Err(DecodeError::RecipientNotString)
        );
        assert_eq!(
            decode_str(r#"{"type":"set_metadata","metadata":"x"}"#),
            Err(DecodeError::MetadataNotObject)
        );
    }

    #[test]
    fn missing_fields_default_like_the_seed() {
        match decode(br#"{"type":"room_message"}"#).unwrap() {
            Command::RoomMessage {
                room,
                message: Body::Text(text),
            } => {
                assert_eq!(room, "");
                assert_eq!(text, "");
            }
            other => panic!("{other:?}"),
        }
        for empty in ["[]", "[ ]", "{}", "null"] {
            let input = format!(r#"{{"type":"set_metadata","metadata":{empty}}}"#);
            assert!(matches!(
                decode(input.as_bytes()).unwrap(),
                Command::SetMetadata { metadata } if metadata.is_empty()
            ));
        }
        assert!(matches!(
            decode(br#"{"type":"set_metadata"}"#).unwrap(),
            Command::SetMetadata { metadata } if metadata.is_empty()
        ));
        for bad in ["[{}]", "1", r#""{}""#, "true"] {
            let input = format!(r#"{{"type":"set_metadata","metadata":{bad}}}"#);
            assert_eq!(
                decode_str(&input),
                Err(DecodeError::MetadataNotObject),
                "{bad}"
            );
        }
    }

    #[test]
    fn metadata_size_counts_only_the_object() {
        assert_eq!(metadata_size(&metadata_updated(&Metadata::default())), 2); // {}
        let object = format!(r#"{{"k":"{}","n":1.0}}"#, "x".repeat(300));
        let frame = metadata_updated(&metadata(&object));
        assert_eq!(metadata_size(&frame), object.len());
        let merged = metadata(r#"{"a":1,"b":2}"#).merged(&MetadataUpdate::default());
        assert_eq!(
            metadata_size(&metadata_updated(&merged)),
            r#"{"a":1,"b":2}"#.len()
        );
    }

    #[test]
    fn metadata_keeps_insertion_order() {
        let frame = metadata_updated(&metadata(r#"{"z":1,"a":2,"m":3}"#));
        assert_eq!(
            std::str::from_utf8(&frame[2..]).unwrap(),
            r#"{"type":"metadata_updated","metadata":{"z":1,"a":2,"m":3}}"#
        );
    }
}

/// The protocol's messages as serde types: what a client sends
/// ([`ClientMessage`](typed::ClientMessage)) and everything the server sends
/// ([`ServerMessage`](typed::ServerMessage)).
///
/// The server itself does not use them (it decodes with [`decode`], without copying, and
/// encodes each frame once with the builders above); the [`client`](crate::client) library and
/// Rust programs that talk to roomcast do. The tests of this module run every server encoder through
/// `ServerMessage` and every `ClientMessage` through the server's decoder, so the two
/// descriptions of the wire format cannot drift apart.
///
/// ```
/// use roomcast::protocol::typed::{ClientMessage, ServerMessage};
///
/// let join = ClientMessage::join("lobby");
/// assert_eq!(join.to_json(), r#"{"type":"join_room","room":"lobby"}"#);
///
/// let reply: ServerMessage =
///     serde_json::from_str(r#"{"type":"room_joined","room":"lobby","members":2}"#).unwrap();
/// assert!(matches!(reply, ServerMessage::RoomJoined { members: 2, offset: None, .. }));
/// ```
pub mod typed {
    use serde::{Deserialize, Serialize};
    use serde_json::{Map, Value};

    /// A message a client sends. Serializes exactly as `shared/PROTOCOL.md` writes it, `type`
    /// first.
    ///
    /// `message` is any JSON value: the seed relays strings, roomcast relays other values
    /// verbatim.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum ClientMessage {
        /// `{"type":"broadcast","message":M}`: to every other connected client.
        Broadcast { message: Value },
        /// `{"type":"join_room","room":R}`; with `since`, opted in to the room's history
        /// (`"since":{}`, or the position last seen, to recover what came after).
        JoinRoom {
            room: String,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            since: Option<Position>,
        },
        /// `{"type":"leave_room","room":R}`
        LeaveRoom { room: String },
        /// `{"type":"room_message","room":R,"message":M}`: to every other member of `room`.
        RoomMessage { room: String, message: Value },
        /// `{"type":"private_message","to":ID,"message":M}`: `to` is a client id, or a user
        /// id when the server authenticates with tokens.
        PrivateMessage { to: String, message: Value },
        /// `{"type":"set_metadata","metadata":{…}}`: merged over the client's metadata.
        SetMetadata { metadata: Map<String, Value> },
    }

    /// A position in a room's history: the last offset seen, of which epoch. Both `None`:
    /// `{}`, offsets from now on.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Position {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub offset: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub epoch: Option<String>,
    }

    impl ClientMessage {
        /// `join_room` without `since`, as the seed's clients send it.
        pub fn join(room: impl Into<String>) -> Self {
            ClientMessage::JoinRoom {
                room: room.into(),
                since: None,
            }
        }

        /// The message as the JSON text of one frame.
        pub fn to_json(&self) -> String {
            // Strings, maps with string keys and `Value`s always serialize.
            serde_json::to_string(self).unwrap_or_default()
        }
    }

    /// A message the server sends. Field names and order are the seed's; unknown fields are
    /// ignored, so a newer server's additions do not break an older client.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum ServerMessage {
        /// The first message on every connection. `user_id` is the token's `sub` when the
        /// server requires tokens.
        Welcome {
            client_id: String,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            user_id: Option<String>,
            timestamp: u64,
        },
        /// Another client's broadcast.
        Broadcast {
            from: String,
            message: Value,
            timestamp: u64,
        },
        /// The reply to this client's `join_room` (no timestamp, as in the seed). With `since`
        /// and history on, also the room's last `offset`, its `epoch`, and whether what was
        /// missed since the position given was `recovered` (and follows).
        RoomJoined {
            room: String,
            members: u64,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            offset: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            epoch: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            recovered: Option<bool>,
        },
        /// Someone else joined a room this client is in.
        MemberJoined {
            room: String,
            client_id: String,
            total_members: u64,
        },
        /// Someone else left (or disconnected from) a room this client is in.
        MemberLeft {
            room: String,
            client_id: String,
            total_members: u64,
        },
        /// Another member's message to a room this client is in; `offset` in its room's
        /// history when this client joined with `since` and history is on.
        RoomMessage {
            room: String,
            from: String,
            message: Value,
            timestamp: u64,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            offset: Option<u64>,
        },
        /// A private message to this client (or to its user).
        PrivateMessage {
            from: String,
            message: Value,
            timestamp: u64,
        },
        /// The reply to `set_metadata`: the merged metadata.
        MetadataUpdated { metadata: Map<String, Value> },
        /// A refusal; the connection stays open. `message` is one of the texts in
        /// [`errors`](super::errors) (or `Unknown message type: …`).
        Error { message: String, timestamp: u64 },
    }

    impl ServerMessage {
        /// The message as the JSON text the server sends.
        pub fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::*;
        use super::*;
        use serde_json::json;

        /// The JSON text of a complete server frame: the 2, 4 or 10 byte header stripped.
        fn text(frame: &Bytes) -> &str {
            let start = match frame[1] & 0x7f {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            std::str::from_utf8(&frame[start..]).unwrap()
        }

        /// Decodes a server frame as a [`ServerMessage`] and checks that serializing it again
        /// gives the server's exact bytes (same fields, same order).
        fn typed(frame: &Bytes) -> ServerMessage {
            let json = text(frame);
            let message: ServerMessage = serde_json::from_str(json).expect(json);
            assert_eq!(message.to_json(), json, "re-encodes to the server's bytes");
            message
        }

        fn json_body(json: &str) -> Vec<u8> {
            format!(r#"{{"type":"broadcast","message":{json}}}"#).into_bytes()
        }

        #[test]
        fn every_server_encoder_decodes_into_its_variant() {
            assert_eq!(
                typed(&welcome("client_1", None, 9)),
                ServerMessage::Welcome {
                    client_id: "client_1".into(),
                    user_id: None,
                    timestamp: 9
                }
            );
            assert_eq!(
                typed(&welcome("client_1", Some("user-7"), 9)),
                ServerMessage::Welcome {
                    client_id: "client_1".into(),
                    user_id: Some("user-7".into()),
                    timestamp: 9
                }
            );
            assert_eq!(
                typed(&error(errors::ROOM_NOT_FOUND, 3)),
                ServerMessage::Error {
                    message: "Room does not exist".into(),
                    timestamp: 3
                }
            );
            assert_eq!(
                typed(&broadcast("client_2", &Body::Text("hi".into()), 4)),
                ServerMessage::Broadcast {
                    from: "client_2".into(),
                    message: json!("hi"),
                    timestamp: 4
                }
            );
            assert_eq!(
                typed(&room_joined("lobby", 2)),
                ServerMessage::RoomJoined {
                    room: "lobby".into(),
                    members: 2,
                    offset: None,
                    epoch: None,
                    recovered: None,
                }
            );
            assert_eq!(
                typed(&member_joined("lobby", "client_3", 3)),
                ServerMessage::MemberJoined {
                    room: "lobby".into(),
                    client_id: "client_3".into(),
                    total_members: 3
                }
            );
            assert_eq!(
                typed(&member_left("lobby", "client_3", 1)),
                ServerMessage::MemberLeft {
                    room: "lobby".into(),
                    client_id: "client_3".into(),
                    total_members: 1
                }
            );
            assert_eq!(
                typed(&room_message(
                    "lobby",
                    "client_4",
                    &Body::Text("quote \" é".into()),
                    5
                )),
                ServerMessage::RoomMessage {
                    room: "lobby".into(),
                    from: "client_4".into(),
                    message: json!("quote \" é"),
                    timestamp: 5,
                    offset: None,
                }
            );
            assert_eq!(
                typed(&private_message("client_5", &Body::Text("psst".into()), 6)),
                ServerMessage::PrivateMessage {
                    from: "client_5".into(),
                    message: json!("psst"),
                    timestamp: 6
                }
            );
            assert_eq!(
                typed(&metadata_updated(&Metadata::default())),
                ServerMessage::MetadataUpdated {
                    metadata: serde_json::Map::new()
                }
            );
            let mut metadata = serde_json::Map::new();
            metadata.insert("z".into(), json!(1));
            metadata.insert("a".into(), json!({"nested": [true, null]}));
            let wire = ClientMessage::SetMetadata {
                metadata: metadata.clone(),
            }
            .to_json();
            let Command::SetMetadata { metadata: update } = decode(wire.as_bytes()).unwrap() else {
                panic!("{wire}")
            };
            assert_eq!(
                typed(&metadata_updated(&Metadata::default().merged(&update))),
                ServerMessage::MetadataUpdated { metadata }
            );
        }

        #[test]
        fn non_string_messages_and_long_frames_decode() {
            for value in [r#"{"a":[1,2.5,true,null]}"#, "42", "[]", "false", r#""x""#] {
                let buf = json_body(value);
                let Command::Broadcast { message } = decode(&buf).unwrap() else {
                    panic!("not a broadcast")
                };
                let expected: Value = serde_json::from_str(value).unwrap();
                for frame in [
                    broadcast("c", &message, 1),
                    room_message("r", "c", &message, 1),
                    private_message("c", &message, 1),
                ] {
                    let decoded: ServerMessage = serde_json::from_str(text(&frame)).unwrap();
                    let (ServerMessage::Broadcast { message, .. }
                    | ServerMessage::RoomMessage { message, .. }
                    | ServerMessage::PrivateMessage { message, .. }) = decoded
                    else {
                        panic!("{decoded:?}")
                    };
                    assert_eq!(message, expected, "{value}");
                }
            }
            // 4- and 10-byte headers.
            for size in [200usize, 70_000] {
                let long = "x".repeat(size);
                let frame = room_message("r", "c", &Body::Text(long.as_str().into()), 1);
                assert!(matches!(
                    typed(&frame),
                    ServerMessage::RoomMessage { message, .. } if message == json!(long)
                ));
            }
        }

        #[test]
        fn client_messages_serialize_as_the_protocol_writes_them() {
            let cases = [
                (
                    ClientMessage::Broadcast {
                        message: json!("hi"),
                    },
                    r#"{"type":"broadcast","message":"hi"}"#,
                ),
                (
                    ClientMessage::join("x"),
                    r#"{"type":"join_room","room":"x"}"#,
                ),
                (
                    ClientMessage::LeaveRoom { room: "x".into() },
                    r#"{"type":"leave_room","room":"x"}"#,
                ),
                (
                    ClientMessage::RoomMessage {
                        room: "x".into(),
                        message: json!({"n": 1}),
                    },
                    r#"{"type":"room_message","room":"x","message":{"n":1}}"#,
                ),
                (
                    ClientMessage::PrivateMessage {
                        to: "client_1".into(),
                        message: json!("psst"),
                    },
                    r#"{"type":"private_message","to":"client_1","message":"psst"}"#,
                ),
                (
                    ClientMessage::SetMetadata {
                        metadata: json!({"name": "ann"}).as_object().unwrap().clone(),
                    },
                    r#"{"type":"set_metadata","metadata":{"name":"ann"}}"#,
                ),
            ];
            for (message, wire) in cases {
                assert_eq!(message.to_json(), wire);
                let back: ClientMessage = serde_json::from_str(wire).unwrap();
                assert_eq!(back, message);
            }
        }

        #[test]
        fn every_client_message_is_what_the_server_decodes() {
            let metadata = json!({"name": "ann", "age": 5})
                .as_object()
                .unwrap()
                .clone();
            let messages = [
                ClientMessage::Broadcast {
                    message: json!("hi"),
                },
                ClientMessage::join("lobby"),
                ClientMessage::LeaveRoom {
                    room: "lobby".into(),
                },
                ClientMessage::RoomMessage {
                    room: "lobby".into(),
                    message: json!({"n": [1, 2]}),
                },
                ClientMessage::PrivateMessage {
                    to: "client_9".into(),
                    message: json!("psst"),
                },
                ClientMessage::SetMetadata {
                    metadata: metadata.clone(),
                },
            ];
            for message in messages {
                let buf = message.to_json().into_bytes();
                let command = decode(&buf).expect("the server accepts it");
                // Re-encode the server's view as a message and compare.
                let body = |body: &Body<'_>| match body {
                    Body::Text(text) => json!(text.as_ref()),
                    Body::Raw(json) => serde_json::from_str(json.get()).unwrap(),
                };
                let seen = match &command {
                    Command::Broadcast { message } => ClientMessage::Broadcast {
                        message: body(message),
                    },
                    Command::JoinRoom { room, .. } => ClientMessage::join(room.as_ref()),
                    Command::LeaveRoom { room } => ClientMessage::LeaveRoom {
                        room: room.to_string(),
                    },
                    Command::RoomMessage { room, message } => ClientMessage::RoomMessage {
                        room: room.to_string(),
                        message: body(message),
                    },
                    Command::PrivateMessage { to, message } => ClientMessage::PrivateMessage {
                        to: to.to_string(),
                        message: body(message),
                    },
                    Command::SetMetadata { metadata } => ClientMessage::SetMetadata {
                        metadata: metadata
                            .entries()
                            .map(|(key, value)| {
                                (key.to_owned(), serde_json::from_str(value.get()).unwrap())
                            })
                            .collect(),
                    },
                    Command::History { .. } => unreachable!("the library sends no history"),
                };
                assert_eq!(seen, message);
            }
        }

        #[test]
        fn unknown_fields_are_ignored_and_unknown_types_refused() {
            let message: ServerMessage = serde_json::from_str(
                r#"{"type":"room_joined","room":"r","members":1,"extra":true}"#,
            )
            .unwrap();
            assert_eq!(
                message,
                ServerMessage::RoomJoined {
                    room: "r".into(),
                    members: 1,
                    offset: None,
                    epoch: None,
                    recovered: None,
                }
            );
            assert!(serde_json::from_str::<ServerMessage>(r#"{"type":"presence"}"#).is_err());
        }
    }
}
