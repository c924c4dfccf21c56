//! The heartbeat: server pings, the idle timeout and token expiry, for every connection, from
//! one task.
//!
//! Why one task and not a timer per connection: a timer costs every open connection memory
//! and a wake-up of its own. Here a connection pays two atomics in its outbox (when it was last
//! heard from, when its token expires) and one relaxed store per socket read. Once a second
//! the heartbeat advances a coarse clock, closes connections whose token expired (4001), and
//! every `--ping-interval` it asks each connection to send a ping (a flag and a wake-up: the
//! connection's task writes a static frame, so pinging an idle connection allocates nothing)
//! and closes those not heard from within `--idle-timeout` (4000).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::hub::Router;
use crate::outbox::CloseRequest;
use crate::protocol::{self, close_code};

/// Seconds since the server started, advanced by the heartbeat once a second. Cheap to read on
/// every socket read, unlike the system clock.
#[derive(Debug, Default)]
pub struct CoarseClock {
    seconds: AtomicU32,
}

impl CoarseClock {
    #[inline]
    pub fn now(&self) -> u32 {
        self.seconds.load(Ordering::Relaxed)
    }

    fn advance_to(&self, seconds: u32) {
        self.seconds.store(seconds, Ordering::Relaxed);
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

/// Runs until `shutdown`. `clock` is the one connections read.
pub async fn run(
    settings: Heartbeat,
    clock: Arc<CoarseClock>,
    router: Arc<dyn Router>,
    shutdown: CancellationToken,
) {
    let ping_every = settings.ping_interval.as_secs() as u32;
    let idle_limit = settings.idle_timeout.as_secs() as u32;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = started.elapsed().as_secs() as u32;
        clock.advance_to(now);
        let ping_now = ping_every > 0 && now > 0 && now % ping_every == 0;
        let idle_check = idle_limit > 0 && ping_now;
        if !ping_now && !settings.check_expiry {
            continue;
        }
        let unix_now = protocol::timestamp();
        let (mut pinged, mut idle, mut expired) = (0usize, 0usize, 0usize);
        router.for_each_connection(&mut |member| {
            let outbox = &member.outbox;
            if settings.check_expiry && outbox.expires_at().is_some_and(|at| at <= unix_now) {
                if outbox.request_close(close(close_code::TOKEN_EXPIRED)) {
                    expired += 1;
                }
                return;
            }
            if idle_check && now.saturating_sub(outbox.last_seen()) >= idle_limit {
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
