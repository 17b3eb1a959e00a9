//! End-to-end tests of logic against a real throwaway redis-server: HTTP API, LogicRpc, reaper.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use redis::Commands;
use rim_logic::config::AuthMode;
use rim_logic::{Config, Listeners};
use rim_proto::job::{self, PushJob, Route, ServerKeys};
use rim_proto::keys;
use rim_proto::msg::AuthBody;
use rim_proto::room::RoomId;
use rim_proto::rpc::{ConnectRequest, LogicError as RpcError, NodeInfo, OnlineReport, SessionRef};
use rim_testkit::proxy::{FaultProxy, Mode, Stats, Upstream};
use rim_testkit::redis::RedisServer;
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod common;
use common::{Logic, all_jobs, ctx, eventually, jobs};

fn auth(mid: i64, key: &str) -> AuthBody {
    AuthBody {
        mid,
        key: key.into(),
        platform: "web".into(),
        accepts: vec![1000],
        ..AuthBody::default()
    }
}

fn connect_req(server: &str, auth: AuthBody) -> ConnectRequest {
    ConnectRequest {
        server: server.into(),
        auth,
        remote_ip: "127.0.0.1".into(),
    }
}

fn ja_recorded(by_part: &HashMap<u16, PushJob>, mid: i64) -> bool {
    by_part[&job::mid_partition(mid, 16)].recorded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_mids_publishes_one_entry_per_partition() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    // Find two mids in different partitions, and give the first two sessions on two comets.
    let a = 1i64;
    let b = (2..100)
        .find(|m| job::mid_partition(*m, 16) != job::mid_partition(a, 16))
        .unwrap();
    // An offline user in a third partition: users keep history by default, so its push gets
    // an entry there too (no session to route to; the entry's id is its history id).
    let off = (424_242..424_400)
        .find(|m| {
            ![a, b]
                .map(|x| job::mid_partition(x, 16))
                .contains(&job::mid_partition(*m, 16))
        })
        .unwrap();
    for (server, mid, key) in [("c1", a, "ka1"), ("c2", a, "ka2"), ("c1", b, "kb1")] {
        rpc.connect(ctx(), connect_req(server, auth(mid, key)))
            .await
            .unwrap()
            .unwrap();
    }
    let (status, v) = logic
        .post(
            &format!("/goim/push/mids?operation=1000&mids={a}&mids={b}&mids={off}"),
            "hello",
        )
        .await;
    assert_eq!((status, v["code"].clone()), (200, json!(0)), "{v}");
    assert_eq!(v["data"]["sessions"], json!(3));
    assert_eq!(v["data"]["delivery"], json!("both"));
    let id = v["data"]["id"].as_str().unwrap().to_string();

    let mut conn = redis.connection();
    let all = all_jobs(&mut conn);
    assert_eq!(all.len(), 3, "one entry per partition: {all:?}");
    let by_part: HashMap<u16, PushJob> = all.into_iter().collect();
    let joff = &by_part[&job::mid_partition(off, 16)];
    assert_eq!(joff.route, Route::Sessions(Vec::new()));
    assert!(joff.recorded && ja_recorded(&by_part, a));
    let ja = &by_part[&job::mid_partition(a, 16)];
    assert_eq!((ja.msg_id.as_str(), ja.op), (id.as_str(), 1000));
    assert_eq!(ja.body, Bytes::from_static(b"hello"));
    assert_eq!(
        ja.route,
        Route::Sessions(vec![
            ServerKeys {
                server: "c1".into(),
                keys: vec!["ka1".into()]
            },
            ServerKeys {
                server: "c2".into(),
                keys: vec!["ka2".into()]
            },
        ])
    );
    let jb = &by_part[&job::mid_partition(b, 16)];
    assert_eq!(
        jb.route,
        Route::Sessions(vec![ServerKeys {
            server: "c1".into(),
            keys: vec!["kb1".into()]
        }])
    );

    // Keys route through the key's mid partition; offline targets are not routed.
    let (status, v) = logic
        .post("/goim/push/keys?operation=1001&keys=kb1&keys=gone", "k")
        .await;
    assert_eq!(
        (status, v["data"]["sessions"].clone()),
        (200, json!(1)),
        "{v}"
    );
    let last = jobs(&mut conn, job::mid_partition(b, 16)).pop().unwrap();
    assert_eq!(last.op, 1001);

    // Nobody online: accepted and kept for later (one entry, routed to nobody).
    let before = all_jobs(&mut conn).len();
    let (status, v) = logic
        .post("/goim/push/mids?operation=1000&mids=777", "x")
        .await;
    assert_eq!(
        (
            status,
            v["data"]["sessions"].clone(),
            v["data"]["delivery"].clone()
        ),
        (200, json!(0), json!("stored")),
        "{v}"
    );
    assert_eq!(all_jobs(&mut conn).len(), before + 1);

    // Room and broadcast go to their own partitions.
    let (status, v) = logic
        .post("/goim/push/room?operation=1000&type=live&room=7", "r")
        .await;
    assert_eq!(status, 200, "{v}");
    let room = RoomId::parse("live://7").unwrap();
    let j = jobs(&mut conn, job::room_partition(&room, 16))
        .pop()
        .unwrap();
    assert_eq!(j.route, Route::Room(room));
    let (status, v) = logic
        .post("/goim/push/all?operation=1000&speed=5", "all")
        .await;
    assert_eq!(status, 200, "{v}");
    let j = jobs(&mut conn, job::all_partition(16)).pop().unwrap();
    assert_eq!(j.route, Route::All { speed: 5 });

    // The same push path over RPC.
    let acc = rpc
        .push_mids(ctx(), 1000, vec![a], Bytes::from_static(b"rpc"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(acc.sessions, 2);
    let m = reqwest::get(format!("{}/metrics", logic.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("rim_logic_pushes_accepted_total{kind=\"mids\"} 3"),
        "{m}"
    );
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_parameter() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.push.max_targets = 2).await;
    let cases = [
        ("/goim/push/mids?mids=1", "operation: required"),
        (
            "/goim/push/mids?operation=x&mids=1",
            "operation: \"x\" is not an int32",
        ),
        ("/goim/push/mids?operation=1000", "mids: required"),
        (
            "/goim/push/mids?operation=1000&mids=12x",
            "mids: \"12x\" is not an int64",
        ),
        (
            "/goim/push/mids?operation=1000&mids=1,2,3",
            "push.max_targets",
        ),
        ("/goim/push/keys?operation=1000", "keys: required"),
        ("/goim/push/room?operation=1000&room=1", "type: required"),
        ("/goim/push/room?operation=1000&type=live", "room: required"),
        (
            "/goim/push/room?operation=1000&type=bad%20type&room=1",
            "type: ",
        ),
        ("/goim/push/all?operation=1000&speed=-3", "speed: "),
    ];
    for (path, want) in cases {
        let (status, v) = logic.post(path, "b").await;
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(v["code"], json!(-400), "{path}");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains(want), "{path}: {msg:?} lacks {want:?}");
        assert!(v.get("data").is_none());
    }
    let (status, v) = logic.get("/goim/online/top?limit=3").await;
    assert_eq!(
        (status, v["message"].clone()),
        (400, json!("type: required"))
    );
    let (status, v) = logic.get("/nope").await;
    assert_eq!((status, v["code"].clone()), (404, json!(-404)));
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_gets_a_400_envelope() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.push.body_limit = 1024).await;
    let (status, v) = logic
        .post("/goim/push/all?operation=1000", vec![b'x'; 2048])
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        v["message"],
        json!("body exceeds push.body_limit of 1024 bytes")
    );
    let (status, _) = logic
        .post("/goim/push/all?operation=1000", vec![b'x'; 1024])
        .await;
    assert_eq!(status, 200);
    // Refused before its body was read: the server will not reuse the connection and says so,
    // so a keep-alive client does not send its next request into a closing socket.
    let r = reqwest::Client::new()
        .post(format!("{}/goim/push/all?operation=1000", logic.http))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_secret_requires_bearer() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.push.secret = "hush".into()).await;
    let (status, v) = logic.post("/goim/push/all?operation=1000", "x").await;
    assert_eq!((status, v["code"].clone()), (401, json!(-401)), "{v}");
    let r = reqwest::Client::new()
        .post(format!("{}/goim/push/all?operation=1000", logic.http))
        .header("Authorization", "Bearer hush")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Online routes stay open by default.
    let (status, _) = logic.get("/goim/online/total").await;
    assert_eq!(status, 200);
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_503() {
    let mut redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let (status, _) = logic.get("/readyz").await;
    assert_eq!(status, 200);
    redis.kill();
    // Refused, not hung: each answer comes within the bound (redis.timeout_ms is 2 s).
    let bound = Duration::from_secs(5);
    let (status, v) = tokio::time::timeout(
        bound,
        logic.post("/goim/push/mids?operation=1000&mids=1", "x"),
    )
    .await
    .expect("answered while Redis is down");
    assert_eq!((status, v["code"].clone()), (503, json!(-503)), "{v}");
    assert!(v["message"].as_str().unwrap().contains("redis"), "{v}");
    let (status, _) = tokio::time::timeout(
        bound,
        logic.post("/goim/push/room?operation=1000&type=live&room=1", "x"),
    )
    .await
    .expect("answered while Redis is down");
    assert_eq!(status, 503);
    let (status, v) = logic.get("/readyz").await;
    assert_eq!((status, v["code"].clone()), (503, json!(-503)));
    let rpc = logic.client().await;
    let err = rpc
        .push_all(ctx(), 1000, 0, Bytes::new())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RpcError::Unavailable(_)), "{err:?}");
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_connect_heartbeat_disconnect() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();

    // Key assigned when none is given; bad rooms are refused naming room_id.
    let mut a = auth(5, "");
    a.room_id = "live://1".into();
    let reply = rpc
        .connect(ctx(), connect_req("c1", a))
        .await
        .unwrap()
        .unwrap();
    assert!(!reply.key.is_empty());
    assert_eq!(reply.room, Some(RoomId::parse("live://1").unwrap()));
    assert_eq!(
        (reply.mid, reply.heartbeat_secs, reply.replaced_elsewhere),
        (5, 60, false)
    );
    let mut bad = auth(5, "");
    bad.room_id = "nope".into();
    let err = rpc
        .connect(ctx(), connect_req("c1", bad))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::BadRequest(m) if m.starts_with("room_id:")),
        "{err:?}"
    );

    let reply = rpc
        .connect(ctx(), connect_req("c1", auth(5, "k1")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.key, "k1");
    let sess: HashMap<String, String> = conn.hgetall(keys::session("k1")).unwrap();
    assert_eq!(sess["mid"], "5");
    assert_eq!(sess["server"], "c1");
    assert_eq!(sess["platform"], "web");
    let server: String = conn.hget(keys::mid_sessions(5), "k1").unwrap();
    assert_eq!(server, "c1");
    assert!(
        conn.sismember::<_, _, bool>(keys::node_sessions("c1"), "k1")
            .unwrap()
    );
    let ttl: i64 = conn.ttl(keys::session("k1")).unwrap();
    assert!(ttl > 0 && ttl <= 360, "{ttl}");

    // Heartbeat re-creates a session Redis lost.
    let _: () = conn.del(keys::session("k1")).unwrap();
    let s1 = SessionRef {
        server: "c1".into(),
        mid: 5,
        key: "k1".into(),
    };
    rpc.heartbeat(ctx(), s1.clone()).await.unwrap().unwrap();
    let server: String = conn.hget(keys::session("k1"), "server").unwrap();
    assert_eq!(server, "c1");
    assert!(conn.ttl::<_, i64>(keys::session("k1")).unwrap() > 0);

    // The heartbeat could not know the session's registration time: it says "unknown".
    let since: String = conn.hget(keys::session("k1"), "since").unwrap();
    assert_eq!(since, "0");
    assert!(
        !conn
            .hexists::<_, _, bool>(keys::session("k1"), "rooms")
            .unwrap()
    );

    // Same key on another comet: replaced, kick queued for the old comet naming the replaced
    // session by its since (here the unknown 0 the heartbeat wrote).
    let reply = rpc
        .connect(ctx(), connect_req("c2", auth(5, "k1")))
        .await
        .unwrap()
        .unwrap();
    assert!(reply.replaced_elsewhere);
    let kick = jobs(&mut conn, job::mid_partition(5, 16)).pop().unwrap();
    assert_eq!(
        kick.route,
        Route::Kick {
            server: "c1".into(),
            key: "k1".into(),
            since_ms: 0,
        }
    );
    // The reply's since is the one registered, and the next replacement's kick names it.
    let since: String = conn.hget(keys::session("k1"), "since").unwrap();
    assert_eq!(since, reply.since_ms.to_string());
    assert!(reply.since_ms > 0);
    let c2_since = reply.since_ms;
    let reply = rpc
        .connect(ctx(), connect_req("c3", auth(5, "k1")))
        .await
        .unwrap()
        .unwrap();
    assert!(reply.replaced_elsewhere && reply.since_ms >= c2_since);
    let kick = jobs(&mut conn, job::mid_partition(5, 16)).pop().unwrap();
    assert_eq!(
        kick.route,
        Route::Kick {
            server: "c2".into(),
            key: "k1".into(),
            since_ms: c2_since,
        }
    );
    // Back to c2 for the rest of the test.
    rpc.connect(ctx(), connect_req("c2", auth(5, "k1")))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !conn
            .sismember::<_, _, bool>(keys::node_sessions("c1"), "k1")
            .unwrap()
    );

    // The old comet's late disconnect must not erase the new registration.
    rpc.disconnect(ctx(), s1, None).await.unwrap().unwrap();
    let server: String = conn.hget(keys::session("k1"), "server").unwrap();
    assert_eq!(server, "c2");
    let server: String = conn.hget(keys::mid_sessions(5), "k1").unwrap();
    assert_eq!(server, "c2");

    // The real disconnect removes it everywhere.
    let s2 = SessionRef {
        server: "c2".into(),
        mid: 5,
        key: "k1".into(),
    };
    rpc.disconnect(ctx(), s2, None).await.unwrap().unwrap();
    assert!(!conn.exists::<_, bool>(keys::session("k1")).unwrap());
    assert!(
        !conn
            .hexists::<_, _, bool>(keys::mid_sessions(5), "k1")
            .unwrap()
    );
    assert!(
        !conn
            .sismember::<_, _, bool>(keys::node_sessions("c2"), "k1")
            .unwrap()
    );

    // room_joined indexes the comet for room pushes, and records the room under the node.
    rpc.room_joined(ctx(), "c2".into(), RoomId::parse("live://9").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        conn.sismember::<_, _, bool>(keys::room_nodes("live://9"), "c2")
            .unwrap()
    );
    let n: u64 = conn.hget(keys::node_rooms("c2"), "live://9").unwrap();
    assert_eq!(n, 0);
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_registered_to_another_user_is_refused() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    rpc.connect(ctx(), connect_req("c1", auth(1, "victim")))
        .await
        .unwrap()
        .unwrap();
    let before = all_jobs(&mut conn).len();

    // Another user presenting the key (on another comet or the same one) is refused; nothing
    // about the owner's session changes and no kick is queued.
    for server in ["c2", "c1"] {
        let err = rpc
            .connect(ctx(), connect_req(server, auth(2, "victim")))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err,
            RpcError::Unauthorized("key belongs to another user".into())
        );
    }
    let sess: HashMap<String, String> = conn.hgetall(keys::session("victim")).unwrap();
    assert_eq!((sess["mid"].as_str(), sess["server"].as_str()), ("1", "c1"));
    let owner: String = conn.hget(keys::mid_sessions(1), "victim").unwrap();
    assert_eq!(owner, "c1");
    assert!(
        !conn
            .hexists::<_, _, bool>(keys::mid_sessions(2), "victim")
            .unwrap()
    );
    assert_eq!(all_jobs(&mut conn).len(), before);
    // A push to the key still goes to its owner's comet.
    let (_, v) = logic
        .post("/goim/push/keys?operation=1000&keys=victim", "x")
        .await;
    assert_eq!(v["data"]["sessions"], json!(1), "{v}");
    // The owner itself may re-authenticate with its key.
    rpc.connect(ctx(), connect_req("c2", auth(1, "victim")))
        .await
        .unwrap()
        .unwrap();

    // Once the owner disconnected the key is free to reuse.
    rpc.disconnect(
        ctx(),
        SessionRef {
            server: "c2".into(),
            mid: 1,
            key: "victim".into(),
        },
        None,
    )
    .await
    .unwrap()
    .unwrap();
    rpc.connect(ctx(), connect_req("c2", auth(2, "victim")))
        .await
        .unwrap()
        .unwrap();
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_listing_requires_the_secret_even_with_open_online() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| {
        c.push.secret = "hush".into();
        c.push.open_online = true;
    })
    .await;
    let (status, v) = logic.get("/rim/users/3/sessions").await;
    assert_eq!((status, v["code"].clone()), (401, json!(-401)), "{v}");
    let r = reqwest::Client::new()
        .get(format!("{}/rim/users/3/sessions", logic.http))
        .header("Authorization", "Bearer hush")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The other listings stay open under open_online (they reveal no session keys).
    let (status, _) = logic.get("/rim/rooms/chat%3A%2F%2Fx/members").await;
    assert_eq!(status, 200);
    let (status, _) = logic.get("/goim/online/total").await;
    assert_eq!(status, 200);
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_in_token_mode() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| {
        c.auth.mode = AuthMode::Token;
        c.auth.secret = "s".into();
    })
    .await;
    let rpc = logic.client().await;
    let err = rpc
        .connect(ctx(), connect_req("c1", auth(9, "")))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err, RpcError::Unauthorized("token required".into()));
    let mut a = auth(9, "");
    a.token = rim_logic::issue_token("s", 8, Duration::from_secs(60));
    let err = rpc
        .connect(ctx(), connect_req("c1", a.clone()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err, RpcError::Unauthorized("token invalid".into()));
    a.token = rim_logic::auth::issue_token_until("s", 9, 1);
    let err = rpc
        .connect(ctx(), connect_req("c1", a.clone()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err, RpcError::Unauthorized("token expired".into()));
    a.token = rim_logic::issue_token("s", 9, Duration::from_secs(60));
    let reply = rpc
        .connect(ctx(), connect_req("c1", a))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.mid, 9);
    logic.stop().await;
}

fn node(server: &str, conns: u64, weight: u32) -> NodeInfo {
    NodeInfo {
        server: server.into(),
        rpc_addr: "127.0.0.1:1".into(),
        tcp_addr: format!("127.0.0.1:{}", 3101 + conns),
        ws_addr: "127.0.0.1:3102".into(),
        connections: conns,
        ips: 1,
        weight,
        ..NodeInfo::default()
    }
}

fn report(rooms: &[(&str, u32)]) -> OnlineReport {
    OnlineReport {
        rooms: rooms
            .iter()
            .map(|(r, c)| (RoomId::parse(r).unwrap(), *c))
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_feed_online_and_the_reaper_removes_dead_comets() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.node.ttl_ms = 600).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();

    rpc.connect(ctx(), connect_req("dead", auth(3, "kd")))
        .await
        .unwrap()
        .unwrap();
    rpc.connect(ctx(), connect_req("live", auth(3, "kl")))
        .await
        .unwrap()
        .unwrap();
    rpc.renew_node(
        ctx(),
        node("dead", 5, 1),
        report(&[("live://1", 2), ("live://2", 1)]),
    )
    .await
    .unwrap()
    .unwrap();
    let counts = rpc
        .renew_node(
            ctx(),
            node("live", 1, 1),
            report(&[("live://1", 3), ("chat://x", 1)]),
        )
        .await
        .unwrap()
        .unwrap();
    let c1 = counts
        .rooms
        .iter()
        .find(|(r, _)| r.as_str() == "live://1")
        .unwrap()
        .1;
    assert_eq!(c1, 5, "cluster-wide count: {counts:?}");
    assert!(
        conn.sismember::<_, _, bool>(keys::room_nodes("live://2"), "dead")
            .unwrap()
    );

    let (_, top) = logic.get("/goim/online/top?type=live&limit=10").await;
    assert_eq!(
        top["data"],
        json!([{"room_id":"live://1","count":5},{"room_id":"live://2","count":1}])
    );
    let (_, rooms) = logic
        .get("/goim/online/room?type=live&rooms=1&rooms=2&rooms=3")
        .await;
    assert_eq!(rooms["data"], json!({"1":5,"2":1,"3":0}));
    let (_, total) = logic.get("/goim/online/total").await;
    assert_eq!(total["data"], json!({"ip_count":2,"conn_count":6}));
    let (_, w) = logic.get("/goim/nodes/weighted?platform=web").await;
    assert_eq!(
        w["data"]["nodes"],
        json!(["127.0.0.1:3102", "127.0.0.1:3102"])
    );
    let (_, w) = logic.get("/goim/nodes/weighted?platform=ios").await;
    // Least loaded first: "live" has 1 connection, "dead" 5.
    assert_eq!(
        w["data"]["nodes"],
        json!(["127.0.0.1:3102", "127.0.0.1:3106"])
    );
    assert_eq!(w["data"]["heartbeat"], json!(60));
    assert_eq!(w["data"]["backoff"]["max_delay"], json!(300));
    let (_, inst) = logic.get("/goim/nodes/instances").await;
    assert_eq!(inst["data"].as_array().unwrap().len(), 2);

    // Keep "live" renewed while "dead" lapses; the reaper must remove dead's sessions and rooms.
    let renew = async {
        loop {
            let _ = rpc
                .renew_node(ctx(), node("live", 1, 1), report(&[("live://1", 3)]))
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let check = eventually("dead comet reaped", || {
        let mut c = redis.connection();
        async move {
            // Every end state of the purge: the session may also lapse by TTL before the purge runs.
            !c.exists::<_, bool>(keys::session("kd")).unwrap()
                && !c.hexists::<_, _, bool>(keys::NODES, "dead").unwrap()
                && !c.exists::<_, bool>(keys::node_sessions("dead")).unwrap()
                && !c
                    .sismember::<_, _, bool>(keys::room_nodes("live://2"), "dead")
                    .unwrap()
        }
    });
    tokio::select! {
        _ = renew => unreachable!(),
        _ = check => {}
    }
    assert!(
        !conn
            .hexists::<_, _, bool>(keys::mid_sessions(3), "kd")
            .unwrap()
    );
    assert!(!conn.exists::<_, bool>(keys::node_sessions("dead")).unwrap());
    assert!(
        !conn
            .sismember::<_, _, bool>(keys::room_nodes("live://2"), "dead")
            .unwrap()
    );
    assert!(conn.exists::<_, bool>(keys::session("kl")).unwrap());
    assert!(conn.hexists::<_, _, bool>(keys::NODES, "live").unwrap());
    // "live" dropped chat://x at its last renewal: its room index entry is gone.
    assert!(
        !conn
            .sismember::<_, _, bool>(keys::room_nodes("chat://x"), "live")
            .unwrap()
    );

    // Graceful unregister removes a comet at once.
    rpc.unregister_node(ctx(), "live".into())
        .await
        .unwrap()
        .unwrap();
    assert!(!conn.exists::<_, bool>(keys::session("kl")).unwrap());
    assert!(!conn.hexists::<_, _, bool>(keys::NODES, "live").unwrap());
    let m = reqwest::get(format!("{}/metrics", logic.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("rim_logic_nodes_reaped_total 1"), "{m}");
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_count_mismatch_refuses_to_start() {
    let redis = RedisServer::start();
    let mut conn = redis.connection();
    let _: () = conn.set(keys::META_PARTITIONS, 8).unwrap();
    let mut config = Config::dev();
    config.redis.url = redis.url();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = rim_logic::run(Listeners { http, rpc }, config, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stream.partitions"), "{err}");
}

/// A logic started while Redis refuses connections waits for it (retrying, logged) instead of
/// exiting, and serves once it answers. The evidence that it waited is its own log: two
/// "waiting" warnings, each after a failed attempt (redis-rs retries inside one attempt, so
/// refused connections alone would not show the wait loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_before_redis_and_serves_once_redis_is_up() {
    let waits = rim_testkit::logs::count_warnings("waiting for it before serving");
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(Upstream::Unix(redis.socket_path())).await;
    proxy.set(Mode::Refuse);
    let mut config = Config::dev();
    config.redis.url = format!("redis://{}/", proxy.addr());
    // Each attempt (redis-rs retries within it) is cut short, so the wait loop turns quickly.
    config.redis.timeout_ms = 200;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", http.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(rim_logic::run(
        Listeners { http, rpc },
        config,
        shutdown.clone(),
    ));

    eventually("logic waited for Redis twice", || async {
        waits.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    assert!(
        !task.is_finished(),
        "logic kept running while redis refused it"
    );
    assert_eq!(Stats::get(&proxy.stats().up), 0, "nothing reached redis");

    // Redis answers: logic must now connect by itself and serve.
    proxy.set(Mode::Forward);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    eventually("logic ready after redis came up", || {
        let (client, base) = (client.clone(), base.clone());
        async move {
            client
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    let pushed = client
        .post(format!("{base}/goim/push/mids?operation=1000&mids=7"))
        .body("after the wait")
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 200);
    assert!(!task.is_finished());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_joined_and_left_between_renewals_leaves_the_index() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.node.ttl_ms = 600).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    let r = || RoomId::parse("live://5").unwrap();

    // Joined after a renewal, left before the next: the next renewal removes the entry.
    rpc.renew_node(ctx(), node("n1", 0, 1), report(&[]))
        .await
        .unwrap()
        .unwrap();
    rpc.room_joined(ctx(), "n1".into(), r())
        .await
        .unwrap()
        .unwrap();
    assert!(
        conn.sismember::<_, _, bool>(keys::room_nodes("live://5"), "n1")
            .unwrap()
    );
    // Not counted as a member anywhere until a renewal reports one.
    let (_, top) = logic.get("/goim/online/top?type=live&limit=10").await;
    assert_eq!(top["data"], json!([]), "{top}");
    rpc.renew_node(ctx(), node("n1", 0, 1), report(&[]))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !conn
            .sismember::<_, _, bool>(keys::room_nodes("live://5"), "n1")
            .unwrap()
    );

    // Joined and the comet died before renewing again: the reaper removes the entry.
    rpc.room_joined(ctx(), "n1".into(), r())
        .await
        .unwrap()
        .unwrap();
    eventually("room entry of the dead comet reaped", || {
        let mut c = redis.connection();
        async move {
            !c.sismember::<_, _, bool>(keys::room_nodes("live://5"), "n1")
                .unwrap()
                && !c.exists::<_, bool>(keys::node_rooms("n1")).unwrap()
        }
    })
    .await;
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comet_restarted_under_its_id_has_its_old_sessions_purged() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |_| {}).await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    let incarnation = |started_ms| NodeInfo {
        started_ms,
        ..node("c1", 1, 1)
    };

    rpc.renew_node(ctx(), incarnation(1_000), report(&[("live://1", 1)]))
        .await
        .unwrap()
        .unwrap();
    let mut a = auth(4, "old");
    a.room_id = "chat://r".into();
    rpc.connect(ctx(), connect_req("c1", a))
        .await
        .unwrap()
        .unwrap();
    // Renewals of the same incarnation keep its sessions.
    rpc.renew_node(ctx(), incarnation(1_000), report(&[("live://1", 1)]))
        .await
        .unwrap()
        .unwrap();
    assert!(conn.exists::<_, bool>(keys::session("old")).unwrap());

    // Restarted before the registration lapsed: the first renewal of the new incarnation
    // purges the old one's sessions, memberships and room entries, then registers.
    rpc.renew_node(ctx(), incarnation(2_000), report(&[]))
        .await
        .unwrap()
        .unwrap();
    assert!(!conn.exists::<_, bool>(keys::session("old")).unwrap());
    assert!(
        !conn
            .hexists::<_, _, bool>(keys::mid_sessions(4), "old")
            .unwrap()
    );
    assert!(!conn.exists::<_, bool>(keys::node_sessions("c1")).unwrap());
    assert!(
        !conn
            .exists::<_, bool>(keys::room_members("chat://r"))
            .unwrap()
    );
    assert!(
        !conn
            .sismember::<_, _, bool>(keys::room_nodes("live://1"), "c1")
            .unwrap()
    );
    let info: String = conn.hget(keys::NODES, "c1").unwrap();
    let info: NodeInfo = serde_json::from_str(&info).unwrap();
    assert_eq!(info.started_ms, 2_000);

    // The new incarnation's sessions survive its later renewals.
    rpc.connect(ctx(), connect_req("c1", auth(4, "new")))
        .await
        .unwrap()
        .unwrap();
    rpc.renew_node(ctx(), incarnation(2_000), report(&[]))
        .await
        .unwrap()
        .unwrap();
    assert!(conn.exists::<_, bool>(keys::session("new")).unwrap());
    logic.stop().await;
}

/// Sends a push request declaring `declared` body bytes and sends only a few; returns the raw
/// socket.
async fn trickle(logic: &Logic, declared: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = logic.http.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /goim/push/all?operation=1000 HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\nabc"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_times_out_with_a_408_envelope() {
    use tokio::io::AsyncReadExt;
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.push.body_timeout_ms = 300).await;
    let mut s = trickle(&logic, 100).await;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("body: not received within push.body_timeout_ms of 300 ms"),
        "{text}"
    );
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_by_the_grace_despite_an_open_request() {
    let redis = RedisServer::start();
    // The body timeout is far longer than the grace: only the grace can end the request.
    let logic = Logic::start(&redis, |c| {
        c.push.body_timeout_ms = 60_000;
        c.shutdown_grace_ms = 500;
    })
    .await;
    let _s = trickle(&logic, 100).await;
    // Shutdown ends within the grace (0.5 s) plus drain; the open request cannot hold it.
    tokio::time::timeout(Duration::from_secs(3), logic.stop())
        .await
        .expect("shutdown bounded by the grace despite the open request");
}
