//! End-to-end tests of the comet's client port against a fake logic (`common`), driven by
//! rim-client connections (TCP, WebSocket binary and JSON) and a `CometRpc` client playing job:
//! auth, heartbeats, the op filter, dedupe, rooms, closes and shutdown.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use rim_client::{ClientError, Conn, Transport};
use rim_proto::frame::Frame;
use rim_proto::msg::AuthBody;
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::{DeliverTarget, Delivery, PushId};
use rim_testkit::client::raw_frame;
use std::time::Duration;

#[tokio::test]
async fn tcp_auth_heartbeat_filter_dedupe_and_room() {
    let mut h = start(|_| {}).await;
    let mut c = h.tcp_session("a", "live://1", &[1000]).await;
    // The room's first member was announced before the AuthReply: the fake records room_joined
    // before it answers the call, so the event is there as soon as op 8 is, without waiting.
    let now = h.events_now();
    assert!(now.iter().any(|e| e == "room_joined live://1"), "{now:?}");

    c.send_frame(Frame {
        ver: 0,
        ..Frame::new(op::HEARTBEAT, 5, Bytes::new())
    })
    .await
    .unwrap();
    let hb = c.recv_any().await.unwrap().frame;
    assert_eq!(
        (hb.op, hb.seq, &hb.body[..]),
        (op::HEARTBEAT_REPLY, 5, &1i32.to_be_bytes()[..])
    );

    let id = h.push_id();
    let item = Delivery {
        id,
        op: 1000,
        body: Bytes::from_static(b"hello"),
        target: DeliverTarget::Keys(vec!["a".into(), "nobody".into()]),
        exclude: None,
        recorded: false,
    };
    let r = h.deliver(vec![item.clone()]).await;
    assert_eq!((r.queued, r.missing, r.duplicates), (1, 1, 0));
    let p = c.recv_any().await.unwrap().frame;
    assert_eq!((p.op, &p.body[..]), (1000, &b"hello"[..]));

    // Same push id again: suppressed.
    let r = h.deliver(vec![item]).await;
    assert_eq!((r.queued, r.duplicates), (0, 1));

    // Op not accepted: skipped; after Sub it is delivered.
    let r = h
        .push(1001, "x", DeliverTarget::Keys(vec!["a".into()]))
        .await;
    assert_eq!(r.queued, 0);
    let s = request(&mut c, op::SUB, 9, "1001").await.frame;
    assert_eq!((s.op, s.seq, &s.body[..]), (op::SUB_REPLY, 9, &b"1001"[..]));
    let r = h
        .push(
            1001,
            "y",
            DeliverTarget::Room(RoomId::parse("live://1").unwrap()),
        )
        .await;
    assert_eq!(r.queued, 1);
    let p = c.recv_any().await.unwrap().frame;
    assert_eq!((p.op, &p.body[..]), (1001, &b"y"[..]));

    // Unsub; All reaches only accepting sessions.
    let u = request(&mut c, op::UNSUB, 10, "1001").await.frame;
    assert_eq!(u.op, op::UNSUB_REPLY);
    let r = h.push(1001, "z", DeliverTarget::All { speed: 0 }).await;
    assert_eq!(r.queued, 0);
    let r = h.push(1000, "all", DeliverTarget::All { speed: 0 }).await;
    assert_eq!(r.queued, 1);
    assert_eq!(&c.recv_any().await.unwrap().frame.body[..], b"all");

    // A bad SendMsg is answered, not fatal.
    let m = request(&mut c, op::SEND_MSG, 11, "{}").await.frame;
    assert_eq!((m.op, m.seq), (op::SEND_MSG_REPLY, 11));
    assert!(String::from_utf8_lossy(&m.body).contains("-400"));

    // Client leaves: logic hears about it.
    drop(c);
    h.expect_event("disconnect a").await;
}

#[tokio::test]
async fn change_room_success_and_refusal_keep_session() {
    let mut h = start(|_| {}).await;
    let mut c = h.tcp_session("cr", "", &[1000]).await;
    let r = request(&mut c, op::CHANGE_ROOM, 3, "bad room").await.frame;
    assert_eq!((r.op, r.seq), (op::CHANGE_ROOM_REPLY, 3));
    assert!(
        String::from_utf8_lossy(&r.body).contains("bad room id"),
        "{r:?}"
    );
    let r = request(&mut c, op::SUB, 4, "1000,x").await.frame;
    assert_eq!(r.op, op::SUB_REPLY);
    assert!(String::from_utf8_lossy(&r.body).contains("error"));

    let r = request(&mut c, op::CHANGE_ROOM, 4, "chat://9").await.frame;
    assert_eq!(
        (r.op, &r.body[..]),
        (op::CHANGE_ROOM_REPLY, &b"chat://9"[..])
    );
    h.expect_event("room_joined chat://9").await;
    let room = RoomId::parse("chat://9").unwrap();
    let rep = h
        .push(1000, "in room", DeliverTarget::Room(room.clone()))
        .await;
    assert_eq!(rep.queued, 1);
    assert_eq!(&c.recv_any().await.unwrap().frame.body[..], b"in room");

    // Leave with an empty body.
    let r = request(&mut c, op::CHANGE_ROOM, 5, Bytes::new())
        .await
        .frame;
    assert_eq!(r.op, op::CHANGE_ROOM_REPLY);
    let rep = h.push(1000, "gone", DeliverTarget::Room(room)).await;
    assert_eq!(rep.queued, 0);
}

#[tokio::test]
async fn ws_binary_auth_heartbeat_and_op9_pushes() {
    let mut h = start(|_| {}).await;
    let mut ws = h.open(Transport::WsBinary).await;
    // Conn checks that op 8 answers the Auth's seq.
    let a = ws.auth(&auth(3, "w", "live://2", &[1000])).await.unwrap();
    assert_eq!((a.key.as_str(), a.room_id.as_str()), ("w", "live://2"));
    let hb = request(&mut ws, op::HEARTBEAT, 2, Bytes::new()).await;
    assert_eq!((hb.frame.op, hb.frame.seq), (op::HEARTBEAT_REPLY, 2));
    assert!(hb.json_body.is_none(), "a binary message: {hb:?}");

    let room = RoomId::parse("live://2").unwrap();
    let items = (0..3)
        .map(|i| Delivery {
            id: h.push_id(),
            op: 1000,
            body: Bytes::from(format!("m{i}")),
            target: DeliverTarget::Room(room.clone()),
            exclude: None,
            recorded: false,
        })
        .collect::<Vec<_>>();
    let r = h.deliver(items).await;
    assert_eq!(r.queued, 3);
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = ws.recv_any().await.unwrap();
        assert!(p.in_raw, "pushes come wrapped in op 9: {p:?}");
        got.push(body_text(&p));
    }
    assert_eq!(got, vec!["m0", "m1", "m2"], "order kept");

    // A binary frame inside a text message is accepted too. Hand-made: Conn sends frames as
    // binary messages, and the point is goim's binary-in-text compatibility.
    let in_text = Frame::new(op::HEARTBEAT, 3, Bytes::new())
        .to_bytes()
        .to_vec();
    ws.send_text(&String::from_utf8(in_text).unwrap())
        .await
        .unwrap();
    let hb = ws.recv_any().await.unwrap();
    assert_eq!(hb.frame.op, op::HEARTBEAT_REPLY);
    assert!(hb.json_body.is_none(), "a binary message: {hb:?}");
}

#[tokio::test]
async fn ws_json_mode() {
    let mut h = start(|_| {}).await;
    let mut ws = h.open(Transport::WsJson).await;
    // Conn checks that op 8 answers the Auth's seq.
    let a = ws.auth(&auth(5, "j", "live://3", &[1000])).await.unwrap();
    assert_eq!(a.key, "j");
    let hb = request(&mut ws, op::HEARTBEAT, 2, Bytes::new()).await;
    assert_eq!(
        (hb.frame.op, hb.frame.seq, hb.json_body),
        (
            op::HEARTBEAT_REPLY,
            2,
            Some(serde_json::json!({"online":1}))
        )
    );
    h.push(
        1000,
        r#"{"hello":"json"}"#,
        DeliverTarget::Keys(vec!["j".into()]),
    )
    .await;
    let p = ws.recv_any().await.unwrap();
    assert_eq!(
        (p.frame.op, p.frame.seq, p.json_body),
        (1000, 0, Some(serde_json::json!({"hello":"json"})))
    );
    let cr = request(&mut ws, op::CHANGE_ROOM, 3, "live://4").await;
    assert_eq!(
        (cr.frame.op, cr.frame.seq, cr.json_body),
        (
            op::CHANGE_ROOM_REPLY,
            3,
            Some(serde_json::json!("live://4"))
        )
    );
    // Not a JSON frame: protocol error.
    ws.send_text(r#"{"op":"x"}"#).await.unwrap();
    assert_eq!(ws.expect_closed().await.unwrap().code, Some(1002));
    // Counted under its own reason, and nothing else was refused.
    assert_eq!(
        h.rejections().await,
        [(
            r#"rim_comet_frames_rejected_total{reason="bad_json"}"#.into(),
            1
        )]
    );
}

#[tokio::test]
async fn first_frame_must_be_auth() {
    let h = start(|_| {}).await;
    let mut c = h.open(Transport::Tcp).await;
    c.send_op(op::HEARTBEAT, Bytes::new()).await.unwrap();
    assert!(disconnected(&mut c).await.said("op 7"));

    let mut ws = h.open(Transport::WsBinary).await;
    ws.send_op(op::HEARTBEAT, Bytes::new()).await.unwrap();
    assert_eq!(disconnected(&mut ws).await.code, Some(1008));
    // Both counted as auth failures `not_auth`, not as rejected frames.
    assert_eq!(
        h.rejections().await,
        [(
            r#"rim_comet_auth_failures_total{reason="not_auth"}"#.into(),
            2
        )]
    );
}

#[tokio::test]
async fn bad_auth_body_and_refusal() {
    let h = start(|_| {}).await;
    let mut c = h.open(Transport::Tcp).await;
    c.send_op(op::AUTH, Bytes::from_static(b"{not json"))
        .await
        .unwrap();
    let closed = disconnected(&mut c).await;
    assert!(closed.why().starts_with("bad auth body: "), "{closed:?}");

    let deny = AuthBody {
        mid: 1,
        token: "deny".into(),
        ..AuthBody::default()
    };
    match Conn::connect(Transport::Tcp, h.tcp, &deny).await {
        Err(ClientError::AuthRefused(closed)) => {
            assert!(closed.said("unauthorized"), "{closed:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let m = h.http_get("/metrics").await;
    assert!(
        m.contains(r#"rim_comet_auth_failures_total{reason="bad_body"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"rim_comet_auth_failures_total{reason="refused"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn malformed_frames_close_with_1002_and_1009() {
    let h = start(|c| c.session.max_body = 128).await;
    let mut ws = h.open(Transport::WsBinary).await;
    // An Auth frame whose header claims a headerLen of 12 instead of 16.
    ws.send_raw(raw_frame(18, 12, op::AUTH, b"{}"))
        .await
        .unwrap();
    let closed = ws.expect_closed().await.unwrap();
    assert_eq!(closed.code, Some(1002));
    assert!(closed.reason.contains("headerLen"), "{closed:?}");

    let mut ws = h.open(Transport::WsBinary).await;
    ws.send_op(op::AUTH, vec![b' '; 129]).await.unwrap();
    assert_eq!(ws.expect_closed().await.unwrap().code, Some(1009));

    // TCP: op 6 with the reason, then the close.
    let mut c = h.open(Transport::Tcp).await;
    c.send_op(op::AUTH, vec![b' '; 129]).await.unwrap();
    assert!(disconnected(&mut c).await.said("exceeds"));

    // Other clients are still served.
    let _ok = h.tcp_session("still", "", &[]).await;
    // Each counted under its own reason (frame errors before Auth are not auth failures).
    assert_eq!(
        h.rejections().await,
        [
            (
                r#"rim_comet_frames_rejected_total{reason="malformed"}"#.into(),
                1
            ),
            (
                r#"rim_comet_frames_rejected_total{reason="too_big"}"#.into(),
                2
            ),
        ]
    );
}

#[tokio::test]
async fn auth_timeout_closes() {
    let h = start(|c| c.session.handshake_timeout_ms = 150).await;
    let mut c = h.open(Transport::Tcp).await;
    assert_eq!(disconnected(&mut c).await.why(), "auth timeout");
    let mut ws = h.open(Transport::WsBinary).await;
    let closed = ws.expect_closed().await.unwrap();
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (Some(1008), "auth timeout")
    );
}

#[tokio::test]
async fn heartbeat_silence_closes_and_unregisters() {
    let mut h = start_with(1, |c| c.session.heartbeat_misses = 1).await;
    let mut c = h.tcp_session("quiet", "", &[]).await;
    assert_eq!(disconnected(&mut c).await.why(), "heartbeat timeout");
    h.expect_event("disconnect quiet").await;
}

#[tokio::test]
async fn same_key_replaces_and_kick_closes() {
    let mut h = start(|_| {}).await;
    let mut old = h.tcp_session("dup", "", &[1000]).await;
    let old_since = h.since("dup");
    let mut new = h.tcp_session("dup", "", &[1000]).await;
    let new_since = h.since("dup");
    assert_ne!(old_since, new_since);
    assert_eq!(disconnected(&mut old).await.why(), "replaced");
    let r = h
        .push(1000, "to new", DeliverTarget::Keys(vec!["dup".into()]))
        .await;
    assert_eq!(r.queued, 1);
    assert_eq!(&new.recv_any().await.unwrap().frame.body[..], b"to new");

    // A kick naming the replaced session leaves its successor alone.
    let r = h.push(1000, "", h.kick("dup", old_since)).await;
    assert_eq!(r.missing, 1);
    assert!(new.pushes_before_heartbeat().await.unwrap().is_empty());

    let r = h.push(1000, "", h.kick("dup", new_since)).await;
    assert_eq!(r.missing, 0);
    assert_eq!(disconnected(&mut new).await.why(), "replaced");
    h.expect_event("disconnect dup").await;
}

#[tokio::test]
async fn a_late_kick_spares_a_session_that_reconnected_here() {
    let mut h = start(|_| {}).await;
    // A (since X) is replaced by a session on another comet: the kick {K, X} closes it.
    let mut a = h.tcp_session("k", "", &[1000]).await;
    let x = h.since("k");
    let r = h.push(1000, "", h.kick("k", x)).await;
    assert_eq!(r.missing, 0);
    assert_eq!(disconnected(&mut a).await.why(), "replaced");
    h.expect_event("disconnect k").await;

    // The client comes back here (since Y); the same kick, replayed late, is ignored.
    let mut b = h.tcp_session("k", "", &[1000]).await;
    let y = h.since("k");
    assert_ne!(x, y);
    let r = h.push(1000, "", h.kick("k", x)).await;
    assert_eq!(r.missing, 1);
    let r = h
        .push(1000, "still here", DeliverTarget::Keys(vec!["k".into()]))
        .await;
    assert_eq!(r.queued, 1);
    assert_eq!(&b.recv_any().await.unwrap().frame.body[..], b"still here");
    assert!(b.pushes_before_heartbeat().await.unwrap().is_empty());
    // A kick for a key nobody here holds is reported missing, like any push to it.
    let r = h.push(1000, "", h.kick("nobody", x)).await;
    assert_eq!((r.missing, r.queued), (1, 0), "{r:?}");
}

#[tokio::test]
async fn a_paced_broadcast_and_a_later_unpaced_one_both_reach_everyone() {
    let h = start(|c| c.bucket.count = 4).await;
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(h.tcp_session(&format!("p{i}"), "", &[1000]).await);
    }
    // Same partition, the paced one first: 4 sessions at 20/s take ~200 ms to walk, and the
    // unpaced one is delivered at once meanwhile.
    let paced = Delivery {
        id: PushId {
            partition: 3,
            ms: 10,
            seq: 1,
        },
        op: 1000,
        body: Bytes::from_static(b"paced"),
        target: DeliverTarget::All { speed: 20 },
        exclude: None,
        recorded: false,
    };
    let now = Delivery {
        id: PushId {
            partition: 3,
            ms: 10,
            seq: 2,
        },
        body: Bytes::from_static(b"now"),
        target: DeliverTarget::All { speed: 0 },
        ..paced.clone()
    };
    h.deliver(vec![paced.clone()]).await;
    let r = h.deliver(vec![now]).await;
    assert_eq!(r.queued, 4);
    for c in &mut clients {
        let mut got = vec![
            c.recv_any().await.unwrap().frame.body,
            c.recv_any().await.unwrap().frame.body,
        ];
        got.sort();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"now"), Bytes::from_static(b"paced")]
        );
    }
    // A replay of the paced broadcast is suppressed by its own marks. Paced broadcasts are walked
    // one at a time in order, so once a later one (fast) has reached a client, the replay's walk
    // is over: nothing else may have come before it.
    h.deliver(vec![paced.clone()]).await;
    let marker = Delivery {
        id: PushId { seq: 3, ..paced.id },
        body: Bytes::from_static(b"marker"),
        target: DeliverTarget::All { speed: 10_000 },
        ..paced
    };
    h.deliver(vec![marker]).await;
    for c in &mut clients {
        assert_eq!(&c.recv_any().await.unwrap().frame.body[..], b"marker");
        assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    }
    let m = h.http_get("/metrics").await;
    assert!(m.contains("rim_comet_push_duplicates_total 4"), "{m}");
}

// That any client frame renews the session at logic, at most once per heartbeat interval, is
// a paused-clock unit test: driver::tests::any_frame_renews_the_session_at_most_once_per_heartbeat_interval.

#[tokio::test]
async fn room_changes_and_subs_are_rate_limited_and_op_lists_capped() {
    let mut h = start(|c| {
        c.session.send_rate_per_sec = 1;
        c.session.send_burst = 3;
    })
    .await;
    let mut c = h.tcp_session("rl", "", &[1000]).await;
    let many: Vec<String> = (2000..2300).map(|o| o.to_string()).collect();
    let f = request(&mut c, op::SUB, 1, many.join(",")).await.frame;
    assert_eq!((f.op, f.seq), (op::SUB_REPLY, 1));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&f.body).unwrap()["error"],
        "too many ops: at most 256"
    );
    let f = request(&mut c, op::CHANGE_ROOM, 2, "live://9").await.frame;
    assert_eq!(f.op, op::CHANGE_ROOM_REPLY);
    h.expect_event("room_changed rl - live://9").await;
    let f = request(&mut c, op::UNSUB, 3, "1000").await.frame;
    assert_eq!((f.op, &f.body[..]), (op::UNSUB_REPLY, &b"1000"[..]));
    // Burst of 3 used up: the next ChangeRoom and Sub are refused, the session stays.
    for (o, reply_op) in [
        (op::CHANGE_ROOM, op::CHANGE_ROOM_REPLY),
        (op::SUB, op::SUB_REPLY),
    ] {
        let f = request(&mut c, o, 4, "live://8").await.frame;
        assert_eq!((f.op, f.seq), (reply_op, 4));
        assert_eq!(&f.body[..], br#"{"error":"rate limited"}"#);
    }
    // The heartbeat is over the rate too: still answered, and counted.
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    let m = h.http_get("/metrics").await;
    assert!(m.contains("rim_comet_requests_rate_limited_total 3"), "{m}");
}

#[tokio::test]
async fn first_joins_of_different_rooms_do_not_wait_for_each_other() {
    let mut h = start(|_| {}).await;
    let addr = h.tcp;
    let join_slow = |key: &'static str| {
        tokio::spawn(async move {
            Conn::connect(Transport::Tcp, addr, &auth(7, key, "slow://1", &[1000])).await
        })
    };
    // The announcement of slow://1 is held at logic until the test opens the gate.
    let mut slow = join_slow("s1");
    h.expect_event("room_joining slow://1").await;
    // A first join of another room completes meanwhile (Conn::connect succeeds only on op 8).
    let _fast = h.tcp_session("f1", "live://5", &[1000]).await;
    h.expect_event("room_joined live://5").await;
    // No AuthReply before its room was announced: while the gate is closed the join does not
    // complete (a comet that answers before the announcement completes at once).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut slow)
            .await
            .is_err(),
        "an AuthReply before its room was announced"
    );
    // Another joiner of the slow room waits for its announcement: both are members afterwards.
    let second = join_slow("s2");
    h.expect_event("connect s2").await;
    h.slow_gate.send_replace(true);
    let mut first = slow.await.unwrap().unwrap();
    let mut second = second.await.unwrap().unwrap();
    h.expect_event("room_joined slow://1").await;
    let r = h
        .push(
            1000,
            "r",
            DeliverTarget::Room(RoomId::parse("slow://1").unwrap()),
        )
        .await;
    assert_eq!(r.queued, 2);
    assert_eq!(&first.recv_any().await.unwrap().frame.body[..], b"r");
    assert_eq!(&second.recv_any().await.unwrap().frame.body[..], b"r");
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_counted() {
    let mut h = start(|c| c.session.outbound_queue = 2).await;
    let mut c = h.tcp_session("slow", "", &[1000]).await;
    // One batch of many pushes: the queue of 2 overflows before the writer can drain it.
    let body = "x".repeat(1000);
    let items = (0..50)
        .map(|_| Delivery {
            id: h.push_id(),
            op: 1000,
            body: Bytes::from(body.clone()),
            target: DeliverTarget::Keys(vec!["slow".into()]),
            exclude: None,
            recorded: false,
        })
        .collect();
    let r = h.deliver(items).await;
    assert_eq!(r.slow_closed, 1, "{r:?}");
    // The client, reading now, sees op 6 "slow consumer" (queued pushes are not flushed first).
    let closed = c.expect_closed().await.unwrap();
    assert_eq!(
        closed.disconnect_reason.as_deref(),
        Some("slow consumer"),
        "{closed:?}"
    );
    let m = h.http_get("/metrics").await;
    assert!(m.contains("rim_comet_slow_consumer_closed_total 1"), "{m}");
}

#[tokio::test]
async fn readyz_advertises_and_shutdown_drains() {
    let mut h = start(|_| {}).await;
    assert!(h.http_get("/readyz").await.starts_with("HTTP/1.1 200"));
    {
        let renews = h.renews.lock();
        let node = &renews[0].0;
        assert_eq!(node.server, "comet-test");
        assert_eq!(node.tcp_addr, h.tcp.to_string());
        assert_eq!(node.ws_addr, h.http.to_string());
    }
    let mut c = h.tcp_session("bye", "", &[]).await;
    let mut ws = h.session(Transport::WsBinary, 1, "bye-ws", "", &[]).await;
    h.shutdown.cancel();
    assert_eq!(disconnected(&mut c).await.why(), "server shutting down");
    assert_eq!(disconnected(&mut ws).await.code, Some(1001));
    h.expect_event("unregister comet-test").await;
    tokio::time::timeout(WAIT, &mut h.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
