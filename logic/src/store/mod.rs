//! Everything logic keeps in Redis, behind typed stores: sessions, comets, push streams with the
//! room and user histories written beside them, and the people directory. Domain code (`registry`, `publish`, `directory`, …) calls these traits and
//! never Redis; the Redis implementations hold every key, command and Lua script of the tier
//! (`redis_*.rs`), and [`memory`] implements the same rules in process for unit tests of the
//! domain rules under a paused clock. The Redis implementations are tested against a real
//! redis-server by the integration tests in `logic/tests/`.
//!
//! Rules every implementation keeps are written on each trait: what is atomic, what a method
//! leaves behind when it fails, and which values are counted where.

mod conn;
#[cfg(test)]
pub(crate) mod memory;
mod redis_directory;
mod redis_history;
mod redis_job_status;
mod redis_nodes;
mod redis_sessions;
mod redis_streams;
mod sessions_at;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rim_proto::history::{HistoryEntry, HistoryId};
use rim_proto::job::PushJob;
use rim_proto::room::RoomId;
use rim_proto::rpc::NodeInfo;

pub(crate) use conn::RedisConn;
pub use sessions_at::{Given, Routed, SessionAt};

/// A Redis failure. Callers turn every variant into "unavailable" (HTTP 503,
/// `rpc::LogicError::Unavailable`); the text keeps the cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or the connection failed.
    #[error("redis unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    /// No answer within the configured `redis.timeout_ms`.
    #[error("redis unavailable: no answer within {0:?}")]
    Timeout(Duration),
    /// A push stream holds its `stream.max_backlog` entries: job is too far behind.
    #[error(
        "push refused: {stream} holds stream.max_backlog ({max}) entries not yet delivered; \
         job is too far behind"
    )]
    Backlog {
        /// The full stream.
        stream: String,
        /// The configured bound.
        max: u64,
    },
    /// `redis.wait_replicas` replicas did not confirm a push within half of `redis.timeout_ms`
    /// (`WAIT`'s own bound, so its answer comes within the call's): it is on the primary (and
    /// may be delivered) but would not survive the primary's death.
    #[error(
        "push not acknowledged: {stream} is confirmed by {got} of the {wanted} replicas \
         redis.wait_replicas asks for"
    )]
    NotReplicated {
        /// The stream written.
        stream: String,
        /// `redis.wait_replicas`.
        wanted: u32,
        /// Replicas that confirmed.
        got: u32,
    },
    /// A value could not be encoded for storage.
    #[error("redis unavailable: cannot encode {what}: {reason}")]
    Encode {
        /// What was being stored.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// A room and how many of one user's sessions are in it after a change.
pub type RoomCount = (String, u64);

/// How one user's room membership changed in one store operation: only rooms where the session
/// was actually counted in or out (a retried step counts nothing twice, so it reports nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Rooms the user's session left, each with that user's sessions remaining there.
    pub left: Vec<RoomCount>,
    /// Rooms the user's session joined, each with that user's sessions now there.
    pub joined: Vec<RoomCount>,
}

/// A change to the rooms a session is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomChange<'a> {
    /// Exactly these rooms, in this order (ChangeRoom: one room or none).
    Set(&'a [RoomId]),
    /// This room besides the others (JoinRoom); at the end of the list.
    Join(&'a RoomId),
    /// Out of this room (LeaveRoom).
    Leave(&'a RoomId),
}

/// How a session's rooms are stored in its hash: space-separated (room ids hold no whitespace).
pub fn join_rooms(rooms: &[String]) -> String {
    rooms.join(" ")
}

/// The rooms of a session hash's `rooms` field (see [`join_rooms`]).
pub fn split_rooms(field: &str) -> Vec<String> {
    field.split_whitespace().map(str::to_string).collect()
}

/// The rooms a session leaves and the rooms it joins going from `before` to `after`.
pub fn room_diff(before: &[String], after: &[String]) -> (Vec<String>, Vec<String>) {
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|r| !b.contains(r)).cloned().collect()
    };
    (only(before, after), only(after, before))
}

/// What is stored about a session key before it is (re)registered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionHead {
    /// Comet holding it.
    pub server: Option<String>,
    /// Owner, as stored (unparsable = someone else's).
    pub mid: Option<String>,
    /// Registration time (unix ms); 0 = unknown (re-created by a heartbeat).
    pub since_ms: u64,
}

/// A session to register (connect, or re-auth of a known key).
#[derive(Debug, Clone)]
pub struct Registration {
    /// Session key.
    pub key: String,
    /// Owner.
    pub mid: i64,
    /// Comet holding it.
    pub server: String,
    /// Client platform.
    pub platform: String,
    /// Registration time (unix ms), which identifies this incarnation to kicks.
    pub since_ms: u64,
    /// Lifetime of the session and of its user's session index, renewed by heartbeats.
    pub ttl_secs: u64,
    /// Rooms joined at connect (Auth's `room_id` first, then its `rooms`).
    pub rooms: Vec<RoomId>,
    /// The key was registered on another comet, which must drop it: the key leaves that comet's
    /// session set and this job (a kick) is appended to partition `.0` first.
    pub replaces: Option<Replaced>,
}

/// The other comet's copy of a re-registered key.
#[derive(Debug, Clone)]
pub struct Replaced {
    /// Comet that held the key.
    pub server: String,
    /// Partition the kick goes to (the user's).
    pub partition: u16,
    /// The kick.
    pub kick: PushJob,
}

/// What registering replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registered {
    /// Owner of the replaced session hash, if there was one (as stored).
    pub old_mid: Option<String>,
    /// Rooms the replaced session was counted out of (left by `old_mid`), and the rooms joined.
    pub membership: Membership,
}

/// A session dropped from its comet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Owner, when stored and readable.
    pub mid: Option<i64>,
    /// Rooms the owner left, where the session was counted.
    pub membership: Membership,
}

/// A session whose rooms changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moved {
    /// Owner, when readable.
    pub mid: Option<i64>,
    /// Rooms it was in before, as stored.
    pub from: Vec<String>,
    /// Rooms it is in now.
    pub to: Vec<String>,
    /// The counts after the change.
    pub membership: Membership,
}

/// A registered session as listed to people.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionDetails {
    /// Owner, as stored.
    pub mid: Option<String>,
    /// Comet holding it.
    pub server: Option<String>,
    /// Client platform.
    pub platform: String,
    /// Registration time (unix ms), 0 = unknown.
    pub since_ms: u64,
    /// Rooms it is counted in (ChangeRoom's or Auth's `room_id` first).
    pub rooms: Vec<String>,
}

/// Sessions, their owners' session indexes, comets' session sets and room member counts.
///
/// Rules:
/// * A room's member count for a user (`rim:room:{room}:members`, mid → sessions) changes only
///   in [`SessionStore::register`], [`SessionStore::change_rooms`] and
///   [`SessionStore::drop_session`], by counting a session key in or out of the room once
///   (`rim:room:{room}:keys`), so a count is the number of that user's sessions counted in the
///   room; it never goes below 0 and a user whose count reaches 0 is no longer listed.
/// * The session hash decides: each operation first changes it atomically (checking the comet
///   that holds it), then the user's index, the comet's set and the room counts, each step
///   atomic and idempotent on its own (they live in different hash slots on a Redis Cluster).
///   `register` appends the kick of a replaced copy before anything else.
/// * A call that fails may have done some steps; retrying it completes them without counting
///   anything twice. What a failure between steps can leave until the session ends: a user
///   index entry or comet set entry for a dropped session (harmless: lookups check the session
///   hash), or a room count that misses one change (a member listing off by one session).
/// * A session is dropped or moved only by the comet that holds it (`server` must match), so a
///   late call from a comet the session left changes nothing.
/// * Sessions and users' indexes expire `ttl_secs` after their last registration or heartbeat.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// What is stored about `key`.
    async fn head(&self, key: &str) -> StoreResult<SessionHead>;
    /// Registers (or re-registers) a session; see the trait's rules.
    async fn register(&self, reg: &Registration) -> StoreResult<Registered>;
    /// Drops `key` if `server` holds it, with its room membership. `None` when it is not there.
    async fn drop_session(&self, server: &str, key: &str) -> StoreResult<Option<Dropped>>;
    /// Removes `key` from `mid`'s index (if it points at `server`) and from `server`'s set:
    /// the part of a disconnect that must happen even when the session itself expired.
    async fn unlink(&self, mid: i64, server: &str, key: &str) -> StoreResult<()>;
    /// Changes `key`'s rooms (counting it out of the rooms it leaves, into those it joins) if
    /// `server` holds it; `None` when it does not (the change is ignored). What it leaves is
    /// decided by the rooms stored for it (what was counted), not by the caller's view.
    async fn change_rooms(
        &self,
        server: &str,
        key: &str,
        change: RoomChange<'_>,
    ) -> StoreResult<Option<Moved>>;
    /// Renews `key` (re-creating it without a room and with `since` 0 when Redis lost it) unless
    /// it moved to another comet; returns whether it is `server`'s.
    async fn heartbeat(
        &self,
        server: &str,
        key: &str,
        mid: i64,
        ttl_secs: u64,
    ) -> StoreResult<bool>;
    /// For each mid, its sessions' keys and comets.
    async fn of_mids(&self, mids: &[i64]) -> StoreResult<Vec<HashMap<String, String>>>;
    /// One mid's sessions' keys and comets.
    async fn of_mid(&self, mid: i64) -> StoreResult<HashMap<String, String>> {
        Ok(self
            .of_mids(&[mid])
            .await?
            .into_iter()
            .next()
            .unwrap_or_default())
    }
    /// For each key, its stored owner and comet.
    async fn owners(&self, keys: &[&str]) -> StoreResult<Vec<(Option<String>, Option<String>)>>;
    /// For each key, what is stored about it (empty when nothing is).
    async fn details(&self, keys: &[String]) -> StoreResult<Vec<SessionDetails>>;
    /// Takes up to `n` keys out of `server`'s session set (for purging a departed comet).
    async fn pop_node_sessions(&self, server: &str, n: usize) -> StoreResult<Vec<String>>;
}

/// One live comet and its last reported room counts.
#[derive(Debug, Clone)]
pub struct LiveNode {
    /// As the comet reported it (with `renewed_ms` stamped by logic).
    pub info: NodeInfo,
    /// Registration expiry (unix ms).
    pub expiry_ms: u64,
    /// Room → members on that comet.
    pub rooms: HashMap<String, u64>,
}

/// Comets: their registrations, expiry, room counts and the room → comets index job routes by.
///
/// Rules:
/// * [`NodeStore::renew`] replaces registration and expiry together (one transaction) and the
///   comet's room counts together (another); the room index gains the reported rooms before
///   and loses the comet's previously recorded rooms it no longer reports after, so a room with
///   members on the comet is never missing from the index. Every step is idempotent.
/// * A room is removed from the index only by looking at the comet's recorded rooms (renewal,
///   [`NodeStore::drop_rooms`]); [`NodeStore::room_joined`] therefore records the room under the
///   comet (count 0) before it indexes it.
/// * [`NodeStore::claim_expired`] succeeds for exactly one caller per expiry, so one logic
///   instance purges each departed comet.
#[async_trait]
pub trait NodeStore: Send + Sync {
    /// The registration stored for `server`, if readable.
    async fn stored(&self, server: &str) -> StoreResult<Option<NodeInfo>>;
    /// Indexes `room` under `server` (count 0 until the next renewal); the comet's room record
    /// lives `rooms_ttl_ms`.
    async fn room_joined(&self, server: &str, room: &RoomId, rooms_ttl_ms: u64) -> StoreResult<()>;
    /// Registers or renews `node` until `expiry_ms` with its `reported` room counts (rooms with
    /// members only); the room record lives `rooms_ttl_ms`.
    async fn renew(
        &self,
        node: &NodeInfo,
        expiry_ms: u64,
        reported: &BTreeMap<String, u64>,
        rooms_ttl_ms: u64,
    ) -> StoreResult<()>;
    /// Removes `server`'s registration now.
    async fn remove(&self, server: &str) -> StoreResult<()>;
    /// Removes `server` from every room it recorded, and the record.
    async fn drop_rooms(&self, server: &str) -> StoreResult<()>;
    /// Comets whose registration expired at or before `now_ms`.
    async fn expired(&self, now_ms: u64) -> StoreResult<Vec<String>>;
    /// Removes `server`'s registration if it expired at or before `now_ms`; true for the one
    /// caller that removed it.
    async fn claim_expired(&self, server: &str, now_ms: u64) -> StoreResult<bool>;
    /// Every comet whose registration expires after `now_ms`, in server id order. A registration
    /// that cannot be read still counts, by its id.
    async fn live(&self, now_ms: u64) -> StoreResult<Vec<LiveNode>>;
}

/// A history: a room's or a user's, in the partition its pushes go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryOf {
    /// A room's, in the room's partition.
    Room(u16, RoomId),
    /// A user's, in the user's partition.
    User(u16, i64),
}

/// A history a push is recorded in, and how much that history keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Which history (in the partition of the entry that carries it).
    pub of: HistoryOf,
    /// Most messages kept.
    pub max_len: u64,
    /// Oldest message kept, by the age of its id (ms); the whole history expires this long
    /// after its last message.
    pub max_age_ms: u64,
    /// User histories: the sessions the push is routed to live. Each one present on the comet
    /// it is routed to moves its device's position to the push (see [`HistoryStore`]).
    pub routed: Vec<Routed>,
}

/// One stream entry to append: its partition, the job, and the histories that record it.
#[derive(Debug, Clone)]
pub struct Append {
    /// Partition stream.
    pub partition: u16,
    /// The job.
    pub job: PushJob,
    /// Histories recorded in the same step, all in this partition.
    pub history: Vec<Record>,
}

/// The partitioned push streams job consumes, and the histories written with them.
///
/// Rules: [`PushStreams::append`] writes each partition's entries atomically (all of them or
/// none) and in the order given, at most once per push id (`msg_id`): an append retried after a
/// lost reply finds the first one's mark and adds nothing. Partitions are written independently
/// (on Redis Cluster they live on different masters), so the call returns `Ok` only when every
/// partition's write succeeded, and an error can leave the push in some partitions (the caller
/// answers 503; a partition written is delivered). A partition whose stream already holds
/// `max_backlog` entries (job trims what it acknowledged, so this is job's backlog) is not
/// written and the call fails with [`StoreError::Backlog`]; a push to several partitions checks
/// them all first. Unacknowledged entries are never trimmed to make room. With
/// `redis.wait_replicas` > 0 a write counts as succeeded only when that many replicas confirmed
/// it ([`StoreError::NotReplicated`] otherwise).
///
/// History: each entry's [`Record`]s are written in the same atomic step as the entry and carry
/// the entry's stream id, so a history's ids grow (its room or user always maps to one
/// partition) and equal the `PushId`s comets see. A history keeps at most `max_len` messages,
/// none whose id is older than `max_age_ms`, and expires whole `max_age_ms` after its last
/// write. Trimming never takes back a message of the current write. In the same step, each of a
/// user record's `routed` sessions that is present on the comet it is routed to
/// ([`HistoryStore::present`], not [`HistoryStore::gone`] since) has its device's position (see
/// [`HistoryStore`]) set to the entry's id; a device none of whose routed sessions is present
/// keeps its position, so the push waits for its next connect.
#[async_trait]
pub trait PushStreams: Send + Sync {
    /// Appends each entry to its partition's stream, unless a target holds `max_backlog` entries.
    async fn append(&self, entries: &[Append], max_backlog: u64) -> StoreResult<()>;
}

/// What a history read found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryRead {
    /// Messages, oldest first.
    pub entries: Vec<HistoryEntry>,
    /// Whether the history exists (it expires whole when idle for its max age).
    pub exists: bool,
    /// Its oldest message kept.
    pub first: Option<HistoryId>,
    /// The newest message ever trimmed out of it (`0-0`: none) since it was created.
    pub max_deleted: HistoryId,
}

/// Reading histories, and where each device of a user stands in the user's history.
///
/// Rules: reads see the history as one atomic snapshot. A device's position moves forward when
/// a push is routed to a session of it that is present on the comet it is routed to (the
/// append) or a catch-up gives it messages ([`HistoryStore::advance`] keeps the larger id), back
/// only to what a session that ended was given ([`HistoryStore::gone`] keeps the smaller, and
/// creates no position), and expires with the user's history.
///
/// A session is present on its comet from [`HistoryStore::present`] (before it is indexed for
/// routing) until [`HistoryStore::gone`] (before it is unlinked), which takes the presence away
/// and moves the position back in one atomic step: a push appended before that step moved the
/// position at most to itself and the step moves it back unless the session was given the push;
/// a push appended after it moves nothing. Either way a push routed to a session that never got
/// it stays owed to the device. Presence is kept per (session key, comet), so retried or late
/// calls of one comet touch nothing of another's, and expires with the positions.
#[async_trait]
pub trait HistoryStore: Send + Sync {
    /// Up to `limit` messages after `after`, or the latest `limit` without it.
    async fn read(
        &self,
        of: &HistoryOf,
        after: Option<HistoryId>,
        limit: usize,
    ) -> StoreResult<HistoryRead>;
    /// Where `device` of user `mid` (partition `p`) stands, and the newest message in that
    /// user's history.
    async fn position(
        &self,
        p: u16,
        mid: i64,
        device: &str,
    ) -> StoreResult<(Option<HistoryId>, Option<HistoryId>)>;
    /// Moves `device`'s position to `seen` if that is further; kept `ttl_ms`.
    async fn advance(
        &self,
        p: u16,
        mid: i64,
        device: &str,
        seen: HistoryId,
        ttl_ms: u64,
    ) -> StoreResult<()>;
    /// Records session `at` as present on its comet, remembering where its device stands now
    /// (the earlier of that and what an earlier presence of the same key there remembered);
    /// positions kept `ttl_ms`.
    async fn present(&self, at: &SessionAt<'_>, ttl_ms: u64) -> StoreResult<()>;
    /// Session `at` ended having been `given` what it says: its presence on that comet goes, and
    /// its device's position moves back (if further) to what it was given, or, given nothing,
    /// to where it stood when that presence was recorded. Retreats even when the key is present
    /// on another comet now (a later connect may be given a message twice, never miss one).
    async fn gone(&self, at: &SessionAt<'_>, given: Given, ttl_ms: u64) -> StoreResult<()>;
}

/// People-facing reads and the demo's names: room member listings and display names.
///
/// Rule: [`Directory::sign_in`] gives one name one mid, forever, even under concurrent calls;
/// mids handed out start at `first_mid`.
#[async_trait]
pub trait Directory: Send + Sync {
    /// Distinct users in `room`.
    async fn member_count(&self, room: &str) -> StoreResult<u64>;
    /// One batch of `room`'s members (mid, sessions) from `cursor`, about `count` of them, and
    /// the cursor to continue from (0 = done). Order within a batch is unspecified.
    async fn scan_members(
        &self,
        room: &str,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<(i64, i64)>)>;
    /// Display names of `mids`, where known.
    async fn names(&self, mids: &[i64]) -> StoreResult<Vec<Option<String>>>;
    /// The mid of `name`, assigned on first use, recorded as its display name.
    async fn sign_in(&self, name: &str, first_mid: i64) -> StoreResult<i64>;
}

/// One push partition as the operator page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionView {
    /// Partition number.
    pub partition: u16,
    /// Entries in the stream now.
    pub length: u64,
    /// Entries ever added to it: its rate is the cluster's push intake.
    pub added: u64,
    /// Entries job's group has not read yet (all of them before job made its group); `None`
    /// when Redis cannot tell.
    pub lag: Option<u64>,
    /// Entries read but not acknowledged (being delivered, or waiting for a retry).
    pub pending: u64,
    /// The job worker holding the partition's lease.
    pub holder: Option<String>,
}

/// A job worker whose registration has not expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    /// Worker id.
    pub id: String,
    /// Registration expiry (unix ms).
    pub expiry_ms: u64,
}

/// What the operator page reads about the push streams and the job workers.
///
/// Rules: each partition's stream, group and lease are read together (one atomic read per
/// partition); different partitions are read one after another, so figures of two partitions
/// may be milliseconds apart. Reading changes nothing.
#[async_trait]
pub trait JobStatus: Send + Sync {
    /// Partitions `0..count`, in order.
    async fn partitions(&self, count: u16) -> StoreResult<Vec<PartitionView>>;
    /// Job workers registered past `now_ms`.
    async fn workers(&self, now_ms: u64) -> StoreResult<Vec<WorkerView>>;
}

/// Readiness of the store.
#[async_trait]
pub trait Health: Send + Sync {
    /// Answers within `within`, or says why not.
    async fn ping(&self, within: Duration) -> Result<(), String>;
}

/// The stores logic works with.
#[derive(Clone)]
pub(crate) struct Stores {
    pub(crate) sessions: Arc<dyn SessionStore>,
    pub(crate) nodes: Arc<dyn NodeStore>,
    pub(crate) streams: Arc<dyn PushStreams>,
    pub(crate) history: Arc<dyn HistoryStore>,
    pub(crate) directory: Arc<dyn Directory>,
    pub(crate) job_status: Arc<dyn JobStatus>,
    pub(crate) health: Arc<dyn Health>,
}

impl Stores {
    /// All stores on one Redis connection.
    pub(crate) fn redis(conn: RedisConn) -> Stores {
        Stores {
            sessions: Arc::new(conn.clone()),
            nodes: Arc::new(conn.clone()),
            streams: Arc::new(conn.clone()),
            history: Arc::new(conn.clone()),
            directory: Arc::new(conn.clone()),
            job_status: Arc::new(conn.clone()),
            health: Arc::new(conn),
        }
    }

    /// All stores in process memory (unit tests).
    #[cfg(test)]
    pub(crate) fn memory() -> (Stores, Arc<memory::Memory>) {
        let m = Arc::new(memory::Memory::default());
        (
            Stores {
                sessions: m.clone(),
                nodes: m.clone(),
                streams: m.clone(),
                history: m.clone(),
                directory: m.clone(),
                job_status: m.clone(),
                health: m.clone(),
            },
            m,
        )
    }
}
