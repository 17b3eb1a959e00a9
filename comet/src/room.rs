//! Room presence on this comet: which rooms are being announced to logic right now (a room's
//! first member here), how first joins are ordered against node renewals, and the cluster-wide
//! counts learnt from the last renewal.
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

use parking_lot::{Mutex, MutexGuard, RwLock};
use rim_proto::room::RoomId;
use tokio::sync::watch;

/// Presence bookkeeping, under [`Rooms::presence`].
#[derive(Default)]
pub struct Presence {
    /// Rooms whose first member's `room_joined` is in flight; waiters watch for `true`.
    pub(crate) joining: HashMap<RoomId, Arc<watch::Sender<bool>>>,
    /// Number of the latest renewal snapshot.
    pub(crate) epoch: u64,
    /// Whether the renewal of snapshot `epoch` is still on its way to logic.
    pub(crate) renewing: bool,
}

/// Room state shared by sessions, the renew task and heartbeat replies.
pub struct Rooms {
    presence: Mutex<Presence>,
    /// Latest renewal that finished (answered or failed): its snapshot landed or never will.
    renewed: watch::Sender<u64>,
    cluster: RwLock<HashMap<RoomId, u64>>,
}

impl Default for Rooms {
    fn default() -> Self {
        Rooms {
            presence: Mutex::new(Presence::default()),
            renewed: watch::Sender::new(0),
            cluster: RwLock::default(),
        }
    }
}

impl Rooms {
    /// The presence state. Held briefly (never across an await); taken before bucket locks.
    pub(crate) fn presence(&self) -> MutexGuard<'_, Presence> {
        self.presence.lock()
    }

    /// Marks renewal `epoch` finished, waking joiners that overlapped it.
    pub(crate) fn renewal_done(&self, epoch: u64) {
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
    pub(crate) async fn wait_renewal(&self, epoch: u64) {
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
}
