//! `GET /api/stats`: open connections, clients, rooms and the ten largest rooms, as JSON (the
//! key is checked by [`super::server_api`]).

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use super::json;
use crate::node::Node;

pub fn stats(node: &Node) -> Response<Full<Bytes>> {
    let (rooms, clients) = node.router.counts();
    let top: Vec<_> = node
        .router
        .top_rooms(10)
        .into_iter()
        .map(|(room, members)| serde_json::json!({"room": room, "members": members}))
        .collect();
    json(&serde_json::json!({
        "connections": node.admission.open_connections(),
        "clients": clients,
        "rooms": rooms,
        "top_rooms": top,
    }))
}
