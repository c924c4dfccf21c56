//! `GET /healthz` (the process is alive) and `GET /readyz` (accepting; 503 from the moment a
//! shutdown begins, so load balancers take the node out before it closes connections).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use super::text;
use crate::node::Node;

pub fn alive() -> Response<Full<Bytes>> {
    text(StatusCode::OK, "ok\n")
}

pub fn ready(node: &Node) -> Response<Full<Bytes>> {
    if node.ready.load(Ordering::Acquire) {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    }
}
