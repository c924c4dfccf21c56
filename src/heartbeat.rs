//! The heartbeat: server pings, the idle timeout and token expiry, for every connection, from
//! one task.
//!
//! Why one task and not a timer per connection: a timer costs every open connection memory
//! and a wake-up of its own. Here a connection pays two atomics in its outbox (when it was last
//! heard from, when its token expires) and, per socket read, a monotonic clock read and one
//! relaxed store. Once a second the heartbeat closes connections whose token expired (4001), and
//! every `--ping-interval` it asks each connection to send a ping (a flag and a wake-up: the
//! connection's task writes a static frame, so pinging an idle connection allocates nothing)
//! and closes those not heard from within `--idle-timeout` (4000).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::hub::{Local, Router};
use crate::outbox::CloseRequest;
use crate::protocol::{self, close_code};

/// Milliseconds since the server started, read from the monotonic clock (`Instant`, a vDSO
/// read: measured ~29 ns here, once per socket read, against 1-2 us for the read itself).
///
/// Why not a counter the heartbeat advances: a value stored once a second is up to a second
/// old when a connection reads it, and later still when the heartbeat runs late, so silence was
/// over-counted and idle connections were closed up to a second early. Why not
/// `CLOCK_MONOTONIC_COARSE` (~6 ns): on a tickless kernel it can be many milliseconds stale
/// when a CPU wakes from idle to take a packet, which again dates a connection's last frame
/// too early (seen in CI: a close 0.5 ms before a 3 s timeout). The connection and the
/// heartbeat read the same clock at the moment they act. It wraps after 49 days; only
/// differences are taken (wrapping), and no timeout comes near that.
#[derive(Debug)]
pub struct CoarseClock {
    origin: std::time::Instant,
}

impl Default for CoarseClock {
    fn default() -> Self {
        Self {
            origin: std::time::Instant::now(),
        }
    }
}

impl CoarseClock {
    #[inline]
    pub fn now(&self) -> u32 {
        self.origin.elapsed().as_millis() as u32
    }

    /// Whether at least `limit` has certainly passed since `then` (a value of [`now`]): one
    /// millisecond is added for the truncation of both readings, so that rounding can only
    /// make it late, never early.
    ///
    /// [`now`]: Self::now
    pub fn has_passed(&self, then: u32, limit: Duration) -> bool {
        let elapsed = self.now().wrapping_sub(then);
        let limit = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
        elapsed >= limit.saturating_add(1)
    }
}

/// The heartbeat's settings.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// How often connections are pinged; zero sends no pings.
    pub ping_interval: Duration,
    /// How long a connection may stay silent (no frame at all, pongs included) before it is
    /// closed; zero never closes for silence.
    pub idle_timeout: Duration,
    /// Whether any connection may carry a token expiry.
    pub check_expiry: bool,
}

/// Seconds between sweeps of the rooms' histories for ones idle past their TTL.
const HISTORY_SWEEP_EVERY: u64 = 30;

/// Runs until `shutdown`. `clock` is the one connections touch their outbox with.
pub async fn run(
    settings: Heartbeat,
    clock: Arc<CoarseClock>,
    router: Arc<dyn Router>,
    shutdown: CancellationToken,
) {
    let ping_every = settings.ping_interval.as_secs();
    let idle_limit = settings.idle_timeout;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let seconds = started.elapsed().as_secs();
        if seconds % HISTORY_SWEEP_EVERY == 0 {
            router.expire_history();
        }
        let ping_now = ping_every > 0 && seconds > 0 && seconds % ping_every == 0;
        // Checked at each ping, so a silent connection is closed between `idle_limit` and
        // `idle_limit` plus one ping interval after its last frame, never before.
        let idle_check = !idle_limit.is_zero() && ping_now;
        if !ping_now && !settings.check_expiry {
            continue;
        }
        let unix_now = protocol::timestamp();
        let (mut pinged, mut idle, mut expired) = (0usize, 0usize, 0usize);
        router.for_each_connection(&mut |connection| {
            // Echo connections (conformance testing) answer what they get and nothing more.
            let outbox = match connection {
                Local::Client(member) => &member.outbox,
                Local::Outside {
                    outbox,
                    heartbeat: true,
                } => outbox,
                Local::Outside {
                    heartbeat: false, ..
                } => return,
            };
            if settings.check_expiry && outbox.expires_at().is_some_and(|at| at <= unix_now) {
                if outbox.request_close(close(close_code::TOKEN_EXPIRED)) {
                    expired += 1;
                }
                return;
            }
            if idle_check && clock.has_passed(outbox.last_seen(), idle_limit) {
                if outbox.request_close(close(close_code::IDLE_TIMEOUT)) {
                    idle += 1;
                }
                return;
            }
            if ping_now {
                outbox.request_ping();
                pinged += 1;
            }
        });
        if pinged + idle + expired > 0 {
            debug!(pinged, idle, expired, "heartbeat");
        }
    }
}

fn close(code: u16) -> CloseRequest {
    CloseRequest {
        code: Some(code),
        flush: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_counts_milliseconds_and_never_decides_early() {
        let clock = CoarseClock::default();
        let then = clock.now();
        assert!(!clock.has_passed(then, Duration::from_millis(50)));
        std::thread::sleep(Duration::from_millis(120));
        let elapsed = clock.now().wrapping_sub(then);
        assert!(
            (100..5_000).contains(&elapsed),
            "{elapsed} ms after sleeping 120 ms"
        );
        assert!(clock.has_passed(then, Duration::from_millis(50)));
        assert!(!clock.has_passed(then, Duration::from_secs(60)));
    }
}
