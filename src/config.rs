//! The server's configuration: one struct, every option a flag with an environment twin.
//!
//! Defaults live in the `defaults` module, used both by the command line and by
//! [`Config::with_listen`], so the two can never disagree.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::outbox::SlowConsumerPolicy;
use crate::telemetry::LogFormat;

/// Every default, in one place.
pub mod defaults {
    pub const LISTEN: &str = "0.0.0.0:8080";
    pub const OUTBOUND_QUEUE: usize = 1024;
    pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;
    pub const MAX_FRAME_SIZE: usize = 64 * 1024;
    pub const HANDSHAKE_TIMEOUT: &str = "10s";
    pub const DRAIN_TIMEOUT: &str = "10s";
    pub const PING_INTERVAL: &str = "30s";
    pub const IDLE_TIMEOUT: &str = "70s";
    pub const SHUTDOWN_DELAY: &str = "0s";
    pub const RATE_LIMIT: f64 = 100.0;
    pub const RATE_BURST: u32 = 200;
    pub const MAX_ROOMS_PER_CONNECTION: usize = 100;
    pub const MAX_ROOM_NAME_LENGTH: usize = 128;
    pub const MAX_METADATA_SIZE: usize = 4096;
}

/// Everything `roomcast serve` can be told. Each option is a flag and a `ROOMCAST_*` variable;
/// the flag wins.
#[derive(Args, Debug, Clone)]
pub struct Config {
    /// Log lines as `text` or `json` (one object per line, for log shippers). Levels come
    /// from RUST_LOG (default `info`).
    #[arg(long, env = "ROOMCAST_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Address to listen on (WebSocket on any path, plus `GET /healthz`).
    #[arg(long, env = "ROOMCAST_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,

    /// Runtime worker threads, each with its own SO_REUSEPORT listener. Default: one per core.
    #[arg(long, env = "ROOMCAST_WORKERS", default_value_t = default_workers())]
    pub workers: usize,

    /// Frames that may wait in one connection's outbound queue before it counts as a slow
    /// consumer. Memory is only used while frames actually wait.
    #[arg(long, env = "ROOMCAST_OUTBOUND_QUEUE", default_value_t = defaults::OUTBOUND_QUEUE)]
    pub outbound_queue: usize,

    /// What happens to a slow consumer whose outbound queue is full: `close` it with 1013
    /// (Try Again Later) or `drop` the frames it cannot take.
    #[arg(
        long,
        env = "ROOMCAST_SLOW_CONSUMER",
        value_enum,
        default_value = "close"
    )]
    pub slow_consumer: SlowConsumerPolicy,

    /// Largest message a client may send, in bytes, all its fragments together; larger closes
    /// the connection with 1009.
    #[arg(long, env = "ROOMCAST_MAX_MESSAGE_SIZE", default_value_t = defaults::MAX_MESSAGE_SIZE)]
    pub max_message_size: usize,

    /// Largest single frame a client may send, in bytes; larger closes the connection with 1009.
    #[arg(long, env = "ROOMCAST_MAX_FRAME_SIZE", default_value_t = defaults::MAX_FRAME_SIZE)]
    pub max_frame_size: usize,

    /// Messages per second one connection may send (token bucket refill rate); 0 turns the
    /// limit off. Over the limit a message gets an `error` reply; see `--rate-burst`.
    #[arg(long, env = "ROOMCAST_RATE_LIMIT", default_value_t = defaults::RATE_LIMIT)]
    pub rate_limit: f64,

    /// Messages a connection may send at once before the rate limit applies (bucket size).
    /// A client that sends this many more while limited is closed with 1008.
    #[arg(long, env = "ROOMCAST_RATE_BURST", default_value_t = defaults::RATE_BURST)]
    pub rate_burst: u32,

    /// Rooms one connection may be in at once; one more gets an `error` reply.
    #[arg(long, env = "ROOMCAST_MAX_ROOMS_PER_CONNECTION", default_value_t = defaults::MAX_ROOMS_PER_CONNECTION)]
    pub max_rooms_per_connection: usize,

    /// Longest room name, in bytes; longer gets an `error` reply.
    #[arg(long, env = "ROOMCAST_MAX_ROOM_NAME_LENGTH", default_value_t = defaults::MAX_ROOM_NAME_LENGTH)]
    pub max_room_name_length: usize,

    /// Largest metadata a connection may hold, in bytes of JSON after merging; larger gets an
    /// `error` reply and the metadata stays as it was.
    #[arg(long, env = "ROOMCAST_MAX_METADATA_SIZE", default_value_t = defaults::MAX_METADATA_SIZE)]
    pub max_metadata_size: usize,

    /// HS256 secret that tokens are signed with. Setting it (or `--jwt-public-key`) makes a
    /// valid token required: missing, bad or expired tokens get HTTP 401 before the upgrade.
    #[arg(
        long,
        env = "ROOMCAST_JWT_SECRET",
        conflicts_with = "jwt_public_key",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// PEM file with the RSA (RS256/384/512) or EC (ES256/384) public key that tokens are
    /// signed with; makes a valid token required.
    #[arg(long, env = "ROOMCAST_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<String>,

    /// Cookie that may carry the token, besides the `token` query parameter and an
    /// `Authorization: Bearer` header. Default: none.
    #[arg(long, env = "ROOMCAST_TOKEN_COOKIE")]
    pub token_cookie: Option<String>,

    /// Origins allowed to open WebSockets, comma-separated: `https://app.example.com`,
    /// `https://*.example.com` (any subdomain), or `*`. Others get HTTP 403. Default: any
    /// origin (a warning is logged). Requests without an Origin header (non-browser clients)
    /// are always allowed.
    #[arg(long, env = "ROOMCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,

    /// Open connections the server accepts; more get HTTP 503. 0: no limit.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Open connections one client address may have; more get HTTP 429. 0: no limit.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Addresses or CIDR ranges of proxies (load balancers) whose `X-Forwarded-For` is
    /// believed, comma-separated. Default: none, so the client address is the TCP peer's.
    #[arg(long, env = "ROOMCAST_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// PEM file with the certificate chain for wss:// (with `--tls-key`). Default: plain ws://.
    #[arg(long, env = "ROOMCAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<String>,

    /// PEM file with the private key for `--tls-cert`.
    #[arg(long, env = "ROOMCAST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<String>,

    /// A path that echoes every message back with the same opcode, through the same frame
    /// stack, for RFC 6455 conformance suites (e.g. `/echo`). Default: off.
    #[arg(long, env = "ROOMCAST_ECHO_PATH")]
    pub echo_path: Option<String>,

    /// How long a client may take to send its HTTP upgrade request (and finish the TLS
    /// handshake).
    #[arg(long, env = "ROOMCAST_HANDSHAKE_TIMEOUT", default_value = defaults::HANDSHAKE_TIMEOUT, value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// How often the server pings every connection; `0s` sends no pings. Clients answer with
    /// a pong, which counts as activity for `--idle-timeout`.
    #[arg(long, env = "ROOMCAST_PING_INTERVAL", default_value = defaults::PING_INTERVAL, value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// How long a connection may send nothing at all (no message, no pong) before it is closed
    /// with 4000; checked at each ping, so closing may take up to one ping interval more.
    /// `0s` never closes for silence.
    #[arg(long, env = "ROOMCAST_IDLE_TIMEOUT", default_value = defaults::IDLE_TIMEOUT, value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGTERM, how long to keep serving with `/readyz` answering 503 before closing, so
    /// load balancers take the node out first.
    #[arg(long, env = "ROOMCAST_SHUTDOWN_DELAY", default_value = defaults::SHUTDOWN_DELAY, value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// How long closing may take: flushing queued frames and the close frame to a client, and
    /// on shutdown, all clients together.
    #[arg(long, env = "ROOMCAST_DRAIN_TIMEOUT", default_value = defaults::DRAIN_TIMEOUT, value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).expect("defaults parse")
}

impl Config {
    /// The defaults, listening on `listen`: what tests and embedders start from.
    pub fn with_listen(listen: SocketAddr) -> Self {
        Self {
            log_format: LogFormat::Text,
            listen,
            workers: default_workers(),
            outbound_queue: defaults::OUTBOUND_QUEUE,
            slow_consumer: SlowConsumerPolicy::Close,
            max_message_size: defaults::MAX_MESSAGE_SIZE,
            max_frame_size: defaults::MAX_FRAME_SIZE,
            rate_limit: defaults::RATE_LIMIT,
            rate_burst: defaults::RATE_BURST,
            max_rooms_per_connection: defaults::MAX_ROOMS_PER_CONNECTION,
            max_room_name_length: defaults::MAX_ROOM_NAME_LENGTH,
            max_metadata_size: defaults::MAX_METADATA_SIZE,
            jwt_secret: None,
            jwt_public_key: None,
            token_cookie: None,
            allowed_origins: None,
            max_connections: 0,
            max_connections_per_ip: 0,
            trusted_proxies: Vec::new(),
            tls_cert: None,
            tls_key: None,
            echo_path: None,
            handshake_timeout: duration(defaults::HANDSHAKE_TIMEOUT),
            drain_timeout: duration(defaults::DRAIN_TIMEOUT),
            ping_interval: duration(defaults::PING_INTERVAL),
            shutdown_delay: duration(defaults::SHUTDOWN_DELAY),
            idle_timeout: duration(defaults::IDLE_TIMEOUT),
        }
    }

    /// Rejects values that cannot work, with a message naming the option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            (self.workers == 0, "--workers must be at least 1"),
            (
                self.outbound_queue == 0,
                "--outbound-queue must be at least 1",
            ),
            (
                self.max_message_size == 0,
                "--max-message-size must be at least 1",
            ),
            (
                self.max_frame_size == 0,
                "--max-frame-size must be at least 1",
            ),
            (
                !(self.rate_limit >= 0.0 && self.rate_limit.is_finite()),
                "--rate-limit must be a number of messages per second, 0 for none",
            ),
            (
                !self.ping_interval.is_zero() && self.ping_interval < Duration::from_secs(1),
                "--ping-interval must be 0s or at least 1s",
            ),
            (
                !self.idle_timeout.is_zero() && self.ping_interval.is_zero(),
                "--idle-timeout needs --ping-interval: without pings, quiet clients look idle",
            ),
            (
                self.rate_limit > 0.0 && self.rate_burst == 0,
                "--rate-burst must be at least 1 when --rate-limit is set",
            ),
        ];
        match checks.iter().find(|(failed, _)| *failed) {
            Some((_, message)) => Err(ConfigError::Invalid(message)),
            None => Ok(()),
        }
    }
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(&'static str),
}
