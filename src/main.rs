//! The `roomcast` binary: parse the command line (with the `--config` file under it), set up
//! logging, build the runtime, serve; or check a configuration file; or run one of the
//! command-line clients (`client`, `publish`) of [`roomcast::client::cli`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use roomcast::client::cli::{run_client, run_publish, ClientArgs, PublishArgs};
use roomcast::{Config, Server};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

// The allocator the design card chose; fan-out allocates one buffer per message from many
// threads, which mimalloc's thread-local free lists serve well.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A real-time rooms / broadcast / private-message WebSocket server.
#[derive(Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    // A flag given twice: the last one wins.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `roomcast` alone is `roomcast serve`.
    #[command(flatten)]
    serve: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(Box<Config>),
    /// Connect, print what arrives, send the lines typed to the room joined last (slash
    /// commands: /join, /leave, /pm, /broadcast, /meta, /quit, /help). Reconnects by itself.
    Client(ClientArgs),
    /// Join a room, send one message, exit 0 once the server has taken it (1 on failure).
    Publish(PublishArgs),
    /// Validate a configuration file (with the ROOMCAST_* environment over it) and print the
    /// effective configuration; exit 2 with the reason if it cannot be served.
    CheckConfig {
        /// The TOML file, as given to `--config`.
        file: PathBuf,
    },
}

/// The clients print messages on stdout: their logs go to stderr, warnings and up by default.
fn init_client_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    // The matches, not only the parsed `Cli`: they tell which options the `--config` file may
    // still set (those no flag or environment variable set).
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let (config, matches) = match cli.command {
        Some(Command::Serve(config)) => (
            *config,
            matches.subcommand_matches("serve").expect("serve matched"),
        ),
        None => (cli.serve, &matches),
        Some(Command::Client(args)) => {
            init_client_logging();
            return run_client(args);
        }
        Some(Command::Publish(args)) => {
            init_client_logging();
            return run_publish(args);
        }
        Some(Command::CheckConfig { file }) => return check_config(file),
    };
    let config = match roomcast::config::with_file(config, matches) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("roomcast: {error}");
            return ExitCode::from(2);
        }
    };
    roomcast::telemetry::init(config.log_format);
    raise_open_file_limit();
    if let Err(error) = config.validate() {
        eprintln!("roomcast: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("roomcast: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let server = match Server::bind(config, shutdown.clone()) {
            Ok(server) => server,
            Err(error) => {
                eprintln!("roomcast: cannot listen: {error}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(roomcast::shutdown::cancel_on_signal(shutdown));
        server.run().await;
        ExitCode::SUCCESS
    })
}

/// `roomcast check-config FILE`: everything the server would check at start-up (values,
/// combinations, the JWT key and TLS files, the webhook URL), then the effective configuration
/// as TOML.
fn check_config(file: PathBuf) -> ExitCode {
    let args = vec![
        OsString::from("roomcast"),
        OsString::from("--config"),
        file.into_os_string(),
    ];
    let config = match roomcast::config::load(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("roomcast: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = roomcast::admission::Admission::from_config(&config) {
        eprintln!("roomcast: {error}");
        return ExitCode::from(2);
    }
    if let Some(url) = &config.webhook_url {
        if let Err(error) = roomcast::api::app_client::AppClient::parse_url(url) {
            eprintln!("roomcast: --webhook-url {error}");
            return ExitCode::from(2);
        }
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        if let Err(error) = roomcast::tls::acceptor(cert, key) {
            eprintln!("roomcast: {error}");
            return ExitCode::from(2);
        }
    }
    print!("{}", config.to_toml());
    ExitCode::SUCCESS
}

/// Every connection is a file descriptor, and many environments start processes with a soft
/// limit of 1024 under a far higher hard limit (containerd gives 1024 / 524288): raise the soft
/// limit to the hard one, as far as the process may.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}
