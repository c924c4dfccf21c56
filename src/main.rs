//! The `roomcast` binary: parse the command line, set up logging, build the runtime, serve.

use clap::{Parser, Subcommand};
use roomcast::{Config, Server};
use tokio_util::sync::CancellationToken;

// The allocator the design card chose; fan-out allocates one buffer per message from many
// threads, which mimalloc's thread-local free lists serve well.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A real-time rooms / broadcast / private-message WebSocket server.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
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
    Serve(Config),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Serve(config)) => config,
        None => cli.serve,
    };
    roomcast::telemetry::init(config.log_format);
    if let Err(error) = config.validate() {
        eprintln!("roomcast: {error}");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("roomcast: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let server = match Server::bind(config, shutdown.clone()) {
            Ok(server) => server,
            Err(error) => {
                eprintln!("roomcast: cannot listen: {error}");
                return std::process::ExitCode::FAILURE;
            }
        };
        tokio::spawn(roomcast::shutdown::cancel_on_signal(shutdown));
        server.run().await;
        std::process::ExitCode::SUCCESS
    })
}
