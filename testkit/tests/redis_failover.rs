//! What a Redis failover costs rim, measured rather than assumed: pushes flow to one user while
//! the master holding that user's push partition is killed with SIGKILL and its replica takes
//! over (Redis Cluster), or the sentinels promote the replica (Sentinel).
//!
//! With `redis.wait_replicas = 1` every acknowledged push must reach the user exactly once and in
//! order: it was on the replica before logic answered. While the promoted master has no replica
//! (until the killed node is back as one), pushes are refused with 503, never acknowledged and
//! lost. With 0 the test reports how many acknowledged pushes the failover lost (the ones the
//! master had not yet sent to its replica); duplicates and reordering are errors either way.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, Options};
use parking_lot::Mutex;
use rim_testkit::api::{Api, eventually};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::redis_cluster::{RedisCluster, SentinelSet};
use rim_testkit::test_redis::TestRedis;
use tokio::sync::watch;

const MID: i64 = 7;
const OP: i32 = 1000;
/// Acknowledged pushes to see before the kill, and again after the cluster is whole.
const BATCH: usize = 30;
const WAIT: Duration = Duration::from_secs(40);
/// logic's default `node.ttl_ms`: comets that cannot renew while Redis fails over must not look
/// departed when it is back (docs/scaling.md: keep it above the failover time).
const NODE_TTL_MS: u64 = 15_000;

/// What the publisher got back.
#[derive(Default)]
struct Published {
    acked: Vec<u64>,
    refused: Vec<u64>,
}

/// Pushes `m1`, `m2`, … to [`MID`] one after another until `stop`.
fn publish(api: Api, stop: watch::Receiver<bool>) -> Arc<Mutex<Published>> {
    let out = Arc::new(Mutex::new(Published::default()));
    let rec = out.clone();
    tokio::spawn(async move {
        for n in 1u64.. {
            if *stop.borrow() {
                break;
            }
            let body = format!("m{n}");
            match api.push_mids(OP, &[MID], body.as_bytes()).await {
                Ok(_) => rec.lock().acked.push(n),
                Err(_) => rec.lock().refused.push(n),
            }
            // Pacing only: a steady flow across the failover, not a burst before it.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    out
}

/// What the user's session got: push numbers in arrival order, and why the session ended if it
/// did (a test failure: the session must outlive the failover).
#[derive(Default)]
struct Seen {
    pushes: Vec<u64>,
    ended: Option<String>,
}

/// Records every push `c` receives (heartbeating while idle) for the rest of the test: the
/// session stays open until every acknowledged push was judged (closing it earlier would turn
/// late deliveries into pushes for a session that left).
fn receive(mut c: Conn) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let rec = seen.clone();
    tokio::spawn(async move {
        let number = |body: &[u8]| -> u64 {
            std::str::from_utf8(body)
                .ok()
                .and_then(|s| s.strip_prefix('m'))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("unexpected push body {body:?}"))
        };
        let ended = loop {
            match c.next_push(Duration::from_millis(300)).await {
                Ok(Some(r)) => rec.lock().pushes.push(number(&r.frame.body)),
                Ok(None) => match c.pushes_before_heartbeat().await {
                    Ok(pushes) => rec
                        .lock()
                        .pushes
                        .extend(pushes.iter().map(|r| number(&r.frame.body))),
                    Err(e) => break format!("heartbeat: {e}"),
                },
                Err(e) => break e.to_string(),
            }
        };
        rec.lock().ended = Some(ended);
    });
    seen
}

async fn acked_reaches(published: &Arc<Mutex<Published>>, n: usize) {
    let what = format!("{n} acknowledged pushes");
    eventually(&what, WAIT, || {
        let ok = published.lock().acked.len() >= n;
        async move { ok.then_some(()) }
    })
    .await
    .unwrap();
}

/// Checks deliveries against acknowledgements (none twice, in order); returns the acknowledged
/// pushes that were lost.
async fn check(published: &Arc<Mutex<Published>>, seen: &Arc<Mutex<Seen>>) -> Vec<u64> {
    let acked: BTreeSet<u64> = published.lock().acked.iter().copied().collect();
    // Deliveries settle: wait (bounded) for every acknowledged push, then judge what came.
    let _ = eventually("every acknowledged push delivered", WAIT, || {
        let got: BTreeSet<u64> = seen.lock().pushes.iter().copied().collect();
        let done = acked.is_subset(&got);
        async move { done.then_some(()) }
    })
    .await;
    if let Some(why) = &seen.lock().ended {
        panic!("the user's session ended during the failover: {why}");
    }
    let seen = seen.lock().pushes.clone();
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "no push delivered twice: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "pushes arrive in the order they were accepted: {seen:?}"
    );
    acked.difference(&unique).copied().collect()
}

/// A running scenario: rim on `redis`, [`MID`]'s session recording what it gets, and the
/// publisher; [`BATCH`] pushes already acknowledged.
struct Flow {
    cluster: Cluster,
    seen: Arc<Mutex<Seen>>,
    published: Arc<Mutex<Published>>,
    stop: watch::Sender<bool>,
}

async fn flow(redis: TestRedis, wait_replicas: u32) -> Flow {
    let cluster = Cluster::start_with(Options {
        comets: 1,
        redis: Some(redis),
        logic: Box::new(move |c| {
            c.redis.wait_replicas = wait_replicas;
            c.node.ttl_ms = NODE_TTL_MS;
        }),
        ..Options::default()
    })
    .await;
    let client = cluster.client(0, Transport::Tcp, MID, "", &[OP]).await;
    let (stop_tx, stop) = watch::channel(false);
    let seen = receive(client);
    let published = publish(cluster.api.clone(), stop);
    acked_reaches(&published, BATCH).await;
    Flow {
        cluster,
        seen,
        published,
        stop: stop_tx,
    }
}

/// The comet's and the job's counters, for a failure message.
async fn tier_metrics(cluster: &Cluster) -> String {
    format!(
        "comet: {}\njob: {}",
        metrics(cluster.comets[0].http, "rim_comet_push").await,
        metrics(cluster.job_http, "rim_job_").await
    )
}

async fn metrics(http: std::net::SocketAddr, prefix: &str) -> String {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .and_then(|r| r.error_for_status());
    match text {
        Ok(r) => r
            .text()
            .await
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => e.to_string(),
    }
}

/// Runs the scenario on a 3-master cluster; returns (acknowledged, refused, lost).
async fn cluster_failover(wait_replicas: u32) -> (usize, usize, usize) {
    let redis = RedisCluster::start(3, 1);
    let stream = rim_proto::keys::push_stream(rim_proto::job::mid_partition(MID, 16));
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&stream)
        .query(&mut redis.connection())
        .unwrap();
    let Flow {
        mut cluster,
        seen,
        published,
        stop: stop_tx,
    } = flow(TestRedis::Cluster(redis), wait_replicas).await;
    let TestRedis::Cluster(redis) = &mut cluster.redis else {
        unreachable!()
    };
    let old = redis.master_of(slot);
    tokio::task::block_in_place(|| {
        redis.kill(old);
        redis.wait_failover(slot, old);
    });
    if wait_replicas > 0 {
        // The promoted master has no replica: nothing is acknowledged until the old one is
        // back as its replica.
        tokio::task::block_in_place(|| redis.restart(old));
    }
    let after = published.lock().acked.len() + BATCH;
    acked_reaches(&published, after).await;
    let _ = stop_tx.send(true);
    let lost = check(&published, &seen).await;
    if wait_replicas > 0 && !lost.is_empty() {
        let counters = tier_metrics(&cluster).await;
        let TestRedis::Cluster(redis) = &cluster.redis else {
            unreachable!()
        };
        panic!(
            "acknowledged pushes lost: {lost:?}; delivered {:?}\n{}\n{counters}",
            seen.lock().pushes,
            redis.describe_stream(&stream)
        );
    }
    let p = published.lock();
    (p.acked.len(), p.refused.len(), lost.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_with_wait_replicas_loses_no_acknowledged_push() {
    let (acked, refused, lost) = cluster_failover(1).await;
    assert_eq!(lost, 0);
    eprintln!(
        "redis cluster failover, wait_replicas = 1: {acked} pushes acknowledged, all delivered \
         once and in order; {refused} refused (503) while the partition's master was down or \
         had no replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_without_wait_replicas_reports_what_was_at_risk() {
    let (acked, refused, lost) = cluster_failover(0).await;
    eprintln!(
        "redis cluster failover, wait_replicas = 0: {acked} pushes acknowledged, {lost} of them \
         lost with the killed master (at risk: those it had not yet replicated); {refused} \
         refused (503) during the failover; none duplicated or reordered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_load_loses_no_acknowledged_push() {
    let set = SentinelSet::start();
    let old = set.primary();
    let Flow {
        mut cluster,
        seen,
        published,
        stop: stop_tx,
    } = flow(TestRedis::Sentinel(set), 1).await;
    let TestRedis::Sentinel(set) = &mut cluster.redis else {
        unreachable!()
    };
    tokio::task::block_in_place(|| {
        set.kill(old);
        set.wait_failover(old);
        set.restart(old);
    });
    let after = published.lock().acked.len() + BATCH;
    acked_reaches(&published, after).await;
    let _ = stop_tx.send(true);
    let lost = check(&published, &seen).await;
    assert!(
        lost.is_empty(),
        "acknowledged pushes lost: {lost:?}; delivered {:?}",
        seen.lock().pushes
    );
    let p = published.lock();
    eprintln!(
        "sentinel failover, wait_replicas = 1: {} pushes acknowledged, all delivered once and in \
         order; {} refused (503) during the failover",
        p.acked.len(),
        p.refused.len()
    );
}
