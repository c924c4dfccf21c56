//! `reconnect-storm`: a deploy's drain as the clients see it. N clients sit in their rooms on
//! server A; A gets SIGTERM (t0) and closes every connection with 1001 Going Away; every client
//! at once reconnects to server B (`--reconnect-url`, a load balancer's address in a real
//! deploy) and re-joins its room. Measured: how long after t0 the first, half, 99% and all of
//! them are back in their rooms (`room_joined` on the new connection), what failed on the way
//! (by cause), and what the storm cost B (`--server-pid`: CPU per reconnect, RSS after).
//!
//! This module owns the phases (connect and join on A, settle, drain, storm, close) and the
//! storm's accounting. Each client is one task that keeps at most one socket: the connection to
//! A is closed before the one to B is opened, so 19,000 clients fit under a 20,000-file limit.
//!
//! How a client's connection to A ends is sorted three ways: a 1001 close (the drain as meant),
//! any other end (a reset, another code: counted under stage `drain` with its cause, and the
//! client still reconnects, as a real one would), or no end at all by the timeout. Reconnect
//! failures are counted under `reconnect` (connect, upgrade, welcome) or `rejoin` (join_room),
//! each followed by a jittered pause and another try until the storm's deadline, t0 +
//! `--timeout`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{await_joins, drain, open_connections, wait_until, Env, Outcome};
use crate::cli::{CommonArgs, ReconnectStormArgs};
use crate::client::{Cause, ClientError, CloseCode, Conn, Connector, Target};
use crate::clock::{instant_of, now_ns};
use crate::report::{round2, ReconnectStormResults, Results};
use crate::stats::{secs, Counter, ErrorTally, Latencies, LatencySummary};
use crate::sysinfo::Meter;

/// A reconnect storm that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReconnectStormError {
    #[error("--rooms must be at least 1")]
    NoRooms,
    #[error(
        "reconnect-storm drains one server: give one --url (server A) and --reconnect-url for \
         where the clients go"
    )]
    OneUrl,
    #[error(
        "--drain-pid {0} cannot be signalled: it must be one process (not 0, 1, a process \
         group, or this generator)"
    )]
    BadPid(u32),
    #[error("--drain-pid {pid}: {error} (is server A running, and ours to signal?)")]
    NotSignallable { pid: u32, error: io::Error },
    #[error("--backoff-min must not exceed --backoff-max")]
    Backoff,
}

/// Checks what can be checked before any traffic: one `--url`, rooms, backoff, and a
/// `--drain-pid` that names one live process we may signal. `kill(0)` or a negative pid would
/// signal a whole process group (the calling script's included), so those are refused here.
pub fn check(args: &ReconnectStormArgs, common: &CommonArgs) -> Result<(), ReconnectStormError> {
    if common.urls.len() != 1 {
        return Err(ReconnectStormError::OneUrl);
    }
    if args.rooms == 0 {
        return Err(ReconnectStormError::NoRooms);
    }
    if args.backoff_min > args.backoff_max {
        return Err(ReconnectStormError::Backoff);
    }
    let pid = args.drain_pid;
    if pid < 2 || pid > i32::MAX as u32 || pid == std::process::id() {
        return Err(ReconnectStormError::BadPid(pid));
    }
    signal(pid, 0).map_err(|error| ReconnectStormError::NotSignallable { pid, error })
}

/// `kill(pid, signal)`; `pid` was checked by [`check`] to be a single process.
fn signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory preconditions; a pid in 2..=i32::MAX names one process.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What every client task shares.
struct Shared {
    rooms: Vec<String>,
    /// Aimed at server B.
    reconnect: Connector,
    reply_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    errors: Arc<ErrorTally>,
    /// Ends the run: clients close what they hold and stop retrying.
    stop: CancellationToken,
    /// `now_ns` of the SIGTERM; 0 until it is sent.
    t0_ns: AtomicU64,
    /// `now_ns` after which no client tries again (t0 + --timeout); set before `t0_ns`.
    deadline_ns: AtomicU64,
    joined: AtomicU64,
    join_failed: AtomicU64,
    /// Frames clients received on A after their join (member_joined of later joiners), to see
    /// when the join traffic has died down before the drain.
    notices: Counter,
    dropped_before_drain: AtomicU64,
    going_away: AtomicU64,
    closed_otherwise: AtomicU64,
    never_closed: AtomicU64,
    back: AtomicU64,
    dropped_after_back: AtomicU64,
    attempts: AtomicU64,
    failures: AtomicU64,
    clients_retried: AtomicU64,
    most_attempts: AtomicU64,
    /// Per client: `now_ns` when its connection to A ended, and when it was back in its room
    /// on B (0: not yet). Exact times, so "all back" is the last client's own instant.
    closed_at: Vec<AtomicU64>,
    back_at: Vec<AtomicU64>,
    /// Per client, from the end of its connection to A to its room_joined on B.
    reconnect_times: Latencies,
}

impl Shared {
    fn room(&self, index: usize) -> &str {
        &self.rooms[index % self.rooms.len()]
    }
}

pub async fn run(env: &mut Env, args: ReconnectStormArgs, reconnect: Option<Target>) -> Outcome {
    let mut warnings = Vec::new();
    let target = reconnect.unwrap_or_else(|| env.connector.targets()[0].clone());
    let reconnect_url = target.url.clone();
    if env.common.server_pid.contains(&args.drain_pid) {
        warnings.push(format!(
            "--server-pid includes the drained server {}: its CPU and RSS after the storm \
             cannot be read once it has exited; give server B's PID",
            args.drain_pid
        ));
    }
    let shared = Arc::new(Shared {
        rooms: (0..args.rooms)
            .map(|r| format!("{}-{}-{r}", args.room_prefix, env.run_id))
            .collect(),
        reconnect: env.connector.retarget(vec![target]),
        reply_timeout: env.common.timeout,
        backoff_min: args.backoff_min,
        backoff_max: args.backoff_max,
        errors: env.errors.clone(),
        stop: CancellationToken::new(),
        t0_ns: AtomicU64::new(0),
        deadline_ns: AtomicU64::new(0),
        joined: AtomicU64::new(0),
        join_failed: AtomicU64::new(0),
        notices: Counter::default(),
        dropped_before_drain: AtomicU64::new(0),
        going_away: AtomicU64::new(0),
        closed_otherwise: AtomicU64::new(0),
        never_closed: AtomicU64::new(0),
        back: AtomicU64::new(0),
        dropped_after_back: AtomicU64::new(0),
        attempts: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        clients_retried: AtomicU64::new(0),
        most_attempts: AtomicU64::new(0),
        closed_at: (0..args.clients).map(|_| AtomicU64::new(0)).collect(),
        back_at: (0..args.clients).map(|_| AtomicU64::new(0)).collect(),
        reconnect_times: Latencies::default(),
    });

    // Connect and join on A.
    let tracker = TaskTracker::new();
    let handler_shared = shared.clone();
    let ramp = open_connections(
        env,
        args.clients,
        args.ramp,
        args.concurrency,
        Some(Instant::now() + args.ramp_limit),
        &tracker,
        move |index, conn| client(handler_shared.clone(), index, conn),
    )
    .await;
    let established = ramp.summary.established;
    let s = shared.clone();
    await_joins(env, established, move || {
        (
            s.joined.load(Ordering::Relaxed),
            s.join_failed.load(Ordering::Relaxed),
        )
    })
    .await;

    // Settle: the member_joined traffic of the joins dies down, so the drain starts from
    // clients that are only waiting, as a deploy's do.
    env.progress.phase("settle", 0, || (0, String::new()));
    let mut last_notices = u64::MAX;
    let mut quiet_since = Instant::now();
    wait_until(
        &env.interrupt,
        env.common.timeout,
        Duration::from_millis(20),
        || {
            let now = shared.notices.get();
            if now != last_notices {
                last_notices = now;
                quiet_since = Instant::now();
            }
            quiet_since.elapsed() >= Duration::from_millis(200)
        },
    )
    .await;

    // The drain: t0 is taken just before the signal, the meter of B starts with it.
    let joined = shared.joined.load(Ordering::Relaxed);
    let mut drained = false;
    let meter = Meter::start(&env.common.server_pid);
    let t0 = now_ns();
    if joined > 0 && !env.interrupt.is_cancelled() {
        shared
            .deadline_ns
            .store(t0 + env.common.timeout.as_nanos() as u64, Ordering::Relaxed);
        shared.t0_ns.store(t0, Ordering::Release);
        match signal(args.drain_pid, libc::SIGTERM) {
            Ok(()) => drained = true,
            Err(error) => {
                // No storm: the clients' ends from here on are not the drain's.
                shared.t0_ns.store(0, Ordering::Release);
                warnings.push(format!(
                    "WARNING: SIGTERM to --drain-pid {} failed ({error}): no drain, no storm",
                    args.drain_pid
                ));
            }
        }
    }
    if drained {
        let s = shared.clone();
        env.progress.phase("storm", joined, move || {
            let back = s.back.load(Ordering::Relaxed);
            (
                back,
                format!(
                    "back {back}, attempts {}, failed {}",
                    s.attempts.load(Ordering::Relaxed),
                    s.failures.load(Ordering::Relaxed)
                ),
            )
        });
        // Over when every client that was in its room at t0 is back (clients dropped before
        // the drain take no part), or at the deadline.
        wait_until(
            &env.interrupt,
            env.common.timeout,
            Duration::from_millis(5),
            || {
                shared.back.load(Ordering::Relaxed)
                    + shared.dropped_before_drain.load(Ordering::Relaxed)
                    >= shared.joined.load(Ordering::Relaxed)
            },
        )
        .await;
    }
    let usage = meter.stop();
    env.progress.finish();

    shared.stop.cancel();
    // Every wait of a client watches `stop`; only closes (1 s each) are left.
    if !drain(&tracker, env.common.timeout + Duration::from_secs(5)).await {
        warnings.push("some clients did not close within --timeout".to_owned());
    }

    let results = results(&shared, &args, &usage, ramp.summary, reconnect_url, drained);
    warn(&results, env.common.timeout, &mut warnings);
    Outcome {
        results: Results::ReconnectStorm(results),
        // The storm is the measured phase, for B and for the generator.
        usage,
        warnings,
    }
}

/// The report's numbers, once every client task has finished.
fn results(
    shared: &Shared,
    args: &ReconnectStormArgs,
    usage: &crate::sysinfo::Usage,
    connect: crate::report::ConnectSummary,
    reconnect_url: String,
    drained: bool,
) -> ReconnectStormResults {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let t0 = load(&shared.t0_ns);
    let going_away = load(&shared.going_away);
    let closed_otherwise = load(&shared.closed_otherwise);
    let never_closed = load(&shared.never_closed);
    let in_storm = going_away + closed_otherwise + never_closed;
    let since_t0 = |times: &[AtomicU64]| {
        let mut ns: Vec<u64> = times
            .iter()
            .map(load)
            .filter(|&at| at != 0 && t0 != 0)
            .map(|at| at.saturating_sub(t0))
            .collect();
        ns.sort_unstable();
        ns
    };
    let closes = since_t0(&shared.closed_at);
    let backs = since_t0(&shared.back_at);
    let back = backs.len() as u64;
    let at = |q: f64| time_at(&backs, in_storm, q);
    let cpu = usage.server_cpu();
    ReconnectStormResults {
        clients: args.clients,
        rooms: args.rooms,
        reconnect_url,
        drain_pid: args.drain_pid,
        connect,
        joined: load(&shared.joined),
        join_failed: load(&shared.join_failed),
        dropped_before_drain: load(&shared.dropped_before_drain),
        drained,
        in_storm,
        closed_going_away: going_away,
        closed_otherwise,
        never_closed,
        first_close_ms: closes.first().map(|&ns| ms(ns)),
        last_close_ms: closes.last().map(|&ns| ms(ns)),
        back,
        not_back: in_storm.saturating_sub(back),
        back_first_ms: backs.first().map(|&ns| ms(ns)),
        back_half_ms: at(0.5),
        back_p90_ms: at(0.9),
        back_p99_ms: at(0.99),
        back_p999_ms: at(0.999),
        back_all_ms: at(1.0),
        reconnect_latency: LatencySummary::of(&shared.reconnect_times.merged()),
        reconnect_attempts: load(&shared.attempts),
        reconnect_failures: load(&shared.failures),
        clients_retried: load(&shared.clients_retried),
        most_attempts: load(&shared.most_attempts),
        backoff_min_ms: round2(args.backoff_min.as_secs_f64() * 1e3),
        backoff_max_ms: round2(args.backoff_max.as_secs_f64() * 1e3),
        dropped_after_back: load(&shared.dropped_after_back),
        storm_seconds: secs(usage.wall),
        server_cpu_storm_seconds: cpu.map(secs),
        server_cpu_us_per_reconnect: cpu
            .filter(|_| back > 0)
            .map(|cpu| round2(cpu.as_secs_f64() * 1e6 / back as f64)),
        server_rss_before_kib: usage.server_before.map(|s| s.rss_kib),
        server_rss_after_kib: usage.server_after.map(|s| s.rss_kib),
    }
}

/// Warnings for a storm that did not go as a drain should: they say which count to look at.
fn warn(r: &ReconnectStormResults, timeout: Duration, warnings: &mut Vec<String>) {
    let t = humantime::format_duration(timeout);
    if r.drained && r.not_back > 0 {
        warnings.push(format!(
            "WARNING: {} of {} clients were not back in their rooms {t} after the SIGTERM \
             (--timeout); see the reconnect and rejoin errors",
            r.not_back, r.in_storm
        ));
    }
    if r.never_closed > 0 {
        warnings.push(format!(
            "WARNING: {} clients were never closed by the drained server within {t}: is \
             --drain-pid the server at --url, and its --shutdown-delay shorter than --timeout?",
            r.never_closed
        ));
    }
    if r.closed_otherwise > 0 {
        warnings.push(format!(
            "{} clients' connections to the drained server ended without a 1001 close (see \
             the drain errors); they reconnected too",
            r.closed_otherwise
        ));
    }
    if r.dropped_before_drain > 0 || r.join_failed > 0 {
        warnings.push(format!(
            "{} clients failed to join and {} were dropped before the drain; they took no part \
             in the storm",
            r.join_failed, r.dropped_before_drain
        ));
    }
}

/// When the `ceil(q * population)`-th client was back (ms after t0): `None` when fewer came
/// back than that. `sorted` holds the back times in ns, ascending.
fn time_at(sorted: &[u64], population: u64, q: f64) -> Option<f64> {
    if population == 0 {
        return None;
    }
    let rank = ((q * population as f64).ceil() as usize).max(1);
    sorted.get(rank - 1).map(|&ns| ms(ns))
}

fn ms(ns: u64) -> f64 {
    round2(ns as f64 / 1e6)
}

/// A client: join on A, wait there for the drain, reconnect to B and re-join, stay until the
/// end of the run. Everything it counts goes into `shared`.
async fn client(shared: Arc<Shared>, index: usize, mut conn: Conn) {
    if let Err(error) = conn
        .join(shared.room(index), false, shared.reply_timeout)
        .await
    {
        shared.errors.record("join", &error);
        shared.join_failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    shared.joined.fetch_add(1, Ordering::Relaxed);

    // On A until it closes us. Reading the whole time, as an idle client does: pings are
    // answered and member_joined of later joiners is taken off the socket.
    let Conn {
        mut reader, writer, ..
    } = conn;
    let ended = loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => {
                if shared.t0_ns.load(Ordering::Acquire) != 0 {
                    shared.never_closed.fetch_add(1, Ordering::Relaxed);
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), writer.close()).await;
                return;
            }
            received = reader.recv() => match received {
                Ok(_) => shared.notices.add(index, 1),
                Err(error) => break error,
            },
        }
    };
    let closed_ns = now_ns();
    // The reader has echoed A's close frame: the socket is released before B's is opened, so
    // a client never holds two.
    drop((reader, writer));
    let t0 = shared.t0_ns.load(Ordering::Acquire);
    if t0 == 0 {
        shared.errors.record("hold", &ended);
        shared.dropped_before_drain.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match ended {
        ClientError::Closed(CloseCode(Some(1001))) => {
            shared.going_away.fetch_add(1, Ordering::Relaxed);
        }
        other => {
            shared.errors.record("drain", &other);
            shared.closed_otherwise.fetch_add(1, Ordering::Relaxed);
        }
    }
    shared.closed_at[index].store(closed_ns, Ordering::Relaxed);

    let deadline = instant_of(shared.deadline_ns.load(Ordering::Relaxed));
    let mut attempts = 0u64;
    let conn = retry(&shared, index, deadline, &mut attempts).await;
    if attempts > 1 {
        shared.clients_retried.fetch_add(1, Ordering::Relaxed);
    }
    shared.most_attempts.fetch_max(attempts, Ordering::Relaxed);
    let Some(conn) = conn else {
        return;
    };
    let back_ns = now_ns();
    shared.back_at[index].store(back_ns, Ordering::Relaxed);
    shared.back.fetch_add(1, Ordering::Relaxed);
    shared
        .reconnect_times
        .record(index, back_ns.saturating_sub(closed_ns));

    // On B until the run ends, reading: the re-joins of the others bring member_joined.
    let Conn {
        mut reader, writer, ..
    } = conn;
    loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break,
            received = reader.recv() => if let Err(error) = received {
                shared.errors.record("back", &error);
                shared.dropped_after_back.fetch_add(1, Ordering::Relaxed);
                return;
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.close()).await;
}

/// Reconnects until one attempt is back in the room (`Some`), or the deadline or the end of the
/// run comes first (`None`). Each failure is counted, then a jittered pause.
async fn retry(
    shared: &Shared,
    index: usize,
    deadline: Instant,
    attempts: &mut u64,
) -> Option<Conn> {
    loop {
        if Instant::now() >= deadline {
            return None;
        }
        *attempts += 1;
        shared.attempts.fetch_add(1, Ordering::Relaxed);
        let attempt = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return None,
            attempt = tokio::time::timeout_at(deadline.into(), reconnect(shared, index)) => attempt,
        };
        match attempt {
            Ok(Ok(conn)) => return Some(conn),
            Ok(Err((stage, error))) => {
                shared.errors.record(stage, &error);
                shared.failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // The storm is over for this client; its attempt is cut, not failed.
                shared.errors.record_cause("reconnect", Cause::Timeout, || {
                    "the storm's --timeout ran out during an attempt".to_owned()
                });
                return None;
            }
        }
        let pause = jitter(
            shared.backoff_min,
            shared.backoff_max,
            ((index as u64) << 20) ^ *attempts ^ now_ns(),
        );
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return None,
            _ = tokio::time::sleep_until((Instant::now() + pause).min(deadline).into()) => {}
        }
    }
}

/// One reconnect: connect (TCP, upgrade, welcome) to B, then join the client's room. A failure
/// names its stage.
async fn reconnect(shared: &Shared, index: usize) -> Result<Conn, (&'static str, ClientError)> {
    let mut conn = shared
        .reconnect
        .connect(index)
        .await
        .map_err(|e| ("reconnect", e))?;
    conn.join(shared.room(index), false, shared.reply_timeout)
        .await
        .map_err(|e| ("rejoin", e))?;
    Ok(conn)
}

/// A pause drawn uniformly from `min..=max` by a splitmix64 of `seed`: enough spread that the
/// retries of thousands of clients do not arrive in lockstep, with no random-number crate.
fn jitter(min: Duration, max: Duration, seed: u64) -> Duration {
    let span = max.saturating_sub(min).as_nanos() as u64;
    if span == 0 {
        return min;
    }
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    min + Duration::from_nanos(z % (span + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_taken_at_the_rank_of_the_whole_population() {
        let ms_ns = |v: u64| v * 1_000_000;
        let backs: Vec<u64> = (1..=10).map(ms_ns).collect();
        assert_eq!(time_at(&backs, 10, 0.5), Some(5.0));
        assert_eq!(time_at(&backs, 10, 0.99), Some(10.0));
        assert_eq!(time_at(&backs, 10, 1.0), Some(10.0));
        assert_eq!(time_at(&backs, 10, 0.0), Some(1.0));
        // 10 of 20 back: half is the 10th, 99% and all never came.
        assert_eq!(time_at(&backs, 20, 0.5), Some(10.0));
        assert_eq!(time_at(&backs, 20, 0.99), None);
        assert_eq!(time_at(&backs, 20, 1.0), None);
        assert_eq!(time_at(&[], 0, 0.5), None);
    }

    #[test]
    fn jitter_stays_in_bounds_and_spreads() {
        let (min, max) = (Duration::from_millis(5), Duration::from_millis(50));
        let pauses: Vec<Duration> = (0..1000).map(|i| jitter(min, max, i)).collect();
        assert!(pauses.iter().all(|p| (min..=max).contains(p)));
        let low = pauses
            .iter()
            .filter(|p| **p < Duration::from_millis(27))
            .count();
        assert!((350..650).contains(&low), "{low} of 1000 in the lower half");
        assert_eq!(jitter(min, min, 7), min);
    }

    #[test]
    fn pids_that_would_signal_a_group_are_refused() {
        use clap::Parser;
        let parse = |pid: &str| {
            let cli = crate::cli::Cli::try_parse_from([
                "roomcast-loadtest",
                "reconnect-storm",
                "--drain-pid",
                pid,
            ])
            .unwrap();
            let crate::cli::Scenario::ReconnectStorm(args) = cli.scenario else {
                panic!()
            };
            check(&args, &cli.common)
        };
        for pid in ["0", "1", "4294967295", &std::process::id().to_string()] {
            assert!(
                matches!(parse(pid), Err(ReconnectStormError::BadPid(_))),
                "{pid}"
            );
        }
    }
}
