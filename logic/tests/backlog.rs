//! A push stream that job does not drain fills to `stream.max_backlog`; past it logic refuses
//! pushes with 503 naming the setting (nothing is trimmed, nothing half-appended) and counts
//! them, and accepts again once job has caught up. A push to several partitions of which one
//! is full is refused whole: no other partition gets its entry (or its histories their record).
#![allow(clippy::unwrap_used)]

use redis::Commands;
use rim_proto::job;
use rim_proto::keys;
use rim_proto::room::RoomId;
use rim_testkit::redis::RedisServer;

mod common;
use common::{Logic, all_jobs, jobs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_push_stream_refuses_with_503_until_job_catches_up() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.stream.max_backlog = 2).await;
    let mut conn = redis.connection();
    let room = "/goim/push/room?operation=1000&type=live&room=7";
    for body in ["one", "two"] {
        let (status, v) = logic.post(room, body).await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = logic.post(room, "three").await;
    assert_eq!((status, v["code"].as_i64()), (503, Some(-503)), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("stream.max_backlog"),
        "{v}"
    );
    let bodies: Vec<Vec<u8>> = all_jobs(&mut conn)
        .into_iter()
        .map(|(_, j)| j.body.to_vec())
        .collect();
    assert_eq!(
        bodies,
        vec![b"one".to_vec(), b"two".to_vec()],
        "nothing trimmed, nothing added"
    );
    assert!(
        logic
            .metrics()
            .await
            .contains("rim_logic_push_backlog_full_total 1")
    );

    // A room on another partition is not held up by this one.
    let parts = rim_proto::job::DEFAULT_PARTITIONS;
    let partition =
        |id: u32| job::room_partition(&RoomId::parse(&format!("live://{id}")).unwrap(), parts);
    let p_room = partition(7);
    let other = (8..1000).find(|id| partition(*id) != p_room).unwrap();
    let (status, v) = logic
        .post(
            &format!("/goim/push/room?operation=1000&type=live&room={other}"),
            "x",
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // Job delivered and trimmed the backlog: the room's partition takes pushes again.
    let _: () = conn
        .xtrim(
            keys::push_stream(p_room),
            redis::streams::StreamMaxlen::Equals(0),
        )
        .unwrap();
    let (status, v) = logic.post(room, "four").await;
    assert_eq!(status, 200, "{v}");
    logic.stop().await;
}

/// Two users on different partitions, one of which holds `max_backlog` entries: a push to both
/// is refused with 503 and leaves the other partition's stream and its user's history as they
/// were (the read of every target's length comes before any write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_several_partitions_one_of_them_full_writes_none() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.stream.max_backlog = 2).await;
    let mut conn = redis.connection();
    let parts = job::DEFAULT_PARTITIONS;
    let (full, free) = (1, 2);
    let (p_full, p_free) = (
        job::mid_partition(full, parts),
        job::mid_partition(free, parts),
    );
    assert_ne!(p_full, p_free);
    // Users' history is kept (the default), so each push gets an entry even with nobody online.
    for body in ["one", "two"] {
        let (status, v) = logic
            .post(&format!("/goim/push/mids?operation=1000&mids={full}"), body)
            .await;
        assert_eq!(status, 200, "{v}");
    }

    let (status, v) = logic
        .post(
            &format!("/goim/push/mids?operation=1000&mids={full}&mids={free}"),
            "both",
        )
        .await;
    assert_eq!((status, v["code"].as_i64()), (503, Some(-503)), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&keys::push_stream(p_full)),
        "names the full stream: {v}"
    );
    assert!(
        jobs(&mut conn, p_free).is_empty(),
        "nothing on the free partition"
    );
    let kept: bool = conn.exists(keys::user_history(p_free, free)).unwrap();
    assert!(!kept, "nothing in the free partition's user history");
    assert_eq!(
        jobs(&mut conn, p_full).len(),
        2,
        "nothing added to the full one"
    );
    logic.stop().await;
}
