//! logic's own limits against a real Redis: `session.max_per_mid` refuses a user's next session
//! (a key it already holds re-authenticates freely, and a slot frees when a session ends), and
//! `push.rate_per_sec` answers 429 past its burst and recovers as the bucket refills. Both are
//! counted in `rim_logic_limit_refused_total{limit}`.
#![allow(clippy::unwrap_used)]

use rim_proto::msg::AuthBody;
use rim_proto::rpc::{ConnectRequest, LogicError, SessionRef};
use rim_testkit::redis::RedisServer;

mod common;
use common::{Logic, ctx};

fn connect(mid: i64, key: &str) -> ConnectRequest {
    ConnectRequest {
        server: "comet-limits".into(),
        auth: AuthBody {
            mid,
            key: key.into(),
            ..Default::default()
        },
        remote_ip: "10.0.0.1".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_sessions_are_bounded_and_a_slot_frees_when_one_ends() {
    let redis = RedisServer::start();
    let logic = Logic::start(&redis, |c| c.session.max_per_mid = 2).await;
    let rpc = logic.client().await;
    // A session whose disconnect was lost: in the user's index, but its hash is gone. It does
    // not take a slot.
    let mut conn = redis.connection();
    let _: () = redis::cmd("HSET")
        .arg(rim_proto::keys::mid_sessions(7))
        .arg("ghost")
        .arg("comet-gone")
        .query(&mut conn)
        .unwrap();
    for key in ["a", "b"] {
        rpc.connect(ctx(), connect(7, key)).await.unwrap().unwrap();
    }
    let e = rpc
        .connect(ctx(), connect(7, "c"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&e, LogicError::Forbidden(m) if m.contains("too many sessions for this user")),
        "{e}"
    );
    // Re-authenticating a key the user holds is not a new session; other users are unaffected.
    rpc.connect(ctx(), connect(7, "a")).await.unwrap().unwrap();
    rpc.connect(ctx(), connect(8, "x")).await.unwrap().unwrap();
    // A session ends: its slot is free again.
    let gone = SessionRef {
        server: "comet-limits".into(),
        mid: 7,
        key: "b".into(),
    };
    rpc.disconnect(ctx(), gone, None).await.unwrap().unwrap();
    rpc.connect(ctx(), connect(7, "c")).await.unwrap().unwrap();
    assert!(
        logic
            .metrics()
            .await
            .contains("rim_logic_limit_refused_total{limit=\"sessions_per_mid\"} 1")
    );
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_past_the_rate_get_429_and_pass_again_once_it_refills() {
    let redis = RedisServer::start();
    // One token per second, burst 3: the fourth push in a row is over.
    let logic = Logic::start(&redis, |c| {
        c.push.rate_per_sec = 1;
        c.push.rate_burst = 3;
    })
    .await;
    let push = "/goim/push/mids?operation=1000&mids=7";
    for _ in 0..3 {
        let (status, v) = logic.post(push, "x").await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = logic.post(push, "x").await;
    assert_eq!((status, v["code"].as_i64()), (429, Some(-429)), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("push.rate_per_sec"),
        "{v}"
    );
    // The bucket refills at 1/s: within a few seconds a push passes again.
    common::eventually("a push accepted after the refill", || async {
        logic.post(push, "x").await.0 == 200
    })
    .await;
    let m = logic.metrics().await;
    assert!(
        m.lines().any(
            |l| l.starts_with("rim_logic_limit_refused_total{limit=\"push_rate\"}")
                && !l.ends_with(" 0")
        ),
        "{m}"
    );
    assert!(
        m.contains("rim_logic_http_responses_total{status=\"429\"}"),
        "{m}"
    );
    logic.stop().await;
}
