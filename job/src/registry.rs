//! The live comet registry as job sees it: a cache of `rim:nodes:expiry` / `rim:nodes`, and one
//! reconnecting RPC link per live comet.
//!
//! Refreshed periodically and on demand (when a batch names a comet the cache does not know, so a
//! comet that registered a moment ago is not mistaken for a dead one). Liveness is judged against
//! the registration expiry at lookup time, so a comet whose registration lapsed between refreshes
//! is already treated as gone.
//!
//! Except right after Redis was unreadable: comets cannot renew while Redis is down, so their
//! registrations lapse through no fault of theirs (a restarted Redis may even come back with
//! them expired). For `registry.outage_grace_ms` after the first good read that follows a failed
//! one, a comet that was live before is kept (its link too) even if the registry does not list
//! it, so its renewal has time to land; pushes are not dropped as "comet not live" meanwhile. A
//! comet that really died is then handled like any unreachable one (delivery retries, then
//! `delivery.give_up_ms`), and dropped at the first refresh after the grace.
//!
//! Calls to a comet go through [`CometClient`], so the partition rules can be tested with fake
//! comets instead of tarpc servers. Times are on tokio's clock (the same as `std`'s unless a
//! test pauses it).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;
use rim_proto::rpc::{CometRpcClient, DeliverReport, Delivery};
use rim_runtime::cluster::Cluster;
use rim_runtime::rpc::{Link, LinkError};
use tokio::time::Instant;

use crate::store::{CometDirectory, StoreResult};

/// Link to one comet.
pub type CometLink = Link<CometRpcClient>;

/// One comet as job calls it.
#[async_trait]
pub trait CometClient: Send + Sync {
    /// `CometRpc::deliver(items)` with a deadline of `timeout`: the comet's confirmation that it
    /// queued the items, in order, for their sessions.
    async fn deliver(
        &self,
        items: Vec<Delivery>,
        timeout: Duration,
    ) -> Result<DeliverReport, LinkError>;
}

#[async_trait]
impl CometClient for CometLink {
    async fn deliver(
        &self,
        items: Vec<Delivery>,
        timeout: Duration,
    ) -> Result<DeliverReport, LinkError> {
        self.call(|client| async move {
            client
                .deliver(rim_runtime::rpc::context(timeout), items)
                .await
        })
        .await
    }
}

/// Makes the client of a comet that became live: `(server id, rpc address) → client`.
pub type Connector = Arc<dyn Fn(&str, &str) -> Arc<dyn CometClient> + Send + Sync>;

struct Node {
    rpc_addr: String,
    expiry_ms: u64,
    link: Arc<dyn CometClient>,
    /// Kept live until then although the registry no longer lists it (see the module doc).
    held_until: Option<Instant>,
}

impl Node {
    fn live(&self, now_ms: u64) -> bool {
        self.expiry_ms > now_ms || self.held_until.is_some_and(|t| t > Instant::now())
    }
}

/// What the registry knows of Redis outages (see the module doc).
#[derive(Default)]
struct Outage {
    /// A read failed and no read has succeeded since.
    ongoing: bool,
    /// The grace after the last outage ends then.
    grace_until: Option<Instant>,
}

/// Shared cache of live comets.
pub struct Registry {
    directory: Arc<dyn CometDirectory>,
    connector: Connector,
    nodes: RwLock<HashMap<String, Node>>,
    refreshed: RwLock<Option<Instant>>,
    /// Serialises refreshes so a burst of misses costs one round trip.
    refresh_lock: tokio::sync::Mutex<()>,
    outage: parking_lot::Mutex<Outage>,
    /// `registry.outage_grace_ms`.
    grace: Duration,
}

impl Registry {
    /// An empty registry read from `directory`; comets are called over reconnecting tarpc links
    /// that connect within `connect_timeout` and prove `cluster`'s secret.
    pub fn new(
        directory: Arc<dyn CometDirectory>,
        connect_timeout: Duration,
        cluster: Cluster,
        grace: Duration,
    ) -> Self {
        let connector: Connector = Arc::new(move |id: &str, addr: &str| {
            let c = cluster.clone();
            let link = Link::new(
                format!("comet {id}"),
                vec![addr.to_owned()],
                connect_timeout,
                cluster.clone(),
                move |s| {
                    CometRpcClient::new(tarpc::client::Config::default(), c.transport(s)).spawn()
                },
            );
            Arc::new(link) as Arc<dyn CometClient>
        });
        Self::with_connector(directory, connector, grace)
    }

    /// An empty registry read from `directory` whose comets are called through `connector`'s
    /// clients, keeping comets `grace` after an outage (see the module doc).
    pub fn with_connector(
        directory: Arc<dyn CometDirectory>,
        connector: Connector,
        grace: Duration,
    ) -> Self {
        Registry {
            directory,
            connector,
            nodes: RwLock::new(HashMap::new()),
            refreshed: RwLock::new(None),
            refresh_lock: tokio::sync::Mutex::new(()),
            outage: parking_lot::Mutex::new(Outage::default()),
            grace,
        }
    }

    /// Live comet ids now.
    pub fn live(&self) -> BTreeSet<String> {
        let now = rim_runtime::unix_ms();
        self.nodes
            .read()
            .iter()
            .filter(|(_, n)| n.live(now))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The client of a live comet, or `None` if it is not (or no longer) live.
    pub fn link(&self, server: &str) -> Option<Arc<dyn CometClient>> {
        let now = rim_runtime::unix_ms();
        self.nodes
            .read()
            .get(server)
            .filter(|n| n.live(now))
            .map(|n| n.link.clone())
    }

    /// Re-reads the registry unless a read that started after `needed_at` already happened.
    /// Callers that miss a comet pass the moment they noticed: a burst of misses costs one round
    /// trip, and a read older than the miss is never trusted to call a comet gone. Strictly
    /// after: on a coarse clock a read stamped with the same instant may have started before
    /// the comet registered.
    pub async fn refresh_since(&self, needed_at: Instant) -> StoreResult<()> {
        let _guard = self.refresh_lock.lock().await;
        if self.refreshed.read().is_some_and(|at| at > needed_at) {
            return Ok(());
        }
        self.refresh_locked().await
    }

    /// Re-reads the registry.
    pub async fn refresh(&self) -> StoreResult<()> {
        let _guard = self.refresh_lock.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> StoreResult<()> {
        let started = Instant::now();
        let live = match self.directory.live_comets(rim_runtime::unix_ms()).await {
            Ok(live) => live,
            Err(e) => {
                self.outage.lock().ongoing = true;
                return Err(e);
            }
        };
        // The first good read after an outage starts the grace.
        let grace_until = {
            let mut o = self.outage.lock();
            if std::mem::take(&mut o.ongoing) {
                o.grace_until = Some(started + self.grace);
            }
            o.grace_until.filter(|t| *t > started)
        };
        let mut fresh: HashMap<String, (String, u64)> = HashMap::new();
        for comet in live {
            let id = comet.server;
            let Some(info) = comet.info else {
                tracing::warn!(server = %id, "comet in rim:nodes:expiry has no rim:nodes entry; not routing to it");
                continue;
            };
            match info {
                Ok(node) if !node.rpc_addr.is_empty() => {
                    fresh.insert(id, (node.rpc_addr, comet.expiry_ms));
                }
                Ok(_) => {
                    tracing::warn!(server = %id, "comet registered without rpc_addr; not routing to it")
                }
                Err(e) => {
                    tracing::warn!(server = %id, error = %e, "undecodable NodeInfo; not routing to it")
                }
            }
        }
        let mut nodes = self.nodes.write();
        nodes.retain(|id, n| match fresh.get(id) {
            Some((addr, _)) if *addr == n.rpc_addr => true,
            Some(_) => {
                tracing::info!(server = %id, "comet moved; dropping its old link");
                false
            }
            None => match grace_until {
                Some(until) => {
                    if n.held_until.is_none() {
                        tracing::warn!(server = %id, grace = ?self.grace, "comet missing from the registry right after a Redis outage; keeping it while its renewal catches up");
                    }
                    n.held_until = Some(until);
                    true
                }
                None => {
                    tracing::info!(server = %id, "comet left the registry; dropping its link");
                    false
                }
            },
        });
        for (id, (addr, expiry_ms)) in fresh {
            match nodes.get_mut(&id) {
                Some(n) => {
                    n.expiry_ms = expiry_ms;
                    n.held_until = None;
                }
                None => {
                    tracing::info!(server = %id, rpc_addr = %addr, "comet is live");
                    let link = (self.connector)(&id, &addr);
                    nodes.insert(
                        id,
                        Node {
                            rpc_addr: addr,
                            expiry_ms,
                            link,
                            held_until: None,
                        },
                    );
                }
            }
        }
        drop(nodes);
        *self.refreshed.write() = Some(started);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryDirectory;

    struct Unused;

    #[async_trait]
    impl CometClient for Unused {
        async fn deliver(&self, _: Vec<Delivery>, _: Duration) -> Result<DeliverReport, LinkError> {
            Err(LinkError::Connect {
                name: "unused".into(),
                addrs: Vec::new(),
                last: "not called in these tests".into(),
            })
        }
    }

    const GRACE: Duration = Duration::from_secs(10);

    fn registry(dir: &Arc<MemoryDirectory>) -> Registry {
        let connector: Connector = Arc::new(|_, _| Arc::new(Unused) as Arc<dyn CometClient>);
        Registry::with_connector(dir.clone(), connector, GRACE)
    }

    fn far() -> u64 {
        rim_runtime::unix_ms() + 3_600_000
    }

    /// Comets could not renew while Redis was down: one whose registration lapsed meanwhile is
    /// kept for the grace after Redis is back, then dropped if it never renewed; without an
    /// outage a comet that leaves the registry is gone at once.
    #[tokio::test(start_paused = true)]
    async fn a_comet_that_lapsed_during_an_outage_is_kept_for_the_grace() {
        let dir = Arc::new(MemoryDirectory::new());
        dir.register("c1", "127.0.0.1:1", far());
        dir.register("c2", "127.0.0.1:2", far());
        let reg = registry(&dir);
        reg.refresh().await.unwrap();
        assert!(reg.link("c1").is_some());

        // No outage: gone at once.
        dir.unregister("c2");
        reg.refresh().await.unwrap();
        assert!(reg.link("c2").is_none());

        dir.set_down(true);
        assert!(reg.refresh().await.is_err());
        dir.unregister("c1");
        dir.set_down(false);
        reg.refresh().await.unwrap();
        assert!(reg.link("c1").is_some(), "kept after the outage");
        assert!(reg.live().contains("c1"));

        // It renews within the grace: live as before, no longer held.
        dir.register("c1", "127.0.0.1:1", far());
        reg.refresh().await.unwrap();
        tokio::time::advance(GRACE * 2).await;
        reg.refresh().await.unwrap();
        assert!(reg.link("c1").is_some());

        // Another outage, and this time it never comes back: dropped once the grace is over.
        dir.set_down(true);
        assert!(reg.refresh().await.is_err());
        dir.unregister("c1");
        dir.set_down(false);
        reg.refresh().await.unwrap();
        assert!(reg.link("c1").is_some());
        tokio::time::advance(GRACE).await;
        reg.refresh().await.unwrap();
        assert!(
            reg.link("c1").is_none(),
            "dropped at the first refresh past the grace"
        );
        assert!(reg.live().is_empty());
    }

    /// A registration is live while its expiry is in the future (the instant it names is already
    /// past, as in the directory's `(now` read), and a held one while its hold is.
    #[tokio::test(start_paused = true)]
    async fn a_comet_is_live_strictly_before_its_expiry_or_its_hold_ends() {
        let node = |expiry_ms, held_until| Node {
            rpc_addr: "127.0.0.1:1".into(),
            expiry_ms,
            link: Arc::new(Unused),
            held_until,
        };
        assert!(node(1_000, None).live(999));
        assert!(!node(1_000, None).live(1_000), "expired at its expiry");
        assert!(!node(1_000, None).live(1_001));
        let now = Instant::now();
        assert!(node(1_000, Some(now + Duration::from_millis(1))).live(5_000));
        assert!(
            !node(1_000, Some(now)).live(5_000),
            "the hold ends at its instant"
        );
        assert!(!node(1_000, Some(now - Duration::from_millis(1))).live(5_000));
    }

    /// A comet's link is made once while its address holds (a refresh must not drop the link and
    /// its connection), made anew when the comet comes back at another address, and never made
    /// for a registration without an RPC address.
    #[tokio::test(start_paused = true)]
    async fn a_comet_is_linked_once_per_address_and_never_without_one() {
        let dir = Arc::new(MemoryDirectory::new());
        let made = Arc::new(parking_lot::Mutex::new(Vec::<(String, String)>::new()));
        let log = made.clone();
        let connector: Connector = Arc::new(move |id: &str, addr: &str| {
            log.lock().push((id.to_owned(), addr.to_owned()));
            Arc::new(Unused) as Arc<dyn CometClient>
        });
        let reg = Registry::with_connector(dir.clone(), connector, GRACE);
        let pair = |id: &str, addr: &str| (id.to_owned(), addr.to_owned());

        dir.register("c1", "127.0.0.1:1", far());
        dir.register("bare", "", far());
        reg.refresh().await.unwrap();
        reg.refresh().await.unwrap();
        assert_eq!(*made.lock(), vec![pair("c1", "127.0.0.1:1")]);
        assert!(reg.link("bare").is_none(), "no address, no route");
        assert_eq!(reg.live(), BTreeSet::from(["c1".to_owned()]));

        dir.register("c1", "127.0.0.1:9", far());
        reg.refresh().await.unwrap();
        reg.refresh().await.unwrap();
        assert_eq!(
            *made.lock(),
            vec![pair("c1", "127.0.0.1:1"), pair("c1", "127.0.0.1:9")],
            "moved: linked at the new address, once"
        );
        assert!(reg.link("c1").is_some());
    }
}
