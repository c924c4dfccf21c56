//! The server's configuration: one struct, every option a flag with an environment twin and a
//! key of the `--config` TOML file.
//!
//! Precedence: flag > `ROOMCAST_*` environment variable > file > default. The file layer is
//! applied by [`with_file_args`], which turns the file's keys into flags placed before the real
//! ones (the command line lets a later flag override an earlier one), leaving out keys whose
//! environment variable is set. So one parser checks every value, whatever its source.
//! Defaults live in the `defaults` module, used both by the command line and by
//! [`Config::with_listen`], so the two can never disagree.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory};
use serde::{Serialize, Serializer};

use crate::outbox::SlowConsumerPolicy;
use crate::telemetry::LogFormat;

/// Every default, in one place.
pub mod defaults {
    pub const LISTEN: &str = "0.0.0.0:8080";
    pub const OUTBOUND_QUEUE: usize = 1024;
    pub const OUTBOUND_QUEUE_BYTES: usize = 1024 * 1024;
    /// SO_SNDBUF of each accepted socket. Linux doubles it for bookkeeping and stops
    /// autotuning: a client that stops reading holds at most 256 KiB of kernel memory on its
    /// socket, against up to tcp_wmem's maximum (4 MiB by default) when autotuned. Behind the
    /// 1 MiB outbound queue that still writes 128 KiB per round trip: 10 MB/s at 25 ms, far
    /// above what a fan-out client of small messages reads.
    pub const SOCKET_SEND_BUFFER: usize = 128 * 1024;
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
    pub const JWT_LEEWAY: &str = "5s";
    pub const MAX_PENDING_HANDSHAKES: usize = 10_000;
    pub const MAX_REQUEST_HEAD_SIZE: usize = 8 * 1024;
}

/// Everything `roomcast serve` can be told. Each option is a flag and a `ROOMCAST_*` variable;
/// the flag wins.
#[derive(Args, Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    /// TOML file with any of these options, keyed by flag name (`max-connections = 1000`).
    /// Flags and environment variables override it.
    #[arg(long, env = "ROOMCAST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

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
    /// consumer.
    #[arg(long, env = "ROOMCAST_OUTBOUND_QUEUE", default_value_t = defaults::OUTBOUND_QUEUE)]
    pub outbound_queue: usize,

    /// Bytes that may wait in one connection's outbound queue before it counts as a slow
    /// consumer, whichever of the two bounds is reached first. At least 4 x
    /// --max-message-size.
    #[arg(
        long,
        env = "ROOMCAST_OUTBOUND_QUEUE_BYTES",
        default_value_t = defaults::OUTBOUND_QUEUE_BYTES
    )]
    pub outbound_queue_bytes: usize,

    /// Send buffer of each accepted socket, in bytes (SO_SNDBUF; Linux doubles it and stops
    /// autotuning it): the kernel memory a client that stops reading can hold on its socket.
    /// 0 leaves the kernel's autotuning (up to net.ipv4.tcp_wmem's maximum, 4 MiB by default).
    #[arg(
        long,
        env = "ROOMCAST_SOCKET_SEND_BUFFER",
        default_value_t = defaults::SOCKET_SEND_BUFFER
    )]
    pub socket_send_buffer: usize,

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

    /// Bytes per second one connection may send, all messages together (a token bucket beside
    /// the message rate); over it a message gets the rate-limit `error`. 0 turns it off; so
    /// does `--rate-limit 0`. Default: a quarter of --outbound-queue-bytes (256 KiB/s).
    #[arg(long, env = "ROOMCAST_RATE_LIMIT_BYTES")]
    pub rate_limit_bytes: Option<usize>,

    /// Bytes a connection may send at once before `--rate-limit-bytes` applies. What one
    /// client sends lands in every recipient's queue, so this stays below
    /// --outbound-queue-bytes: a whole burst never closes a prompt reader. At least
    /// --max-message-size. Default: half of --outbound-queue-bytes (512 KiB).
    #[arg(long, env = "ROOMCAST_RATE_BURST_BYTES")]
    pub rate_burst_bytes: Option<usize>,

    /// Whether clients may send `broadcast` (every connected client gets it). `false`
    /// answers it with the `error` "Broadcast is disabled"; the application can still reach
    /// everyone through rooms. Default: true, as in the seed.
    #[arg(long, env = "ROOMCAST_CLIENT_BROADCAST", default_value_t = true, action = clap::ArgAction::Set)]
    pub client_broadcast: bool,

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
    #[arg(long, env = "ROOMCAST_JWT_SECRET", hide_env_values = true)]
    #[serde(serialize_with = "redacted")]
    pub jwt_secret: Option<String>,

    /// PEM file with the RSA (RS256/384/512) or EC (ES256/384) public key that tokens are
    /// signed with; makes a valid token required.
    #[arg(long, env = "ROOMCAST_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<String>,

    /// The `aud` a token must name (a string, or one entry of a list). Default: `aud` is not
    /// checked.
    #[arg(long, env = "ROOMCAST_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// The `iss` a token must carry. Default: `iss` is not checked.
    #[arg(long, env = "ROOMCAST_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Clock skew allowed between the application that signs tokens and this server: a token
    /// is accepted from `nbf` minus this and until `exp` plus this.
    #[arg(long, env = "ROOMCAST_JWT_LEEWAY", default_value = defaults::JWT_LEEWAY, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub jwt_leeway: Duration,

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

    /// Open connections the server accepts, counted from the TCP accept (handshakes in
    /// progress included); more get HTTP 503, while 64 more may still get plain HTTP (health,
    /// metrics, API). 0: the open-file limit less 256, so accept never runs out of
    /// descriptors.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Open connections one client address may have, counted from the TCP accept
    /// (handshakes in progress and closing connections included); more get HTTP 429. 0: no
    /// limit.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Connections that may be sending their HTTP request head at once (each holds what it
    /// has sent, up to --max-request-head-size); more are answered 503 at accept. 0: no
    /// limit beyond --max-connections.
    #[arg(long, env = "ROOMCAST_MAX_PENDING_HANDSHAKES", default_value_t = defaults::MAX_PENDING_HANDSHAKES)]
    pub max_pending_handshakes: usize,

    /// Largest HTTP request head (request line and headers) in bytes; larger gets 431.
    /// At least 1024.
    #[arg(long, env = "ROOMCAST_MAX_REQUEST_HEAD_SIZE", default_value_t = defaults::MAX_REQUEST_HEAD_SIZE)]
    pub max_request_head_size: usize,

    /// Addresses or CIDR ranges of proxies (load balancers) whose `X-Forwarded-For` is
    /// believed, comma-separated. Default: none, so the client address is the TCP peer's.
    #[arg(long, env = "ROOMCAST_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Key that opens `GET /api/stats` (connections, rooms, the largest rooms as JSON), sent
    /// as `Authorization: Bearer KEY`. Default: none, and the endpoint answers 404.
    #[arg(long, env = "ROOMCAST_API_KEY", hide_env_values = true)]
    #[serde(serialize_with = "redacted")]
    pub api_key: Option<String>,

    /// PEM file with the certificate chain for wss:// (with `--tls-key`). Default: plain ws://.
    #[arg(long, env = "ROOMCAST_TLS_CERT")]
    pub tls_cert: Option<String>,

    /// PEM file with the private key for `--tls-cert`.
    #[arg(long, env = "ROOMCAST_TLS_KEY")]
    pub tls_key: Option<String>,

    /// A path that echoes every message back with the same opcode, through the same frame
    /// stack, for RFC 6455 conformance suites (e.g. `/echo`). Default: off.
    #[arg(long, env = "ROOMCAST_ECHO_PATH")]
    pub echo_path: Option<String>,

    /// How long a client may take to send its HTTP upgrade request (and finish the TLS
    /// handshake).
    #[arg(long, env = "ROOMCAST_HANDSHAKE_TIMEOUT", default_value = defaults::HANDSHAKE_TIMEOUT, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub handshake_timeout: Duration,

    /// How often the server pings every connection; `0s` sends no pings. Clients answer with
    /// a pong, which counts as activity for `--idle-timeout`.
    #[arg(long, env = "ROOMCAST_PING_INTERVAL", default_value = defaults::PING_INTERVAL, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub ping_interval: Duration,

    /// How long a connection may send nothing at all (no message, no pong) before it is closed
    /// with 4000. Checked at each ping: a silent connection is closed between this long and
    /// this plus one ping interval after its last frame. `0s` never closes for silence.
    #[arg(long, env = "ROOMCAST_IDLE_TIMEOUT", default_value = defaults::IDLE_TIMEOUT, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub idle_timeout: Duration,

    /// On SIGTERM, how long to keep serving with `/readyz` answering 503 before closing, so
    /// load balancers take the node out first.
    #[arg(long, env = "ROOMCAST_SHUTDOWN_DELAY", default_value = defaults::SHUTDOWN_DELAY, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub shutdown_delay: Duration,

    /// How long closing may take: flushing queued frames and the close frame to a client, and
    /// on shutdown, all clients together. A client whose close is not done by then (one that
    /// does not read) is reset, which frees its socket's send buffer at once.
    #[arg(long, env = "ROOMCAST_DRAIN_TIMEOUT", default_value = defaults::DRAIN_TIMEOUT, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub drain_timeout: Duration,
}

/// The largest size limit accepted: a message must fit in memory, and frame arithmetic stays
/// far from overflow.
const MAX_SIZE_LIMIT: usize = 1 << 30;

/// The smallest `--socket-send-buffer` accepted (but 0): below a page, every write is a few
/// segments and throughput collapses.
const MIN_SOCKET_SEND_BUFFER: usize = 4096;

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
            config: None,
            log_format: LogFormat::Text,
            listen,
            workers: default_workers(),
            outbound_queue: defaults::OUTBOUND_QUEUE,
            outbound_queue_bytes: defaults::OUTBOUND_QUEUE_BYTES,
            socket_send_buffer: defaults::SOCKET_SEND_BUFFER,
            slow_consumer: SlowConsumerPolicy::Close,
            max_message_size: defaults::MAX_MESSAGE_SIZE,
            max_frame_size: defaults::MAX_FRAME_SIZE,
            rate_limit: defaults::RATE_LIMIT,
            rate_burst: defaults::RATE_BURST,
            rate_limit_bytes: None,
            rate_burst_bytes: None,
            client_broadcast: true,
            max_rooms_per_connection: defaults::MAX_ROOMS_PER_CONNECTION,
            max_room_name_length: defaults::MAX_ROOM_NAME_LENGTH,
            max_metadata_size: defaults::MAX_METADATA_SIZE,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_leeway: duration(defaults::JWT_LEEWAY),
            token_cookie: None,
            allowed_origins: None,
            max_connections: 0,
            max_connections_per_ip: 0,
            max_pending_handshakes: defaults::MAX_PENDING_HANDSHAKES,
            max_request_head_size: defaults::MAX_REQUEST_HEAD_SIZE,
            trusted_proxies: Vec::new(),
            api_key: None,
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

    /// Inbound bytes per second per connection: `--rate-limit-bytes`, or a quarter of the
    /// outbound queue's byte bound. 0 when off.
    pub fn rate_limit_bytes(&self) -> usize {
        self.rate_limit_bytes
            .unwrap_or(self.outbound_queue_bytes / 4)
    }

    /// Inbound bytes a connection may send at once: `--rate-burst-bytes`, or half of the
    /// outbound queue's byte bound, so one sender's burst fits in every recipient's queue.
    pub fn rate_burst_bytes(&self) -> usize {
        self.rate_burst_bytes
            .unwrap_or(self.outbound_queue_bytes / 2)
    }

    /// Rejects values that cannot work, with a message naming the option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let byte_budget = self.rate_limit > 0.0 && self.rate_limit_bytes() > 0;
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
                self.max_message_size > MAX_SIZE_LIMIT || self.max_frame_size > MAX_SIZE_LIMIT,
                "--max-message-size and --max-frame-size must be at most 1 GiB",
            ),
            (
                self.outbound_queue_bytes / 4 < self.max_message_size,
                "--outbound-queue-bytes must be at least 4 x --max-message-size: a client \
                 reading at full speed can have a few of the largest messages waiting at once",
            ),
            (
                self.socket_send_buffer != 0 && self.socket_send_buffer < MIN_SOCKET_SEND_BUFFER,
                "--socket-send-buffer must be 0 (kernel autotuning) or at least 4096 bytes",
            ),
            (
                self.socket_send_buffer > MAX_SIZE_LIMIT,
                "--socket-send-buffer must be at most 1 GiB",
            ),
            (
                self.drain_timeout < Duration::from_millis(100),
                "--drain-timeout must be at least 100ms, or close frames cannot be written",
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
                byte_budget && self.rate_burst_bytes() < self.max_message_size,
                "--rate-burst-bytes must be at least --max-message-size, or the largest \
                 messages could never be sent",
            ),
            (
                byte_budget && self.rate_burst_bytes() > self.outbound_queue_bytes,
                "--rate-burst-bytes must be at most --outbound-queue-bytes: one client's burst \
                 lands in every recipient's queue and would close prompt readers",
            ),
            (
                byte_budget && self.rate_burst_bytes() > u32::MAX as usize,
                "--rate-burst-bytes must be at most 4 GiB",
            ),
            (
                !(1024..=1 << 20).contains(&self.max_request_head_size),
                "--max-request-head-size must be between 1024 and 1048576 bytes",
            ),
            (
                self.jwt_leeway > Duration::from_secs(300),
                "--jwt-leeway must be at most 5m: it lets expired tokens in for that long",
            ),
            (
                self.rate_limit > 0.0 && self.rate_burst == 0,
                "--rate-burst must be at least 1 when --rate-limit is set",
            ),
            // Checked here, not by clap, because the two halves may come from different
            // layers (a flag and the file, say).
            (
                self.jwt_secret.is_some() && self.jwt_public_key.is_some(),
                "--jwt-secret and --jwt-public-key cannot both be set: tokens are checked \
                 with one key",
            ),
            (
                self.tls_cert.is_some() != self.tls_key.is_some(),
                "--tls-cert and --tls-key go together: set both for wss://, or neither",
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
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{path}: unknown key `{key}` (keys are the long flag names, e.g. `max-connections`)")]
    UnknownKey { path: String, key: String },
}

fn humantime_duration<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_duration(*value).to_string())
}

fn redacted<S: Serializer>(value: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => serializer.serialize_str("<redacted>"),
        None => serializer.serialize_none(),
    }
}

impl Config {
    /// The effective configuration as TOML (secrets redacted), for `roomcast check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// A parser for `Config` alone: the server's options without subcommands.
#[derive(clap::Parser)]
#[command(name = "roomcast", args_override_self = true)]
struct ConfigOnly {
    #[command(flatten)]
    config: Config,
}

/// Parses the server's options (`args[0]` is the program name) with the `--config` file
/// applied under them, and validates the result.
pub fn load(args: Vec<OsString>) -> Result<Config, LoadError> {
    use clap::Parser;
    let args = with_file_args(args)?;
    let config = ConfigOnly::try_parse_from(args)?.config;
    config.validate()?;
    Ok(config)
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A flag, environment variable or file value the parser refused (the message names it).
    #[error("{0}")]
    Parse(#[from] clap::Error),
}

/// The command-line arguments with the `--config` file's options inserted in front of the real
/// ones (after a leading `serve`), so that flags override the file. Keys whose `ROOMCAST_*`
/// environment variable is set are left out, since the environment overrides the file. The
/// file comes from `--config` or `ROOMCAST_CONFIG`; without one the arguments are returned
/// as they are.
pub fn with_file_args(args: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let path =
        config_path(&args).or_else(|| std::env::var_os("ROOMCAST_CONFIG").map(PathBuf::from));
    let Some(path) = path else {
        return Ok(args);
    };
    let file_args = file_args(&path)?;
    let at = if args.get(1).is_some_and(|a| a == "serve") {
        2
    } else {
        1.min(args.len())
    };
    let mut merged = args[..at].to_vec();
    merged.extend(file_args);
    merged.extend_from_slice(&args[at..]);
    Ok(merged)
}

fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}

/// The file's options as `--key=value` arguments.
fn file_args(path: &Path) -> Result<Vec<OsString>, ConfigError> {
    let shown = path.display().to_string();
    let error = |reason: String| ConfigError::File {
        path: shown.clone(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| error(e.to_string()))?;
    let command = ConfigOnly::command();
    let mut args = Vec::new();
    for (key, value) in table {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
            .ok_or_else(|| ConfigError::UnknownKey {
                path: shown.clone(),
                key: key.clone(),
            })?;
        let env_set = arg
            .get_env()
            .is_some_and(|name| std::env::var_os(name).is_some());
        if env_set {
            continue;
        }
        let value = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    toml::Value::String(text) => Ok(text),
                    other => Ok(other.to_string()),
                })
                .collect::<Result<Vec<_>, ConfigError>>()?
                .join(","),
            other => {
                return Err(error(format!(
                    "`{key}` must be a string, number, boolean or list, not {}",
                    other.type_str()
                )))
            }
        };
        args.push(OsString::from(format!("--{key}={value}")));
    }
    Ok(args)
}
