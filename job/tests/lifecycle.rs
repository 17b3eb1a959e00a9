//! A worker's start and stop against a real Redis and fake comets: started before Redis is
//! reachable it waits for it and then serves; stopped with a batch in flight it finishes and
//! acknowledges that batch itself before releasing its lease.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use redis::Commands;
use rim_proto::keys;
use rim_proto::rpc::PushId;
use rim_testkit::api::eventually;
use rim_testkit::proxy::{FaultProxy, Mode, Stats, Upstream};
use rim_testkit::redis::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_redis_is_reachable_waits_and_then_serves() {
    // `rim_runtime::redis::connect`'s wait loop logs this before each retry.
    let waits = rim_testkit::logs::count_warnings("waiting for it before serving");
    let redis = RedisServer::start();
    let comet = start_comet(&redis, "c1").await;
    // Redis as the worker sees it: every connection accepted and closed at once.
    let proxy = FaultProxy::start(Upstream::Unix(redis.socket_path())).await;
    proxy.set(Mode::Refuse);
    let mut cfg = config(&redis, "w-early");
    cfg.redis.url = format!("redis://{}/", proxy.addr());
    // Each connection attempt (which redis-rs itself retries up to 6 times) is cut at 3 x 200 ms,
    // so the wait loop turns quickly.
    cfg.redis.timeout_ms = 200;
    let job_tier = start_job(cfg).await;

    // Two attempts failed and the worker waits on: it has not exited, nor taken anything.
    eventually("two waits for Redis", Duration::from_secs(10), || async {
        (waits.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await
    .unwrap();
    assert!(!job_tier.handle.is_finished(), "waiting, not exited");
    assert!(Stats::get(&proxy.stats().refused) >= 2);
    let mut conn = redis.connection();
    assert_eq!(lease_holder(&mut conn, 0), None, "nothing taken yet");

    proxy.set(Mode::Forward);
    wait_for("all four leases held", || {
        (0..4).all(|p| lease_holder(&mut conn, p).as_deref() == Some("w-early"))
    })
    .await;
    let id = xadd(&mut conn, 2, &job("m", to("c1", "k")));
    wait_for("delivered", || comet.delivered().len() == 1).await;
    assert_eq!(
        comet.delivered()[0].id,
        PushId::from_stream_id(2, &id).unwrap()
    );
    wait_for("acked", || pending(&mut conn, 2) == 0).await;
    assert!(job_tier.get("/readyz").await.contains("200 OK"));
    job_tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_acks_its_in_flight_batch_itself_then_releases_its_lease() {
    let redis = RedisServer::start();
    let comet = start_comet(&redis, "c1").await;
    comet.gated.store(true, Ordering::SeqCst);
    let mut cfg = config(&redis, "w-term");
    // Far beyond the wait below: the held call is neither timed out nor retried.
    cfg.delivery.rpc_timeout_ms = 10_000;
    let mut job_tier = start_job(cfg).await;
    let mut conn = redis.connection();

    let id = xadd(&mut conn, 1, &job("m", to("c1", "k")));
    wait_for("the call held at the comet", || {
        comet.attempts.load(Ordering::SeqCst) == 1
    })
    .await;
    job_tier.stop.cancel();
    // Stopping, the worker waits for the batch: still running, the lease still its own and
    // renewed, the entry still pending.
    let waited = tokio::time::timeout(Duration::from_millis(500), &mut job_tier.handle).await;
    assert!(waited.is_err(), "returned with its batch unconfirmed");
    assert_eq!(lease_holder(&mut conn, 1).as_deref(), Some("w-term"));
    assert_eq!(pending(&mut conn, 1), 1);

    comet.gate.notify_one();
    tokio::time::timeout(Duration::from_secs(10), job_tier.handle)
        .await
        .expect("run returns once the batch is confirmed")
        .unwrap()
        .expect("run ok");
    // Acknowledged and trimmed by this worker (no other runs), delivered once, then released.
    let delivered: Vec<PushId> = comet.delivered().iter().map(|d| d.id).collect();
    assert_eq!(delivered, vec![PushId::from_stream_id(1, &id).unwrap()]);
    assert_eq!(comet.attempts.load(Ordering::SeqCst), 1);
    assert_eq!(pending(&mut conn, 1), 0);
    assert_eq!(stream_ids(&mut conn, 1), 0);
    for p in 0..4 {
        assert_eq!(lease_holder(&mut conn, p), None, "lease {p} released");
    }
    let score: Option<f64> = conn.zscore(keys::JOB_WORKERS, "w-term").unwrap();
    assert_eq!(score, None, "left rim:jobs");
}
