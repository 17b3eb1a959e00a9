//! The Redis connection logic writes through: one auto-reconnecting `ConnectionManager`, every
//! round trip bounded by a timeout so a dead Redis turns into a prompt error, never a hang.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, Pipeline, Script};

/// A Redis failure, already phrased for the caller (HTTP 503 / `rpc::LogicError::Unavailable`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("redis unavailable: {0}")]
pub struct StoreError(pub String);

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError(e.to_string())
    }
}

/// Shared handle to Redis; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    timeout: Duration,
}

impl Store {
    /// Bounds every call on `conn` by `timeout`.
    pub fn new(conn: ConnectionManager, timeout: Duration) -> Store {
        Store { conn, timeout }
    }

    /// Runs one command.
    pub async fn cmd<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Runs a pipeline (use `.atomic()` on it for MULTI/EXEC).
    pub async fn pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(pipe.query_async(&mut conn)).await
    }

    /// Runs a Lua script with keys and args.
    pub async fn script<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        self.bounded(inv.invoke_async(&mut conn)).await
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(StoreError(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// PING within `within`, for readiness.
    pub async fn ping(&self, within: Duration) -> Result<(), String> {
        rim_runtime::redis::ping(&self.conn, within).await
    }
}
