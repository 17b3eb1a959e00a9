//! Real IM across two comets: room chat and direct messages sent by clients (op 4), the send
//! policy, who-is-online listings, room batching, and the bot webhook.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::routing::post;
use common::{Cluster, Options};
use parking_lot::Mutex;
use rim_proto::op;
use rim_testkit::api::eventually;
use rim_testkit::client::{Conn, Received, Transport};
use serde_json::{Value, json};

const A: usize = 0;
const B: usize = 1;

/// Sends op 4 and returns the op 5 reply body.
async fn send(c: &mut Conn, msg: Value) -> Value {
    let seq = c
        .send_op(op::SEND_MSG, serde_json::to_vec(&msg).unwrap())
        .await
        .unwrap();
    let r = c.recv_op(op::SEND_MSG_REPLY).await.unwrap();
    assert_eq!(r.frame.seq, seq, "op 5 echoes the seq");
    serde_json::from_slice(&r.frame.body).unwrap()
}

fn body(r: &Received) -> Value {
    serde_json::from_slice(&r.frame.body).unwrap()
}

/// Nothing was queued for these clients (pushes confirmed everywhere, heartbeat answered first).
async fn expect_nothing(cluster: &Cluster, clients: &mut [&mut Conn]) {
    cluster.wait_drained().await;
    for c in clients.iter_mut() {
        let pushes = c.pushes_before_heartbeat().await.unwrap();
        assert!(
            pushes.is_empty(),
            "{} got unexpected pushes: {pushes:?}",
            c.key()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_chat_direct_messages_and_the_send_policy_across_two_comets() {
    let cluster = Cluster::start().await;
    let room = "chat://r";
    let mut alice = cluster
        .client(A, Transport::WsBinary, 1, room, &[1000])
        .await;
    let mut alice_phone = cluster.client(B, Transport::Tcp, 1, "", &[1000]).await;
    let mut bob = cluster.client(B, Transport::WsJson, 2, room, &[1000]).await;
    let mut dave = cluster.client(A, Transport::Tcp, 4, room, &[1000]).await;
    let mut carol = cluster
        .client(A, Transport::Tcp, 3, "chat://other", &[1000])
        .await;

    // Room chat reaches every member on both comets, in send order, from the session's mid.
    for i in 0..10 {
        let reply = send(
            &mut alice,
            json!({"room": room, "op": 1000, "data": {"n": i}}),
        )
        .await;
        assert_eq!(reply["code"], 0, "{reply}");
        assert!(
            reply["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{reply}"
        );
    }
    for member in [&mut bob, &mut dave] {
        for i in 0..10 {
            let r = member.recv_push().await.unwrap();
            assert_eq!(r.frame.op, 1000);
            assert_eq!(body(&r), json!({"from": 1, "data": {"n": i}}));
        }
    }
    // Not echoed to the sending session; not seen outside the room.
    expect_nothing(&cluster, &mut [&mut alice, &mut carol, &mut alice_phone]).await;

    // The other way, across comets.
    assert_eq!(
        send(
            &mut bob,
            json!({"room": room, "op": 1000, "data": "hi alice"})
        )
        .await["code"],
        0
    );
    assert_eq!(
        body(&alice.recv_push().await.unwrap()),
        json!({"from": 2, "data": "hi alice"})
    );
    assert_eq!(
        body(&dave.recv_push().await.unwrap()),
        json!({"from": 2, "data": "hi alice"})
    );

    // A direct message reaches every session of the recipient, on both comets, and nobody else.
    let reply = send(
        &mut bob,
        json!({"mid": 1, "op": 1000, "data": {"dm": "psst"}}),
    )
    .await;
    assert_eq!(reply["code"], 0, "{reply}");
    for s in [&mut alice, &mut alice_phone] {
        assert_eq!(
            body(&s.recv_push().await.unwrap()),
            json!({"from": 2, "data": {"dm": "psst"}})
        );
    }
    expect_nothing(&cluster, &mut [&mut bob, &mut carol, &mut dave]).await;

    // Offline recipient: kept in its history (users keep one by default) and given to it when
    // it connects.
    let reply = send(&mut bob, json!({"mid": 999, "op": 1000, "data": 1})).await;
    assert_eq!(reply["code"], 0, "{reply}");
    let mut late = cluster.client(A, Transport::Tcp, 999, "", &[1000]).await;
    assert_eq!(
        body(&late.recv_push().await.unwrap()),
        json!({"from": 2, "data": 1})
    );

    // Spoofing: whatever the frame claims, recipients learn the session's mid.
    let forged =
        json!({"room": room, "op": 1000, "from": 99, "mid_from": 99, "data": {"from": 99}});
    assert_eq!(send(&mut alice, forged).await["code"], 0);
    assert_eq!(
        body(&bob.recv_push().await.unwrap()),
        json!({"from": 1, "data": {"from": 99}})
    );
    assert_eq!(
        body(&dave.recv_push().await.unwrap()),
        json!({"from": 1, "data": {"from": 99}})
    );

    // Policy: not a member of the room → refused with a reason; malformed → -400.
    let reply = send(
        &mut carol,
        json!({"room": room, "op": 1000, "data": "let me in"}),
    )
    .await;
    assert_eq!(reply["code"], -403, "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("not a member"),
        "{reply}"
    );
    let reply = send(
        &mut carol,
        json!({"room": room, "mid": 1, "op": 1000, "data": 1}),
    )
    .await;
    assert_eq!(reply["code"], -400, "{reply}");
    let reply = send(&mut carol, json!({"mid": 1, "op": 7, "data": 1})).await;
    assert_eq!(reply["code"], -400, "{reply}");
    expect_nothing(&cluster, &mut [&mut alice, &mut bob, &mut dave]).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_can_be_turned_off() {
    let cluster = Cluster::start_with(Options {
        logic: Box::new(|c| c.chat.direct = false),
        ..Options::default()
    })
    .await;
    let mut a = cluster.client(A, Transport::Tcp, 1, "", &[1000]).await;
    let mut b = cluster.client(B, Transport::Tcp, 2, "", &[1000]).await;
    let reply = send(&mut a, json!({"mid": 2, "op": 1000, "data": 1})).await;
    assert_eq!(reply["code"], -403, "{reply}");
    expect_nothing(&cluster, &mut [&mut b]).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_and_session_listings_follow_joins_room_changes_and_leaves() {
    let cluster = Cluster::start_with(Options {
        logic: Box::new(|c| c.chat.presence_room_types = vec!["chat".into()]),
        ..Options::default()
    })
    .await;
    let room = "chat://lobby";
    let mut a1 = cluster
        .client(A, Transport::WsBinary, 1, room, &[1000])
        .await;
    assert_eq!(cluster.members(room).await, (vec![(1, 1)], 1));
    // Join events (op 24) go to the whole room, the joiner included.
    let ev = a1.recv_op(op::ROOM_EVENT).await.unwrap();
    assert_eq!(body(&ev), json!({"event": "join", "mid": 1, "room": room}));

    // A second user joins on the other comet: listed, and a join event (op 24) reaches a1.
    let b = cluster.client(B, Transport::Tcp, 2, room, &[1000]).await;
    assert_eq!(cluster.members(room).await, (vec![(1, 1), (2, 1)], 2));
    let ev = a1.recv_op(op::ROOM_EVENT).await.unwrap();
    assert_eq!(body(&ev), json!({"event": "join", "mid": 2, "room": room}));

    // mid 1's second session moves in by ChangeRoom: one member with two sessions, no new event.
    let mut a2 = cluster.client(B, Transport::WsJson, 1, "", &[1000]).await;
    a2.send_op(op::CHANGE_ROOM, room.as_bytes().to_vec())
        .await
        .unwrap();
    a2.recv_op(op::CHANGE_ROOM_REPLY).await.unwrap();
    assert_eq!(cluster.members(room).await, (vec![(1, 2), (2, 1)], 2));

    let sessions = cluster
        .api
        .get("/rim/users/1/sessions")
        .await
        .unwrap()
        .ok()
        .unwrap();
    let mut comets: Vec<&str> = sessions
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["comet"].as_str().unwrap())
        .collect();
    comets.sort();
    assert_eq!(comets, vec!["comet-1", "comet-2"], "{:?}", sessions.body);
    assert!(
        sessions
            .data()
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["room"] == room),
        "{:?}",
        sessions.body
    );

    // Leaving: a2 changes to another room (mid 1 still a member through a1), then b disconnects.
    a2.send_op(op::CHANGE_ROOM, &b"chat://elsewhere"[..])
        .await
        .unwrap();
    a2.recv_op(op::CHANGE_ROOM_REPLY).await.unwrap();
    assert_eq!(cluster.members(room).await, (vec![(1, 1), (2, 1)], 2));
    b.close().await;
    let ev = a1.recv_op(op::ROOM_EVENT).await.unwrap();
    assert_eq!(body(&ev), json!({"event": "leave", "mid": 2, "room": room}));
    assert_eq!(cluster.members(room).await, (vec![(1, 1)], 1));
    assert_eq!(cluster.members("chat://elsewhere").await, (vec![(1, 1)], 1));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_room_messages_arrives_complete_in_order_in_fewer_websocket_messages() {
    const N: usize = 30;
    let cluster = Cluster::start_with(Options {
        // A batch holding a room push reads on until the room has N messages or 2 s passed, so
        // the whole burst is normally one batch however slowly this machine publishes. The
        // lease must outlast the linger (a config rule).
        job: Box::new(|c| {
            c.room_batch.max = N;
            c.room_batch.linger_ms = 2000;
            c.lease.renew_ms = 2500;
            c.lease.ttl_ms = 7500;
        }),
        ..Options::default()
    })
    .await;
    let mut ws = cluster
        .client(A, Transport::WsBinary, 1, "live://burst", &[1000])
        .await;
    let mut json_client = cluster
        .client(B, Transport::WsJson, 2, "live://burst", &[1000])
        .await;
    let mut sender = cluster
        .client(B, Transport::Tcp, 3, "live://burst", &[1000])
        .await;
    let (ws_before, json_before) = (ws.messages_received, json_client.messages_received);
    let batches = || async {
        rim_testkit::api::metric(cluster.job_http, "rim_job_batches_total")
            .await
            .expect("rim_job_batches_total")
    };
    let batches_before = batches().await;

    for i in 0..N {
        let reply = send(
            &mut sender,
            json!({"room": "live://burst", "op": 1000, "data": i}),
        )
        .await;
        assert_eq!(reply["code"], 0);
    }
    for c in [&mut ws, &mut json_client] {
        for i in 0..N {
            let r = c.recv_push().await.unwrap();
            assert_eq!(
                body(&r),
                json!({"from": 3, "data": i}),
                "complete and in order"
            );
        }
    }
    cluster.wait_drained().await;
    let batches = batches().await - batches_before;
    let ws_msgs = ws.messages_received - ws_before;
    let json_msgs = json_client.messages_received - json_before;
    // Each acknowledged batch reaches a member as at most one WebSocket message (its room run),
    // and the linger keeps the burst to a batch or two: a comet writing one message per push,
    // or a job not lingering (a batch per push), fails here.
    assert!(
        (1..=3).contains(&batches),
        "{N} room messages in {batches} batches"
    );
    assert!(
        ws_msgs <= batches,
        "{N} pushes in {ws_msgs} WebSocket messages over {batches} batches"
    );
    assert!(
        json_msgs <= batches,
        "{N} pushes in {json_msgs} JSON messages over {batches} batches"
    );
    cluster.stop().await;
}

/// A bot: records what it is sent and answers with `reply`, after `hold` is released.
#[derive(Clone, Default)]
struct Bot {
    received: Arc<Mutex<Vec<Value>>>,
    release: Arc<tokio::sync::Notify>,
}

async fn start_bot(bot: Bot, hold: bool) -> SocketAddr {
    let app = axum::Router::new().route(
        "/hook",
        post(move |Json(v): Json<Value>| {
            let bot = bot.clone();
            async move {
                let room = v["room"].clone();
                bot.received.lock().push(v);
                if hold {
                    bot.release.notified().await;
                }
                Json(json!({"replies": [{"room": room, "op": 1000, "data": {"text": "pong"}}]}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn with_webhook(addr: SocketAddr, timeout_ms: u64) -> Options {
    Options {
        logic: Box::new(move |c| {
            c.webhook.url = format!("http://{addr}/hook");
            c.webhook.room_types = vec!["bot".into()];
            c.webhook.bot_mid = 42;
            c.webhook.timeout_ms = timeout_ms;
            c.webhook.retries = 0;
        }),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gets_room_messages_and_its_replies_reach_the_room() {
    let bot = Bot::default();
    let addr = start_bot(bot.clone(), false).await;
    let cluster = Cluster::start_with(with_webhook(addr, 2000)).await;
    let mut alice = cluster
        .client(A, Transport::WsBinary, 1, "bot://help", &[1000])
        .await;
    let mut bob = cluster
        .client(B, Transport::Tcp, 2, "bot://help", &[1000])
        .await;

    assert_eq!(
        send(
            &mut alice,
            json!({"room": "bot://help", "op": 1000, "data": "ping"})
        )
        .await["code"],
        0
    );
    assert_eq!(
        body(&bob.recv_push().await.unwrap()),
        json!({"from": 1, "data": "ping"})
    );
    // The bot's reply is pushed to the room as the bot's mid, to everyone including alice.
    for c in [&mut alice, &mut bob] {
        assert_eq!(
            body(&c.recv_push().await.unwrap()),
            json!({"from": 42, "data": {"text": "pong"}})
        );
    }
    let got = bot.received.lock().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (
            got[0]["from"].clone(),
            got[0]["room"].clone(),
            got[0]["data"].clone()
        ),
        (json!(1), json!("bot://help"), json!("ping"))
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_hangs_does_not_delay_the_chat() {
    let bot = Bot::default();
    let addr = start_bot(bot.clone(), true).await;
    let cluster = Cluster::start_with(with_webhook(addr, 30_000)).await;
    let mut alice = cluster
        .client(A, Transport::WsBinary, 1, "bot://slow", &[1000])
        .await;
    let mut bob = cluster
        .client(B, Transport::Tcp, 2, "bot://slow", &[1000])
        .await;

    assert_eq!(
        send(
            &mut alice,
            json!({"room": "bot://slow", "op": 1000, "data": "m1"})
        )
        .await["code"],
        0
    );
    // The bot has the message and is still holding its answer...
    let received = bot.received.clone();
    eventually("the bot got the message", Duration::from_secs(10), || {
        let n = received.lock().len();
        async move { (n == 1).then_some(()) }
    })
    .await
    .unwrap();
    // ...while the chat goes on: this message and the next reach bob before the bot answers.
    assert_eq!(
        body(&bob.recv_push().await.unwrap()),
        json!({"from": 1, "data": "m1"})
    );
    assert_eq!(
        send(
            &mut alice,
            json!({"room": "bot://slow", "op": 1000, "data": "m2"})
        )
        .await["code"],
        0
    );
    assert_eq!(
        body(&bob.recv_push().await.unwrap()),
        json!({"from": 1, "data": "m2"})
    );
    bot.release.notify_waiters();
    cluster.stop().await;
}
