//! The live comet registry as job sees it: a cache of `rim:nodes:expiry` / `rim:nodes`, and one
//! reconnecting RPC link per live comet.
//!
//! Refreshed periodically and on demand (when a batch names a comet the cache does not know, so a
//! comet that registered a moment ago is not mistaken for a dead one). Liveness is judged against
//! the registration expiry at lookup time, so a comet whose registration lapsed between refreshes
//! is already treated as gone.
//!
//! Calls to a comet go through [`CometClient`], so the partition rules can be tested with fake
//! comets instead of tarpc servers.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::RwLock;
use rim_proto::rpc::{CometRpcClient, DeliverReport, Delivery};
use rim_runtime::cluster::Cluster;
use rim_runtime::rpc::{Link, LinkError};

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
}

/// Shared cache of live comets.
pub struct Registry {
    directory: Arc<dyn CometDirectory>,
    connector: Connector,
    nodes: RwLock<HashMap<String, Node>>,
    refreshed: RwLock<Option<Instant>>,
    /// Serialises refreshes so a burst of misses costs one round trip.
    refresh_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    /// An empty registry read from `directory`; comets are called over reconnecting tarpc links
    /// that connect within `connect_timeout` and prove `cluster`'s secret.
    pub fn new(
        directory: Arc<dyn CometDirectory>,
        connect_timeout: Duration,
        cluster: Cluster,
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
        Self::with_connector(directory, connector)
    }

    /// An empty registry read from `directory` whose comets are called through `connector`'s
    /// clients.
    pub fn with_connector(directory: Arc<dyn CometDirectory>, connector: Connector) -> Self {
        Registry {
            directory,
            connector,
            nodes: RwLock::new(HashMap::new()),
            refreshed: RwLock::new(None),
            refresh_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Live comet ids now.
    pub fn live(&self) -> BTreeSet<String> {
        let now = rim_runtime::unix_ms();
        self.nodes
            .read()
            .iter()
            .filter(|(_, n)| n.expiry_ms > now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The client of a live comet, or `None` if it is not (or no longer) live.
    pub fn link(&self, server: &str) -> Option<Arc<dyn CometClient>> {
        let now = rim_runtime::unix_ms();
        self.nodes
            .read()
            .get(server)
            .filter(|n| n.expiry_ms > now)
            .map(|n| n.link.clone())
    }

    /// Re-reads the registry unless a read that started at or after `needed_at` already
    /// happened. Callers that miss a comet pass the moment they noticed: a burst of misses costs
    /// one round trip, and a read older than the miss is never trusted to call a comet gone.
    pub async fn refresh_since(&self, needed_at: Instant) -> StoreResult<()> {
        let _guard = self.refresh_lock.lock().await;
        if self.refreshed.read().is_some_and(|at| at >= needed_at) {
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
        let live = self.directory.live_comets(rim_runtime::unix_ms()).await?;
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
        nodes.retain(|id, n| {
            let keep = fresh.get(id).is_some_and(|(addr, _)| *addr == n.rpc_addr);
            if !keep {
                tracing::info!(server = %id, "comet left the registry or moved; dropping its link");
            }
            keep
        });
        for (id, (addr, expiry_ms)) in fresh {
            match nodes.get_mut(&id) {
                Some(n) => n.expiry_ms = expiry_ms,
                None => {
                    tracing::info!(server = %id, rpc_addr = %addr, "comet is live");
                    let link = (self.connector)(&id, &addr);
                    nodes.insert(
                        id,
                        Node {
                            rpc_addr: addr,
                            expiry_ms,
                            link,
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
