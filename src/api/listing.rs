//! The server API's listings and disconnects, over every node: `GET /api/rooms`,
//! `GET /api/rooms/{room}` and `POST /api/disconnect` answer for the whole cluster on whichever
//! node they are asked. This node answers for its own connections (the [`Responder`] the
//! broker calls when another node asks), asks the others through the broker, and merges: room
//! counts summed by name, member lists concatenated, disconnects counted. On one node the
//! broker has nobody to ask and the answer is this node's.
//!
//! When a node received the question but did not answer within the broker's deadline (or Redis
//! could not carry it), the answer is what came, with `"incomplete": true`.

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::value::RawValue;

use super::server_api::{bad_request, DisconnectRequest, Outcome};
use super::{json, json_error};
use crate::broker::query::{self, Answer, Gathered, Query, Responder};
use crate::node::Node;

/// The close code an application may choose: RFC 6455 reserves 4000-4999 for it.
const APP_CLOSE_CODES: std::ops::RangeInclusive<u16> = 4000..=4999;

/// Close-frame reasons are at most 123 bytes (RFC 6455 5.5: 125 less the code).
const MAX_CLOSE_REASON: usize = 123;

impl Responder for Node {
    fn answer(&self, query: &Query) -> Answer {
        match query {
            Query::Rooms { prefix } => Answer::Rooms {
                rooms: local_rooms(self, prefix),
            },
            Query::Presence { room } => Answer::Presence {
                members: local_presence(self, room),
            },
            Query::Disconnect {
                id,
                by_user,
                code,
                reason,
            } => Answer::Disconnected {
                count: close_local(self, id, *by_user, *code, reason),
            },
            Query::Groups { prefix } => Answer::Groups {
                groups: self.router.groups(prefix),
            },
            Query::TerminatePusherUser { app, user } => Answer::Disconnected {
                count: self
                    .pusher
                    .as_ref()
                    .and_then(|apps| Some(apps.users.terminate(apps.by_id(app)?.0, user)))
                    .unwrap_or(0),
            },
        }
    }
}

/// The other nodes' answers to `query` (none on one node).
pub(crate) async fn gather(node: &Node, query: &Query) -> Gathered {
    match node.broker.ask(query) {
        None => Gathered::alone(),
        Some(answers) => answers.await.unwrap_or(Gathered {
            answers: Vec::new(),
            complete: false,
        }),
    }
}

fn local_rooms(node: &Node, prefix: &str) -> Vec<(String, usize)> {
    let mut rooms = node.router.top_rooms(usize::MAX);
    rooms.retain(|(room, _)| room.starts_with(prefix));
    rooms
}

fn local_presence(node: &Node, room: &str) -> Option<Vec<query::Member>> {
    let members = node.router.presence(room)?;
    Some(
        members
            .into_iter()
            .map(|member| query::Member {
                client_id: member.client_id.to_string(),
                user_id: member.user_id.as_deref().map(str::to_owned),
                metadata: member.metadata.and_then(|object| {
                    let text = String::from_utf8(object.to_vec()).ok()?;
                    RawValue::from_string(text).ok()
                }),
            })
            .collect(),
    )
}

/// Asks this node's connections named by `id` (a client id, or `by_user` a user id) to close
/// with `code` and `reason`; returns how many were asked (those already closing keep their
/// own reason and are not counted).
fn close_local(node: &Node, id: &str, by_user: bool, code: u16, reason: &str) -> usize {
    let mut connections = node.router.connections_of(id);
    // A client id names that client; a user id only the connections of that user.
    if by_user {
        connections.retain(|member| member.user_id.as_deref() == Some(id));
    } else {
        connections.retain(|member| &*member.client_id == id);
    }
    let mut disconnected = 0;
    for member in &connections {
        if !reason.is_empty() {
            node.close_reasons.insert(member.conn, reason.into());
        }
        let first = member.outbox.request_close(crate::outbox::CloseRequest {
            code: Some(code),
            flush: true,
        });
        if first {
            disconnected += 1;
        } else {
            // Already closing for another reason, which keeps its own.
            node.close_reasons.remove(&member.conn);
        }
    }
    disconnected
}

/// Adds `"incomplete": true` to `value` when not every node answered.
fn marked(mut value: serde_json::Value, complete: bool) -> serde_json::Value {
    if !complete {
        value["incomplete"] = serde_json::Value::Bool(true);
    }
    value
}

/// `GET /api/rooms?prefix=P`: `{"rooms":[{"room","members"}]}`, by name, counted over every
/// node.
pub async fn rooms(query: Option<&str>, node: &Node) -> Response<Full<Bytes>> {
    let prefix = query
        .and_then(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == "prefix")
                .map(|(_, value)| value.into_owned())
        })
        .unwrap_or_default();
    let mut counts: BTreeMap<String, usize> = local_rooms(node, &prefix).into_iter().collect();
    let gathered = gather(node, &Query::Rooms { prefix }).await;
    for answer in gathered.answers {
        if let Answer::Rooms { rooms } = answer {
            for (room, members) in rooms {
                *counts.entry(room).or_default() += members;
            }
        }
    }
    let rooms: Vec<_> = counts
        .into_iter()
        .map(|(room, members)| serde_json::json!({"room": room, "members": members}))
        .collect();
    json(&marked(
        serde_json::json!({ "rooms": rooms }),
        gathered.complete,
    ))
}

/// `GET /api/rooms/{room}`: `{"room":R,"members":[{"client_id","user_id","metadata"}]}`, this
/// node's members first, then the others'.
pub async fn presence(encoded: &str, node: &Node) -> Response<Full<Bytes>> {
    let Ok(room) = percent_encoding::percent_decode_str(encoded).decode_utf8() else {
        return json_error(StatusCode::BAD_REQUEST, "room name is not UTF-8");
    };
    let local = local_presence(node, &room);
    let gathered = gather(
        node,
        &Query::Presence {
            room: room.to_string(),
        },
    )
    .await;
    let mut found = local.is_some();
    let mut members = local.unwrap_or_default();
    for answer in gathered.answers {
        if let Answer::Presence {
            members: Some(theirs),
        } = answer
        {
            found = true;
            members.extend(theirs);
        }
    }
    if !found {
        return json_error(StatusCode::NOT_FOUND, "Room does not exist");
    }
    // Written by hand so that metadata values stay byte for byte as the clients sent them.
    let mut body = String::with_capacity(64 + members.len() * 96);
    body.push_str(r#"{"room":"#);
    body.push_str(&serde_json::to_string(&*room).unwrap_or_default());
    body.push_str(r#","members":["#);
    for (at, member) in members.iter().enumerate() {
        if at > 0 {
            body.push(',');
        }
        body.push_str(r#"{"client_id":"#);
        body.push_str(&serde_json::to_string(&member.client_id).unwrap_or_default());
        body.push_str(r#","user_id":"#);
        body.push_str(&serde_json::to_string(&member.user_id).unwrap_or_default());
        body.push_str(r#","metadata":"#);
        match &member.metadata {
            Some(object) => body.push_str(object.get()),
            None => body.push_str("{}"),
        }
        body.push('}');
    }
    body.push(']');
    if !gathered.complete {
        body.push_str(r#","incomplete":true"#);
    }
    body.push('}');
    super::with_type(Bytes::from(body), "application/json")
}

/// `POST /api/disconnect`: `{"disconnected": N}` over every node, after each connection was
/// asked to close (queued frames are flushed first, as at shutdown); 404 when none was found.
pub(super) async fn disconnect(request: DisconnectRequest<'_>, node: &Node) -> Outcome {
    let (id, by_user) = match (&request.client_id, &request.user_id) {
        (Some(client), None) => (client, false),
        (None, Some(user)) => (user, true),
        _ => return Err(bad_request("give exactly one of client_id and user_id")),
    };
    let code = request.code.unwrap_or(*APP_CLOSE_CODES.start());
    if !APP_CLOSE_CODES.contains(&code) {
        return Err(bad_request("code must be between 4000 and 4999"));
    }
    let reason = request.reason.as_deref().unwrap_or("");
    if reason.len() > MAX_CLOSE_REASON {
        return Err(bad_request("reason must be at most 123 bytes"));
    }
    let mut disconnected = close_local(node, id, by_user, code, reason);
    let query = Query::Disconnect {
        id: id.to_string(),
        by_user,
        code,
        reason: reason.to_owned(),
    };
    // A client id is on one node: found here, nobody else needs asking.
    let gathered = if disconnected > 0 && !by_user {
        Gathered::alone()
    } else {
        gather(node, &query).await
    };
    for answer in gathered.answers {
        if let Answer::Disconnected { count } = answer {
            disconnected += count;
        }
    }
    if disconnected == 0 {
        return Err((StatusCode::NOT_FOUND, "Recipient not found".into()));
    }
    Ok(marked(
        serde_json::json!({ "disconnected": disconnected }),
        gathered.complete,
    ))
}
