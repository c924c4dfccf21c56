//! `churn`: workers looping over whole connection lifecycles (connect, welcome, join_room,
//! room_message, leave_room, close) to measure how fast the server sets up and tears down
//! connections, and what fails under that load.
//!
//! Each worker uses its own room, so cycles never deliver to each other; the close handshake
//! is completed (and the server's end of stream awaited) so an `error` reply to anything the
//! cycle sent is seen, and the TIME_WAIT stays on the server's side.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::task::TaskTracker;

use super::{drain, Env, Outcome};
use crate::cli::ChurnArgs;
use crate::client::{ClientError, Connector};
use crate::clock::now_ns;
use crate::message::{ClientMessage, Stamp};
use crate::report::{per, round2, ChurnResults, Results};
use crate::stats::{secs, ErrorTally, Latencies, LatencySummary};
use crate::sysinfo::Meter;

#[derive(Default)]
struct Totals {
    handshakes: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    /// Cycles claimed so far (for --cycles).
    claimed: AtomicU64,
    /// Connection numbers, to spread cycles over the targets round-robin.
    next_client: AtomicUsize,
}

struct Worker {
    connector: Arc<Connector>,
    totals: Arc<Totals>,
    errors: Arc<ErrorTally>,
    handshake_times: Arc<Latencies>,
    cycle_times: Arc<Latencies>,
    room: String,
    size: usize,
    timeout: Duration,
}

pub async fn run(env: &mut Env, args: ChurnArgs) -> Outcome {
    let totals = Arc::new(Totals::default());
    let handshake_times = Arc::new(Latencies::default());
    let cycle_times = Arc::new(Latencies::default());
    let tracker = TaskTracker::new();
    let meter = Meter::start(&env.common.server_pid);
    let started = Instant::now();
    let deadline = started + args.duration;
    {
        let totals = totals.clone();
        env.progress
            .phase("churn", args.duration.as_secs().max(1), move || {
                let elapsed = started.elapsed();
                let done = totals.completed.load(Ordering::Relaxed);
                (
                    elapsed.as_secs(),
                    format!(
                        "cycles {done} ({:.0}/s), failed {}",
                        per(done as f64, elapsed.as_secs_f64()),
                        totals.failed.load(Ordering::Relaxed)
                    ),
                )
            });
    }
    for w in 0..args.workers {
        let worker = Worker {
            connector: env.connector.clone(),
            totals: totals.clone(),
            errors: env.errors.clone(),
            handshake_times: handshake_times.clone(),
            cycle_times: cycle_times.clone(),
            room: format!("{}-{}-{w}", args.room_prefix, env.run_id),
            size: args.size,
            timeout: env.common.timeout,
        };
        let interrupt = env.interrupt.clone();
        let (cycles, backoff) = (args.cycles, args.backoff);
        tracker.spawn(async move {
            let mut message = String::new();
            while Instant::now() < deadline && !interrupt.is_cancelled() {
                if cycles > 0 && worker.totals.claimed.fetch_add(1, Ordering::Relaxed) >= cycles {
                    break;
                }
                if worker.cycle(w, &mut message).await.is_err() {
                    worker.totals.failed.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = interrupt.cancelled() => {}
                    }
                }
            }
        });
    }
    // A cycle in progress at the deadline finishes within its timeouts.
    let limit = args.duration + env.common.connect_timeout + env.common.timeout * 4;
    let mut warnings = Vec::new();
    if !drain(&tracker, limit).await {
        warnings.push("some workers did not finish within their timeouts".to_owned());
    }
    let usage = meter.stop();
    env.progress.finish();

    let seconds = started.elapsed();
    let handshakes = totals.handshakes.load(Ordering::Relaxed);
    let completed = totals.completed.load(Ordering::Relaxed);
    let results = ChurnResults {
        workers: args.workers,
        seconds: secs(seconds),
        handshakes,
        handshakes_per_second: round2(per(handshakes as f64, seconds.as_secs_f64())),
        cycles_completed: completed,
        cycles_per_second: round2(per(completed as f64, seconds.as_secs_f64())),
        cycles_failed: totals.failed.load(Ordering::Relaxed),
        handshake_latency: LatencySummary::of(&handshake_times.merged()),
        cycle_latency: LatencySummary::of(&cycle_times.merged()),
        server_cpu_us_per_cycle: usage
            .server_cpu()
            .filter(|_| completed > 0)
            .map(|cpu| round2(cpu.as_secs_f64() * 1e6 / completed as f64)),
    };
    Outcome {
        results: Results::Churn(results),
        usage,
        warnings,
    }
}

impl Worker {
    /// One lifecycle; a failure is counted under the stage it happened in.
    async fn cycle(&self, worker: usize, message: &mut String) -> Result<(), ()> {
        let started = Instant::now();
        let client = self.totals.next_client.fetch_add(1, Ordering::Relaxed);
        let fail = |stage: &'static str, error: ClientError| {
            self.errors.record(stage, &error);
        };
        let mut conn = self
            .connector
            .connect(client)
            .await
            .map_err(|e| fail("connect", e))?;
        self.totals.handshakes.fetch_add(1, Ordering::Relaxed);
        self.handshake_times
            .record(worker, conn.connect_time.as_nanos() as u64);

        conn.join(&self.room, false, self.timeout)
            .await
            .map_err(|e| fail("join", e))?;
        Stamp {
            publisher: worker as u32,
            seq: client as u64,
            sent_ns: now_ns(),
        }
        .encode_into(message, self.size);
        self.send(
            &conn.writer,
            &ClientMessage::RoomMessage {
                room: &self.room,
                message,
            },
        )
        .await
        .map_err(|e| fail("message", e))?;
        self.send(&conn.writer, &ClientMessage::LeaveRoom { room: &self.room })
            .await
            .map_err(|e| fail("leave", e))?;
        conn.close(self.timeout)
            .await
            .map_err(|e| fail("close", e))?;
        self.totals.completed.fetch_add(1, Ordering::Relaxed);
        self.cycle_times
            .record(worker, started.elapsed().as_nanos() as u64);
        Ok(())
    }

    async fn send(
        &self,
        writer: &crate::client::Writer,
        message: &ClientMessage<'_>,
    ) -> Result<(), ClientError> {
        tokio::time::timeout(self.timeout, writer.send(message))
            .await
            .map_err(|_| ClientError::Timeout("writing a message"))?
    }
}
