//! The HTTP side of a node: every request that is not a WebSocket upgrade. Health
//! ([`health`]), Prometheus metrics ([`metrics`]), the application's server API under `/api/`
//! for `--api-key` holders ([`server_api`], [`stats`]), and the demo page ([`crate::web`]).
//! Each answers from the [`Node`] alone, so the server only routes here. The calls the other
//! way, from the server to the app, are in [`app_client`] and [`webhooks`].

pub mod app_client;
pub mod health;
pub mod listing;
pub mod metrics;
pub mod proxy;
pub mod server_api;
pub mod stats;
pub mod webhooks;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::node::Node;
use crate::web;

/// Answers one plain HTTP request.
pub async fn respond(request: Request<Incoming>, node: &Node) -> Response<Full<Bytes>> {
    if request.uri().path().starts_with("/api/") {
        return server_api::respond(request, node).await;
    }
    if node.pusher.is_some() && request.uri().path().starts_with("/apps/") {
        return crate::pusher::api::respond(request, node).await;
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => health::alive(),
        (&Method::GET | &Method::HEAD, "/readyz") => health::ready(node),
        (&Method::GET, "/metrics") => metrics::render(node),
        (&Method::GET, path) => match web::asset(path) {
            Some((content_type, body)) => {
                with_type(Bytes::from_static(body.as_bytes()), content_type)
            }
            None => not_found(),
        },
        _ => not_found(),
    }
}

fn not_found() -> Response<Full<Bytes>> {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// A 200 with `body` of `content_type`.
pub(crate) fn with_type(body: Bytes, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A 200 with a JSON body.
pub fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    with_type(Bytes::from(value.to_string()), "application/json")
}

/// An error as `{"error": text}` with `status`.
pub fn json_error(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = json(&serde_json::json!({ "error": text }));
    *response.status_mut() = status;
    response
}

/// A short plain-text answer: a status and a one-line reason, never an internal error.
pub fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = with_type(
        Bytes::copy_from_slice(body.as_bytes()),
        "text/plain; charset=utf-8",
    );
    *response.status_mut() = status;
    response
}

/// [`text`] with `Connection: close`: hyper closes the connection after it.
pub fn closing(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = text(status, body);
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}
