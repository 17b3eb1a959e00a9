//! The store rules of `mod.rs` checked on the Redis stores against a real `redis-server`: the
//! same contract `memory_tests.rs` checks on the in-memory twins, here where Redis's own
//! semantics (`XPENDING IDLE`, `BUSYGROUP`, `ZREMRANGEBYSCORE`, the compare-and-delete script)
//! decide the answer. End-to-end use of these stores is `job/tests/delivery.rs`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use redis::Commands;
use rim_proto::keys;
use rim_testkit::redis::RedisServer;
use tokio_util::sync::CancellationToken;

use super::{RedisBackend, Stores};
use crate::Config;

async fn backend(redis: &RedisServer) -> RedisBackend {
    let mut cfg = Config::default();
    cfg.redis.url = redis.url();
    RedisBackend::connect(&cfg, &CancellationToken::new())
        .await
        .unwrap()
        .expect("not shut down")
}

async fn stores(redis: &RedisServer) -> Stores {
    backend(redis).await.stores()
}

#[tokio::test]
async fn the_group_is_created_once_and_other_refusals_are_errors() {
    let redis = RedisServer::start();
    let stores = stores(&redis).await;
    let mut s = stores.streams.open(2, "me");
    s.ensure_group().await.unwrap();
    s.ensure_group().await.expect("an existing group is fine");

    // A key that is not a stream: Redis refuses the group, and that must reach the caller (the
    // partition retries with backoff) rather than pass for "the group exists".
    let _: () = redis.connection().set(keys::push_stream(3), "x").unwrap();
    let mut broken = stores.streams.open(3, "me");
    assert!(broken.ensure_group().await.is_err());
}

#[tokio::test]
async fn entries_read_but_not_acknowledged_are_stale_pending_after_their_idle_time() {
    let redis = RedisServer::start();
    let stores = stores(&redis).await;
    let mut s = stores.streams.open(1, "me");
    s.ensure_group().await.unwrap();
    assert!(
        !s.has_stale_pending(Duration::ZERO).await.unwrap(),
        "nothing pending, nothing stale"
    );
    let id: String = redis
        .connection()
        .xadd(keys::push_stream(1), "*", &[(keys::JOB_FIELD, "j")])
        .unwrap();
    let read = s.read_new(10, Duration::from_millis(10)).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].id, id);
    // Idle 0: pending at all. An hour: not yet.
    assert!(s.has_stale_pending(Duration::ZERO).await.unwrap());
    assert!(
        !s.has_stale_pending(Duration::from_secs(3600))
            .await
            .unwrap()
    );
    let left = s.ack_trim(std::slice::from_ref(&id), None).await.unwrap();
    assert_eq!(left.pending, 0);
    assert!(!s.has_stale_pending(Duration::ZERO).await.unwrap());
}

#[tokio::test]
async fn only_the_holder_releases_and_heartbeats_drop_expired_workers() {
    let redis = RedisServer::start();
    let leases = stores(&redis).await.leases;
    assert!(leases.acquire(3, "a", 60_000).await.unwrap());
    assert!(!leases.release(3, "b").await.unwrap(), "not b's to release");
    assert!(leases.release(3, "a").await.unwrap());
    assert!(
        !leases.release(3, "a").await.unwrap(),
        "released already: nothing deleted"
    );
    assert!(leases.acquire(3, "b", 60_000).await.unwrap());

    // Expiries in unix ms as the callers give them: a is live until 1500.
    assert_eq!(leases.heartbeat("a", 1_000, 500).await.unwrap(), 1);
    assert_eq!(leases.heartbeat("b", 1_400, 500).await.unwrap(), 2);
    assert_eq!(
        leases.heartbeat("b", 1_600, 500).await.unwrap(),
        1,
        "a expired at 1500"
    );
    let workers: Vec<(String, u64)> = redis
        .connection()
        .zrange_withscores(keys::JOB_WORKERS, 0, -1)
        .unwrap();
    assert_eq!(workers, vec![("b".to_owned(), 2_100)]);
}

#[tokio::test]
async fn readiness_fails_while_redis_is_gone() {
    let mut redis = RedisServer::start();
    let backend = backend(&redis).await;
    backend.ready().await.unwrap();
    redis.kill();
    let err = backend.ready().await.expect_err("Redis is gone");
    assert!(!err.is_empty());
}
