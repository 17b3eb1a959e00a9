//! One shutdown design for every tier: SIGINT/SIGTERM cancel a [`CancellationToken`]; tasks
//! watch it, finish in-flight work and return; the tier waits on its `TaskTracker` under a grace
//! timeout ([`drain`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, draining");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Closes the tracker and waits for its tasks, at most `grace`. Returns whether all finished.
pub async fn drain(tracker: &TaskTracker, grace: Duration, tier: &str) -> bool {
    tracker.close();
    match tokio::time::timeout(grace, tracker.wait()).await {
        Ok(()) => {
            tracing::info!(tier, "drained");
            true
        }
        Err(_) => {
            tracing::warn!(
                tier,
                remaining = tracker.len(),
                ?grace,
                "grace period over, exiting with tasks still running"
            );
            false
        }
    }
}
