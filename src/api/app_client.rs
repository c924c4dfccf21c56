//! Calls from the server to the application: the proxies (`--connect-proxy`, `--join-proxy`,
//! `--publish-proxy`) and the webhooks share one pooled HTTP/1.1 client, so a busy server keeps
//! a few kept-alive connections to the app instead of opening one per call.
//!
//! Every call is a `POST` of JSON with one deadline covering the connect, the request and the
//! whole answer (`--proxy-timeout` for proxies); an answer is read up to a cap, so an app that
//! streams forever cannot hold server memory. `http://` and `https://` (rustls with the ring
//! provider and Mozilla's roots, as the client library uses) are both accepted.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How long a kept-alive connection to the app may sit unused before it is closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the app answered: its status and its body, whole.
#[derive(Debug)]
pub struct AppResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Why a call to the app got no answer to act on.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No full answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed or broke before a full answer.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The answer's body is larger than the caller accepts.
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
}

/// A URL that can't be called: checked once at start-up.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {reason}")]
pub struct BadUrl {
    url: String,
    reason: String,
}

/// The pooled client. Cloning shares the pool.
#[derive(Clone)]
pub struct AppClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Default for AppClient {
    fn default() -> Self {
        Self::new()
    }
}

impl AppClient {
    pub fn new() -> Self {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Self { client }
    }

    /// Checks that `url` is an absolute `http://` or `https://` URL with a host.
    pub fn parse_url(url: &str) -> Result<Uri, BadUrl> {
        let bad = |reason: &str| BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("the scheme must be http or https")),
        }
        if uri.host().is_none() {
            return Err(bad("no host"));
        }
        Ok(uri)
    }

    /// POSTs `body` (JSON) to `url` with `headers` besides the content type, and reads the
    /// answer of at most `max_answer` bytes, all within `timeout`.
    pub async fn post_json(
        &self,
        url: &Uri,
        body: Bytes,
        headers: &[(HeaderName, HeaderValue)],
        timeout: Duration,
        max_answer: usize,
    ) -> Result<AppResponse, AppError> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("roomcast/", env!("CARGO_PKG_VERSION")));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| AppError::Unreachable(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| AppError::Unreachable(error_chain(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), max_answer)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        AppError::TooLarge(max_answer)
                    } else {
                        AppError::Unreachable(e.to_string())
                    }
                })?
                .to_bytes();
            Ok(AppResponse { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AppError::Timeout(timeout))?
    }
}

/// An error with its sources, which is where hyper-util says what failed ("connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
