//! The Redis connection logic writes through: one auto-reconnecting `ConnectionManager`, every
//! round trip bounded by a timeout so a dead Redis turns into a prompt error, never a hang.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, Pipeline, Script};

/// A Redis failure, already phrased for the caller (HTTP 503 / `LogicError::Unavailable`).
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
    /// Connects (fails when Redis is unreachable now; later outages are reconnected).
    pub async fn connect(url: &str, timeout: Duration) -> Result<Store, StoreError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            timeout * 3,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StoreError(format!("connect timed out after {:?}", timeout * 3)))??;
        Ok(Store { conn, timeout })
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

    /// PING, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = self.cmd(&redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError(format!("unexpected PING reply {pong:?}")))
        }
    }
}
