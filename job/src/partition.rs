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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, RedisResult, Value};
use rim_proto::job::PushJob;
use rim_proto::keys;
use rim_proto::rpc::{Delivery, PushId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use crate::route::{self, Entry};
use rim_runtime::backoff::Backoff;

/// Compare-and-delete of a lease: only the holder may release it.
pub(crate) const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// `XACK` the batch (ARGV[3..]), then `XTRIM MINID` to the lower of ARGV[2] (the entry after the
/// batch; empty = no trim) and the oldest entry still pending, so an entry that was read but not
/// acknowledged (a lost read reply) is never trimmed away. One atomic step, one round trip.
/// Returns `{pending count, oldest pending id or nil, XLEN after the trim}`.
const ACK_LUA: &str = r"
local stream, group, trim_to = KEYS[1], ARGV[1], ARGV[2]
local i = 3
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  redis.call('XACK', stream, group, unpack(ARGV, i, j))
  i = j + 1
end
local p = redis.call('XPENDING', stream, group)
local oldest = p[2]
-- Stream ids are decimal 'ms-seq' without leading zeros: compare parts by length, then text
-- (exact for any u64, unlike Lua numbers).
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
if oldest and trim_to ~= '' and before(oldest, trim_to) then
  trim_to = oldest
end
if trim_to ~= '' then
  redis.call('XTRIM', stream, 'MINID', trim_to)
end
return {p[1], oldest, redis.call('XLEN', stream)}";

/// Redis retry delays: short first, so a blip costs little; capped, so a long outage is polled gently.
fn redis_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
}

/// How a comet's share of a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The comet answered.
    Confirmed,
    /// The comet left the registry: its items were dropped (and counted).
    Gone,
    /// The comet kept failing for `delivery.give_up_ms`: its items were dropped (and counted).
    GaveUp,
    /// Stop was requested while retrying: the batch must not be acknowledged.
    Abandoned,
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
        stream: keys::push_stream(partition),
        ctx: ctx.clone(),
        partition,
        blocking: None,
        replay: true,
        stray_pending: false,
        ack_script: redis::Script::new(ACK_LUA),
    };
    let finished = tokio::select! {
        biased;
        _ = lost.cancelled() => false,
        _ = task.consume(&stop) => true,
    };
    if finished {
        task.release().await;
        tracing::info!(partition, "partition released");
    } else {
        tracing::warn!(
            partition,
            "partition lease lost; stopped without acknowledging further entries"
        );
    }
    ctx.metrics.partitions_held.dec();
    ctx.metrics.backlog.lock().remove(&partition);
    let _ = done.send(partition);
}

struct Partition {
    ctx: Arc<Ctx>,
    partition: u16,
    stream: String,
    /// Connection for `XREADGROUP … BLOCK`, without a response timeout (the client's default
    /// 500 ms would cut every block short). Re-created after any error.
    blocking: Option<MultiplexedConnection>,
    /// Pending entries must be replayed before reading `>` again: set at start and whenever a
    /// read may have run on Redis without its reply reaching us.
    replay: bool,
    /// The last acknowledgement found entries still pending although no batch is in flight.
    stray_pending: bool,
    ack_script: redis::Script,
}

/// Sleeps `delay` unless `stop` fires first; returns whether to carry on.
async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

impl Partition {
    async fn consume(&mut self, stop: &CancellationToken) {
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
            if let Err(e) = self.ensure_group(&mut group_ok).await {
                self.redis_failed("XGROUP CREATE", &e);
                if !pause(stop, bo.next_delay()).await {
                    return;
                }
                continue;
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
                match self.stale_pending().await {
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
            let read = tokio::select! {
                // Entries this read was delivering stay pending for the next owner.
                _ = stop.cancelled() => return,
                r = self.read_new() => r,
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
                    self.blocking = None;
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

    /// Claims and delivers every pending entry of the group, in ID order, batch by batch
    /// (`XAUTOCLAIM` from 0-0 with min-idle 0: this task is the partition's only reader, so
    /// whatever is pending is a dead owner's or was read by us without the reply arriving).
    /// `Ok(false)` when stopped before finishing; errors restart the replay from the beginning.
    async fn replay_pending(&mut self, stop: &CancellationToken) -> RedisResult<bool> {
        let mut cursor = "0-0".to_string();
        loop {
            if stop.is_cancelled() {
                return Ok(false);
            }
            let reply = self.autoclaim(&cursor).await?;
            if !reply.deleted_ids.is_empty() {
                self.ctx
                    .metrics
                    .dropped_trimmed
                    .add(reply.deleted_ids.len() as u64);
                tracing::warn!(
                    partition = self.partition,
                    count = reply.deleted_ids.len(),
                    first = ?reply.deleted_ids.first(),
                    "pending entries were trimmed before delivery; they are lost"
                );
            }
            if !reply.claimed.is_empty() && !self.process(reply.claimed, false, stop).await {
                return Ok(false);
            }
            if reply.next_stream_id == "0-0" {
                return Ok(true);
            }
            cursor = reply.next_stream_id;
        }
    }

    /// Whether the group has an entry pending longer than the RPC timeout while this task has no
    /// batch in flight: one read without its reply reaching us.
    async fn stale_pending(&self) -> RedisResult<bool> {
        let mut redis = self.ctx.redis.clone();
        let idle = self.ctx.cfg.delivery.rpc_timeout_ms;
        let found: Vec<Value> = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(keys::PUSH_GROUP)
            .arg("IDLE")
            .arg(idle)
            .arg("-")
            .arg("+")
            .arg(1)
            .query_async(&mut redis)
            .await?;
        Ok(!found.is_empty())
    }

    fn redis_failed(&self, what: &str, e: &redis::RedisError) {
        self.ctx.metrics.redis_errors.inc();
        tracing::warn!(partition = self.partition, command = what, error = %e, "redis command failed; retrying");
    }

    /// `XGROUP CREATE stream rim-job 0 MKSTREAM`, tolerating BUSYGROUP.
    async fn ensure_group(&self, ok: &mut bool) -> RedisResult<()> {
        if *ok {
            return Ok(());
        }
        let mut redis = self.ctx.redis.clone();
        let r: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(keys::PUSH_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut redis)
            .await;
        match r {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        *ok = true;
        Ok(())
    }

    /// `XAUTOCLAIM stream rim-job <me> 0 <cursor> COUNT batch_max`.
    async fn autoclaim(&self, cursor: &str) -> RedisResult<StreamAutoClaimReply> {
        let mut redis = self.ctx.redis.clone();
        redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(keys::PUSH_GROUP)
            .arg(&self.ctx.worker_id)
            .arg(0)
            .arg(cursor)
            .arg("COUNT")
            .arg(self.ctx.cfg.stream.batch_max)
            .query_async(&mut redis)
            .await
    }

    /// `XREADGROUP GROUP rim-job <me> COUNT batch_max BLOCK block_ms STREAMS stream >`.
    async fn read_new(&mut self) -> RedisResult<Vec<StreamId>> {
        let (count, block) = (self.ctx.cfg.stream.batch_max, self.ctx.cfg.block());
        self.read_group(count, block).await
    }

    /// `XREADGROUP GROUP rim-job <me> COUNT count BLOCK block STREAMS stream >` on the
    /// dedicated connection (no response timeout: the reply may legitimately take `block`).
    async fn read_group(&mut self, count: usize, block: Duration) -> RedisResult<Vec<StreamId>> {
        let conn = match self.blocking.as_mut() {
            Some(c) => c,
            None => {
                let cfg = AsyncConnectionConfig::new()
                    .set_response_timeout(None)
                    .set_connection_timeout(Some(Duration::from_secs(2)));
                let conn = self
                    .ctx
                    .client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?;
                self.blocking.insert(conn)
            }
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(keys::PUSH_GROUP)
            .arg(&self.ctx.worker_id)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            // BLOCK 0 would wait forever; a linger that rounds to 0 ms waits 1 ms instead.
            .arg((block.as_millis() as u64).max(1))
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">");
        let query = cmd.query_async::<Option<StreamReadReply>>(conn);
        // No response timeout on this connection, so guard against a half-dead socket here.
        let reply = tokio::time::timeout(block + Duration::from_secs(5), query)
            .await
            .map_err(|_| {
                redis::RedisError::from((redis::ErrorKind::Io, "XREADGROUP reply overdue"))
            })??;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    /// Delivers one batch and acknowledges it. Returns false when stopped before the batch
    /// could be confirmed (nothing acknowledged, the caller must end). `linger` allows reading on
    /// for room batching; replayed batches must not, since newer entries must wait until every
    /// pending one is delivered.
    async fn process(
        &mut self,
        raw: Vec<StreamId>,
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
        let mut named = route::named_servers(&entries);
        named.extend(rooms.values().flatten().cloned());
        if named.iter().any(|s| self.ctx.registry.link(s).is_none()) {
            let mut redis = self.ctx.redis.clone();
            if let Err(e) = self
                .ctx
                .registry
                .refresh_since(&mut redis, std::time::Instant::now())
                .await
            {
                self.redis_failed("registry refresh", &e);
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

    /// Decodes entries; undecodable ones are logged and counted here and simply left out (they
    /// are acknowledged with their batch, so they can never become deliverable).
    /// When the batch holds room pushes, reads on for up to `room_batch.linger_ms` (until one room
    /// has `room_batch.max` messages or the batch is full), so a burst of room messages goes to
    /// each comet as one RPC and to each member as one WebSocket message. Stream order is kept:
    /// later entries are only appended. A read error ends the wait and requests a replay: the
    /// failed read may have taken entries whose reply was lost (the trim keeps them).
    async fn linger_for_rooms(
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
                r = self.read_group(batch_max - ids.len(), left) => r,
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
                    self.blocking = None;
                    self.replay = true;
                    return;
                }
            }
        }
    }

    fn decode(&self, raw: Vec<StreamId>) -> Vec<Entry> {
        let mut out = Vec::with_capacity(raw.len());
        for entry in raw {
            let id = PushId::from_stream_id(self.partition, &entry.id);
            let job = match entry.map.get(keys::JOB_FIELD) {
                Some(Value::BulkString(bytes)) => PushJob::decode(bytes).map_err(|e| e.to_string()),
                Some(other) => Err(format!(
                    "field {:?} is not a string: {other:?}",
                    keys::JOB_FIELD
                )),
                None => Err(format!("no {:?} field", keys::JOB_FIELD)),
            };
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

    /// `SMEMBERS rim:room:{room}` for each room of the batch, retried until it works or `stop`.
    async fn room_members(
        &self,
        entries: &[Entry],
        stop: &CancellationToken,
    ) -> Option<HashMap<String, Vec<String>>> {
        let mut out = HashMap::new();
        for room in route::rooms_of(entries) {
            let mut bo = redis_backoff();
            loop {
                let mut redis = self.ctx.redis.clone();
                let r: RedisResult<Vec<String>> = redis::cmd("SMEMBERS")
                    .arg(keys::room_nodes(&room))
                    .query_async(&mut redis)
                    .await;
                match r {
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
    async fn deliver(
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
            let started = std::time::Instant::now();
            let batch = items.clone();
            let call = link.call(|client| async move {
                client
                    .deliver(rim_runtime::rpc::context(timeout), batch)
                    .await
            });
            // The context deadline bounds the call; this outer bound also covers connecting.
            let result = tokio::time::timeout(timeout * 2 + Duration::from_secs(1), call).await;
            let error = match result {
                Ok(Ok(report)) => {
                    ctx.failing_since.lock().remove(&server);
                    ctx.metrics.deliveries.add(items.len() as u64);
                    ctx.metrics.add_report(&report);
                    return Outcome::Confirmed;
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

    /// `XACK` the batch and trim the stream below the next entry and below the oldest entry
    /// still pending, atomically ([`ACK_LUA`]). Notes in `stray_pending` whether entries are still
    /// pending afterwards. Returns false if stopped before it succeeded (the entries are then
    /// redelivered by the next owner; comets drop the duplicates).
    async fn ack(&mut self, ids: &[String], stop: &CancellationToken) -> bool {
        // This task works in ID order, so every entry below the one after this batch was read;
        // those still pending bound the trim instead. Exact MINID (not `~`) keeps the stream's
        // length equal to the backlog.
        let trim_to = ids
            .last()
            .and_then(|id| PushId::from_stream_id(self.partition, id))
            .map(|last| format!("{}-{}", last.ms, last.seq.saturating_add(1)))
            .unwrap_or_default();
        let mut bo = redis_backoff();
        loop {
            let mut invocation = self.ack_script.key(&self.stream);
            invocation.arg(keys::PUSH_GROUP).arg(&trim_to).arg(ids);
            let mut redis = self.ctx.redis.clone();
            let r: RedisResult<(u64, Option<String>, u64)> =
                invocation.invoke_async(&mut redis).await;
            match r {
                Ok((pending, oldest, len)) => {
                    self.ctx.metrics.acked.add(ids.len() as u64);
                    self.ctx.metrics.batches.inc();
                    self.ctx.metrics.backlog.lock().insert(self.partition, len);
                    self.stray_pending = pending > 0;
                    if pending > 0 {
                        tracing::debug!(
                            partition = self.partition,
                            pending,
                            ?oldest,
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

    /// Deletes the lease if it is still ours. A failure is only logged: the TTL frees it anyway.
    async fn release(&self) {
        let script = redis::Script::new(RELEASE_LUA);
        let lease = keys::partition_lease(self.partition);
        let mut bo = redis_backoff();
        for _ in 0..3 {
            let mut redis = self.ctx.redis.clone();
            let r: RedisResult<i64> = script
                .key(&lease)
                .arg(&self.ctx.worker_id)
                .invoke_async(&mut redis)
                .await;
            match r {
                Ok(_) => return,
                Err(e) => {
                    self.redis_failed("lease release", &e);
                    tokio::time::sleep(bo.next_delay()).await;
                }
            }
        }
    }
}
