//! Every logic store in process memory, keeping the rules written on the traits, for unit tests
//! of the domain rules (registration, room counts, kicks, presence, routing) without a Redis.
//! Lifetimes run on tokio's clock, so `tokio::time::pause()` and `advance` expire sessions.
//! Not a substitute for the Redis implementations: those are tested against a real redis-server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rim_proto::job::PushJob;
use rim_proto::rpc::NodeInfo;
use tokio::time::Instant;

use super::{
    Dropped, Membership, Moved, Registered, Registration, RoomChange, SessionDetails, SessionHead,
    SessionStore, StoreResult, room_diff,
};

mod history;
mod nodes;

/// A stored session hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionRecord {
    pub(crate) mid: String,
    pub(crate) server: String,
    pub(crate) platform: String,
    pub(crate) since_ms: u64,
    pub(crate) rooms: Vec<String>,
    until: Instant,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<String, SessionRecord>,
    /// mid → (key → server), until.
    mids: HashMap<i64, (HashMap<String, String>, Instant)>,
    node_sessions: HashMap<String, BTreeSet<String>>,
    /// room → (mid as stored → sessions).
    members: HashMap<String, BTreeMap<String, i64>>,
    streams: BTreeMap<u16, Vec<PushJob>>,
    /// History key → its messages and the newest id trimmed out of it.
    histories: HashMap<String, history::Kept>,
    /// (partition, mid, device) → position.
    seen: HashMap<(u16, i64, String), rim_proto::history::HistoryId>,
    /// (partition, mid, key, server) of present sessions → where the device stood then.
    present: HashMap<(u16, i64, String, String), rim_proto::history::HistoryId>,
    nodes: BTreeMap<String, NodeInfo>,
    expiry: BTreeMap<String, u64>,
    /// server → (room → members), until.
    node_rooms: HashMap<String, (BTreeMap<String, u64>, Instant)>,
    room_nodes: HashMap<String, BTreeSet<String>>,
    names: BTreeMap<i64, String>,
    mids_by_name: HashMap<String, i64>,
    next_mid: i64,
    /// While set, reads of the comet registry fail (Redis unreachable).
    down: bool,
}

impl State {
    fn session(&mut self, key: &str) -> Option<&mut SessionRecord> {
        if self
            .sessions
            .get(key)
            .is_some_and(|s| s.until <= Instant::now())
        {
            self.sessions.remove(key);
        }
        self.sessions.get_mut(key)
    }

    fn mid_index(&mut self, mid: i64) -> Option<&mut HashMap<String, String>> {
        if self
            .mids
            .get(&mid)
            .is_some_and(|(_, until)| *until <= Instant::now())
        {
            self.mids.remove(&mid);
        }
        self.mids.get_mut(&mid).map(|(m, _)| m)
    }

    /// HSET of `key` → `server` in `mid`'s index, then EXPIRE (a lapsed index starts afresh).
    fn index_key(&mut self, mid: i64, key: &str, server: &str, until: Instant) {
        let _ = self.mid_index(mid);
        let index = self
            .mids
            .entry(mid)
            .or_insert_with(|| (HashMap::new(), until));
        index.0.insert(key.to_string(), server.to_string());
        index.1 = until;
    }

    fn node_rooms(&mut self, server: &str) -> Option<&mut BTreeMap<String, u64>> {
        if self
            .node_rooms
            .get(server)
            .is_some_and(|(_, until)| *until <= Instant::now())
        {
            self.node_rooms.remove(server);
        }
        self.node_rooms.get_mut(server).map(|(r, _)| r)
    }

    fn mem_inc(&mut self, room: &str, mid: &str) -> i64 {
        let n = self
            .members
            .entry(room.to_string())
            .or_default()
            .entry(mid.to_string())
            .or_insert(0);
        *n += 1;
        *n
    }

    /// Counts `mid` out of each of `rooms`: the rooms it was counted in, with its count left.
    fn leave_all(&mut self, rooms: &[String], mid: &str) -> Vec<(String, u64)> {
        rooms
            .iter()
            .filter_map(|r| counted(r, self.mem_dec(r, mid)))
            .collect()
    }

    /// Counts `mid` into each of `rooms`, with its count now.
    fn join_all(&mut self, rooms: &[String], mid: &str) -> Vec<(String, u64)> {
        rooms
            .iter()
            .filter_map(|r| counted(r, self.mem_inc(r, mid)))
            .collect()
    }

    /// -1 when there was nothing to decrement; a count reaching 0 is removed.
    fn mem_dec(&mut self, room: &str, mid: &str) -> i64 {
        let Some(counts) = self.members.get_mut(room) else {
            return -1;
        };
        let n = counts.get(mid).copied().unwrap_or(0);
        if n <= 1 {
            counts.remove(mid);
            if counts.is_empty() {
                self.members.remove(room);
            }
            return if n <= 0 { -1 } else { 0 };
        }
        counts.insert(mid.to_string(), n - 1);
        n - 1
    }
}

fn counted(room: &str, n: i64) -> Option<(String, u64)> {
    (!room.is_empty() && n >= 0).then(|| (room.to_string(), n.unsigned_abs()))
}

/// The session's rooms after `change`, from `before` (duplicates never added): what the Redis
/// store's `ROOMS_CHANGE` script computes.
fn rooms_after(change: RoomChange<'_>, before: &[String]) -> Vec<String> {
    match change {
        RoomChange::Set(rooms) => {
            let mut out: Vec<String> = Vec::with_capacity(rooms.len());
            for r in rooms {
                if !out.iter().any(|o| o == r.as_str()) {
                    out.push(r.to_string());
                }
            }
            out
        }
        RoomChange::Join(room) => {
            let mut out = before.to_vec();
            if !out.iter().any(|o| o == room.as_str()) {
                out.push(room.to_string());
            }
            out
        }
        RoomChange::Leave(room) => before
            .iter()
            .filter(|o| *o != room.as_str())
            .cloned()
            .collect(),
    }
}

fn secs(ttl_secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(ttl_secs)
}

fn millis(ttl_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ttl_ms)
}

/// All of logic's stores in one mutex-guarded state.
#[derive(Debug, Default)]
pub(crate) struct Memory(Mutex<State>);

impl Memory {
    /// Makes reads of the comet registry fail (`true`, Redis unreachable) or work again.
    pub(crate) fn set_down(&self, down: bool) {
        self.0.lock().down = down;
    }

    /// Jobs appended to partition `p`, oldest first.
    pub(crate) fn stream(&self, p: u16) -> Vec<PushJob> {
        self.0.lock().streams.get(&p).cloned().unwrap_or_default()
    }

    /// Every job appended, by partition.
    pub(crate) fn all_jobs(&self) -> Vec<PushJob> {
        self.0.lock().streams.values().flatten().cloned().collect()
    }

    /// The session stored under `key`, if live.
    pub(crate) fn session(&self, key: &str) -> Option<SessionRecord> {
        self.0.lock().session(key).cloned()
    }

    /// `mid`'s sessions in `room`.
    pub(crate) fn members(&self, room: &str, mid: i64) -> Option<i64> {
        self.0
            .lock()
            .members
            .get(room)
            .and_then(|m| m.get(&mid.to_string()))
            .copied()
    }

    /// Keys in `server`'s session set.
    pub(crate) fn node_sessions(&self, server: &str) -> BTreeSet<String> {
        self.0
            .lock()
            .node_sessions
            .get(server)
            .cloned()
            .unwrap_or_default()
    }

    /// Comets indexed under `room`.
    pub(crate) fn room_nodes(&self, room: &str) -> BTreeSet<String> {
        self.0
            .lock()
            .room_nodes
            .get(room)
            .cloned()
            .unwrap_or_default()
    }
}

#[async_trait]
impl SessionStore for Memory {
    async fn head(&self, key: &str) -> StoreResult<SessionHead> {
        let mut st = self.0.lock();
        Ok(st
            .session(key)
            .map(|s| SessionHead {
                server: Some(s.server.clone()),
                mid: Some(s.mid.clone()),
                since_ms: s.since_ms,
            })
            .unwrap_or_default())
    }

    async fn register(&self, reg: &Registration) -> StoreResult<Registered> {
        let mut st = self.0.lock();
        if let Some(old) = &reg.replaces {
            if let Some(set) = st.node_sessions.get_mut(&old.server) {
                set.remove(&reg.key);
            }
            st.streams
                .entry(old.partition)
                .or_default()
                .push(old.kick.clone());
        }
        let until = secs(reg.ttl_secs);
        st.index_key(reg.mid, &reg.key, &reg.server, until);
        st.node_sessions
            .entry(reg.server.clone())
            .or_default()
            .insert(reg.key.clone());
        let mid = reg.mid.to_string();
        let rooms = rooms_after(RoomChange::Set(&reg.rooms), &[]);
        let old = st
            .session(&reg.key)
            .map(|s| (s.mid.clone(), s.rooms.clone()));
        let mut membership = Membership::default();
        match &old {
            // The same user's re-registration stays counted in the rooms it keeps.
            Some((om, or)) if *om == mid => {
                let (gone, new) = room_diff(or, &rooms);
                membership.left = st.leave_all(&gone, om);
                membership.joined = st.join_all(&new, &mid);
            }
            Some((om, or)) => {
                membership.left = st.leave_all(or, om);
                membership.joined = st.join_all(&rooms, &mid);
            }
            None => membership.joined = st.join_all(&rooms, &mid),
        }
        st.sessions.insert(
            reg.key.clone(),
            SessionRecord {
                mid,
                server: reg.server.clone(),
                platform: reg.platform.clone(),
                since_ms: reg.since_ms,
                rooms,
                until,
            },
        );
        Ok(Registered {
            old_mid: old.map(|(m, _)| m),
            membership,
        })
    }

    async fn drop_session(&self, server: &str, key: &str) -> StoreResult<Option<Dropped>> {
        let mut st = self.0.lock();
        let Some(s) = st.session(key).filter(|s| s.server == server).cloned() else {
            return Ok(None);
        };
        st.sessions.remove(key);
        if let Ok(mid) = s.mid.parse::<i64>()
            && let Some(index) = st.mid_index(mid)
            && index.get(key).map(String::as_str) == Some(server)
        {
            index.remove(key);
        }
        let left = st.leave_all(&s.rooms, &s.mid);
        Ok(Some(Dropped {
            mid: s.mid.parse().ok(),
            membership: Membership {
                left,
                joined: Vec::new(),
            },
        }))
    }

    async fn unlink(&self, mid: i64, server: &str, key: &str) -> StoreResult<()> {
        let mut st = self.0.lock();
        if let Some(index) = st.mid_index(mid)
            && index.get(key).map(String::as_str) == Some(server)
        {
            index.remove(key);
        }
        if let Some(set) = st.node_sessions.get_mut(server) {
            set.remove(key);
        }
        Ok(())
    }

    async fn change_rooms(
        &self,
        server: &str,
        key: &str,
        change: RoomChange<'_>,
    ) -> StoreResult<Option<Moved>> {
        let mut st = self.0.lock();
        let Some(s) = st.session(key).filter(|s| s.server == server).cloned() else {
            return Ok(None);
        };
        let to = rooms_after(change, &s.rooms);
        let (gone, new) = room_diff(&s.rooms, &to);
        let membership = Membership {
            left: st.leave_all(&gone, &s.mid),
            joined: st.join_all(&new, &s.mid),
        };
        if let Some(rec) = st.session(key) {
            rec.rooms = to.clone();
        }
        Ok(Some(Moved {
            mid: s.mid.parse().ok(),
            from: s.rooms,
            to,
            membership,
        }))
    }

    async fn heartbeat(
        &self,
        server: &str,
        key: &str,
        mid: i64,
        ttl_secs: u64,
    ) -> StoreResult<bool> {
        let mut st = self.0.lock();
        let until = secs(ttl_secs);
        match st.session(key) {
            Some(s) if s.server != server => return Ok(false),
            Some(s) => s.until = until,
            None => {
                st.sessions.insert(
                    key.to_string(),
                    SessionRecord {
                        mid: mid.to_string(),
                        server: server.to_string(),
                        platform: String::new(),
                        since_ms: 0,
                        rooms: Vec::new(),
                        until,
                    },
                );
            }
        }
        st.index_key(mid, key, server, until);
        st.node_sessions
            .entry(server.to_string())
            .or_default()
            .insert(key.to_string());
        Ok(true)
    }

    async fn of_mids(&self, mids: &[i64]) -> StoreResult<Vec<HashMap<String, String>>> {
        let mut st = self.0.lock();
        Ok(mids
            .iter()
            .map(|m| st.mid_index(*m).cloned().unwrap_or_default())
            .collect())
    }

    async fn owners(&self, keys: &[&str]) -> StoreResult<Vec<(Option<String>, Option<String>)>> {
        let mut st = self.0.lock();
        Ok(keys
            .iter()
            .map(|k| match st.session(k) {
                Some(s) => (Some(s.mid.clone()), Some(s.server.clone())),
                None => (None, None),
            })
            .collect())
    }

    async fn details(&self, keys: &[String]) -> StoreResult<Vec<SessionDetails>> {
        let mut st = self.0.lock();
        Ok(keys
            .iter()
            .map(|k| match st.session(k) {
                Some(s) => SessionDetails {
                    mid: Some(s.mid.clone()),
                    server: Some(s.server.clone()),
                    platform: s.platform.clone(),
                    since_ms: s.since_ms,
                    rooms: s.rooms.clone(),
                },
                None => SessionDetails::default(),
            })
            .collect())
    }

    async fn pop_node_sessions(&self, server: &str, n: usize) -> StoreResult<Vec<String>> {
        let mut st = self.0.lock();
        let Some(set) = st.node_sessions.get_mut(server) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while out.len() < n
            && let Some(k) = set.pop_first()
        {
            out.push(k);
        }
        Ok(out)
    }
}
