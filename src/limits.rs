//! Per-connection limits on what a client may do: message rate, inbound bytes, rooms, room
//! names, metadata, client broadcasts.
//!
//! Each limit answers with an `error` reply (the connection stays) except a sustained flood,
//! which closes the connection with 1008. The values come from [`crate::Config`] and are
//! shared by every session of a server.
//!
//! Why a byte budget beside the message rate: a fan-out copies what one client sends into
//! every recipient's outbound queue. 200 messages (the default burst) of 64 KiB (the default
//! size limit) are 12.8 MiB landing at once in queues bounded at 1 MiB, so one sender inside
//! the message rate could get every prompt reader closed as a slow consumer. The byte bucket
//! holds at most half a queue by default, so one sender's whole burst fits in every
//! recipient's queue with room to spare, and the sender, not its readers, is refused.

use std::time::Instant;

use crate::config::Config;

/// Error texts for refusals that the seed protocol does not have. Clients match on these.
pub mod errors {
    pub const RATE_LIMITED: &str = "Rate limit exceeded";
    pub const TOO_MANY_ROOMS: &str = "Too many rooms";
    pub const ROOM_NAME_TOO_LONG: &str = "Room name too long";
    pub const METADATA_TOO_LARGE: &str = "Metadata too large";
    pub const BROADCAST_DISABLED: &str = "Broadcast is disabled";
}

/// The limits a session enforces, read once from the configuration.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Messages per second and bucket size; `None` when unlimited.
    pub rate: Option<(f64, u32)>,
    /// Inbound bytes per second and bucket size; `None` when unlimited.
    pub bytes: Option<(f64, u32)>,
    /// Whether clients may send `broadcast` (to every connected client).
    pub client_broadcast: bool,
    pub max_rooms: usize,
    pub max_room_name_length: usize,
    pub max_metadata_size: usize,
}

impl SessionLimits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            rate: (config.rate_limit > 0.0).then_some((config.rate_limit, config.rate_burst)),
            bytes: (config.rate_limit > 0.0 && config.rate_limit_bytes() > 0).then(|| {
                (
                    config.rate_limit_bytes() as f64,
                    config.rate_burst_bytes() as u32,
                )
            }),
            client_broadcast: config.client_broadcast,
            max_rooms: config.max_rooms_per_connection,
            max_room_name_length: config.max_room_name_length,
            max_metadata_size: config.max_metadata_size,
        }
    }
}

/// What the rate limiter says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Allowed,
    /// Over the limit: answer with an error and drop the message.
    Refused,
    /// Over the limit for a whole burst's worth of messages: close the connection (1008).
    Flooding,
}

/// A connection's inbound budget: two token buckets, messages per second and (optionally)
/// bytes per second, refilled together. A message must fit in both, and takes from both or
/// from neither, so a refused message costs the client nothing but the refusal. Refusals in a
/// row are counted against the message burst: a client that keeps sending while over either
/// budget is a flood.
///
/// Kept to 32 bytes (one `Instant`, message tokens as `f32`, exact up to 16M messages of
/// burst) because every connection's session holds one; byte tokens are `f64`, exact to a
/// byte for any burst.
#[derive(Debug)]
pub struct RateLimiter {
    last: Instant,
    bytes: f64,
    messages: f32,
    /// Messages refused since the last one allowed.
    refused: u32,
}

impl RateLimiter {
    /// `None` when the limits set no message rate (then nothing is limited).
    pub fn new(limits: &SessionLimits, now: Instant) -> Option<Self> {
        let (_, burst) = limits.rate?;
        Some(Self {
            last: now,
            messages: burst as f32,
            bytes: limits
                .bytes
                .map_or(0.0, |(_, burst_bytes)| f64::from(burst_bytes)),
            refused: 0,
        })
    }

    /// Takes one message of `len` bytes.
    pub fn take(&mut self, len: usize, limits: &SessionLimits, now: Instant) -> Rate {
        let Some((per_second, burst)) = limits.rate else {
            return Rate::Allowed;
        };
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.messages =
            (f64::from(self.messages) + elapsed * per_second).min(f64::from(burst)) as f32;
        let fits_bytes = match limits.bytes {
            None => true,
            Some((bytes_per_second, burst_bytes)) => {
                self.bytes = (self.bytes + elapsed * bytes_per_second).min(f64::from(burst_bytes));
                self.bytes >= len as f64
            }
        };
        if fits_bytes && self.messages >= 1.0 {
            self.messages -= 1.0;
            if limits.bytes.is_some() {
                self.bytes -= len as f64;
            }
            self.refused = 0;
            return Rate::Allowed;
        }
        self.refused += 1;
        if self.refused >= burst {
            Rate::Flooding
        } else {
            Rate::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_is_allowed_then_refused_then_refilled() {
        let start = Instant::now();
        let limits = limits((10.0, 3), None);
        let mut bucket = RateLimiter::new(&limits, start).unwrap();
        for _ in 0..3 {
            assert_eq!(bucket.take(1, &limits, start), Rate::Allowed);
        }
        assert_eq!(bucket.take(1, &limits, start), Rate::Refused);
        // 10 per second: one token back after 100 ms.
        let later = start + Duration::from_millis(100);
        assert_eq!(bucket.take(1, &limits, later), Rate::Allowed);
        assert_eq!(bucket.take(1, &limits, later), Rate::Refused);
    }

    #[test]
    fn refusing_a_whole_burst_in_a_row_is_a_flood() {
        let start = Instant::now();
        let limits = limits((1.0, 2), None);
        let mut bucket = RateLimiter::new(&limits, start).unwrap();
        bucket.take(1, &limits, start);
        bucket.take(1, &limits, start);
        assert_eq!(bucket.take(1, &limits, start), Rate::Refused);
        assert_eq!(bucket.take(1, &limits, start), Rate::Flooding);
    }

    #[test]
    fn the_limiter_stays_small() {
        // Every connection's session holds one (see the size guard in ws::session).
        assert!(std::mem::size_of::<Option<RateLimiter>>() <= 32);
    }

    fn limits(rate: (f64, u32), bytes: Option<(f64, u32)>) -> SessionLimits {
        SessionLimits {
            rate: Some(rate),
            bytes,
            client_broadcast: true,
            max_rooms: 1,
            max_room_name_length: 1,
            max_metadata_size: 1,
        }
    }

    #[test]
    fn the_byte_budget_refuses_large_messages_before_the_message_count_runs_out() {
        let start = Instant::now();
        let limits = limits((100.0, 200), Some((1000.0, 3000)));
        let mut limiter = RateLimiter::new(&limits, start).unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.take(1000, &limits, start), Rate::Allowed);
        }
        assert_eq!(limiter.take(1000, &limits, start), Rate::Refused);
        // Small messages still fit nowhere: the bytes are spent.
        assert_eq!(limiter.take(1, &limits, start), Rate::Refused);
        // A second refills 1,000 bytes.
        let later = start + Duration::from_secs(1);
        assert_eq!(limiter.take(1000, &limits, later), Rate::Allowed);
    }

    #[test]
    fn a_message_refused_for_its_bytes_takes_no_message_token() {
        let start = Instant::now();
        let limits = limits((1.0, 2), Some((1.0, 10)));
        let mut limiter = RateLimiter::new(&limits, start).unwrap();
        assert_eq!(limiter.take(100, &limits, start), Rate::Refused);
        // Both message tokens are still there.
        assert_eq!(limiter.take(5, &limits, start), Rate::Allowed);
        assert_eq!(limiter.take(5, &limits, start), Rate::Allowed);
    }

    #[test]
    fn refusals_for_bytes_in_a_row_are_a_flood() {
        let start = Instant::now();
        let limits = limits((100.0, 3), Some((1.0, 10)));
        let mut limiter = RateLimiter::new(&limits, start).unwrap();
        assert_eq!(limiter.take(10, &limits, start), Rate::Allowed);
        assert_eq!(limiter.take(10, &limits, start), Rate::Refused);
        assert_eq!(limiter.take(10, &limits, start), Rate::Refused);
        assert_eq!(limiter.take(10, &limits, start), Rate::Flooding);
    }

    #[test]
    fn tokens_never_exceed_the_burst() {
        let start = Instant::now();
        let limits = limits((100.0, 2), Some((1e9, 100)));
        let mut bucket = RateLimiter::new(&limits, start).unwrap();
        let much_later = start + Duration::from_secs(3600);
        let allowed = (0..10)
            .filter(|_| bucket.take(1, &limits, much_later) == Rate::Allowed)
            .count();
        assert_eq!(allowed, 2);
        // Bytes are capped at their burst too.
        let limits = limits_bytes_only();
        let mut bucket = RateLimiter::new(&limits, start).unwrap();
        assert_eq!(bucket.take(101, &limits, much_later), Rate::Refused);
    }

    fn limits_bytes_only() -> SessionLimits {
        limits((1e9, 1000), Some((1e9, 100)))
    }
}
