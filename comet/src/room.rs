//! Rooms on this comet: how a session joins, leaves and changes rooms, how logic is told (a room's
//! first member here is announced with `room_joined` before the join completes; a ChangeRoom is
//! reported with `room_changed`), how first joins are ordered against node renewals, and the
//! cluster-wide counts learnt from the last renewal. Membership itself is stored in the buckets
//! (room pushes walk them); every join and leave goes through [`Rooms`], which is what keeps
//! the invariant below.
//!
//! Every lock here is a short synchronous one; no RPC runs under it. Concurrency is per room:
//! the first joiner of a room makes the `room_joined` call while other joiners of *that* room
//! wait for it, and joins of other rooms go ahead.
//!
//! A renewal replaces logic's room list for this comet with its snapshot, so it must never erase
//! a room whose first member joined (and was told so) meanwhile:
//! * the snapshot includes rooms whose announcement is in flight, and a member is added in the
//!   same critical section that ends the announcement, so from the announcement's start on every
//!   snapshot includes the room;
//! * a renewal whose snapshot was taken *before* an announcement started may still land at logic
//!   after it. Such a joiner waits for that renewal to finish and announces again before the
//!   client gets its reply. The renewal itself never waits for joins.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rim_proto::room::RoomId;
use tokio::sync::watch;

use crate::bucket::Buckets;
use crate::logic::{Logic, LogicCallError};
use crate::session::Session;

/// Presence bookkeeping, under `Rooms::presence`.
#[derive(Default)]
struct Presence {
    /// Rooms whose first member's `room_joined` is in flight; waiters watch for `true`.
    joining: HashMap<RoomId, Arc<watch::Sender<bool>>>,
    /// Number of the latest renewal snapshot.
    epoch: u64,
    /// Whether the renewal of snapshot `epoch` is still on its way to logic.
    renewing: bool,
}

/// Room state shared by sessions, the renew task and heartbeat replies.
pub struct Rooms {
    /// Held briefly (never across an await); taken before bucket locks.
    presence: Mutex<Presence>,
    /// Latest renewal that finished (answered or failed): its snapshot landed or never will.
    renewed: watch::Sender<u64>,
    cluster: RwLock<HashMap<RoomId, u64>>,
    logic: Arc<dyn Logic>,
    /// This comet's server id, as logic knows it.
    server: String,
    /// How long a joiner waits for a renewal that overlapped its announcement: the renewal's
    /// call is bounded by the RPC timeout, so twice that means something is stuck.
    renewal_wait: Duration,
}

/// What a renewal reports, taken by [`Rooms::begin_renewal`].
pub(crate) struct RenewalSnapshot {
    /// Members per room, rooms being announced counted as at least one.
    pub rooms: HashMap<RoomId, u32>,
    /// Sessions on this comet.
    pub sessions: u64,
    /// Distinct client IPs.
    pub ips: u64,
}

impl Rooms {
    /// Rooms of comet `server`, announcing to `logic`, whose calls take at most `rpc_timeout`.
    pub(crate) fn new(logic: Arc<dyn Logic>, server: String, rpc_timeout: Duration) -> Self {
        Rooms {
            presence: Mutex::new(Presence::default()),
            renewed: watch::Sender::new(0),
            cluster: RwLock::default(),
            logic,
            server,
            renewal_wait: rpc_timeout * 2,
        }
    }

    /// Joins `room`; a room's first member here is announced to logic before this returns.
    /// False when the session is no longer registered (replaced meanwhile) and did not join.
    ///
    /// Only joiners of the same room wait for each other (see the module doc for the ordering
    /// against renewals); no comet-wide lock is held across the `room_joined` call.
    pub(crate) async fn join(&self, buckets: &Buckets, s: &Arc<Session>, room: RoomId) -> bool {
        loop {
            // The lock guard must not live across an await (it is not Send), hence the block.
            let step = {
                let mut p = self.presence.lock();
                if let Some(w) = p.joining.get(&room) {
                    // Someone is announcing this room: wait for it, then look again.
                    Err(w.subscribe())
                } else if buckets.room_len(&room) > 0 {
                    // logic knows the room already. Joining in the same critical section as the
                    // check keeps a renewal snapshot from seeing neither the old members nor us.
                    return join_now(buckets, s, room);
                } else {
                    p.joining
                        .insert(room.clone(), Arc::new(watch::Sender::new(false)));
                    Ok(p.renewing.then_some(p.epoch))
                }
            };
            let overlapped = match step {
                Ok(overlapped) => overlapped,
                Err(mut rx) => {
                    // Err = the announcer went away (its guard removed the entry): look again.
                    let _ = rx.wait_for(|done| *done).await;
                    continue;
                }
            };
            let guard = Announcing {
                rooms: self,
                room: &room,
            };
            self.announce(&room).await;
            if let Some(epoch) = overlapped {
                // A renewal snapshotted before this announcement started and may reach logic
                // after it, erasing the room: wait for it to finish, then announce again.
                if tokio::time::timeout(self.renewal_wait, self.wait_renewal(epoch))
                    .await
                    .is_err()
                {
                    tracing::warn!(%room, "renewal still unfinished; announcing the room again anyway");
                }
                self.announce(&room).await;
            }
            // Join and end the announcement in one critical section: every snapshot from the
            // announcement's start on includes the room (pending, then as a member).
            let mut p = self.presence.lock();
            let joined = join_now(buckets, s, room.clone());
            guard.finish(&mut p);
            return joined;
        }
    }

    /// Tells logic this comet has members in `room`.
    async fn announce(&self, room: &RoomId) {
        match self
            .logic
            .room_joined(self.server.clone(), room.clone())
            .await
        {
            Ok(()) => {}
            // The session still joins: the next renewal reports the room anyway.
            Err(LogicCallError::Refused(e)) => {
                tracing::warn!(%room, error = %e, "room_joined refused")
            }
            Err(LogicCallError::Unreachable(e)) => {
                rim_runtime::warn_throttled!(%room, error = %e, "room_joined failed")
            }
        }
    }

    /// Leaves every room of the session. logic is not told: a session that ends is unregistered
    /// as a whole, and an emptied room drops out of logic's index at the next renewal.
    pub(crate) fn leave(&self, buckets: &Buckets, s: &Session) {
        for room in s.rooms() {
            self.leave_one(buckets, s, &room);
        }
    }

    /// Leaves one room here (logic not told).
    fn leave_one(&self, buckets: &Buckets, s: &Session, room: &RoomId) {
        buckets.leave(room, s);
        s.remove_room(room);
    }

    /// Moves the session to `to` (`None` = out of any room) for ChangeRoom: afterwards it is in
    /// exactly that room, as in goim. Then tells logic (`room_changed`) and waits for it, so
    /// member listings and presence events are right by the time the client sees op 13.
    /// Nothing happens when the session is already in exactly that room.
    pub(crate) async fn change(&self, buckets: &Buckets, s: &Arc<Session>, to: Option<RoomId>) {
        let from = s.rooms();
        if from.as_slice() == to.as_slice() {
            return;
        }
        for room in from.iter().filter(|r| Some(*r) != to.as_ref()) {
            self.leave_one(buckets, s, room);
        }
        if let Some(room) = to.clone() {
            self.join(buckets, s, room).await;
        }
        let first = from.first().cloned();
        self.tell(buckets, s, "room_changed", || {
            self.logic
                .room_changed(s.session_ref(&self.server), first, to)
        })
        .await;
    }

    /// Joins `room` besides the session's other rooms (JoinRoom) and tells logic (`join_room`),
    /// waiting for it like [`Rooms::change`]. Nothing happens when the session is in it already.
    pub(crate) async fn enter(&self, buckets: &Buckets, s: &Arc<Session>, room: RoomId) {
        if s.in_room(&room) {
            return;
        }
        self.join(buckets, s, room.clone()).await;
        self.tell(buckets, s, "join_room", || {
            self.logic.join_room(s.session_ref(&self.server), room)
        })
        .await;
    }

    /// Leaves `room`, staying in the others (LeaveRoom), and tells logic (`leave_room`).
    /// Nothing happens when the session is not in it.
    pub(crate) async fn exit(&self, buckets: &Buckets, s: &Arc<Session>, room: RoomId) {
        if !s.in_room(&room) {
            return;
        }
        self.leave_one(buckets, s, &room);
        self.tell(buckets, s, "leave_room", || {
            self.logic.leave_room(s.session_ref(&self.server), room)
        })
        .await;
    }

    /// Sends logic a room change of `s` (`what` names the call in logs) unless `s` was replaced
    /// meanwhile. A failure is logged only: the change stands on this comet, logic's listing
    /// catches up at the next change or disconnect, and the client still gets its reply.
    async fn tell<F, Fut>(&self, buckets: &Buckets, s: &Session, what: &'static str, call: F)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), LogicCallError>>,
    {
        if buckets.get(&s.key).is_none_or(|cur| cur.id != s.id) {
            // Replaced by a newer session with the same key: the key's membership is the new
            // session's business now, so logic must not hear about this one.
            return;
        }
        match call().await {
            Ok(()) => {}
            Err(LogicCallError::Refused(e)) => {
                tracing::warn!(key = %s.key, call = what, error = %e, "room change refused by logic")
            }
            Err(LogicCallError::Unreachable(e)) => {
                rim_runtime::warn_throttled!(key = %s.key, call = what, error = %e, "room change not sent to logic")
            }
        }
    }

    /// Snapshots what a renewal reports, under the presence lock (never held across the RPC):
    /// rooms being announced right now are included, counted as at least one member (logic
    /// drops rooms reported with 0), so this report cannot erase them. The renewal counts as
    /// finished when the returned guard drops, whatever happened to its call (answer, error,
    /// cancelled at shutdown), which releases joiners waiting for it.
    pub(crate) fn begin_renewal(&self, buckets: &Buckets) -> (RenewalSnapshot, RenewalDone<'_>) {
        let mut p = self.presence.lock();
        let (mut rooms, sessions, ips) = buckets.snapshot();
        for room in p.joining.keys() {
            let n = rooms.entry(room.clone()).or_insert(0);
            *n = (*n).max(1);
        }
        p.epoch += 1;
        p.renewing = true;
        let done = RenewalDone {
            rooms: self,
            epoch: p.epoch,
        };
        (
            RenewalSnapshot {
                rooms,
                sessions,
                ips,
            },
            done,
        )
    }

    /// Marks renewal `epoch` finished, waking joiners that overlapped it.
    fn renewal_done(&self, epoch: u64) {
        {
            let mut p = self.presence.lock();
            if p.epoch == epoch {
                p.renewing = false;
            }
        }
        self.renewed.send_if_modified(|e| {
            let newer = epoch > *e;
            if newer {
                *e = epoch;
            }
            newer
        });
    }

    /// Waits until renewal `epoch` has finished.
    async fn wait_renewal(&self, epoch: u64) {
        let mut rx = self.renewed.subscribe();
        // Err = the sender is gone, which cannot happen while `self` lives; nothing to wait for.
        let _ = rx.wait_for(|e| *e >= epoch).await;
    }

    /// Replaces the cluster-wide counts (from a renewal reply).
    pub fn set_cluster(&self, counts: Vec<(RoomId, u64)>) {
        *self.cluster.write() = counts.into_iter().collect();
    }

    /// Cluster-wide member count of `room`, if the last renewal reported it.
    pub fn cluster_count(&self, room: &RoomId) -> Option<u64> {
        self.cluster.read().get(room).copied()
    }

    /// Online count for a heartbeat reply: cluster-wide when known, else local; 0 without room.
    pub(crate) fn online_count(&self, buckets: &Buckets, room: Option<&RoomId>) -> i32 {
        let Some(room) = room else { return 0 };
        let n = self
            .cluster_count(room)
            .unwrap_or(buckets.room_len(room) as u64);
        i32::try_from(n).unwrap_or(i32::MAX)
    }
}

/// Adds `s` to `room` now (the room is known to logic).
fn join_now(buckets: &Buckets, s: &Arc<Session>, room: RoomId) -> bool {
    if buckets.join(&room, s) {
        s.add_room(room);
        true
    } else {
        false
    }
}

/// Ends a renewal (see [`Rooms::begin_renewal`]) when dropped.
pub(crate) struct RenewalDone<'a> {
    rooms: &'a Rooms,
    epoch: u64,
}

impl Drop for RenewalDone<'_> {
    fn drop(&mut self) {
        self.rooms.renewal_done(self.epoch);
    }
}

/// A room announcement in flight; ends it (waking the room's waiters) when finished or dropped.
struct Announcing<'a> {
    rooms: &'a Rooms,
    room: &'a RoomId,
}

impl Announcing<'_> {
    /// Ends the announcement under an already held presence lock.
    fn finish(self, p: &mut Presence) {
        end_announcement(p, self.room);
        std::mem::forget(self);
    }
}

impl Drop for Announcing<'_> {
    /// Only reached when the joining task is cancelled mid-announcement.
    fn drop(&mut self) {
        end_announcement(&mut self.rooms.presence.lock(), self.room);
    }
}

fn end_announcement(p: &mut Presence, room: &RoomId) {
    if let Some(w) = p.joining.remove(room) {
        w.send_replace(true);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{MemLogic, WAIT, session};

    fn room(r: &str) -> RoomId {
        RoomId::parse(r).unwrap()
    }

    fn rooms(logic: &Arc<MemLogic>) -> Arc<Rooms> {
        Arc::new(Rooms::new(
            logic.clone(),
            "comet-test".into(),
            Duration::from_secs(3),
        ))
    }

    /// While the first member's announcement of one room hangs at logic, a first join of another
    /// room completes, a second joiner of the same room waits for the announcement, and a
    /// renewal snapshot already counts the room being announced (so it cannot erase it).
    #[tokio::test(start_paused = true)]
    async fn first_joins_of_different_rooms_do_not_wait_for_each_other() {
        let logic = MemLogic::new(30);
        logic.hold("room_joined slow://");
        let rooms = rooms(&logic);
        let buckets = Arc::new(Buckets::new(4));
        let (s1, s2, f1) = (
            session(1, "s1", &[]),
            session(2, "s2", &[]),
            session(3, "f1", &[]),
        );
        for s in [&s1, &s2, &f1] {
            buckets.insert(s.clone());
        }
        let join = |s: &Arc<Session>, r: &str| {
            let (rooms, buckets, s, r) = (rooms.clone(), buckets.clone(), s.clone(), room(r));
            tokio::spawn(async move { rooms.join(&buckets, &s, r).await })
        };
        let first = join(&s1, "slow://1");
        logic.called("room_joined slow://1").await;

        let fast = tokio::time::timeout(WAIT, join(&f1, "live://5")).await;
        assert!(fast.unwrap().unwrap(), "the other room's join completed");
        let second = join(&s2, "slow://1");
        let (snap, done) = rooms.begin_renewal(&buckets);
        drop(done);
        assert_eq!(snap.rooms.get(&room("slow://1")), Some(&1));
        assert_eq!(snap.rooms.get(&room("live://5")), Some(&1));
        assert!(!first.is_finished() && !second.is_finished());
        assert_eq!(buckets.room_len(&room("slow://1")), 0);

        logic.release();
        assert!(first.await.unwrap());
        assert!(second.await.unwrap());
        assert_eq!(buckets.room_len(&room("slow://1")), 2);
        assert_eq!(
            logic.calls_of("room_joined slow://1").len(),
            1,
            "the second joiner found the room announced"
        );
        assert_eq!(s2.room(), Some(room("slow://1")));
    }

    /// A first join whose announcement started while a renewal (snapshotted before it) was on its
    /// way waits for that renewal and announces again, so the renewal cannot erase the room.
    #[tokio::test(start_paused = true)]
    async fn a_join_overlapping_a_renewal_announces_again_after_it() {
        let logic = MemLogic::new(30);
        let rooms = rooms(&logic);
        let buckets = Arc::new(Buckets::new(4));
        let s = session(1, "a", &[]);
        buckets.insert(s.clone());
        let (_, renewal) = rooms.begin_renewal(&buckets);
        let mut join = {
            let (rooms, buckets, s) = (rooms.clone(), buckets.clone(), s.clone());
            tokio::spawn(async move { rooms.join(&buckets, &s, room("live://1")).await })
        };
        logic.called("room_joined live://1").await;
        assert!(
            tokio::time::timeout(Duration::from_secs(1), &mut join)
                .await
                .is_err(),
            "the join waits for the overlapping renewal"
        );
        assert_eq!(buckets.room_len(&room("live://1")), 0);
        drop(renewal);
        assert!(join.await.unwrap());
        assert_eq!(logic.calls_of("room_joined live://1").len(), 2);
    }
}
