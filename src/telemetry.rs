//! Logging, set up once by the binary: an `EnvFilter` from `RUST_LOG` (default `info`), as
//! human-readable lines or as one JSON object per line for log shippers.
//!
//! What is logged where: startup and shutdown at `info`; one line per connection opened and
//! closed (with the reason and the duration) at `info` under `--log-connections`, else at
//! `debug`; per-message detail only at `debug`.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines (colours when the output is a terminal and NO_COLOR is unset).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => {
            let ansi = std::env::var_os("NO_COLOR").is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stdout());
            builder.with_ansi(ansi).init();
        }
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}
