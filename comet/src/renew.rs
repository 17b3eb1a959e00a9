//! Periodic node renewal: registers this comet with logic (addresses, load, room counts) and
//! learns cluster-wide room counts for heartbeat replies.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rim_proto::rpc::OnlineReport;

use crate::server::Ctx;

/// One renewal. Failures are logged; the next tick retries and sessions keep working meanwhile.
pub(crate) async fn renew_once(ctx: &Ctx) {
    // Snapshot under the presence lock (never held across the RPC, see `room`): rooms being
    // announced right now are included, counted as at least one member (logic drops rooms
    // reported with 0), so this report cannot erase them.
    let (rooms, sessions, ips, epoch) = {
        let mut p = ctx.rooms.presence();
        let (mut rooms, sessions, ips) = ctx.buckets.snapshot();
        for room in p.joining.keys() {
            let n = rooms.entry(room.clone()).or_insert(0);
            *n = (*n).max(1);
        }
        p.epoch += 1;
        p.renewing = true;
        (rooms, sessions, ips, p.epoch)
    };
    // Whatever happens to this call (answer, error, cancelled at shutdown), joiners waiting for
    // it are released.
    let _done = RenewalDone { ctx, epoch };
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

/// Marks a renewal finished when dropped.
struct RenewalDone<'a> {
    ctx: &'a Ctx,
    epoch: u64,
}

impl Drop for RenewalDone<'_> {
    fn drop(&mut self) {
        self.ctx.rooms.renewal_done(self.epoch);
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
