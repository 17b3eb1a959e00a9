//! In-process stores that keep the rules written on the store traits, for unit tests of the
//! partition and lease rules under a paused clock (lease TTLs and pending idle times run on
//! tokio's clock). Besides the trait methods, each has what a test needs to play logic, a dead
//! worker or a failing Redis: append entries, read as another consumer, lose a reply, take a
//! lease over, make calls fail, register comets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rim_proto::job::PushJob;
use rim_proto::rpc::NodeInfo;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{AckOutcome, ClaimPage, CometDirectory, CometRecord, Leases, PartitionStream};
use super::{PartitionStreams, StoreError, StoreResult, StreamEntry};

/// A failed call, as a Redis connection error.
fn failure(what: &'static str) -> StoreError {
    StoreError::Redis(redis::RedisError::from((redis::ErrorKind::Io, what)))
}

/// A stream id, `(ms, seq)`: ordered as Redis orders them.
type Id = (u64, u64);

fn parse_id(id: &str) -> Option<Id> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn format_id((ms, seq): Id) -> String {
    format!("{ms}-{seq}")
}

#[derive(Default)]
struct Stream {
    entries: BTreeMap<Id, Result<Vec<u8>, String>>,
    /// Highest id ever appended (ids keep increasing after trims, as in Redis).
    last: Id,
    group: Option<Group>,
}

struct Group {
    /// Entries up to here were delivered to the group.
    last_delivered: Id,
    /// Pending entries: consumer and when they were last delivered or claimed.
    pending: BTreeMap<Id, (String, Instant)>,
}

impl Stream {
    fn entry(&self, id: Id) -> Option<StreamEntry> {
        self.entries.get(&id).map(|job| StreamEntry {
            id: format_id(id),
            job: job.clone(),
        })
    }

    /// Delivers up to `count` new entries to `consumer` (the `>` read).
    fn deliver_new(&mut self, consumer: &str, count: usize) -> Vec<StreamEntry> {
        let Some(group) = self.group.as_mut() else {
            return Vec::new();
        };
        let start = (
            group.last_delivered.0,
            group.last_delivered.1.saturating_add(1),
        );
        let ids: Vec<Id> = self
            .entries
            .range(start..)
            .take(count)
            .map(|(id, _)| *id)
            .collect();
        let now = Instant::now();
        for id in &ids {
            group.pending.insert(*id, (consumer.to_owned(), now));
            group.last_delivered = *id;
        }
        ids.into_iter().filter_map(|id| self.entry(id)).collect()
    }
}

#[derive(Default)]
struct StreamsState {
    streams: HashMap<u16, Stream>,
    /// Partitions whose next `read_new` takes its entries and then fails, as a read whose reply
    /// was lost.
    lose_next_read: BTreeSet<u16>,
}

#[derive(Default)]
struct StreamsShared {
    state: Mutex<StreamsState>,
    /// Woken on every change (append, read, claim, ack), for blocked reads and waiting tests.
    changed: Notify,
}

/// Partition streams in memory. Clones share the streams.
#[derive(Clone, Default)]
pub struct MemoryStreams {
    shared: Arc<StreamsShared>,
}

impl MemoryStreams {
    /// Empty streams.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a push job to `partition`'s stream, as logic does; returns its id.
    pub fn append(&self, partition: u16, job: &PushJob) -> String {
        self.append_raw(partition, Ok(job.encode()))
    }

    /// Appends an entry whose `job` field is as given (`Err` = no usable field).
    pub fn append_raw(&self, partition: u16, job: Result<Vec<u8>, String>) -> String {
        let id = {
            let mut state = self.shared.state.lock();
            let stream = state.streams.entry(partition).or_default();
            let id = (stream.last.0.max(1), stream.last.1 + 1);
            stream.last = id;
            stream.entries.insert(id, job);
            id
        };
        self.shared.changed.notify_waiters();
        format_id(id)
    }

    /// Waits until `cond` holds, looking again after every change of any stream.
    pub async fn wait_until(&self, mut cond: impl FnMut(&Self) -> bool) {
        loop {
            // Registered before looking, so a change between the look and the wait wakes it.
            let mut changed = pin!(self.shared.changed.notified());
            changed.as_mut().enable();
            if cond(self) {
                return;
            }
            changed.await;
        }
    }

    /// Reads up to `count` new entries as `consumer` and forgets them: they stay pending for it
    /// (a dead worker's unfinished batch, or a read whose reply never arrived).
    pub fn read_as(&self, partition: u16, consumer: &str, count: usize) -> Vec<String> {
        let ids = {
            let mut state = self.shared.state.lock();
            let stream = state.streams.entry(partition).or_default();
            stream.group.get_or_insert(Group {
                last_delivered: (0, 0),
                pending: BTreeMap::new(),
            });
            stream.deliver_new(consumer, count)
        };
        self.shared.changed.notify_waiters();
        ids.into_iter().map(|e| e.id).collect()
    }

    /// The next `read_new` on `partition` takes its entries and then fails, as if the reply was
    /// lost on the way.
    pub fn lose_next_read(&self, partition: u16) {
        self.shared.state.lock().lose_next_read.insert(partition);
    }

    /// Deletes `partition`'s entries below `id`, pending or not (as a backlog cap or an operator's
    /// `XTRIM` would): a claim then reports the pending ones among them as deleted.
    pub fn trim_below(&self, partition: u16, id: &str) {
        let below = parse_id(id).unwrap_or((0, 0));
        if let Some(s) = self.shared.state.lock().streams.get_mut(&partition) {
            s.entries = s.entries.split_off(&below);
        }
    }

    /// Pending entries of `partition`'s group: id and consumer, in id order.
    pub fn pending(&self, partition: u16) -> Vec<(String, String)> {
        let state = self.shared.state.lock();
        state
            .streams
            .get(&partition)
            .and_then(|s| s.group.as_ref())
            .map(|g| {
                g.pending
                    .iter()
                    .map(|(id, (c, _))| (format_id(*id), c.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ids of the entries left in `partition`'s stream.
    pub fn ids(&self, partition: u16) -> Vec<String> {
        let state = self.shared.state.lock();
        state
            .streams
            .get(&partition)
            .map(|s| s.entries.keys().copied().map(format_id).collect())
            .unwrap_or_default()
    }
}

impl PartitionStreams for MemoryStreams {
    fn open(&self, partition: u16, consumer: &str) -> Box<dyn PartitionStream> {
        Box::new(MemoryStream {
            shared: self.shared.clone(),
            partition,
            consumer: consumer.to_owned(),
        })
    }
}

struct MemoryStream {
    shared: Arc<StreamsShared>,
    partition: u16,
    consumer: String,
}

impl MemoryStream {
    fn with<T>(&self, f: impl FnOnce(&mut Stream) -> T) -> T {
        let out = {
            let mut state = self.shared.state.lock();
            f(state.streams.entry(self.partition).or_default())
        };
        self.shared.changed.notify_waiters();
        out
    }
}

#[async_trait]
impl PartitionStream for MemoryStream {
    async fn ensure_group(&mut self) -> StoreResult<()> {
        self.with(|s| {
            s.group.get_or_insert(Group {
                last_delivered: (0, 0),
                pending: BTreeMap::new(),
            });
        });
        Ok(())
    }

    async fn read_new(&mut self, count: usize, block: Duration) -> StoreResult<Vec<StreamEntry>> {
        let deadline = Instant::now() + block.max(Duration::from_millis(1));
        loop {
            // Registered before looking, so an append between the look and the wait wakes it.
            let mut changed = pin!(self.shared.changed.notified());
            changed.as_mut().enable();
            let read = {
                let mut state = self.shared.state.lock();
                let lose = state.lose_next_read.contains(&self.partition);
                let stream = state.streams.entry(self.partition).or_default();
                if stream.group.is_none() {
                    return Err(failure("NOGROUP no such consumer group"));
                }
                let got = stream.deliver_new(&self.consumer, count);
                if !got.is_empty() && lose {
                    state.lose_next_read.remove(&self.partition);
                    Some(Err(StoreError::Overdue("read (reply lost)")))
                } else {
                    (!got.is_empty()).then_some(Ok(got))
                }
            };
            if let Some(read) = read {
                self.shared.changed.notify_waiters();
                return read;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn claim_pending(&mut self, cursor: &str, count: usize) -> StoreResult<ClaimPage> {
        let from = parse_id(cursor).unwrap_or((0, 0));
        let consumer = self.consumer.clone();
        Ok(self.with(|s| {
            let Stream { entries, group, .. } = s;
            let Some(group) = group.as_mut() else {
                return ClaimPage::default();
            };
            let mut visit = group.pending.range(from..).map(|(id, _)| *id);
            let ids: Vec<Id> = visit.by_ref().take(count).collect();
            let next = visit.next().map(format_id);
            let now = Instant::now();
            let mut page = ClaimPage {
                next,
                ..ClaimPage::default()
            };
            for id in ids {
                match entries.get(&id) {
                    Some(job) => {
                        group.pending.insert(id, (consumer.clone(), now));
                        page.claimed.push(StreamEntry {
                            id: format_id(id),
                            job: job.clone(),
                        });
                    }
                    None => {
                        group.pending.remove(&id);
                        page.deleted.push(format_id(id));
                    }
                }
            }
            page
        }))
    }

    async fn has_stale_pending(&mut self, idle: Duration) -> StoreResult<bool> {
        let now = Instant::now();
        Ok(self.with(|s| {
            s.group.as_ref().is_some_and(|g| {
                g.pending
                    .values()
                    .any(|(_, at)| now.saturating_duration_since(*at) >= idle)
            })
        }))
    }

    async fn ack_trim(
        &mut self,
        ids: &[String],
        trim_below: Option<&str>,
    ) -> StoreResult<AckOutcome> {
        Ok(self.with(|s| {
            let mut out = AckOutcome::default();
            if let Some(group) = s.group.as_mut() {
                for id in ids.iter().filter_map(|id| parse_id(id)) {
                    group.pending.remove(&id);
                }
                out.pending = group.pending.len() as u64;
                out.oldest_pending = group.pending.keys().next().copied().map(format_id);
            }
            let oldest = out.oldest_pending.as_deref().and_then(parse_id);
            let trim = match (trim_below.and_then(parse_id), oldest) {
                (Some(t), Some(o)) => Some(t.min(o)),
                (t, _) => t,
            };
            if let Some(trim) = trim {
                s.entries = s.entries.split_off(&trim);
            }
            out.len = s.entries.len() as u64;
            out
        }))
    }
}

#[derive(Default)]
struct LeaseState {
    /// Partition → holder and expiry.
    leases: HashMap<u16, (String, Instant)>,
    /// Worker → liveness expiry (unix ms, as the caller gave it).
    workers: BTreeMap<String, u64>,
}

/// Leases and worker liveness in memory; lease TTLs run on tokio's clock.
#[derive(Default)]
pub struct MemoryLeases {
    state: Mutex<LeaseState>,
    /// While set, every call fails (Redis unreachable).
    down: AtomicBool,
    /// Partitions whose lease calls never answer (their Redis master hangs).
    silent: Mutex<BTreeSet<u16>>,
}

impl MemoryLeases {
    /// No leases, no workers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The holder of `partition`'s lease, unless it expired.
    pub fn holder(&self, partition: u16) -> Option<String> {
        let state = self.state.lock();
        state
            .leases
            .get(&partition)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(holder, _)| holder.clone())
    }

    /// Gives `partition`'s lease to `worker` for `ttl`, whoever held it (another worker that
    /// took it over after this one's lease lapsed, as far as the holder can tell).
    pub fn take_over(&self, partition: u16, worker: &str, ttl: Duration) {
        self.state
            .lock()
            .leases
            .insert(partition, (worker.to_owned(), Instant::now() + ttl));
    }

    /// Workers recorded live (expired ones are dropped only by a heartbeat, as in Redis).
    pub fn workers(&self) -> Vec<String> {
        self.state.lock().workers.keys().cloned().collect()
    }

    /// Makes every call fail (`true`) or work again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Makes calls on `partition`'s lease hang (`true`: the master holding it stopped
    /// answering, as in a cluster failover) or answer again.
    pub fn set_silent(&self, partition: u16, silent: bool) {
        let mut set = self.silent.lock();
        if silent {
            set.insert(partition);
        } else {
            set.remove(&partition);
        }
    }

    fn up(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(failure("leases unavailable"));
        }
        Ok(())
    }

    /// [`Self::up`] for one partition's lease: hangs while it is silent.
    async fn lease_up(&self, partition: u16) -> StoreResult<()> {
        if self.silent.lock().contains(&partition) {
            std::future::pending::<()>().await;
        }
        self.up()
    }

    /// Runs `f` on the lease of `partition` if `worker` holds it (unexpired).
    fn if_held(&self, partition: u16, worker: &str, f: impl FnOnce(&mut LeaseState)) -> bool {
        let mut state = self.state.lock();
        let held = state
            .leases
            .get(&partition)
            .is_some_and(|(h, expires)| h == worker && *expires > Instant::now());
        if held {
            f(&mut state);
        }
        held
    }
}

#[async_trait]
impl Leases for MemoryLeases {
    async fn heartbeat(&self, worker: &str, now_ms: u64, ttl_ms: u64) -> StoreResult<u64> {
        self.up()?;
        let mut state = self.state.lock();
        state.workers.insert(worker.to_owned(), now_ms + ttl_ms);
        state.workers.retain(|_, expiry| *expiry >= now_ms);
        Ok(state.workers.len() as u64)
    }

    async fn leave(&self, worker: &str) -> StoreResult<()> {
        self.up()?;
        self.state.lock().workers.remove(worker);
        Ok(())
    }

    async fn acquire(&self, partition: u16, worker: &str, ttl_ms: u64) -> StoreResult<bool> {
        self.lease_up(partition).await?;
        let mut state = self.state.lock();
        let now = Instant::now();
        if state
            .leases
            .get(&partition)
            .is_some_and(|(_, expires)| *expires > now)
        {
            return Ok(false);
        }
        let expires = now + Duration::from_millis(ttl_ms);
        state.leases.insert(partition, (worker.to_owned(), expires));
        Ok(true)
    }

    async fn renew(&self, partition: u16, worker: &str, ttl_ms: u64) -> StoreResult<bool> {
        self.lease_up(partition).await?;
        let expires = Instant::now() + Duration::from_millis(ttl_ms);
        Ok(self.if_held(partition, worker, |state| {
            state.leases.insert(partition, (worker.to_owned(), expires));
        }))
    }

    async fn release(&self, partition: u16, worker: &str) -> StoreResult<bool> {
        self.lease_up(partition).await?;
        Ok(self.if_held(partition, worker, |state| {
            state.leases.remove(&partition);
        }))
    }
}

/// A comet's registration in memory.
struct Registration {
    info: Option<Result<NodeInfo, String>>,
    expiry_ms: u64,
}

/// The comet registry and room index in memory (what logic would have written).
#[derive(Default)]
pub struct MemoryDirectory {
    comets: Mutex<BTreeMap<String, Registration>>,
    rooms: Mutex<HashMap<String, BTreeSet<String>>>,
    /// While set, every read fails (Redis unreachable).
    down: AtomicBool,
}

impl MemoryDirectory {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers comet `server` at `rpc_addr` until `expiry_ms` (unix ms).
    pub fn register(&self, server: &str, rpc_addr: &str, expiry_ms: u64) {
        let info = NodeInfo {
            server: server.to_owned(),
            rpc_addr: rpc_addr.to_owned(),
            ..NodeInfo::default()
        };
        self.comets.lock().insert(
            server.to_owned(),
            Registration {
                info: Some(Ok(info)),
                expiry_ms,
            },
        );
    }

    /// Removes comet `server` from the registry.
    pub fn unregister(&self, server: &str) {
        self.comets.lock().remove(server);
    }

    /// Makes every read fail (`true`) or work again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Lists comet `server` in `room`'s routing index.
    pub fn join_room(&self, room: &str, server: &str) {
        self.rooms
            .lock()
            .entry(room.to_owned())
            .or_default()
            .insert(server.to_owned());
    }
}

#[async_trait]
impl CometDirectory for MemoryDirectory {
    async fn live_comets(&self, now_ms: u64) -> StoreResult<Vec<CometRecord>> {
        if self.down.load(Ordering::SeqCst) {
            return Err(failure("registry unavailable"));
        }
        Ok(self
            .comets
            .lock()
            .iter()
            .filter(|(_, r)| r.expiry_ms > now_ms)
            .map(|(server, r)| CometRecord {
                server: server.clone(),
                expiry_ms: r.expiry_ms,
                info: r.info.clone(),
            })
            .collect())
    }

    async fn room_comets(&self, room: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .rooms
            .lock()
            .get(room)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default())
    }
}
