//! `redis.wait_replicas` against real redis-servers: with a replica attached, a push that asks
//! for one confirmation is acknowledged; with none, it is refused with 503 naming the
//! replicas it lacked (the push is on the primary, so it may still be delivered); and with 0
//! logic never sends `WAIT`, so it serves a Redis whose ACL forbids that command.
#![allow(clippy::unwrap_used)]

use rim_proto::job;
use rim_testkit::redis::RedisServer;

mod common;
use common::{Logic, eventually, jobs};

/// `field` of `INFO replication`.
fn replication(conn: &mut redis::Connection, field: &str) -> String {
    let info: String = redis::cmd("INFO").arg("replication").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .to_string()
}

async fn push(logic: &Logic, mid: i64, body: &str) -> (u16, serde_json::Value) {
    logic
        .post(
            &format!("/goim/push/mids?operation=1000&mids={mid}"),
            body.to_string(),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_waits_for_the_replicas_asked_for() {
    let primary = RedisServer::start();
    let replica = RedisServer::start();
    // The test servers listen on unix sockets only; a replica reaches its primary over TCP.
    let port = rim_testkit::process::free_addr().port();
    let mut p_conn = primary.connection();
    let mut r_conn = replica.connection();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("port")
        .arg(port)
        .query(&mut p_conn)
        .unwrap();
    // A replica's first sync starts at once, not after the 5 s that lets others join it.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("repl-diskless-sync-delay")
        .arg(0)
        .query(&mut p_conn)
        .unwrap();
    let () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(port)
        .query(&mut r_conn)
        .unwrap();
    // In sync once the replica acknowledges a write made after it went online. (After its
    // first sync the primary streams it commands only from its first ack; before it is online
    // the primary keeps no replication offset, and a WAIT after such a write asks for nothing.)
    eventually("replica online", || {
        let online = replication(&mut p_conn, "slave0").contains("state=online");
        async move { online }
    })
    .await;
    eventually("replica in sync", || {
        let () = redis::cmd("SET")
            .arg("probe")
            .arg("1")
            .query(&mut p_conn)
            .unwrap();
        let acked: u32 = redis::cmd("WAIT")
            .arg(1)
            .arg(50)
            .query(&mut p_conn)
            .unwrap();
        async move { acked == 1 }
    })
    .await;

    let logic = Logic::start(&primary, |c| c.redis.wait_replicas = 1).await;
    let mid = 9;
    let p = job::mid_partition(mid, job::DEFAULT_PARTITIONS);
    let (status, v) = push(&logic, mid, "confirmed").await;
    assert_eq!(status, 200, "the replica confirmed it: {v}");
    assert_eq!(
        jobs(&mut r_conn, p).len(),
        1,
        "on the replica when acknowledged"
    );

    // The replica leaves: nothing can confirm the next push.
    let () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut r_conn)
        .unwrap();
    eventually("replica gone", || {
        let gone = replication(&mut p_conn, "connected_slaves") == "0";
        async move { gone }
    })
    .await;
    let (status, v) = push(&logic, mid, "unconfirmed").await;
    assert_eq!((status, v["code"].as_i64()), (503, Some(-503)), "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("confirmed by 0 of the 1 replicas redis.wait_replicas asks for"),
        "says what was missing: {message}"
    );
    // On the primary all the same: job may deliver it, so it is not taken back.
    assert_eq!(jobs(&mut p_conn, p).len(), 2);
    logic.stop().await;
}

/// With `redis.wait_replicas = 0` (the default) a push is acknowledged once the primary has
/// it, without asking replicas anything: a Redis whose ACL leaves `WAIT` out serves pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_replicas_a_push_sends_no_wait() {
    let redis = RedisServer::start();
    let mut conn = redis.connection();
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-wait")
        .query(&mut conn)
        .unwrap();
    let refused = redis::cmd("WAIT").arg(0).arg(1).query::<u32>(&mut conn);
    assert!(refused.is_err(), "WAIT is forbidden: {refused:?}");

    let logic = Logic::start(&redis, |c| assert_eq!(c.redis.wait_replicas, 0)).await;
    let mid = 9;
    let (status, v) = push(&logic, mid, "unreplicated").await;
    assert_eq!(status, 200, "{v}");
    let p = job::mid_partition(mid, job::DEFAULT_PARTITIONS);
    assert_eq!(jobs(&mut conn, p).len(), 1);
    logic.stop().await;
}
