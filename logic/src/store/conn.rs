//! The Redis connection logic's stores share, on any topology (`rim_runtime::redis::Conn`):
//! every call bounded by `redis.timeout_ms`, so a dead Redis turns into a prompt error, never a
//! hang, and retried with backoff within that bound when the failure is one a retry can outlive
//! (a cluster redirect, a failover, a dropped connection), counted in
//! `rim_logic_redis_retries_total{reason}`. Retrying is safe because every write the stores send
//! is idempotent (each store's rules say how).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Cmd, FromRedisValue, Pipeline, RedisResult, Script};
use rim_runtime::backoff::Backoff;
use rim_runtime::redis::{Conn, retry_reason};
use rim_runtime::redis_conn::RetryCounts;
use tokio::time::Instant;

use super::{Health, StoreError, StoreResult};

/// First and longest pause between retries of one call.
const RETRY_FIRST: Duration = Duration::from_millis(25);
const RETRY_MAX: Duration = Duration::from_millis(400);

/// Shared handle to Redis; cheap to clone. Implements every store trait (see `redis_*.rs`).
#[derive(Clone)]
pub(crate) struct RedisConn {
    conn: Conn,
    timeout: Duration,
    /// `redis.wait_replicas`: replicas that must hold a push before it is acknowledged.
    pub(super) wait_replicas: u32,
    retries: Arc<RetryCounts>,
}

impl RedisConn {
    /// Bounds every call on `conn` by `timeout`, counting retries in `retries`.
    pub(crate) fn new(
        conn: Conn,
        timeout: Duration,
        wait_replicas: u32,
        retries: Arc<RetryCounts>,
    ) -> RedisConn {
        RedisConn {
            conn,
            timeout,
            wait_replicas,
            retries,
        }
    }

    /// The bound on one call (`redis.timeout_ms`).
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one command.
    pub(super) async fn cmd<T: FromRedisValue>(&self, cmd: &Cmd) -> StoreResult<T> {
        self.retrying(|mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    /// Runs commands that may each live in another hash slot and returns their replies in order:
    /// one pipeline on a single server (one round trip), concurrent commands on a cluster (each
    /// to its slot's master).
    pub(super) async fn each<T: FromRedisValue>(&self, cmds: Vec<Cmd>) -> StoreResult<Vec<T>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        if !self.conn.is_cluster() {
            let mut pipe = redis::pipe();
            for c in cmds {
                pipe.add_command(c);
            }
            return self.pipe(&pipe).await;
        }
        futures::future::try_join_all(cmds.iter().map(|c| self.cmd::<T>(c))).await
    }

    /// Runs a pipeline whose commands all touch one hash slot (use `.atomic()` on it for
    /// MULTI/EXEC).
    pub(super) async fn pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> StoreResult<T> {
        self.retrying(|mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    /// Runs a Lua script with keys and args (EVALSHA, loading the script when Redis lacks it).
    pub(super) async fn script<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> StoreResult<T> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        self.invoke(&inv).await
    }

    /// Runs a prepared script invocation (for arguments that are not all strings).
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> StoreResult<T> {
        self.retrying(|mut c| async move { inv.invoke_async(&mut c).await })
            .await
    }

    /// Runs `call` until it succeeds, fails for good, or the call's `redis.timeout_ms` is spent.
    async fn retrying<T, F, Fut>(&self, call: F) -> StoreResult<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        loop {
            let attempt = tokio::time::timeout_at(deadline, call(self.conn.clone())).await;
            let e = match attempt {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => return Err(StoreError::Timeout(self.timeout)),
            };
            let Some(reason) = retry_reason(&e) else {
                return Err(e.into());
            };
            let pause = backoff.next_delay();
            if Instant::now() + pause >= deadline {
                return Err(e.into());
            }
            self.retries.count(reason);
            tokio::time::sleep(pause).await;
        }
    }
}

#[async_trait]
impl Health for RedisConn {
    async fn ping(&self, within: Duration) -> Result<(), String> {
        rim_runtime::redis::ping(&self.conn, within).await
    }
}
