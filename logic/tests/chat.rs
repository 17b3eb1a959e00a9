//! IM on top of push, against a real throwaway redis-server: the send policy, message jobs,
//! room member counts and presence events, the member and session listings, and the demo's dev
//! sign-in and page. The bot webhook has its own file (`webhook.rs`).
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};

use redis::Commands;
use rim_proto::job::{self, Route, ServerKeys};
use rim_proto::keys;
use rim_proto::msg::AuthBody;
use rim_proto::rpc::{
    ConnectRequest, LogicError as RpcError, LogicRpcClient, NodeInfo, OnlineReport, SendMsgRequest,
    SendTarget, SessionRef,
};
use rim_testkit::redis::RedisServer;
use serde_json::{Value, json};

mod common;
use common::{Logic, all_jobs, connect, ctx, eventually, msg, room, sref};

/// JoinRoom of session `s`, as its comet reports it.
async fn join(rpc: &LogicRpcClient, s: SessionRef, r: &str) {
    rpc.join_room(ctx(), s, room(r)).await.unwrap().unwrap();
}

/// LeaveRoom of session `s`, as its comet reports it.
async fn leave(rpc: &LogicRpcClient, s: SessionRef, r: &str) {
    rpc.leave_room(ctx(), s, room(r)).await.unwrap().unwrap();
}

/// Room event jobs (op 24) as (room, event, mid), in partition order.
fn room_events(conn: &mut redis::Connection) -> Vec<(String, String, i64)> {
    all_jobs(conn)
        .into_iter()
        .filter(|(_, j)| j.op == rim_proto::op::ROOM_EVENT)
        .map(|(_, j)| {
            let Route::Room(r) = &j.route else {
                panic!("room event not routed to a room: {j:?}")
            };
            let b: Value = serde_json::from_slice(&j.body).unwrap();
            assert_eq!(b["room"], json!(r.as_str()));
            (
                r.as_str().to_string(),
                b["event"].as_str().unwrap().to_string(),
                b["mid"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn members(conn: &mut redis::Connection, r: &str) -> HashMap<i64, i64> {
    let m: HashMap<i64, i64> = conn.hgetall(keys::room_members(r)).unwrap();
    assert!(m.values().all(|n| *n > 0), "{r}: {m:?}");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_policy_refusals() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.chat.max_data_bytes = 64).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    connect(&rpc, "c1", 5, "k5", "chat://lobby").await;
    let me = sref("c1", 5, "k5");
    let lobby = || SendTarget::Room(room("chat://lobby"));

    let send = |req: SendMsgRequest| {
        let rpc = rpc.clone();
        async move { rpc.send_msg(ctx(), req).await.unwrap() }
    };
    // Not in the room (or in another one): forbidden.
    let err = send(msg(me.clone(), None, lobby(), "1")).await.unwrap_err();
    assert_eq!(
        err,
        RpcError::Forbidden("not a member of chat://lobby".into())
    );
    assert_eq!(err.code(), -403);
    let err = send(msg(me.clone(), Some("chat://other"), lobby(), "1"))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Forbidden(_)), "{err:?}");
    // System ops, bad JSON and oversized data: bad requests.
    let mut low = msg(me.clone(), Some("chat://lobby"), lobby(), "1");
    low.op = 999;
    let err = send(low).await.unwrap_err();
    assert!(
        matches!(&err, RpcError::BadRequest(m) if m.starts_with("op:")),
        "{err:?}"
    );
    let err = send(msg(me.clone(), Some("chat://lobby"), lobby(), "{nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::BadRequest(m) if m.starts_with("data:")),
        "{err:?}"
    );
    let big = format!("\"{}\"", "x".repeat(100));
    let err = send(msg(me.clone(), Some("chat://lobby"), lobby(), &big))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::BadRequest(m) if m.contains("chat.max_data_bytes")),
        "{err:?}"
    );
    assert!(all_jobs(&mut conn).is_empty(), "refusals queue nothing");
    let m = logic.metrics().await;
    assert!(
        m.contains("rim_logic_messages_refused_total{reason=\"forbidden\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("rim_logic_messages_refused_total{reason=\"bad_request\"} 3"),
        "{m}"
    );
    logic.stop().await;

    // Policy switched off.
    let logic = Logic::start(&redis, |c| {
        c.chat.direct = false;
        c.chat.room_post = false;
    })
    .await;
    let rpc = logic.client().await;
    let err = rpc
        .send_msg(ctx(), msg(me.clone(), None, SendTarget::Mid(5), "1"))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err,
        RpcError::Forbidden("direct messages are disabled".into())
    );
    let err = rpc
        .send_msg(ctx(), msg(me, Some("chat://lobby"), lobby(), "1"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RpcError::Forbidden(_)), "{err:?}");
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_message_excludes_sender_and_stamps_from() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    connect(&rpc, "c1", 5, "k5", "chat://lobby").await;
    let lobby = room("chat://lobby");
    // The data claims to be from someone else: recipients must see the session's mid.
    let acc = rpc
        .send_msg(
            ctx(),
            msg(
                sref("c1", 5, "k5"),
                Some("chat://lobby"),
                SendTarget::Room(lobby.clone()),
                r#"{"from":999,"text":"hi"}"#,
            ),
        )
        .await
        .unwrap()
        .unwrap();
    let jobs = all_jobs(&mut conn);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let (p, j) = &jobs[0];
    assert_eq!(*p, job::room_partition(&lobby, 16));
    assert_eq!((j.msg_id.as_str(), j.op), (acc.id.as_str(), 1000));
    assert_eq!(j.route, Route::Room(lobby.clone()));
    assert_eq!(j.exclude.as_deref(), Some("k5"));
    let body: Value = serde_json::from_slice(&j.body).unwrap();
    assert_eq!(body, json!({"from":5,"data":{"from":999,"text":"hi"}}));
    let m = logic.metrics().await;
    assert!(
        m.contains("rim_logic_messages_accepted_total{target=\"room\"} 1"),
        "{m}"
    );
    logic.stop().await;

    // echo_to_sender: the sending session gets its own message back.
    let logic = Logic::start(&redis, |c| c.chat.echo_to_sender = true).await;
    let rpc = logic.client().await;
    rpc.send_msg(
        ctx(),
        msg(
            sref("c1", 5, "k5"),
            Some("chat://lobby"),
            SendTarget::Room(lobby),
            "\"again\"",
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let jobs = all_jobs(&mut conn);
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[1].1.exclude, None);
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_message_to_offline_mid_is_refused_and_online_is_routed() {
    let redis = RedisServer::start();
    // Users keep no history here: nobody would ever get it, so it is refused (with history on
    // it is kept for the recipient's next connect: testkit/tests/chat.rs).
    let logic = Logic::start(&redis, |c| c.history.users.max_len = 0).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    connect(&rpc, "c1", 5, "k5", "").await;
    let err = rpc
        .send_msg(
            ctx(),
            msg(sref("c1", 5, "k5"), None, SendTarget::Mid(7), "\"yo\""),
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err, RpcError::Offline("no session online for mid 7".into()));
    assert_eq!(err.code(), -404);
    assert!(
        all_jobs(&mut conn).is_empty(),
        "nothing queued for an offline mid"
    );

    connect(&rpc, "c2", 7, "k7a", "").await;
    connect(&rpc, "c3", 7, "k7b", "").await;
    let acc = rpc
        .send_msg(
            ctx(),
            msg(sref("c1", 5, "k5"), None, SendTarget::Mid(7), "\"yo\""),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(acc.sessions, 2);
    let jobs = all_jobs(&mut conn);
    assert_eq!(jobs.len(), 1);
    let (p, j) = &jobs[0];
    assert_eq!(*p, job::mid_partition(7, 16));
    assert_eq!(
        j.route,
        Route::Sessions(vec![
            ServerKeys {
                server: "c2".into(),
                keys: vec!["k7a".into()]
            },
            ServerKeys {
                server: "c3".into(),
                keys: vec!["k7b".into()]
            },
        ])
    );
    assert_eq!(j.exclude, None);
    let body: Value = serde_json::from_slice(&j.body).unwrap();
    assert_eq!(body, json!({"from":5,"data":"yo"}));
    let m = logic.metrics().await;
    assert!(
        m.contains("rim_logic_messages_refused_total{reason=\"offline\"} 1"),
        "{m}"
    );
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_index_follows_connect_room_change_disconnect_and_reaper() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.node.ttl_ms = 600).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    let (a, b, c) = ("chat://a", "chat://b", "chat://c");

    connect(&rpc, "c1", 1, "k1", a).await;
    connect(&rpc, "c1", 1, "k2", a).await;
    connect(&rpc, "c1", 2, "k3", a).await;
    assert_eq!(members(&mut conn, a), HashMap::from([(1, 2), (2, 1)]));
    let stored: String = conn.hget(keys::session("k1"), "rooms").unwrap();
    assert_eq!(stored, a);

    // ChangeRoom moves one session.
    rpc.room_changed(ctx(), sref("c1", 1, "k2"), Some(room(a)), Some(room(b)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(members(&mut conn, a), HashMap::from([(1, 1), (2, 1)]));
    assert_eq!(members(&mut conn, b), HashMap::from([(1, 1)]));
    let stored: String = conn.hget(keys::session("k2"), "rooms").unwrap();
    assert_eq!(stored, b);
    // From a comet that does not hold the session: ignored.
    rpc.room_changed(ctx(), sref("other", 1, "k2"), Some(room(b)), Some(room(c)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(members(&mut conn, b), HashMap::from([(1, 1)]));
    assert!(members(&mut conn, c).is_empty());
    // Leaving the room: the field goes away.
    rpc.room_changed(ctx(), sref("c1", 1, "k2"), Some(room(b)), None)
        .await
        .unwrap()
        .unwrap();
    assert!(members(&mut conn, b).is_empty());
    assert!(
        !conn
            .hexists::<_, _, bool>(keys::session("k2"), "rooms")
            .unwrap()
    );

    // Re-auth with the same key into the same room: not counted twice.
    connect(&rpc, "c1", 1, "k1", a).await;
    assert_eq!(members(&mut conn, a), HashMap::from([(1, 1), (2, 1)]));
    // Re-auth elsewhere into another room: moved, not copied.
    connect(&rpc, "c2", 1, "k1", c).await;
    assert_eq!(members(&mut conn, a), HashMap::from([(2, 1)]));
    assert_eq!(members(&mut conn, c), HashMap::from([(1, 1)]));
    // The same key claimed by another user: refused, the owner's membership untouched.
    let err = rpc
        .connect(
            ctx(),
            ConnectRequest {
                server: "c2".into(),
                auth: AuthBody {
                    mid: 9,
                    key: "k1".into(),
                    room_id: c.into(),
                    ..AuthBody::default()
                },
                remote_ip: "127.0.0.1".into(),
            },
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err,
        RpcError::Unauthorized("key belongs to another user".into())
    );
    assert_eq!(members(&mut conn, c), HashMap::from([(1, 1)]));

    // Disconnect, twice (the second finds nothing): never negative.
    rpc.disconnect(ctx(), sref("c2", 1, "k1"), None)
        .await
        .unwrap()
        .unwrap();
    rpc.disconnect(ctx(), sref("c2", 1, "k1"), None)
        .await
        .unwrap()
        .unwrap();
    assert!(members(&mut conn, c).is_empty());
    // A stale disconnect from the old comet leaves the live session counted.
    rpc.disconnect(ctx(), sref("c9", 2, "k3"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(members(&mut conn, a), HashMap::from([(2, 1)]));

    // The reaper drops a dead comet's sessions and their memberships.
    connect(&rpc, "dead", 4, "k4", a).await;
    connect(&rpc, "dead", 4, "k5", b).await;
    rpc.renew_node(
        ctx(),
        NodeInfo {
            server: "dead".into(),
            ..NodeInfo::default()
        },
        OnlineReport::default(),
    )
    .await
    .unwrap()
    .unwrap();
    eventually("dead comet's members dropped", || {
        let mut c = redis.connection();
        async move {
            let a: HashMap<i64, i64> = c.hgetall(keys::room_members("chat://a")).unwrap();
            let b: HashMap<i64, i64> = c.hgetall(keys::room_members("chat://b")).unwrap();
            a == HashMap::from([(2, 1)]) && b.is_empty()
        }
    })
    .await;
    assert_eq!(members(&mut conn, a), HashMap::from([(2, 1)]));
    logic.stop().await;
}

/// One session in several rooms (JoinRoom, LeaveRoom): counted once in each, a repeated join
/// counts nothing, a leave keeps the others, ChangeRoom leaves every room but its target, and a
/// disconnect counts the session out of all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_several_rooms_is_counted_once_in_each() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    let (a, b, c, d) = ("chat://a", "chat://b", "chat://c", "chat://d");
    let stored = |conn: &mut redis::Connection| -> Option<String> {
        conn.hget(keys::session("k1"), "rooms").unwrap()
    };

    connect(&rpc, "c1", 1, "k1", a).await;
    connect(&rpc, "c1", 2, "k2", b).await;
    for r in [b, c, b] {
        join(&rpc, sref("c1", 1, "k1"), r).await;
    }
    assert_eq!(
        stored(&mut conn).as_deref(),
        Some("chat://a chat://b chat://c")
    );
    assert_eq!(members(&mut conn, a), HashMap::from([(1, 1)]));
    assert_eq!(members(&mut conn, b), HashMap::from([(1, 1), (2, 1)]));
    assert_eq!(members(&mut conn, c), HashMap::from([(1, 1)]));
    // From a comet that does not hold the session: ignored.
    join(&rpc, sref("c9", 1, "k1"), d).await;
    assert!(members(&mut conn, d).is_empty());

    leave(&rpc, sref("c1", 1, "k1"), b).await;
    assert_eq!(stored(&mut conn).as_deref(), Some("chat://a chat://c"));
    assert_eq!(members(&mut conn, b), HashMap::from([(2, 1)]));
    assert_eq!(members(&mut conn, a), HashMap::from([(1, 1)]));

    // ChangeRoom: exactly the target room afterwards, whatever the comet claims it left.
    rpc.room_changed(ctx(), sref("c1", 1, "k1"), Some(room(a)), Some(room(d)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored(&mut conn).as_deref(), Some("chat://d"));
    assert!(members(&mut conn, a).is_empty());
    assert!(members(&mut conn, c).is_empty());
    assert_eq!(members(&mut conn, d), HashMap::from([(1, 1)]));

    join(&rpc, sref("c1", 1, "k1"), a).await;
    rpc.disconnect(ctx(), sref("c1", 1, "k1"), None)
        .await
        .unwrap()
        .unwrap();
    assert!(members(&mut conn, a).is_empty());
    assert!(members(&mut conn, d).is_empty());
    assert_eq!(members(&mut conn, b), HashMap::from([(2, 1)]));
    logic.stop().await;
}

/// A session hash written before sessions could be in several rooms (a `room` field, no
/// `rooms`) is read the same way: a JoinRoom keeps that room first, and a disconnect counts the
/// session out of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stored_with_one_room_field_keeps_working() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    connect(&rpc, "c1", 1, "k1", "chat://a").await;
    // As an older logic wrote it.
    let _: () = conn.hdel(keys::session("k1"), "rooms").unwrap();
    let _: () = conn.hset(keys::session("k1"), "room", "chat://a").unwrap();
    join(&rpc, sref("c1", 1, "k1"), "chat://b").await;
    let rooms: String = conn.hget(keys::session("k1"), "rooms").unwrap();
    assert_eq!(rooms, "chat://a chat://b");
    assert!(
        !conn
            .hexists::<_, _, bool>(keys::session("k1"), "room")
            .unwrap()
    );
    rpc.disconnect(ctx(), sref("c1", 1, "k1"), None)
        .await
        .unwrap()
        .unwrap();
    assert!(members(&mut conn, "chat://a").is_empty());
    assert!(members(&mut conn, "chat://b").is_empty());
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_only_for_listed_types_and_edges() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.chat.presence_room_types = vec!["chat".into()]).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    let ev = |r: &str, e: &str, m: i64| (r.to_string(), e.to_string(), m);

    connect(&rpc, "c1", 1, "k1", "chat://a").await; // 0→1: join
    connect(&rpc, "c1", 1, "k2", "chat://a").await; // 1→2: nothing
    connect(&rpc, "c1", 2, "k3", "live://a").await; // type not listed: nothing
    assert_eq!(room_events(&mut conn), vec![ev("chat://a", "join", 1)]);

    rpc.room_changed(
        ctx(),
        sref("c1", 1, "k2"),
        Some(room("chat://a")),
        Some(room("chat://b")),
    )
    .await
    .unwrap()
    .unwrap(); // a: 2→1 nothing; b: 0→1 join
    rpc.disconnect(ctx(), sref("c1", 1, "k1"), None)
        .await
        .unwrap()
        .unwrap(); // a: 1→0 leave
    rpc.disconnect(ctx(), sref("c1", 2, "k3"), None)
        .await
        .unwrap()
        .unwrap(); // live: nothing
    let mut got = room_events(&mut conn);
    got.sort();
    let mut want = vec![
        ev("chat://a", "join", 1),
        ev("chat://b", "join", 1),
        ev("chat://a", "leave", 1),
    ];
    want.sort();
    assert_eq!(got, want);
    let jobs = all_jobs(&mut conn);
    let j = &jobs
        .iter()
        .find(|(_, j)| j.op == rim_proto::op::ROOM_EVENT)
        .unwrap()
        .1;
    assert_eq!(j.exclude, None);
    logic.stop().await;

    // Default (no listed types): no events at all.
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    connect(&rpc, "c1", 1, "k1", "chat://a").await;
    rpc.disconnect(ctx(), sref("c1", 1, "k1"), None)
        .await
        .unwrap()
        .unwrap();
    assert!(room_events(&mut conn).is_empty());
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_listing_paginates_and_names_members() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let mut conn = redis.connection();
    let key = keys::room_members("chat://lobby");
    for mid in 1..=250i64 {
        let _: () = conn.hset(&key, mid, 1 + mid % 3).unwrap();
    }
    let _: () = conn.hset(keys::USER_NAMES, 7, "alice").unwrap();

    let mut seen: Vec<i64> = Vec::new();
    let mut cursor = "0".to_string();
    let mut pages = 0;
    loop {
        let (status, v) = logic
            .get(&format!(
                "/rim/rooms/chat%3A%2F%2Flobby/members?cursor={cursor}&limit=100"
            ))
            .await;
        assert_eq!(status, 200, "{v}");
        let d = &v["data"];
        assert_eq!(d["room"], json!("chat://lobby"));
        assert_eq!(d["count"], json!(250));
        let list = d["members"].as_array().unwrap();
        assert!(list.len() <= 100, "{}", list.len());
        for m in list {
            let mid = m["mid"].as_i64().unwrap();
            assert_eq!(m["sessions"], json!(1 + mid % 3));
            if mid == 7 {
                assert_eq!(m["name"], json!("alice"));
            } else {
                assert!(m.get("name").is_none(), "{m}");
            }
            seen.push(mid);
        }
        pages += 1;
        cursor = d["cursor"].as_str().unwrap().to_string();
        if cursor == "0" {
            break;
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 250);
    assert_eq!(seen.iter().copied().collect::<HashSet<_>>().len(), 250);

    // Default limit, an empty room, bad input.
    let (status, v) = logic.get("/rim/rooms/live%3A%2F%2Fnone/members").await;
    assert_eq!(status, 200);
    assert_eq!(
        v["data"],
        json!({"room":"live://none","count":0,"members":[],"cursor":"0"})
    );
    let (status, v) = logic.get("/rim/rooms/nope/members").await;
    assert_eq!(status, 400);
    assert!(v["message"].as_str().unwrap().starts_with("room: "), "{v}");
    let (status, v) = logic
        .get("/rim/rooms/chat%3A%2F%2Flobby/members?limit=0")
        .await;
    assert_eq!(status, 400);
    assert!(v["message"].as_str().unwrap().starts_with("limit: "), "{v}");
    let (status, v) = logic
        .get("/rim/rooms/chat%3A%2F%2Flobby/members?cursor=x")
        .await;
    assert_eq!(status, 400);
    assert!(
        v["message"].as_str().unwrap().starts_with("cursor: "),
        "{v}"
    );
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_sessions_listings_follow_sessions() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    connect(&rpc, "c1", 3, "ka", "chat://x").await;
    connect(&rpc, "c2", 3, "kb", "").await;
    connect(&rpc, "c2", 4, "kc", "chat://x").await;

    let (status, v) = logic.get("/rim/users/3/sessions").await;
    assert_eq!(status, 200, "{v}");
    let list = v["data"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    let by_key: HashMap<&str, &Value> = list
        .iter()
        .map(|s| (s["key"].as_str().unwrap(), s))
        .collect();
    assert_eq!(by_key["ka"]["comet"], json!("c1"));
    assert_eq!(by_key["ka"]["platform"], json!("web"));
    assert_eq!(by_key["ka"]["room"], json!("chat://x"));
    assert_eq!(by_key["ka"]["rooms"], json!(["chat://x"]));
    assert!(by_key["ka"]["since"].as_u64().unwrap() > 0);
    assert_eq!(by_key["kb"]["room"], Value::Null);
    assert_eq!(by_key["kb"]["rooms"], json!([]));
    let (_, v) = logic.get("/rim/users/99/sessions").await;
    assert_eq!(v["data"], json!([]));
    let (status, v) = logic.get("/rim/users/x/sessions").await;
    assert_eq!(status, 400);
    assert!(v["message"].as_str().unwrap().starts_with("mid: "), "{v}");

    let (_, v) = logic.get("/rim/rooms/chat%3A%2F%2Fx/members").await;
    assert_eq!(v["data"]["count"], json!(2));
    rpc.disconnect(ctx(), sref("c1", 3, "ka"), None)
        .await
        .unwrap()
        .unwrap();
    let (_, v) = logic.get("/rim/rooms/chat%3A%2F%2Fx/members").await;
    assert_eq!(v["data"]["members"], json!([{"mid":4,"sessions":1}]));
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_login_and_demo_page() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.auth.secret = "s".into()).await;
    let (status, v) = logic.post("/rim/dev/login?name=%20alice%20", "").await;
    assert_eq!(status, 200, "{v}");
    let mid = v["data"]["mid"].as_i64().unwrap();
    assert!(mid >= 100_000, "{v}");
    assert_eq!(v["data"]["name"], json!("alice"));
    let token = v["data"]["token"].as_str().unwrap();
    assert!(rim_logic::auth::verify_token("s", mid, token).is_ok());
    let (_, again) = logic.post("/rim/dev/login?name=alice", "").await;
    assert_eq!(again["data"]["mid"], json!(mid));
    let (_, bob) = logic.post("/rim/dev/login?name=bob", "").await;
    assert_ne!(bob["data"]["mid"], json!(mid));
    let mut conn = redis.connection();
    let name: String = conn.hget(keys::USER_NAMES, mid).unwrap();
    assert_eq!(name, "alice");
    for bad in ["", "%20%20", &"x".repeat(33)] {
        let (status, v) = logic.post(&format!("/rim/dev/login?name={bad}"), "").await;
        assert_eq!(status, 400, "{bad:?}: {v}");
        assert!(v["message"].as_str().unwrap().starts_with("name: "), "{v}");
    }

    let r = reqwest::get(format!("{}/", logic.http)).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/html"), "{ct}");
    assert_eq!(r.headers()["cache-control"], "no-cache");
    assert_eq!(
        r.text().await.unwrap(),
        include_str!("../assets/index.html")
    );
    for (name, ct) in [
        ("rim-client.js", "application/javascript"),
        ("chat.js", "application/javascript"),
        ("chat.css", "text/css"),
    ] {
        let r = reqwest::get(format!("{}/assets/{name}", logic.http))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{name}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(ct),
            "{name}"
        );
    }
    let (status, _) = logic.get("/assets/secret.txt").await;
    assert_eq!(status, 404);
    logic.stop().await;

    // Without an auth secret the token is empty; with the demo off, 404s.
    let logic = Logic::start(&redis, |_| {}).await;
    let (_, v) = logic.post("/rim/dev/login?name=alice", "").await;
    assert_eq!(
        (v["data"]["mid"].clone(), v["data"]["token"].clone()),
        (json!(mid), json!(""))
    );
    logic.stop().await;
    let logic = Logic::start(&redis, |c| c.demo.enabled = false).await;
    let (status, v) = logic.post("/rim/dev/login?name=alice", "").await;
    assert_eq!((status, v["code"].clone()), (404, json!(-404)));
    let r = reqwest::get(format!("{}/", logic.http)).await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let (status, _) = logic.get("/assets/chat.js").await;
    assert_eq!(status, 404);
    logic.stop().await;
}
