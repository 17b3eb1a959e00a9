//! End-to-end tests of upstream messages (op 4 SendMsg), sender exclusion, system pushes, room
//! runs and room membership changes, against the fake logic of `common`.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use rim_client::{Conn, Received, Transport};
use rim_proto::frame::Frame;
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::{DeliverTarget, Delivery, SendTarget, SessionRef};
use std::time::Duration;

/// Sends SendMsg (op 4); returns the body of the next frame, which must be its op 5.
async fn send_msg(c: &mut Conn, seq: i32, body: &str) -> serde_json::Value {
    let r = request(c, op::SEND_MSG, seq, body.to_string()).await;
    assert_eq!(
        (r.frame.op, r.frame.seq),
        (op::SEND_MSG_REPLY, seq),
        "{r:?}"
    );
    serde_json::from_slice(&r.frame.body).unwrap()
}

/// The frames of exactly one transport message (one WebSocket message: an op 9 batch unpacked,
/// or a JSON array split).
async fn one_message(c: &mut Conn) -> Vec<Received> {
    let before = c.messages_received;
    let frames = tokio::time::timeout(c.wait, c.read_message())
        .await
        .expect("no message")
        .unwrap();
    assert_eq!(c.messages_received, before + 1, "{frames:?}");
    frames
}

impl Harness {
    fn room_item(&mut self, room: &RoomId, op: i32, body: &str) -> Delivery {
        Delivery {
            id: self.push_id(),
            op,
            body: Bytes::from(body.to_string()),
            target: DeliverTarget::Room(room.clone()),
            exclude: None,
            recorded: false,
        }
    }
}

#[tokio::test]
async fn send_msg_is_forwarded_with_the_session_identity_not_the_body_claims() {
    let h = start(|_| {}).await;
    let mut c = h.tcp_session("snd", "live://5", &[1000]).await;
    let r = send_msg(
        &mut c,
        21,
        r#"{"room":"live://5","op":1000,"data":{"t":"hi"},"from":999,"mid_from":1234,"key":"evil"}"#,
    )
    .await;
    assert_eq!(r["code"], 0, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("msg-"), "{r}");
    assert!(r.get("message").is_none(), "{r}");
    {
        let sends = h.sends.lock();
        assert_eq!(sends.len(), 1);
        let req = &sends[0];
        assert_eq!(
            req.sender,
            SessionRef {
                server: "comet-test".into(),
                mid: 7,
                key: "snd".into()
            }
        );
        assert_eq!(req.sender_room, Some(RoomId::parse("live://5").unwrap()));
        assert_eq!(
            req.target,
            SendTarget::Room(RoomId::parse("live://5").unwrap())
        );
        assert_eq!(req.op, 1000);
        assert_eq!(req.data_json, r#"{"t":"hi"}"#);
    }

    // JSON mode, to a mid, from a session without a room.
    let mut ws = h.session(Transport::WsJson, 42, "jsnd", "", &[1000]).await;
    let r = send_msg(&mut ws, 3, r#"{"mid":2,"op":1001,"data":"x","from":1}"#).await;
    assert_eq!(r["code"], 0, "{r}");
    let sends = h.sends.lock();
    let req = &sends[1];
    assert_eq!((req.sender.mid, req.sender.key.as_str()), (42, "jsnd"));
    assert_eq!(req.sender_room, None);
    assert_eq!(req.target, SendTarget::Mid(2));
    assert_eq!((req.op, req.data_json.as_str()), (1001, r#""x""#));
}

#[tokio::test]
async fn send_msg_validation_errors_answer_400_and_keep_the_session() {
    let h = start(|_| {}).await;
    let mut c = h.tcp_session("val", "live://5", &[1000]).await;
    let cases = [
        ("not json", "not JSON"),
        (r#"{"op":1000,"data":1}"#, "exactly one of room and mid"),
        (r#"{"room":"live://5","mid":3,"op":1000}"#, "not both"),
        (r#"{"room":"live:/5","op":1000}"#, "bad room id"),
        (r#"{"mid":3,"op":999}"#, "op must be >= 1000"),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let r = send_msg(&mut c, 30 + i as i32, body).await;
        assert_eq!(r["code"], -400, "{body}: {r}");
        let msg = r["message"].as_str().unwrap();
        assert!(msg.contains(want), "{body}: {msg}");
        assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    }
    assert!(h.sends.lock().is_empty(), "nothing invalid reached logic");
    let m = h.http_get("/metrics").await;
    assert!(
        m.contains(r#"rim_comet_upstream_refused_total{code="-400"} 5"#),
        "{m}"
    );
}

#[tokio::test]
async fn send_msg_logic_errors_map_to_their_codes() {
    // A short deadline so the fake's never-answering case reads as logic unavailable.
    let h = start(|c| c.logic.rpc_timeout_ms = 500).await;
    let mut c = h.tcp_session("err", "", &[1000]).await;
    for (seq, mid, code, want) in [
        (1, 403, -403, "forbidden: not allowed"),
        (2, 404, -404, "offline: mid 404"),
        (3, 503, -503, "logic unavailable"),
    ] {
        let r = send_msg(&mut c, seq, &format!(r#"{{"mid":{mid},"op":1000}}"#)).await;
        assert_eq!(r["code"], code, "{r}");
        assert_eq!(r["message"], want, "{r}");
    }
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    assert_eq!(
        send_msg(&mut c, 10, r#"{"mid":5,"op":1000}"#).await["code"],
        0
    );
    let m = h.http_get("/metrics").await;
    for line in [
        r#"rim_comet_upstream_refused_total{code="-403"} 1"#,
        r#"rim_comet_upstream_refused_total{code="-404"} 1"#,
        r#"rim_comet_upstream_refused_total{code="-503"} 1"#,
        "rim_comet_upstream_sent_total 1",
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }
}

#[tokio::test]
async fn send_msg_over_the_rate_limit_gets_429() {
    let h = start(|c| {
        c.session.send_rate_per_sec = 1;
        c.session.send_burst = 2;
    })
    .await;
    let mut c = h.tcp_session("fast", "", &[1000]).await;
    let mut codes = Vec::new();
    for seq in 1..=3 {
        let r = send_msg(&mut c, seq, r#"{"mid":5,"op":1000}"#).await;
        if r["code"] == -429 {
            assert!(
                r["message"].as_str().unwrap().starts_with("rate limited: "),
                "{r}"
            );
        }
        codes.push(r["code"].as_i64().unwrap());
    }
    assert_eq!(codes, vec![0, 0, -429]);
    assert_eq!(
        h.sends.lock().len(),
        2,
        "the limited one never reached logic"
    );
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    let m = h.http_get("/metrics").await;
    assert!(
        m.contains(r#"rim_comet_upstream_refused_total{code="-429"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn exclude_skips_the_sender_without_counting_it() {
    let mut h = start(|_| {}).await;
    let mut s1 = h.tcp_session("s1", "live://7", &[1000]).await;
    let mut s2 = h.tcp_session("s2", "live://7", &[1000]).await;
    let room = RoomId::parse("live://7").unwrap();
    let mut item = h.room_item(&room, 1000, "from s1");
    item.exclude = Some("s1".into());
    let r = h.deliver(vec![item]).await;
    assert_eq!((r.queued, r.missing, r.duplicates), (1, 0, 0), "{r:?}");
    assert_eq!(&s2.recv_any().await.unwrap().frame.body[..], b"from s1");

    // Keys target too (a mid push to the sender's own sessions).
    let id = h.push_id();
    let r = h
        .deliver(vec![Delivery {
            id,
            op: 1000,
            body: Bytes::from_static(b"direct"),
            target: DeliverTarget::Keys(vec!["s1".into(), "s2".into()]),
            exclude: Some("s1".into()),
            recorded: false,
        }])
        .await;
    assert_eq!((r.queued, r.missing, r.duplicates), (1, 0, 0), "{r:?}");
    assert_eq!(&s2.recv_any().await.unwrap().frame.body[..], b"direct");
    // s1 got nothing: the next thing it reads is its heartbeat reply.
    assert!(s1.pushes_before_heartbeat().await.unwrap().is_empty());
}

#[tokio::test]
async fn system_pushes_bypass_the_op_filter_but_not_dedupe() {
    let mut h = start(|_| {}).await;
    let mut c = h.tcp_session("sys", "live://8", &[1000]).await;
    let room = RoomId::parse("live://8").unwrap();
    let ev = h.room_item(
        &room,
        op::ROOM_EVENT,
        r#"{"event":"join","mid":9,"room":"live://8"}"#,
    );
    let r = h.deliver(vec![ev.clone()]).await;
    assert_eq!(r.queued, 1, "{r:?}");
    assert_eq!(c.recv_any().await.unwrap().frame.op, op::ROOM_EVENT);
    let r = h.deliver(vec![ev]).await;
    assert_eq!((r.queued, r.duplicates), (0, 1), "{r:?}");
    let r = h.push(1001, "app", DeliverTarget::Room(room)).await;
    assert_eq!(r.queued, 0, "ordinary ops still filtered");
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_room_run_reaches_each_member_as_one_message() {
    let mut h = start(|_| {}).await;
    let room_s = "live://run";
    let room = RoomId::parse(room_s).unwrap();

    let mut wb = h
        .session(Transport::WsBinary, 1, "wb", room_s, &[1000, 1001])
        .await;
    // Accepts only 1000: gets its subset.
    let mut wp = h
        .session(Transport::WsBinary, 2, "wp", room_s, &[1000])
        .await;
    let mut wj = h
        .session(Transport::WsJson, 3, "wj", room_s, &[1000, 1001])
        .await;
    let mut tc = h.tcp_session("wt", room_s, &[1000, 1001]).await;

    let ops = [1000, 1001, 1000, 1001, 1000];
    let items: Vec<Delivery> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| h.room_item(&room, *op, &format!("m{i}")))
        .collect();
    let r = h.deliver(items).await;
    assert_eq!(r.queued, 5 * 3 + 3, "{r:?}");

    let unwrapped = |frames: Vec<Received>| -> Vec<(i32, String)> {
        frames
            .iter()
            .map(|r| {
                assert!(r.in_raw, "inside op 9: {r:?}");
                (r.frame.op, body_text(r))
            })
            .collect()
    };
    let all: Vec<(i32, String)> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| (*op, format!("m{i}")))
        .collect();
    // WebSocket binary: exactly one message holding all five, in order...
    assert_eq!(unwrapped(one_message(&mut wb).await), all);
    // ...and nothing else before the heartbeat reply.
    assert!(wb.pushes_before_heartbeat().await.unwrap().is_empty());

    // Partial member: one message with just its ops, in order.
    assert_eq!(
        unwrapped(one_message(&mut wp).await),
        vec![
            (1000, "m0".to_string()),
            (1000, "m2".to_string()),
            (1000, "m4".to_string())
        ]
    );
    assert!(wp.pushes_before_heartbeat().await.unwrap().is_empty());

    // JSON: one array of five.
    let got: Vec<(i32, String)> = one_message(&mut wj)
        .await
        .iter()
        .map(|r| {
            let body = r.json_body.as_ref().and_then(|b| b.as_str());
            (r.frame.op, body.unwrap().to_string())
        })
        .collect();
    assert_eq!(got, all);
    assert!(wj.pushes_before_heartbeat().await.unwrap().is_empty());

    // TCP: five plain frames.
    let mut tcp_got = Vec::new();
    for _ in 0..5 {
        let f = tc.recv_any().await.unwrap();
        tcp_got.push((f.frame.op, body_text(&f)));
    }
    assert_eq!(tcp_got, all);

    // Order across runs and other targets: room, room, key, room.
    let mut items = vec![
        h.room_item(&room, 1000, "n0"),
        h.room_item(&room, 1000, "n1"),
    ];
    let id = h.push_id();
    items.push(Delivery {
        id,
        op: 1000,
        body: Bytes::from_static(b"n2"),
        target: DeliverTarget::Keys(vec!["wt".into()]),
        exclude: None,
        recorded: false,
    });
    items.push(h.room_item(&room, 1000, "n3"));
    h.deliver(items).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(body_text(&tc.recv_any().await.unwrap()));
    }
    assert_eq!(got, vec!["n0", "n1", "n2", "n3"]);
}

/// Sends ChangeRoom (op 12) to `body` for session `gated-mv`. `call` is the `room_changed` logic
/// must get ("from to"), or `None` for none: the fake holds that call, and op 13 must not come
/// while it is held (300 ms), only after it is answered. Returns the `room_changed` calls logic
/// had answered by the time op 13 arrived.
async fn change_room(
    h: &mut Harness,
    c: &mut Conn,
    seq: i32,
    body: &'static [u8],
    call: Option<&str>,
) -> Vec<String> {
    c.send_frame(Frame::new(op::CHANGE_ROOM, seq, Bytes::from_static(body)))
        .await
        .unwrap();
    if let Some(call) = call {
        h.expect_event(&format!("room_changing gated-mv {call}"))
            .await;
        if let Some(r) = quiet_for(c, Duration::from_millis(300)).await {
            panic!("a reply before logic answered room_changed: {r:?}");
        }
        h.changed_gate.add_permits(1);
    }
    let r = c.recv_any().await.unwrap().frame;
    assert_eq!(
        (r.op, r.seq, &r.body[..]),
        (op::CHANGE_ROOM_REPLY, seq, body)
    );
    h.events_now()
        .into_iter()
        .filter(|e| e.starts_with("room_changed"))
        .collect()
}

#[tokio::test]
async fn change_room_reports_the_move_to_logic_before_replying() {
    let mut h = start(|_| {}).await;
    // Auth with a room: logic learns it through connect, not room_changed.
    let mut c = h.tcp_session("gated-mv", "chat://1", &[1000]).await;
    h.expect_event("room_joined chat://1").await;

    assert_eq!(
        change_room(&mut h, &mut c, 1, b"chat://2", Some("chat://1 chat://2")).await,
        vec!["room_changed gated-mv chat://1 chat://2"]
    );
    assert!(
        change_room(&mut h, &mut c, 2, b"chat://2", None)
            .await
            .is_empty(),
        "same room: no call"
    );
    assert_eq!(
        change_room(&mut h, &mut c, 3, b"", Some("chat://2 -")).await,
        vec!["room_changed gated-mv chat://2 -"]
    );
    assert!(
        change_room(&mut h, &mut c, 4, b"", None).await.is_empty(),
        "no room to leave"
    );
    assert_eq!(
        change_room(&mut h, &mut c, 5, b"chat://3", Some("- chat://3")).await,
        vec!["room_changed gated-mv - chat://3"]
    );
    // Nothing else shows up by the time the session is gone (logic's exact calls, late ones
    // included, are checked in client_op::tests::change_room_tells_logic_and_moves_the_membership).
    drop(c);
    h.expect_event("disconnect gated-mv").await;
    assert!(
        !h.events_now().iter().any(|e| e.starts_with("room_chang")),
        "no extra room_changed"
    );
}

#[tokio::test]
async fn a_disconnect_lost_to_a_logic_blip_is_retried() {
    let mut h = start(|c| c.logic.rpc_timeout_ms = 200).await;
    let c = h.tcp_session("hang-once-k", "", &[1000]).await;
    drop(c);
    // The first disconnect call hangs past its deadline; the retry lands.
    h.expect_event("disconnect hang-once-k").await;
}

/// A room run is one queue item per member, whatever its length: a run of five reaches a member
/// whose outbound queue holds two, as one message, without closing it as a slow consumer
/// (deliver.rs groups consecutive pushes to one room; one item per push would overflow).
#[tokio::test]
async fn a_room_run_takes_one_slot_of_a_members_queue() {
    let mut h = start(|c| c.session.outbound_queue = 2).await;
    let room_s = "live://run";
    let room = RoomId::parse(room_s).unwrap();
    let mut ws = h
        .session(Transport::WsBinary, 1, "member", room_s, &[1000])
        .await;
    let items: Vec<Delivery> = (0..5)
        .map(|i| h.room_item(&room, 1000, &format!("m{i}")))
        .collect();
    let r = h.deliver(items).await;
    assert_eq!((r.queued, r.slow_closed), (5, 0), "{r:?}");
    let got: Vec<String> = one_message(&mut ws).await.iter().map(body_text).collect();
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
    assert!(ws.pushes_before_heartbeat().await.unwrap().is_empty());
}
