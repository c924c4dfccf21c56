//! The process-wide monotonic clock that latency stamps are taken from.
//!
//! Publishers and subscribers live in the same process, so a nanosecond offset from one shared
//! [`Instant`] is comparable between any two tasks and threads, needs no clock synchronisation,
//! and never jumps with wall-clock adjustments.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The instant every [`now_ns`] value counts from: fixed by the first call of either function.
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`]. Fits in a `u64` for 584 years.
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The [`Instant`] of a [`now_ns`] value.
pub fn instant_of(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic_and_round_trips() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
        let at = instant_of(b);
        assert!(at >= epoch());
        assert_eq!((at - epoch()).as_nanos() as u64, b);
    }
}
