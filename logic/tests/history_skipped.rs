//! A push whose history already holds a later id (which only a push stream deleted and started
//! again can cause) is still accepted and queued, but logic warns that it was not recorded in
//! every history; a push recorded everywhere gives no such warning. The warning is the only
//! sign of the skipped record, so this file (one test: it owns the process's log subscriber)
//! counts it.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use redis::Commands;
use rim_proto::job;
use rim_proto::keys;
use rim_testkit::redis::RedisServer;

mod common;
use common::{Logic, jobs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_not_recorded_in_every_history_is_accepted_with_a_warning() {
    let warned = rim_testkit::logs::count_warnings("push not recorded in every history");
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let mut conn = redis.connection();
    let mid = 31;
    let p = job::mid_partition(mid, job::DEFAULT_PARTITIONS);
    let path = format!("/goim/push/mids?operation=1000&mids={mid}");

    // Recorded in the user's history (kept by default): no warning.
    let (status, v) = logic.post(&path, "recorded").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        warned.load(Ordering::SeqCst),
        0,
        "nothing skipped, nothing said"
    );

    // The history holds an id later than any the push stream will hand out now.
    let future = "99999999999999-0";
    let _: String = conn
        .xadd(
            keys::user_history(p, mid),
            future,
            &[("op", "1000"), ("body", "planted"), ("ts", "0")],
        )
        .unwrap();
    let (status, v) = logic.post(&path, "skipped").await;
    assert_eq!(status, 200, "accepted all the same: {v}");
    // Logged before the answer, so counted by now.
    assert_eq!(
        warned.load(Ordering::SeqCst),
        1,
        "the skipped record is reported"
    );
    let bodies: Vec<Vec<u8>> = jobs(&mut conn, p).iter().map(|j| j.body.to_vec()).collect();
    assert_eq!(
        bodies,
        [b"recorded".to_vec(), b"skipped".to_vec()],
        "queued"
    );
    let last: redis::streams::StreamRangeReply = conn
        .xrevrange_count(keys::user_history(p, mid), "+", "-", 1)
        .unwrap();
    assert_eq!(last.ids[0].id, future, "the history did not take the push");
    logic.stop().await;
}
