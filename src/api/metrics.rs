//! `GET /metrics`: the node's Prometheus exposition, with the gauges read from the live state
//! at the scrape (see [`crate::metrics`]).

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use super::with_type;
use crate::node::Node;

pub fn render(node: &Node) -> Response<Full<Bytes>> {
    let body = node.metrics.render(
        node.admission.open_connections(),
        node.admission.pending_handshakes(),
        &*node.router,
        &node.outbox_stats,
    );
    with_type(
        Bytes::from(body),
        "text/plain; version=0.0.4; charset=utf-8",
    )
}
