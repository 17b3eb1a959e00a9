//! The Redis connection logic's stores share: one auto-reconnecting `ConnectionManager`, every
//! round trip bounded by `redis.timeout_ms` so a dead Redis turns into a prompt error, never a
//! hang.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{FromRedisValue, Pipeline, Script};

use super::{Health, StoreError, StoreResult};

/// Shared handle to Redis; cheap to clone. Implements every store trait (see `redis_*.rs`).
#[derive(Clone)]
pub(crate) struct RedisConn {
    conn: ConnectionManager,
    timeout: Duration,
}

impl RedisConn {
    /// Bounds every call on `conn` by `timeout`.
    pub(crate) fn new(conn: ConnectionManager, timeout: Duration) -> RedisConn {
        RedisConn { conn, timeout }
    }

    /// Runs one command.
    pub(super) async fn cmd<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> StoreResult<T> {
        let mut conn = self.conn.clone();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Runs a pipeline (use `.atomic()` on it for MULTI/EXEC).
    pub(super) async fn pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> StoreResult<T> {
        let mut conn = self.conn.clone();
        self.bounded(pipe.query_async(&mut conn)).await
    }

    /// Runs a Lua script with keys and args (EVALSHA, loading the script when Redis lacks it).
    pub(super) async fn script<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> StoreResult<T> {
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

    /// Runs a prepared script invocation (for arguments that are not all strings).
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> StoreResult<T> {
        let mut conn = self.conn.clone();
        self.bounded(inv.invoke_async(&mut conn)).await
    }

    async fn bounded<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> StoreResult<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}

#[async_trait]
impl Health for RedisConn {
    async fn ping(&self, within: Duration) -> Result<(), String> {
        rim_runtime::redis::ping(&self.conn, within).await
    }
}
