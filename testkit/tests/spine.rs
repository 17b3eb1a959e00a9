//! The spine: pushes accepted by logic's HTTP API travel through a Redis stream and a job worker
//! to exactly the right sessions on two comets, over TCP, WebSocket binary and WebSocket JSON.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Cluster, Options};
use rim_testkit::api::eventually;
use rim_testkit::client::{Conn, Received, Transport};

const A: usize = 0;
const B: usize = 1;

/// Asserts `client` received exactly `body` with `op` as its next push, framed as its transport demands.
async fn expect_push(client: &mut Conn, op: i32, body: &str) -> Received {
    let r = client.recv_push().await.unwrap_or_else(|e| {
        panic!(
            "{:?} client {} expected {body:?}: {e}",
            client.transport(),
            client.key()
        )
    });
    assert_eq!(r.frame.op, op, "op of {body:?}");
    assert_eq!(&r.frame.body[..], body.as_bytes(), "body");
    match client.transport() {
        Transport::Tcp => assert!(!r.in_raw, "TCP pushes are plain frames"),
        Transport::WsBinary => assert!(r.in_raw, "WebSocket pushes come wrapped in op 9"),
        Transport::WsJson => assert!(r.json_body.is_some(), "JSON mode pushes are JSON"),
    }
    r
}

/// Asserts that nothing was queued for these clients: every accepted push has been confirmed by
/// the comets (streams drained), and each client's heartbeat reply arrives with no push before it.
async fn expect_nothing(cluster: &Cluster, clients: &mut [&mut Conn]) {
    cluster.wait_drained().await;
    for c in clients.iter_mut() {
        let pushes = c.pushes_before_heartbeat().await.expect("heartbeat");
        assert!(
            pushes.is_empty(),
            "{:?} client {} got unexpected pushes: {pushes:?}",
            c.transport(),
            c.key()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reach_exactly_their_recipients_across_two_comets_and_three_transports() {
    let cluster = Cluster::start().await;
    let room = "live://1000";
    // mid 1 has three sessions: WS binary and TCP on comet A, WS JSON on comet B.
    let mut a_ws = cluster
        .client(A, Transport::WsBinary, 1, room, &[1000, 1001])
        .await;
    let mut a_tcp = cluster.client(A, Transport::Tcp, 1, room, &[1000]).await;
    let mut b_json = cluster
        .client(B, Transport::WsJson, 1, "", &[1000, 1001])
        .await;
    // Others: mid 2 (JSON, comet A, another room), mid 3 (TCP, comet B, the room), mid 4 (WS, comet B, the room).
    let mut a_json2 = cluster
        .client(A, Transport::WsJson, 2, "live://2000", &[1000, 1001])
        .await;
    let mut b_tcp3 = cluster
        .client(B, Transport::Tcp, 3, room, &[1000, 1001])
        .await;
    let mut b_ws4 = cluster
        .client(B, Transport::WsBinary, 4, room, &[1000, 1001])
        .await;

    // To a mid: all three sessions of mid 1, on both comets, and nobody else.
    let data = cluster
        .api
        .push_mids(1000, &[1], b"to-mid-1")
        .await
        .unwrap();
    assert_eq!(data["sessions"], 3, "{data}");
    assert!(data["id"].as_str().is_some_and(|s| !s.is_empty()), "{data}");
    expect_push(&mut a_ws, 1000, "to-mid-1").await;
    expect_push(&mut a_tcp, 1000, "to-mid-1").await;
    let r = expect_push(&mut b_json, 1000, "to-mid-1").await;
    assert_eq!(
        r.json_body,
        Some(serde_json::Value::String("to-mid-1".into())),
        "non-JSON body is a string"
    );
    expect_nothing(&cluster, &mut [&mut a_json2, &mut b_tcp3, &mut b_ws4]).await;

    // To a key: that session only, even though its mid has others.
    let key = a_tcp.key().to_string();
    let data = cluster
        .api
        .push_keys(1000, &[&key], b"to-key")
        .await
        .unwrap();
    assert_eq!(data["sessions"], 1, "{data}");
    expect_push(&mut a_tcp, 1000, "to-key").await;
    expect_nothing(
        &cluster,
        &mut [
            &mut a_ws,
            &mut b_json,
            &mut a_json2,
            &mut b_tcp3,
            &mut b_ws4,
        ],
    )
    .await;

    // To a room: its members on both comets, nobody else. A JSON body is embedded as JSON.
    cluster
        .api
        .push_room(1000, "live", "1000", br#"{"n":1}"#)
        .await
        .unwrap();
    expect_push(&mut a_ws, 1000, r#"{"n":1}"#).await;
    expect_push(&mut a_tcp, 1000, r#"{"n":1}"#).await;
    expect_push(&mut b_tcp3, 1000, r#"{"n":1}"#).await;
    expect_push(&mut b_ws4, 1000, r#"{"n":1}"#).await;
    expect_nothing(&cluster, &mut [&mut b_json, &mut a_json2]).await;

    // Op filtering: a_tcp accepted only 1000, so a 1001 room push skips it.
    cluster
        .api
        .push_room(1001, "live", "1000", b"op-1001")
        .await
        .unwrap();
    expect_push(&mut a_ws, 1001, "op-1001").await;
    expect_push(&mut b_tcp3, 1001, "op-1001").await;
    expect_push(&mut b_ws4, 1001, "op-1001").await;
    expect_nothing(&cluster, &mut [&mut a_tcp, &mut b_json, &mut a_json2]).await;

    // To all: everyone, on both comets.
    cluster.api.push_all(1000, b"to-all").await.unwrap();
    for c in [
        &mut a_ws,
        &mut a_tcp,
        &mut b_json,
        &mut a_json2,
        &mut b_tcp3,
        &mut b_ws4,
    ] {
        expect_push(c, 1000, "to-all").await;
    }
    expect_nothing(
        &cluster,
        &mut [
            &mut a_ws,
            &mut a_tcp,
            &mut b_json,
            &mut a_json2,
            &mut b_tcp3,
            &mut b_ws4,
        ],
    )
    .await;

    // Sub/Unsub change what a session accepts: a_tcp subscribes to 1001 and now gets it.
    a_tcp
        .send_op(rim_proto::op::SUB, &b"1001"[..])
        .await
        .unwrap();
    let reply = a_tcp.recv_op(rim_proto::op::SUB_REPLY).await.unwrap();
    assert_eq!(&reply.frame.body[..], b"1001");
    b_ws4
        .send_op(rim_proto::op::UNSUB, &b"1001"[..])
        .await
        .unwrap();
    b_ws4.recv_op(rim_proto::op::UNSUB_REPLY).await.unwrap();
    cluster
        .api
        .push_room(1001, "live", "1000", b"after-sub")
        .await
        .unwrap();
    expect_push(&mut a_tcp, 1001, "after-sub").await;
    expect_push(&mut a_ws, 1001, "after-sub").await;
    expect_push(&mut b_tcp3, 1001, "after-sub").await;
    expect_nothing(&cluster, &mut [&mut b_ws4]).await;

    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_room_moves_room_pushes_and_a_new_room_on_a_comet_gets_them_at_once() {
    let cluster = Cluster::start().await;
    let mut a = cluster
        .client(A, Transport::WsBinary, 10, "", &[1000])
        .await;
    let mut b = cluster
        .client(B, Transport::Tcp, 11, "live://7", &[1000])
        .await;

    // a joins a room that has no member on comet A yet: the reply means room pushes reach it.
    let seq = a
        .send_op(rim_proto::op::CHANGE_ROOM, &b"live://7"[..])
        .await
        .unwrap();
    let reply = a.recv_op(rim_proto::op::CHANGE_ROOM_REPLY).await.unwrap();
    assert_eq!(
        (reply.frame.seq, &reply.frame.body[..]),
        (seq, &b"live://7"[..])
    );
    cluster
        .api
        .push_room(1000, "live", "7", b"r7")
        .await
        .unwrap();
    expect_push(&mut a, 1000, "r7").await;
    expect_push(&mut b, 1000, "r7").await;

    // Leaving (empty body) stops room pushes for a.
    a.send_op(rim_proto::op::CHANGE_ROOM, bytes::Bytes::new())
        .await
        .unwrap();
    a.recv_op(rim_proto::op::CHANGE_ROOM_REPLY).await.unwrap();
    cluster
        .api
        .push_room(1000, "live", "7", b"r7-again")
        .await
        .unwrap();
    expect_push(&mut b, 1000, "r7-again").await;
    expect_nothing(&cluster, &mut [&mut a]).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_reply_carries_the_rooms_cluster_wide_online_count() {
    let cluster = Cluster::start().await;
    let mut a1 = cluster
        .client(A, Transport::Tcp, 20, "live://hb", &[1000])
        .await;
    let _a2 = cluster
        .client(A, Transport::WsBinary, 21, "live://hb", &[1000])
        .await;
    let _b1 = cluster
        .client(B, Transport::WsJson, 22, "live://hb", &[1000])
        .await;
    let mut lonely = cluster.client(B, Transport::WsJson, 23, "", &[1000]).await;

    // Counts travel comet → logic → comet on the renewal period; the reply converges to 3.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = a1.heartbeat().await.unwrap();
    while last != 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await; // polling a remote count, not synchronising
        last = a1.heartbeat().await.unwrap();
    }
    assert_eq!(last, 3, "cluster-wide online count of live://hb");
    assert_eq!(lonely.heartbeat().await.unwrap(), 0, "no room, count 0");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_session_times_out_and_disconnect_unregisters_at_once() {
    // Clients beat every second and the comet closes one silent for 2 s (its own misses), while
    // logic keeps a registration for heartbeat × (its misses + 1) = 61 s: a registration gone
    // within the test was removed by the disconnect, never expired.
    let cluster = Cluster::start_with(Options {
        logic: Box::new(|c| {
            c.session.heartbeat_secs = 1;
            c.session.heartbeat_misses = 60;
        }),
        comet: Box::new(|_, c| c.session.heartbeat_misses = 2),
        ..Options::default()
    })
    .await;
    let mut silent = cluster.client(A, Transport::Tcp, 30, "", &[1000]).await;
    let leaving = cluster
        .client(B, Transport::WsBinary, 31, "", &[1000])
        .await;
    let silent_key = silent.key().to_string();
    let leaving_key = leaving.key().to_string();
    let mut conn = cluster.redis.connection();
    let exists = |conn: &mut dyn redis::ConnectionLike, key: &str| -> bool {
        redis::cmd("EXISTS")
            .arg(rim_proto::keys::session(key))
            .query::<i64>(conn)
            .unwrap()
            == 1
    };
    assert!(
        exists(&mut conn, &silent_key) && exists(&mut conn, &leaving_key),
        "sessions registered at auth"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(rim_proto::keys::session(&silent_key))
        .query(&mut conn)
        .unwrap();
    assert!(
        ttl > 30_000,
        "registration TTL {ttl} ms: expiry could pass for removal"
    );

    // Disconnect: the registration goes as soon as the comet sees the close.
    leaving.close().await;
    let redis = &cluster.redis;
    eventually(
        "closed session unregistered",
        Duration::from_secs(5),
        || {
            let mut c = redis.connection();
            let k = leaving_key.clone();
            async move { (!exists(&mut c, &k)).then_some(()) }
        },
    )
    .await
    .unwrap();

    // Silence: closed after heartbeat (1 s) × misses (2), with op 6 and a reason, then unregistered.
    let closed = silent.expect_closed().await.unwrap();
    assert_eq!(
        closed.disconnect_reason.as_deref(),
        Some("heartbeat timeout"),
        "{closed:?}"
    );
    eventually(
        "timed-out session unregistered",
        Duration::from_secs(5),
        || {
            let mut c = redis.connection();
            let k = silent_key.clone();
            async move { (!exists(&mut c, &k)).then_some(()) }
        },
    )
    .await
    .unwrap();
    // The same disconnect call removes the user's index entry right after the session hash.
    eventually("mid index cleaned too", Duration::from_secs(5), || {
        let mut c = redis.connection();
        async move {
            let n: i64 = redis::cmd("HLEN")
                .arg(rim_proto::keys::mid_sessions(30))
                .query(&mut c)
                .ok()?;
            (n == 0).then_some(())
        }
    })
    .await
    .unwrap();
    cluster.stop().await;
}
