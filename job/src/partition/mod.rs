//! One partition's consumer: replays the group's pending entries, then reads new ones, delivers
//! each batch to its comets and acknowledges it once every comet confirmed (or was given up).
//!
//! A task runs only while this worker holds the partition's lease, so it is the partition's only
//! reader and batches are delivered strictly in stream order.
//!
//! A read can succeed on Redis while its reply is lost (timeout, reset, restart between execution
//! and reply): its entries are then pending for this worker without it knowing them. So:
//! * any read error sends the task back to the replay phase (pending entries first, in ID order,
//!   before reading `>` again), and so does finding entries still pending after a batch was
//!   acknowledged, or (checked every `stream.pending_check_ms` while idle) stale ones;
//! * trimming never goes past the oldest pending entry, so unacknowledged entries survive until
//!   replayed; `XAUTOCLAIM` reporting deleted ones is counted (`dropped_total{reason="trimmed"}`).
//!
//! Three ways out:
//! * `lost` (lease taken over or not renewable): the task is dropped at once, acknowledging
//!   nothing more; the new owner replays whatever is pending.
//! * `stop` (shutdown or rebalancing): the current batch is finished (retries to failing comets
//!   are abandoned, leaving those entries pending for the next owner), then the lease is released.
//! * Redis errors never end it: they are logged, counted and retried with backoff.
//!
//! By concern: [`read`] (the replay / read / stale-check loop and decoding), [`deliver`] (room
//! lookups and the per-comet delivery with retries and give-up), [`release`] (how the task ends:
//! fenced or released). This file runs the task and holds the batch pipeline: route, deliver,
//! acknowledge.

mod deliver;
mod read;
mod release;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_leases;
#[cfg(test)]
mod tests_read;
#[cfg(test)]
mod tests_rebalance;
#[cfg(test)]
mod tests_registry;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rim_proto::rpc::PushId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use crate::route;
use crate::store::{PartitionStream, StoreError, StreamEntry};
use deliver::Outcome;
use rim_runtime::backoff::Backoff;

/// Redis retry delays: short first, so a blip costs little; capped, so a long outage is polled gently.
fn redis_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
}

/// Sleeps `delay` unless `stop` fires first; returns whether to carry on.
async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Runs the partition until `stop` (then releases the lease) or `lost` (then just ends).
/// Sends `partition` on `done` when finished so the lease manager can reap it promptly.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    partition: u16,
    stop: CancellationToken,
    lost: CancellationToken,
    done: mpsc::UnboundedSender<u16>,
) {
    ctx.metrics.partitions_held.inc();
    tracing::info!(partition, worker = %ctx.worker_id, "partition acquired");
    let mut task = Partition {
        stream: ctx.stores.streams.open(partition, &ctx.worker_id),
        ctx: ctx.clone(),
        partition,
        replay: true,
        stray_pending: false,
    };
    let finished = tokio::select! {
        biased;
        _ = lost.cancelled() => false,
        _ = task.consume(&stop) => true,
    };
    task.finish(finished).await;
    let _ = done.send(partition);
}

struct Partition {
    ctx: Arc<Ctx>,
    partition: u16,
    /// This partition's stream, read as this worker.
    stream: Box<dyn PartitionStream>,
    /// Pending entries must be replayed before reading `>` again: set at start and whenever a
    /// read may have run on Redis without its reply reaching us.
    replay: bool,
    /// The last acknowledgement found entries still pending although no batch is in flight.
    stray_pending: bool,
}

impl Partition {
    fn redis_failed(&self, what: &str, e: &StoreError) {
        self.ctx.metrics.redis_errors.inc();
        tracing::warn!(partition = self.partition, command = what, error = %e, "redis command failed; retrying");
    }

    /// Delivers one batch and acknowledges it. Returns false when stopped before the batch
    /// could be confirmed (nothing acknowledged, the caller must end). `linger` allows reading on
    /// for room batching; replayed batches must not, since newer entries must wait until every
    /// pending one is delivered.
    async fn process(
        &mut self,
        raw: Vec<StreamEntry>,
        linger: bool,
        stop: &CancellationToken,
    ) -> bool {
        self.ctx.metrics.entries.add(raw.len() as u64);
        let mut ids: Vec<String> = raw.iter().map(|e| e.id.clone()).collect();
        let mut entries = self.decode(raw);
        if linger {
            self.linger_for_rooms(&mut ids, &mut entries, stop).await;
        }
        let metrics = &self.ctx.metrics;

        let Some(rooms) = self.room_members(&entries, stop).await else {
            return false;
        };
        // A comet named by a push or listed in a room's index but unknown to the cache may have
        // registered a moment ago: look again before treating it as gone.
        // A view that could not be refreshed never calls a comet gone: a Redis outage must not
        // turn into dropped pushes, so the batch waits for a fresh read.
        let mut named = route::named_servers(&entries);
        named.extend(rooms.values().flatten().cloned());
        if named.iter().any(|s| self.ctx.registry.link(s).is_none()) {
            let missed_at = tokio::time::Instant::now();
            let mut bo = redis_backoff();
            while let Err(e) = self.ctx.registry.refresh_since(missed_at).await {
                self.redis_failed("registry refresh", &e);
                if !pause(stop, bo.next_delay()).await {
                    return false;
                }
            }
        }
        let live = self.ctx.registry.live();
        let plan = route::plan(&entries, &live, &rooms);
        for d in &plan.dropped {
            metrics.dropped_comet_gone.inc();
            if d.addressed {
                tracing::warn!(partition = self.partition, msg_id = %d.msg_id, server = %d.server, "comet not live; push to it dropped");
            } else {
                tracing::debug!(partition = self.partition, msg_id = %d.msg_id, server = %d.server, "room member comet not live; skipped");
            }
        }
        let outcomes = join_all(
            plan.per_comet
                .into_iter()
                .map(|(server, items)| self.deliver(server, items, stop)),
        )
        .await;
        if outcomes.contains(&Outcome::Abandoned) {
            tracing::info!(
                partition = self.partition,
                entries = ids.len(),
                "stopping mid-batch; unconfirmed entries stay pending"
            );
            return false;
        }
        self.ack(&ids, stop).await
    }

    /// Acknowledges the batch and trims the stream below the next entry and below the oldest
    /// entry still pending, atomically ([`PartitionStream::ack_trim`]). Notes in `stray_pending`
    /// whether entries are still pending afterwards. Returns false if stopped before it
    /// succeeded (the entries are then redelivered by the next owner; comets drop the
    /// duplicates).
    async fn ack(&mut self, ids: &[String], stop: &CancellationToken) -> bool {
        // This task works in ID order, so every entry below the one after this batch was read;
        // those still pending bound the trim instead. An exact bound (not Redis' approximate
        // `~`) keeps the stream's length equal to the backlog.
        let trim_below = ids
            .last()
            .and_then(|id| PushId::from_stream_id(self.partition, id))
            .map(|last| format!("{}-{}", last.ms, last.seq.saturating_add(1)));
        let mut bo = redis_backoff();
        loop {
            match self.stream.ack_trim(ids, trim_below.as_deref()).await {
                Ok(left) => {
                    self.ctx.metrics.acked.add(ids.len() as u64);
                    self.ctx.metrics.batches.inc();
                    self.ctx
                        .metrics
                        .backlog
                        .lock()
                        .insert(self.partition, left.len);
                    self.stray_pending = left.pending > 0;
                    if self.stray_pending {
                        tracing::debug!(
                            partition = self.partition,
                            pending = left.pending,
                            oldest = ?left.oldest_pending,
                            "entries still pending after ack"
                        );
                    }
                    return true;
                }
                Err(e) => {
                    self.redis_failed("XACK", &e);
                    if !pause(stop, bo.next_delay()).await {
                        return false;
                    }
                }
            }
        }
    }
}
