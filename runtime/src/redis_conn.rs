//! One Redis connection type for every topology rim runs on: a single server (`redis.url`), a
//! Redis Cluster (`redis.nodes`) or a Sentinel-managed primary (`redis.sentinels`). Stores send
//! commands through [`Conn`], which implements redis-rs's `ConnectionLike`, so their code is the
//! same on all three; what differs is where a command goes:
//!
//! * single: an auto-reconnecting `ConnectionManager`;
//! * cluster: redis-rs's async cluster client, which follows `MOVED`/`ASK` and refreshes its slot
//!   map after a failover (every multi-key command rim sends stays in one slot, see
//!   `rim_proto::keys`);
//! * sentinel: a `ConnectionManager` to the primary the sentinels name, replaced by asking them
//!   again whenever the primary stops answering or answers as a replica (`READONLY`).
//!
//! [`Topology::blocking`] opens the dedicated connection a blocking stream read needs (no reply
//! timeout: the command connection's would cut every `BLOCK` short).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};

/// Where a tier's Redis is and how it is reached.
#[derive(Clone)]
#[allow(clippy::large_enum_variant, reason = "one per process")]
pub enum Topology {
    /// One server.
    Single(redis::Client),
    /// Redis Cluster from its seed nodes.
    Cluster(ClusterClient),
    /// The primary a set of sentinels names.
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

/// A command connection on any [`Topology`]; cheap to clone (clones share the sockets).
#[derive(Clone)]
pub enum Conn {
    /// Single server, reconnecting by itself.
    Single(ConnectionManager),
    /// A plain multiplexed connection (blocking reads on a single server or a sentinel's primary).
    Plain(MultiplexedConnection),
    /// Redis Cluster.
    Cluster(ClusterConnection),
    /// The sentinels' current primary.
    Sentinel(SentinelConn),
}

/// Bounds for opening connections and for one reply.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Establishing a connection.
    pub connect: Duration,
    /// One reply (redis-rs's own default is 500 ms).
    pub response: Duration,
}

/// A blocking connection's reply bound: effectively none (its caller bounds each read itself).
const NO_RESPONSE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl Topology {
    /// An auto-reconnecting command connection.
    pub async fn connect(&self, bounds: Bounds) -> Result<Conn, RedisError> {
        match self {
            Topology::Single(client) => {
                let cfg = manager_config(bounds);
                Ok(Conn::Single(
                    client.get_connection_manager_with_config(cfg).await?,
                ))
            }
            Topology::Cluster(client) => {
                let cfg = ClusterConfig::new()
                    .set_connection_timeout(bounds.connect)
                    .set_response_timeout(bounds.response);
                Ok(Conn::Cluster(
                    client.get_async_connection_with_config(cfg).await?,
                ))
            }
            Topology::Sentinel(sentinel) => {
                let conn = SentinelConn::connect(sentinel.clone(), bounds).await?;
                Ok(Conn::Sentinel(conn))
            }
        }
    }

    /// A dedicated connection without a reply timeout, for `XREADGROUP … BLOCK`; the caller bounds
    /// each read and drops the connection after any error.
    pub async fn blocking(&self, connect: Duration) -> Result<Conn, RedisError> {
        match self {
            Topology::Single(client) => Ok(Conn::Plain(plain(client, connect).await?)),
            Topology::Cluster(client) => {
                let cfg = ClusterConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(NO_RESPONSE_TIMEOUT);
                Ok(Conn::Cluster(
                    client.get_async_connection_with_config(cfg).await?,
                ))
            }
            Topology::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                Ok(Conn::Plain(plain(&client, connect).await?))
            }
        }
    }

    /// `"single"`, `"cluster"` or `"sentinel"`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Topology::Single(_) => "single",
            Topology::Cluster(_) => "cluster",
            Topology::Sentinel(_) => "sentinel",
        }
    }

    /// A sentinel topology from sentinel addresses and the primary's name; `node` carries TLS and
    /// credentials for the primary itself.
    pub fn sentinel(
        sentinels: &[String],
        master: &str,
        node: SentinelNodeConnectionInfo,
    ) -> Result<Topology, RedisError> {
        let client = SentinelClient::build(
            sentinels.iter().map(String::as_str).collect(),
            master,
            Some(node),
            SentinelServerType::Master,
        )?;
        Ok(Topology::Sentinel(Arc::new(tokio::sync::Mutex::new(
            client,
        ))))
    }
}

fn manager_config(bounds: Bounds) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(bounds.connect))
        .set_response_timeout(Some(bounds.response))
        // After an outage, notice Redis is back within about half a second.
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

async fn plain(
    client: &redis::Client,
    connect: Duration,
) -> Result<MultiplexedConnection, RedisError> {
    let cfg = AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(Some(connect));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

/// Why an error is worth retrying, as a metric label; `None` when retrying cannot help (a script
/// error, a wrong type, bad credentials). Stores retry these with backoff within their deadline:
/// every write rim sends is idempotent (see the stores' rules), so a retry after a lost reply
/// never applies a change twice.
///
/// A transaction aborted because its commands were refused (`EXECABORT`) is judged by why they
/// were: a `MULTI` sent to a demoted primary fails with `READONLY` inside the abort, and one sent
/// to a cluster node that no longer owns the slot with `MOVED` (redis-rs follows neither inside
/// a transaction), so both must count as a failover, not as a bad request.
pub fn retry_reason(e: &RedisError) -> Option<&'static str> {
    use redis::ServerErrorKind as S;
    match e.kind() {
        ErrorKind::Server(S::ExecAbort) => e
            .clone()
            .into_server_errors()?
            .iter()
            .find_map(|(_, inner)| inner.kind().and_then(server_reason)),
        ErrorKind::Server(kind) => server_reason(kind),
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => Some("io"),
        ErrorKind::MasterNameNotFoundBySentinel => Some("sentinel"),
        _ if e.code() == Some("NOREPLICAS") => Some("noreplicas"),
        _ => None,
    }
}

/// [`retry_reason`] of a server error kind.
fn server_reason(kind: redis::ServerErrorKind) -> Option<&'static str> {
    use redis::ServerErrorKind as S;
    match kind {
        S::Moved => Some("moved"),
        S::Ask => Some("ask"),
        S::TryAgain => Some("tryagain"),
        S::ClusterDown => Some("clusterdown"),
        S::MasterDown => Some("masterdown"),
        S::ReadOnly => Some("readonly"),
        S::BusyLoading => Some("loading"),
        _ => None,
    }
}

impl Conn {
    /// Whether commands go to a Redis Cluster (multi-key commands must then stay in one slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let (generation, mut c) = s.current();
                let r = c.req_packed_command(cmd).await;
                s.after(generation, &r).await;
                r
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => Box::pin(async move {
                let (generation, mut c) = s.current();
                let r = c.req_packed_commands(pipeline, offset, count).await;
                s.after(generation, &r).await;
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(s) => s.current().1.get_db(),
        }
    }
}

/// A command connection to whichever server the sentinels name as primary.
#[derive(Clone)]
pub struct SentinelConn {
    shared: Arc<SentinelShared>,
}

struct SentinelShared {
    sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
    bounds: Bounds,
    /// The primary's connection and how many times it was replaced (so concurrent failures
    /// replace it once).
    current: RwLock<(u64, ConnectionManager)>,
}

impl SentinelConn {
    async fn connect(
        sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
        bounds: Bounds,
    ) -> Result<SentinelConn, RedisError> {
        let conn = primary(&sentinel, bounds).await?;
        Ok(SentinelConn {
            shared: Arc::new(SentinelShared {
                sentinel,
                bounds,
                current: RwLock::new((0, conn)),
            }),
        })
    }

    fn current(&self) -> (u64, ConnectionManager) {
        match self.shared.current.read() {
            Ok(g) => (g.0, g.1.clone()),
            Err(poisoned) => {
                let g = poisoned.into_inner();
                (g.0, g.1.clone())
            }
        }
    }

    /// After a failed call on connection `generation`: when the failure says the primary is gone
    /// or demoted, asks the sentinels again (once per generation; the caller retries).
    async fn after<T>(&self, generation: u64, r: &Result<T, RedisError>) {
        let Err(e) = r else { return };
        if !matches!(
            retry_reason(e),
            Some("io" | "readonly" | "masterdown" | "loading")
        ) {
            return;
        }
        // One rediscovery per generation: callers failing together wait here, then see the
        // generation moved on.
        let mut sentinel = self.shared.sentinel.lock().await;
        if self.current().0 != generation {
            return;
        }
        match primary_of(&mut sentinel, self.shared.bounds).await {
            Ok(conn) => {
                let mut g = match self.shared.current.write() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if g.0 == generation {
                    *g = (generation + 1, conn);
                    tracing::warn!(error = %e, "redis primary changed or unreachable; reconnected to the primary the sentinels name");
                }
            }
            Err(e) => tracing::warn!(error = %e, "sentinels do not name a reachable primary yet"),
        }
    }
}

async fn primary(
    sentinel: &tokio::sync::Mutex<SentinelClient>,
    bounds: Bounds,
) -> Result<ConnectionManager, RedisError> {
    primary_of(&mut *sentinel.lock().await, bounds).await
}

async fn primary_of(
    sentinel: &mut SentinelClient,
    bounds: Bounds,
) -> Result<ConnectionManager, RedisError> {
    let client = sentinel.async_get_client().await?;
    client
        .get_connection_manager_with_config(manager_config(bounds))
        .await
}

/// Every [`retry_reason`] label, in exposition order.
pub const RETRY_REASONS: [&str; 10] = [
    "moved",
    "ask",
    "tryagain",
    "clusterdown",
    "masterdown",
    "readonly",
    "loading",
    "io",
    "sentinel",
    "noreplicas",
];

/// Redis calls retried, by [`retry_reason`] (exported as `rim_<tier>_redis_retries_total`).
#[derive(Debug, Default)]
pub struct RetryCounts([crate::metrics::Counter; RETRY_REASONS.len()]);

impl RetryCounts {
    /// Counts one retry for `reason`.
    pub fn count(&self, reason: &str) {
        if let Some(i) = RETRY_REASONS.iter().position(|r| *r == reason) {
            self.0[i].inc();
        }
    }

    /// `(reason, retries)` for every reason.
    pub fn samples(&self) -> Vec<(&'static str, u64)> {
        RETRY_REASONS
            .iter()
            .zip(&self.0)
            .map(|(r, c)| (*r, c.get()))
            .collect()
    }
}
