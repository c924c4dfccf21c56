//! Reading processes and the machine: the server's CPU time and RSS from `/proc/PID`, the
//! generator's own CPU from `getrusage`, whole-machine busy time from `/proc/stat`, and the
//! open-file limit. Parsing is separated from reading so it is unit-tested on fixed text.

use std::io;
use std::time::{Duration, Instant};

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// utime + stime.
    pub cpu: Duration,
    /// VmRSS in KiB.
    pub rss_kib: u64,
    /// Threads.
    pub threads: u64,
}

/// Kernel clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of `/proc/PID/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// utime and stime (ticks) from the text of `/proc/PID/stat`. The command name in field 2 may
/// hold spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the name: state(3) ppid(4) ... utime(14) stime(15); index 0 here is field 3.
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime = fields.next()?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// VmRSS (KiB) and Threads from the text of `/proc/PID/status`.
pub fn parse_status(status: &str) -> Option<(u64, u64)> {
    let mut rss = None;
    let mut threads = None;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            rss = rest.split_whitespace().next()?.parse().ok();
        } else if let Some(rest) = line.strip_prefix("Threads:") {
            threads = rest.split_whitespace().next()?.parse().ok();
        }
    }
    Some((rss?, threads.unwrap_or(0)))
}

/// The soft "Max open files" of `/proc/PID/limits`; `None` when unlimited or absent.
pub fn parse_limits_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// [`sample_process`] of each of `pids`, summed (CPU, RSS and threads of a cluster's nodes).
pub fn sample_processes(pids: &[u32]) -> io::Result<ProcSample> {
    let mut sum = ProcSample {
        cpu: Duration::ZERO,
        rss_kib: 0,
        threads: 0,
    };
    for &pid in pids {
        let sample = sample_process(pid)?;
        sum.cpu += sample.cpu;
        sum.rss_kib += sample.rss_kib;
        sum.threads += sample.threads;
    }
    Ok(sum)
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`.
pub fn sample_process(pid: u32) -> io::Result<ProcSample> {
    let bad = |what| io::Error::new(io::ErrorKind::InvalidData, what);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (utime, stime) = parse_stat_ticks(&stat).ok_or_else(|| bad("unreadable /proc/PID/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let (rss_kib, threads) =
        parse_status(&status).ok_or_else(|| bad("no VmRSS in /proc/PID/status"))?;
    let ticks = clock_ticks_per_second();
    let total = utime + stime;
    Ok(ProcSample {
        cpu: Duration::from_secs(total / ticks)
            + Duration::from_nanos((total % ticks) * 1_000_000_000 / ticks),
        rss_kib,
        threads,
    })
}

/// The soft open-file limit of another process, when readable.
pub fn process_nofile_limit(pid: u32) -> Option<u64> {
    parse_limits_nofile(&std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?)
}

/// CPU time (user + system) this process has used.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// (busy, total) jiffies of all CPUs from the first line of `/proc/stat`; idle and iowait are
/// not busy.
pub fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .take(8) // user nice system idle iowait irq softirq steal
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = values.iter().sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn machine_jiffies() -> Option<(u64, u64)> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Cores usable by this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The open-file limit after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and, when `wanted` is above the hard limit,
/// tries to raise the hard limit too (which only privileged processes may do).
pub fn raise_nofile_limit(wanted: u64) -> NofileLimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return NofileLimit {
                soft: 1024,
                hard: 1024,
            };
        }
        if wanted > limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: wanted as libc::rlim_t,
                rlim_max: wanted as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    NofileLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    }
}

/// A measured phase: wall time, the generator's CPU, the machine's CPU, and the server's CPU and
/// RSS between [`Meter::start`] and [`Meter::stop`].
pub struct Meter {
    started: Instant,
    self_cpu: Duration,
    machine: Option<(u64, u64)>,
    server_pids: Vec<u32>,
    server: Option<ProcSample>,
}

/// What a [`Meter`] measured.
#[derive(Debug, Clone)]
pub struct Usage {
    pub wall: Duration,
    pub generator_cpu: Duration,
    /// Fraction of all the machine's CPUs busy, 0..1.
    pub machine_busy: Option<f64>,
    pub server_before: Option<ProcSample>,
    pub server_after: Option<ProcSample>,
    /// Why the server could not be sampled.
    pub server_error: Option<String>,
}

impl Usage {
    pub fn server_cpu(&self) -> Option<Duration> {
        Some(
            self.server_after?
                .cpu
                .saturating_sub(self.server_before?.cpu),
        )
    }
}

impl Meter {
    pub fn start(server_pids: &[u32]) -> Self {
        Self {
            started: Instant::now(),
            self_cpu: self_cpu(),
            machine: machine_jiffies(),
            server_pids: server_pids.to_vec(),
            server: (!server_pids.is_empty())
                .then(|| sample_processes(server_pids).ok())
                .flatten(),
        }
    }

    pub fn stop(&self) -> Usage {
        let wall = self.started.elapsed();
        let generator_cpu = self_cpu().saturating_sub(self.self_cpu);
        let machine_busy = match (self.machine, machine_jiffies()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        };
        let (server_after, server_error) = match self.server_pids.as_slice() {
            [] => (None, None),
            pids => match sample_processes(pids) {
                Ok(sample) => (Some(sample), None),
                Err(error) => (
                    None,
                    Some(format!("cannot read /proc of {pids:?}: {error}")),
                ),
            },
        };
        let server_error = server_error.or_else(|| {
            (!self.server_pids.is_empty() && self.server.is_none())
                .then(|| "the server process could not be read at the start".to_owned())
        });
        Usage {
            wall,
            generator_cpu,
            machine_busy,
            server_before: self.server,
            server_after,
            server_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (road (run) x) S 1 4242 4242 0 -1 4194560 1523 0 0 0 \
                    731 254 0 0 20 0 3 0 12345 123456789 2345 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some((731, 254)));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn status_gives_rss_and_threads() {
        let status = "Name:\troomcast\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_status(status), Some((12345, 3)));
        assert_eq!(parse_status("Name:\tkthread\n"), None);
    }

    #[test]
    fn limits_and_proc_stat_parse() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_limits_nofile(limits), Some(20000));
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_proc_stat(stat), Some((150, 1000)));
    }

    #[test]
    fn own_process_can_be_sampled() {
        let sample = sample_process(std::process::id()).unwrap();
        assert!(sample.rss_kib > 0);
        assert!(sample.threads >= 1);
    }
}
