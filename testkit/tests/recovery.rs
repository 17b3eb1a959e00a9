//! Recovery end to end on real sockets and a real Redis: a client that opts in at Auth
//! (`"recover"`) gets each recorded push's id and history (op 25 PushMeta before the push on
//! binary transports), and after a reconnect resumes from the last id it saw: what it missed
//! once each and in order, then live pushes, and `recovered:false` when the window was exceeded
//! (by a room type's length or its age). The main test's connection is reset, not closed.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Cluster, Options};
use rim_logic::config::Retention;
use rim_proto::history::Recover;
use rim_proto::msg::{AuthBody, AuthReplyBody};
use rim_proto::op;
use rim_testkit::api::eventually;
use rim_testkit::client::{Conn, Transport};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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
            // Kept by age: nothing older than 2 s (and up to 1000, more than the test pushes).
            c.history.rooms.insert(
                "brief".into(),
                Retention {
                    max_len: 1000,
                    max_age_secs: 2,
                },
            );
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
    connect_to(cluster.comets[0].addr(transport), transport, room, rooms).await
}

/// [`connect`] through `addr` (the comet, or a [`Relay`] to it).
async fn connect_to(
    addr: SocketAddr,
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
    let mut c = Conn::open(transport, addr).await.unwrap();
    let reply = c.auth(&auth).await.unwrap();
    (c, reply)
}

/// A relay for one client connection to the comet that can end it the way a lost network does:
/// both of its sockets reset (RST; no WebSocket close, no FIN), whatever was in flight lost.
struct Relay {
    addr: SocketAddr,
    reset: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reset = CancellationToken::new();
        let token = reset.clone();
        let done = tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut comet = TcpStream::connect(upstream).await.unwrap();
            for s in [&client, &comet] {
                s.set_nodelay(true).unwrap();
                // Closing a socket with a zero linger sends RST and drops what is unsent.
                s.set_zero_linger().unwrap();
            }
            tokio::select! {
                _ = token.cancelled() => {}
                r = tokio::io::copy_bidirectional(&mut client, &mut comet) => {
                    panic!("the relayed connection ended before the reset: {r:?}");
                }
            }
        });
        Relay { addr, reset, done }
    }

    /// Resets both sides of the relayed connection.
    async fn reset(self) {
        self.reset.cancel();
        self.done.await.unwrap();
    }
}

/// Waits until logic lists no session of the test's user (the comet handled its end).
async fn wait_gone(cluster: &Cluster) {
    eventually(
        "mid 5's session to end",
        Duration::from_secs(10),
        || async {
            let r = cluster.api.get("/rim/users/5/sessions").await.ok()?;
            r.data().as_array().is_some_and(Vec::is_empty).then_some(())
        },
    )
    .await
    .unwrap();
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

/// Must-show 3: the connection drops (reset, no close) after the client read message 10 of 30;
/// 11-15 were already on their way to it, 16-30 are pushed while it is away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_resumes_from_its_last_id_once_and_in_order() {
    let cluster = cluster().await;
    let room = "chat://r";
    let relay = Relay::start(cluster.comets[0].tcp).await;
    let (mut c, reply) = connect_to(relay.addr, Transport::Tcp, room, &[]).await;
    assert_eq!(reply.recovered.unwrap().rooms, BTreeMap::new());
    for i in 1..=15 {
        push(&cluster, room, i).await;
    }
    // All fifteen were handed to the session; the client reads ten of them.
    cluster.wait_drained().await;
    let first = tagged(&mut c, 10).await;
    assert_eq!(bodies(&first), numbered(1..=10));
    assert!(first.iter().all(|(_, r, _)| r == room));
    let last_seen = first.last().unwrap().0.clone();
    relay.reset().await;
    // The client sees the connection reset, not closed.
    let mut dropped = c;
    let err = loop {
        match dropped.recv_any().await {
            Ok(_) => continue, // 11-15, if they were read from the socket before the reset
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&err, rim_client::ClientError::Io(m) if m.contains("reset")),
        "{err:?}"
    );
    drop(dropped);
    wait_gone(&cluster).await;

    // Fifteen more while it is away.
    for i in 16..=30 {
        push(&cluster, room, i).await;
    }
    let (mut c, reply) = connect(&cluster, Transport::WsBinary, room, &[(room, &last_seen)]).await;
    assert_eq!(
        reply.recovered.unwrap().rooms,
        BTreeMap::from([(room.to_string(), true)])
    );
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

/// A room type's history keeps nothing older than its `max_age_secs`: a client whose last id
/// aged out while it was away is told it was not recovered and gets what is still kept, once
/// and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_last_id_aged_out_is_told_it_was_not_recovered() {
    let cluster = cluster().await;
    let room = "brief://b";
    let path = "/rim/rooms/brief%3A%2F%2Fb/history?limit=1000";
    let (mut c, _) = connect(&cluster, Transport::Tcp, room, &[]).await;
    push(&cluster, room, 1).await;
    let seen = tagged(&mut c, 1).await[0].0.clone();
    c.close().await;
    wait_gone(&cluster).await;

    // Away: a push per poll keeps the room's history alive while m1 and m2 age out of it (each
    // push trims what is older than 2 s; 10 s of polls push fewer than the 1000 `max_len`
    // keeps). Redis time cannot be paused: the wait is on the history itself, bounded.
    push(&cluster, room, 2).await;
    let mut n = 2;
    let kept: Vec<String> = eventually("m1 and m2 to age out", Duration::from_secs(10), || {
        n += 1;
        let (c, n) = (&cluster, n);
        async move {
            push(c, room, n).await;
            let page = c.api.get(path).await.ok()?.ok().ok()?;
            let kept: Vec<String> = page.data()["messages"]
                .as_array()?
                .iter()
                .map(|m| m["body"].as_str().unwrap().to_string())
                .collect();
            (!kept.contains(&"m2".to_string())).then_some(kept)
        }
    })
    .await
    .unwrap();
    let first: usize = kept[0][1..].parse().unwrap();
    assert!(first > 2, "{kept:?}");
    assert_eq!(kept, numbered(first..=n), "the young ones, in order");
    let page = cluster
        .api
        .get(&format!("{path}&after={seen}"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(page.data()["complete"], json!(false), "{:?}", page.body);

    let (mut c, reply) = connect(&cluster, Transport::Tcp, room, &[(room, &seen)]).await;
    assert_eq!(
        reply.recovered.unwrap().rooms,
        BTreeMap::from([(room.to_string(), false)])
    );
    let got = bodies(&tagged(&mut c, kept.len()).await);
    assert_eq!(got, kept);
    cluster.wait_drained().await;
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    c.close().await;
    cluster.stop().await;
}
