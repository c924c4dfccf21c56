//! The server API: the application's way in, on the WebSocket port, for holders of
//! `--api-key` (`Authorization: Bearer KEY` or `X-API-Key: KEY`). JSON in, JSON out; every
//! answer has a JSON body, errors as `{"error": "text"}`.
//!
//! - `POST /api/publish {"room", "message", "from"?}`: a `room_message` to every member of the
//!   room (none is not an error), `from` defaulting to `"server"`.
//! - `POST /api/broadcast {"message", "from"?}`: a `broadcast` to every connected client.
//! - `POST /api/send {"to", "message", "from"?}`: a `private_message` to the client with that
//!   id, or else to every connection of the user with that id; nobody: 404.
//! - `POST /api/disconnect {"client_id" | "user_id", "code"?, "reason"?}`: closes that client,
//!   or every connection of that user, with the code (4000-4999, default 4000) and reason.
//! - `POST /api/batch {"commands":[{"method":"publish","params":{..}},..]}`: each in order,
//!   `{"results":[..]}` with one answer (or `{"error","status"}`) per command.
//! - `GET /api/rooms?prefix=`: the rooms and their member counts, by name.
//! - `GET /api/rooms/{room}/history?limit=&since=` (with history on): the room's last
//!   messages, or those after an offset.
//!
//! Listings and disconnects cover every node (see [`super::listing`]).
//! - `GET /api/rooms/{room}` (the name percent-encoded): the members, each with its client id,
//!   user id and metadata (as the client wrote it; `{}` when it set none); 404 for a room
//!   nobody is in.
//! - `GET /api/stats` (see [`super::stats`]).
//!
//! A publication from here takes the same road as one from a client: a
//! [`Publication`] handed to the node's broker, which delivers it on every node. `message` is
//! relayed byte for byte as the application wrote it, like a client's.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{json, json_error, listing};
use crate::broker::{Delivery, HistoryRead, Publication, Target};
use crate::node::Node;
use crate::protocol::{self, Body};

/// What a request body may hold beyond the message itself (field names, room, sender).
const BODY_ENVELOPE: usize = 4096;

/// The sender named in frames the application publishes without a `from`.
const DEFAULT_FROM: &str = "server";

/// Answers a request for a path under `/api/`.
pub async fn respond(request: Request<Incoming>, node: &Node) -> Response<Full<Bytes>> {
    let Some(key) = node.config.api_key.as_deref() else {
        return json_error(StatusCode::NOT_FOUND, "not found");
    };
    if !authorized(&request, key) {
        return json_error(StatusCode::UNAUTHORIZED, "API key required");
    }
    let (parts, body) = request.into_parts();
    match (parts.method.as_str(), parts.uri.path()) {
        ("GET", "/api/stats") => super::stats::stats(node),
        ("GET", "/api/rooms") => listing::rooms(parts.uri.query(), node).await,
        ("GET", path) if path.starts_with("/api/rooms/") && path.ends_with("/history") => {
            let room = &path["/api/rooms/".len()..path.len() - "/history".len()];
            history(room, parts.uri.query(), node).await
        }
        ("GET", path) if path.starts_with("/api/rooms/") => {
            listing::presence(&path["/api/rooms/".len()..], node).await
        }
        (
            "POST",
            "/api/publish" | "/api/broadcast" | "/api/send" | "/api/batch" | "/api/disconnect",
        ) => {
            let limit = node.config.max_message_size + BODY_ENVELOPE;
            let bytes = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                    let text = format!("body larger than {limit} bytes");
                    return json_error(StatusCode::PAYLOAD_TOO_LARGE, &text);
                }
                Err(_) => return json_error(StatusCode::BAD_REQUEST, "body not read"),
            };
            match parts.uri.path() {
                "/api/batch" => answer(batch(&bytes, node).await),
                path => answer(command(&path["/api/".len()..], &bytes, node).await),
            }
        }
        (
            _,
            "/api/stats" | "/api/rooms" | "/api/publish" | "/api/broadcast" | "/api/send"
            | "/api/batch" | "/api/disconnect",
        ) => json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => json_error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `GET /api/rooms/{room}/history?limit=N&since=O`: `{"room","messages":[...],"offset","epoch"}`,
/// the last N messages kept (at most `--history-size`, the default), or the first N after
/// offset O; 404 when history is off.
async fn history(encoded: &str, query: Option<&str>, node: &Node) -> Response<Full<Bytes>> {
    if node.config.history().is_none() {
        return json_error(StatusCode::NOT_FOUND, "history is off (--history-size)");
    }
    let Ok(room) = percent_encoding::percent_decode_str(encoded).decode_utf8() else {
        return json_error(StatusCode::BAD_REQUEST, "room name is not UTF-8");
    };
    // At most what the room keeps (its own size).
    let (mut limit, mut since) = (usize::MAX, None);
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let number = match value.parse::<u64>() {
            Ok(number) => number,
            Err(_) => {
                let text = format!("{key} must be a non-negative integer");
                return json_error(StatusCode::BAD_REQUEST, &text);
            }
        };
        match &*key {
            "limit" if number > 0 => limit = number.min(usize::MAX as u64) as usize,
            "limit" => return json_error(StatusCode::BAD_REQUEST, "limit must be positive"),
            "since" => since = Some(number),
            _ => {}
        }
    }
    let page = match node.broker.history(&room, limit, since) {
        HistoryRead::Off => {
            return json_error(StatusCode::NOT_FOUND, "history is off (--history-size)")
        }
        HistoryRead::Done(page) => page,
        HistoryRead::Later(page) => match page.await {
            Ok(page) => page,
            Err(_) => {
                let text = "history is unavailable: redis did not answer";
                return json_error(StatusCode::SERVICE_UNAVAILABLE, text);
            }
        },
    };
    // The object a member's `history` gets, less its type; messages as kept, byte for byte.
    let size: usize = page.messages.iter().map(|m| m.len() + 1).sum();
    let mut body = Vec::with_capacity(96 + room.len() + size);
    body.extend_from_slice(br#"{"room":"#);
    body.extend_from_slice(serde_json::to_string(&*room).unwrap_or_default().as_bytes());
    body.extend_from_slice(br#","messages":["#);
    for (at, message) in page.messages.iter().enumerate() {
        if at > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message);
    }
    body.extend_from_slice(br#"],"offset":"#);
    body.extend_from_slice(page.offset.to_string().as_bytes());
    body.extend_from_slice(br#","epoch":"#);
    body.extend_from_slice(
        serde_json::to_string(&*page.epoch)
            .unwrap_or_default()
            .as_bytes(),
    );
    body.push(b'}');
    super::with_type(Bytes::from(body), "application/json")
}

/// The key from `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time.
fn authorized(request: &Request<Incoming>, key: &str) -> bool {
    let headers = request.headers();
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let api_key = headers
        .get("x-api-key")
        .and_then(|value| value.to_str().ok());
    [bearer, api_key]
        .into_iter()
        .flatten()
        .any(|presented| constant_time_eq(presented.as_bytes(), key.as_bytes()))
}

/// Compares secrets without stopping at the first difference, so response times do not tell
/// an attacker how much of a guess was right.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest<'a> {
    #[serde(borrow)]
    room: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(borrow, default)]
    from: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastRequest<'a> {
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(borrow, default)]
    from: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest<'a> {
    #[serde(borrow)]
    to: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(borrow, default)]
    from: Option<std::borrow::Cow<'a, str>>,
}

/// Parses a request body, or says what is wrong with it (serde's account).
fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|error| format!("invalid body: {error}"))
}

/// A command's answer: the JSON of a 200, or an error's status and text.
pub(super) type Outcome = Result<serde_json::Value, (StatusCode, String)>;

pub(super) fn bad_request(text: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, text.into())
}

/// One command of the server API by name (`publish`, `broadcast`, `send`), its body as JSON.
async fn command(method: &str, body: &[u8], node: &Node) -> Outcome {
    match method {
        "publish" => {
            let request: PublishRequest = parse(body).map_err(bad_request)?;
            if request.room.is_empty() {
                return Err(bad_request(protocol::errors::ROOM_REQUIRED));
            }
            let target = Target::Room(&request.room);
            deliver(target, request.message, request.from.as_deref(), node).await
        }
        "broadcast" => {
            let request: BroadcastRequest = parse(body).map_err(bad_request)?;
            deliver(
                Target::Everyone,
                request.message,
                request.from.as_deref(),
                node,
            )
            .await
        }
        "send" => {
            let request: SendRequest = parse(body).map_err(bad_request)?;
            let target = Target::Recipient(&request.to);
            deliver(target, request.message, request.from.as_deref(), node).await
        }
        "disconnect" => {
            let request: DisconnectRequest = parse(body).map_err(bad_request)?;
            listing::disconnect(request, node).await
        }
        other => Err(bad_request(format!("unknown method {other:?}"))),
    }
}

fn answer(outcome: Outcome) -> Response<Full<Bytes>> {
    match outcome {
        Ok(value) => json(&value),
        Err((status, text)) => json_error(status, &text),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest<'a> {
    #[serde(borrow)]
    commands: Vec<BatchCommand<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchCommand<'a> {
    #[serde(borrow)]
    method: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    params: &'a RawValue,
}

/// `POST /api/batch {"commands":[{"method","params"},..]}`: each command in order, as if
/// posted alone; `{"results":[..]}`, one per command: its answer, or `{"error","status"}`.
/// A malformed batch is refused whole, before any command runs.
async fn batch(body: &[u8], node: &Node) -> Outcome {
    let request: BatchRequest = parse(body).map_err(bad_request)?;
    let mut results = Vec::with_capacity(request.commands.len());
    for item in &request.commands {
        results.push(
            match Box::pin(command(&item.method, item.params.get().as_bytes(), node)).await {
                Ok(value) => value,
                Err((status, text)) => {
                    serde_json::json!({"error": text, "status": status.as_u16()})
                }
            },
        );
    }
    Ok(serde_json::json!({ "results": results }))
}

/// Publishes through the broker, as a client's message would be: `{"delivered": N}`, the
/// deliveries made on this node (a private message to another node's client: 1 when found).
async fn deliver(
    target: Target<'_>,
    message: &RawValue,
    from: Option<&str>,
    node: &Node,
) -> Outcome {
    let started = Instant::now();
    let publication = Publication {
        target,
        from: from.unwrap_or(DEFAULT_FROM),
        message: Body::Raw(message),
        timestamp: protocol::timestamp(),
        except: None,
    };
    let delivered = match node.broker.publish(&publication) {
        Delivery::Done(delivered) => delivered,
        Delivery::Later(delivery) => delivery.await.unwrap_or(Ok(0)),
    };
    match delivered {
        Ok(delivered) => {
            node.metrics.fanout(delivered, started.elapsed());
            Ok(serde_json::json!({ "delivered": delivered }))
        }
        Err(not_found) => Err((StatusCode::NOT_FOUND, not_found.to_string())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DisconnectRequest<'a> {
    #[serde(borrow, default)]
    pub client_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    pub user_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    pub code: Option<u16>,
    #[serde(borrow, default)]
    pub reason: Option<std::borrow::Cow<'a, str>>,
}
