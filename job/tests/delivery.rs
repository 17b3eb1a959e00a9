//! End-to-end behaviour of the job tier against a real Redis and fake comets: ordering, PushIds,
//! acknowledgement only after confirmation, retries, room routing, drops, takeover and shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use redis::Commands;
use rim_proto::job::Route;
use rim_proto::keys;
use rim_proto::room::RoomId;
use rim_proto::rpc::{DeliverTarget, NodeInfo, PushId};
use rim_testkit::api::metric;
use rim_testkit::proxy::{FaultProxy, Mode, Upstream};
use rim_testkit::redis::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_in_order_and_acks_only_after_the_comet_confirms() {
    let redis = RedisServer::start();
    let comet = start_comet(&redis, "c1").await;
    comet.failing.store(true, Ordering::SeqCst);
    let job_tier = start_job(config(&redis, "w1")).await;
    let mut conn = redis.connection();

    // One transaction, so a blocked XREADGROUP wakes up to all five at once (one batch).
    let mut pipe = redis::pipe();
    pipe.atomic();
    for i in 0..5 {
        pipe.xadd(
            keys::push_stream(1),
            "*",
            &[(
                keys::JOB_FIELD,
                job(&format!("m{i}"), to("c1", "k")).encode(),
            )],
        );
    }
    let ids: Vec<String> = pipe.query(&mut conn).unwrap();

    // The comet hangs: job keeps retrying and nothing is acknowledged meanwhile.
    wait_for("two failed attempts", || {
        comet.attempts.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(pending(&mut conn, 1), 5, "read but unacknowledged");
    assert!(comet.delivered().is_empty());

    comet.failing.store(false, Ordering::SeqCst);
    wait_for("all five delivered", || comet.delivered().len() >= 5).await;
    wait_for("pending drained", || pending(&mut conn, 1) == 0).await;

    let got = comet.delivered();
    let want: Vec<PushId> = ids
        .iter()
        .map(|id| PushId::from_stream_id(1, id).unwrap())
        .collect();
    assert_eq!(got.iter().map(|d| d.id).collect::<Vec<_>>(), want);
    assert_eq!(got[0].target, DeliverTarget::Keys(vec!["k".into()]));
    assert_eq!(got[3].body, Bytes::from("body-m3"));
    // Trimmed below the acknowledged position.
    let len: u64 = conn.xlen(keys::push_stream(1)).unwrap();
    assert_eq!(len, 0);

    // Every attempt made while the comet hung ran into the deadline and was retried; the last
    // one was confirmed. The batch counter goes up last, after XACK returned.
    let attempts = comet.attempts.load(Ordering::SeqCst) as u64;
    assert!(attempts >= 3, "{attempts}");
    wait_metric(job_tier.http, "rim_job_batches_total", 1).await;
    for (name, want) in [
        ("rim_job_rpc_failures_total", attempts - 1),
        ("rim_job_rpc_retries_total", attempts - 1),
        ("rim_job_entries_total", 5),
        ("rim_job_deliveries_total", 5),
        ("rim_job_acked_total", 5),
        ("rim_job_batches_total", 1),
    ] {
        assert_eq!(metric(job_tier.http, name).await, Some(want), "{name}");
    }
    assert!(job_tier.get("/readyz").await.contains("200 OK"));
    job_tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_pushes_reach_only_comets_in_the_room_set() {
    let redis = RedisServer::start();
    let a = start_comet(&redis, "a").await;
    let b = start_comet(&redis, "b").await;
    let mut conn = redis.connection();
    let _: () = conn.sadd(keys::room_nodes("live://1"), "a").unwrap();
    let job_tier = start_job(config(&redis, "w1")).await;

    let room = RoomId::parse("live://1").unwrap();
    xadd(&mut conn, 2, &job("r", Route::Room(room.clone())));
    // Same partition, after the room push: once b has it, the room push was routed already.
    xadd(&mut conn, 2, &job("marker", to("b", "kb")));
    xadd(&mut conn, 2, &job("all", Route::All { speed: 0 }));

    wait_for("broadcast at b", || b.delivered().len() >= 2).await;
    wait_for("broadcast at a", || a.delivered().len() >= 2).await;
    let at_a: Vec<_> = a.delivered().into_iter().map(|d| d.target).collect();
    assert_eq!(
        at_a,
        vec![DeliverTarget::Room(room), DeliverTarget::All { speed: 0 }]
    );
    let at_b: Vec<_> = b.delivered().into_iter().map(|d| d.target).collect();
    assert_eq!(
        at_b,
        vec![
            DeliverTarget::Keys(vec!["kb".into()]),
            DeliverTarget::All { speed: 0 }
        ]
    );
    wait_for("pending drained", || pending(&mut conn, 2) == 0).await;
    job_tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_comets_and_undecodable_entries_are_dropped_counted_and_acked() {
    let redis = RedisServer::start();
    let c1 = start_comet(&redis, "c1").await;
    let mut conn = redis.connection();
    // A comet whose registration lapsed.
    let _: () = conn
        .hset(
            keys::NODES,
            "old",
            serde_json::to_string(&NodeInfo::default()).unwrap(),
        )
        .unwrap();
    let _: () = conn.zadd(keys::NODES_EXPIRY, "old", 1u64).unwrap();
    let job_tier = start_job(config(&redis, "w1")).await;

    xadd(&mut conn, 0, &job("ghost", to("nobody", "k")));
    xadd(&mut conn, 0, &job("old", to("old", "k")));
    let _: String = conn
        .xadd(
            keys::push_stream(0),
            "*",
            &[(keys::JOB_FIELD, b"\xc1garbage".as_slice())],
        )
        .unwrap();
    let _: String = conn
        .xadd(keys::push_stream(0), "*", &[("other", "x")])
        .unwrap();
    let marker = xadd(&mut conn, 0, &job("marker", to("c1", "k")));

    wait_for("marker delivered", || c1.delivered().len() == 1).await;
    assert_eq!(
        c1.delivered()[0].id,
        PushId::from_stream_id(0, &marker).unwrap()
    );
    wait_for("pending drained", || pending(&mut conn, 0) == 0).await;
    let metrics = job_tier.get("/metrics").await;
    assert!(
        metrics.contains("rim_job_dropped_total{reason=\"comet_gone\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rim_job_dropped_total{reason=\"undecodable\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("rim_job_entries_total 5"), "{metrics}");
    job_tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_replays_a_dead_workers_pending_entries_in_order() {
    let redis = RedisServer::start();
    let c1 = start_comet(&redis, "c1").await;
    let mut conn = redis.connection();
    let stream = keys::push_stream(3);
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(keys::PUSH_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut conn)
        .unwrap();
    let mut ids: Vec<String> = (0..3)
        .map(|i| xadd(&mut conn, 3, &job(&format!("p{i}"), to("c1", "k"))))
        .collect();
    // A worker that read them and died without acknowledging.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(keys::PUSH_GROUP)
        .arg("dead-worker")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query(&mut conn)
        .unwrap();
    assert_eq!(pending(&mut conn, 3), 3);
    ids.push(xadd(&mut conn, 3, &job("new", to("c1", "k"))));

    let job_tier = start_job(config(&redis, "w2")).await;
    wait_for("all four delivered", || c1.delivered().len() >= 4).await;
    let want: Vec<PushId> = ids
        .iter()
        .map(|id| PushId::from_stream_id(3, id).unwrap())
        .collect();
    let got: Vec<PushId> = c1.delivered().iter().map(|d| d.id).collect();
    assert_eq!(got, want);
    wait_for("pending drained", || pending(&mut conn, 3) == 0).await;
    job_tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_leases_and_leaves_the_worker_set() {
    let redis = RedisServer::start();
    let job_tier = start_job(config(&redis, "w-stop")).await;
    let mut conn = redis.connection();
    wait_for("all four leases held", || {
        (0..4).all(|p| {
            conn.get::<_, Option<String>>(keys::partition_lease(p))
                .unwrap()
                .as_deref()
                == Some("w-stop")
        })
    })
    .await;
    let score: Option<f64> = conn.zscore(keys::JOB_WORKERS, "w-stop").unwrap();
    assert!(score.is_some());
    assert!(
        job_tier
            .get("/metrics")
            .await
            .contains("rim_job_partitions_held 4")
    );

    job_tier.shutdown().await;
    for p in 0..4 {
        let holder: Option<String> = conn.get(keys::partition_lease(p)).unwrap();
        assert_eq!(holder, None, "lease {p} released");
    }
    let score: Option<f64> = conn.zscore(keys::JOB_WORKERS, "w-stop").unwrap();
    assert_eq!(score, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_the_partitions() {
    let redis = RedisServer::start();
    let first = start_job(config(&redis, "w-a")).await;
    let mut conn = redis.connection();
    let holders = |conn: &mut redis::Connection| -> Vec<Option<String>> {
        (0..4)
            .map(|p| conn.get(keys::partition_lease(p)).unwrap())
            .collect()
    };
    wait_for("w-a holds all", || {
        holders(&mut conn)
            .iter()
            .all(|h| h.as_deref() == Some("w-a"))
    })
    .await;
    let second = start_job(config(&redis, "w-b")).await;
    wait_for("even split", || {
        let h = holders(&mut conn);
        h.iter().filter(|h| h.as_deref() == Some("w-a")).count() == 2
            && h.iter().filter(|h| h.as_deref() == Some("w-b")).count() == 2
    })
    .await;
    second.shutdown().await;
    wait_for("w-a takes the rest back", || {
        holders(&mut conn)
            .iter()
            .all(|h| h.as_deref() == Some("w-a"))
    })
    .await;
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_count_mismatch_is_a_start_error() {
    let redis = RedisServer::start();
    let mut conn = redis.connection();
    let _: () = conn.set(keys::META_PARTITIONS, 8).unwrap();
    let job_tier = start_job(config(&redis, "w1")).await;
    let err = tokio::time::timeout(Duration::from_secs(10), job_tier.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("stream.partitions"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_bursts_are_batched_into_one_rpc_in_order() {
    let redis = RedisServer::start();
    let a = start_comet(&redis, "a").await;
    let mut conn = redis.connection();
    let _: () = conn.sadd(keys::room_nodes("live://b"), "a").unwrap();
    let mut cfg = config(&redis, "w1");
    cfg.room_batch.max = 5;
    cfg.room_batch.linger_ms = 1000;
    // A read may last the linger, which must stay under the renewal period (config rule).
    cfg.lease.renew_ms = 1500;
    cfg.lease.ttl_ms = 4000;
    let job_tier = start_job(cfg).await;
    let room = Route::Room(RoomId::parse("live://b").unwrap());

    // Five room messages: however the reads fall, the batch waits for more until the room has
    // five, then goes out as one deliver call, in stream order.
    for i in 0..5 {
        xadd(&mut conn, 1, &job(&format!("m{i}"), room.clone()));
    }
    wait_for("five delivered", || a.delivered().len() == 5).await;
    assert_eq!(
        a.attempts.load(Ordering::SeqCst),
        1,
        "one RPC for the burst"
    );
    let bodies: Vec<_> = a.delivered().iter().map(|d| d.body.clone()).collect();
    let want: Vec<_> = (0..5)
        .map(|i| job(&format!("m{i}"), room.clone()).body)
        .collect();
    assert_eq!(bodies, want);

    // Fewer than `max`: flushed when the linger ends, still as one call.
    xadd(&mut conn, 1, &job("m5", room.clone()));
    xadd(&mut conn, 1, &job("m6", room.clone()));
    wait_for("seven delivered", || a.delivered().len() == 7).await;
    assert_eq!(a.attempts.load(Ordering::SeqCst), 2);
    wait_for("pending drained", || pending(&mut conn, 1) == 0).await;
    job_tier.shutdown().await;
}

/// `XREADGROUP GROUP rim-job <consumer> COUNT n STREAMS stream >` as the worker would send it:
/// the entries become pending for that worker although it never sees the reply.
fn read_as(conn: &mut redis::Connection, partition: u16, consumer: &str, n: usize) -> usize {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(keys::PUSH_GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(n)
        .arg("STREAMS")
        .arg(keys::push_stream(partition))
        .arg(">")
        .query(conn)
        .unwrap();
    reply.keys.iter().map(|k| k.ids.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_read_without_the_worker_seeing_the_reply_are_replayed_in_order_and_not_trimmed() {
    let redis = RedisServer::start();
    let comet = start_comet(&redis, "c1").await;
    comet.failing.store(true, Ordering::SeqCst);
    let job_tier = start_job(config(&redis, "w-lost")).await;
    let mut conn = redis.connection();

    // The worker holds E0 in a batch it keeps retrying, so it is not reading meanwhile.
    let mut ids = vec![xadd(&mut conn, 2, &job("e0", to("c1", "k")))];
    wait_for("first attempt", || {
        comet.attempts.load(Ordering::SeqCst) >= 1
    })
    .await;
    ids.push(xadd(&mut conn, 2, &job("e1", to("c1", "k"))));
    ids.push(xadd(&mut conn, 2, &job("e2", to("c1", "k"))));
    // A read of the worker's whose reply was lost: E1, E2 are pending for it, unseen.
    assert_eq!(read_as(&mut conn, 2, "w-lost", 2), 2);
    ids.push(xadd(&mut conn, 2, &job("e3", to("c1", "k"))));
    ids.push(xadd(&mut conn, 2, &job("e4", to("c1", "k"))));

    comet.failing.store(false, Ordering::SeqCst);
    wait_for("all five delivered", || comet.delivered().len() >= 5).await;
    wait_for("pending drained", || pending(&mut conn, 2) == 0).await;
    let want: Vec<PushId> = ids
        .iter()
        .map(|id| PushId::from_stream_id(2, id).unwrap())
        .collect();
    let got: Vec<PushId> = comet.delivered().iter().map(|d| d.id).collect();
    assert_eq!(got, want, "replayed entries go before newer ones");
    wait_for("stream trimmed", || stream_ids(&mut conn, 2) == 0).await;
    let metrics = job_tier.get("/metrics").await;
    assert!(
        metrics.contains("rim_job_dropped_total{reason=\"trimmed\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rim_job_partition_backlog{partition=\"2\"} 0"),
        "{metrics}"
    );
    job_tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_partition_replays_stale_pending_entries_it_never_saw() {
    let redis = RedisServer::start();
    let comet = start_comet(&redis, "c1").await;
    let mut conn = redis.connection();
    create_group(&mut conn, 3);
    let mut cfg = config(&redis, "w-idle");
    cfg.stream.pending_check_ms = 100;
    let job_tier = start_job(cfg).await;
    // A warm-up entry delivered and acknowledged: the start-up replay is over, a `>` read ran
    // and nothing was left pending, so the entries below can only be found by the idle check
    // for stale pending entries (not claimed by the start-up replay or the post-ack check).
    let warm = xadd(&mut conn, 3, &job("warm", to("c1", "k")));
    wait_for("warm-up delivered", || comet.delivered().len() == 1).await;
    wait_for("warm-up acked and trimmed", || {
        pending(&mut conn, 3) == 0 && stream_ids(&mut conn, 3) == 0
    })
    .await;

    // Added and read for the worker in one transaction: its blocked read never sees them.
    let mut pipe = redis::pipe();
    pipe.atomic();
    for i in 0..2 {
        pipe.xadd(
            keys::push_stream(3),
            "*",
            &[(
                keys::JOB_FIELD,
                job(&format!("s{i}"), to("c1", "k")).encode(),
            )],
        );
    }
    pipe.cmd("XREADGROUP")
        .arg("GROUP")
        .arg(keys::PUSH_GROUP)
        .arg("w-idle")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(keys::push_stream(3))
        .arg(">")
        .ignore();
    let (s0, s1): (String, String) = pipe.query(&mut conn).unwrap();
    assert_eq!(pending(&mut conn, 3), 2);

    wait_for("stale entries replayed", || comet.delivered().len() == 3).await;
    let s2 = xadd(&mut conn, 3, &job("s2", to("c1", "k")));
    wait_for("newer entry delivered", || comet.delivered().len() == 4).await;
    let want: Vec<PushId> = [warm, s0, s1, s2]
        .iter()
        .map(|id| PushId::from_stream_id(3, id).unwrap())
        .collect();
    let got: Vec<PushId> = comet.delivered().iter().map(|d| d.id).collect();
    assert_eq!(got, want);
    wait_for("pending drained", || pending(&mut conn, 3) == 0).await;
    wait_for("stream trimmed", || stream_ids(&mut conn, 3) == 0).await;
    job_tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_but_unreachable_comet_is_given_up_after_give_up_ms() {
    let redis = RedisServer::start();
    let c1 = start_comet(&redis, "c1").await;
    let mut conn = redis.connection();
    // Registered and renewing, but its address closes every connection: a proxy in Refuse mode
    // holds the port for the whole test, so no concurrent test can take it and answer.
    let dead_end = FaultProxy::start(Upstream::Tcp("127.0.0.1:9".parse().unwrap())).await;
    dead_end.set(Mode::Refuse);
    let info = NodeInfo {
        server: "unreachable".into(),
        rpc_addr: dead_end.addr().to_string(),
        ..NodeInfo::default()
    };
    let _: () = conn
        .hset(
            keys::NODES,
            "unreachable",
            serde_json::to_string(&info).unwrap(),
        )
        .unwrap();
    let expiry = rim_runtime::unix_ms() + 600_000;
    let _: () = conn
        .zadd(keys::NODES_EXPIRY, "unreachable", expiry)
        .unwrap();
    let mut cfg = config(&redis, "w1");
    cfg.delivery.give_up_ms = 500;
    let job_tier = start_job(cfg).await;

    xadd(&mut conn, 0, &job("lost", to("unreachable", "k")));
    let after = xadd(&mut conn, 0, &job("after", to("c1", "k")));
    // c1's share goes out at once (comets of a batch are served concurrently); the batch is
    // acknowledged only once the unreachable comet is given up.
    wait_for("the push behind it delivered", || c1.delivered().len() == 1).await;
    assert_eq!(
        c1.delivered()[0].id,
        PushId::from_stream_id(0, &after).unwrap()
    );
    wait_for("pending drained", || pending(&mut conn, 0) == 0).await;
    let dropped = "rim_job_dropped_total{reason=\"comet_unreachable\"}";
    let metrics = job_tier.get("/metrics").await;
    assert!(metrics.contains(&format!("{dropped} 1")), "{metrics}");

    // Still failing without a success since: the next batch gives it up too.
    xadd(&mut conn, 0, &job("lost2", to("unreachable", "k")));
    xadd(&mut conn, 0, &job("after2", to("c1", "k")));
    wait_for("second push behind it delivered", || {
        c1.delivered().len() == 2
    })
    .await;
    wait_for("pending drained", || pending(&mut conn, 0) == 0).await;
    let metrics = job_tier.get("/metrics").await;
    assert!(metrics.contains(&format!("{dropped} 2")), "{metrics}");
    job_tier.shutdown().await;
}
