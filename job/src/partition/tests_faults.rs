//! Redis failures the partition rides out, under a paused clock: each store command failing once
//! is logged, retried after a backoff pause, and the partition carries on (later pushes are still
//! delivered), and a comet call that never answers is cut only by its outer bound.
//!
//! [`Faults`] wraps the in-memory stores every test world uses: it counts each command a
//! partition sends (so tests can tell how often it replays or checks for stale entries) and
//! fails the next one of a kind on request.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::tests::{P, config, room_push, seqs, world};
use crate::store::memory::{MemoryDirectory, MemoryStreams};
use crate::store::{AckOutcome, ClaimPage, CometDirectory, CometRecord, PartitionStream};
use crate::store::{PartitionStreams, StoreError, StoreResult, StreamEntry};
use async_trait::async_trait;
use parking_lot::Mutex;

/// A store command the partition sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Cmd {
    /// `XGROUP CREATE` ([`PartitionStream::ensure_group`]).
    Group,
    /// `XREADGROUP >` ([`PartitionStream::read_new`]).
    Read,
    /// `XAUTOCLAIM` ([`PartitionStream::claim_pending`]).
    Claim,
    /// `XPENDING` ([`PartitionStream::has_stale_pending`]).
    Stale,
    /// The acknowledge-and-trim script ([`PartitionStream::ack_trim`]).
    Ack,
    /// `SMEMBERS` of a room's index ([`CometDirectory::room_comets`]).
    Rooms,
}

/// Command counts and armed failures, shared by every stream and the directory of one world.
#[derive(Default)]
pub(super) struct Faults {
    calls: Mutex<BTreeMap<Cmd, u64>>,
    fail_next: Mutex<BTreeSet<Cmd>>,
}

impl Faults {
    /// The next `cmd` fails (as an unanswered Redis command) without reaching the store.
    pub(super) fn fail_next(&self, cmd: Cmd) {
        self.fail_next.lock().insert(cmd);
    }

    /// How many `cmd`s were sent so far (failed ones included).
    pub(super) fn calls(&self, cmd: Cmd) -> u64 {
        self.calls.lock().get(&cmd).copied().unwrap_or(0)
    }

    fn enter(&self, cmd: Cmd) -> StoreResult<()> {
        *self.calls.lock().entry(cmd).or_default() += 1;
        match self.fail_next.lock().remove(&cmd) {
            true => Err(StoreError::Overdue("injected failure")),
            false => Ok(()),
        }
    }

    /// `streams` with every command counted and failable.
    pub(super) fn streams(self: &Arc<Self>, streams: &MemoryStreams) -> Arc<dyn PartitionStreams> {
        Arc::new(Counted {
            inner: streams.clone(),
            faults: self.clone(),
        })
    }

    /// `directory` with its room reads counted and failable.
    pub(super) fn directory(
        self: &Arc<Self>,
        dir: &Arc<MemoryDirectory>,
    ) -> Arc<dyn CometDirectory> {
        Arc::new(Counted {
            inner: dir.clone(),
            faults: self.clone(),
        })
    }
}

struct Counted<T> {
    inner: T,
    faults: Arc<Faults>,
}

impl PartitionStreams for Counted<MemoryStreams> {
    fn open(&self, partition: u16, consumer: &str) -> Box<dyn PartitionStream> {
        Box::new(Counted {
            inner: self.inner.open(partition, consumer),
            faults: self.faults.clone(),
        })
    }
}

#[async_trait]
impl PartitionStream for Counted<Box<dyn PartitionStream>> {
    async fn ensure_group(&mut self) -> StoreResult<()> {
        self.faults.enter(Cmd::Group)?;
        self.inner.ensure_group().await
    }

    async fn read_new(&mut self, count: usize, block: Duration) -> StoreResult<Vec<StreamEntry>> {
        self.faults.enter(Cmd::Read)?;
        self.inner.read_new(count, block).await
    }

    async fn claim_pending(&mut self, cursor: &str, count: usize) -> StoreResult<ClaimPage> {
        self.faults.enter(Cmd::Claim)?;
        self.inner.claim_pending(cursor, count).await
    }

    async fn has_stale_pending(&mut self, idle: Duration) -> StoreResult<bool> {
        self.faults.enter(Cmd::Stale)?;
        self.inner.has_stale_pending(idle).await
    }

    async fn ack_trim(
        &mut self,
        ids: &[String],
        trim_below: Option<&str>,
    ) -> StoreResult<AckOutcome> {
        self.faults.enter(Cmd::Ack)?;
        self.inner.ack_trim(ids, trim_below).await
    }
}

#[async_trait]
impl CometDirectory for Counted<Arc<MemoryDirectory>> {
    async fn live_comets(&self, now_ms: u64) -> StoreResult<Vec<CometRecord>> {
        self.inner.live_comets(now_ms).await
    }

    async fn room_comets(&self, room: &str) -> StoreResult<Vec<String>> {
        self.faults.enter(Cmd::Rooms)?;
        self.inner.room_comets(room).await
    }
}

/// Room `r`, whose index lists `c1`.
const ROOM: &str = "r";

/// Arms one failure of `cmd`, then checks that two pushes appended one after the other are both
/// delivered and acknowledged: the failure was retried, not the end of the partition.
async fn one_failure_of(cmd: Cmd) {
    let mut w = world(config()).await;
    w.directory.join_room(&format!("live://{ROOM}"), "c1");
    w.faults.fail_next(cmd);
    let running = w.start_partition();
    for msg in ["a", "b"] {
        let id = w.streams.append(P, &room_push(msg, ROOM));
        w.confirm_next(&[id], msg).await;
        w.all_acked().await;
    }
    assert!(w.faults.calls(cmd) >= 2, "{cmd:?} retried");
    assert_eq!(w.ctx.metrics.redis_errors.get(), 1);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_group_creation_is_retried() {
    one_failure_of(Cmd::Group).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_replay_claim_is_retried() {
    one_failure_of(Cmd::Claim).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_room_index_read_is_retried() {
    one_failure_of(Cmd::Rooms).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_acknowledgement_is_retried() {
    one_failure_of(Cmd::Ack).await;
}

/// A call the comet never answers is cut by job's own bound only after twice the RPC timeout
/// plus a second (the link's deadline bounds the call, connecting may take as long again), then
/// retried after the first backoff step.
#[tokio::test(start_paused = true)]
async fn an_unanswered_call_is_cut_after_twice_the_rpc_timeout_and_a_second() {
    let mut w = world(config()).await;
    let id = w.append("a");
    let running = w.start_partition();

    let hung = w.next_call().await;
    let retry = w.next_call().await;
    let bound = w.ctx.cfg.rpc_timeout() * 2 + Duration::from_secs(1);
    let gap = retry.at - hung.at;
    assert!(
        gap >= bound && gap < bound + w.ctx.cfg.retry_max(),
        "{gap:?}"
    );
    assert!(hung.reply.is_closed(), "the hung call was dropped");
    assert_eq!(w.ctx.metrics.rpc_failures.get(), 1);
    assert_eq!(retry.seqs(), seqs(&[id]), "the same entry");
    retry.confirm();
    w.all_acked().await;
    running.stop().await;
}
