//! The scenarios, and what they share: the run environment ([`Env`]) and the connection ramp
//! ([`open_connections`]) that opens many connections at a bounded rate and concurrency.
//!
//! Each scenario module owns one subcommand from start to report: its phases, its counters, and
//! the numbers it derives. None of them can wait forever: every network step has a timeout, and
//! each phase is bounded by the scenario's duration and counts.

pub mod churn;
pub mod connections;
pub mod fanout;
pub mod reconnect_storm;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::CommonArgs;
use crate::client::{Conn, Connector};
use crate::progress::Progress;
use crate::report::{per, ConnectSummary};
use crate::stats::{secs, ErrorTally, Latencies, LatencySummary};

/// What every scenario runs with.
pub struct Env {
    pub connector: Arc<Connector>,
    pub common: CommonArgs,
    /// Cancelled by Ctrl-C: phases end early and the report is still printed.
    pub interrupt: CancellationToken,
    pub progress: Progress,
    pub errors: Arc<ErrorTally>,
    /// Distinguishes this run's rooms from any other traffic on the server.
    pub run_id: String,
}

/// What a scenario hands back for the report.
pub struct Outcome {
    pub results: crate::report::Results,
    /// The measured phase.
    pub usage: crate::sysinfo::Usage,
    pub warnings: Vec<String>,
}

/// What [`open_connections`] did.
pub struct Ramp {
    pub summary: ConnectSummary,
}

/// Opens `count` connections: attempt `i` starts no earlier than `i / rate` seconds in (when
/// `rate` > 0), at most `concurrency` attempts are in flight, and none starts after `deadline`
/// or Ctrl-C. Each established connection is handed to `handler`, which runs in its own task on
/// `tracker` (so the caller can wait for all of them). Returns once every attempt has connected
/// or failed; failures are counted in `env.errors` under stage `connect`.
pub async fn open_connections<F, Fut>(
    env: &mut Env,
    count: usize,
    rate: f64,
    concurrency: usize,
    deadline: Option<Instant>,
    tracker: &TaskTracker,
    handler: F,
) -> Ramp
where
    F: Fn(usize, Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let concurrency = concurrency.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(concurrency));
    let established = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let last_established_ns = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    let handler = Arc::new(handler);
    let started = Instant::now();

    {
        let (established, failed) = (established.clone(), failed.clone());
        env.progress.phase("connect", count as u64, move || {
            let ok = established.load(Ordering::Relaxed);
            let bad = failed.load(Ordering::Relaxed);
            let elapsed = started.elapsed().as_secs_f64();
            (
                ok + bad,
                format!(
                    "established {ok}, failed {bad}, {:.0}/s",
                    per(ok as f64, elapsed)
                ),
            )
        });
    }

    let far = started + Duration::from_secs(86_400 * 365);
    let deadline = deadline.unwrap_or(far);
    let mut attempted = 0u64;
    for index in 0..count {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(index as f64 / rate);
            if due >= deadline {
                break;
            }
            if due > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = env.interrupt.cancelled() => break,
                }
            }
        }
        let permit = tokio::select! {
            biased;
            _ = env.interrupt.cancelled() => break,
            _ = tokio::time::sleep_until(deadline.into()) => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        if Instant::now() >= deadline {
            break;
        }
        attempted += 1;
        let connector = env.connector.clone();
        let errors = env.errors.clone();
        let (established, failed) = (established.clone(), failed.clone());
        let last = last_established_ns.clone();
        let latencies = latencies.clone();
        let handler = handler.clone();
        tracker.spawn(async move {
            match connector.connect(index).await {
                Ok(conn) => {
                    latencies.record(index, conn.connect_time.as_nanos() as u64);
                    last.fetch_max(crate::clock::now_ns(), Ordering::Relaxed);
                    established.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    handler(index, conn).await;
                }
                Err(error) => {
                    errors.record("connect", &error);
                    failed.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                }
            }
        });
    }
    // Every attempt in flight ends within the connect timeout.
    let _ = permits.acquire_many(concurrency as u32).await;

    let established = established.load(Ordering::Relaxed);
    let last_ns = last_established_ns.load(Ordering::Relaxed);
    let seconds = if established > 0 {
        crate::clock::instant_of(last_ns).saturating_duration_since(started)
    } else {
        started.elapsed()
    };
    Ramp {
        summary: ConnectSummary {
            requested: count as u64,
            attempted,
            established,
            failed: failed.load(Ordering::Relaxed),
            skipped: count as u64 - attempted,
            seconds: secs(seconds),
            per_second: crate::report::round2(per(established as f64, seconds.as_secs_f64())),
            latency: LatencySummary::of(&latencies.merged()),
        },
    }
}

/// Waits until `done()` or `limit` elapses or Ctrl-C, polling every `every`. Returns whether
/// `done()` became true.
/// The join phase after a ramp: shows how many joins ended (`joins` answers joined, failed)
/// and waits until every one of the `established` connections' joins has. Each ends within
/// the reply timeout; the margin covers scheduling.
pub async fn await_joins<F>(env: &mut Env, established: u64, joins: F)
where
    F: Fn() -> (u64, u64) + Clone + Send + 'static,
{
    let status = joins.clone();
    env.progress.phase("join", established, move || {
        let (joined, failed) = status();
        (joined + failed, format!("joined {joined}, failed {failed}"))
    });
    wait_until(
        &env.interrupt,
        env.common.timeout + Duration::from_secs(5),
        Duration::from_millis(10),
        || {
            let (joined, failed) = joins();
            joined + failed >= established
        },
    )
    .await;
}

pub async fn wait_until(
    interrupt: &CancellationToken,
    limit: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline || interrupt.is_cancelled() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = interrupt.cancelled() => {}
        }
    }
}

/// Waits for a tracker's tasks, at most `limit`.
pub async fn drain(tracker: &TaskTracker, limit: Duration) -> bool {
    tracker.close();
    tokio::time::timeout(limit, tracker.wait()).await.is_ok()
}
