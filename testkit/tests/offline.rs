//! Offline messages end to end on real sockets and a real Redis: pushes to a user with no
//! session are kept in the user's history (`history.deliver_on_connect`, on by default), and a
//! client speaking goim's protocol (binary frames over TCP, Auth without a key, as goim's
//! clients send it) gets them when it connects: all of them, in order, before any newer push,
//! and not again on its next connect.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Cluster, Options};
use rim_testkit::api::eventually;
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

/// Waits until logic lists no session of `MID` (the client's disconnect was handled).
async fn wait_gone(cluster: &Cluster) {
    eventually(
        "the session's disconnect",
        Duration::from_secs(10),
        || async {
            let r = cluster
                .api
                .get(&format!("/rim/users/{MID}/sessions"))
                .await
                .ok()?;
            r.data()
                .as_array()
                .is_some_and(|s| s.is_empty())
                .then_some(())
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
    wait_gone(&cluster).await;

    // The next connect gets nothing it already had: only what is pushed from now on.
    let mut again = cluster
        .client(0, Transport::Tcp, MID, "live://1000", &[OP])
        .await;
    cluster.api.push_mids(OP, &[MID], b"live-2").await.unwrap();
    cluster.wait_drained().await;
    assert_eq!(pushes(&mut again).await, ["live-2"]);
    again.close().await;
    wait_gone(&cluster).await;

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
