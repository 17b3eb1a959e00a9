//! How a partition task ends, and what it may still do to the lease then.
//!
//! Fencing: a task whose lease was lost (taken over, or not confirmed for `ttl - renew_ms`, see
//! `lease.rs`) is dropped mid-step by `run`'s `select!`, so no acknowledgement is sent after the
//! loss was noticed, and it does not touch the lease, which may be someone else's by now. Only a
//! task that stopped on request (shutdown or rebalancing) with its batch finished releases the
//! lease, through the store's compare-and-delete, so a release can never free another worker's
//! lease.

use super::{Partition, redis_backoff};

impl Partition {
    /// Ends the task: releases the lease if it `finished` on request, only logs if it was lost;
    /// either way it stops counting as held.
    pub(super) async fn finish(&self, finished: bool) {
        if finished {
            self.release().await;
            tracing::info!(partition = self.partition, "partition released");
        } else {
            tracing::warn!(
                partition = self.partition,
                "partition lease lost; stopped without acknowledging further entries"
            );
        }
        self.ctx.metrics.partitions_held.dec();
        self.ctx.metrics.backlog.lock().remove(&self.partition);
    }

    /// Deletes the lease if it is still ours. A failure is only logged: the TTL frees it anyway.
    async fn release(&self) {
        let mut bo = redis_backoff();
        for _ in 0..3 {
            match self
                .ctx
                .stores
                .leases
                .release(self.partition, &self.ctx.worker_id)
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    self.redis_failed("lease release", &e);
                    tokio::time::sleep(bo.next_delay()).await;
                }
            }
        }
    }
}
