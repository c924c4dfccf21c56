//! The run's report: one serde structure printed either as a human summary or, with `--json`,
//! as one JSON object for machines. Scenario modules fill in their [`Results`]; the common parts
//! (generator and server CPU, errors, warnings) are built here from a [`Usage`].

use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::{human_us, secs, ErrorCount, LatencySummary};
use crate::sysinfo::{self, Usage};

/// Warning printed when the generator itself ran out of CPU.
pub const SATURATED_WARNING: &str = "WARNING: load generator saturated; results are a lower bound";

/// Fraction of its threads' CPU above which the generator counts as saturated.
const SATURATION: f64 = 0.9;

/// Shorter phases are not judged for saturation: CPU time is counted in clock ticks, so the
/// ratio of a few milliseconds is noise.
const MIN_JUDGED_WALL: f64 = 0.5;

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub version: &'static str,
    pub targets: Vec<String>,
    /// Wall-clock start of the run, Unix milliseconds.
    pub started_unix_ms: u64,
    /// Ctrl-C stopped the run early.
    pub interrupted: bool,
    pub generator: GeneratorReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerReport>,
    /// Fraction of all the machine's CPUs busy during the measured phase (server, generator and
    /// everything else).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_cpu_busy: Option<f64>,
    pub results: Results,
    pub errors: Vec<ErrorCount>,
    pub warnings: Vec<String>,
}

/// The generator's own CPU use during the measured phase.
#[derive(Debug, Serialize)]
pub struct GeneratorReport {
    pub threads: usize,
    pub cores: usize,
    pub measured_seconds: f64,
    pub cpu_seconds: f64,
    /// cpu_seconds / measured_seconds.
    pub cpu_cores_used: f64,
    pub saturated: bool,
    /// The generator's own RSS at the end of the run.
    pub rss_kib: Option<u64>,
}

/// The server's CPU and memory during the measured phase (`--server-pid`).
#[derive(Debug, Serialize)]
pub struct ServerReport {
    /// The first server process; `pids` has them all (a cluster's nodes, summed).
    pub pid: u32,
    pub pids: Vec<u32>,
    pub cpu_seconds: Option<f64>,
    pub cpu_cores_used: Option<f64>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub threads: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Connection setup of a scenario.
#[derive(Debug, Serialize, Default)]
pub struct ConnectSummary {
    pub requested: u64,
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    /// Attempts never started (deadline or Ctrl-C).
    pub skipped: u64,
    pub seconds: f64,
    /// established / seconds.
    pub per_second: f64,
    /// TCP connect to welcome.
    pub latency: LatencySummary,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Results {
    Fanout(FanoutResults),
    Connections(ConnectionsResults),
    Churn(ChurnResults),
    ReconnectStorm(ReconnectStormResults),
}

#[derive(Debug, Serialize)]
pub struct FanoutResults {
    /// `native`, or `pusher` (`--protocol`).
    pub protocol: &'static str,
    pub subscribers: usize,
    pub publishers: usize,
    pub rooms: usize,
    /// Per publisher; 0 = saturated.
    pub rate_per_publisher: f64,
    /// `stamp` or `realistic` (`--payload`).
    pub payload: &'static str,
    /// Bytes of each message's `message` string (the longest sent, once any was).
    pub message_size: usize,
    /// `--compression`: offered, agreed, and used.
    pub compression: CompressionReport,
    pub connect: ConnectSummary,
    /// Connections whose join_room was answered with room_joined.
    pub joined: u64,
    /// The join storm: from the first connection attempt until the last membership notice
    /// (member_joined...) arrived and the generator saw 200 ms of quiet.
    pub join_storm_seconds: f64,
    /// Membership notices our clients received during the join storm.
    pub join_storm_notices: u64,
    pub publish_seconds: f64,
    pub published: u64,
    /// published / publish_seconds, all publishers together.
    pub publish_rate: f64,
    /// Largest delay of a send behind its schedule (fixed rate only): the server or the
    /// generator could not keep up.
    pub publisher_max_lag_ms: f64,
    /// Deliveries owed: each message times the live receivers in its room when it was sent.
    pub expected: u64,
    pub received: u64,
    /// Bytes our clients read from their sockets during the measured phase (publish and
    /// grace): every frame's header and payload as sent, compressed or not (after TLS on
    /// wss://). Publishers count too: they read only what other publishers send.
    pub wire_bytes: u64,
    /// wire_bytes / received.
    pub wire_bytes_per_delivery: Option<f64>,
    pub lost: u64,
    pub loss_ratio: f64,
    /// Messages that arrived with a lower sequence number than one already seen.
    pub reordered: u64,
    /// room_message deliveries that carried no stamp of this run.
    pub foreign: u64,
    /// From the first publish to the last delivery.
    pub delivery_seconds: f64,
    pub deliveries_per_second: f64,
    pub latency: LatencySummary,
    /// Receivers whose connection ended before the run did (see errors for why).
    pub receivers_disconnected: u64,
    pub server_cpu_us_per_delivery: Option<f64>,
}

/// permessage-deflate in a fan-out run.
#[derive(Debug, Serialize)]
pub struct CompressionReport {
    /// `--compression`: the clients offered it (and fail a connection that is refused it).
    pub offered: bool,
    /// Every established connection negotiated it.
    pub negotiated: bool,
    pub connections_negotiated: u64,
    /// The server's `Sec-WebSocket-Extensions` answer (the first one).
    pub extension: Option<String>,
    /// Messages that arrived compressed (RSV1) and were inflated, in the measured phase.
    pub inflated_messages: u64,
}

#[derive(Debug, Serialize)]
pub struct ConnectionsResults {
    pub connect: ConnectSummary,
    pub ramp_target_per_second: f64,
    pub hold_seconds: f64,
    pub dropped_during_hold: u64,
    pub open_at_end: u64,
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_after_ramp_kib: Option<u64>,
    pub server_rss_end_kib: Option<u64>,
    /// (RSS after the ramp - RSS before) / connections established.
    pub server_rss_per_connection_bytes: Option<f64>,
    pub server_cpu_ramp_seconds: Option<f64>,
    pub server_cpu_us_per_connection: Option<f64>,
    /// Server CPU while the connections sat idle, in cores.
    pub server_cpu_hold_cores: Option<f64>,
    pub server_nofile_limit: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ChurnResults {
    pub workers: usize,
    pub seconds: f64,
    /// Successful connects (upgrade + welcome).
    pub handshakes: u64,
    pub handshakes_per_second: f64,
    pub cycles_completed: u64,
    pub cycles_per_second: f64,
    pub cycles_failed: u64,
    pub handshake_latency: LatencySummary,
    pub cycle_latency: LatencySummary,
    pub server_cpu_us_per_cycle: Option<f64>,
}

/// A reconnect storm. Times (`*_ms`) count from t0, the SIGTERM to the drained server A; the
/// `back_*` ranks are of `in_storm`, so `back_half_ms` is when half of the clients that were
/// in their rooms at t0 were back, and `back_all_ms` is `None` unless every one of them was.
/// `server_*` are of `--server-pid` (server B) over the storm, t0 to the last one back (or the
/// timeout).
#[derive(Debug, Serialize)]
pub struct ReconnectStormResults {
    pub clients: usize,
    pub rooms: usize,
    /// Where the clients reconnected (server B).
    pub reconnect_url: String,
    pub drain_pid: u32,
    /// The initial connections, to server A.
    pub connect: ConnectSummary,
    /// Clients whose join_room on A was answered with room_joined.
    pub joined: u64,
    pub join_failed: u64,
    /// Clients whose connection to A ended before the SIGTERM: no part in the storm.
    pub dropped_before_drain: u64,
    /// The SIGTERM was sent (not when nothing joined, Ctrl-C came first, or kill failed).
    pub drained: bool,
    /// Clients in their room on A at t0: closed_going_away + closed_otherwise + never_closed.
    pub in_storm: u64,
    /// Closed by A with 1001 Going Away.
    pub closed_going_away: u64,
    /// Their connection to A ended some other way (reset, another code; errors stage `drain`).
    pub closed_otherwise: u64,
    /// Still connected to A at the timeout.
    pub never_closed: u64,
    /// The first and last client's connection to A ended (A's drain, as the clients saw it).
    pub first_close_ms: Option<f64>,
    pub last_close_ms: Option<f64>,
    /// Back in their room on B (room_joined on the new connection).
    pub back: u64,
    /// in_storm - back: not back by the timeout.
    pub not_back: u64,
    pub back_first_ms: Option<f64>,
    pub back_half_ms: Option<f64>,
    pub back_p90_ms: Option<f64>,
    pub back_p99_ms: Option<f64>,
    pub back_p999_ms: Option<f64>,
    pub back_all_ms: Option<f64>,
    /// Per client: from the end of its connection to A to its room_joined on B.
    pub reconnect_latency: LatencySummary,
    /// Connection attempts to B (each client's first one included).
    pub reconnect_attempts: u64,
    /// Attempts that failed and were retried (by cause: errors stages `reconnect`, `rejoin`).
    pub reconnect_failures: u64,
    /// Clients that needed more than one attempt.
    pub clients_retried: u64,
    /// The most attempts one client made.
    pub most_attempts: u64,
    pub backoff_min_ms: f64,
    pub backoff_max_ms: f64,
    /// Back on B, then dropped before the run ended (errors stage `back`).
    pub dropped_after_back: u64,
    /// t0 to the last client back, or to the timeout.
    pub storm_seconds: f64,
    pub server_cpu_storm_seconds: Option<f64>,
    /// B's CPU over the storm / clients back.
    pub server_cpu_us_per_reconnect: Option<f64>,
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_after_kib: Option<u64>,
}

/// The generator and server parts of a report, and the warnings they call for.
pub fn usage_reports(
    usage: &Usage,
    threads: usize,
    server_pids: &[u32],
    warnings: &mut Vec<String>,
) -> (GeneratorReport, Option<ServerReport>) {
    let wall = usage.wall.as_secs_f64().max(1e-9);
    let cores = sysinfo::cores();
    let cores_used = usage.generator_cpu.as_secs_f64() / wall;
    let judged = wall >= MIN_JUDGED_WALL;
    let saturated = judged && cores_used > SATURATION * threads.min(cores) as f64;
    if saturated {
        warnings.push(SATURATED_WARNING.to_owned());
    }
    if let Some(busy) = usage.machine_busy {
        if judged && busy > SATURATION && !saturated {
            warnings.push(format!(
                "WARNING: the machine's CPUs were {:.0}% busy (generator, server and anything \
                 else running); results may be a lower bound",
                busy * 100.0
            ));
        }
    }
    let generator = GeneratorReport {
        threads,
        cores,
        measured_seconds: secs(usage.wall),
        cpu_seconds: secs(usage.generator_cpu),
        cpu_cores_used: round2(cores_used),
        saturated,
        rss_kib: sysinfo::sample_process(std::process::id())
            .ok()
            .map(|s| s.rss_kib),
    };
    let server = server_pids.first().map(|&pid| {
        let cpu = usage.server_cpu();
        if let Some(error) = &usage.server_error {
            warnings.push(format!("server pid {pid}: {error}"));
        }
        ServerReport {
            pid,
            pids: server_pids.to_vec(),
            cpu_seconds: cpu.map(secs),
            cpu_cores_used: cpu.map(|c| round2(c.as_secs_f64() / wall)),
            rss_before_kib: usage.server_before.map(|s| s.rss_kib),
            rss_after_kib: usage.server_after.map(|s| s.rss_kib),
            threads: usage.server_after.map(|s| s.threads),
            error: usage.server_error.clone(),
        }
    });
    (generator, server)
}

/// Rounds to 2 decimals.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Rounds to 3 decimals.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `x / y` when y is not zero.
pub fn per(x: f64, y: f64) -> f64 {
    if y > 0.0 {
        x / y
    } else {
        0.0
    }
}

fn kib(v: Option<u64>) -> String {
    v.map_or_else(
        || "-".to_owned(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.2} {unit}"))
}

/// `12,345`-style thousands for counts.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(x: f64) -> String {
    if x >= 1_000_000.0 {
        format!("{:.2}M", x / 1_000_000.0)
    } else if x >= 10_000.0 {
        format!("{:.1}k", x / 1_000.0)
    } else {
        format!("{x:.1}")
    }
}

impl ConnectSummary {
    fn write(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "  connections  {} established of {} requested ({} failed, {} not attempted) \
             in {:.2} s = {}/s",
            count(self.established),
            count(self.requested),
            count(self.failed),
            count(self.skipped),
            self.seconds,
            rate(self.per_second)
        );
        let _ = writeln!(out, "  connect time {}", self.latency.one_line());
    }
}

impl Report {
    /// The human-readable summary.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "roomcast-loadtest {} {} -> {}{}",
            self.version,
            self.scenario,
            self.targets.join(", "),
            if self.interrupted {
                "  (INTERRUPTED)"
            } else {
                ""
            }
        );
        match &self.results {
            Results::Fanout(r) => r.write(&mut out),
            Results::Connections(r) => r.write(&mut out),
            Results::Churn(r) => r.write(&mut out),
            Results::ReconnectStorm(r) => r.write(&mut out),
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "  errors");
            for e in &self.errors {
                let _ = writeln!(
                    out,
                    "    {:<9} {:<26} {:>8}   e.g. {}",
                    e.stage,
                    e.cause.label(),
                    count(e.count),
                    e.example
                );
            }
        }
        let g = &self.generator;
        let _ = writeln!(
            out,
            "  generator    {} threads on {} cores: CPU {:.2} s in {:.2} s = {:.2} cores{}, RSS {}",
            g.threads,
            g.cores,
            g.cpu_seconds,
            g.measured_seconds,
            g.cpu_cores_used,
            if g.saturated { " (SATURATED)" } else { "" },
            kib(g.rss_kib)
        );
        if let Some(s) = &self.server {
            let _ = writeln!(
                out,
                "  server       pid {}: CPU {} ({}), RSS {} -> {}, {} threads",
                s.pid,
                opt(s.cpu_seconds, "s"),
                opt(s.cpu_cores_used, "cores"),
                kib(s.rss_before_kib),
                kib(s.rss_after_kib),
                s.threads.map_or_else(|| "-".to_owned(), |t| t.to_string())
            );
        }
        if let Some(busy) = self.machine_cpu_busy {
            let _ = writeln!(out, "  machine      CPUs {:.0}% busy", busy * 100.0);
        }
        for w in &self.warnings {
            let _ = writeln!(out, "{w}");
        }
        out
    }
}

impl FanoutResults {
    fn write(&self, out: &mut String) {
        let rate_text = if self.rate_per_publisher > 0.0 {
            format!("{} msg/s each", self.rate_per_publisher)
        } else {
            "saturated".to_owned()
        };
        let _ = writeln!(
            out,
            "  setup        {} subscribers + {} publishers ({}) in {} rooms, {} B messages{}",
            count(self.subscribers as u64),
            count(self.publishers as u64),
            rate_text,
            count(self.rooms as u64),
            self.message_size,
            if self.protocol == "native" {
                String::new()
            } else {
                format!(", {} protocol", self.protocol)
            }
        );
        self.connect.write(out);
        let _ = writeln!(out, "  joined       {}", count(self.joined));
        let _ = writeln!(
            out,
            "  join storm   {} membership notices received in {:.2} s = {}/s",
            count(self.join_storm_notices),
            self.join_storm_seconds,
            count(per(self.join_storm_notices as f64, self.join_storm_seconds) as u64)
        );
        let _ = writeln!(
            out,
            "  published    {} in {:.2} s = {}/s (max lag behind schedule {:.2} ms)",
            count(self.published),
            self.publish_seconds,
            rate(self.publish_rate),
            self.publisher_max_lag_ms
        );
        let _ = writeln!(
            out,
            "  deliveries   {} received of {} expected, lost {} ({:.4}%), reordered {}, \
             foreign {}",
            count(self.received),
            count(self.expected),
            count(self.lost),
            self.loss_ratio * 100.0,
            count(self.reordered),
            count(self.foreign)
        );
        let _ = writeln!(
            out,
            "  throughput   {} deliveries/s over {:.2} s",
            rate(self.deliveries_per_second),
            self.delivery_seconds
        );
        let _ = writeln!(out, "  latency      {}", self.latency.one_line());
        let _ = writeln!(
            out,
            "  wire         {} bytes read by the clients = {} B per delivery ({} payload, {} B \
             messages)",
            count(self.wire_bytes),
            self.wire_bytes_per_delivery
                .map_or_else(|| "-".to_owned(), |b| format!("{b:.1}")),
            self.payload,
            self.message_size
        );
        let c = &self.compression;
        if c.offered {
            let _ = writeln!(
                out,
                "  compression  permessage-deflate on {} connections{}, {} messages inflated \
                 ({})",
                count(c.connections_negotiated),
                if c.negotiated { "" } else { " (NOT all)" },
                count(c.inflated_messages),
                c.extension.as_deref().unwrap_or("declined")
            );
        }
        if self.receivers_disconnected > 0 {
            let _ = writeln!(
                out,
                "  disconnected {} receivers during the run",
                count(self.receivers_disconnected)
            );
        }
        if let Some(us) = self.server_cpu_us_per_delivery {
            let _ = writeln!(out, "  server CPU   {us:.3} us per delivery");
        }
    }
}

impl ConnectionsResults {
    fn write(&self, out: &mut String) {
        self.connect.write(out);
        let target = if self.ramp_target_per_second > 0.0 {
            format!("{}/s", rate(self.ramp_target_per_second))
        } else {
            "unlimited".to_owned()
        };
        let _ = writeln!(
            out,
            "  ramp         target {target}, achieved {}/s",
            rate(self.connect.per_second)
        );
        let _ = writeln!(
            out,
            "  hold         {:.2} s: {} dropped, {} open at the end",
            self.hold_seconds,
            count(self.dropped_during_hold),
            count(self.open_at_end)
        );
        if self.server_rss_before_kib.is_some() {
            let _ = writeln!(
                out,
                "  server RSS   {} before, {} after the ramp, {} at the end{}",
                kib(self.server_rss_before_kib),
                kib(self.server_rss_after_ramp_kib),
                kib(self.server_rss_end_kib),
                self.server_rss_per_connection_bytes
                    .map_or_else(String::new, |b| format!(
                        ": {:.0} bytes ({:.2} KiB) per connection",
                        b,
                        b / 1024.0
                    ))
            );
            let _ = writeln!(
                out,
                "  server CPU   {} during the ramp ({}), {} while idle",
                opt(self.server_cpu_ramp_seconds, "s"),
                opt(self.server_cpu_us_per_connection, "us per connection"),
                opt(self.server_cpu_hold_cores, "cores")
            );
        }
    }
}

impl ChurnResults {
    fn write(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "  workers      {} for {:.2} s",
            self.workers, self.seconds
        );
        let _ = writeln!(
            out,
            "  handshakes   {} = {}/s  ({})",
            count(self.handshakes),
            rate(self.handshakes_per_second),
            self.handshake_latency.one_line()
        );
        let _ = writeln!(
            out,
            "  cycles       {} completed = {}/s, {} failed",
            count(self.cycles_completed),
            rate(self.cycles_per_second),
            count(self.cycles_failed)
        );
        let _ = writeln!(out, "  cycle time   {}", self.cycle_latency.one_line());
        if let Some(us) = self.server_cpu_us_per_cycle {
            let _ = writeln!(out, "  server CPU   {} per cycle", human_us(us));
        }
    }
}

impl ReconnectStormResults {
    fn write(&self, out: &mut String) {
        let at = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |ms| human_us(ms * 1e3));
        let _ = writeln!(
            out,
            "  setup        {} clients in {} rooms, reconnecting to {}",
            count(self.clients as u64),
            count(self.rooms as u64),
            self.reconnect_url
        );
        self.connect.write(out);
        let _ = writeln!(
            out,
            "  joined       {} ({} failed, {} dropped before the drain)",
            count(self.joined),
            count(self.join_failed),
            count(self.dropped_before_drain)
        );
        if !self.drained {
            let _ = writeln!(out, "  drain        none: no SIGTERM was sent");
            return;
        }
        let _ = writeln!(
            out,
            "  drain        SIGTERM to pid {} at t0: {} closed with 1001 (from {} to {}), {} \
             closed otherwise, {} never closed",
            self.drain_pid,
            count(self.closed_going_away),
            at(self.first_close_ms),
            at(self.last_close_ms),
            count(self.closed_otherwise),
            count(self.never_closed)
        );
        let _ = writeln!(
            out,
            "  back         {} of {} in their rooms after t0: first {}  half {}  90% {}  99% {}  \
             99.9% {}  all {}",
            count(self.back),
            count(self.in_storm),
            at(self.back_first_ms),
            at(self.back_half_ms),
            at(self.back_p90_ms),
            at(self.back_p99_ms),
            at(self.back_p999_ms),
            at(self.back_all_ms)
        );
        let _ = writeln!(
            out,
            "  per client   close to room_joined {}",
            self.reconnect_latency.one_line()
        );
        let _ = writeln!(
            out,
            "  attempts     {} ({} failed; {} clients tried more than once, the most by one: {}), \
             backoff {}-{} ms",
            count(self.reconnect_attempts),
            count(self.reconnect_failures),
            count(self.clients_retried),
            self.most_attempts,
            self.backoff_min_ms,
            self.backoff_max_ms
        );
        if self.not_back > 0 || self.dropped_after_back > 0 {
            let _ = writeln!(
                out,
                "  not back     {} by the timeout; {} dropped again after they were back",
                count(self.not_back),
                count(self.dropped_after_back)
            );
        }
        if self.server_cpu_storm_seconds.is_some() {
            let _ = writeln!(
                out,
                "  server CPU   {} in the storm's {:.2} s ({}); RSS {} before, {} after",
                opt(self.server_cpu_storm_seconds, "s"),
                self.storm_seconds,
                opt(self.server_cpu_us_per_reconnect, "us per reconnect"),
                kib(self.server_rss_before_kib),
                kib(self.server_rss_after_kib)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_get_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn saturation_is_flagged() {
        let usage = Usage {
            wall: std::time::Duration::from_secs(10),
            generator_cpu: std::time::Duration::from_millis(9_500),
            machine_busy: Some(0.5),
            server_before: None,
            server_after: None,
            server_error: None,
        };
        let mut warnings = Vec::new();
        let (g, s) = usage_reports(&usage, 1, &[], &mut warnings);
        assert!(g.saturated);
        assert!(s.is_none());
        assert_eq!(warnings, [SATURATED_WARNING]);

        let mut warnings = Vec::new();
        let (g, _) = usage_reports(&usage, 64, &[], &mut warnings);
        assert!(!g.saturated || sysinfo::cores() == 1);
    }
}
