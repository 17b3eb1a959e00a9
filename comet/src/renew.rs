//! Periodic node renewal: registers this comet with logic (addresses, load, room counts) and
//! learns cluster-wide room counts for heartbeat replies.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rim_proto::rpc::OnlineReport;

use crate::server::Ctx;

/// One renewal. Failures are logged; the next tick retries and sessions keep working meanwhile.
pub(crate) async fn renew_once(ctx: &Ctx) {
    // The presence lock keeps a first join (and its room_joined) from falling between our
    // snapshot and logic replacing the room list with it.
    let _presence = ctx.rooms.presence.lock().await;
    let (rooms, sessions, ips) = ctx.buckets.snapshot();
    let mut node = ctx.node.clone();
    node.connections = sessions;
    node.ips = ips;
    let report = OnlineReport {
        rooms: rooms.into_iter().collect(),
    };
    let timeout = ctx.cfg.rpc_timeout();
    let r = ctx
        .logic
        .call(|c| async move {
            c.renew_node(rim_runtime::rpc::context(timeout), node, report)
                .await
        })
        .await;
    match r {
        Ok(Ok(counts)) => {
            ctx.rooms.set_cluster(counts.rooms);
            ctx.metrics.renewals.inc();
            ctx.logic_ok.store(true, Ordering::Release);
            if !ctx.registered.swap(true, Ordering::AcqRel) {
                tracing::info!(server = %ctx.cfg.server_id, "registered with logic");
            }
        }
        Ok(Err(e)) => {
            ctx.metrics.renew_failures.inc();
            ctx.logic_ok.store(false, Ordering::Release);
            tracing::warn!(error = %e, "renew_node refused");
        }
        Err(e) => {
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
