//! The demo page served at `GET /` (without an upgrade) and the JavaScript client module it
//! uses, embedded in the binary so that running the server is all it takes to try it.

/// The embedded files: path, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("web/index.html"),
    ),
    (
        "/roomcast.js",
        "text/javascript; charset=utf-8",
        include_str!("web/roomcast.js"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("web/app.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("web/style.css"),
    ),
];

/// The embedded file at `path`, with its content type.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    ASSETS
        .iter()
        .find(|(asset_path, _, _)| *asset_path == path)
        .map(|(_, content_type, body)| (*content_type, *body))
}
