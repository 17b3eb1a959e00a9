//! Worker liveness and partition leases: which partitions this worker consumes.
//!
//! Every `lease.renew_ms` the manager renews this worker in `rim:jobs`, expires dead workers,
//! computes the fair share `ceil(partitions / live workers)`, renews the leases it holds (a lease
//! found taken, or not confirmed for `ttl - renew_ms`, stops that partition at once), releases extra
//! partitions gracefully when workers joined, and takes free ones up to its share, starting at a
//! worker-specific offset so workers do not all race for partition 0.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Ctx;
use crate::partition;
use crate::store::StoreResult;

/// Most partitions one worker should hold when `live` workers share `partitions`.
pub fn fair_share(partitions: u16, live: u64) -> usize {
    let live = live.max(1);
    (u64::from(partitions).div_ceil(live)) as usize
}

/// Where this worker starts looking for free partitions.
pub fn start_offset(worker_id: &str, partitions: u16) -> u16 {
    rim_proto::job::partition_of(worker_id, partitions)
}

/// Partitions to give up (highest first) when holding `active` of them with a share of `share`.
pub fn surplus(active: &[u16], share: usize) -> Vec<u16> {
    let mut v = active.to_vec();
    v.sort_unstable();
    let extra = v.len().saturating_sub(share);
    v.into_iter().rev().take(extra).collect()
}

struct Held {
    stop: CancellationToken,
    lost: CancellationToken,
    task: JoinHandle<()>,
    /// When the last renewal that Redis confirmed was sent: the lease is ours until at least this
    /// plus the TTL (the time the reply arrived would overstate it).
    renewed: Instant,
    /// Being released (rebalance or shutdown): no longer counted in the share.
    releasing: bool,
}

impl Held {
    fn active(&self) -> bool {
        !self.releasing && !self.lost.is_cancelled()
    }
}

/// Runs lease management until `shutdown`, then stops every partition, keeps their leases alive
/// while they finish, and removes this worker from `rim:jobs`.
pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken, tracker: TaskTracker) {
    let mut held: BTreeMap<u16, Held> = BTreeMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u16>();
    let mut tick = tokio::time::interval(ctx.cfg.renew_every());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut draining = false;
    let fence_after = ctx.cfg.fence_after();
    loop {
        // Wake up for the earliest fencing deadline too, not only at the next tick.
        let next_fence = held
            .values()
            .filter(|h| !h.lost.is_cancelled())
            .map(|h| h.renewed + fence_after)
            .min();
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(next_fence.unwrap_or_else(Instant::now)), if next_fence.is_some() => {}
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                for h in held.values_mut() {
                    h.releasing = true;
                    h.stop.cancel();
                }
            }
            Some(_) = done_rx.recv() => {}
        }
        held.retain(|_, h| !h.task.is_finished());
        if draining && held.is_empty() {
            break;
        }
        fence(&ctx, &mut held);
        // Bounded by the earliest fencing deadline, so a hung Redis cannot hold fencing back. A
        // round cut short may have taken a lease without starting its task; that lease just
        // expires after one TTL.
        let bound = held
            .values()
            .filter(|h| !h.lost.is_cancelled())
            .map(|h| (h.renewed + fence_after).saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(fence_after)
            .max(std::time::Duration::from_millis(1));
        match tokio::time::timeout(bound, round(&ctx, &mut held, draining, &done_tx, &tracker))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                ctx.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "lease round failed; retrying at the next tick");
            }
            Err(_) => {
                ctx.metrics.redis_errors.inc();
                tracing::warn!(?bound, "lease round overdue; retrying at the next tick");
            }
        }
        fence(&ctx, &mut held);
    }
    if let Err(e) = ctx.stores.leases.leave(&ctx.worker_id).await {
        tracing::warn!(error = %e, "could not remove worker from rim:jobs; it expires by itself");
    }
}

/// Stops partitions whose lease was not confirmed for `ttl - renew_ms` (Redis unreachable or
/// slow): stopping a renewal period before the lease can expire means this worker is gone from
/// the partition before another can take it over.
fn fence(ctx: &Ctx, held: &mut BTreeMap<u16, Held>) {
    let after = ctx.cfg.fence_after();
    for (p, h) in held.iter_mut() {
        if !h.lost.is_cancelled() && h.renewed.elapsed() >= after {
            ctx.metrics.leases_lost.inc();
            tracing::warn!(
                partition = *p,
                unconfirmed_for = ?h.renewed.elapsed(),
                "lease renewal not confirmed for ttl - renew_ms; stopping partition"
            );
            h.lost.cancel();
        }
    }
}

async fn round(
    ctx: &Arc<Ctx>,
    held: &mut BTreeMap<u16, Held>,
    draining: bool,
    done_tx: &mpsc::UnboundedSender<u16>,
    tracker: &TaskTracker,
) -> StoreResult<()> {
    let leases = &ctx.stores.leases;
    let ttl_ms = ctx.cfg.lease.ttl_ms;

    // Renew every lease still held (including partitions finishing a release), all at once and
    // each on its own: on a Redis Cluster the leases live on several masters, and one master
    // failing over must fence only the partitions whose leases it holds. Each result is applied
    // as it arrives, so a round cut short by its bound keeps the renewals already confirmed.
    let mut renewals: FuturesUnordered<_> = held
        .iter()
        .filter(|(_, h)| !h.lost.is_cancelled())
        .map(|(p, _)| {
            let p = *p;
            // Taken before sending: the new expiry counts from when Redis ran the renewal,
            // which is no earlier than this.
            let sent = Instant::now();
            async move { (p, sent, leases.renew(p, &ctx.worker_id, ttl_ms).await) }
        })
        .collect();
    let mut failed = None;
    while let Some((p, sent, renewed)) = renewals.next().await {
        let Some(h) = held.get_mut(&p) else { continue };
        match renewed {
            Ok(true) => h.renewed = sent,
            Ok(false) if !h.task.is_finished() => {
                ctx.metrics.leases_lost.inc();
                tracing::warn!(
                    partition = p,
                    "lease taken over by another worker; stopping partition"
                );
                h.lost.cancel();
            }
            Ok(false) => {}
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    drop(renewals);
    let live = leases
        .heartbeat(&ctx.worker_id, rim_runtime::unix_ms(), ttl_ms)
        .await?;
    if draining {
        return failed.map_or(Ok(()), Err);
    }

    let partitions = ctx.cfg.stream.partitions;
    let share = fair_share(partitions, live);
    let active: Vec<u16> = held
        .iter()
        .filter(|(_, h)| h.active())
        .map(|(p, _)| *p)
        .collect();
    if active.len() > share {
        for p in surplus(&active, share) {
            if let Some(h) = held.get_mut(&p) {
                tracing::info!(
                    partition = p,
                    share,
                    live,
                    "releasing partition to rebalance"
                );
                h.releasing = true;
                h.stop.cancel();
            }
        }
        return failed.map_or(Ok(()), Err);
    }
    let mut count = active.len();
    let offset = start_offset(&ctx.worker_id, partitions);
    // Taking partitions must not hold back the next round's renewals: a lease whose master
    // hangs is skipped once this round's tick has passed (if its SET ran after all, that lease
    // just expires after one TTL).
    let acquire_until = Instant::now() + ctx.cfg.renew_every();
    for i in 0..partitions {
        if count >= share || Instant::now() >= acquire_until {
            break;
        }
        let p = ((u32::from(offset) + u32::from(i)) % u32::from(partitions)) as u16;
        if held.contains_key(&p) {
            continue;
        }
        let sent = Instant::now();
        let acquire = leases.acquire(p, &ctx.worker_id, ttl_ms);
        match tokio::time::timeout_at(acquire_until, acquire).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => continue,
            // This lease's master may be failing over; the others may still be free.
            Ok(Err(e)) => {
                failed.get_or_insert(e);
                continue;
            }
            Err(_) => break,
        }
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        let task = tracker.spawn(partition::run(
            ctx.clone(),
            p,
            stop.clone(),
            lost.clone(),
            done_tx.clone(),
        ));
        held.insert(
            p,
            Held {
                stop,
                lost,
                task,
                renewed: sent,
                releasing: false,
            },
        );
        count += 1;
    }
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_share_is_ceiling_of_partitions_over_live_workers() {
        assert_eq!(fair_share(16, 0), 16);
        assert_eq!(fair_share(16, 1), 16);
        assert_eq!(fair_share(16, 2), 8);
        assert_eq!(fair_share(16, 3), 6);
        assert_eq!(fair_share(16, 5), 4);
        assert_eq!(fair_share(16, 16), 1);
        assert_eq!(fair_share(16, 40), 1);
        assert_eq!(fair_share(1, 3), 1);
    }

    #[test]
    fn surplus_gives_up_the_highest_partitions() {
        assert_eq!(surplus(&[3, 1, 7, 5], 2), vec![7, 5]);
        assert!(surplus(&[1, 2], 2).is_empty());
        assert!(surplus(&[1], 4).is_empty());
    }

    #[test]
    fn offsets_are_in_range_and_spread() {
        let offsets: std::collections::BTreeSet<u16> = (0..50)
            .map(|i| start_offset(&format!("host-{i}-x"), 16))
            .collect();
        assert!(offsets.iter().all(|p| *p < 16));
        assert!(offsets.len() > 4, "{offsets:?}");
    }
}
