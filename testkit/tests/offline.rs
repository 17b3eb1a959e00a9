//! Offline messages end to end on real sockets and a real Redis: pushes to a user with no
//! session are kept in the user's history (`history.deliver_on_connect`, on by default), and a
//! client speaking goim's protocol (binary frames over TCP, Auth without a key, as goim's
//! clients send it) gets them when it connects: all of them, in order, before any newer push,
//! and not again on its next connect. With `deliver_on_connect` off they are kept but not given
//! at connect; with users' history off a push to an online user is answered `live`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Cluster, Options};
use rim_testkit::api::{eventually, metric};
use rim_testkit::client::{Conn, Transport};
use serde_json::json;

const OP: i32 = 1000;
const MID: i64 = 31_337;

fn body(c: &rim_testkit::client::Received) -> String {
    String::from_utf8_lossy(&c.frame.body).into_owned()
}

/// Every push before the heartbeat reply that marks the end of what is queued.
async fn pushes(c: &mut Conn) -> Vec<String> {
    c.pushes_before_heartbeat()
        .await
        .unwrap()
        .iter()
        .map(body)
        .collect()
}

/// Waits until logic has handled `n` disconnects in all (each test has a cluster of its own)
/// and lists no session of `MID`. The count, bumped once a disconnect is done, is the event: the
/// session list empties a step earlier (the session's hash goes before the user's index entry
/// that push routing reads).
async fn wait_gone(cluster: &Cluster, n: u64) {
    eventually(
        "the session's disconnect",
        Duration::from_secs(10),
        || async {
            let done = metric(cluster.logic_http, "rim_logic_disconnects_total").await?;
            let r = cluster
                .api
                .get(&format!("/rim/users/{MID}/sessions"))
                .await
                .ok()?;
            (done == n && r.data().as_array().is_some_and(|s| s.is_empty())).then_some(())
        },
    )
    .await
    .unwrap();
}

/// Must-show 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goim_client_gets_its_offline_messages_in_order_before_live_ones_and_once() {
    let cluster = Cluster::start_with(Options {
        comets: 1,
        ..Options::default()
    })
    .await;
    for i in 1..=5 {
        let v = cluster
            .api
            .push_mids(OP, &[MID], format!("offline-{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(v["delivery"], json!("stored"), "{v}");
    }

    let mut c = cluster
        .client(0, Transport::Tcp, MID, "live://1000", &[OP])
        .await;
    // A push accepted now is newer than all five: it must come after them.
    let v = cluster.api.push_mids(OP, &[MID], b"live-1").await.unwrap();
    assert_eq!(v["delivery"], json!("both"), "{v}");
    cluster.wait_drained().await;
    let got = pushes(&mut c).await;
    assert_eq!(
        got,
        [
            "offline-1",
            "offline-2",
            "offline-3",
            "offline-4",
            "offline-5",
            "live-1"
        ]
    );
    c.close().await;
    wait_gone(&cluster, 1).await;

    // The next connect gets nothing it already had: only what is pushed from now on.
    let mut again = cluster
        .client(0, Transport::Tcp, MID, "live://1000", &[OP])
        .await;
    cluster.api.push_mids(OP, &[MID], b"live-2").await.unwrap();
    cluster.wait_drained().await;
    assert_eq!(pushes(&mut again).await, ["live-2"]);
    again.close().await;
    wait_gone(&cluster, 2).await;

    // A push while it was away is waiting for it, alone.
    cluster
        .api
        .push_mids(OP, &[MID], b"offline-6")
        .await
        .unwrap();
    let mut third = cluster
        .client(0, Transport::WsBinary, MID, "live://1000", &[OP])
        .await;
    cluster.wait_drained().await;
    assert_eq!(pushes(&mut third).await, ["offline-6"]);
    third.close().await;
    cluster.stop().await;
}

/// `history.deliver_on_connect = false`: a push to a user with no session is still kept in the
/// user's history (the history route reads it back), but a connecting client is not given it:
/// only what is pushed once it is online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_deliver_on_connect_offline_pushes_are_kept_but_not_given_at_connect() {
    let cluster = Cluster::start_with(Options {
        comets: 1,
        logic: Box::new(|c| c.history.deliver_on_connect = false),
        ..Options::default()
    })
    .await;
    for i in 1..=3 {
        let v = cluster
            .api
            .push_mids(OP, &[MID], format!("offline-{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(v["delivery"], json!("stored"), "{v}");
    }
    let kept = cluster
        .api
        .get(&format!("/rim/users/{MID}/history"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    let bodies: Vec<&str> = kept.data()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["offline-1", "offline-2", "offline-3"]);

    let mut c = cluster
        .client(0, Transport::Tcp, MID, "live://1000", &[OP])
        .await;
    let v = cluster.api.push_mids(OP, &[MID], b"live-1").await.unwrap();
    assert_eq!(
        (&v["sessions"], &v["delivery"]),
        (&json!(1), &json!("both"))
    );
    cluster.wait_drained().await;
    assert_eq!(pushes(&mut c).await, ["live-1"]);
    c.close().await;
    cluster.stop().await;
}

/// With users' history off, a push to an online user is answered `live` (routed, not kept) and
/// reaches it; the same push with nobody online is answered `none`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_user_history_a_push_to_an_online_user_is_live_only() {
    let cluster = Cluster::start_with(Options {
        comets: 1,
        logic: Box::new(|c| c.history.users.max_len = 0),
        ..Options::default()
    })
    .await;
    let mut c = cluster
        .client(0, Transport::WsBinary, MID, "live://1000", &[OP])
        .await;
    let v = cluster.api.push_mids(OP, &[MID], b"live-1").await.unwrap();
    assert_eq!(
        (&v["sessions"], &v["delivery"]),
        (&json!(1), &json!("live"))
    );
    // A room whose type keeps no history: live only too.
    let v = cluster
        .api
        .push_room(OP, "live", "1000", b"room-1")
        .await
        .unwrap();
    assert_eq!(v["delivery"], json!("live"), "{v}");
    cluster.wait_drained().await;
    assert_eq!(pushes(&mut c).await, ["live-1", "room-1"]);
    c.close().await;
    wait_gone(&cluster, 1).await;
    let v = cluster.api.push_mids(OP, &[MID], b"lost").await.unwrap();
    assert_eq!(
        (&v["sessions"], &v["delivery"]),
        (&json!(0), &json!("none"))
    );
    cluster.stop().await;
}
