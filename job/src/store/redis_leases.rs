//! [`Leases`] on Redis: each lease is the string `rim:lease:{p}` holding the worker id with a
//! `PX` TTL, changed only by `SET NX` or compare-and-change Lua scripts; live workers are the
//! sorted set `rim:jobs` (worker id → expiry in unix ms).

use async_trait::async_trait;
use rim_proto::keys;
use rim_runtime::redis::Conn;

use super::{Leases, StoreResult};

/// Extends a lease only if it is still ours.
const RENEW_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Compare-and-delete of a lease: only the holder may release it.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

pub(super) struct RedisLeases {
    redis: Conn,
    renew: redis::Script,
    release: redis::Script,
}

impl RedisLeases {
    pub(super) fn new(redis: Conn) -> Self {
        RedisLeases {
            redis,
            renew: redis::Script::new(RENEW_LUA),
            release: redis::Script::new(RELEASE_LUA),
        }
    }
}

#[async_trait]
impl Leases for RedisLeases {
    /// `MULTI ZADD rim:jobs <now+ttl> <me>; ZREMRANGEBYSCORE rim:jobs -inf (<now>; ZCARD rim:jobs`.
    async fn heartbeat(&self, worker: &str, now_ms: u64, ttl_ms: u64) -> StoreResult<u64> {
        let mut redis = self.redis.clone();
        let (live,): (u64,) = redis::pipe()
            .atomic()
            .cmd("ZADD")
            .arg(keys::JOB_WORKERS)
            .arg(now_ms + ttl_ms)
            .arg(worker)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(keys::JOB_WORKERS)
            .arg("-inf")
            .arg(format!("({now_ms}"))
            .ignore()
            .cmd("ZCARD")
            .arg(keys::JOB_WORKERS)
            .query_async(&mut redis)
            .await?;
        Ok(live)
    }

    /// `ZREM rim:jobs <me>`.
    async fn leave(&self, worker: &str) -> StoreResult<()> {
        let mut redis = self.redis.clone();
        let () = redis::cmd("ZREM")
            .arg(keys::JOB_WORKERS)
            .arg(worker)
            .query_async(&mut redis)
            .await?;
        Ok(())
    }

    /// `SET rim:lease:{p} <me> NX PX <ttl>`.
    async fn acquire(&self, partition: u16, worker: &str, ttl_ms: u64) -> StoreResult<bool> {
        let mut redis = self.redis.clone();
        let got: Option<String> = redis::cmd("SET")
            .arg(keys::partition_lease(partition))
            .arg(worker)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut redis)
            .await?;
        Ok(got.is_some())
    }

    /// [`RENEW_LUA`].
    async fn renew(&self, partition: u16, worker: &str, ttl_ms: u64) -> StoreResult<bool> {
        let mut redis = self.redis.clone();
        let ours: i64 = self
            .renew
            .key(keys::partition_lease(partition))
            .arg(worker)
            .arg(ttl_ms)
            .invoke_async(&mut redis)
            .await?;
        Ok(ours == 1)
    }

    /// [`RELEASE_LUA`].
    async fn release(&self, partition: u16, worker: &str) -> StoreResult<bool> {
        let mut redis = self.redis.clone();
        let deleted: i64 = self
            .release
            .key(keys::partition_lease(partition))
            .arg(worker)
            .invoke_async(&mut redis)
            .await?;
        Ok(deleted == 1)
    }
}
