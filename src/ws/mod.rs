//! WebSocket connections: the per-connection tasks ([`session`]) and the protocol command
//! handlers they call ([`commands`]).

pub mod commands;
pub mod fragment;
pub mod session;
