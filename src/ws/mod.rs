//! WebSocket connections: the per-connection task ([`session`]), the frame reader
//! ([`frame`], [`fragment`], and [`deflate`] for compressed messages), what a connection needs of its socket ([`transport`]), and the
//! protocols a connection speaks ([`protocol`], the seam, and its table of paths): the seed
//! protocol ([`commands`]), the echo ([`echo`]) and the relay ([`relay`]).

pub mod commands;
pub mod deflate;
pub mod echo;
pub mod fragment;
pub mod frame;
pub mod protocol;
pub mod relay;
pub mod session;
pub mod transport;
mod waiting;
