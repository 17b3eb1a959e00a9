//! Several rooms per session (ops 18 JoinRoom and 20 LeaveRoom, Auth's `rooms`), end to end on
//! real sockets and a real Redis: room pushes reach a session once per room it is in, in each
//! room's order; leaving stops them; a room joined twice is one membership; the room past
//! `session.max_rooms` is refused; member listings and counts follow joins, leaves and Auth's
//! `rooms` on two comets.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Cluster, Options};
use rim_proto::msg::AuthBody;
use rim_proto::op;
use rim_testkit::client::{Conn, Transport};

const OP: i32 = 1000;

/// Sends `request` with `room` as the body and returns the reply's body.
async fn room_op(c: &mut Conn, request: i32, reply: i32, room: &str) -> String {
    c.send_op(request, room.as_bytes().to_vec()).await.unwrap();
    let r = c.recv_op(reply).await.unwrap();
    String::from_utf8_lossy(&r.frame.body).into_owned()
}

async fn join(c: &mut Conn, room: &str) -> String {
    room_op(c, op::JOIN_ROOM, op::JOIN_ROOM_REPLY, room).await
}

async fn leave(c: &mut Conn, room: &str) -> String {
    room_op(c, op::LEAVE_ROOM, op::LEAVE_ROOM_REPLY, room).await
}

/// Pushes `{room}-{n}` to `room` (`type://id`).
async fn push(cluster: &Cluster, room: &str, n: usize) {
    let (ty, id) = room.split_once("://").unwrap();
    cluster
        .api
        .push_room(OP, ty, id, format!("{room}-{n}").as_bytes())
        .await
        .unwrap();
}

/// Every push `c` has, once the streams are drained (a heartbeat reply marks the end).
async fn received(cluster: &Cluster, c: &mut Conn) -> Vec<String> {
    cluster.wait_drained().await;
    c.pushes_before_heartbeat()
        .await
        .unwrap()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.frame.body).into_owned())
        .collect()
}

/// Pushes grouped by the room they name, in arrival order.
fn by_room(pushes: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in pushes {
        let room = p.rsplit_once('-').unwrap().0.to_string();
        out.entry(room).or_default().push(p.clone());
    }
    out
}

fn expected(room: &str, n: std::ops::Range<usize>) -> Vec<String> {
    n.map(|i| format!("{room}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_three_rooms_gets_each_rooms_pushes_once_and_in_order() {
    let cluster = Cluster::start().await;
    let (r1, r2, r3) = ("live://r1", "live://r2", "live://r3");
    // On comet 0: in r1 by Auth, then r2 and r3, then r1 again (one membership).
    let mut a = cluster.client(0, Transport::Tcp, 1, r1, &[OP]).await;
    for r in [r2, r3, r1] {
        assert_eq!(join(&mut a, r).await, r);
    }
    // On comet 1: only r2, so r2's pushes go to both comets.
    let mut b = cluster.client(1, Transport::WsBinary, 2, r2, &[OP]).await;

    for i in 0..5 {
        for r in [r1, r2, r3] {
            push(&cluster, r, i).await;
        }
    }
    let got = received(&cluster, &mut a).await;
    assert_eq!(got.len(), 15, "each push once: {got:?}");
    let rooms = by_room(&got);
    for r in [r1, r2, r3] {
        assert_eq!(rooms[r], expected(r, 0..5), "{r} in order");
    }
    assert_eq!(received(&cluster, &mut b).await, expected(r2, 0..5));

    // Leaving r2 stops its pushes for a; b still gets them; r1 and r3 go on.
    assert_eq!(leave(&mut a, r2).await, r2);
    for r in [r1, r2, r3] {
        push(&cluster, r, 5).await;
    }
    let got = received(&cluster, &mut a).await;
    assert_eq!(
        by_room(&got).keys().collect::<Vec<_>>(),
        vec![r1, r3],
        "{got:?}"
    );
    assert_eq!(got.len(), 2);
    assert_eq!(received(&cluster, &mut b).await, expected(r2, 5..6));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_past_max_rooms_is_refused() {
    // 64 requests in a row: more than the default burst of the request rate limit.
    let cluster = Cluster::start_with(Options {
        comet: Box::new(|_, c| c.session.send_burst = 200),
        ..Options::default()
    })
    .await;
    let mut a = cluster
        .client(0, Transport::Tcp, 1, "live://0", &[OP])
        .await;
    // The default session.max_rooms is 64: the Auth room and 63 more.
    for i in 1..64 {
        let r = format!("live://{i}");
        assert_eq!(join(&mut a, &r).await, r);
    }
    let refused = join(&mut a, "live://64").await;
    assert_eq!(refused, r#"{"error":"too many rooms: at most 64"}"#);
    // Still in the 64 it joined: a push to the last one arrives, none to the refused one.
    push(&cluster, "live://63", 0).await;
    push(&cluster, "live://64", 0).await;
    assert_eq!(received(&cluster, &mut a).await, vec!["live://63-0"]);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_lists_follow_joins_and_leaves_on_two_comets() {
    let cluster = Cluster::start().await;
    let (x, y) = ("chat://x", "chat://y");
    let mut a = cluster.client(0, Transport::Tcp, 1, x, &[OP]).await;
    let mut b = cluster.client(1, Transport::Tcp, 2, "", &[OP]).await;
    // (members as (mid, sessions), count of members) after each step.
    assert_eq!(cluster.members(x).await, (vec![(1, 1)], 1));
    assert_eq!(cluster.members(y).await, (vec![], 0));
    assert_eq!(join(&mut a, y).await, y);
    assert_eq!(cluster.members(y).await, (vec![(1, 1)], 1));
    assert_eq!(join(&mut b, x).await, x);
    assert_eq!(cluster.members(x).await, (vec![(1, 1), (2, 1)], 2));
    assert_eq!(join(&mut b, y).await, y);
    assert_eq!(cluster.members(x).await, (vec![(1, 1), (2, 1)], 2));
    assert_eq!(cluster.members(y).await, (vec![(1, 1), (2, 1)], 2));
    // A second session of user 1, on the other comet, in y only: one more session, not one
    // more member.
    let a2 = cluster.client(1, Transport::WsBinary, 1, y, &[OP]).await;
    assert_eq!(cluster.members(y).await, (vec![(1, 2), (2, 1)], 2));

    assert_eq!(leave(&mut a, y).await, y);
    assert_eq!(cluster.members(y).await, (vec![(1, 1), (2, 1)], 2));
    assert_eq!(cluster.members(x).await, (vec![(1, 1), (2, 1)], 2));
    assert_eq!(leave(&mut b, x).await, x);
    assert_eq!(cluster.members(x).await, (vec![(1, 1)], 1));
    assert_eq!(cluster.members(y).await, (vec![(1, 1), (2, 1)], 2));
    // Hanging up counts a session out of every room it was in.
    b.close().await;
    a2.close().await;
    rim_testkit::api::eventually("members after hang-ups", Duration::from_secs(10), || {
        let c = &cluster;
        async move { c.members(y).await.0.is_empty().then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(cluster.members(y).await, (vec![], 0));
    assert_eq!(cluster.members(x).await, (vec![(1, 1)], 1));
    drop(a);
    cluster.stop().await;
}

/// Connects `mid` to comet `node` with Auth's `room_id` and `rooms`.
async fn client_in(
    cluster: &Cluster,
    node: usize,
    mid: i64,
    room_id: &str,
    rooms: &[&str],
) -> Conn {
    let auth = AuthBody {
        mid,
        room_id: room_id.into(),
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        platform: "test".into(),
        accepts: vec![OP],
        ..AuthBody::default()
    };
    Conn::connect(Transport::Tcp, cluster.comets[node].tcp, &auth)
        .await
        .unwrap()
}

/// Auth's `rooms` (besides `room_id`) puts the session in each room listed at once: the reply
/// names them all, each room's pushes arrive once, and member lists and counts show it, on two
/// comets; hanging up takes the session out of all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_rooms_put_the_session_in_every_room_listed() {
    let cluster = Cluster::start().await;
    let (r1, r2, r3, other) = ("chat://a1", "chat://a2", "chat://a3", "chat://a4");
    let mut a = client_in(&cluster, 0, 1, r1, &[r2, r3]).await;
    assert_eq!(
        a.session.as_ref().unwrap().rooms,
        vec![r1.to_string(), r2.into(), r3.into()]
    );
    // Only `rooms`, no `room_id`, on the other comet.
    let mut b = client_in(&cluster, 1, 2, "", &[r2]).await;
    assert_eq!(b.session.as_ref().unwrap().rooms, vec![r2.to_string()]);

    assert_eq!(cluster.members(r1).await, (vec![(1, 1)], 1));
    assert_eq!(cluster.members(r2).await, (vec![(1, 1), (2, 1)], 2));
    assert_eq!(cluster.members(r3).await, (vec![(1, 1)], 1));
    assert_eq!(cluster.members(other).await, (vec![], 0));

    for i in 0..3 {
        for r in [r1, r2, r3, other] {
            push(&cluster, r, i).await;
        }
    }
    let got = received(&cluster, &mut a).await;
    assert_eq!(got.len(), 9, "each push of its three rooms once: {got:?}");
    let rooms = by_room(&got);
    assert_eq!(rooms.keys().collect::<Vec<_>>(), vec![r1, r2, r3]);
    for r in [r1, r2, r3] {
        assert_eq!(rooms[r], expected(r, 0..3), "{r} in order");
    }
    assert_eq!(received(&cluster, &mut b).await, expected(r2, 0..3));

    a.close().await;
    rim_testkit::api::eventually("members after a's hang-up", Duration::from_secs(10), || {
        let c = &cluster;
        async move { (c.members(r1).await.1 == 0).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(cluster.members(r1).await, (vec![], 0));
    assert_eq!(cluster.members(r2).await, (vec![(2, 1)], 1));
    assert_eq!(cluster.members(r3).await, (vec![], 0));
    b.close().await;
    cluster.stop().await;
}
