//! Room permissions and token lifetimes against the real binaries: logic in token mode (v1 and
//! HS256 JWT) with `[rooms.vip]` joined and posted only with a token naming the room,
//! `[rooms.ask]` decided by a room hook served by this test, a comet and a job. Shows: a JWT's
//! `rooms` bounding ChangeRoom; each policy allowing and refusing, at Auth and at ChangeRoom, and
//! for posts; a session closed with op 6 `token expired` at its token's expiry, and a session
//! that sent a fresh token (op 22) living on past it.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::routing::post;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rim_client::ClientError;
use rim_proto::msg::AuthBody;
use rim_proto::op;
use rim_testkit::api::{Api, metric};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{self, CometAddrs, free_addr};
use rim_testkit::redis::RedisServer;
use serde_json::{Value, json};

const V1_SECRET: &str = "v1-room-test-secret";
const JWT_SECRET: &str = "jwt-room-test-secret";
/// The only mid the room hook lets into `ask://` rooms.
const ALLOWED: i64 = 601;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt(mid: i64, rooms: Option<&[&str]>) -> String {
    let mut c = json!({"sub": mid.to_string(), "exp": now() + 3600});
    if let Some(r) = rooms {
        c["rooms"] = json!(r);
    }
    let key = EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::HS256), &c, &key).unwrap()
}

fn v1(mid: i64, expiry: u64) -> String {
    rim_logic::auth::issue_token_until(V1_SECRET, mid, expiry)
}

fn auth(mid: i64, room: &str, token: String) -> AuthBody {
    AuthBody {
        mid,
        room_id: room.into(),
        accepts: vec![1000],
        platform: "test".into(),
        token,
        ..Default::default()
    }
}

/// The `{"error":...}` of a reply, or "" when it has none.
fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_default()
}

async fn change_room(c: &mut Conn, room: &str) -> String {
    c.send_op(op::CHANGE_ROOM, room.as_bytes().to_vec())
        .await
        .unwrap();
    let r = c.recv_op(op::CHANGE_ROOM_REPLY).await.unwrap();
    error_of(&r.frame.body)
}

/// A room hook: allows [`ALLOWED`] and refuses everyone else with a reason; checks the bearer.
async fn start_hook() -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/check",
        post(
            |headers: axum::http::HeaderMap, Json(req): Json<Value>| async move {
                let authed = headers
                    .get("authorization")
                    .is_some_and(|v| v == "Bearer hook-secret");
                let allow = authed && req["mid"] == json!(ALLOWED);
                Json(json!({"allow": allow, "reason": "not on the list"}))
            },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_policies_and_token_lifetimes_hold_against_real_processes() {
    let hook = start_hook().await;
    let redis = RedisServer::start();
    let (logic_http, logic_rpc) = (free_addr(), free_addr());
    let env = [
        ("RIM_LOGIC__AUTH__MODE", "token".to_string()),
        ("RIM_LOGIC__AUTH__SECRET", V1_SECRET.to_string()),
        ("RIM_LOGIC__AUTH__JWT_SECRET", JWT_SECRET.to_string()),
        ("RIM_LOGIC__ROOMS__VIP__JOIN", "token".to_string()),
        ("RIM_LOGIC__ROOMS__VIP__POST", "token".to_string()),
        ("RIM_LOGIC__ROOMS__ASK__JOIN", "backend".to_string()),
        ("RIM_LOGIC__ROOMS__ASK__POST", "backend".to_string()),
        ("RIM_LOGIC__ROOM_HOOK__URL", format!("http://{hook}/check")),
        ("RIM_LOGIC__ROOM_HOOK__SECRET", "hook-secret".to_string()),
    ];
    let _logic = process::logic(&redis.url(), logic_http, logic_rpc, &env);
    let _job = process::job(&redis.url(), free_addr(), &[]);
    let a = CometAddrs::free();
    let _comet = process::comet("rooms-comet-1", a, logic_rpc, &[]);
    let api = Api::new(logic_http);
    api.wait_live_nodes(1, Duration::from_secs(20))
        .await
        .unwrap();
    let connect = |mid, room: &str, token| {
        let body = auth(mid, room, token);
        async move { Conn::connect(Transport::Tcp, a.tcp, &body).await }
    };
    let refused = |r: Result<Conn, ClientError>, why: &str| match r {
        Err(ClientError::AuthRefused(c)) if c.said(why) => {}
        Err(e) => panic!("{why}: refused otherwise: {e}"),
        Ok(_) => panic!("{why}: connected"),
    };

    // A JWT's rooms bound ChangeRoom too, and the session stays where it was.
    let mut live = connect(601, "live://1", jwt(601, Some(&["live://*"])))
        .await
        .unwrap();
    assert_eq!(
        change_room(&mut live, "chat://1").await,
        "room not allowed by token"
    );
    assert_eq!(change_room(&mut live, "live://2").await, "");
    api.push_room(1000, "live", "2", b"in-live-2")
        .await
        .unwrap();
    assert_eq!(
        &live.recv_push().await.unwrap().frame.body[..],
        b"in-live-2"
    );

    // `token` policy: a token without a rooms claim is refused at Auth and at ChangeRoom; one
    // naming the type gets in, and may post.
    let plain = v1(602, now() + 3600);
    refused(
        connect(602, "vip://1", plain.clone()).await,
        "room requires a token that names it",
    );
    let mut c602 = connect(602, "", plain).await.unwrap();
    assert!(
        change_room(&mut c602, "vip://1")
            .await
            .contains("room requires a token")
    );
    let mut vip = connect(603, "vip://1", jwt(603, Some(&["vip://*"])))
        .await
        .unwrap();
    let posted = post_to_room(&mut vip, "vip://1").await;
    assert_eq!(posted["code"], json!(0), "{posted}");

    // `backend` policy: the hook decides, at Auth, at ChangeRoom and for posts.
    let mut asker = connect(ALLOWED, "ask://1", jwt(ALLOWED, None))
        .await
        .unwrap();
    let posted = post_to_room(&mut asker, "ask://1").await;
    assert_eq!(posted["code"], json!(0), "{posted}");
    refused(
        connect(604, "ask://1", jwt(604, None)).await,
        "not on the list",
    );
    let mut c604 = connect(604, "", jwt(604, None)).await.unwrap();
    assert!(
        change_room(&mut c604, "ask://1")
            .await
            .contains("not on the list")
    );
    // Refused: vip at Auth and ChangeRoom, ask at Auth and ChangeRoom. Allowed: live, vip and
    // ask at Auth (open types are checked at Auth too; the ChangeRoom into live:// was not asked).
    let checks = |kind: &'static str, result: &'static str| async move {
        let name = format!("rim_logic_room_{kind}_checks_total{{result=\"{result}\"}}");
        metric(logic_http, &name).await
    };
    assert_eq!(checks("join", "refused").await, Some(4));
    assert_eq!(checks("join", "allowed").await, Some(3));
    // The two posts (vip, ask), both allowed.
    assert_eq!(checks("post", "allowed").await, Some(2));

    // Two sessions whose v1 tokens end at the same second: one sends a fresh token and lives
    // on; the other is closed with op 6 "token expired" at that second.
    let end = now() + 3;
    let mut stays = connect(605, "", v1(605, end)).await.unwrap();
    let mut ends = connect(606, "", v1(606, end)).await.unwrap();
    stays
        .send_op(op::REFRESH_TOKEN, v1(605, now() + 3600).into_bytes())
        .await
        .unwrap();
    let r = stays.recv_op(op::REFRESH_TOKEN_REPLY).await.unwrap();
    let v: Value = serde_json::from_slice(&r.frame.body).unwrap();
    assert!(v["expires_ms"].as_u64().unwrap() > (end + 60) * 1000, "{v}");
    // A fresh token for another mid is refused and changes nothing.
    stays
        .send_op(op::REFRESH_TOKEN, v1(606, now() + 3600).into_bytes())
        .await
        .unwrap();
    let r = stays.recv_op(op::REFRESH_TOKEN_REPLY).await.unwrap();
    assert!(error_of(&r.frame.body).contains("token invalid"), "{r:?}");

    let closed = ends.expect_closed().await.unwrap();
    assert!(closed.said("token expired"), "{closed:?}");
    assert!(now() >= end, "closed before the token's end");
    // Past the shared end: the refreshed session still gets pushes.
    api.push_mids(1000, &[605], b"still-here").await.unwrap();
    assert_eq!(
        &stays.recv_push().await.unwrap().frame.body[..],
        b"still-here"
    );
    assert_eq!(
        metric(a.ops, "rim_comet_token_expired_total").await,
        Some(1)
    );
}

/// Posts a room message (op 4) and returns the op 5 reply.
async fn post_to_room(c: &mut Conn, room: &str) -> Value {
    let body = json!({"room": room, "op": 1000, "data": {"t": "hi"}});
    c.send_op(op::SEND_MSG, serde_json::to_vec(&body).unwrap())
        .await
        .unwrap();
    let r = c.recv_op(op::SEND_MSG_REPLY).await.unwrap();
    serde_json::from_slice(&r.frame.body).unwrap()
}
