//! Delivering a batch: the room index lookups it needs, and each comet's share sent as one
//! `deliver` call, retried with backoff until the comet confirms, leaves the registry, has failed
//! for `delivery.give_up_ms`, or the task is stopped.
//!
//! Only a confirmation, a departure or a give-up lets the batch be acknowledged; a stop leaves it
//! pending for the next owner, since an unconfirmed push must not be acknowledged.

use std::collections::HashMap;
use std::time::Duration;

use rim_proto::rpc::Delivery;
use rim_runtime::backoff::Backoff;
use rim_runtime::rpc::LinkError;
use tokio_util::sync::CancellationToken;

use super::{Partition, pause, redis_backoff};
use crate::route::{self, Entry};

/// How a comet's share of a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The comet answered.
    Confirmed,
    /// The comet left the registry: its items were dropped (and counted).
    Gone,
    /// The comet kept failing for `delivery.give_up_ms`: its items were dropped (and counted).
    GaveUp,
    /// Stop was requested while retrying: the batch must not be acknowledged.
    Abandoned,
}

impl Partition {
    /// The comets in each room's routing index for the rooms of the batch, each read retried
    /// until it works or `stop` (`None`).
    pub(super) async fn room_members(
        &self,
        entries: &[Entry],
        stop: &CancellationToken,
    ) -> Option<HashMap<String, Vec<String>>> {
        let mut out = HashMap::new();
        for room in route::rooms_of(entries) {
            let mut bo = redis_backoff();
            loop {
                match self.ctx.stores.directory.room_comets(&room).await {
                    Ok(members) => {
                        out.insert(room, members);
                        break;
                    }
                    Err(e) => {
                        self.redis_failed("SMEMBERS", &e);
                        if !pause(stop, bo.next_delay()).await {
                            return None;
                        }
                    }
                }
            }
        }
        Some(out)
    }

    /// One comet's share of a batch: one `deliver` call, retried with backoff (same items, same
    /// order) until it answers, leaves the registry, has failed for `delivery.give_up_ms` without
    /// a success (a registered comet job cannot reach must not stall the partition forever), or
    /// `stop` fires.
    pub(super) async fn deliver(
        &self,
        server: String,
        items: Vec<Delivery>,
        stop: &CancellationToken,
    ) -> Outcome {
        let ctx = &self.ctx;
        let timeout = ctx.cfg.rpc_timeout();
        let give_up = ctx.cfg.give_up();
        let mut bo = Backoff::new(ctx.cfg.retry_base(), ctx.cfg.retry_max());
        let mut attempt = 0u32;
        loop {
            let Some(link) = ctx.registry.link(&server) else {
                ctx.failing_since.lock().remove(&server);
                ctx.metrics.dropped_comet_gone.add(items.len() as u64);
                tracing::warn!(
                    partition = self.partition,
                    %server,
                    items = items.len(),
                    first = ?items.first().map(|d| d.id),
                    "comet left the registry before confirming; its deliveries are dropped"
                );
                return Outcome::Gone;
            };
            if attempt > 0 {
                ctx.metrics.rpc_retries.inc();
            }
            attempt += 1;
            let started = tokio::time::Instant::now();
            // The context deadline bounds the call; this outer bound also covers connecting.
            let call = link.deliver(items.clone(), timeout);
            let result = tokio::time::timeout(timeout * 2 + Duration::from_secs(1), call).await;
            let error = match result {
                Ok(Ok(report)) => {
                    ctx.failing_since.lock().remove(&server);
                    ctx.metrics.deliveries.add(items.len() as u64);
                    ctx.metrics.add_report(&report);
                    return Outcome::Confirmed;
                }
                Ok(Err(e @ LinkError::Refused { .. })) => {
                    // Not an unreachable comet but a cluster.secret mismatch: giving up would
                    // drop every push until an operator noticed. The batch waits (and the
                    // backlog, bounded by logic's stream.max_backlog, shows it) until fixed.
                    ctx.metrics.rpc_failures.inc();
                    let delay = bo.next_delay();
                    tracing::error!(partition = self.partition, %server, attempt, ?delay, error = %e, "comet refused the cluster handshake; deliveries wait for cluster.secret to match");
                    if !pause(stop, delay).await {
                        return Outcome::Abandoned;
                    }
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "deliver call overdue".to_string(),
            };
            ctx.metrics.rpc_failures.inc();
            let failing_since = *ctx
                .failing_since
                .lock()
                .entry(server.clone())
                .or_insert(started);
            let failing_for = failing_since.elapsed();
            if failing_for >= give_up {
                ctx.metrics
                    .dropped_comet_unreachable
                    .add(items.len() as u64);
                tracing::error!(
                    partition = self.partition,
                    %server,
                    items = items.len(),
                    first = ?items.first().map(|d| d.id),
                    ?failing_for,
                    %error,
                    "comet unreachable for delivery.give_up_ms; its deliveries in this batch are dropped"
                );
                return Outcome::GaveUp;
            }
            let delay = bo.next_delay();
            tracing::warn!(partition = self.partition, %server, attempt, ?delay, %error, "deliver failed; will retry");
            if !pause(stop, delay).await {
                return Outcome::Abandoned;
            }
        }
    }
}
