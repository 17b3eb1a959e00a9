//! State shared by every task of one comet ([`Ctx`]). It sits at the bottom of the comet's module
//! graph: it names the state (config, logic, buckets, rooms, limits, metrics, the paced queue) and imports
//! none of the modules that run on it (sessions, delivery, renewal, transports, server), so
//! those can all depend on it without a cycle.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};

use rim_proto::rpc::NodeInfo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bucket::Buckets;
use crate::config::Config;
use crate::limits::PeerLimits;
use crate::logic::{Logic, Notice};
use crate::metrics::Metrics;
use crate::push::PacedJob;
use crate::room::Rooms;
use crate::session::Session;

/// State shared by every task of one comet.
pub(crate) struct Ctx {
    pub cfg: Config,
    /// Every call to logic goes through this (see `logic`).
    pub logic: Arc<dyn Logic>,
    pub buckets: Buckets,
    pub rooms: Rooms,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub conns: AtomicUsize,
    /// Per-address limits (`[limits]`).
    pub limits: PeerLimits,
    pub next_id: AtomicU64,
    /// Set after the first successful renewal: job can find this node.
    pub registered: AtomicBool,
    /// Whether the last renewal reached logic.
    pub logic_ok: AtomicBool,
    /// Addresses and placement data sent with each renewal.
    pub node: NodeInfo,
    /// Queue of the paced broadcast worker (see `deliver`).
    pub paced: mpsc::Sender<PacedJob>,
    /// Room types whose joins logic must approve, as its last `ConnectReply` said (logic's
    /// `[rooms]` policies; the same for every session).
    guarded_room_types: parking_lot::RwLock<Vec<String>>,
    /// The cluster's push partition count, as logic's last `ConnectReply` said (0: not known
    /// yet): which partition a history's ids belong to.
    partitions: AtomicU16,
}

impl Ctx {
    /// The state of a comet configured by `cfg` (already validated), talking to `logic`.
    pub fn new(
        cfg: Config,
        logic: Arc<dyn Logic>,
        node: NodeInfo,
        paced: mpsc::Sender<PacedJob>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Ctx {
            buckets: Buckets::new(cfg.bucket.count),
            rooms: Rooms::new(logic.clone(), cfg.server_id.clone(), cfg.rpc_timeout()),
            logic,
            metrics: Metrics::default(),
            shutdown,
            tracker,
            conns: AtomicUsize::new(0),
            limits: PeerLimits::new(&cfg.limits),
            next_id: AtomicU64::new(1),
            registered: AtomicBool::new(false),
            logic_ok: AtomicBool::new(false),
            node,
            paced,
            guarded_room_types: parking_lot::RwLock::new(Vec::new()),
            partitions: AtomicU16::new(0),
            cfg,
        }
    }

    /// Records which room types logic guards (from a `ConnectReply`); written only on change.
    pub fn set_guarded_room_types(&self, types: &[String]) {
        if *self.guarded_room_types.read() != types {
            *self.guarded_room_types.write() = types.to_vec();
        }
    }

    /// Records the cluster's push partition count (from a `ConnectReply`; 0 is ignored).
    pub fn set_partitions(&self, n: u16) {
        if n > 0 {
            self.partitions.store(n, Ordering::Relaxed);
        }
    }

    /// The partition of `source`'s history for user `mid`, once the count is known.
    pub fn history_partition(&self, source: &rim_proto::history::Source, mid: i64) -> Option<u16> {
        let n = self.partitions.load(Ordering::Relaxed);
        (n > 0).then(|| match source {
            rim_proto::history::Source::User => rim_proto::job::mid_partition(mid, n),
            rim_proto::history::Source::Room(room) => rim_proto::job::room_partition(room, n),
        })
    }

    /// Whether joining `room` needs logic's approval ([`crate::logic::Logic::check_join`]).
    pub fn join_needs_check(&self, room: &rim_proto::room::RoomId) -> bool {
        self.guarded_room_types
            .read()
            .iter()
            .any(|t| t == room.room_type())
    }

    /// Sends `notice` about `s` to logic in the background (see [`crate::logic::notify`]).
    pub fn notify(&self, notice: Notice, s: &Session) {
        crate::logic::notify(
            &self.logic,
            &self.tracker,
            &self.shutdown,
            notice,
            s.session_ref(&self.cfg.server_id),
        );
    }
}
