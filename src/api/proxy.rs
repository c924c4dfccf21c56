//! The proxies to the application: the app authorizes connections (`--connect-proxy`), room
//! joins (`--join-proxy`) and client messages (`--publish-proxy`) by its own rules, reading its
//! own session cookie, through an HTTP POST of JSON that this module builds and whose answer it
//! turns into a verdict. This is the seed's "same authenticator as anywhere else in the
//! application" and its "impersonate the client with an HTTP request": the join and publish
//! calls carry the connection's original `Cookie` and `Authorization` headers, so the app's
//! own auth middleware sees the user.
//!
//! Every call fails closed: an app that is down, slow past `--proxy-timeout`, or answers what
//! this module cannot read refuses what was asked (503 for an upgrade, an `error` for a join or
//! a message), is counted under `outcome="unavailable"` and logged (at most one warning every
//! few seconds per proxy, so an outage does not flood the log).
//!
//! How a session waits for a join or publish verdict without stalling anything: the call runs
//! in a task of its own ([`spawn_call`]) and the verdict comes back on a oneshot channel that
//! the connection's task polls beside its socket; the connection's later messages queue behind
//! it, in order (see `ws::commands`). Without these flags no session holds any of this.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, COOKIE, ORIGIN, USER_AGENT};
use hyper::{HeaderMap, StatusCode, Uri};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::app_client::{AppClient, AppError};
use crate::admission::{Identity, RoomPolicy};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::protocol::{self, Metadata};

/// Error texts a sender gets when the app refused or could not be asked.
pub mod errors {
    /// A join the app refused without saying why (the seed's text for a refused room).
    pub const JOIN_REFUSED: &str = crate::protocol::errors::ROOM_NOT_ALLOWED;
    /// A message the app refused without saying why.
    pub const MESSAGE_REFUSED: &str = "Message rejected";
    /// The app did not answer in time, or not in a way that can be read: nothing was done.
    pub const APP_UNAVAILABLE: &str = "Application unavailable";
}

/// Which proxy a call is for: an index into [`crate::metrics::PROXIES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    Connect = 0,
    Join = 1,
    Publish = 2,
}

/// An index into [`crate::metrics::PROXY_OUTCOMES`].
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Allowed = 0,
    Rewritten = 1,
    Refused = 2,
    Unavailable = 3,
}

/// At most one "app unavailable" warning per proxy this often.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// What the app decided about a join or a message.
#[derive(Debug)]
pub enum Verdict {
    /// Go ahead as asked.
    Allow,
    /// Relay this message instead (a publish the app stored and, say, gave its database id).
    Replace(Box<RawValue>),
    /// Do nothing; the sender gets an `error` with this text.
    Deny(String),
}

/// What the app decided about an upgrade.
#[derive(Debug)]
pub enum ConnectVerdict {
    Accept(ConnectGrant),
    /// The app's 401 or 403, passed to the client with the app's body.
    Refuse {
        status: StatusCode,
        body: Bytes,
    },
    /// No usable answer: the upgrade is refused with 503.
    Unavailable,
}

/// What a 200 from the connect proxy gives the connection.
#[derive(Debug, Default)]
pub struct ConnectGrant {
    pub user_id: Option<Arc<str>>,
    /// Where the connection's metadata starts (presence lists it; `set_metadata` merges over
    /// it).
    pub metadata: Option<Metadata>,
    /// The rooms it may join (as the JWT `rooms` claim: names, or prefixes ending in `*`).
    pub rooms: Option<Vec<String>>,
}

/// The headers of the upgrade request that the join and publish calls carry, so that the app
/// sees the same user as on its own pages. Kept per connection only when one of those proxies
/// is on.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Forwarded {
    /// The request's `Cookie` and `Authorization` headers; a token that came another way (the
    /// query, the token cookie) goes as `Authorization: Bearer` when the request had none.
    pub fn from_request(request: &HeaderMap, token: Option<&str>) -> Self {
        let mut headers = Vec::new();
        for value in request.get_all(COOKIE) {
            headers.push((COOKIE, value.clone()));
        }
        match request.get(AUTHORIZATION) {
            Some(value) => headers.push((AUTHORIZATION, value.clone())),
            None => {
                let bearer = token.and_then(|t| HeaderValue::try_from(format!("Bearer {t}")).ok());
                if let Some(value) = bearer {
                    headers.push((AUTHORIZATION, value));
                }
            }
        }
        Self { headers }
    }
}

/// The configured proxies and the client they call the app with.
pub struct Proxies {
    client: AppClient,
    timeout: Duration,
    /// Answers are read up to this size: room for a rewritten message of the largest size a
    /// client may send, and its envelope.
    max_answer: usize,
    urls: [Option<Uri>; 3],
    metrics: Arc<Metrics>,
    /// When each proxy last warned that the app was unavailable (ms since `started`).
    warned: [AtomicU64; 3],
    started: Instant,
}

impl Proxies {
    /// The proxies `config` enables, or `None` when it enables none. The URLs were checked by
    /// `Config::validate`.
    pub fn from_config(config: &Config, metrics: Arc<Metrics>) -> Option<Self> {
        let url = |url: &Option<String>| {
            url.as_deref()
                .map(|url| AppClient::parse_url(url).expect("checked by Config::validate"))
        };
        let urls = [
            url(&config.connect_proxy),
            url(&config.join_proxy),
            url(&config.publish_proxy),
        ];
        if urls.iter().all(Option::is_none) {
            return None;
        }
        Some(Self {
            client: AppClient::new(),
            timeout: config.proxy_timeout,
            max_answer: config.max_message_size + 4096,
            urls,
            metrics,
            warned: Default::default(),
            started: Instant::now(),
        })
    }

    pub fn enabled(&self, proxy: Proxy) -> bool {
        self.urls[proxy as usize].is_some()
    }

    /// Whether sessions must keep their request's headers for the join or publish calls.
    pub fn forwards_headers(&self) -> bool {
        self.enabled(Proxy::Join) || self.enabled(Proxy::Publish)
    }

    /// Asks the connect proxy about an upgrade from `client_ip` with these request headers and
    /// query. The body is `{"client_ip", "headers": {cookie, authorization, origin,
    /// user-agent}, "query": {..}}`; the cookie and authorization also go as headers.
    pub async fn connect(
        &self,
        client_ip: IpAddr,
        headers: &HeaderMap,
        query: Option<&str>,
        token: Option<&str>,
    ) -> ConnectVerdict {
        let mut shown = serde_json::Map::new();
        for name in [COOKIE, AUTHORIZATION, ORIGIN, USER_AGENT] {
            if let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) {
                shown.insert(name.as_str().to_owned(), value.into());
            }
        }
        let query: serde_json::Map<String, serde_json::Value> = query
            .map(|q| form_urlencoded::parse(q.as_bytes()))
            .into_iter()
            .flatten()
            .map(|(key, value)| (key.into_owned(), value.into_owned().into()))
            .collect();
        let body = serde_json::json!({
            "client_ip": client_ip.to_string(),
            "headers": shown,
            "query": query,
        });
        let forwarded = Forwarded::from_request(headers, token);
        let answer = match self
            .call(Proxy::Connect, body.to_string().into(), &forwarded)
            .await
        {
            Ok(answer) => answer,
            Err(()) => return ConnectVerdict::Unavailable,
        };
        if answer.status == StatusCode::UNAUTHORIZED || answer.status == StatusCode::FORBIDDEN {
            self.count(Proxy::Connect, Outcome::Refused);
            return ConnectVerdict::Refuse {
                status: answer.status,
                body: answer.body,
            };
        }
        if !answer.status.is_success() {
            return self.unusable(Proxy::Connect, &format!("status {}", answer.status));
        }
        match parse_grant(&answer.body) {
            Ok(grant) => {
                self.count(Proxy::Connect, Outcome::Allowed);
                ConnectVerdict::Accept(grant)
            }
            Err(reason) => self.unusable(Proxy::Connect, &reason),
        }
    }

    /// Asks the join or publish proxy with `body` (JSON) and the connection's headers.
    pub async fn decide(&self, proxy: Proxy, body: Bytes, forwarded: &Forwarded) -> Verdict {
        let Ok(answer) = self.call(proxy, body, forwarded).await else {
            return Verdict::Deny(errors::APP_UNAVAILABLE.into());
        };
        let status = answer.status;
        if status.is_client_error() {
            self.count(proxy, Outcome::Refused);
            let default = match proxy {
                Proxy::Publish => errors::MESSAGE_REFUSED,
                Proxy::Join | Proxy::Connect => errors::JOIN_REFUSED,
            };
            return Verdict::Deny(error_text(&answer.body).unwrap_or_else(|| default.into()));
        }
        if !status.is_success() {
            self.unusable(proxy, &format!("status {status}"));
            return Verdict::Deny(errors::APP_UNAVAILABLE.into());
        }
        if proxy == Proxy::Join {
            self.count(proxy, Outcome::Allowed);
            return Verdict::Allow;
        }
        match replacement(&answer.body) {
            Ok(None) => {
                self.count(proxy, Outcome::Allowed);
                Verdict::Allow
            }
            Ok(Some(message)) => {
                self.count(proxy, Outcome::Rewritten);
                Verdict::Replace(message)
            }
            Err(reason) => {
                self.unusable(proxy, &reason);
                Verdict::Deny(errors::APP_UNAVAILABLE.into())
            }
        }
    }

    /// POSTs to `proxy`'s URL; `Err` (counted and logged) when no answer came.
    async fn call(
        &self,
        proxy: Proxy,
        body: Bytes,
        forwarded: &Forwarded,
    ) -> Result<super::app_client::AppResponse, ()> {
        let url = self.urls[proxy as usize]
            .as_ref()
            .expect("a proxy is called only when configured");
        let result = self
            .client
            .post_json(url, body, &forwarded.headers, self.timeout, self.max_answer)
            .await;
        result.map_err(|error: AppError| {
            self.unusable(proxy, &error.to_string());
        })
    }

    fn count(&self, proxy: Proxy, outcome: Outcome) {
        self.metrics.proxy_call(proxy as usize, outcome as usize);
    }

    /// Counts and logs a call that failed closed; returns the connect proxy's verdict for it.
    fn unusable(&self, proxy: Proxy, reason: &str) -> ConnectVerdict {
        self.count(proxy, Outcome::Unavailable);
        let name = crate::metrics::PROXIES[proxy as usize];
        let now = self.started.elapsed().as_millis() as u64;
        let last = &self.warned[proxy as usize];
        let previous = last.load(Ordering::Relaxed);
        let due = previous == 0 || now.saturating_sub(previous) >= WARN_EVERY.as_millis() as u64;
        if due
            && last
                .compare_exchange(previous, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                proxy = name,
                reason, "the application gave no usable answer: refused"
            );
        } else {
            debug!(
                proxy = name,
                reason, "the application gave no usable answer: refused"
            );
        }
        ConnectVerdict::Unavailable
    }
}

/// An upgrade the connect proxy refused: what the client is answered.
#[derive(Debug)]
pub struct UpgradeRefusal {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// After admission (origin, caps, token) accepted an upgrade: asks the connect proxy, when on,
/// and completes `identity` with its grant (its `user_id` and `rooms` take the place of the
/// token's), and keeps the request's headers for the join and publish proxies, when on.
pub async fn on_upgrade(
    node: &Node,
    uri: &Uri,
    headers: &HeaderMap,
    peer: SocketAddr,
    identity: &mut Identity,
) -> Result<(), UpgradeRefusal> {
    let Some(proxies) = &node.proxies else {
        return Ok(());
    };
    let token = node.admission.find_token(uri, headers);
    if proxies.enabled(Proxy::Connect) {
        let client_ip = node.admission.client_ip(headers, peer.ip());
        match proxies
            .connect(client_ip, headers, uri.query(), token.as_deref())
            .await
        {
            ConnectVerdict::Accept(grant) => {
                if let Some(metadata) = &grant.metadata {
                    let size = protocol::metadata_size(&protocol::metadata_updated(metadata));
                    if size > node.session_limits.max_metadata_size {
                        proxies.unusable(Proxy::Connect, "metadata over --max-metadata-size");
                        return Err(unavailable());
                    }
                }
                identity.user_id = grant.user_id.or(identity.user_id.take());
                if let Some(rooms) = grant.rooms {
                    identity.rooms = Some(RoomPolicy::new(rooms));
                }
                identity.metadata = grant.metadata;
            }
            ConnectVerdict::Refuse { status, body } => {
                return Err(UpgradeRefusal {
                    status,
                    content_type: "application/json",
                    body,
                })
            }
            ConnectVerdict::Unavailable => return Err(unavailable()),
        }
    }
    if proxies.forwards_headers() {
        identity.forwarded = Some(Arc::new(Forwarded::from_request(headers, token.as_deref())));
    }
    Ok(())
}

fn unavailable() -> UpgradeRefusal {
    UpgradeRefusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        content_type: "application/json",
        body: Bytes::from(format!(r#"{{"error":"{}"}}"#, errors::APP_UNAVAILABLE)),
    }
}

/// Runs a join or publish call in a task of its own and returns where its verdict arrives.
/// The call is abandoned if the receiver goes first (the connection closed).
pub fn spawn_call(
    proxies: Arc<Proxies>,
    proxy: Proxy,
    body: Bytes,
    forwarded: Arc<Forwarded>,
) -> oneshot::Receiver<Verdict> {
    let (reply, verdict) = oneshot::channel();
    tokio::spawn(async move {
        let mut reply = reply;
        tokio::select! {
            verdict = proxies.decide(proxy, body, &forwarded) => {
                let _ = reply.send(verdict);
            }
            _ = reply.closed() => {}
        }
    });
    verdict
}

/// A user id as apps write it: a string, or a number (Laravel's integer keys).
#[derive(Deserialize)]
#[serde(untagged)]
enum UserId {
    Text(String),
    Number(serde_json::Number),
}

#[derive(Deserialize)]
struct GrantAnswer<'a> {
    #[serde(default)]
    user_id: Option<UserId>,
    #[serde(default, borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// A connect proxy's 200 body: `{}` (or empty) grants nothing more than the upgrade.
fn parse_grant(body: &[u8]) -> Result<ConnectGrant, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ConnectGrant::default());
    }
    let answer: GrantAnswer<'_> =
        serde_json::from_slice(body).map_err(|e| format!("unreadable answer: {e}"))?;
    let user_id: Option<Arc<str>> = answer.user_id.map(|id| match id {
        UserId::Text(text) => Arc::from(text),
        UserId::Number(number) => Arc::from(number.to_string()),
    });
    let metadata = match answer.metadata {
        Some(raw) if raw.get() != "null" => {
            let entries = protocol::metadata_entries(raw)
                .map_err(|_| "`metadata` is not an object".to_owned())?;
            Some(Metadata::default().merged(&entries))
        }
        _ => None,
    };
    Ok(ConnectGrant {
        user_id: user_id.filter(|id| !id.is_empty()),
        metadata,
        rooms: answer.rooms,
    })
}

/// A publish proxy's 200 body: `Some` new message when it has a non-null `message`.
fn replacement(body: &[u8]) -> Result<Option<Box<RawValue>>, String> {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        message: Option<Box<RawValue>>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| format!("unreadable answer: {e}"))?;
    Ok(answer.message.filter(|message| message.get() != "null"))
}

/// The `error` text of a refusal's body, if it has one.
fn error_text(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
    }
    serde_json::from_slice::<Refusal>(body)
        .ok()
        .map(|refusal| refusal.error)
        .filter(|text| !text.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_takes_a_numeric_user_id_and_keeps_metadata_values_as_written() {
        let grant = parse_grant(
            br#"{"user_id": 42, "metadata": {"n": 1E5, "name": "Ann"}, "rooms": ["a", "b*"]}"#,
        )
        .unwrap();
        assert_eq!(grant.user_id.as_deref(), Some("42"));
        let metadata = grant.metadata.unwrap();
        let entries: Vec<_> = metadata
            .entries()
            .map(|(k, v)| (k.to_owned(), v.get().to_owned()))
            .collect();
        assert_eq!(
            entries,
            [
                ("n".into(), "1E5".into()),
                ("name".into(), "\"Ann\"".into())
            ]
        );
        assert_eq!(grant.rooms.unwrap(), ["a", "b*"]);
    }

    #[test]
    fn an_empty_grant_is_a_plain_accept_and_bad_metadata_is_unreadable() {
        assert!(parse_grant(b"").unwrap().user_id.is_none());
        assert!(parse_grant(b"{}").unwrap().metadata.is_none());
        assert!(parse_grant(br#"{"metadata": [1]}"#).is_err());
        assert!(parse_grant(b"not json").is_err());
    }

    #[test]
    fn a_publish_answer_replaces_only_with_a_message() {
        assert!(replacement(b"{}").unwrap().is_none());
        assert!(replacement(br#"{"message": null}"#).unwrap().is_none());
        let new = replacement(br#"{"message": {"id": 7, "text": "hi"}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(new.get(), r#"{"id": 7, "text": "hi"}"#);
        assert!(replacement(b"[").is_err());
    }

    #[test]
    fn forwarded_headers_carry_the_token_as_bearer_only_without_an_authorization_header() {
        let mut request = HeaderMap::new();
        request.insert(COOKIE, HeaderValue::from_static("laravel_session=abc"));
        let forwarded = Forwarded::from_request(&request, Some("tok"));
        assert_eq!(forwarded.headers.len(), 2);
        assert_eq!(forwarded.headers[1].1, "Bearer tok");
        request.insert(AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        let forwarded = Forwarded::from_request(&request, Some("tok"));
        assert_eq!(forwarded.headers[1].1, "Basic xyz");
    }
}
