//! Periodic removal of comets whose registration lapsed (crashed or partitioned away): their
//! node entry, room index entries and sessions. Every logic instance runs it; the per-node
//! claim in Redis makes concurrent runs harmless.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::App;

/// Runs until `shutdown`, every third of the node TTL, the first pass one node TTL after start.
///
/// The wait is what keeps a logic that comes back after an outage longer than the TTL (every
/// registration looks lapsed then) from reaping live comets: they renew every few seconds and
/// so have renewed with this logic (or another) before its first pass.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let ttl = Duration::from_millis(app.config.node.ttl_ms);
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(ttl) => {}
    }
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
