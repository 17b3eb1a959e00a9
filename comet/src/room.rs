//! Room presence on this comet: which rooms have members here, the lock that orders first joins
//! against node renewals, and the cluster-wide counts learnt from the last renewal.

use std::collections::HashMap;

use parking_lot::RwLock;
use rim_proto::room::RoomId;

/// Room state shared by sessions, the renew task and heartbeat replies.
#[derive(Default)]
pub struct Rooms {
    /// Held while a room's first member joins (including the `room_joined` call) and while a
    /// renewal snapshots and reports rooms, so a renewal cannot erase a room joined meanwhile.
    pub presence: tokio::sync::Mutex<()>,
    cluster: RwLock<HashMap<RoomId, u64>>,
}

impl Rooms {
    /// Replaces the cluster-wide counts (from a renewal reply).
    pub fn set_cluster(&self, counts: Vec<(RoomId, u64)>) {
        *self.cluster.write() = counts.into_iter().collect();
    }

    /// Cluster-wide member count of `room`, if the last renewal reported it.
    pub fn cluster_count(&self, room: &RoomId) -> Option<u64> {
        self.cluster.read().get(room).copied()
    }
}
