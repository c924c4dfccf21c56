//! The live progress line on stderr (indicatif) during long phases. Hidden with `--json`,
//! `--no-progress`, or when stderr is not a terminal, so logs and pipes stay clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One progress bar for a whole run; each phase sets its own length and status text.
pub struct Progress {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        let enabled = enabled && std::io::stderr().is_terminal();
        let target = if enabled {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            bar: ProgressBar::with_draw_target(None, target),
            ticker: None,
        }
    }

    /// Starts a phase named `name` whose progress goes from 0 to `len`; `status` is polled
    /// four times a second for (position, message).
    pub fn phase<F>(&mut self, name: &str, len: u64, status: F)
    where
        F: Fn() -> (u64, String) + Send + 'static,
    {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        if self.bar.is_hidden() {
            return;
        }
        let style = ProgressStyle::with_template(
            "{prefix:>10.bold} [{elapsed_precise}] [{bar:30.cyan/blue}] {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        self.bar.set_style(style);
        self.bar.set_prefix(name.to_owned());
        self.bar.reset();
        self.bar.set_length(len);
        let bar = self.bar.clone();
        self.ticker = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let (pos, message) = status();
                bar.set_position(pos.min(bar.length().unwrap_or(u64::MAX)));
                bar.set_message(message);
            }
        }));
    }

    /// Removes the bar before the report is printed.
    pub fn finish(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
