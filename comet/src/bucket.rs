//! Sessions sharded into buckets by key hash, each under its own short-held lock, with the room
//! membership of the bucket's sessions (room pushes visit each bucket's members).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use rim_proto::room::RoomId;

use crate::session::Session;

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, Arc<Session>>,
    rooms: HashMap<RoomId, HashMap<u64, Arc<Session>>>,
}

/// One shard.
#[derive(Default)]
pub struct Bucket {
    inner: Mutex<Inner>,
}

impl Bucket {
    /// Calls `f` for every session (under the bucket lock: `f` must not block).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Session>)) {
        for s in self.inner.lock().sessions.values() {
            f(s);
        }
    }

    /// Calls `f` for every member of `room` in this bucket (under the lock: `f` must not block).
    pub fn for_each_in_room(&self, room: &RoomId, mut f: impl FnMut(&Arc<Session>)) {
        if let Some(members) = self.inner.lock().rooms.get(room) {
            for s in members.values() {
                f(s);
            }
        }
    }

    /// Sessions in this bucket.
    pub fn len(&self) -> usize {
        self.inner.lock().sessions.len()
    }

    /// Whether the bucket holds no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// All buckets of the comet.
pub struct Buckets {
    shards: Vec<Bucket>,
}

impl Buckets {
    /// `count` buckets (at least one).
    pub fn new(count: usize) -> Self {
        Buckets {
            shards: (0..count.clamp(1, usize::from(u16::MAX)))
                .map(|_| Bucket::default())
                .collect(),
        }
    }

    /// The bucket a key belongs to.
    pub fn bucket(&self, key: &str) -> &Bucket {
        // The same FNV-1a hash as stream partitioning; `bucket.count` is validated to fit a u16
        // (and `new` clamps it), so the shard index is always in range.
        let n = u16::try_from(self.shards.len()).unwrap_or(u16::MAX);
        &self.shards[usize::from(rim_proto::job::partition_of(key, n))]
    }

    /// Every bucket.
    pub fn all(&self) -> &[Bucket] {
        &self.shards
    }

    /// Registers a session; returns the session it replaced (same key), if any. The new session
    /// inherits the old one's dedupe marks, so a replay of pushes the old one got is no
    /// duplicate for the client that reconnected.
    pub fn insert(&self, s: Arc<Session>) -> Option<Arc<Session>> {
        let mut inner = self.bucket(&s.key).inner.lock();
        let old = inner.sessions.insert(s.key.clone(), s.clone());
        if let Some(old) = &old {
            // Under the bucket lock: no delivery finds `old` by key or room from here on.
            s.inherit_marks(old);
        }
        if let Some(old) = &old {
            // The old session's own cleanup will not find itself once replaced; drop it here.
            for room in old.rooms() {
                if let Some(m) = inner.rooms.get_mut(&room) {
                    m.remove(&old.id);
                    if m.is_empty() {
                        inner.rooms.remove(&room);
                    }
                }
            }
        }
        old
    }

    /// Unregisters `s` if it is still the session registered under its key.
    pub fn remove(&self, s: &Session) -> bool {
        let mut inner = self.bucket(&s.key).inner.lock();
        match inner.sessions.get(&s.key) {
            Some(cur) if cur.id == s.id => {
                inner.sessions.remove(&s.key);
                true
            }
            _ => false,
        }
    }

    /// The session registered under `key`.
    pub fn get(&self, key: &str) -> Option<Arc<Session>> {
        self.bucket(key).inner.lock().sessions.get(key).cloned()
    }

    /// Adds `s` to `room`'s members in its bucket; false if `s` is no longer registered.
    pub fn join(&self, room: &RoomId, s: &Arc<Session>) -> bool {
        let mut inner = self.bucket(&s.key).inner.lock();
        if !matches!(inner.sessions.get(&s.key), Some(cur) if cur.id == s.id) {
            return false;
        }
        inner
            .rooms
            .entry(room.clone())
            .or_default()
            .insert(s.id, s.clone());
        true
    }

    /// Removes `s` from `room`'s members; true if it was a member.
    pub fn leave(&self, room: &RoomId, s: &Session) -> bool {
        let mut inner = self.bucket(&s.key).inner.lock();
        let Some(m) = inner.rooms.get_mut(room) else {
            return false;
        };
        let was = m.remove(&s.id).is_some();
        if m.is_empty() {
            inner.rooms.remove(room);
        }
        was
    }

    /// Members of each room on this comet, and (sessions, distinct client IPs).
    pub fn snapshot(&self) -> (HashMap<RoomId, u32>, u64, u64) {
        let mut rooms: HashMap<RoomId, u32> = HashMap::new();
        let mut ips: HashSet<IpAddr> = HashSet::new();
        let mut sessions = 0u64;
        for b in &self.shards {
            let inner = b.inner.lock();
            sessions += inner.sessions.len() as u64;
            ips.extend(inner.sessions.values().map(|s| s.peer.ip()));
            for (room, m) in &inner.rooms {
                *rooms.entry(room.clone()).or_default() += m.len() as u32;
            }
        }
        (rooms, sessions, ips.len() as u64)
    }

    /// Members of `room` on this comet.
    pub fn room_len(&self, room: &RoomId) -> usize {
        self.shards
            .iter()
            .map(|b| b.inner.lock().rooms.get(room).map_or(0, HashMap::len))
            .sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::session;

    #[test]
    fn membership_and_replacement() {
        let b = Buckets::new(4);
        let room = RoomId::parse("live://1").unwrap();
        let a = session(1, "a", &[]);
        let c = session(2, "c", &[]);
        assert!(b.insert(a.clone()).is_none());
        assert!(b.insert(c.clone()).is_none());
        assert!(b.join(&room, &a));
        a.add_room(room.clone());
        assert!(b.join(&room, &c));
        assert_eq!(b.room_len(&room), 2);
        let (rooms, n, ips) = b.snapshot();
        assert_eq!((rooms.get(&room).copied(), n, ips), (Some(2), 2, 1));

        // Same key again: the old one is returned and drops out of the room.
        let a2 = session(3, "a", &[]);
        let pid = rim_proto::rpc::PushId {
            partition: 2,
            ms: 5,
            seq: 0,
        };
        assert!(a.mark(pid));
        let old = b.insert(a2.clone()).unwrap();
        assert!(!a2.mark(pid), "the successor inherits the dedupe marks");
        assert_eq!(old.id, 1);
        assert_eq!(b.room_len(&room), 1);
        assert!(
            !b.remove(&a),
            "the replaced session must not remove its successor"
        );
        assert_eq!(b.get("a").unwrap().id, 3);
        assert!(!b.join(&room, &a), "unregistered sessions cannot join");

        assert!(b.leave(&room, &c));
        assert_eq!(b.room_len(&room), 0);
        assert!(b.remove(&a2));
        assert!(b.get("a").is_none());
    }
}
