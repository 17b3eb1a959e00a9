//! The operator page's data (`GET /admin/state`) against a real redis-server: who may read it
//! (admin.secret, or push.secret; nobody without), and what it reads from Redis: each
//! partition's stream length, entries added, job's group lag and pending entries and the lease
//! holder, and the live workers with the partitions they hold. Job is played by hand here (its
//! group, a read, a lease, a registration), as job's own Redis tests play it.
#![allow(clippy::unwrap_used)]

use rim_proto::keys;
use rim_testkit::redis::RedisServer;
use serde_json::Value;

mod common;
use common::Logic;

const PUSH: &str = "admin-test-push-secret";
const ADMIN: &str = "admin-test-admin-secret";

async fn state(logic: &Logic, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{}/admin/state", logic.http));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_state_reads_streams_groups_leases_and_workers() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| {
        c.push.secret = PUSH.into();
        c.admin.secret = ADMIN.into();
    })
    .await;

    // Who may read it.
    assert_eq!(state(&logic, None).await.0, 401);
    assert_eq!(state(&logic, Some("wrong")).await.0, 401);
    assert_eq!(state(&logic, Some(PUSH)).await.0, 200);
    let (status, before) = state(&logic, Some(ADMIN)).await;
    assert_eq!(status, 200, "{before}");
    let before = before["data"].clone();
    assert_eq!(before["pushes"]["added"], 0);
    // The refused reads are in the recent refusals, newest first.
    let refusal = &before["refusals"][0];
    assert_eq!(refusal["kind"], "http");
    assert_eq!(refusal["detail"], "GET /admin/state");
    assert!(
        refusal["reason"].as_str().unwrap().starts_with("401 "),
        "{refusal}"
    );

    // A refused request is kept by path only: its query string (which may carry anything) is
    // not.
    let r = reqwest::Client::new()
        .post(format!(
            "{}/goim/push/mids?operation=1000&mids=1&token=do-not-keep",
            logic.http
        ))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (_, s) = state(&logic, Some(ADMIN)).await;
    let kept = s["data"]["refusals"].to_string();
    assert!(kept.contains("POST /goim/push/mids"), "{kept}");
    assert!(!kept.contains("do-not-keep"), "{kept}");

    // Three pushes to one user: one partition's stream gets three entries.
    let mid = 77;
    for _ in 0..3 {
        let r = reqwest::Client::new()
            .post(format!(
                "{}/goim/push/mids?operation=1000&mids={mid}",
                logic.http
            ))
            .bearer_auth(PUSH)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (_, s) = state(&logic, Some(ADMIN)).await;
    let s = &s["data"];
    assert_eq!(s["pushes"]["added"], 3, "{s}");
    let p = s["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["added"] == 3)
        .unwrap()["partition"]
        .as_u64()
        .unwrap() as u16;

    // Job, by hand: its group reads one entry (pending until acknowledged), holds the lease and
    // is registered.
    let mut c = redis.connection();
    let stream = keys::push_stream(p);
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(keys::PUSH_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut c)
        .or_else(|e| {
            if e.code() == Some("BUSYGROUP") {
                Ok(())
            } else {
                Err(e)
            }
        })
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(keys::PUSH_GROUP)
        .arg("worker-a")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(keys::partition_lease(p))
        .arg("worker-a")
        .arg("PX")
        .arg(60_000)
        .query(&mut c)
        .unwrap();
    let expiry = rim_runtime::unix_ms() + 60_000;
    let _: () = redis::cmd("ZADD")
        .arg(keys::JOB_WORKERS)
        .arg(expiry)
        .arg("worker-a")
        .query(&mut c)
        .unwrap();
    // A registration that expired is not a live worker.
    let _: () = redis::cmd("ZADD")
        .arg(keys::JOB_WORKERS)
        .arg(1)
        .arg("worker-gone")
        .query(&mut c)
        .unwrap();

    let (_, s) = state(&logic, Some(ADMIN)).await;
    let s = &s["data"];
    let part = &s["partitions"][usize::from(p)];
    assert_eq!(part["length"], 3, "{part}");
    assert_eq!(part["lag"], 2, "{part}");
    assert_eq!(part["pending"], 1, "{part}");
    assert_eq!(part["holder"], "worker-a", "{part}");
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0]["id"], "worker-a");
    assert_eq!(workers[0]["partitions"], serde_json::json!([p]));
    // Nothing acknowledged and trimmed yet.
    assert_eq!(s["pushes"]["delivered"], 0, "{s}");

    // Job acknowledges the entry it read and trims it, as its ack script does: one delivered.
    let read: Vec<String> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query::<Vec<(String, Vec<(String, Vec<u8>)>)>>(&mut c)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let _: () = redis::cmd("XACK")
        .arg(&stream)
        .arg(keys::PUSH_GROUP)
        .arg(&read[0])
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("XDEL")
        .arg(&stream)
        .arg(&read[0])
        .query(&mut c)
        .unwrap();
    let (_, s) = state(&logic, Some(ADMIN)).await;
    let s = &s["data"];
    assert_eq!(s["pushes"]["delivered"], 1, "{s}");
    let part = &s["partitions"][usize::from(p)];
    assert_eq!(
        (part["length"].clone(), part["pending"].clone()),
        (2.into(), 0.into())
    );
    // After a deletion Redis may not know the lag: the answer says so (null), never a guess.
    assert!(part["lag"] == 2 || part["lag"].is_null(), "{part}");

    logic.stop().await;
}

#[tokio::test]
async fn the_page_is_served_without_data_and_may_not_be_framed() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.push.secret = PUSH.into()).await;
    for (path, kind) in [
        ("/admin", "text/html"),
        ("/admin/admin.js", "text/javascript"),
        ("/admin/admin.css", "text/css"),
    ] {
        let r = reqwest::get(format!("{}{path}", logic.http)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with(kind));
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("frame-ancestors 'none'")
        );
    }
    logic.stop().await;
}
