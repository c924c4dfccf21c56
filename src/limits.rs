//! Per-connection limits on what a client may do: message rate, rooms, room names, metadata.
//!
//! Each limit answers with an `error` reply (the connection stays) except a sustained flood,
//! which closes the connection with 1008. The values come from [`crate::Config`] and are
//! shared by every session of a server.

use std::time::Instant;

use crate::config::Config;

/// Error texts for refusals that the seed protocol does not have. Clients match on these.
pub mod errors {
    pub const RATE_LIMITED: &str = "Rate limit exceeded";
    pub const TOO_MANY_ROOMS: &str = "Too many rooms";
    pub const ROOM_NAME_TOO_LONG: &str = "Room name too long";
    pub const METADATA_TOO_LARGE: &str = "Metadata too large";
}

/// The limits a session enforces, read once from the configuration.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Messages per second and bucket size; `None` when unlimited.
    pub rate: Option<(f64, u32)>,
    pub max_rooms: usize,
    pub max_room_name_length: usize,
    pub max_metadata_size: usize,
}

impl SessionLimits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            rate: (config.rate_limit > 0.0).then_some((config.rate_limit, config.rate_burst)),
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

/// A token bucket: `burst` tokens, refilled at `per_second`; each message takes one.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    /// Messages refused since the last one allowed.
    refused: u32,
}

impl TokenBucket {
    pub fn new(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            last: now,
            refused: 0,
        }
    }

    pub fn take(&mut self, per_second: f64, burst: u32, now: Instant) -> Rate {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * per_second).min(f64::from(burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
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
        let mut bucket = TokenBucket::new(3, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(10.0, 3, start), Rate::Allowed);
        }
        assert_eq!(bucket.take(10.0, 3, start), Rate::Refused);
        // 10 per second: one token back after 100 ms.
        let later = start + Duration::from_millis(100);
        assert_eq!(bucket.take(10.0, 3, later), Rate::Allowed);
        assert_eq!(bucket.take(10.0, 3, later), Rate::Refused);
    }

    #[test]
    fn refusing_a_whole_burst_in_a_row_is_a_flood() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, start);
        bucket.take(1.0, 2, start);
        bucket.take(1.0, 2, start);
        assert_eq!(bucket.take(1.0, 2, start), Rate::Refused);
        assert_eq!(bucket.take(1.0, 2, start), Rate::Flooding);
    }

    #[test]
    fn tokens_never_exceed_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, start);
        let much_later = start + Duration::from_secs(3600);
        let allowed = (0..10)
            .filter(|_| bucket.take(100.0, 2, much_later) == Rate::Allowed)
            .count();
        assert_eq!(allowed, 2);
    }
}
