//! `GET /api/stats`: open connections, clients, rooms and the ten largest rooms, as JSON, for
//! holders of `--api-key` (`Authorization: Bearer KEY`); 404 when no key is configured, 401
//! for a missing or wrong key.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Request, Response, StatusCode};

use super::{text, with_type};
use crate::node::Node;

pub fn stats(request: &Request<Incoming>, node: &Node) -> Response<Full<Bytes>> {
    let Some(key) = node.config.api_key.as_deref() else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), key.as_bytes()) {
        return text(StatusCode::UNAUTHORIZED, "API key required\n");
    }
    let (rooms, clients) = node.router.counts();
    let top: Vec<_> = node
        .router
        .top_rooms(10)
        .into_iter()
        .map(|(room, members)| serde_json::json!({"room": room, "members": members}))
        .collect();
    let body = serde_json::json!({
        "connections": node.admission.open_connections(),
        "clients": clients,
        "rooms": rooms,
        "top_rooms": top,
    });
    with_type(Bytes::from(body.to_string()), "application/json")
}

/// Compares secrets without stopping at the first difference, so response times do not tell
/// an attacker how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}
