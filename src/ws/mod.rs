//! WebSocket connections: the per-connection task ([`session`]), the frame reader
//! ([`frame`], [`fragment`]), the protocol command handlers ([`commands`]) and what a connection
//! needs of its socket ([`transport`]).

pub mod commands;
pub mod fragment;
pub mod frame;
pub mod session;
pub mod transport;
mod waiting;
