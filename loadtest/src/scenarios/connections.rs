//! `connections`: open N idle connections at a ramp rate, hold them, and measure what they
//! cost the server (RSS per connection, CPU per accepted connection, CPU while idle) and how
//! fast and how reliably it accepts them (failures by cause).
//!
//! Held connections keep reading, so server pings are answered and any connection the server
//! drops during the hold is counted with its cause.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{drain, open_connections, Env, Outcome};
use crate::cli::ConnectionsArgs;
use crate::client::Conn;
use crate::report::{per, round2, ConnectionsResults, Results};
use crate::stats::{secs, ErrorTally};
use crate::sysinfo::{self, Meter};

#[derive(Default)]
struct Held {
    open: AtomicU64,
    dropped: AtomicU64,
}

pub async fn run(env: &mut Env, args: ConnectionsArgs) -> Outcome {
    let mut warnings = Vec::new();
    let server_nofile_limit = env
        .common
        .server_pid
        .first()
        .copied()
        .and_then(sysinfo::process_nofile_limit);
    if let Some(limit) = server_nofile_limit {
        if args.connections as u64 > limit {
            warnings.push(format!(
                "the server may open at most {limit} files (its RLIMIT_NOFILE) but {} \
                 connections were requested: expect refused or reset connections past that",
                args.connections
            ));
        }
    }
    let held = Arc::new(Held::default());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();

    // The ramp: measured on its own for CPU per connection and RSS growth.
    let ramp_meter = Meter::start(&env.common.server_pid);
    let handler = {
        let (held, stop, errors) = (held.clone(), stop.clone(), env.errors.clone());
        move |_index, conn| hold(conn, held.clone(), stop.clone(), errors.clone())
    };
    let ramp = open_connections(
        env,
        args.connections,
        args.ramp,
        args.concurrency,
        Some(Instant::now() + args.duration),
        &tracker,
        handler,
    )
    .await;
    let ramp_usage = ramp_meter.stop();

    // The hold: idle connections.
    let hold_meter = Meter::start(&env.common.server_pid);
    let hold_started = Instant::now();
    {
        let held = held.clone();
        env.progress
            .phase("hold", args.hold.as_secs().max(1), move || {
                (
                    hold_started.elapsed().as_secs(),
                    format!(
                        "open {}, dropped {}",
                        held.open.load(Ordering::Relaxed),
                        held.dropped.load(Ordering::Relaxed)
                    ),
                )
            });
    }
    // Nothing to hold when nothing connected.
    if ramp.summary.established > 0 {
        tokio::select! {
            _ = tokio::time::sleep(args.hold) => {}
            _ = env.interrupt.cancelled() => {}
        }
    }
    let hold_usage = hold_meter.stop();
    let open_at_end = held.open.load(Ordering::Relaxed);
    env.progress.finish();

    stop.cancel();
    if !drain(&tracker, env.common.timeout).await {
        warnings.push("some connections did not close within --timeout".to_owned());
    }

    let established = ramp.summary.established;
    let rss_before = ramp_usage.server_before.map(|s| s.rss_kib);
    let rss_after_ramp = ramp_usage.server_after.map(|s| s.rss_kib);
    let rss_per_connection = match (rss_before, rss_after_ramp) {
        (Some(before), Some(after)) if established > 0 => Some(round2(
            (after as f64 - before as f64) * 1024.0 / established as f64,
        )),
        _ => None,
    };
    if rss_per_connection.is_some_and(|b| b < 1024.0) {
        warnings.push(
            "the server's RSS hardly grew: it is reusing memory its allocator kept from earlier \
             connections; restart the server before measuring RSS per connection"
                .to_owned(),
        );
    }
    let ramp_cpu = ramp_usage.server_cpu();
    let results = ConnectionsResults {
        ramp_target_per_second: args.ramp,
        hold_seconds: secs(hold_started.elapsed().min(hold_usage.wall)),
        dropped_during_hold: held.dropped.load(Ordering::Relaxed),
        open_at_end,
        server_rss_before_kib: rss_before,
        server_rss_after_ramp_kib: rss_after_ramp,
        server_rss_end_kib: hold_usage.server_after.map(|s| s.rss_kib),
        server_rss_per_connection_bytes: rss_per_connection,
        server_cpu_ramp_seconds: ramp_cpu.map(secs),
        server_cpu_us_per_connection: ramp_cpu
            .filter(|_| established > 0)
            .map(|cpu| round2(cpu.as_secs_f64() * 1e6 / established as f64)),
        server_cpu_hold_cores: hold_usage.server_cpu().map(|cpu| {
            (per(cpu.as_secs_f64(), hold_usage.wall.as_secs_f64()) * 1000.0).round() / 1000.0
        }),
        server_nofile_limit,
        connect: ramp.summary,
    };
    Outcome {
        results: Results::Connections(results),
        // The ramp is the phase that works the generator.
        usage: ramp_usage,
        warnings,
    }
}

/// Keeps one connection open, reading (pings are answered by the reader), until the run ends.
async fn hold(conn: Conn, held: Arc<Held>, stop: CancellationToken, errors: Arc<ErrorTally>) {
    let Conn {
        mut reader, writer, ..
    } = conn;
    held.open.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            received = reader.recv() => if let Err(error) = received {
                held.open.fetch_sub(1, Ordering::Relaxed);
                held.dropped.fetch_add(1, Ordering::Relaxed);
                errors.record("hold", &error);
                return;
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.close()).await;
}
