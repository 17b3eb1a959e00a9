//! Unit tests of [`super`]: requests against an in-memory logic under a paused clock.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::testing::{WAIT, authed};

fn room(r: &str) -> RoomId {
    RoomId::parse(r).unwrap()
}

fn one_per_second_burst_two(c: &mut crate::config::Config) {
    c.session.send_rate_per_sec = 1;
    c.session.send_burst = 2;
}

/// ChangeRoom moves the membership, tells logic, and replies only once logic answered; a
/// change to the same room, or out of no room, tells logic nothing.
#[tokio::test(start_paused = true)]
async fn change_room_tells_logic_and_moves_the_membership() {
    let (logic, ctx, mut c) = authed(30, |_| {}, "mv", "chat://1").await;
    assert_eq!(ctx.buckets.room_len(&room("chat://1")), 1);

    logic.hold("room_changed");
    c.send(op::CHANGE_ROOM, 2, "chat://2");
    logic.called("room_changed mv chat://1 chat://2").await;
    // Moved on this comet already, but no reply while logic has not answered.
    assert_eq!(ctx.buckets.room_len(&room("chat://1")), 0);
    assert_eq!(ctx.buckets.room_len(&room("chat://2")), 1);
    assert_eq!(
        ctx.buckets.get("mv").unwrap().room(),
        Some(room("chat://2"))
    );
    assert!(c.next_item(Duration::from_secs(10)).await.is_none());
    logic.release();
    let r = c.reply().await;
    assert_eq!(
        (r.op, r.seq, &r.body[..]),
        (op::CHANGE_ROOM_REPLY, 2, &b"chat://2"[..])
    );

    // Same room: answered, logic not called.
    let r = c.request(op::CHANGE_ROOM, 3, "chat://2").await;
    assert_eq!(&r.body[..], b"chat://2");
    // Out of the room, then again out of no room.
    let r = c.request(op::CHANGE_ROOM, 4, Bytes::new()).await;
    assert_eq!((r.op, &r.body[..]), (op::CHANGE_ROOM_REPLY, &b""[..]));
    assert_eq!(ctx.buckets.room_len(&room("chat://2")), 0);
    c.request(op::CHANGE_ROOM, 5, " ").await;
    // A bad room id: refused, the session stays where it is.
    let r = c.request(op::CHANGE_ROOM, 6, "nope").await;
    assert!(
        String::from_utf8_lossy(&r.body).contains("bad room id"),
        "{r:?}"
    );

    c.hang_up();
    c.task.await.unwrap();
    ctx.tracker.close();
    ctx.tracker.wait().await;
    assert_eq!(
        logic.calls(),
        vec![
            "connect mv",
            "room_joined chat://1",
            "room_joined chat://2",
            "room_changed mv chat://1 chat://2",
            "room_changed mv chat://2 -",
            "disconnect mv",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>(),
        "one room_changed per change, nothing late"
    );
}

/// op 4 past the token bucket (1/s, burst 2) is refused with -429 without reaching logic;
/// a token later (1 s on the paused clock) it goes through again.
#[tokio::test(start_paused = true)]
async fn upstream_messages_past_the_token_bucket_are_refused() {
    let (logic, ctx, mut c) = authed(30, one_per_second_burst_two, "fast", "").await;
    let mut send = async |seq: i32| {
        let r = c.request(op::SEND_MSG, seq, r#"{"mid":5,"op":1000}"#).await;
        assert_eq!(r.op, op::SEND_MSG_REPLY);
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
    };
    assert_eq!(send(1).await["code"], 0);
    assert_eq!(send(2).await["code"], 0);
    let refused = send(3).await;
    assert_eq!(refused["code"], upstream::RATE_LIMITED);
    assert_eq!(
        refused["message"],
        "rate limited: at most 1 messages per second (burst 2), retry in 1000 ms"
    );
    assert_eq!(
        logic.sends().len(),
        2,
        "the refused one never reached logic"
    );
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(send(4).await["code"], upstream::RATE_LIMITED);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(send(5).await["code"], 0);
    assert_eq!(logic.sends().len(), 3);
    assert_eq!(ctx.metrics.upstream_sent.get(), 3);
    assert!(
        ctx.metrics
            .render()
            .contains(r#"rim_comet_upstream_refused_total{code="-429"} 2"#)
    );
}

/// ChangeRoom, Sub and Unsub share the session's token bucket; refusals keep the session.
#[tokio::test(start_paused = true)]
async fn room_changes_and_subs_share_the_rate_limit() {
    let (logic, ctx, mut c) = authed(30, one_per_second_burst_two, "rl", "").await;
    assert_eq!(&c.request(op::SUB, 1, "1001").await.body[..], b"1001");
    // A bad argument costs a token too.
    let r = c.request(op::CHANGE_ROOM, 2, "nope").await;
    assert!(String::from_utf8_lossy(&r.body).contains("bad room id"));
    for (o, reply) in [
        (op::CHANGE_ROOM, op::CHANGE_ROOM_REPLY),
        (op::UNSUB, op::UNSUB_REPLY),
    ] {
        let r = c.request(o, 3, "nope").await;
        assert_eq!(
            (r.op, &r.body[..]),
            (reply, &br#"{"error":"rate limited"}"#[..])
        );
    }
    assert_eq!(ctx.metrics.requests_rate_limited.get(), 2);
    assert!(ctx.buckets.get("rl").unwrap().accepts(1001));
    assert!(logic.calls_of("room_changed").is_empty());
}

#[test]
fn frames_parse_into_requests_with_their_arguments() {
    let f = |op: i32, body: &'static str| ClientOp::parse(Frame::new(op, 9, body));
    assert!(matches!(
        f(op::HEARTBEAT, ""),
        ClientOp::Heartbeat { seq: 9 }
    ));
    assert!(matches!(
        f(op::CHANGE_ROOM, " live://1 "),
        ClientOp::ChangeRoom { to: Ok(Some(r)), .. } if r == room("live://1")
    ));
    assert!(matches!(
        f(op::CHANGE_ROOM, ""),
        ClientOp::ChangeRoom { to: Ok(None), .. }
    ));
    assert!(matches!(
        f(op::CHANGE_ROOM, "x"),
        ClientOp::ChangeRoom { to: Err(e), .. } if e.starts_with("bad room id")
    ));
    assert!(matches!(
        f(op::SUB, "1000, 1001"),
        ClientOp::Sub { ops: Ok(o), .. } if o == vec![1000, 1001]
    ));
    assert!(matches!(
        f(op::UNSUB, "a"),
        ClientOp::Unsub { ops: Err(e), .. } if e.starts_with("bad op list")
    ));
    let many = (0..=MAX_ACCEPTS)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    assert!(matches!(
        ClientOp::parse(Frame::new(op::SUB, 1, many)),
        ClientOp::Sub { ops: Err(e), .. } if e == "too many ops: at most 256"
    ));
    assert!(matches!(
        f(op::SEND_MSG, "{}"),
        ClientOp::SendMsg {
            seq: 9,
            msg: Err(_)
        }
    ));
    assert!(matches!(
        f(op::AUTH, "{}"),
        ClientOp::Unknown { op: op::AUTH }
    ));
}

/// Heartbeats cost a token: past the rate (1/s, burst 2) they are still answered but
/// counted, and the MAX_STRIKES-th one before the bucket refills closes the session as "too
/// many frames" (WebSocket 1008).
#[tokio::test(start_paused = true)]
async fn a_heartbeat_flood_closes_the_session() {
    let (logic, ctx, mut c) = authed(30, one_per_second_burst_two, "hb", "").await;
    for seq in 2..2 + 2 + i32::from(MAX_STRIKES) {
        c.send(op::HEARTBEAT, seq, Bytes::new());
    }
    let spec = c.closed(WAIT).await.expect("closed");
    assert_eq!(spec, CloseSpec::policy("too many frames"));
    let answered: Vec<i32> = (2..1 + 2 + i32::from(MAX_STRIKES)).collect();
    assert_eq!(
        c.pending_reply_seqs(),
        answered,
        "all but the one that closed"
    );
    assert_eq!(
        ctx.metrics.requests_rate_limited.get(),
        u64::from(MAX_STRIKES)
    );
    assert_eq!(ctx.metrics.limit_refused[3].get(), 1, "limit=frame_rate");
    logic.called("disconnect hb").await;
}

/// Unknown ops cost a token like heartbeats and count as strikes too.
#[tokio::test(start_paused = true)]
async fn unknown_ops_count_against_the_rate() {
    let (_logic, ctx, mut c) = authed(30, one_per_second_burst_two, "uk", "").await;
    c.send(99, 2, Bytes::new());
    c.send(op::AUTH, 3, Bytes::new());
    c.send(op::HEARTBEAT, 4, Bytes::new());
    for seq in 5..5 + i32::from(MAX_STRIKES) - 1 {
        c.send(99, seq, Bytes::new());
    }
    let spec = c.closed(WAIT).await.expect("closed");
    assert_eq!(spec, CloseSpec::policy("too many frames"));
    assert_eq!(c.pending_reply_seqs(), vec![4], "the heartbeat is answered");
    assert_eq!(ctx.metrics.limit_refused[3].get(), 1);
}

/// Strikes are forgiven once the bucket is full again: a client that briefly went over keeps
/// its session, and one heartbeating like goim (every 30 s) is always answered.
#[tokio::test(start_paused = true)]
async fn heartbeat_strikes_reset_once_the_bucket_refills() {
    let (_logic, ctx, mut c) = authed(30, one_per_second_burst_two, "ok", "").await;
    let below = i32::from(MAX_STRIKES) - 1;
    for seq in 2..4 + below {
        c.send(op::HEARTBEAT, seq, Bytes::new());
    }
    assert!(c.closed(Duration::from_millis(10)).await.is_none());
    assert_eq!(c.pending_reply_seqs(), (2..4 + below).collect::<Vec<_>>());
    for _ in 2..4 + below {
        c.reply().await;
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    // Full again: the strikes are forgiven, another round below the limit keeps the session.
    for seq in 100..102 + below {
        c.send(op::HEARTBEAT, seq, Bytes::new());
    }
    assert!(c.closed(Duration::from_millis(10)).await.is_none());
    assert_eq!(
        c.pending_reply_seqs(),
        (100..102 + below).collect::<Vec<_>>()
    );
    for _ in 100..102 + below {
        c.reply().await;
    }
    for i in 0..10 {
        tokio::time::advance(Duration::from_secs(30)).await;
        let r = c.request(op::HEARTBEAT, 200 + i, Bytes::new()).await;
        assert_eq!(r.op, op::HEARTBEAT_REPLY);
    }
    assert_eq!(ctx.metrics.limit_refused[3].get(), 0);
}

/// A session of mid 7 authenticated with `token` in `room`.
async fn authed_with_token(
    token: &str,
    room: &str,
) -> (
    Arc<crate::testing::MemLogic>,
    Arc<Ctx>,
    crate::testing::Client,
) {
    let logic = crate::testing::MemLogic::new(100);
    let ctx = crate::testing::comet(logic.clone(), |_| {});
    let mut c = crate::testing::connect(&ctx);
    let body = rim_proto::msg::AuthBody {
        token: token.into(),
        ..crate::testing::auth_body("t", room)
    };
    c.auth(&body).await;
    (logic, ctx, c)
}

fn error_of(f: &Frame) -> String {
    let v: serde_json::Value = serde_json::from_slice(&f.body).unwrap();
    v["error"].as_str().unwrap_or_default().to_string()
}

/// `r` is logic's refusal of a guarded room, and logic was asked about `room` exactly once.
fn assert_logic_refused(r: &Frame, logic: &crate::testing::MemLogic, room: &str) {
    assert!(
        error_of(r).contains("room requires a token that names it"),
        "{r:?}"
    );
    assert_eq!(
        logic.calls_of("check_join"),
        vec![format!("check_join t {room}")]
    );
}

/// JoinRoom adds a room besides the session's others and LeaveRoom removes one, each told to
/// logic before the reply; joining a room the session is in, or leaving one it is not in, tells
/// logic nothing; a ChangeRoom afterwards leaves every room but its target.
#[tokio::test(start_paused = true)]
async fn join_and_leave_rooms_besides_the_first() {
    let (logic, ctx, mut c) = authed(30, |c| c.session.send_burst = 100, "mr", "chat://1").await;
    let r = c.request(op::JOIN_ROOM, 2, "chat://2").await;
    assert_eq!((r.op, &r.body[..]), (op::JOIN_ROOM_REPLY, &b"chat://2"[..]));
    c.request(op::JOIN_ROOM, 3, " chat://3 ").await;
    let s = ctx.buckets.get("mr").unwrap();
    assert_eq!(
        s.rooms(),
        vec![room("chat://1"), room("chat://2"), room("chat://3")]
    );
    for r in ["chat://1", "chat://2", "chat://3"] {
        assert_eq!(ctx.buckets.room_len(&room(r)), 1, "{r}");
    }
    assert_eq!(
        logic.calls_of("join_room"),
        vec!["join_room mr chat://2", "join_room mr chat://3"]
    );
    // Rooms it is in already (the Auth room too): answered, nothing changes, logic not told.
    for (seq, r) in [(4, "chat://1"), (5, "chat://2")] {
        assert_eq!(
            &c.request(op::JOIN_ROOM, seq, r).await.body[..],
            r.as_bytes()
        );
    }
    assert_eq!(logic.calls_of("join_room").len(), 2);
    assert_eq!(ctx.buckets.room_len(&room("chat://2")), 1);

    let r = c.request(op::LEAVE_ROOM, 6, "chat://2").await;
    assert_eq!(
        (r.op, &r.body[..]),
        (op::LEAVE_ROOM_REPLY, &b"chat://2"[..])
    );
    assert_eq!(ctx.buckets.room_len(&room("chat://2")), 0);
    assert_eq!(s.rooms(), vec![room("chat://1"), room("chat://3")]);
    c.request(op::LEAVE_ROOM, 7, "chat://2").await;
    assert_eq!(logic.calls_of("leave_room"), vec!["leave_room mr chat://2"]);
    let r = c.request(op::JOIN_ROOM, 8, "").await;
    assert_eq!(error_of(&r), "room id required");
    let r = c.request(op::LEAVE_ROOM, 9, "nope").await;
    assert!(error_of(&r).starts_with("bad room id"), "{r:?}");

    // ChangeRoom keeps goim's meaning: exactly its target room afterwards.
    c.request(op::CHANGE_ROOM, 10, "chat://9").await;
    assert_eq!(s.rooms(), vec![room("chat://9")]);
    for r in ["chat://1", "chat://3"] {
        assert_eq!(ctx.buckets.room_len(&room(r)), 0, "{r}");
    }
    assert_eq!(
        logic.calls_of("room_changed"),
        vec!["room_changed mr chat://1 chat://9"]
    );
}

/// A session is in at most `session.max_rooms` rooms: the JoinRoom past it is refused with a
/// clear error and changes nothing; rejoining a room it is in still answers.
#[tokio::test(start_paused = true)]
async fn join_room_beyond_max_rooms_is_refused() {
    let (logic, ctx, mut c) = authed(
        30,
        |c| {
            c.session.max_rooms = 3;
            c.session.send_burst = 100;
        },
        "mx",
        "chat://0",
    )
    .await;
    for i in 1..3 {
        c.request(op::JOIN_ROOM, i, format!("chat://{i}")).await;
    }
    let r = c.request(op::JOIN_ROOM, 9, "chat://3").await;
    assert_eq!(error_of(&r), "too many rooms: at most 3");
    assert_eq!(ctx.buckets.get("mx").unwrap().room_count(), 3);
    assert_eq!(ctx.buckets.room_len(&room("chat://3")), 0);
    assert_eq!(logic.calls_of("join_room").len(), 2);
    let r = c.request(op::JOIN_ROOM, 10, "chat://1").await;
    assert_eq!(&r.body[..], b"chat://1");
}

/// A token's `rooms` bound every ChangeRoom (checked on the comet, logic not asked), and a move
/// into a type logic guards is asked of logic first; a refusal leaves the session where it was.
#[tokio::test(start_paused = true)]
async fn change_room_is_bounded_by_the_token_and_guarded_types_ask_logic() {
    let (logic, ctx, mut c) = authed_with_token("rooms=chat://*,guarded://ok", "chat://1").await;
    let r = c.request(op::CHANGE_ROOM, 2, "live://1").await;
    assert_eq!(error_of(&r), "room not allowed by token");
    assert_eq!(ctx.buckets.get("t").unwrap().room(), Some(room("chat://1")));
    assert!(logic.calls_of("room_changed").is_empty());
    assert!(logic.calls_of("check_join").is_empty());

    // Not a guarded type: logic is not asked, the move happens.
    let r = c.request(op::CHANGE_ROOM, 3, "chat://2").await;
    assert_eq!(r.body.as_ref(), b"chat://2");
    assert!(logic.calls_of("check_join").is_empty());
    // Guarded and named by the token: asked, allowed.
    let r = c.request(op::CHANGE_ROOM, 4, "guarded://ok").await;
    assert_eq!(r.body.as_ref(), b"guarded://ok");
    assert_eq!(
        logic.calls_of("check_join"),
        vec!["check_join t guarded://ok"]
    );
    assert_eq!(
        ctx.buckets.get("t").unwrap().room(),
        Some(room("guarded://ok"))
    );
    // Leaving is always allowed.
    assert_eq!(c.request(op::CHANGE_ROOM, 5, "").await.body.len(), 0);

    // Without a rooms claim, a guarded room is logic's call, and logic refuses.
    let (logic, ctx, mut c) = authed_with_token("", "").await;
    let r = c.request(op::CHANGE_ROOM, 2, "guarded://x").await;
    assert_logic_refused(&r, &logic, "guarded://x");
    assert!(logic.calls_of("room_changed").is_empty());
    assert_eq!(ctx.buckets.get("t").unwrap().room(), None);
}

/// A session ends with op 6 "token expired" (policy close) when its token does, on the dot; a
/// fresh token (op 22) moves the end, a refused one leaves the old end in force.
#[tokio::test(start_paused = true)]
async fn a_session_ends_when_its_token_does_unless_refreshed() {
    let (logic, ctx, mut c) = authed_with_token("ttl=60", "chat://1").await;
    let t0 = Instant::now();
    assert!(c.closed(Duration::from_secs(50)).await.is_none());

    // Refused: bad token, empty body, a token that does not allow the current room.
    let r = c.request(op::REFRESH_TOKEN, 2, "deny").await;
    assert_eq!(r.op, op::REFRESH_TOKEN_REPLY);
    assert!(error_of(&r).contains("token invalid"), "{r:?}");
    assert_eq!(
        error_of(&c.request(op::REFRESH_TOKEN, 3, " ").await),
        "token required"
    );
    let r = c
        .request(op::REFRESH_TOKEN, 4, "ttl=600;rooms=live://*")
        .await;
    assert_eq!(error_of(&r), "room not allowed by token");
    assert_eq!(
        logic.calls_of("refresh_token").len(),
        2,
        "the empty body never reaches logic"
    );

    // Accepted: the reply carries the new end (wall clock, like logic's), the old end passes.
    let r = c.request(op::REFRESH_TOKEN, 5, "ttl=120").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let expires = v["expires_ms"].as_u64().unwrap();
    assert!(expires > rim_runtime::unix_ms() + 100_000, "{v}");
    assert!(
        c.closed(Duration::from_secs(100)).await.is_none(),
        "old end ignored"
    );
    assert_eq!(
        c.request(op::HEARTBEAT, 6, Vec::new()).await.op,
        op::HEARTBEAT_REPLY
    );

    let spec = c.closed(WAIT).await.expect("closed at the new end");
    assert_eq!(spec, CloseSpec::policy("token expired"));
    let lived = Instant::now() - t0;
    assert!(
        lived > Duration::from_secs(169) && lived <= Duration::from_secs(170),
        "{lived:?}"
    );
    assert_eq!(ctx.metrics.token_expired.get(), 1);
    logic.called("disconnect t").await;
}

/// Trust mode (no expiry): the session is never closed for its token.
#[tokio::test(start_paused = true)]
async fn a_session_without_an_expiry_is_never_closed_for_it() {
    let (_logic, ctx, mut c) = authed_with_token("", "").await;
    for seq in 2..6 {
        assert!(c.closed(Duration::from_secs(200)).await.is_none());
        c.request(op::HEARTBEAT, seq, Vec::new()).await;
    }
    assert_eq!(ctx.metrics.token_expired.get(), 0);
}

/// A fresh token must pass the current room's policy too: one that would not let the session
/// join a guarded room it is in is refused, and the old token stays in force.
#[tokio::test(start_paused = true)]
async fn a_fresh_token_must_still_pass_the_current_rooms_policy() {
    let (logic, ctx, mut c) = authed_with_token("ttl=60;rooms=guarded://*", "guarded://a").await;
    let end = || ctx.buckets.get("t").unwrap().expires_ms();
    let old_end = end();
    let r = c.request(op::REFRESH_TOKEN, 2, "ttl=600").await;
    assert_logic_refused(&r, &logic, "guarded://a");
    assert_eq!(end(), old_end, "the refused token is not in force");
    let r = c
        .request(op::REFRESH_TOKEN, 3, "ttl=600;rooms=guarded://a")
        .await;
    assert_eq!(error_of(&r), "");
    assert!(end() > old_end, "the accepted token moved the end");
}
