//! Periodic removal of comets whose registration lapsed (crashed or partitioned away): their
//! node entry, room index entries and sessions. Every logic instance runs it; the per-node
//! claim in Redis makes concurrent runs harmless.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::App;

/// Runs until `shutdown`, every third of the node TTL.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let period = Duration::from_millis((app.config.node.ttl_ms / 3).max(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A failed pass (Redis down) is simply retried at the next tick.
        if let Err(e) = app.reap().await {
            tracing::warn!(error = %e, "reaper pass failed");
        }
    }
}
