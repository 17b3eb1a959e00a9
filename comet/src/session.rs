//! A session's shared state: the handle that buckets, rooms and delivery hold for an
//! authenticated connection (identity, accepted ops, dedupe marks, room, outbound queue). The
//! connection's task that drives it lives in `driver`.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rim_proto::history::{HistoryId, HistoryPage, Source};
use rim_proto::room::RoomId;
use rim_proto::rpc::{PushId, SessionRef, TokenGrant};

use crate::catch_up::{Admit, CatchUp};
use crate::outbound::Outbound;
use crate::writer::EncodedPush;

/// The shared handle of an authenticated session.
#[derive(Debug)]
pub struct Session {
    /// Unique per connection on this comet (tells a replaced session from its successor).
    pub id: u64,
    /// User id.
    pub mid: i64,
    /// Session key.
    pub key: String,
    /// Client address.
    pub peer: SocketAddr,
    /// Outbound queue.
    pub out: Arc<Outbound>,
    /// When logic registered this session (its `ConnectReply::since_ms`): identifies it in kicks,
    /// so a late kick for an older session with the same key leaves this one alone.
    pub since_ms: u64,
    /// Sorted, without duplicates: one op is the common case, so a small vector, not a set.
    accepts: RwLock<Vec<i32>>,
    /// What it was given: high-water marks and, while needed, a catch-up.
    marks: Mutex<Marks>,
    /// It asked for push ids (Auth `recover`): recorded pushes go out tagged (see `tagged`).
    pub tagged: bool,
    /// The rooms it is in, in the order joined: the first is the goim room (Auth's `room_id` or
    /// the last ChangeRoom), whose count heartbeat replies carry. At most `session.max_rooms`.
    rooms: Mutex<Vec<RoomId>>,
    /// What the client's token grants (rooms, end of the session); replaced by op 22.
    grant: Mutex<TokenGrant>,
}

/// What a session was given.
#[derive(Debug, Default)]
struct Marks {
    /// Highest push id delivered per dedupe namespace (see [`MarkSpace`]); a session sees few
    /// partitions, so a small vec.
    high: Vec<(u32, u64, u64)>,
    /// A catch-up under way or recently done (boxed: most sessions never have one).
    catch_up: Option<Box<CatchUp>>,
}

impl Marks {
    /// Whether the push `id` (or a later one) was had under `key`.
    fn had(&self, key: u32, id: PushId) -> bool {
        self.high
            .iter()
            .any(|m| m.0 == key && (id.ms, id.seq) <= (m.1, m.2))
    }

    /// Records `(ms, seq)` as the high-water mark of `key` if it is later; false when it (or
    /// later) was had.
    fn advance(&mut self, key: u32, ms: u64, seq: u64) -> bool {
        match self.high.iter_mut().find(|m| m.0 == key) {
            Some(m) if (ms, seq) <= (m.1, m.2) => false,
            Some(m) => {
                (m.1, m.2) = (ms, seq);
                true
            }
            None => {
                self.high.push((key, ms, seq));
                true
            }
        }
    }
}

/// `ops` sorted and deduplicated, holding no spare capacity.
fn sorted_ops(ops: impl Iterator<Item = i32>) -> Vec<i32> {
    let mut v: Vec<i32> = ops.collect();
    v.sort_unstable();
    v.dedup();
    v.shrink_to_fit();
    v
}

/// Most ops one session may accept (Auth `accepts` plus Sub); a client cannot grow its filter
/// set without bound.
pub const MAX_ACCEPTS: usize = 256;

/// Which high-water mark a push is checked against.
///
/// Paced broadcasts (`All { speed > 0 }`) reach sessions long after pushes that job sent later
/// on the same partition, so they keep marks of their own: ordered among themselves (one paced
/// worker per comet) and independent of everything delivered at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkSpace {
    /// Everything delivered during the `deliver` call.
    Immediate,
    /// Paced broadcasts.
    Paced,
}

impl MarkSpace {
    /// The mark key: partitions are u16, so bit 16 keeps the two spaces apart for any partition.
    fn key(self, partition: u16) -> u32 {
        match self {
            MarkSpace::Immediate => u32::from(partition),
            MarkSpace::Paced => u32::from(partition) | 0x1_0000,
        }
    }
}

impl Session {
    /// A session accepting `accepts`.
    pub fn new(
        id: u64,
        mid: i64,
        key: String,
        peer: SocketAddr,
        out: Arc<Outbound>,
        accepts: &[i32],
    ) -> Self {
        Session {
            id,
            mid,
            key,
            peer,
            out,
            since_ms: 0,
            accepts: RwLock::new(sorted_ops(accepts.iter().copied().take(MAX_ACCEPTS))),
            marks: Mutex::new(Marks::default()),
            tagged: false,
            rooms: Mutex::new(Vec::new()),
            grant: Mutex::new(TokenGrant::default()),
        }
    }

    /// Sets the registration time logic reported (see [`Session::since_ms`]).
    pub fn with_since(mut self, since_ms: u64) -> Self {
        self.since_ms = since_ms;
        self
    }

    /// Marks the session as one that wants push ids.
    pub fn with_tagged(mut self, tagged: bool) -> Self {
        self.tagged = tagged;
        self
    }

    /// Whether a push with `op` goes to this session.
    pub fn accepts(&self, op: i32) -> bool {
        self.accepts.read().binary_search(&op).is_ok()
    }

    /// Adds (Sub) or removes (Unsub) accepted ops. A Sub that would leave more than
    /// [`MAX_ACCEPTS`] ops changes nothing and is refused with the reason.
    pub fn set_accepts(&self, ops: &[i32], accept: bool) -> Result<(), String> {
        let mut a = self.accepts.write();
        let next = if accept {
            let next = sorted_ops(a.iter().chain(ops).copied());
            if next.len() > MAX_ACCEPTS {
                return Err(format!("too many ops: at most {MAX_ACCEPTS}"));
            }
            next
        } else {
            sorted_ops(a.iter().copied().filter(|op| !ops.contains(op)))
        };
        *a = next;
        Ok(())
    }

    /// Records `id` as delivered; false when it (or a later push of its partition) already was.
    pub fn mark(&self, id: PushId) -> bool {
        self.mark_in(MarkSpace::Immediate, id)
    }

    /// [`Session::mark`] against the high-water marks of `space`.
    pub fn mark_in(&self, space: MarkSpace, id: PushId) -> bool {
        self.marks
            .lock()
            .advance(space.key(id.partition), id.ms, id.seq)
    }

    /// Decides about a live push recorded in `source` (`None`: in no history): a duplicate when
    /// the session had it, held while that history is caught up, else fresh (and recorded).
    pub fn admit(
        &self,
        space: MarkSpace,
        id: PushId,
        source: Option<&Source>,
        push: &Arc<EncodedPush>,
    ) -> Admit {
        let mut marks = self.marks.lock();
        let key = space.key(id.partition);
        // The partition's mark first: a replay is a duplicate, never held for a catch-up.
        if marks.had(key, id) {
            return Admit::Duplicate;
        }
        let verdict = match (source, marks.catch_up.as_deref_mut()) {
            (Some(source), Some(c)) => c.admit(source, id, push),
            _ => Admit::Fresh,
        };
        if verdict == Admit::Duplicate {
            return verdict;
        }
        marks.advance(key, id.ms, id.seq);
        if marks.catch_up.as_deref().is_some_and(CatchUp::is_idle) {
            marks.catch_up = None;
        }
        verdict
    }

    /// Starts a catch-up of `source`: its live pushes are held until [`Session::finish_catch_up`].
    pub fn begin_catch_up(&self, source: Source) {
        self.marks
            .lock()
            .catch_up
            .get_or_insert_with(Box::default)
            .begin(source);
    }

    /// Ends the catch-up of `source` from `after` with what its history holds (`None`: the read
    /// failed) and returns what goes out now, in order, and how much of it came from the
    /// history (see [`CatchUp::finish`]).
    pub fn finish_catch_up(
        &self,
        source: &Source,
        partition: u16,
        after: Option<HistoryId>,
        page: Option<HistoryPage>,
    ) -> (Vec<Arc<EncodedPush>>, usize) {
        let mut marks = self.marks.lock();
        let Some(c) = marks.catch_up.as_deref_mut() else {
            return (Vec::new(), 0);
        };
        c.finish(source, partition, after, page, |op| self.accepts(op))
    }

    /// How far the session got in its user's history (partition `partition`): the later of its
    /// mark there and what a catch-up gave it; after a failed catch-up, where that started (the
    /// messages wait for the next connect, even if some came live: at least once).
    pub fn user_seen(&self, partition: u16) -> Option<HistoryId> {
        let marks = self.marks.lock();
        let caught = match marks.catch_up.as_deref() {
            Some(c) if c.user_failed.is_some() => return c.user_failed,
            Some(c) => c.caught(&Source::User),
            None => None,
        };
        let key = MarkSpace::Immediate.key(partition);
        let high = marks
            .high
            .iter()
            .find(|m| m.0 == key)
            .map(|&(_, ms, seq)| PushId { partition, ms, seq });
        high.max(caught).map(|id| id.history_id())
    }

    /// Takes over `old`'s high-water marks (a session replacing `old` with the same key on this
    /// comet): a takeover replay of pushes `old` already got must not show the client duplicates.
    pub fn inherit_marks(&self, old: &Session) {
        let theirs = old.marks.lock().high.clone();
        let mut mine = self.marks.lock();
        for (key, ms, seq) in theirs {
            mine.advance(key, ms, seq);
        }
    }

    /// Sets what the client's token grants (at Auth, and when op 22 brings a fresh token).
    pub fn set_grant(&self, grant: TokenGrant) {
        *self.grant.lock() = grant;
    }

    /// What the client's token grants.
    pub fn grant(&self) -> TokenGrant {
        self.grant.lock().clone()
    }

    /// When the session must end unless a fresh token arrives (unix ms; 0 = never).
    pub fn expires_ms(&self) -> u64 {
        self.grant.lock().expires_ms
    }

    /// The session's first room (goim's "the room": heartbeat replies count it).
    pub fn room(&self) -> Option<RoomId> {
        self.rooms.lock().first().cloned()
    }

    /// Every room the session is in, the first one first.
    pub fn rooms(&self) -> Vec<RoomId> {
        self.rooms.lock().clone()
    }

    /// Whether the session is in `room`.
    pub fn in_room(&self, room: &RoomId) -> bool {
        self.rooms.lock().contains(room)
    }

    /// How many rooms the session is in.
    pub fn room_count(&self) -> usize {
        self.rooms.lock().len()
    }

    /// Records that the session is in `room` (at the end; never twice).
    pub(crate) fn add_room(&self, room: RoomId) {
        let mut rooms = self.rooms.lock();
        if !rooms.contains(&room) {
            // Exactly one more slot: most sessions are in one room, and a default growth to
            // four slots would cost each of them about 70 bytes for nothing. Joins are rare.
            rooms.reserve_exact(1);
            rooms.push(room);
        }
    }

    /// Records that the session left `room`.
    pub(crate) fn remove_room(&self, room: &RoomId) {
        self.rooms.lock().retain(|r| r != room);
    }

    /// Reference for logic calls.
    pub fn session_ref(&self, server: &str) -> SessionRef {
        SessionRef {
            server: server.to_string(),
            mid: self.mid,
            key: self.key.clone(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::session;

    fn pid(partition: u16, ms: u64, seq: u64) -> PushId {
        PushId { partition, ms, seq }
    }

    #[test]
    fn dedupe_marks_are_per_partition_high_water() {
        let s = session(1, "k", &[1000]);
        assert!(s.mark(pid(1, 10, 0)));
        assert!(!s.mark(pid(1, 10, 0)));
        assert!(!s.mark(pid(1, 9, 5)));
        assert!(s.mark(pid(1, 10, 1)));
        assert!(s.mark(pid(2, 1, 0)), "other partition is independent");
        assert!(!s.mark(pid(2, 1, 0)));
    }

    #[test]
    fn op_filter_follows_sub_and_unsub() {
        let s = session(1, "k", &[1000]);
        assert!(s.accepts(1000));
        assert!(!s.accepts(1001));
        s.set_accepts(&[1001, 1002], true).unwrap();
        assert!(s.accepts(1001));
        s.set_accepts(&[1000], false).unwrap();
        assert!(!s.accepts(1000));
    }

    #[test]
    fn accepted_ops_are_capped() {
        let s = session(1, "k", &[1000]);
        let many: Vec<i32> = (2000..2000 + MAX_ACCEPTS as i32).collect();
        let e = s.set_accepts(&many, true).unwrap_err();
        assert_eq!(e, format!("too many ops: at most {MAX_ACCEPTS}"));
        assert!(!s.accepts(2000), "a refused Sub changes nothing");
        // 1000 is already accepted, so this fills the set exactly.
        s.set_accepts(&many[..MAX_ACCEPTS - 1], true).unwrap();
        s.set_accepts(&[1000], true).unwrap();
        assert!(s.set_accepts(&[9999], true).is_err());
        s.set_accepts(&[1000], false).unwrap();
        s.set_accepts(&[9999], true).unwrap();
    }

    #[test]
    fn auth_accepts_beyond_the_cap_are_ignored() {
        let many: Vec<i32> = (2000..2000 + MAX_ACCEPTS as i32 + 44).collect();
        let s = session(1, "k", &many);
        // The first MAX_ACCEPTS of them, in the order given, are taken.
        assert!(s.accepts(2000));
        assert!(s.accepts(2000 + MAX_ACCEPTS as i32 - 1));
        assert!(!s.accepts(2000 + MAX_ACCEPTS as i32));
        assert!(!s.accepts(2299));
        // The set is full.
        assert_eq!(
            s.set_accepts(&[1], true).unwrap_err(),
            format!("too many ops: at most {MAX_ACCEPTS}")
        );
    }

    #[test]
    fn paced_marks_are_a_namespace_of_their_own() {
        let s = session(1, "k", &[1000]);
        assert!(s.mark(pid(1, 10, 5)));
        // A paced broadcast sent earlier on the same partition still gets through.
        assert!(s.mark_in(MarkSpace::Paced, pid(1, 10, 3)));
        assert!(!s.mark_in(MarkSpace::Paced, pid(1, 10, 3)));
        assert!(s.mark_in(MarkSpace::Paced, pid(1, 10, 4)));
        assert!(!s.mark(pid(1, 10, 5)));
        // Partition 0xffff does not collide with the paced space of any partition.
        assert!(s.mark(pid(u16::MAX, 1, 0)));
        assert!(s.mark_in(MarkSpace::Paced, pid(u16::MAX, 1, 0)));
    }

    #[test]
    fn a_replay_during_a_catch_up_is_a_duplicate_not_held() {
        let s = session(1, "k", &[1000]);
        let push = Arc::new(EncodedPush::new(1000, b"m"));
        let admit = |seq| {
            s.admit(
                MarkSpace::Immediate,
                pid(1, 10, seq),
                Some(&Source::User),
                &push,
            )
        };
        assert_eq!(admit(5), Admit::Fresh);
        s.begin_catch_up(Source::User);
        // Job replays 5 (a takeover) while the user's history is read: the session had it.
        assert_eq!(admit(5), Admit::Duplicate);
        assert_eq!(admit(6), Admit::Held);
        let (out, _) = s.finish_catch_up(&Source::User, 1, None, None);
        assert_eq!(out.len(), 1, "only the new push is released");
    }

    #[test]
    fn a_successor_inherits_marks() {
        let old = session(1, "k", &[1000]);
        let new = session(1, "k", &[1000]);
        assert!(old.mark(pid(1, 10, 5)));
        assert!(old.mark_in(MarkSpace::Paced, pid(1, 10, 2)));
        assert!(new.mark(pid(2, 1, 1)));
        new.inherit_marks(&old);
        assert!(!new.mark(pid(1, 10, 5)), "replayed push is a duplicate");
        assert!(!new.mark_in(MarkSpace::Paced, pid(1, 10, 2)));
        assert!(!new.mark(pid(2, 1, 1)), "own marks kept");
        assert!(new.mark(pid(1, 10, 6)));
    }
}
