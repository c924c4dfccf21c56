//! `roomcast-loadtest`: a load generator for roomcast and any server speaking its WebSocket
//! rooms protocol (`fanout`, `connections`, `churn` and `reconnect-storm` scenarios).
//!
//! This file owns start-up and shut-down: parse the command line, check limits (open files,
//! ephemeral ports, source addresses) before any traffic, build the runtime with `--threads`,
//! run the scenario with Ctrl-C handling, and print the report. Everything else lives in a
//! module per concern:
//! - [`cli`]: the options and their defaults;
//! - [`client`]: sockets, TLS, the WebSocket upgrade, frames, timeouts, error causes;
//! - [`message`]: protocol JSON in and out, and the latency stamp;
//! - [`pusher`]: the Pusher Channels frames and signing of `--protocol pusher`;
//! - [`scenarios`]: `fanout`, `connections`, `churn`, `reconnect-storm`;
//! - [`stats`] and [`report`]: histograms, counters, errors, and the printed/JSON report;
//! - [`sysinfo`]: `/proc` sampling of the server, `getrusage` of the generator, rlimits;
//! - [`clock`] and [`progress`]: the shared monotonic clock and the progress bar.

mod cli;
mod client;
mod clock;
mod message;
mod progress;
mod pusher;
mod report;
mod scenarios;
mod stats;
mod sysinfo;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use tokio_util::sync::CancellationToken;

use cli::{Cli, Protocol, Scenario};
use client::source_ip::SourceIps;
use client::target::{Target, TargetError};
use client::tls::TlsSetupError;
use client::Connector;
use report::{usage_reports, Report, Results};
use scenarios::fanout::FanoutError;
use scenarios::reconnect_storm::ReconnectStormError;
use scenarios::Env;

/// File descriptors kept for everything that is not a client socket (stdio, epoll, the
/// runtime's pipes, /proc reads...).
const FD_RESERVE: u64 = 64;

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error(transparent)]
    Fanout(#[from] FanoutError),
    #[error(transparent)]
    ReconnectStorm(#[from] ReconnectStormError),
    #[error(
        "{scenario} needs {connections} connections, but this process may open at most {soft} \
         files (RLIMIT_NOFILE soft {soft}, hard {hard}; the hard limit could not be raised). \
         At most {fit} connections fit in one generator process: lower the count, run several \
         generator processes, or raise the hard limit (ulimit -Hn, limits.conf, systemd \
         LimitNOFILE)"
    )]
    FdLimit {
        scenario: &'static str,
        connections: usize,
        soft: u64,
        hard: u64,
        fit: u64,
    },
    #[error("--threads must be at least 1")]
    NoThreads,
    #[error("--protocol pusher needs --pusher-app ID:KEY:SECRET (the value roomcast runs with)")]
    NoPusherApp,
    #[error("--pusher-app is only used with --protocol pusher")]
    PusherAppWithoutPusher,
    #[error("--protocol pusher: {0}")]
    NotOnPusher(&'static str),
    #[error("source address {addr} cannot be bound: {error} (is it configured on this machine?)")]
    SourceAddress {
        addr: std::net::IpAddr,
        error: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    clock::epoch();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("roomcast-loadtest: {error}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, SetupError> {
    let Cli { common, scenario } = cli;
    let mut warnings = Vec::new();
    let pusher_app = match (common.protocol, &common.pusher_app) {
        (Protocol::Native, None) => None,
        (Protocol::Native, Some(_)) => return Err(SetupError::PusherAppWithoutPusher),
        (Protocol::Pusher, None) => return Err(SetupError::NoPusherApp),
        (Protocol::Pusher, Some(app)) => Some(app.clone()),
    };
    if pusher_app.is_some() {
        if common.token.is_some() {
            return Err(SetupError::NotOnPusher(
                "--token is for the native protocol (Pusher clients sign their subscriptions)",
            ));
        }
        match &scenario {
            Scenario::Churn(_) => {
                return Err(SetupError::NotOnPusher(
                    "churn speaks the native protocol only (use fanout or connections)",
                ))
            }
            Scenario::ReconnectStorm(_) => {
                return Err(SetupError::NotOnPusher(
                    "reconnect-storm speaks the native protocol only",
                ))
            }
            Scenario::Fanout(f) if f.since => {
                return Err(SetupError::NotOnPusher("--since is a native join option"))
            }
            _ => {}
        }
    }

    let connections = scenario.max_connections();
    let wanted = connections as u64 + FD_RESERVE;
    let limit = sysinfo::raise_nofile_limit(wanted);
    if wanted > limit.soft {
        return Err(SetupError::FdLimit {
            scenario: scenario.name(),
            connections,
            soft: limit.soft,
            hard: limit.hard,
            fit: limit.soft.saturating_sub(FD_RESERVE),
        });
    }
    if let Some(ips) = &common.source_ips {
        check_source_ips(ips)?;
    }
    let want_ipv4 = common.source_ips.as_ref().map(SourceIps::is_ipv4);
    let mut targets = common
        .urls
        .iter()
        .map(|url| Target::resolve(url, common.token.as_deref(), want_ipv4))
        .collect::<Result<Vec<_>, _>>()?;
    // The reconnect storm's server B, resolved as the --url is (None: B is the --url), and its
    // drained server checked, before any traffic.
    let reconnect_target = match &scenario {
        Scenario::ReconnectStorm(args) => {
            scenarios::reconnect_storm::check(args, &common)?;
            args.reconnect_url
                .as_deref()
                .map(|url| Target::resolve(url, common.token.as_deref(), want_ipv4))
                .transpose()?
        }
        _ => None,
    };
    if let Some(app) = &pusher_app {
        // Pusher's endpoint is fixed: `/app/KEY?protocol=7` on each URL's host and port.
        for target in &mut targets {
            target.path_and_query = app.path();
        }
    }
    let tls = if targets.iter().chain(&reconnect_target).any(|t| t.tls) {
        Some(client::tls::client_config(
            common.insecure,
            common.ca_cert.as_deref(),
        )?)
    } else {
        None
    };
    if let Some(warning) = port_capacity_warning(&targets, common.source_ips.as_ref(), connections)
    {
        warnings.push(warning);
    }
    let threads = common.threads.unwrap_or_else(sysinfo::cores);
    if threads == 0 {
        return Err(SetupError::NoThreads);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(SetupError::Runtime)?;

    runtime.block_on(async move {
        let interrupt = CancellationToken::new();
        tokio::spawn(watch_ctrl_c(interrupt.clone()));
        let target_urls = targets.iter().map(|t| t.url.clone()).collect();
        let connector = Arc::new(Connector::new(
            targets,
            tls,
            common.source_ips.clone(),
            common.origin.clone(),
            common.connect_timeout,
            pusher_app,
            common.compression,
        ));
        let started_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut env = Env {
            connector,
            interrupt: interrupt.clone(),
            progress: progress::Progress::new(!common.json && !common.no_progress),
            errors: Arc::default(),
            run_id: format!(
                "{:x}{:06x}",
                std::process::id(),
                started_unix_ms & 0xff_ffff
            ),
            common: common.clone(),
        };
        let name = scenario.name();
        let outcome = match scenario {
            Scenario::Fanout(args) => scenarios::fanout::run(&mut env, args).await?,
            Scenario::Connections(args) => scenarios::connections::run(&mut env, args).await,
            Scenario::Churn(args) => scenarios::churn::run(&mut env, args).await,
            Scenario::ReconnectStorm(args) => {
                scenarios::reconnect_storm::run(&mut env, args, reconnect_target).await
            }
        };
        env.progress.finish();
        warnings.extend(outcome.warnings);
        if common.compression {
            let declined = env.connector.wire().declined();
            if declined > 0 {
                warnings.push(format!(
                    "WARNING: --compression: {declined} connections failed because the server \
                     declined permessage-deflate; nothing was measured over them"
                ));
            }
        }
        let (generator, server) =
            usage_reports(&outcome.usage, threads, &common.server_pid, &mut warnings);
        let established = match &outcome.results {
            Results::Fanout(r) => r.connect.established,
            Results::Connections(r) => r.connect.established,
            Results::Churn(r) => r.handshakes,
            Results::ReconnectStorm(r) => r.connect.established,
        };
        let report = Report {
            scenario: name,
            version: env!("CARGO_PKG_VERSION"),
            targets: target_urls,
            started_unix_ms,
            interrupted: interrupt.is_cancelled(),
            generator,
            server,
            machine_cpu_busy: outcome.usage.machine_busy.map(report::round2),
            results: outcome.results,
            errors: env.errors.snapshot(),
            warnings,
        };
        if common.json {
            match serde_json::to_string_pretty(&report) {
                Ok(json) => println!("{json}"),
                Err(error) => eprintln!("roomcast-loadtest: cannot encode the report: {error}"),
            }
        } else {
            print!("{}", report.human());
        }
        // A run in which no connection could be made at all is a failure for scripts.
        Ok(if established == 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

/// First Ctrl-C: finish early and still report. Second: exit at once.
async fn watch_ctrl_c(interrupt: CancellationToken) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    eprintln!("\nroomcast-loadtest: interrupted, finishing (Ctrl-C again to quit at once)");
    interrupt.cancel();
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}

/// Every source address must be bindable, or every connection through it would fail.
fn check_source_ips(ips: &SourceIps) -> Result<(), SetupError> {
    for &addr in ips.addrs() {
        TcpListener::bind(SocketAddr::new(addr, 0))
            .map_err(|error| SetupError::SourceAddress { addr, error })?;
    }
    Ok(())
}

/// Warns when the connections cannot all get an ephemeral port: Linux hands out
/// `ip_local_port_range` ports per (source address, destination address and port).
fn port_capacity_warning(
    targets: &[Target],
    source_ips: Option<&SourceIps>,
    connections: usize,
) -> Option<String> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = range.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (low, high) = (bounds.next()??, bounds.next()??);
    let per_pair = high.checked_sub(low)? + 1;
    let destinations = targets.iter().map(|t| t.addr).collect::<HashSet<_>>().len() as u64;
    let sources = source_ips.map_or(1, |s| s.addrs().len() as u64);
    let capacity = per_pair * sources * destinations;
    (connections as u64 > capacity).then(|| {
        format!(
            "{connections} connections but only about {capacity} ephemeral ports \
             ({per_pair} per source address and destination): add --source-ips \
             (e.g. 127.0.0.1-127.0.0.20 for a loopback target)"
        )
    })
}
