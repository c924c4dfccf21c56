//! roomcast: a real-time rooms, broadcast and private-message WebSocket server that speaks the
//! protocol of the Ratchet seed server (`shared/PROTOCOL.md`) exactly.
//!
//! # Layout
//! Data flows one way: socket -> [`server`] (accept and [`admission`], [`proxy_protocol`],
//! [`tls`], the request head and the upgrade in [`handshake`], any other HTTP request to
//! [`api`]: health, [`metrics`], stats, the [`web`] demo page) -> [`ws::session`] (one task per
//! connection) -> [`ws::frame`] (RFC 6455 frames) -> [`protocol`] (decode) -> [`ws::commands`]
//! (one handler per message type, under [`limits`]) -> [`hub`] (rooms, directory, behind the
//! [`hub::Router`] trait) -> the [`outbox`] of each recipient -> the recipient's task, which
//! sends queued frames in batched vectored writes. Sessions and endpoints see the running
//! server as a [`node::Node`] (config, router, admission, limits, metrics, clock), never the
//! server itself.
//!
//! Beside the flow: [`config`] (one `Config`: flags, environment, TOML file), [`telemetry`]
//! (logging), [`heartbeat`] (pings, idle timeout, token expiry for all connections), [`history`]
//! (the rooms' message history, for recovery),
//! [`shutdown`] (the stop signal), and [`client`] (the Rust client library and the command-line
//! clients).
//!
//! [`protocol`] and [`outbox`] sit at the bottom and import nothing of ours but [`counter`]
//! (a per-thread-sharded counter for hot paths): the wire format, and the bounded queue of
//! pre-encoded frames. A fan-out encodes its frame once, as one
//! [`bytes::Bytes`] holding the JSON and the WebSocket header, and every recipient's outbox
//! gets a reference to it.
//!
//! # Embedding
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let config = roomcast::Config::with_listen("127.0.0.1:0".parse().unwrap());
//! let server = roomcast::Server::bind(config, shutdown.clone())?;
//! println!("listening on {}", server.local_addr());
//! server.run().await; // returns after `shutdown.cancel()` and the drain
//! # Ok(()) }
//! ```

pub mod admission;
pub mod api;
pub mod broker;
pub mod client;
pub mod config;
pub mod counter;
pub mod handshake;
pub mod heartbeat;
pub mod history;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod poller;
pub mod protocol;
pub mod proxy_protocol;
pub mod pusher;
pub mod server;
pub mod shutdown;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod web;
pub mod ws;

pub use config::Config;
pub use server::Server;
