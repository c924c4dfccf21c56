//! WebSocket connections: the per-connection task ([`session`]), the frame reader
//! ([`frame`], [`fragment`]) and the protocol command handlers ([`commands`]).

pub mod commands;
pub mod fragment;
pub mod frame;
pub mod session;
