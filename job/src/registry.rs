//! The live comet registry as job sees it: a cache of `rim:nodes:expiry` / `rim:nodes`, and one
//! reconnecting RPC link per live comet.
//!
//! Refreshed periodically and on demand (when a batch names a comet the cache does not know, so a
//! comet that registered a moment ago is not mistaken for a dead one). Liveness is judged against
//! the registration expiry at lookup time, so a comet whose registration lapsed between refreshes
//! is already treated as gone.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use redis::aio::ConnectionManager;
use rim_proto::keys;
use rim_proto::rpc::{CometRpcClient, NodeInfo};
use rim_runtime::rpc::Link;

/// Link to one comet.
pub type CometLink = Link<CometRpcClient>;

struct Node {
    rpc_addr: String,
    expiry_ms: u64,
    link: Arc<CometLink>,
}

/// Shared cache of live comets.
pub struct Registry {
    nodes: RwLock<HashMap<String, Node>>,
    refreshed: RwLock<Option<Instant>>,
    /// Serialises refreshes so a burst of misses costs one round trip.
    refresh_lock: tokio::sync::Mutex<()>,
    connect_timeout: Duration,
}

impl Registry {
    /// An empty registry; links connect within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Registry {
            nodes: RwLock::new(HashMap::new()),
            refreshed: RwLock::new(None),
            refresh_lock: tokio::sync::Mutex::new(()),
            connect_timeout,
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

    /// The link of a live comet, or `None` if it is not (or no longer) live.
    pub fn link(&self, server: &str) -> Option<Arc<CometLink>> {
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
    pub async fn refresh_since(
        &self,
        redis: &mut ConnectionManager,
        needed_at: Instant,
    ) -> redis::RedisResult<()> {
        let _guard = self.refresh_lock.lock().await;
        if self.refreshed.read().is_some_and(|at| at >= needed_at) {
            return Ok(());
        }
        self.refresh_locked(redis).await
    }

    /// Re-reads the registry from Redis.
    pub async fn refresh(&self, redis: &mut ConnectionManager) -> redis::RedisResult<()> {
        let _guard = self.refresh_lock.lock().await;
        self.refresh_locked(redis).await
    }

    async fn refresh_locked(&self, redis: &mut ConnectionManager) -> redis::RedisResult<()> {
        let started = Instant::now();
        let now = rim_runtime::unix_ms();
        // `(now` = strictly in the future, matching "live while its score is in the future".
        let live: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys::NODES_EXPIRY)
            .arg(format!("({now}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(redis)
            .await?;
        let infos: Vec<Option<String>> = if live.is_empty() {
            Vec::new()
        } else {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(keys::NODES);
            for (id, _) in &live {
                cmd.arg(id);
            }
            cmd.query_async(redis).await?
        };
        let mut fresh: HashMap<String, (String, u64)> = HashMap::new();
        for ((id, expiry), info) in live.into_iter().zip(infos) {
            let Some(json) = info else {
                tracing::warn!(server = %id, "comet in rim:nodes:expiry has no rim:nodes entry; not routing to it");
                continue;
            };
            match serde_json::from_str::<NodeInfo>(&json) {
                Ok(node) if !node.rpc_addr.is_empty() => {
                    fresh.insert(id, (node.rpc_addr, expiry as u64));
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
                    let link = Link::new(
                        format!("comet {id}"),
                        vec![addr.clone()],
                        self.connect_timeout,
                        |s| {
                            CometRpcClient::new(
                                tarpc::client::Config::default(),
                                rim_proto::rpc::transport(s),
                            )
                            .spawn()
                        },
                    );
                    nodes.insert(
                        id,
                        Node {
                            rpc_addr: addr,
                            expiry_ms,
                            link: Arc::new(link),
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
