//! Delivery promises under faults, with real processes and a real redis-server: for each
//! scenario a publisher pushes a numbered sequence to known recipients (to their mids and to
//! their room) while something breaks on purpose, then every recipient is checked to have got
//! every number it was owed exactly once and in order.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

mod chaos_common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaos_common::*;
use parking_lot::Mutex;
use rim_proto::msg::AuthBody;
use rim_testkit::api::{eventually, metric};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::proxy::Mode;
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_of_two_job_workers_mid_stream() {
    // Comet 0's RPC address, as job sees it, is a proxy the test controls.
    let (mut cluster, proxy) = ProcCluster::with_proxied_comet(2).await;
    let (stop_tx, stop) = watch::channel(false);
    let rs = recipients(&cluster, &stop).await;
    let mids: Vec<i64> = rs.iter().map(|r| r.mid).collect();
    let on_comet_0: Vec<_> = rs
        .iter()
        .filter(|r| r.home == 0)
        .map(|r| r.seen.clone())
        .collect();
    let dup_before = metric(cluster.comets[0].ops, "rim_comet_push_duplicates_total")
        .await
        .unwrap_or(0);
    let redis = &cluster.redis;
    let jobs = &mut cluster.jobs;
    let victim = Arc::new(Mutex::new(String::new()));
    let v = victim.clone();
    let published = publish_with_fault(&cluster.api, &mids, || async {
        // The hazard at-least-once delivery must survive: a comet has delivered pushes whose
        // worker dies before acknowledging them. Staged without timing: comet 0's replies are
        // dropped, so it executes deliveries whose confirmations never come back; once a worker
        // holds unacknowledged room pushes that comet 0's clients already have, that worker is
        // killed. The other worker must take them over and replay them, and the comet must not
        // show them twice.
        proxy.set(Mode::DropReplies);
        let (holder, held) = eventually(
            "a worker holds room pushes comet 0's clients already have",
            WAIT,
            || async {
                let mut conn = redis.connection();
                ["job-1", "job-2"].into_iter().find_map(|w| {
                    let (_, rooms) = pending_numbers(&mut conn, w);
                    let had = on_comet_0
                        .iter()
                        .all(|seen| rooms.iter().all(|n| seen.lock().room_seqs.contains(n)));
                    (!rooms.is_empty() && had).then_some((w, rooms))
                })
            },
        )
        .await
        .unwrap();
        let idx = usize::from(holder == "job-2");
        jobs[idx].kill9();
        *v.lock() = holder.to_string();
        // Still held by the dead worker: nothing acknowledged them after the kill.
        let (_, still) = pending_numbers(&mut redis.connection(), holder);
        assert!(
            held.iter().all(|n| still.contains(n)),
            "{holder} held {held:?} at its death (holds {still:?})"
        );
        // The link heals as real ones do: held connections die, new ones get through.
        proxy.set(Mode::Refuse);
        proxy.set(Mode::Forward);
    })
    .await;
    assert!(
        all_accepted(&published),
        "killing a job worker must not refuse pushes"
    );
    check(&rs, &published).await;
    assert_sessions(&rs, |_| 1);
    let victim = victim.lock().clone();
    eventually(
        "the survivor took over the dead worker's pushes",
        WAIT,
        || async { (pending_of(&mut cluster.redis.connection(), &victim) == 0).then_some(()) },
    )
    .await
    .unwrap();
    // Replays of pushes comet 0 had already delivered were recognised there.
    let dup_after = metric(cluster.comets[0].ops, "rim_comet_push_duplicates_total")
        .await
        .unwrap_or(0);
    assert!(
        dup_after > dup_before,
        "comet 0 suppressed the replayed pushes ({dup_before} → {dup_after})"
    );
    let _ = stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_third_job_worker_mid_stream() {
    let mut cluster = ProcCluster::start(2, 2, vec![]).await;
    let (stop_tx, stop) = watch::channel(false);
    let rs = recipients(&cluster, &stop).await;
    let mids: Vec<i64> = rs.iter().map(|r| r.mid).collect();
    let api = cluster.api.clone();
    let c = &mut cluster;
    let published = publish_with_fault(&api, &mids, || async {
        c.add_job();
        // The fault is the rebalance: job-1 and job-2 held all 16 partitions, so job-3 holding
        // one means a partition changed hands while pushes flowed. The publisher goes on for
        // AFTER_FAULT numbers after this, through the new owner.
        let redis = &c.redis;
        eventually("job-3 holds a partition", WAIT, || async {
            let mut conn = redis.connection();
            (0..16u16)
                .any(|p| {
                    redis::cmd("GET")
                        .arg(rim_proto::keys::partition_lease(p))
                        .query::<Option<String>>(&mut conn)
                        .ok()
                        .flatten()
                        .as_deref()
                        == Some("job-3")
                })
                .then_some(())
        })
        .await
        .unwrap();
    })
    .await;
    assert!(all_accepted(&published));
    check(&rs, &published).await;
    assert_sessions(&rs, |_| 1);
    let _ = stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_comet_clients_move_and_its_sessions_expire() {
    let mut cluster = ProcCluster::start(1, 2, vec![]).await;
    let (stop_tx, stop) = watch::channel(false);
    let rs = recipients(&cluster, &stop).await;
    let mids: Vec<i64> = rs.iter().map(|r| r.mid).collect();
    let dead = cluster.comets[0].server_id.clone();
    let api = cluster.api.clone();
    let victim = &mut cluster.comets[0].proc;
    let killed_at = Arc::new(Mutex::new(None));
    let k = killed_at.clone();
    let published = publish_with_fault(&api, &mids, || async move {
        victim.kill9();
        *k.lock() = Some(Instant::now());
    })
    .await;
    assert!(all_accepted(&published));
    check(&rs, &published).await;
    // The dead comet's clients moved to the other one, once; the others never moved.
    assert_sessions(&rs, |r| if r.home == 0 { 2 } else { 1 });

    // The dead comet leaves the registry and its sessions leave Redis within node.ttl_ms (3 s)
    // plus one reaper pass (ttl/3) — checked with generous slack against a loaded machine. The
    // explicit act is waited for: only logic's reaper deletes the registration record and counts
    // it (its expiry alone only hides it from the live list, and the moved clients' reconnects
    // empty its session set by themselves).
    let redis = &cluster.redis;
    let c = &cluster;
    eventually("dead comet reaped", Duration::from_secs(15), || {
        let dead = dead.clone();
        async move {
            let live = c.live_nodes().await;
            let mut conn = redis.connection();
            let keys: i64 = redis::cmd("SCARD")
                .arg(rim_proto::keys::node_sessions(&dead))
                .query(&mut conn)
                .ok()?;
            let registered: bool = redis::cmd("HEXISTS")
                .arg(rim_proto::keys::NODES)
                .arg(&dead)
                .query(&mut conn)
                .ok()?;
            let reaped = metric(c.logic_http, "rim_logic_nodes_reaped_total").await;
            (!live.contains(&dead) && keys == 0 && !registered && reaped == Some(1)).then_some(())
        }
    })
    .await
    .unwrap();
    // Reaped once, not again.
    assert_eq!(
        metric(cluster.logic_http, "rim_logic_nodes_reaped_total").await,
        Some(1)
    );
    let total = cluster.api.get("/goim/online/total").await.unwrap();
    assert_eq!(
        total.data()["conn_count"],
        4,
        "every client counted once, on the live comet: {:?}",
        total.body
    );
    let _ = stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_redis_mid_stream() {
    let mut cluster = ProcCluster::start(1, 2, vec![]).await;
    let (stop_tx, stop) = watch::channel(false);
    let rs = recipients(&cluster, &stop).await;
    let mids: Vec<i64> = rs.iter().map(|r| r.mid).collect();
    let api = cluster.api.clone();
    let job = &cluster.jobs[0];
    let comet_ops: Vec<_> = cluster.comets.iter().map(|c| c.ops).collect();
    let redis = cluster.redis.single();
    let (mut killed_at, mut recovered_at) = (None, None);
    let mut backlog = BTreeSet::new();
    let published = publish_with_fault(&api, &mids, || async {
        // The hazard: accepted pushes that only Redis holds when it dies. The only job worker
        // is stopped (SIGSTOP) until some wait unread in the streams.
        job.signal("STOP");
        backlog = eventually("a backlog waits in Redis", WAIT, || async {
            let numbers = stream_numbers(&mut redis.connection());
            (numbers.len() >= 10).then_some(numbers)
        })
        .await
        .unwrap();
        killed_at = Some(Instant::now());
        redis.kill();
        // Keep Redis down until the API has refused a push: the outage is observed, not timed.
        eventually(
            "a push refused during the outage",
            Duration::from_secs(10),
            || async { (probe_push(&api).await? == (503, -503)).then_some(()) },
        )
        .await
        .unwrap();
        // Long enough that every comet's registration lapses (node TTL 3 s after its last
        // renewal, which was before the kill), with the comets' failed renewals as evidence:
        // what comes back must not be taken for departures (logic's reaper waits, job keeps
        // comets it saw live).
        let renew_failures = || async {
            let mut n = Vec::new();
            for ops in &comet_ops {
                n.push(
                    metric(*ops, "rim_comet_renew_failures_total")
                        .await
                        .unwrap_or(0),
                );
            }
            n
        };
        let before = renew_failures().await;
        eventually(
            "every comet's registration lapsed",
            Duration::from_secs(20),
            || async {
                let now = renew_failures().await;
                let failing = now.iter().zip(&before).all(|(n, b)| n > b);
                (failing && killed_at.unwrap().elapsed() > Duration::from_millis(3500))
                    .then_some(())
            },
        )
        .await
        .unwrap();
        redis.restart();
        // The backlog came back with Redis (AOF, appendfsync always).
        let kept = stream_numbers(&mut redis.connection());
        assert!(
            backlog.is_subset(&kept),
            "the backlog survived the restart: {:?}",
            backlog.difference(&kept).collect::<Vec<_>>()
        );
        eventually("logic accepts pushes again", WAIT, || async {
            (probe_push(&api).await?.0 == 200).then_some(())
        })
        .await
        .unwrap();
        recovered_at = Some(Instant::now());
        job.signal("CONT");
    })
    .await;
    // Refusals only inside the outage: every push started before the kill or after logic
    // accepted again was accepted, and some inside it were refused.
    let (killed_at, recovered_at) = (killed_at.unwrap(), recovered_at.unwrap());
    for s in published.mid.iter().chain(&published.room) {
        if s.started < killed_at || s.started > recovered_at {
            assert!(
                s.accepted,
                "number {} was refused outside the outage",
                s.seq
            );
        }
    }
    assert!(
        published
            .mid
            .iter()
            .chain(&published.room)
            .any(|s| !s.accepted),
        "the outage refused pushes"
    );
    check(&rs, &published).await;
    // Comets hold no Redis connection: their sessions live through the outage, and the lapsed
    // registrations were not reaped.
    assert_sessions(&rs, |_| 1);
    assert_eq!(
        metric(cluster.logic_http, "rim_logic_nodes_reaped_total").await,
        Some(0)
    );
    let _ = stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_a_comet_and_a_job_worker_drains() {
    // TTLs far longer than the test: a lease (120 s) or a comet registration (60 s) gone right
    // after the process exited was released or removed by it, not expired.
    let long_lease = vec![
        ("RIM_JOB__LEASE__TTL_MS", "120000".to_string()),
        ("RIM_JOB__LEASE__RENEW_MS", "250".to_string()),
    ];
    let long_node = vec![("RIM_LOGIC__NODE__TTL_MS", "60000".to_string())];
    let opts = ProcOpts {
        jobs: 2,
        comets: 2,
        job_env: long_lease,
        logic_env: long_node,
        ..ProcOpts::default()
    };
    let mut cluster =
        ProcCluster::start_opts(rim_testkit::test_redis::TestRedis::from_env(true), opts).await;
    let (stop_tx, stop) = watch::channel(false);
    let rs = recipients(&cluster, &stop).await;
    let mids: Vec<i64> = rs.iter().map(|r| r.mid).collect();
    let api = cluster.api.clone();
    let leaving = cluster.comets[0].server_id.clone();
    let c = &mut cluster;
    let published = publish_with_fault(&api, &mids, || async {
        c.comets[0].proc.signal("TERM");
        c.jobs[0].signal("TERM");
    })
    .await;
    assert!(
        cluster.comets[0]
            .proc
            .wait_exit(Duration::from_secs(15))
            .success(),
        "comet exits 0 after draining"
    );
    // Unregistered by the comet itself: its registration (60 s TTL) is gone at its exit.
    let mut conn = cluster.redis.connection();
    let registered: bool = redis::cmd("HEXISTS")
        .arg(rim_proto::keys::NODES)
        .arg(&leaving)
        .query(&mut conn)
        .unwrap();
    let expiry: Option<f64> = redis::cmd("ZSCORE")
        .arg(rim_proto::keys::NODES_EXPIRY)
        .arg(&leaving)
        .query(&mut conn)
        .unwrap();
    assert!(
        !registered && expiry.is_none(),
        "{leaving} unregistered itself before exiting"
    );
    assert!(
        cluster.jobs[0].wait_exit(Duration::from_secs(15)).success(),
        "job exits 0 after draining"
    );
    // Released by the worker itself: with 120 s leases, job-2 holds every partition soon after
    // job-1's exit only because job-1 let them go.
    eventually(
        "job-2 holds every partition",
        Duration::from_secs(10),
        || async {
            let mut conn = cluster.redis.connection();
            (0..16u16)
                .all(|p| {
                    let holder: Option<String> = redis::cmd("GET")
                        .arg(rim_proto::keys::partition_lease(p))
                        .query(&mut conn)
                        .unwrap();
                    holder.as_deref() == Some("job-2")
                })
                .then_some(())
        },
    )
    .await
    .unwrap();
    assert!(all_accepted(&published));
    check(&rs, &published).await;
    assert_sessions(&rs, |r| if r.home == 0 { 2 } else { 1 });
    let held_by_leaver = (0..16u16)
        .filter(|p| {
            let holder: Option<String> = redis::cmd("GET")
                .arg(rim_proto::keys::partition_lease(*p))
                .query(&mut conn)
                .unwrap();
            holder.as_deref() == Some("job-1")
        })
        .count();
    assert_eq!(
        held_by_leaver, 0,
        "a drained job worker releases its partitions"
    );
    for r in rs.iter().filter(|r| r.home == 0) {
        let s = r.seen.lock();
        assert!(
            s.disconnect_reasons
                .iter()
                .any(|d| d == "server shutting down"),
            "mid {} was told to reconnect: {:?}",
            r.mid,
            s.disconnect_reasons
        );
    }
    assert!(
        !cluster.live_nodes().await.contains(&leaving),
        "a drained comet unregisters before it exits"
    );
    let _ = stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_disconnected_and_counted() {
    let cluster = ProcCluster::start(
        1,
        1,
        vec![
            ("RIM_COMET__SESSION__OUTBOUND_QUEUE", "8".into()),
            ("RIM_COMET__SESSION__WRITE_TIMEOUT_MS", "60000".into()),
        ],
    )
    .await;
    let comet = &cluster.comets[0];
    let auth = |mid: i64| AuthBody {
        mid,
        room_id: format!("{ROOM_TYPE}://{ROOM_ID}"),
        accepts: vec![ROOM_OP],
        ..Default::default()
    };
    // Authenticated, in the room, then never reads again.
    let _stalled = Conn::connect(Transport::Tcp, comet.tcp, &auth(1))
        .await
        .unwrap();
    let mut healthy = Conn::connect(Transport::WsBinary, comet.http, &auth(2))
        .await
        .unwrap();
    let slow_closed = || metric(comet.ops, "rim_comet_slow_consumer_closed_total");
    assert_eq!(slow_closed().await, Some(0));

    // Room pushes big enough to fill the kernel buffers and then the 8-slot queue.
    let big = "x".repeat(32 * 1024);
    let (mut sent, mut last_seen) = (0u64, 0u64);
    while slow_closed().await != Some(1) {
        assert!(sent < 2000, "the stalled client was never disconnected");
        sent += 1;
        let body = format!("r{sent}:{big}");
        if let Err(e) = cluster
            .api
            .push_room(ROOM_OP, ROOM_TYPE, ROOM_ID, body.as_bytes())
            .await
        {
            // Refused (say Redis answered too late on a loaded machine): the API said so, and the
            // next number is a new push. Not owed, but it may still arrive if it was appended.
            eprintln!("push r{sent} refused: {e:#}");
            continue;
        }
        // The healthy member gets every accepted push, once, in order.
        while last_seen < sent {
            let r = healthy
                .recv_push()
                .await
                .unwrap_or_else(|e| panic!("healthy member waiting for r{sent}: {e}"));
            let n: u64 = std::str::from_utf8(&r.frame.body)
                .ok()
                .and_then(|b| b.strip_prefix('r')?.split(':').next()?.parse().ok())
                .unwrap_or_else(|| panic!("unexpected push waiting for r{sent}"));
            assert!(
                n > last_seen && n <= sent,
                "healthy member got r{n} after r{last_seen}"
            );
            last_seen = n;
        }
    }
    // The room carries on for the others.
    cluster
        .api
        .push_room(ROOM_OP, ROOM_TYPE, ROOM_ID, b"after")
        .await
        .expect("push after the slow close");
    loop {
        let r = healthy
            .recv_push()
            .await
            .expect("healthy member after the slow close");
        if &r.frame.body[..] == b"after" {
            break;
        }
        // Only a late copy of a refused push may come first.
        assert!(
            r.frame.body.starts_with(b"r") && last_seen < sent,
            "unexpected push before \"after\""
        );
    }
}
