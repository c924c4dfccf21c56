//! Admission: everything decided before a WebSocket upgrade is accepted.
//!
//! At accept ([`Admission::accept`]): the pending-handshake cap, the per-IP cap for the TCP
//! peer (unless it is a trusted proxy, whose clients are counted once their address is known),
//! and the global cap. A connection holds its place from accept, not from the upgrade, so
//! connections that never finish their request count like any other. At the upgrade
//! ([`Admission::admit`]): the client's address behind trusted proxies (and its per-IP place),
//! the Origin (against cross-site WebSocket hijacking), and the token (a JWT the main
//! application issued). A refusal is an HTTP status with a short reason, never an internal
//! error.
//!
//! At the global cap a few more connections are still accepted for plain HTTP only
//! ([`HTTP_RESERVE`]): health checks, metrics and the API keep answering on a full server,
//! and an upgrade on such a connection gets 503.
//!
//! A connection carries a [`Permit`] for its whole life, closing included: dropping it gives
//! the connection's places back.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use hyper::header::{HeaderMap, AUTHORIZATION, COOKIE, ORIGIN};
use hyper::{StatusCode, Uri};
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tracing::warn;

use crate::api::proxy::Forwarded;
use crate::config::Config;
use crate::protocol::Metadata;

/// Why a connection was refused before the upgrade.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `--max-connections-per-ip` reached for the client's address: 429.
    #[error("too many connections from your address")]
    TooManyFromAddress,
    /// `--max-connections` reached: 503.
    #[error("server is at its connection limit")]
    ServerFull,
    /// The Origin is not in `--allowed-origins`: 403.
    #[error("origin not allowed")]
    OriginNotAllowed,
    /// Auth is on and the token is missing, malformed, badly signed or expired: 401.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// `--max-pending-handshakes` connections are still sending their request: 503.
    #[error("too many handshakes in progress")]
    TooManyPending,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::TooManyFromAddress => StatusCode::TOO_MANY_REQUESTS,
            Refusal::ServerFull | Refusal::TooManyPending => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::OriginNotAllowed => StatusCode::FORBIDDEN,
            Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

/// Who an admitted connection is, from its token and the connect proxy's answer (all empty
/// when neither is configured).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The token's `sub`, or the connect proxy's `user_id`: shown in `welcome` and usable as a
    /// `private_message` target.
    pub user_id: Option<Arc<str>>,
    /// The token's `rooms` claim, or the connect proxy's `rooms`: the rooms this client may
    /// join.
    pub rooms: Option<RoomPolicy>,
    /// The token's `exp` (Unix seconds): the connection is closed with 4001 then.
    pub expires_at: Option<u64>,
    /// Where the connection's metadata starts: the connect proxy's `metadata`.
    pub metadata: Option<Metadata>,
    /// The upgrade request's headers that the join and publish proxies forward (only when one
    /// of them is on).
    pub forwarded: Option<Arc<Forwarded>>,
}

/// Rooms a token allows: exact names, or prefixes written with a trailing `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPolicy {
    patterns: Vec<String>,
}

impl RoomPolicy {
    pub fn new(patterns: Vec<String>) -> Self {
        Self { patterns }
    }

    pub fn allows(&self, room: &str) -> bool {
        self.patterns
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => room.starts_with(prefix),
                None => room == pattern,
            })
    }
}

/// The claims roomcast reads; others are ignored. `exp` and `nbf` are NumericDates, which
/// RFC 7519 allows to be fractional: read as floats and checked here, since jsonwebtoken
/// takes only whole seconds and silently skips an `nbf` it cannot read as one.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    rooms: Option<Vec<String>>,
}

/// Verifies tokens with one key.
struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
    /// Seconds of clock skew allowed around `nbf` and `exp`.
    leeway: u64,
}

impl TokenVerifier {
    fn verify(&self, token: &str) -> Result<Identity, Refusal> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    Refusal::Unauthorized("token expired")
                }
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    Refusal::Unauthorized("bad token signature")
                }
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    Refusal::Unauthorized("token not yet valid")
                }
                jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                    Refusal::Unauthorized("token is for another audience")
                }
                jsonwebtoken::errors::ErrorKind::InvalidIssuer => {
                    Refusal::Unauthorized("token from another issuer")
                }
                jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(claim) => {
                    match claim.as_str() {
                        "aud" => Refusal::Unauthorized("token has no aud"),
                        "iss" => Refusal::Unauthorized("token has no iss"),
                        _ => Refusal::Unauthorized("invalid token"),
                    }
                }
                _ => Refusal::Unauthorized("invalid token"),
            },
        )?;
        let claims = data.claims;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |elapsed| elapsed.as_secs_f64());
        let leeway = self.leeway as f64;
        if claims.exp.is_some_and(|exp| exp + leeway < now) {
            return Err(Refusal::Unauthorized("token expired"));
        }
        if claims.nbf.is_some_and(|nbf| nbf - leeway > now) {
            return Err(Refusal::Unauthorized("token not yet valid"));
        }
        // The leeway that let an expired-by-a-little token in also applies for the rest of the
        // connection's life, so it is not closed with 4001 the next second.
        let expires_at = claims
            .exp
            .map(|exp| (exp.ceil().max(0.0) as u64).saturating_add(self.leeway));
        let user_id = claims
            .sub
            .filter(|sub| !sub.is_empty())
            .ok_or(Refusal::Unauthorized("token has no sub"))?;
        Ok(Identity {
            user_id: Some(user_id.into()),
            rooms: claims.rooms.map(RoomPolicy::new),
            expires_at,
            ..Identity::default()
        })
    }
}

/// An Origin pattern: `*`, an exact origin, or one with a `*.` wildcard for subdomains.
#[derive(Debug, Clone)]
enum OriginPattern {
    Any,
    Exact(String),
    /// Scheme plus `://`, and the domain suffix starting with `.`.
    Subdomains {
        scheme: String,
        suffix: String,
    },
}

impl OriginPattern {
    fn parse(text: &str) -> Self {
        let text = text.trim().trim_end_matches('/').to_ascii_lowercase();
        if text == "*" {
            return OriginPattern::Any;
        }
        if let Some((scheme, rest)) = text.split_once("://*.") {
            return OriginPattern::Subdomains {
                scheme: format!("{scheme}://"),
                suffix: format!(".{rest}"),
            };
        }
        OriginPattern::Exact(text)
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(exact) => origin == exact,
            OriginPattern::Subdomains { scheme, suffix } => origin
                .strip_prefix(scheme.as_str())
                .is_some_and(|host| host.len() > suffix.len() && host.ends_with(suffix.as_str())),
        }
    }
}

/// A configuration error in the admission options.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("--jwt-public-key {path}: {reason}")]
    PublicKey { path: String, reason: String },
    #[error("--trusted-proxies: {0:?} is not an IP address or CIDR range")]
    TrustedProxy(String),
}

/// Connections accepted past the global cap for plain HTTP only (health, metrics, API), so a
/// full server still answers its load balancer and its operators.
pub const HTTP_RESERVE: usize = 64;

/// File descriptors kept free below the open-file limit when `--max-connections` is derived
/// from it: the HTTP reserve, listeners, the runtime's own, files, future backplane
/// connections.
pub const FD_RESERVE: usize = 256;

/// The global cap in force: `--max-connections`, or when 0 the open-file limit less
/// [`FD_RESERVE`] (at least 1), so accept never fails for lack of descriptors.
pub fn effective_max_connections(configured: usize) -> usize {
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let derived = limit.saturating_sub(FD_RESERVE).max(1);
    if configured > 0 {
        if configured > derived {
            warn!(
                max_connections = configured,
                open_file_limit = limit,
                "--max-connections is above the open-file limit less {FD_RESERVE}: at the \
                 limit accept() fails and health checks go unanswered"
            );
        }
        return configured;
    }
    derived
}

/// The admission policy of a server, and its live connection counts.
pub struct Admission {
    origins: Option<Vec<OriginPattern>>,
    verifier: Option<TokenVerifier>,
    token_cookie: Option<String>,
    max_connections: usize,
    max_per_ip: usize,
    max_pending: usize,
    trusted_proxies: Vec<IpNet>,
    /// Connections holding a place under the global cap (pending ones included).
    open: AtomicUsize,
    /// Connections past the cap, served plain HTTP only.
    reserve: AtomicUsize,
    /// Connections that have not finished their request head.
    pending: AtomicUsize,
    /// WebSocket connections (upgraded, not yet closed).
    upgraded: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
}

impl Admission {
    pub fn from_config(config: &Config) -> Result<Self, AdmissionError> {
        let verifier = if let Some(secret) = &config.jwt_secret {
            Some(TokenVerifier {
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: validation(&[Algorithm::HS256], config),
                leeway: config.jwt_leeway.as_secs(),
            })
        } else if let Some(path) = &config.jwt_public_key {
            Some(public_key_verifier(path, config)?)
        } else {
            None
        };
        let origins = config.allowed_origins.as_ref().map(|list| {
            list.iter()
                .filter(|o| !o.trim().is_empty())
                .map(|o| OriginPattern::parse(o))
                .collect()
        });
        if origins.is_none() {
            warn!(
                "--allowed-origins is not set: WebSocket upgrades from any web origin are accepted"
            );
        }
        let trusted_proxies = config
            .trusted_proxies
            .iter()
            .map(|text| parse_net(text).ok_or_else(|| AdmissionError::TrustedProxy(text.clone())))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            origins,
            verifier,
            token_cookie: config.token_cookie.clone(),
            max_connections: effective_max_connections(config.max_connections),
            max_per_ip: config.max_connections_per_ip,
            max_pending: config.max_pending_handshakes,
            trusted_proxies,
            open: AtomicUsize::new(0),
            reserve: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            upgraded: AtomicUsize::new(0),
            per_ip: DashMap::new(),
        })
    }

    /// Whether tokens are required.
    pub fn auth_enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// WebSocket connections upgraded and not yet closed.
    pub fn open_connections(&self) -> usize {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// Connections that have not finished their request head.
    pub fn pending_handshakes(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The global cap in force (see [`effective_max_connections`]).
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Decides on a connection just accepted from `peer`, before reading anything from it.
    pub fn accept(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Refusal> {
        // The permit exists from the first count, so every refusal below gives back what was
        // taken.
        let mut permit = Permit {
            admission: self.clone(),
            ip: None,
            place: Place::None,
            pending: true,
            upgraded: false,
        };
        let pending = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        if self.max_pending > 0 && pending > self.max_pending {
            return Err(Refusal::TooManyPending);
        }
        if !self.is_trusted(peer) {
            self.claim_address(&mut permit, peer)?;
        }
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        permit.place = Place::Counted;
        if open > self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            permit.place = Place::None;
            let reserve = self.reserve.fetch_add(1, Ordering::AcqRel) + 1;
            permit.place = Place::HttpOnly;
            if reserve > HTTP_RESERVE {
                return Err(Refusal::ServerFull);
            }
        }
        Ok(permit)
    }

    /// Counts the connection under the per-IP cap for `ip`, once: the TCP peer's address at
    /// accept, or behind a trusted proxy the client's (PROXY header, `X-Forwarded-For`).
    pub fn claim_address(&self, permit: &mut Permit, ip: IpAddr) -> Result<(), Refusal> {
        if self.max_per_ip == 0 || permit.ip.is_some() {
            return Ok(());
        }
        let mut count = self.per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return Err(Refusal::TooManyFromAddress);
        }
        *count += 1;
        permit.ip = Some(ip);
        Ok(())
    }

    /// Decides on an upgrade request from `peer` on a connection holding `permit`.
    pub fn admit(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        peer: SocketAddr,
        permit: &mut Permit,
        needs_token: bool,
    ) -> Result<Identity, Refusal> {
        if permit.place == Place::HttpOnly {
            return Err(Refusal::ServerFull);
        }
        if self.is_trusted(peer.ip()) {
            let client = self.client_ip(headers, peer.ip());
            self.claim_address(permit, client)?;
        }
        self.check_origin(headers)?;
        let identity = match &self.verifier {
            _ if !needs_token => Identity::default(),
            None => Identity::default(),
            Some(verifier) => {
                let token = self
                    .find_token(uri, headers)
                    .ok_or(Refusal::Unauthorized("token required"))?;
                verifier.verify(&token)?
            }
        };
        Ok(identity)
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy, in which case the
    /// nearest untrusted address in `X-Forwarded-For`.
    pub fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        // Walk the hops from the one nearest us: the last header line (a proxy that appends a
        // line, like HAProxy's `option forwardfor`, puts its hop there), right to left within a
        // line. The first hop that is not a trusted proxy is the client. A hop that does not
        // parse ends the walk: everything left of it may have been written by the client.
        let mut client = peer;
        let lines: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        for value in lines.into_iter().rev() {
            let Ok(value) = value.to_str() else {
                return client;
            };
            for hop in value.rsplit(',') {
                let Some(hop) = parse_hop(hop) else {
                    return client;
                };
                client = hop;
                if !self.is_trusted(hop) {
                    return hop;
                }
            }
        }
        client
    }

    /// Whether `ip` is one of `--trusted-proxies`.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    fn check_origin(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(patterns) = &self.origins else {
            return Ok(());
        };
        // Browsers always send Origin with a WebSocket upgrade; clients that are not browsers
        // (servers, apps) usually do not, and cannot be hijacked cross-site.
        let Some(origin) = headers.get(ORIGIN) else {
            return Ok(());
        };
        let origin = origin
            .to_str()
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .map_err(|_| Refusal::OriginNotAllowed)?;
        if patterns.iter().any(|pattern| pattern.matches(&origin)) {
            Ok(())
        } else {
            Err(Refusal::OriginNotAllowed)
        }
    }

    /// The token from the `token` query parameter, an `Authorization: Bearer` header, or the
    /// configured cookie, in that order.
    pub fn find_token(&self, uri: &Uri, headers: &HeaderMap) -> Option<String> {
        let from_query = uri.query().and_then(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == "token")
                .map(|(_, value)| value.into_owned())
        });
        let from_header = || {
            headers
                .get(AUTHORIZATION)?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")
                .map(|token| token.trim().to_owned())
        };
        let from_cookie = || {
            let name = self.token_cookie.as_deref()?;
            headers.get_all(COOKIE).iter().find_map(|value| {
                value.to_str().ok()?.split(';').find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    (key == name).then(|| value.to_owned())
                })
            })
        };
        from_query
            .or_else(from_header)
            .or_else(from_cookie)
            .filter(|token| !token.is_empty())
    }
}

/// What a token must satisfy besides its signature: `exp` and `nbf` when present (within
/// `--jwt-leeway`), and `aud` / `iss` when configured (then they are required).
fn validation(algorithms: &[Algorithm], config: &Config) -> Validation {
    let mut validation = Validation::new(algorithms[0]);
    validation.algorithms = algorithms.to_vec();
    // `exp` and `nbf` are checked by `TokenVerifier::verify` (fractional NumericDates too);
    // tokens without `exp` are accepted and never expire.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = config.jwt_leeway.as_secs();
    validation.validate_aud = config.jwt_audience.is_some();
    if let Some(audience) = &config.jwt_audience {
        validation.set_audience(&[audience]);
        validation.required_spec_claims.insert("aud".into());
    }
    if let Some(issuer) = &config.jwt_issuer {
        validation.set_issuer(&[issuer]);
        validation.required_spec_claims.insert("iss".into());
    }
    validation
}

fn public_key_verifier(path: &str, config: &Config) -> Result<TokenVerifier, AdmissionError> {
    let error = |reason: String| AdmissionError::PublicKey {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok(TokenVerifier {
            key,
            validation: validation(
                &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
                config,
            ),
            leeway: config.jwt_leeway.as_secs(),
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok(TokenVerifier {
            key,
            validation: validation(&[Algorithm::ES256, Algorithm::ES384], config),
            leeway: config.jwt_leeway.as_secs(),
        });
    }
    Err(error("not an RSA or EC public key in PEM".into()))
}

/// One `X-Forwarded-For` hop: an address, possibly with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:5678`), as some proxies write it.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    hop.parse::<std::net::SocketAddr>()
        .ok()
        .map(|addr| addr.ip())
}

fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Which count a connection's place is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    None,
    /// Under the global cap.
    Counted,
    /// In the HTTP reserve past the cap: no upgrade.
    HttpOnly,
}

/// A connection's places under the caps, held for its whole life (closing included, so a
/// socket still draining its close counts against its address).
pub struct Permit {
    admission: Arc<Admission>,
    /// The address counted under the per-IP cap, once known.
    ip: Option<IpAddr>,
    place: Place,
    /// Still counted as a pending handshake.
    pending: bool,
    /// Counted as a WebSocket connection.
    upgraded: bool,
}

impl Permit {
    /// The handshake is over (upgraded, or the request head read): the connection stops
    /// counting against `--max-pending-handshakes`.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.admission.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The connection is a WebSocket from now on.
    pub fn upgraded(&mut self) {
        self.handshake_done();
        if !std::mem::replace(&mut self.upgraded, true) {
            self.admission.upgraded.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.handshake_done();
        let admission = &self.admission;
        if self.upgraded {
            admission.upgraded.fetch_sub(1, Ordering::AcqRel);
        }
        match self.place {
            Place::None => {}
            Place::Counted => {
                admission.open.fetch_sub(1, Ordering::AcqRel);
            }
            Place::HttpOnly => {
                admission.reserve.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if let Some(ip) = self.ip {
            admission.per_ip.remove_if_mut(&ip, |_, count| {
                *count -= 1;
                *count == 0
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_patterns() {
        let any = OriginPattern::parse("*");
        let exact = OriginPattern::parse("https://App.example.com/");
        let wild = OriginPattern::parse("https://*.example.com");
        assert!(any.matches("http://evil.test"));
        assert!(exact.matches("https://app.example.com"));
        assert!(!exact.matches("http://app.example.com"));
        assert!(wild.matches("https://a.example.com"));
        assert!(wild.matches("https://a.b.example.com"));
        assert!(!wild.matches("https://example.com"));
        assert!(!wild.matches("https://evilexample.com"));
        assert!(!wild.matches("http://a.example.com"));
    }

    #[test]
    fn room_policy_takes_names_and_prefixes() {
        let policy = RoomPolicy::new(vec!["lobby".into(), "team-42:*".into()]);
        assert!(policy.allows("lobby"));
        assert!(policy.allows("team-42:general"));
        assert!(!policy.allows("lobby2"));
        assert!(!policy.allows("team-43:general"));
    }

    #[test]
    fn forwarded_hops_parse_with_or_without_a_port() {
        assert_eq!(parse_hop(" 1.2.3.4 "), Some("1.2.3.4".parse().unwrap()));
        assert_eq!(parse_hop("1.2.3.4:5555"), Some("1.2.3.4".parse().unwrap()));
        assert_eq!(
            parse_hop("[2001:db8::1]:80"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(parse_hop("unknown"), None);
    }

    #[test]
    fn trusted_proxy_entries_parse_as_addresses_or_ranges() {
        assert!(parse_net("10.0.0.0/8")
            .unwrap()
            .contains(&"10.1.2.3".parse::<IpAddr>().unwrap()));
        assert!(parse_net("127.0.0.1")
            .unwrap()
            .contains(&"127.0.0.1".parse::<IpAddr>().unwrap()));
        assert!(parse_net("::1").is_some());
        assert!(parse_net("nope").is_none());
    }
}
