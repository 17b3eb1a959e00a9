//! Delivery under network faults between the tiers, staged with a proxy the test controls
//! (`rim_testkit::proxy`), with the chaos harness of `chaos.rs`: each scenario first proves its
//! fault took effect, then checks that every recipient got every accepted number exactly once
//! and in order, without reconnecting.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

mod chaos_common;

use chaos_common::*;
use rim_testkit::api::{eventually, metric};
use rim_testkit::proxy::{FaultProxy, Mode, Stats, Upstream};
use rim_testkit::redis::RedisServer;
use rim_testkit::test_redis::TestRedis;
use tokio::sync::watch;

/// job cut off from one comet: first its confirmations are lost (the comet executes every
/// delivery, job never hears), then nothing gets through at all, then the held connections die
/// and the network heals. Job
/// must keep those entries pending and deliver them again, and the comet must recognise the
/// ones it already had; nothing may be given up as unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_job_from_one_comet_mid_stream() {
    // One worker, so every delivery to comet 1 (the first comet, index 0) crosses the proxy.
    let (cluster, proxy) = ProcCluster::with_proxied_comet(1).await;
    let (stop_tx, stop) = watch::channel(false);
    let rs = recipients(&cluster, &stop).await;
    let mids: Vec<i64> = rs.iter().map(|r| r.mid).collect();
    let behind: Vec<_> = rs
        .iter()
        .filter(|r| r.home == 0)
        .map(|r| r.seen.clone())
        .collect();
    let (job_http, comet_ops) = (cluster.job_http[0], cluster.comets[0].ops);
    let redis = &cluster.redis;
    let failures = || async {
        metric(job_http, "rim_job_rpc_failures_total")
            .await
            .unwrap_or(0)
    };

    let published = publish_with_fault(&cluster.api, &mids, || async {
        // Lost confirmations. Evidence: replies were dropped, and the worker holds entries
        // unacknowledged whose room pushes comet 1's clients already have.
        proxy.set(Mode::DropReplies);
        eventually(
            "a delivery executed by comet 1 whose confirmation was lost",
            WAIT,
            || async {
                let (_, held) = pending_numbers(&mut redis.connection(), "job-1");
                let got = behind
                    .iter()
                    .all(|s| held.iter().any(|n| s.lock().room_seqs.contains(n)));
                (Stats::get(&proxy.stats().dropped) > 0 && got).then_some(())
            },
        )
        .await
        .unwrap();

        // Nothing through. Evidence: job's calls to comet 1 keep failing.
        proxy.set(Mode::Blackhole);
        let before = failures().await;
        eventually("job's calls to comet 1 failing", WAIT, || async {
            (failures().await >= before + 2).then_some(())
        })
        .await
        .unwrap();

        // The partition ends as real ones do: the held connections die (what was written into
        // them is lost), then new ones get through.
        proxy.set(Mode::Refuse);
        proxy.set(Mode::Forward);
    })
    .await;

    assert!(
        all_accepted(&published),
        "a partition between job and a comet must not refuse pushes"
    );
    check(&rs, &published).await;
    // A partition between job and a comet is not the clients' business.
    assert_sessions(&rs, |_| 1);
    // Redelivered after the heal, recognised by the comet, nothing given up.
    let dup = metric(comet_ops, "rim_comet_push_duplicates_total").await;
    assert!(dup.unwrap_or(0) >= 1, "comet 1 saw no replay: {dup:?}");
    for reason in ["comet_unreachable", "comet_gone"] {
        let name = format!("rim_job_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(job_http, &name).await, Some(0), "{name}");
    }
    eventually("job-1 acknowledged everything", WAIT, || async {
        (pending_of(&mut redis.connection(), "job-1") == 0).then_some(())
    })
    .await
    .unwrap();
    let _ = stop_tx.send(true);
}

/// Redis hangs (connections open, nothing answered) under logic and job while pushes flow, then
/// comes back. Pushes are refused while it hangs (never left waiting), the comets keep every
/// session, and everything accepted is delivered exactly once after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_redis_mid_stream() {
    // One redis-server whatever RIM_TEST_REDIS says: a proxy cannot stand in front of a Redis
    // Cluster (its redirects name the nodes' own addresses).
    let mut redis = TestRedis::Single(RedisServer::start_with(true));
    let proxy = FaultProxy::start(Upstream::Unix(redis.single().socket_path())).await;
    let opts = ProcOpts {
        jobs: 1,
        comets: 2,
        redis_url: Some(format!("redis://{}/", proxy.addr())),
        ..ProcOpts::default()
    };
    let cluster = ProcCluster::start_opts(redis, opts).await;
    let (stop_tx, stop) = watch::channel(false);
    let rs = recipients(&cluster, &stop).await;
    let mids: Vec<i64> = rs.iter().map(|r| r.mid).collect();
    let (logic_http, job_http) = (cluster.logic_http, cluster.job_http[0]);
    let counter = |addr, name: &'static str| async move { metric(addr, name).await.unwrap_or(0) };

    let published = publish_with_fault(&cluster.api, &mids, || async {
        proxy.set(Mode::Blackhole);
        // Evidence: logic refused a push for want of Redis, and job lost its leases (it could
        // not renew them), while the proxy relayed nothing.
        let relayed = Stats::get(&proxy.stats().up);
        eventually("logic refusing pushes, job fenced", WAIT, || async {
            let refused = counter(logic_http, "rim_logic_pushes_refused_total").await;
            let lost = counter(job_http, "rim_job_leases_lost_total").await;
            (refused > 0 && lost > 0).then_some(())
        })
        .await
        .unwrap();
        assert_eq!(Stats::get(&proxy.stats().up), relayed, "relayed while hung");
        // Redis comes back: held connections die, new ones get through.
        proxy.set(Mode::Refuse);
        proxy.set(Mode::Forward);
    })
    .await;

    assert!(
        published
            .mid
            .iter()
            .chain(&published.room)
            .any(|s| !s.accepted),
        "no push was refused while Redis hung"
    );
    check(&rs, &published).await;
    // Comets keep their sessions through a Redis outage.
    assert_sessions(&rs, |_| 1);
    let _ = stop_tx.send(true);
}
