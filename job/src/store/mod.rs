//! Everything the job tier keeps in or reads from Redis, behind typed stores named for what job
//! does with them: the partition streams it consumes ([`PartitionStream`]), the leases and worker
//! liveness that decide who consumes which partition ([`Leases`]), and the comet registry it
//! routes by ([`CometDirectory`]).
//!
//! Domain code (`partition`, `lease`, `registry`) calls these traits and never Redis. The Redis
//! implementations (`redis_*.rs`) hold every key, command and Lua script of the tier and are
//! tested against a real redis-server by `job/tests/delivery.rs`; [`memory`] keeps the same rules
//! in process so the partition rules are unit-tested under a paused clock.
//!
//! Each trait writes down what an implementation must guarantee: what is atomic, in which order
//! entries come, and what a call leaves behind when it fails. The partition's delivery promises
//! (stream order, acknowledge only after confirmation, replay before newer entries) rest on them.

pub mod memory;
#[cfg(test)]
mod memory_tests;
mod redis_conn;
mod redis_directory;
mod redis_leases;
mod redis_stream;
#[cfg(test)]
mod redis_tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rim_proto::rpc::NodeInfo;

pub(crate) use redis_conn::RedisBackend;

/// A failed store call. Every variant is transient for the caller: it is logged, counted in
/// `rim_job_redis_errors_total` and retried.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error, or the connection failed or timed out (the command
    /// connection's response timeout).
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// A reply without a response timeout of its own (a blocking read) did not come within its
    /// outer bound; the connection is dropped and re-created by the next call.
    #[error("{0} reply overdue")]
    Overdue(&'static str),
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// One entry of a partition stream as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// Stream id, `ms-seq`.
    pub id: String,
    /// The MessagePack-encoded `PushJob`, or why the entry holds none (its `job` field is missing
    /// or not a string). Decoding is the caller's: an undecodable entry is still an entry, and is
    /// acknowledged with its batch.
    pub job: Result<Vec<u8>, String>,
}

/// One page of pending entries taken over by [`PartitionStream::claim_pending`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimPage {
    /// Entries now pending for this consumer, in id order.
    pub claimed: Vec<StreamEntry>,
    /// Ids that were pending but whose entries no longer exist (trimmed before delivery); they
    /// are removed from the pending list and lost.
    pub deleted: Vec<String>,
    /// Where the next page starts; `None` once every pending entry was visited.
    pub next: Option<String>,
}

/// What is left after [`PartitionStream::ack_trim`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Entries of the group still pending (for any consumer).
    pub pending: u64,
    /// The oldest of them.
    pub oldest_pending: Option<String>,
    /// Entries left in the stream after the trim (the backlog).
    pub len: u64,
}

/// Opens the consumer side of partition streams.
pub trait PartitionStreams: Send + Sync {
    /// The stream of `partition`, read as consumer `consumer` of the job group. Each partition
    /// task opens its own: an implementation may keep per-reader state (a blocking connection).
    fn open(&self, partition: u16, consumer: &str) -> Box<dyn PartitionStream>;
}

/// One partition's stream as its single reader (the lease holder) sees it, through the job
/// consumer group.
///
/// Rules every implementation keeps:
/// * Entries are appended by logic with increasing ids; every read returns them in id order, and
///   a read never returns an entry that an earlier read of the group already returned, unless it
///   is a claim of a pending one.
/// * An entry returned by [`read_new`](Self::read_new) or [`claim_pending`](Self::claim_pending)
///   is pending for this consumer until [`ack_trim`](Self::ack_trim) acknowledges it. A call can
///   succeed in the store while its reply is lost (the caller sees an error): its entries are
///   then pending for this consumer without the caller knowing them, which is why the caller
///   replays pending entries after any read error.
/// * Acknowledging and trimming are one atomic step, and a trim never removes an entry that is
///   still pending, so an entry read but not acknowledged survives until it is replayed.
/// * Nothing here renews or checks the lease: fencing is the caller's (it stops using the
///   stream when the lease is lost).
#[async_trait]
pub trait PartitionStream: Send + Sync {
    /// Creates the consumer group (reading from the start, creating the stream if needed) unless
    /// it exists. Idempotent.
    async fn ensure_group(&mut self) -> StoreResult<()>;

    /// Entries never delivered to the group, oldest first, at most `count`; waits up to `block`
    /// (at least 1 ms) when there are none and returns empty if none came. They become pending
    /// for this consumer in the same step.
    async fn read_new(&mut self, count: usize, block: Duration) -> StoreResult<Vec<StreamEntry>>;

    /// Takes over pending entries of the group (any consumer's, whatever their idle time) from
    /// id `cursor` on (`"0-0"` = the beginning), in id order, at most `count`, making them
    /// pending for this consumer. Follow [`ClaimPage::next`] to visit them all.
    async fn claim_pending(&mut self, cursor: &str, count: usize) -> StoreResult<ClaimPage>;

    /// Whether any entry of the group has been pending for at least `idle` since it was last
    /// delivered or claimed.
    async fn has_stale_pending(&mut self, idle: Duration) -> StoreResult<bool>;

    /// Atomically acknowledges `ids` (they leave the pending list; unknown ids are ignored), then
    /// trims the stream below `trim_below` (exclusive; `None` = no trim) or below the oldest
    /// entry still pending, whichever is lower, and reports what is left. After an `Ok`, the
    /// acknowledged entries are never returned again; after an error the caller cannot tell
    /// whether the step happened, and retries it (acknowledging twice is harmless).
    async fn ack_trim(
        &mut self,
        ids: &[String],
        trim_below: Option<&str>,
    ) -> StoreResult<AckOutcome>;
}

/// Partition leases and worker liveness: who consumes which partition.
///
/// Rules every implementation keeps:
/// * A lease has one holder and a TTL; each call on one lease is atomic (check and change in one
///   step), so a worker can only renew or release a lease it still holds, and never one that
///   expired and was taken by another worker.
/// * The expiry counts from when the store ran the call, so a caller that notes the time before
///   sending knows a lower bound of how long the lease is its own (its fencing deadline).
/// * Worker liveness is a set of worker ids with an expiry each (unix ms, the callers' clocks):
///   [`heartbeat`](Self::heartbeat) records one worker, drops the expired and counts the rest in
///   one atomic step.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Records `worker` as live until `now_ms + ttl_ms`, drops workers whose expiry is before
    /// `now_ms`, and returns how many are live (including `worker`).
    async fn heartbeat(&self, worker: &str, now_ms: u64, ttl_ms: u64) -> StoreResult<u64>;

    /// Removes `worker` from the live workers (graceful exit; otherwise it expires).
    async fn leave(&self, worker: &str) -> StoreResult<()>;

    /// Takes the lease of `partition` for `worker` for `ttl_ms` if nobody holds it.
    async fn acquire(&self, partition: u16, worker: &str, ttl_ms: u64) -> StoreResult<bool>;

    /// Extends the lease to `ttl_ms` from now if `worker` still holds it; false if not (taken
    /// over or expired).
    async fn renew(&self, partition: u16, worker: &str, ttl_ms: u64) -> StoreResult<bool>;

    /// Deletes the lease if `worker` still holds it; false if it did not.
    async fn release(&self, partition: u16, worker: &str) -> StoreResult<bool>;
}

/// One comet found live in the registry.
#[derive(Debug, Clone)]
pub struct CometRecord {
    /// Comet server id.
    pub server: String,
    /// Registration expiry (unix ms); in the future when read.
    pub expiry_ms: u64,
    /// Its registration as stored: `None` when the registry has no entry for it, `Err` (with the
    /// reason) when the entry is undecodable.
    pub info: Option<Result<NodeInfo, String>>,
}

/// The comet registry as job reads it (logic writes it).
///
/// Reads only, none atomic with logic's writes: a comet can register or lapse between two reads,
/// which is why the caller judges liveness again by each comet's expiry at use, and re-reads
/// before calling a comet gone.
#[async_trait]
pub trait CometDirectory: Send + Sync {
    /// Comets whose registration expiry is strictly after `now_ms`, with their registration.
    async fn live_comets(&self, now_ms: u64) -> StoreResult<Vec<CometRecord>>;

    /// Comets listed in `room`'s routing index (they have, or recently had, members there); no
    /// order, no duplicates.
    async fn room_comets(&self, room: &str) -> StoreResult<Vec<String>>;
}

/// The three stores one worker uses.
#[derive(Clone)]
pub struct Stores {
    /// Partition streams.
    pub streams: Arc<dyn PartitionStreams>,
    /// Leases and liveness.
    pub leases: Arc<dyn Leases>,
    /// Comet registry.
    pub directory: Arc<dyn CometDirectory>,
}
