//! The server's configuration: one struct, every option a flag with an environment twin and a
//! key of the `--config` TOML file.
//!
//! Precedence: flag > `ROOMCAST_*` environment variable > file > default. Clap parses the
//! flags and the environment into `ArgMatches`, which know where each value came from
//! ([`ArgMatches::value_source`]); [`with_file`] then gives every option that has its value
//! from the default (or none) the file's value, if the file has one.
//!
//! The file is read with serde into `FileLayer`, which has one optional field per flag
//! (`deny_unknown_fields`, so a typo is an error naming the key) and is where tables will go.
//! A flag's key holds a `Scalar` (string, number or boolean) or, for the two list options, a
//! `List` (an array of strings, or the flag's comma-separated string); anything else is an
//! error naming the key. The value is then parsed by clap, as the text of that flag
//! (`workers = 4` as `--workers=4`), by a command made of the same arguments without
//! environment variables or defaults: so a file value follows the very rules of its flag
//! (durations through humantime, `slow-consumer` and `log-format` as clap's value enums,
//! booleans, the comma delimiter of lists) with the same messages, and lands in `Config` through
//! clap's own `update_from_arg_matches`, with no second list of fields to keep in step.
//! Deserializing typed values with serde instead would need serde impls for the value enums
//! and durations, and would parse differently from the flags (`workers = "4"` works today).
//! Checks across options (`Config::validate`) run on the merged result, whichever layers the
//! values came from.
//!
//! Defaults live in the `defaults` module, used both by the command line and by
//! [`Config::with_listen`], so the two can never disagree; the file layer has none.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use crate::broker::BrokerKind;
use crate::outbox::SlowConsumerPolicy;
use crate::telemetry::LogFormat;

/// Every default, in one place.
pub mod defaults {
    pub const LISTEN: &str = "0.0.0.0:8080";
    pub const OUTBOUND_QUEUE: usize = 1024;
    /// `--compression-min-size`: below this a JSON message gains little from DEFLATE.
    pub const COMPRESSION_MIN_SIZE: usize = 256;
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
    pub const DEFER_ACCEPT: &str = "5s";
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
    pub const PROXY_TIMEOUT: &str = "2s";
    pub const HISTORY_SIZE: usize = 0;
    pub const HISTORY_TTL: &str = "0s";
    pub const HISTORY_RECOVERY_MAX: usize = 1000;
    pub const REDIS_PREFIX: &str = "roomcast";
    pub const WEBHOOK_QUEUE: usize = 10_000;
    pub const WEBHOOK_BATCH: usize = 100;
    pub const WEBHOOK_TIMEOUT: &str = "5s";
    /// Retries after the first attempt: 8 attempts in all, over about a minute with the
    /// default backoff (0.5 + 1 + 2 + 4 + 8 + 16 + 30 s).
    pub const WEBHOOK_RETRIES: u32 = 7;
    pub const WEBHOOK_RETRY_BACKOFF: &str = "500ms";
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

    /// One `info` line per connection opened and per connection closed (with its reason and
    /// duration). Off by default: at tens of thousands of connections per second (a reconnect
    /// storm after a deploy) the two lines were ~8 % of a connection's set-up CPU and a log
    /// flood; without the switch they are `debug` lines (`RUST_LOG=roomcast=debug`), and the
    /// metrics count every connection either way.
    #[arg(long, env = "ROOMCAST_LOG_CONNECTIONS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub log_connections: bool,

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

    /// permessage-deflate (RFC 7692) for the clients that offer it: their compressed messages
    /// are inflated (the size limits apply to the inflated size), and every message to them of
    /// at least --compression-min-size bytes is sent compressed, a fan-out's frame compressed
    /// once for all its compressing recipients. Without context takeover on either side, so a
    /// connection keeps no compression state. Default: off.
    #[arg(long, env = "ROOMCAST_COMPRESSION", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub compression: bool,

    /// The smallest message payload, in bytes, sent compressed under --compression (smaller
    /// ones gain little and cost a deflate each).
    #[arg(long, env = "ROOMCAST_COMPRESSION_MIN_SIZE", default_value_t = defaults::COMPRESSION_MIN_SIZE)]
    pub compression_min_size: usize,

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

    /// Key that opens the server API under `/api/` (publish, broadcast, send, rooms, stats),
    /// sent as `Authorization: Bearer KEY` or `X-API-Key: KEY`. Default: none, and every
    /// `/api/` path answers 404.
    #[arg(long, env = "ROOMCAST_API_KEY", hide_env_values = true)]
    #[serde(serialize_with = "redacted")]
    pub api_key: Option<String>,

    /// Redis that nodes share rooms and broadcasts through (`redis://[:password@]host:port/db`):
    /// set it on every node behind the load balancer. Default: none, this node alone. Cost: one
    /// envelope published per room message or broadcast, one subscription per room with local
    /// members.
    #[arg(long, env = "ROOMCAST_REDIS", hide_env_values = true)]
    #[serde(serialize_with = "redacted")]
    pub redis: Option<String>,

    /// A Redis Cluster instead (`redis://host:port` of one or more of its masters, comma
    /// separated; the rest are found from them): nodes share rooms through sharded pub/sub
    /// (`SSUBSCRIBE` / `SPUBLISH`), so a message travels only within the shard that owns its
    /// room. Default: none. Not with `--redis`.
    #[arg(
        long,
        env = "ROOMCAST_REDIS_CLUSTER",
        value_delimiter = ',',
        conflicts_with = "redis",
        hide_env_values = true
    )]
    #[serde(serialize_with = "redacted_list")]
    pub redis_cluster: Vec<String>,

    /// Prefix of every Redis channel and key, so several deployments can share one Redis.
    #[arg(long, env = "ROOMCAST_REDIS_PREFIX", default_value = defaults::REDIS_PREFIX)]
    pub redis_prefix: String,

    /// The application's URL that authorizes each upgrade: roomcast POSTs the client's address,
    /// its cookie, authorization, origin and user-agent headers and its query, and a 200
    /// answer's `user_id`, `metadata` and `rooms` become the connection's; 401 or 403 refuse the
    /// upgrade with the app's status and body; no answer in time is 503. Default: none. Cost: one
    /// call to the app per connection, before its 101.
    #[arg(long, env = "ROOMCAST_CONNECT_PROXY")]
    pub connect_proxy: Option<String>,

    /// The application's URL that decides each `join_room`: 200 allows, 4xx refuses with the
    /// app's `error`. Default: none. Cost: one call per join; the connection's later messages
    /// wait behind it, other connections do not.
    #[arg(long, env = "ROOMCAST_JOIN_PROXY")]
    pub join_proxy: Option<String>,

    /// The application's URL that sees each client `room_message` and `broadcast` before it is
    /// relayed: 200 `{}` relays it, 200 `{"message": NEW}` relays NEW, 4xx refuses with the
    /// app's `error`. Default: none. Cost: one call per message and the app's latency on it;
    /// without the flag the hot path does no extra work.
    #[arg(long, env = "ROOMCAST_PUBLISH_PROXY")]
    pub publish_proxy: Option<String>,

    /// How long the application has to answer a proxy call, from connect to the last byte; a
    /// call without an answer in time fails closed (503 for a connect, an `error` for a join
    /// or a message).
    #[arg(long, env = "ROOMCAST_PROXY_TIMEOUT", default_value = defaults::PROXY_TIMEOUT, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub proxy_timeout: Duration,

    /// Room messages kept per room, for clients that reconnect (`join_room` with `since`) and
    /// the `history` command; on only with `--history-ttl` above zero too. Default: 0, off.
    /// Cost: the message's opted-in frame encoded once more per publication, and kept.
    #[arg(long, env = "ROOMCAST_HISTORY_SIZE", default_value_t = defaults::HISTORY_SIZE)]
    pub history_size: usize,

    /// How long a room message is kept in the history (with `--history-size`). Default: 0s,
    /// off.
    #[arg(long, env = "ROOMCAST_HISTORY_TTL", default_value = defaults::HISTORY_TTL, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub history_ttl: Duration,

    /// The most messages one recovery replays; a client that missed more is told
    /// `recovered: false` and nothing is replayed.
    #[arg(long, env = "ROOMCAST_HISTORY_RECOVERY_MAX", default_value_t = defaults::HISTORY_RECOVERY_MAX)]
    pub history_recovery_max: usize,

    /// Rooms whose history differs from `--history-size`/`--history-ttl`, in the config file
    /// only: `[[history-rooms]]` tables of `pattern` (a name, or a prefix ending in `*`),
    /// `size` (0: no history for those rooms) and `ttl`; the first matching pattern wins.
    #[arg(skip)]
    pub history_rooms: Vec<HistoryRoom>,

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

    /// A path that speaks the seed's Swoole variant (e.g. `/relay`): each connection there is
    /// greeted with `{"type":"welcome","fd":N}` and every message one sends is relayed
    /// verbatim to all connections on that path, the sender included. Default: off.
    #[arg(long, env = "ROOMCAST_RELAY_PATH")]
    pub relay_path: Option<String>,

    /// A Pusher app, `ID:KEY:SECRET` (repeat the flag, or separate with commas in the
    /// environment): its clients connect at `/app/KEY` with the Pusher protocol. The id is
    /// numeric, as the SDKs require. Default: none, the Pusher endpoint is off.
    #[arg(
        long,
        env = "ROOMCAST_PUSHER_APP",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(serialize_with = "redacted_list")]
    pub pusher_app: Vec<String>,

    /// Pusher apps with options, in the config file only: `[[pusher-apps]]` tables of `id`,
    /// `key`, `secret`, and optionally `client-events` (default true: subscribers of private
    /// and presence channels may send `client-*` events) and `max-connections` (this node's
    /// most connections of the app; default: no cap but `--max-connections`). They add to the
    /// `--pusher-app` ones.
    #[arg(skip)]
    pub pusher_apps: Vec<PusherAppConfig>,

    /// How long a client may take to send its HTTP upgrade request (and finish the TLS
    /// handshake).
    #[arg(long, env = "ROOMCAST_HANDSHAKE_TIMEOUT", default_value = defaults::HANDSHAKE_TIMEOUT, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub handshake_timeout: Duration,

    /// TCP_DEFER_ACCEPT (Linux): the kernel hands a connection over only once its first bytes
    /// (the request, a PROXY header, a TLS hello) have arrived, up to this long, so a
    /// connection costs the server one wake-up and no failed read to set up, and one that
    /// never speaks stays a small kernel entry instead of an accepted socket. After it the
    /// kernel hands a silent connection over anyway, and --handshake-timeout applies. `0s`:
    /// accept at once. Ignored on other systems.
    #[arg(long, env = "ROOMCAST_DEFER_ACCEPT", default_value = defaults::DEFER_ACCEPT, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub defer_accept: Duration,

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

    /// Where to POST webhooks: batches of `{"events":[...]}` about connections and rooms on
    /// this node (see the README's "Webhooks"), signed with `--webhook-secret`. Default: none,
    /// and nothing is sent, queued or spawned; a session then pays one `Option` check per
    /// connect, join and leave. With it, each such event costs a clock read, an allocation for
    /// a room name and a non-blocking queue push.
    #[arg(long, env = "ROOMCAST_WEBHOOK_URL", hide_env_values = true)]
    pub webhook_url: Option<String>,

    /// Key of the HMAC-SHA256 in each webhook's `X-Roomcast-Signature` header (lowercase hex,
    /// over the exact body). Required with `--webhook-url`. Default: none.
    #[arg(long, env = "ROOMCAST_WEBHOOK_SECRET", hide_env_values = true)]
    #[serde(serialize_with = "redacted")]
    pub webhook_secret: Option<String>,

    /// Webhook events that may wait for delivery; when full (the app is slow or down), new
    /// events are dropped and counted, so clients are never slowed. Each waiting event holds
    /// about 100 bytes.
    #[arg(long, env = "ROOMCAST_WEBHOOK_QUEUE", default_value_t = defaults::WEBHOOK_QUEUE)]
    pub webhook_queue: usize,

    /// Most events in one webhook POST. Batches are sent as soon as the previous one is done,
    /// with whatever is queued (after a 10 ms linger), so this caps a batch rather than waits
    /// for one: larger means fewer requests to a slow app, and larger bodies.
    #[arg(long, env = "ROOMCAST_WEBHOOK_BATCH", default_value_t = defaults::WEBHOOK_BATCH)]
    pub webhook_batch: usize,

    /// How long one webhook POST may take, connect to the end of the answer; longer counts as
    /// a failed attempt and is retried. While a batch waits, the next ones queue behind it.
    #[arg(long, env = "ROOMCAST_WEBHOOK_TIMEOUT", default_value = defaults::WEBHOOK_TIMEOUT, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub webhook_timeout: Duration,

    /// Times a webhook batch is sent again after a failed attempt (non-2xx, timeout,
    /// connection error) before it is dropped and counted; 0 never retries. Default: 7, so 8
    /// attempts over about a minute.
    #[arg(long, env = "ROOMCAST_WEBHOOK_RETRIES", default_value_t = defaults::WEBHOOK_RETRIES)]
    pub webhook_retries: u32,

    /// Wait before the first retry of a webhook batch; it doubles for each retry after, up to
    /// 30s. At most 30s.
    #[arg(long, env = "ROOMCAST_WEBHOOK_RETRY_BACKOFF", default_value = defaults::WEBHOOK_RETRY_BACKOFF, value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_duration")]
    pub webhook_retry_backoff: Duration,
}

/// The largest size limit accepted: a message must fit in memory, and frame arithmetic stays
/// far from overflow.
const MAX_SIZE_LIMIT: usize = 1 << 30;

/// The smallest `--socket-send-buffer` accepted (but 0): below a page, every write is a few
/// segments and throughput collapses.
const MIN_SOCKET_SEND_BUFFER: usize = 4096;

/// The largest `--webhook-queue` accepted: ten million waiting events are about a gigabyte, and
/// far past it the queue's own bound (a fraction of `usize::MAX`) would panic at start-up.
const MAX_WEBHOOK_QUEUE: usize = 10_000_000;

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).expect("defaults parse")
}

impl Config {
    /// Which broker the node runs: Redis with `--redis`, else the memory broker. A backplane's
    /// option (its URL) selects its broker here, the one place that decides.
    pub fn broker(&self) -> BrokerKind {
        match (&self.redis, self.redis_cluster.is_empty()) {
            (Some(_), _) => BrokerKind::Redis,
            (None, false) => BrokerKind::RedisCluster,
            (None, true) => BrokerKind::Memory,
        }
    }

    /// The history each room keeps, when on (`--history-size` and `--history-ttl`).
    pub fn history(&self) -> Option<crate::history::HistoryConfig> {
        (self.history_size > 0 && !self.history_ttl.is_zero()).then_some(
            crate::history::HistoryConfig {
                size: self.history_size,
                ttl: self.history_ttl,
                max_recovery: self.history_recovery_max,
            },
        )
    }

    /// The history each room keeps, with the `[[history-rooms]]` exceptions, when on.
    pub fn history_policy(&self) -> Option<crate::history::HistoryPolicy> {
        Some(crate::history::HistoryPolicy {
            base: self.history()?,
            rooms: self.history_rooms.clone(),
        })
    }

    /// The defaults, listening on `listen`: what tests and embedders start from.
    pub fn with_listen(listen: SocketAddr) -> Self {
        Self {
            config: None,
            log_format: LogFormat::Text,
            log_connections: false,
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
            compression: false,
            compression_min_size: defaults::COMPRESSION_MIN_SIZE,
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
            redis: None,
            redis_cluster: Vec::new(),
            redis_prefix: defaults::REDIS_PREFIX.to_owned(),
            connect_proxy: None,
            join_proxy: None,
            publish_proxy: None,
            proxy_timeout: duration(defaults::PROXY_TIMEOUT),
            history_size: defaults::HISTORY_SIZE,
            history_ttl: duration(defaults::HISTORY_TTL),
            history_recovery_max: defaults::HISTORY_RECOVERY_MAX,
            history_rooms: Vec::new(),
            tls_cert: None,
            tls_key: None,
            echo_path: None,
            relay_path: None,
            pusher_app: Vec::new(),
            pusher_apps: Vec::new(),
            handshake_timeout: duration(defaults::HANDSHAKE_TIMEOUT),
            defer_accept: duration(defaults::DEFER_ACCEPT),
            drain_timeout: duration(defaults::DRAIN_TIMEOUT),
            ping_interval: duration(defaults::PING_INTERVAL),
            shutdown_delay: duration(defaults::SHUTDOWN_DELAY),
            idle_timeout: duration(defaults::IDLE_TIMEOUT),
            webhook_url: None,
            webhook_secret: None,
            webhook_queue: defaults::WEBHOOK_QUEUE,
            webhook_batch: defaults::WEBHOOK_BATCH,
            webhook_timeout: duration(defaults::WEBHOOK_TIMEOUT),
            webhook_retries: defaults::WEBHOOK_RETRIES,
            webhook_retry_backoff: duration(defaults::WEBHOOK_RETRY_BACKOFF),
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
        let paths = [&self.echo_path, &self.relay_path];
        let checks = [
            (
                paths
                    .iter()
                    .any(|path| path.as_ref().is_some_and(|p| !p.starts_with('/'))),
                "--echo-path and --relay-path must start with /",
            ),
            (
                self.relay_path.is_some() && self.relay_path == self.echo_path,
                "--relay-path and --echo-path must differ",
            ),
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
            (
                self.webhook_url.is_some() && self.webhook_secret.is_none(),
                "--webhook-url needs --webhook-secret: the app must be able to tell our calls \
                 from anyone's",
            ),
            (
                self.webhook_url.is_none() && self.webhook_secret.is_some(),
                "--webhook-secret is set without --webhook-url: no webhooks would be sent",
            ),
            (
                self.webhook_secret.as_deref() == Some(""),
                "--webhook-secret must not be empty",
            ),
            (
                !(1..=MAX_WEBHOOK_QUEUE).contains(&self.webhook_queue),
                "--webhook-queue must be between 1 and 10000000 events",
            ),
            (
                !(1..=10_000).contains(&self.webhook_batch),
                "--webhook-batch must be between 1 and 10000 events",
            ),
            (
                self.webhook_timeout < Duration::from_millis(10),
                "--webhook-timeout must be at least 10ms",
            ),
            (
                self.webhook_retry_backoff.is_zero()
                    || self.webhook_retry_backoff > Duration::from_secs(30),
                "--webhook-retry-backoff must be more than 0s and at most 30s",
            ),
        ];
        if let Some((_, message)) = checks.iter().find(|(failed, _)| *failed) {
            return Err(ConfigError::Invalid(message));
        }
        if let Some(url) = &self.redis {
            crate::broker::check_redis_url(url).map_err(ConfigError::Redis)?;
        }
        crate::pusher::Apps::parse(&self.pusher_app, &self.pusher_apps)?;
        for app in &self.pusher_apps {
            if let Some(url) = &app.webhook_url {
                crate::api::app_client::AppClient::parse_url(url).map_err(|_| {
                    ConfigError::Invalid("a [[pusher-apps]] webhook-url is not an http(s) URL")
                })?;
            }
        }
        if self.redis.is_some() && !self.redis_cluster.is_empty() {
            return Err(ConfigError::Invalid(
                "--redis and --redis-cluster exclude each other",
            ));
        }
        for url in &self.redis_cluster {
            crate::broker::check_redis_url(url).map_err(ConfigError::Redis)?;
        }
        if self.redis_prefix.is_empty() {
            return Err(ConfigError::Invalid("--redis-prefix must not be empty"));
        }
        if self.redis_prefix.contains(['{', '}']) {
            // Braces would change the hash tags that keep a room's keys on one cluster slot.
            return Err(ConfigError::Invalid(
                "--redis-prefix must not contain { or }",
            ));
        }
        if (self.history_size > 0) == self.history_ttl.is_zero() {
            return Err(ConfigError::Invalid(
                "--history-size and --history-ttl turn history on together: set both above zero",
            ));
        }
        if !self.history_rooms.is_empty() && self.history().is_none() {
            return Err(ConfigError::Invalid(
                "history-rooms needs --history-size and --history-ttl",
            ));
        }
        if self
            .history_rooms
            .iter()
            .any(|rule| rule.pattern.is_empty() || (rule.size > 0 && rule.ttl.is_zero()))
        {
            return Err(ConfigError::Invalid(
                "each history-rooms table needs a pattern, and a ttl above 0s when its size is",
            ));
        }
        if self.history().is_some() && self.history_recovery_max == 0 {
            return Err(ConfigError::Invalid(
                "--history-recovery-max must be at least 1",
            ));
        }
        if self.proxy_timeout.is_zero() {
            return Err(ConfigError::Invalid("--proxy-timeout must be more than 0s"));
        }
        let urls = [
            ("--connect-proxy", &self.connect_proxy),
            ("--join-proxy", &self.join_proxy),
            ("--publish-proxy", &self.publish_proxy),
        ];
        for (flag, url) in urls {
            if let Some(url) = url {
                crate::api::app_client::AppClient::parse_url(url)
                    .map_err(|error| ConfigError::Url { flag, error })?;
            }
        }
        Ok(())
    }
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(&'static str),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    /// A `--pusher-app` that is not `ID:KEY:SECRET` with a numeric id.
    #[error("invalid configuration: {0}")]
    Pusher(#[from] crate::pusher::BadApp),
    /// A `--redis` URL that cannot be opened.
    #[error("invalid configuration: --redis {0}")]
    Redis(crate::broker::BadRedisUrl),
    /// A URL of the application that cannot be called.
    #[error("invalid configuration: {flag} {error}")]
    Url {
        flag: &'static str,
        error: crate::api::app_client::BadUrl,
    },
    #[error("{path}: unknown key `{key}` (keys are the long flag names, e.g. `max-connections`)")]
    UnknownKey { path: String, key: String },
    /// A key of the file whose value has the wrong type or does not parse.
    #[error("{path}: `{key}`: {reason}")]
    Value {
        path: String,
        key: String,
        reason: String,
    },
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

/// One `[[history-rooms]]` table of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryRoom {
    /// A room name, or a prefix with a trailing `*`.
    pub pattern: String,
    /// Messages kept per matching room; 0: none.
    pub size: usize,
    #[serde(serialize_with = "humantime_duration")]
    pub ttl: Duration,
}

impl HistoryRoom {
    pub fn matches(&self, room: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => room == self.pattern,
        }
    }
}

/// One `[[pusher-apps]]` table of the config file (see [`Config::pusher_apps`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PusherAppConfig {
    pub id: String,
    pub key: String,
    #[serde(serialize_with = "redacted_string")]
    pub secret: String,
    #[serde(default = "yes")]
    pub client_events: bool,
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Where the app's webhooks go, in Pusher's format (once per cluster with Redis).
    #[serde(default, serialize_with = "redacted_option")]
    pub webhook_url: Option<String>,
}

fn redacted_option<S: Serializer>(
    value: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => serializer.serialize_str("<redacted>"),
        None => serializer.serialize_none(),
    }
}

fn yes() -> bool {
    true
}

fn redacted_string<S: Serializer>(_value: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("<redacted>")
}

/// A `[[history-rooms]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryRoomFile {
    pattern: String,
    size: usize,
    ttl: String,
}

/// URLs that may carry a password: how many, not what.
fn redacted_list<S: Serializer>(value: &[String], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(value.iter().map(|_| "<redacted>"))
}

impl Config {
    /// The effective configuration as TOML (secrets redacted), for `roomcast check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// A parser for `Config` alone: the server's options without subcommands.
#[derive(clap::Parser)]
// A flag given twice: the last one wins.
#[command(name = "roomcast", args_override_self = true)]
struct ConfigOnly {
    #[command(flatten)]
    config: Config,
}

/// Parses the server's options (`args[0]` is the program name) with the `--config` file
/// applied under them, and validates the result.
pub fn load(args: Vec<OsString>) -> Result<Config, LoadError> {
    let matches = ConfigOnly::command().try_get_matches_from(args)?;
    let config = with_file(Config::from_arg_matches(&matches)?, &matches)?;
    config.validate()?;
    Ok(config)
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A flag or environment variable the parser refused (the message names it).
    #[error("{0}")]
    Parse(#[from] clap::Error),
}

/// `config`, parsed from flags and environment variables into `matches` (by any command that
/// flattens [`Config`]), with the `--config` file (`ROOMCAST_CONFIG`) under them: each option
/// that `matches` has from its default, or not at all, takes the file's value if the file has
/// one. Not validated. Without a file, `config` as it is.
pub fn with_file(mut config: Config, matches: &ArgMatches) -> Result<Config, ConfigError> {
    let Some(path) = config.config.clone() else {
        return Ok(config);
    };
    let shown = path.display().to_string();
    let mut file = FileLayer::read(&path, &shown)?;
    if let Some(apps) = file.pusher_apps.take() {
        config.pusher_apps = apps;
    }
    if let Some(rooms) = file.history_rooms.take() {
        config.history_rooms = rooms
            .into_iter()
            .map(|room| {
                let ttl = humantime::parse_duration(&room.ttl).map_err(|e| ConfigError::Value {
                    path: shown.clone(),
                    key: "history-rooms".into(),
                    reason: format!("ttl {:?}: {e}", room.ttl),
                })?;
                Ok(HistoryRoom {
                    pattern: room.pattern,
                    size: room.size,
                    ttl,
                })
            })
            .collect::<Result<_, ConfigError>>()?;
    }
    // The options, with no environment variables and no defaults: parsing one file value
    // yields that option alone.
    let mut command = Config::augment_args(clap::Command::new("roomcast"))
        .mut_args(|arg| arg.env(None).default_value(None));
    for (id, texts) in file.flag_values() {
        let Some(texts) = texts else { continue };
        let above = !matches!(
            matches.value_source(id),
            None | Some(ValueSource::DefaultValue)
        );
        if above {
            continue;
        }
        let long = command
            .get_arguments()
            .find(|arg| arg.get_id() == id)
            .and_then(|arg| arg.get_long())
            .expect("each flag key of the file is a long flag")
            .to_owned();
        let error = |reason: String| ConfigError::Value {
            path: shown.clone(),
            key: long.clone(),
            reason,
        };
        let argv = std::iter::once(OsString::from("roomcast"))
            .chain(texts.iter().map(|text| format!("--{long}={text}").into()));
        let parsed = command
            .try_get_matches_from_mut(argv)
            .map_err(|e| error(clap_reason(&e)))?;
        config
            .update_from_arg_matches(&parsed)
            .map_err(|e| error(clap_reason(&e)))?;
    }
    Ok(config)
}

/// A clap error's text without its `error: ` prefix and its `--help` tip: `invalid value 'many'
/// for '--workers <WORKERS>': invalid digit found in string` (and the possible values, if any).
fn clap_reason(error: &clap::Error) -> String {
    let text = error.to_string();
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    let text = text
        .split("\n\nFor more information")
        .next()
        .unwrap_or(text);
    text.trim_end().to_owned()
}

/// The `--config` file as written. Each key of a flag is optional and has no default here
/// (defaults are clap's, from the `defaults` module); an unknown key is refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileLayer {
    log_format: Option<Scalar>,
    log_connections: Option<Scalar>,
    listen: Option<Scalar>,
    workers: Option<Scalar>,
    outbound_queue: Option<Scalar>,
    outbound_queue_bytes: Option<Scalar>,
    socket_send_buffer: Option<Scalar>,
    slow_consumer: Option<Scalar>,
    max_message_size: Option<Scalar>,
    max_frame_size: Option<Scalar>,
    rate_limit: Option<Scalar>,
    rate_burst: Option<Scalar>,
    rate_limit_bytes: Option<Scalar>,
    rate_burst_bytes: Option<Scalar>,
    client_broadcast: Option<Scalar>,
    compression: Option<Scalar>,
    compression_min_size: Option<Scalar>,
    max_rooms_per_connection: Option<Scalar>,
    max_room_name_length: Option<Scalar>,
    max_metadata_size: Option<Scalar>,
    jwt_secret: Option<Scalar>,
    jwt_public_key: Option<Scalar>,
    jwt_audience: Option<Scalar>,
    jwt_issuer: Option<Scalar>,
    jwt_leeway: Option<Scalar>,
    token_cookie: Option<Scalar>,
    allowed_origins: Option<List>,
    max_connections: Option<Scalar>,
    max_connections_per_ip: Option<Scalar>,
    max_pending_handshakes: Option<Scalar>,
    max_request_head_size: Option<Scalar>,
    trusted_proxies: Option<List>,
    api_key: Option<Scalar>,
    redis: Option<Scalar>,
    redis_cluster: Option<List>,
    redis_prefix: Option<Scalar>,
    connect_proxy: Option<Scalar>,
    join_proxy: Option<Scalar>,
    publish_proxy: Option<Scalar>,
    proxy_timeout: Option<Scalar>,
    history_size: Option<Scalar>,
    history_ttl: Option<Scalar>,
    history_recovery_max: Option<Scalar>,
    /// The one table key: read apart from the flags (see [`with_file`]).
    history_rooms: Option<Vec<HistoryRoomFile>>,
    tls_cert: Option<Scalar>,
    tls_key: Option<Scalar>,
    echo_path: Option<Scalar>,
    relay_path: Option<Scalar>,
    pusher_app: Option<List>,
    /// A table key: read apart from the flags (see [`with_file`]).
    pusher_apps: Option<Vec<PusherAppConfig>>,
    handshake_timeout: Option<Scalar>,
    defer_accept: Option<Scalar>,
    ping_interval: Option<Scalar>,
    idle_timeout: Option<Scalar>,
    shutdown_delay: Option<Scalar>,
    drain_timeout: Option<Scalar>,
    webhook_url: Option<Scalar>,
    webhook_secret: Option<Scalar>,
    webhook_queue: Option<Scalar>,
    webhook_batch: Option<Scalar>,
    webhook_timeout: Option<Scalar>,
    webhook_retries: Option<Scalar>,
    webhook_retry_backoff: Option<Scalar>,
    // Tables and lists that have no flag go below, typed with serde and read by whatever
    // they configure, not through clap: e.g. `#[serde(default)] proxy: Vec<ProxyFile>` for
    // `[[proxy]]`, or `pusher: Option<PusherFile>` for `[pusher]` and `[pusher.apps]`.
}

impl FileLayer {
    fn read(path: &Path, shown: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: shown.to_owned(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|error| locate(error, &text, shown))
    }

    /// Each flag key's value as the texts a flag would carry, by clap id (the field's name).
    fn flag_values(self) -> Vec<(&'static str, Option<Vec<String>>)> {
        macro_rules! by_id {
            ($($field:ident),* $(,)?) => {
                vec![$((stringify!($field), self.$field.map(|value| value.texts()))),*]
            };
        }
        by_id![
            log_format,
            log_connections,
            listen,
            workers,
            outbound_queue,
            outbound_queue_bytes,
            socket_send_buffer,
            slow_consumer,
            max_message_size,
            max_frame_size,
            rate_limit,
            rate_burst,
            rate_limit_bytes,
            rate_burst_bytes,
            client_broadcast,
            compression,
            compression_min_size,
            max_rooms_per_connection,
            max_room_name_length,
            max_metadata_size,
            jwt_secret,
            jwt_public_key,
            jwt_audience,
            jwt_issuer,
            jwt_leeway,
            token_cookie,
            allowed_origins,
            max_connections,
            max_connections_per_ip,
            max_pending_handshakes,
            max_request_head_size,
            trusted_proxies,
            api_key,
            redis,
            redis_cluster,
            redis_prefix,
            connect_proxy,
            join_proxy,
            publish_proxy,
            proxy_timeout,
            history_size,
            history_ttl,
            history_recovery_max,
            tls_cert,
            tls_key,
            echo_path,
            relay_path,
            pusher_app,
            handshake_timeout,
            defer_accept,
            ping_interval,
            idle_timeout,
            shutdown_delay,
            drain_timeout,
            webhook_url,
            webhook_secret,
            webhook_queue,
            webhook_batch,
            webhook_timeout,
            webhook_retries,
            webhook_retry_backoff,
        ]
    }
}

/// The error for a file serde refused, naming the key when there is one: serde says what is
/// wrong and where (a byte range), and the file read again with spans says whose key or value
/// that is.
fn locate(error: toml::de::Error, text: &str, path: &str) -> ConfigError {
    type Spans = BTreeMap<Spanned<String>, Spanned<toml::Value>>;
    let path = path.to_owned();
    let (Some(at), Ok(spans)) = (error.span(), toml::from_str::<Spans>(text)) else {
        return ConfigError::File {
            path,
            reason: error.to_string(),
        };
    };
    for (key, value) in spans {
        if key.span().contains(&at.start) {
            return ConfigError::UnknownKey {
                path,
                key: key.into_inner(),
            };
        }
        if value.span().contains(&at.start) {
            return ConfigError::Value {
                path,
                key: key.into_inner(),
                reason: error.message().to_owned(),
            };
        }
    }
    ConfigError::File {
        path,
        reason: error.to_string(),
    }
}

/// A scalar option's value in the file: a string as written, a number or a boolean as TOML
/// prints it, which is the text of the flag (`workers = 4` is `--workers=4`).
#[derive(Debug)]
struct Scalar(String);

impl Scalar {
    fn texts(self) -> Vec<String> {
        vec![self.0]
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
        }
        deserializer.deserialize_any(Text)
    }
}

/// A list option's value in the file: an array of strings, or one string as the flag takes
/// it (`"https://a,https://b"`, split at commas).
#[derive(Debug)]
struct List(Vec<String>);

impl List {
    /// One flag value, the items joined by the flag's delimiter: what clap splits again, so
    /// `[]` is `--allowed-origins=` as before, not the option left out.
    fn texts(self) -> Vec<String> {
        vec![self.0.join(",")]
    }
}

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Texts;
        impl<'de> Visitor<'de> for Texts {
            type Value = List;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of strings, or one comma-separated string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<List, E> {
                Ok(List(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<List, A::Error> {
                let mut list = Vec::new();
                while let Some(item) = items.next_element::<String>()? {
                    list.push(item);
                }
                Ok(List(list))
            }
        }
        deserializer.deserialize_any(Texts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids of the options that the file may set: every argument but `--config` itself.
    fn flag_ids() -> Vec<String> {
        let mut ids: Vec<String> = ConfigOnly::command()
            .get_arguments()
            .map(|arg| arg.get_id().to_string())
            .filter(|id| id != "config")
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn the_file_has_a_key_for_every_flag_and_each_key_sets_its_flag() {
        let mut ids: Vec<String> = FileLayer::default()
            .flag_values()
            .into_iter()
            .map(|(id, _)| id.to_owned())
            .collect();
        ids.sort();
        assert_eq!(ids, flag_ids());
        let command = ConfigOnly::command();
        for arg in command
            .get_arguments()
            .filter(|arg| arg.get_id() != "config")
        {
            let long = arg.get_long().unwrap();
            let layer: FileLayer = toml::from_str(&format!("{long} = \"x\"")).unwrap();
            let set: Vec<_> = layer
                .flag_values()
                .into_iter()
                .filter_map(|(id, value)| value.map(|_| id))
                .collect();
            assert_eq!(set, [arg.get_id().as_str()], "{long}");
        }
    }
}
