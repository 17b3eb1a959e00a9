//! Room and user histories against a real redis-server: what the append records, the HTTP
//! routes (paging, bodies, `complete`, the secret), and the offline positions logic keeps per
//! device (connect says what waits, the catch-up RPC reads it, disconnect moves the position).
#![allow(clippy::unwrap_used)]

use rim_logic::config::Retention;
use rim_proto::history::{HistoryId, HistoryWant, Source};
use rim_proto::msg::AuthBody;
use rim_proto::rpc::{ConnectRequest, SessionRef};
use rim_testkit::redis::RedisServer;
use serde_json::{Value, json};

mod common;
use common::{Logic, ctx};

const SECRET: &str = "history-test-secret";

async fn start(redis: &RedisServer) -> Logic {
    Logic::start(redis, |c| {
        c.push.secret = SECRET.into();
        c.history.rooms.insert(
            "chat".into(),
            Retention {
                max_len: 100,
                max_age_secs: 3600,
            },
        );
        c.history.rooms.insert(
            "small".into(),
            Retention {
                max_len: 10,
                max_age_secs: 3600,
            },
        );
    })
    .await
}

async fn call(logic: &Logic, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .request(method, format!("{}{path}", logic.http))
        .bearer_auth(SECRET)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn push_room(logic: &Logic, ty: &str, room: &str, body: &str) -> Value {
    let path = format!("/goim/push/room?operation=1000&type={ty}&room={room}");
    let (status, v) = call(logic, reqwest::Method::POST, &path, body).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn history(logic: &Logic, path: &str) -> Value {
    let (status, v) = call(logic, reqwest::Method::GET, path, "").await;
    assert_eq!((status, v["code"].clone()), (200, json!(0)), "{v}");
    v["data"].clone()
}

fn ids(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn parse(id: &str) -> HistoryId {
    HistoryId::parse(id).unwrap()
}

/// Must-show 2: 20 room pushes, the last 5 in order with increasing ids, `after` pages forward,
/// bodies come back exactly as JSON mode shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_history_pages_forward_and_round_trips_bodies() {
    let redis = RedisServer::start();
    let logic = start(&redis).await;
    let bodies: Vec<String> = (1..=20)
        .map(|i| match i % 3 {
            0 => format!(
                r#"{{"n":{i},"big":123456789012345678901234567890,"text":"héllo \"{i}\""}}"#
            ),
            1 => format!("plain text {i} with \"quotes\" and ünïcode"),
            _ => format!("[{i},true,null]"),
        })
        .collect();
    for b in &bodies {
        let v = push_room(&logic, "chat", "h", b).await;
        assert_eq!(v["data"]["delivery"], json!("both"), "{v}");
    }
    let room = "chat%3A%2F%2Fh";
    let last5 = history(&logic, &format!("/rim/rooms/{room}/history?limit=5")).await;
    assert_eq!(last5["complete"], json!(true));
    let msgs = last5["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 5);
    for (m, body) in msgs.iter().zip(&bodies[15..]) {
        assert_eq!(m["op"], json!(1000));
        // A JSON body is embedded as JSON (every digit kept), anything else as a string.
        let want: Value = serde_json::from_str(body).unwrap_or(Value::String(body.clone()));
        assert_eq!(m["body"], want, "{m}");
        assert!(m["ts_ms"].as_u64().unwrap() > 0);
    }
    let text = reqwest::Client::new()
        .get(format!("{}/rim/rooms/{room}/history?limit=5", logic.http))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("123456789012345678901234567890"), "{text}");
    let last_ids: Vec<HistoryId> = ids(&last5).iter().map(|i| parse(i)).collect();
    assert!(last_ids.windows(2).all(|w| w[0] < w[1]), "{last_ids:?}");

    // Paging forward from the start (`0-0`): 7 at a time, everything once, in order.
    let mut seen: Vec<String> = Vec::new();
    let mut after = "0-0".to_string();
    loop {
        let page = history(
            &logic,
            &format!("/rim/rooms/{room}/history?after={after}&limit=7"),
        )
        .await;
        assert_eq!(page["complete"], json!(true));
        let got = ids(&page);
        if got.is_empty() {
            break;
        }
        after = got.last().unwrap().clone();
        seen.extend(got);
    }
    assert_eq!(seen.len(), 20);
    assert_eq!(seen[15..], ids(&last5)[..]);
    let all: Vec<HistoryId> = seen.iter().map(|i| parse(i)).collect();
    assert!(all.windows(2).all(|w| w[0] < w[1]));

    // Bad input is refused precisely.
    for (path, status) in [
        (format!("/rim/rooms/{room}/history?limit=0"), 400),
        (format!("/rim/rooms/{room}/history?limit=1001"), 400),
        (format!("/rim/rooms/{room}/history?after=nope"), 400),
        ("/rim/rooms/not-a-room/history".to_string(), 400),
        ("/rim/rooms/live%3A%2F%2F1/history".to_string(), 404),
        ("/rim/users/x/history".to_string(), 400),
    ] {
        let (got, v) = call(&logic, reqwest::Method::GET, &path, "").await;
        assert_eq!(got, status, "{path}: {v}");
    }
    let (_, v) = call(
        &logic,
        reqwest::Method::GET,
        "/rim/rooms/live%3A%2F%2F1/history",
        "",
    )
    .await;
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("history.rooms.live"),
        "{v}"
    );
    // The secret guards history like pushes.
    let r = reqwest::get(format!("{}/rim/rooms/{room}/history", logic.http))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(
        logic
            .metrics()
            .await
            .contains(r#"rim_logic_history_reads_total{by="http"}"#)
    );
    logic.stop().await;
}

/// A history keeps its `max_len` newest messages; reads that reach past what was trimmed say
/// `complete: false`, reads after it say `true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_history_reports_incomplete_reads() {
    let redis = RedisServer::start();
    let logic = start(&redis).await;
    for i in 1..=15 {
        push_room(&logic, "small", "t", &format!("m{i}")).await;
    }
    let room = "small%3A%2F%2Ft";
    let all = history(&logic, &format!("/rim/rooms/{room}/history?limit=100")).await;
    let kept: Vec<Value> = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(
        kept,
        (6..=15).map(|i| json!(format!("m{i}"))).collect::<Vec<_>>()
    );
    assert_eq!(all["complete"], json!(false), "m1-m5 fell out");
    let kept_ids = ids(&all);
    let from_kept = history(
        &logic,
        &format!("/rim/rooms/{room}/history?after={}", kept_ids[0]),
    )
    .await;
    assert_eq!(from_kept["complete"], json!(true));
    assert_eq!(ids(&from_kept), kept_ids[1..]);
    let from_start = history(&logic, &format!("/rim/rooms/{room}/history?after=0-0")).await;
    assert_eq!(from_start["complete"], json!(false));
    logic.stop().await;
}

fn connect_req(mid: i64, key: &str) -> ConnectRequest {
    ConnectRequest {
        server: "c1".into(),
        auth: AuthBody {
            mid,
            key: key.into(),
            platform: "web".into(),
            accepts: vec![1000],
            ..AuthBody::default()
        },
        remote_ip: "127.0.0.1".into(),
    }
}

/// Pushes to a user with no session are kept; a device that connects learns they wait and
/// reads them through the catch-up RPC (which counts them as given to it); pushes routed to a
/// live session count as given too, unless its disconnect says they never reached it; another
/// device still finds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_wait_per_device_until_it_got_them() {
    let redis = RedisServer::start();
    let logic = start(&redis).await;
    let rpc = logic.client().await;
    let mid = 4242;
    let push = |body: String| {
        let logic = &logic;
        async move {
            let path = format!("/goim/push/mids?operation=1000&mids={mid}");
            let (status, v) = call(logic, reqwest::Method::POST, &path, &body).await;
            assert_eq!(status, 200, "{v}");
            v["data"].clone()
        }
    };
    for i in 1..=5 {
        let v = push(format!("o{i}")).await;
        assert_eq!(
            (v["sessions"].clone(), v["delivery"].clone()),
            (json!(0), json!("stored"))
        );
    }
    let user = history(&logic, &format!("/rim/users/{mid}/history")).await;
    assert_eq!(ids(&user).len(), 5);
    // The secret guards a user's history like a room's: none, or a wrong one, is refused.
    for bearer in [None, Some("not-the-secret")] {
        let mut req = reqwest::Client::new().get(format!("{}/rim/users/{mid}/history", logic.http));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "bearer {bearer:?}");
    }

    // A keyless device (goim's clients) connects: everything waits for it.
    let reply = rpc
        .connect(ctx(), connect_req(mid, ""))
        .await
        .unwrap()
        .unwrap();
    assert!(
        reply.key.starts_with('~'),
        "generated keys are marked: {}",
        reply.key
    );
    assert_eq!(reply.offline_after, Some(HistoryId::default()));
    assert_eq!(reply.partitions, 16);
    let sref = SessionRef {
        server: "c1".into(),
        mid,
        key: reply.key.clone(),
    };
    let want = HistoryWant {
        source: Source::User,
        after: reply.offline_after,
        limit: 1000,
    };
    let pages = rpc
        .history(ctx(), sref.clone(), vec![want])
        .await
        .unwrap()
        .unwrap();
    let bodies: Vec<&[u8]> = pages[0].entries.iter().map(|e| &e.body[..]).collect();
    assert_eq!(bodies, [b"o1", b"o2", b"o3", b"o4", b"o5"]);
    assert!(pages[0].complete);
    let fifth = pages[0].entries.last().unwrap().id;
    assert_eq!(fifth.to_string(), *ids(&user).last().unwrap());

    // Routed live while it is online: given.
    let v = push("live-6".into()).await;
    assert_eq!(
        (v["sessions"].clone(), v["delivery"].clone()),
        (json!(1), json!("both"))
    );
    let sixth = parse(
        ids(&history(&logic, &format!("/rim/users/{mid}/history")).await)
            .last()
            .unwrap(),
    );
    rpc.disconnect(ctx(), sref, Some(sixth))
        .await
        .unwrap()
        .unwrap();
    let again = rpc
        .connect(ctx(), connect_req(mid, ""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again.offline_after, None,
        "the next keyless connect owes nothing"
    );

    // Routed to a session that ended before it got it (its disconnect says it got only up to
    // the sixth): the seventh waits for the device's next connect.
    let v = push("live-7".into()).await;
    assert_eq!(v["sessions"], json!(1));
    let older = SessionRef {
        server: "c1".into(),
        mid,
        key: again.key.clone(),
    };
    rpc.disconnect(ctx(), older, Some(sixth))
        .await
        .unwrap()
        .unwrap();
    let third = rpc
        .connect(ctx(), connect_req(mid, ""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.offline_after, Some(sixth));

    // A device with a key of its own has its own position: everything still waits for it.
    let phone = rpc
        .connect(ctx(), connect_req(mid, "phone"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(phone.offline_after, Some(HistoryId::default()));
    assert!(
        logic
            .metrics()
            .await
            .contains("rim_logic_offline_waiting_total 3")
    );
    logic.stop().await;
}

/// With users' history off, a push to nobody is neither routed nor kept, and says so; a push
/// to an online user, and one to a room whose type keeps no history, is delivered `live` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_user_history_a_push_to_nobody_is_not_kept() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.history.users.max_len = 0).await;
    let (status, v) = logic
        .post("/goim/push/mids?operation=1000&mids=99", "x")
        .await;
    assert_eq!(
        (status, v["data"]["delivery"].clone()),
        (200, json!("none")),
        "{v}"
    );
    let (status, v) = logic.get("/rim/users/99/history").await;
    assert_eq!(status, 404, "{v}");
    let mut conn = redis.connection();
    assert!(common::all_jobs(&mut conn).is_empty());

    // Online now: routed to its session, nothing kept.
    let rpc = logic.client().await;
    common::connect(&rpc, "c1", 99, "k99", "live://stage").await;
    let (status, v) = logic
        .post("/goim/push/mids?operation=1000&mids=99", "y")
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["data"]["sessions"].clone(), v["data"]["delivery"].clone()),
        (json!(1), json!("live")),
        "{v}"
    );
    // `live` rooms keep no history (only `chat` does in the dev config).
    let (status, v) = logic
        .post("/goim/push/room?operation=1000&type=live&room=stage", "z")
        .await;
    assert_eq!(
        (status, v["data"]["delivery"].clone()),
        (200, json!("live")),
        "{v}"
    );
    let (status, v) = logic.get("/rim/users/99/history").await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(common::all_jobs(&mut conn).len(), 2, "both routed");
    logic.stop().await;
}

/// `history.deliver_on_connect = false`: a push to an offline user is still kept (and read
/// back), but a device that connects is not told anything waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_deliver_on_connect_offline_pushes_are_kept_but_not_owed() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| {
        c.push.secret = SECRET.into();
        c.history.deliver_on_connect = false;
    })
    .await;
    let mid = 77;
    let path = format!("/goim/push/mids?operation=1000&mids={mid}");
    for body in ["o1", "o2"] {
        let (status, v) = call(&logic, reqwest::Method::POST, &path, body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["data"]["delivery"], json!("stored"), "{v}");
    }
    let user = history(&logic, &format!("/rim/users/{mid}/history")).await;
    let bodies: Vec<Value> = user["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(bodies, [json!("o1"), json!("o2")]);
    let rpc = logic.client().await;
    for key in ["", "phone"] {
        let reply = rpc
            .connect(ctx(), connect_req(mid, key))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.offline_after, None, "key {key:?}");
    }
    assert!(
        logic
            .metrics()
            .await
            .contains("rim_logic_offline_waiting_total 0"),
    );
    logic.stop().await;
}
