//! The stop signal: Ctrl-C or SIGTERM cancels one token that every task watches.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `token` on the first Ctrl-C (SIGINT) or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => info!("Ctrl-C received"),
        _ = terminate => info!("SIGTERM received"),
    }
    token.cancel();
}
