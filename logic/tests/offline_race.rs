//! Offline positions against a push racing a disconnect, on a real redis-server: a push routed
//! to a session that is gone, or that ends before it got the push, stays owed to the device
//! (it gets it at its next connect, exactly once and in order); a push a present session got is
//! not given again.
//!
//! The races are staged deterministically through the public surfaces: a push that read the
//! user's session index before a disconnect unlinked the key is a push made while the index
//! still names the key (the test puts the entry back after the disconnect and removes it after
//! the push, as the late unlink would).
#![allow(clippy::unwrap_used)]

use redis::Commands;
use rim_proto::history::{HistoryEntry, HistoryId, HistoryWant, Source};
use rim_proto::keys;
use rim_proto::msg::AuthBody;
use rim_proto::rpc::{ConnectReply, ConnectRequest, LogicRpcClient};
use rim_testkit::redis::RedisServer;
use serde_json::{Value, json};

mod common;
use common::{Logic, ctx, sref};

async fn push(logic: &Logic, mid: i64, body: &str) -> Value {
    let path = format!("/goim/push/mids?operation=1000&mids={mid}");
    let (status, v) = logic.post(&path, body.to_string()).await;
    assert_eq!(status, 200, "{v}");
    v["data"].clone()
}

async fn connect(rpc: &LogicRpcClient, server: &str, mid: i64, key: &str) -> ConnectReply {
    let req = ConnectRequest {
        server: server.into(),
        auth: AuthBody {
            mid,
            key: key.into(),
            platform: "web".into(),
            accepts: vec![1000],
            ..AuthBody::default()
        },
        remote_ip: "127.0.0.1".into(),
    };
    rpc.connect(ctx(), req).await.unwrap().unwrap()
}

/// What a session that connected with `reply` is given from its user's history: the catch-up
/// its comet makes when the reply says messages wait, nothing otherwise.
async fn given_at_connect(
    rpc: &LogicRpcClient,
    server: &str,
    reply: &ConnectReply,
) -> Vec<HistoryEntry> {
    let Some(after) = reply.offline_after else {
        return Vec::new();
    };
    let want = HistoryWant {
        source: Source::User,
        after: Some(after),
        limit: 1000,
    };
    let pages = rpc
        .history(ctx(), sref(server, reply.mid, &reply.key), vec![want])
        .await
        .unwrap()
        .unwrap();
    assert!(pages[0].complete);
    pages[0].entries.clone()
}

fn bodies(entries: &[HistoryEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| String::from_utf8(e.body.to_vec()).unwrap())
        .collect()
}

/// The newest id of `mid`'s history.
async fn last_id(logic: &Logic, mid: i64) -> HistoryId {
    let (status, v) = logic.get(&format!("/rim/users/{mid}/history")).await;
    assert_eq!(status, 200, "{v}");
    let id = v["data"]["messages"].as_array().unwrap().last().unwrap()["id"].clone();
    HistoryId::parse(id.as_str().unwrap()).unwrap()
}

/// The race a test engineer found: a push reads the user's index before the disconnect unlinks
/// the key and appends after the disconnect moved the device's position back. It is routed to
/// the gone session (its comet drops it) and must stay owed to the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_routed_to_a_session_that_is_gone_waits_for_the_next_connect() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mid = 5151;
    let first = connect(&rpc, "c1", mid, "k").await;
    assert_eq!(first.offline_after, None, "nothing kept yet");
    let v = push(&logic, mid, "p1").await;
    assert_eq!(
        (v["sessions"].clone(), v["delivery"].clone()),
        (json!(1), json!("both"))
    );
    let p1 = last_id(&logic, mid).await;

    // The session ends having got p1; its index entry, read by a push under way, outlives it.
    let mut conn = redis.connection();
    rpc.disconnect(ctx(), sref("c1", mid, "k"), Some(p1))
        .await
        .unwrap()
        .unwrap();
    let () = conn.hset(keys::mid_sessions(mid), "k", "c1").unwrap();
    let v = push(&logic, mid, "p2").await;
    assert_eq!(v["sessions"], json!(1), "routed to the gone session: {v}");
    let () = conn.hdel(keys::mid_sessions(mid), "k").unwrap();

    // The device connects again: p2 is given, once.
    let again = connect(&rpc, "c2", mid, "k").await;
    assert_eq!(again.offline_after, Some(p1), "p2 waits for the device");
    assert_eq!(bodies(&given_at_connect(&rpc, "c2", &again).await), ["p2"]);
    // And counted as given: a later connect owes nothing.
    let p2 = last_id(&logic, mid).await;
    rpc.disconnect(ctx(), sref("c2", mid, "k"), Some(p2))
        .await
        .unwrap()
        .unwrap();
    let third = connect(&rpc, "c1", mid, "k").await;
    assert_eq!(third.offline_after, None);

    // Keyless sessions share one device and the same rule: a push routed to one that is gone
    // waits for the next keyless connect.
    let goim = connect(&rpc, "c1", mid, "").await;
    assert_eq!(goim.offline_after, Some(HistoryId::default()));
    assert_eq!(
        bodies(&given_at_connect(&rpc, "c1", &goim).await),
        ["p1", "p2"]
    );
    rpc.disconnect(ctx(), sref("c1", mid, &goim.key), Some(p2))
        .await
        .unwrap()
        .unwrap();
    let () = conn.hset(keys::mid_sessions(mid), &goim.key, "c1").unwrap();
    push(&logic, mid, "p3").await;
    let () = conn.hdel(keys::mid_sessions(mid), &goim.key).unwrap();
    let goim2 = connect(&rpc, "c1", mid, "").await;
    assert_eq!(goim2.offline_after, Some(p2));
    assert_eq!(bodies(&given_at_connect(&rpc, "c1", &goim2).await), ["p3"]);
    logic.stop().await;
}

/// The other side of the same race: a push routed to a session while it is registered reaches
/// its comet after the session ended, which had been given nothing of its user's history (its
/// disconnect names no position). The push waits for the device's next connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_a_session_never_got_waits_even_when_its_disconnect_names_no_position() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mid = 5252;
    push(&logic, mid, "o1").await;
    let first = connect(&rpc, "c1", mid, "k").await;
    assert_eq!(bodies(&given_at_connect(&rpc, "c1", &first).await), ["o1"]);
    let o1 = last_id(&logic, mid).await;
    rpc.disconnect(ctx(), sref("c1", mid, "k"), Some(o1))
        .await
        .unwrap()
        .unwrap();

    // Connected with nothing waiting; p1 is routed to it and never reaches it.
    let second = connect(&rpc, "c1", mid, "k").await;
    assert_eq!(second.offline_after, None);
    let v = push(&logic, mid, "p1").await;
    assert_eq!(
        (v["sessions"].clone(), v["delivery"].clone()),
        (json!(1), json!("both"))
    );
    rpc.disconnect(ctx(), sref("c1", mid, "k"), None)
        .await
        .unwrap()
        .unwrap();
    let third = connect(&rpc, "c1", mid, "k").await;
    assert_eq!(third.offline_after, Some(o1));
    assert_eq!(bodies(&given_at_connect(&rpc, "c1", &third).await), ["p1"]);
    logic.stop().await;
}

/// The normal path gives nothing twice: pushes a present session got are not owed at the
/// device's next connect, also when the device moved to another comet meanwhile (the old
/// comet's late disconnect does not make the new session's pushes owed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_a_present_session_got_are_not_given_again() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mid = 5353;
    let first = connect(&rpc, "c1", mid, "k").await;
    assert_eq!(first.offline_after, None);
    push(&logic, mid, "p1").await;
    let p1 = last_id(&logic, mid).await;
    // The device moves to c2 before c1 reports the old session gone.
    let moved = connect(&rpc, "c2", mid, "k").await;
    assert!(moved.replaced_elsewhere);
    assert_eq!(moved.offline_after, None, "p1 was routed to the device");
    rpc.disconnect(ctx(), sref("c1", mid, "k"), Some(p1))
        .await
        .unwrap()
        .unwrap();
    let v = push(&logic, mid, "p2").await;
    assert_eq!(v["sessions"], json!(1));
    let p2 = last_id(&logic, mid).await;
    rpc.disconnect(ctx(), sref("c2", mid, "k"), Some(p2))
        .await
        .unwrap()
        .unwrap();
    let again = connect(&rpc, "c1", mid, "k").await;
    assert_eq!(again.offline_after, None, "p1 and p2 were given");
    logic.stop().await;
}
