//! Reading a partition: the loop that replays pending entries before reading new ones, the idle
//! check for stale pending entries, reading on for room batches, and decoding entries.
//!
//! Order is the point: whatever is pending (a dead owner's batch, or entries our own read took
//! without its reply arriving) goes out before anything newer, so per-user and per-room order
//! survive takeovers and lost replies.

use rim_proto::job::PushJob;
use rim_proto::rpc::PushId;
use tokio_util::sync::CancellationToken;

use super::{Partition, pause, redis_backoff};
use crate::route::{self, Entry};
use crate::store::{StoreResult, StreamEntry};

impl Partition {
    pub(super) async fn consume(&mut self, stop: &CancellationToken) {
        let mut bo = redis_backoff();
        let mut group_ok = false;
        let check_every = self.ctx.cfg.pending_check();
        let mut next_check = tokio::time::Instant::now() + check_every;
        // `self.replay` starts true: a dead owner's or our own unconfirmed entries go first, in
        // ID order, so order survives takeover.
        loop {
            if stop.is_cancelled() {
                return;
            }
            if !group_ok {
                if let Err(e) = self.stream.ensure_group().await {
                    self.redis_failed("XGROUP CREATE", &e);
                    if !pause(stop, bo.next_delay()).await {
                        return;
                    }
                    continue;
                }
                group_ok = true;
            }
            if self.replay {
                match self.replay_pending(stop).await {
                    Ok(true) => {
                        bo.reset();
                        self.replay = false;
                        next_check = tokio::time::Instant::now() + check_every;
                    }
                    Ok(false) => return,
                    Err(e) => {
                        self.redis_failed("XAUTOCLAIM", &e);
                        group_ok = false;
                        if !pause(stop, bo.next_delay()).await {
                            return;
                        }
                    }
                }
                continue;
            }
            if tokio::time::Instant::now() >= next_check {
                next_check = tokio::time::Instant::now() + check_every;
                // A lost read reply normally surfaces as an error; this catches one that did not.
                // Pending longer than the RPC timeout while no batch is in flight: read by us
                // without the reply reaching us.
                match self
                    .stream
                    .has_stale_pending(self.ctx.cfg.rpc_timeout())
                    .await
                {
                    Ok(true) => {
                        tracing::warn!(
                            partition = self.partition,
                            "found stale pending entries this worker is not delivering; replaying them first"
                        );
                        self.replay = true;
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => self.redis_failed("XPENDING", &e),
                }
            }
            let (count, block) = (self.ctx.cfg.stream.batch_max, self.ctx.cfg.block());
            let read = tokio::select! {
                // Entries this read was delivering stay pending for the next owner.
                _ = stop.cancelled() => return,
                r = self.stream.read_new(count, block) => r,
            };
            match read {
                Ok(entries) => {
                    bo.reset();
                    if entries.is_empty() {
                        continue;
                    }
                    if !self.process(entries, true, stop).await {
                        return;
                    }
                    if self.stray_pending && !self.replay {
                        // Nothing is in flight, so these were read without us seeing the reply.
                        tracing::warn!(
                            partition = self.partition,
                            "entries still pending after acknowledging the batch; replaying them before newer ones"
                        );
                        self.replay = true;
                    }
                }
                Err(e) => {
                    self.redis_failed("XREADGROUP", &e);
                    // The read may have run with its reply lost: its entries are pending for us.
                    self.replay = true;
                    // The stream or group may have vanished (e.g. Redis restarted empty).
                    group_ok = false;
                    if !pause(stop, bo.next_delay()).await {
                        return;
                    }
                }
            }
        }
    }

    /// Claims and delivers every pending entry of the group, in ID order, batch by batch (from
    /// the beginning, whatever their idle time: this task is the partition's only reader, so
    /// whatever is pending is a dead owner's or was read by us without the reply arriving).
    /// `Ok(false)` when stopped before finishing; errors restart the replay from the beginning.
    async fn replay_pending(&mut self, stop: &CancellationToken) -> StoreResult<bool> {
        let mut cursor = "0-0".to_string();
        loop {
            if stop.is_cancelled() {
                return Ok(false);
            }
            let page = self
                .stream
                .claim_pending(&cursor, self.ctx.cfg.stream.batch_max)
                .await?;
            if !page.deleted.is_empty() {
                self.ctx
                    .metrics
                    .dropped_trimmed
                    .add(page.deleted.len() as u64);
                tracing::warn!(
                    partition = self.partition,
                    count = page.deleted.len(),
                    first = ?page.deleted.first(),
                    "pending entries were trimmed before delivery; they are lost"
                );
            }
            if !page.claimed.is_empty() && !self.process(page.claimed, false, stop).await {
                return Ok(false);
            }
            match page.next {
                Some(next) => cursor = next,
                None => return Ok(true),
            }
        }
    }

    /// When the batch holds room pushes, reads on for up to `room_batch.linger_ms` (until one room
    /// has `room_batch.max` messages or the batch is full), so a burst of room messages goes to
    /// each comet as one RPC and to each member as one WebSocket message. Stream order is kept:
    /// later entries are only appended. A read error ends the wait and requests a replay: the
    /// failed read may have taken entries whose reply was lost (the trim keeps them).
    pub(super) async fn linger_for_rooms(
        &mut self,
        ids: &mut Vec<String>,
        entries: &mut Vec<Entry>,
        stop: &CancellationToken,
    ) {
        let linger = self.ctx.cfg.room_linger();
        let (room_max, batch_max) = (self.ctx.cfg.room_batch.max, self.ctx.cfg.stream.batch_max);
        if linger.is_zero() || !entries.iter().any(route::is_room) {
            return;
        }
        let deadline = tokio::time::Instant::now() + linger;
        while ids.len() < batch_max && route::largest_room_run(entries) < room_max {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || stop.is_cancelled() {
                return;
            }
            let more = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.stream.read_new(batch_max - ids.len(), left) => r,
            };
            match more {
                Ok(raw) if !raw.is_empty() => {
                    self.ctx.metrics.entries.add(raw.len() as u64);
                    ids.extend(raw.iter().map(|e| e.id.clone()));
                    entries.extend(self.decode(raw));
                }
                Ok(_) => return,
                Err(e) => {
                    self.redis_failed("XREADGROUP (room batch)", &e);
                    self.replay = true;
                    return;
                }
            }
        }
    }

    /// Decodes entries; undecodable ones are logged and counted here and simply left out (they
    /// are acknowledged with their batch, so they can never become deliverable).
    pub(super) fn decode(&self, raw: Vec<StreamEntry>) -> Vec<Entry> {
        let mut out = Vec::with_capacity(raw.len());
        for entry in raw {
            let id = PushId::from_stream_id(self.partition, &entry.id);
            let job = entry
                .job
                .and_then(|bytes| PushJob::decode(&bytes).map_err(|e| e.to_string()));
            match (id, job) {
                (Some(id), Ok(job)) => out.push(Entry { id, job }),
                (_, Err(why)) => self.undecodable(&entry.id, &why),
                (None, Ok(_)) => self.undecodable(&entry.id, "unparsable stream id"),
            }
        }
        out
    }

    fn undecodable(&self, id: &str, why: &str) {
        self.ctx.metrics.dropped_undecodable.inc();
        tracing::warn!(partition = self.partition, entry = %id, error = %why, "undecodable stream entry; acknowledging and skipping it");
    }
}
