//! The job tier's Redis connections: opened once at start (through `rim_runtime::redis`, which
//! also checks the cluster's partition count) and shared by the Redis stores and the readiness
//! probe.

use std::sync::Arc;
use std::time::Duration;

use rim_runtime::redis::{Bounds, Conn, RedisStartError, Topology};
use tokio_util::sync::CancellationToken;

use super::Stores;
use super::redis_directory::RedisDirectory;
use super::redis_leases::RedisLeases;
use super::redis_stream::RedisStreams;
use crate::Config;

/// Redis as the job tier uses it.
#[derive(Clone)]
pub(crate) struct RedisBackend {
    /// For dedicated (blocking) connections.
    topology: Topology,
    /// Auto-reconnecting connection for ordinary commands.
    conn: Conn,
}

/// Bounds of the command connection: at least 5 s per reply, since an `XAUTOCLAIM` of a large
/// batch can be megabytes.
fn bounds(cfg: &Config) -> Bounds {
    Bounds {
        connect: cfg.redis.timeout(),
        response: cfg.redis.timeout().max(Duration::from_secs(5)),
    }
}

impl RedisBackend {
    /// Connects (retrying while Redis is unreachable) and checks the partition count. `Ok(None)`
    /// when `shutdown` came first.
    pub(crate) async fn connect(
        cfg: &Config,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, RedisStartError> {
        let connected =
            rim_runtime::redis::connect(&cfg.redis, bounds(cfg), cfg.stream.partitions, shutdown)
                .await?;
        Ok(connected.map(|(topology, conn)| RedisBackend { topology, conn }))
    }

    /// The stores, all on these connections.
    pub(crate) fn stores(&self) -> Stores {
        Stores {
            streams: Arc::new(RedisStreams::new(self.topology.clone(), self.conn.clone())),
            leases: Arc::new(RedisLeases::new(self.conn.clone())),
            directory: Arc::new(RedisDirectory::new(self.conn.clone())),
        }
    }

    /// Readiness: Redis answers a PING within 2 s.
    pub(crate) async fn ready(&self) -> Result<(), String> {
        rim_runtime::redis::ping(&self.conn, Duration::from_secs(2)).await
    }
}
