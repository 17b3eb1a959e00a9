//! Recovery end to end on real sockets and a real Redis: a client that opts in at Auth
//! (`"recover"`) gets each recorded push's id and history (op 25 PushMeta before the push on
//! binary transports), and after a reconnect resumes from the last id it saw: what it missed
//! once each and in order, then live pushes, and `recovered:false` when the window was exceeded.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::{Cluster, Options};
use rim_logic::config::Retention;
use rim_proto::history::Recover;
use rim_proto::msg::{AuthBody, AuthReplyBody};
use rim_proto::op;
use rim_testkit::client::{Conn, Transport};
use serde_json::{Value, json};

const OP: i32 = 1000;

async fn cluster() -> Cluster {
    Cluster::start_with(Options {
        comets: 1,
        logic: Box::new(|c| {
            let keep = |max_len| Retention {
                max_len,
                max_age_secs: 3600,
            };
            c.history.rooms.insert("chat".into(), keep(100));
            c.history.rooms.insert("tiny".into(), keep(5));
        }),
        ..Options::default()
    })
    .await
}

/// Connects to `room` asking to recover `rooms` (room → last id seen).
async fn connect(
    cluster: &Cluster,
    transport: Transport,
    room: &str,
    rooms: &[(&str, &str)],
) -> (Conn, AuthReplyBody) {
    let auth = AuthBody {
        mid: 5,
        room_id: room.into(),
        platform: "test".into(),
        accepts: vec![OP],
        recover: Some(Recover {
            user: None,
            rooms: rooms
                .iter()
                .map(|(r, id)| (r.to_string(), id.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }),
        ..AuthBody::default()
    };
    let mut c = Conn::open(transport, cluster.comets[0].addr(transport))
        .await
        .unwrap();
    let reply = c.auth(&auth).await.unwrap();
    (c, reply)
}

async fn push(cluster: &Cluster, room: &str, n: usize) {
    let (ty, id) = room.split_once("://").unwrap();
    cluster
        .api
        .push_room(OP, ty, id, format!("m{n}").as_bytes())
        .await
        .unwrap();
}

/// The next `n` pushes with the meta frame before each: (id, room, body).
async fn tagged(c: &mut Conn, n: usize) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let meta = c.recv_op(op::PUSH_META).await.unwrap();
        let meta: Value = serde_json::from_slice(&meta.frame.body).unwrap();
        let p = c.recv_push().await.unwrap();
        out.push((
            meta["id"].as_str().unwrap().to_string(),
            meta["room"].as_str().unwrap().to_string(),
            String::from_utf8_lossy(&p.frame.body).into_owned(),
        ));
    }
    out
}

fn bodies(got: &[(String, String, String)]) -> Vec<String> {
    got.iter().map(|(_, _, b)| b.clone()).collect()
}

fn numbered(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Must-show 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_resumes_from_its_last_id_once_and_in_order() {
    let cluster = cluster().await;
    let room = "chat://r";
    let (mut c, reply) = connect(&cluster, Transport::Tcp, room, &[]).await;
    assert_eq!(reply.recovered.unwrap().rooms, BTreeMap::new());
    for i in 1..=10 {
        push(&cluster, room, i).await;
    }
    let first = tagged(&mut c, 10).await;
    assert_eq!(bodies(&first), numbered(1..=10));
    assert!(first.iter().all(|(_, r, _)| r == room));
    let last_seen = first.last().unwrap().0.clone();
    c.close().await;

    // Twenty more while it is away.
    for i in 11..=30 {
        push(&cluster, room, i).await;
    }
    let (mut c, reply) = connect(&cluster, Transport::WsBinary, room, &[(room, &last_seen)]).await;
    assert!(reply.recovered.unwrap().rooms[room]);
    push(&cluster, room, 31).await;
    let resumed = tagged(&mut c, 21).await;
    assert_eq!(bodies(&resumed), numbered(11..=31));
    let ids: Vec<_> = resumed
        .iter()
        .map(|(id, _, _)| rim_proto::history::HistoryId::parse(id).unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    cluster.wait_drained().await;
    let more = c.pushes_before_heartbeat().await.unwrap();
    assert!(more.is_empty(), "nothing twice: {more:?}");
    c.close().await;

    // JSON mode carries the id and room in the push object; a JoinRoom can recover too.
    let (mut j, _) = connect(&cluster, Transport::WsJson, "", &[]).await;
    let body = json!({"room": room, "recover": resumed[17].0}).to_string();
    j.send_op(op::JOIN_ROOM, body.into_bytes()).await.unwrap();
    let r = j.recv_op(op::JOIN_ROOM_REPLY).await.unwrap();
    let r: Value = serde_json::from_slice(&r.frame.body).unwrap();
    assert_eq!(r, json!({"room": room, "recovered": true}));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(j.recv_push().await.unwrap());
    }
    let bodies: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.frame.body).into_owned())
        .collect();
    assert_eq!(bodies, numbered(29..=31));
    j.close().await;
    cluster.stop().await;
}

/// A client away longer than the window keeps is told so, and gets what is still kept (and,
/// when job was still delivering the older ones as it connected, those too: in order, once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_window_is_told_it_was_not_recovered() {
    let cluster = cluster().await;
    let room = "tiny://t";
    let (mut c, _) = connect(&cluster, Transport::Tcp, room, &[]).await;
    push(&cluster, room, 1).await;
    let seen = tagged(&mut c, 1).await[0].0.clone();
    c.close().await;
    for i in 2..=11 {
        push(&cluster, room, i).await;
    }
    let (mut c, reply) = connect(&cluster, Transport::Tcp, room, &[(room, &seen)]).await;
    assert!(!reply.recovered.unwrap().rooms[room]);
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("m11") {
        got.extend(bodies(&tagged(&mut c, 1).await));
    }
    let first: usize = got[0][1..].parse().unwrap();
    assert!((2..=7).contains(&first), "{got:?}");
    assert_eq!(got, numbered(first..=11), "the kept ones, in order, once");
    cluster.wait_drained().await;
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    c.close().await;
    cluster.stop().await;
}
