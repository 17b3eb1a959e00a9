//! This node's registration with logic: the periodic renewal (addresses, load, room counts, and
//! the cluster-wide room counts learnt back for heartbeat replies) and the unregistration at
//! shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rim_proto::rpc::OnlineReport;

use crate::ctx::Ctx;
use crate::logic::LogicCallError;

/// One renewal. Failures are logged; the next tick retries and sessions keep working meanwhile.
pub(crate) async fn renew_once(ctx: &Ctx) {
    // Rooms being announced are in the snapshot, and joiners that overlap this renewal are
    // released when `_done` drops (see `room`).
    let (snap, _done) = ctx.rooms.begin_renewal(&ctx.buckets);
    let mut node = ctx.node.clone();
    node.connections = snap.sessions;
    node.ips = snap.ips;
    let report = OnlineReport {
        rooms: snap.rooms.into_iter().collect(),
    };
    match ctx.logic.renew_node(node, report).await {
        Ok(counts) => {
            ctx.rooms.set_cluster(counts.rooms);
            ctx.metrics.renewals.inc();
            ctx.logic_ok.store(true, Ordering::Release);
            if !ctx.registered.swap(true, Ordering::AcqRel) {
                tracing::info!(server = %ctx.cfg.server_id, "registered with logic");
            }
        }
        Err(LogicCallError::Refused(e)) => {
            ctx.metrics.renew_failures.inc();
            ctx.logic_ok.store(false, Ordering::Release);
            tracing::warn!(error = %e, "renew_node refused");
        }
        Err(LogicCallError::Unreachable(e)) => {
            ctx.metrics.renew_failures.inc();
            ctx.logic_ok.store(false, Ordering::Release);
            tracing::warn!(error = %e, "renew_node failed, retrying next tick");
        }
    }
}

/// Renews every `renew.interval_ms` until shutdown.
pub(crate) async fn run(ctx: Arc<Ctx>) {
    let period = Duration::from_millis(ctx.cfg.renew.interval_ms);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = renew_once(&ctx) => {}
        }
    }
}

/// Removes this node's registration at logic (the end of a drain), so job stops routing to it
/// at once instead of after the registration's TTL.
pub(crate) async fn unregister(ctx: &Ctx) {
    match ctx.logic.unregister_node(ctx.cfg.server_id.clone()).await {
        Ok(()) => tracing::info!("unregistered from logic"),
        Err(LogicCallError::Refused(e)) => tracing::warn!(error = %e, "unregister_node refused"),
        Err(LogicCallError::Unreachable(e)) => {
            tracing::warn!(error = %e, "unregister_node failed")
        }
    }
}
