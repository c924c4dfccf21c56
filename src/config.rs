//! The server's configuration: one struct, every option a flag with an environment twin.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::outbox::SlowConsumerPolicy;

/// Everything `roomcast serve` can be told. Each option is a flag and a `ROOMCAST_*` variable;
/// the flag wins.
#[derive(Args, Debug, Clone)]
pub struct Config {
    /// Address to listen on (WebSocket on any path, plus `GET /healthz`).
    #[arg(long, env = "ROOMCAST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Runtime worker threads, each with its own SO_REUSEPORT listener. Default: one per core.
    #[arg(long, env = "ROOMCAST_WORKERS", default_value_t = default_workers())]
    pub workers: usize,

    /// Frames that may wait in one connection's outbound queue before it counts as a slow
    /// consumer. Memory is only used while frames actually wait.
    #[arg(long, env = "ROOMCAST_OUTBOUND_QUEUE", default_value_t = 1024)]
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

    /// Largest message a client may send, in bytes; larger ones close the connection with 1009.
    #[arg(long, env = "ROOMCAST_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024)]
    pub max_message_size: usize,

    /// How long a client may take to send its HTTP upgrade request.
    #[arg(long, env = "ROOMCAST_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// How long closing may take: flushing queued frames and the close frame to a client, and
    /// on shutdown, all clients together.
    #[arg(long, env = "ROOMCAST_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Config {
    /// The defaults, listening on `listen`: what tests and embedders start from.
    pub fn with_listen(listen: SocketAddr) -> Self {
        Self {
            listen,
            workers: default_workers(),
            outbound_queue: 1024,
            slow_consumer: SlowConsumerPolicy::Close,
            max_message_size: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }

    /// Rejects values that cannot work, with a message naming the option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 {
            return Err(ConfigError::Invalid("--workers must be at least 1"));
        }
        if self.outbound_queue == 0 {
            return Err(ConfigError::Invalid("--outbound-queue must be at least 1"));
        }
        if self.max_message_size == 0 {
            return Err(ConfigError::Invalid(
                "--max-message-size must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(&'static str),
}
