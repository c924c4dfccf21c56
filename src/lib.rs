//! roomcast: a real-time rooms, broadcast and private-message WebSocket server that speaks the
//! protocol of the Ratchet seed server (`shared/PROTOCOL.md`) exactly.
//!
//! # Layout
//! Data flows one way: socket -> [`server`] (accept, HTTP, upgrade) -> [`ws::session`] (read a
//! frame) -> [`protocol`] (decode) -> [`ws::commands`] (one handler per message type) ->
//! [`hub`] (rooms, directory, behind the [`hub::Router`] trait) -> the [`outbox`] of each
//! recipient -> that connection's writer, which sends queued frames in batched vectored writes.
//!
//! [`protocol`] and [`outbox`] sit at the bottom and import nothing of ours: the wire format,
//! and the bounded queue of pre-encoded frames. A fan-out encodes its frame once, as one
//! [`bytes::Bytes`] holding the JSON and the WebSocket header, and every recipient's outbox
//! gets a clone of it.
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
pub mod client;
pub mod config;
pub mod heartbeat;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod proxy_protocol;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod web;
pub mod ws;

pub use config::Config;
pub use server::Server;
