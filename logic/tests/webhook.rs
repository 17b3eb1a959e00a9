//! The bot webhook against a real throwaway redis-server and a real HTTP bot: what is forwarded
//! and what is not, replies published, timeouts and retries counted without delaying the sender,
//! answers that are never followed elsewhere nor read past a bound, and a full queue counted.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rim_proto::job::{Route, ServerKeys};
use rim_proto::rpc::{LogicRpcClient, SendTarget};
use rim_testkit::redis::RedisServer;
use serde_json::{Value, json};

mod common;
use common::{Logic, all_jobs, connect, ctx, eventually, msg, room, sref};

/// Mid 5 (session `k5` on `c1`, registered in chat://lobby) says `data` in the lobby; the
/// accepted message's id.
async fn say_in_lobby(rpc: &LogicRpcClient, data: &str) -> String {
    rpc.send_msg(
        ctx(),
        msg(
            sref("c1", 5, "k5"),
            Some("chat://lobby"),
            SendTarget::Room(room("chat://lobby")),
            data,
        ),
    )
    .await
    .unwrap()
    .unwrap()
    .id
}

/// A bot: records what it receives; answers with `reply` after `delay` (None = never answers).
async fn bot(
    reply: Value,
    delay: Option<Duration>,
) -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<Value>,
    Arc<AtomicUsize>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let done = Arc::new(AtomicUsize::new(0));
    let done2 = done.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let (tx, reply, done) = (tx.clone(), reply.clone(), done2.clone());
            async move {
                let _ = tx.send(v);
                match delay {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending::<()>().await,
                }
                done.fetch_add(1, Ordering::SeqCst);
                axum::Json(reply)
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, rx, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_forwards_messages_and_publishes_replies() {
    let redis = RedisServer::start();
    let reply = json!({"replies":[
        {"room":"chat://lobby","op":1001,"data":{"text":"beep"}},
        {"mid":5,"op":1002,"data":"hello"},
        {"op":1000,"data":"no target"}
    ]});
    let (url, mut hits, _) = bot(reply, Some(Duration::ZERO)).await;
    let logic = Logic::start(&redis, |c| {
        c.webhook.url = url;
        c.webhook.room_types = vec!["chat".into()];
        c.webhook.mids = vec![42];
        c.webhook.bot_mid = 42;
    })
    .await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    connect(&rpc, "c1", 5, "k5", "chat://lobby").await;
    connect(&rpc, "c1", 6, "k6", "live://1").await;

    // A room type not listed: not forwarded.
    rpc.send_msg(
        ctx(),
        msg(
            sref("c1", 6, "k6"),
            Some("live://1"),
            SendTarget::Room(room("live://1")),
            "1",
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let acc = say_in_lobby(&rpc, r#"{"text":"hi bot"}"#).await;
    let got = tokio::time::timeout(rim_testkit::WAIT, hits.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        json!({"id":acc,"from":5,"room":"chat://lobby","op":1000,"data":{"text":"hi bot"}})
    );
    eventually("bot replies queued", || {
        let mut c = redis.connection();
        async move { all_jobs(&mut c).iter().any(|(_, j)| j.op == 1002) }
    })
    .await;
    let jobs = all_jobs(&mut conn);
    let room_reply = &jobs.iter().find(|(_, j)| j.op == 1001).unwrap().1;
    assert_eq!(room_reply.route, Route::Room(room("chat://lobby")));
    let body: Value = serde_json::from_slice(&room_reply.body).unwrap();
    assert_eq!(body, json!({"from":42,"data":{"text":"beep"}}));
    let mid_reply = &jobs.iter().find(|(_, j)| j.op == 1002).unwrap().1;
    assert_eq!(
        mid_reply.route,
        Route::Sessions(vec![ServerKeys {
            server: "c1".into(),
            keys: vec!["k5".into()]
        }])
    );

    // A message to a listed mid is forwarded too (the bot's mid needs a session to be online).
    connect(&rpc, "c1", 42, "kbot", "").await;
    rpc.send_msg(
        ctx(),
        msg(sref("c1", 5, "k5"), None, SendTarget::Mid(42), "\"ping\""),
    )
    .await
    .unwrap()
    .unwrap();
    let got = tokio::time::timeout(rim_testkit::WAIT, hits.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (got["mid"].clone(), got["data"].clone()),
        (json!(42), json!("ping"))
    );
    assert!(
        hits.try_recv().is_err(),
        "the live:// message was not forwarded"
    );
    eventually("bad reply counted", || async {
        logic
            .metrics()
            .await
            .contains("rim_logic_webhook_bad_replies_total 2")
    })
    .await;
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_timeout_never_delays_send_and_counts_a_failure() {
    let redis = RedisServer::start();
    let (url, mut hits, answered) = bot(json!({}), None).await;
    let logic = Logic::start(&redis, |c| {
        c.webhook.url = url;
        c.webhook.room_types = vec!["chat".into()];
        c.webhook.timeout_ms = 200;
        c.webhook.retries = 1;
    })
    .await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    connect(&rpc, "c1", 5, "k5", "chat://lobby").await;
    let acc = say_in_lobby(&rpc, "1").await;
    // Accepted and queued while the forward is still pending: had send_msg waited for the
    // webhook, its failure (after the timeouts and the retry) would already be counted.
    let m = logic.metrics().await;
    assert!(m.contains("rim_logic_webhook_failures_total 0"), "{m}");
    assert_eq!(answered.load(Ordering::SeqCst), 0);
    assert!(all_jobs(&mut conn).iter().any(|(_, j)| j.msg_id == acc));
    // First attempt and one retry reach the bot; then the forward is counted as failed.
    for _ in 0..2 {
        let got = tokio::time::timeout(rim_testkit::WAIT, hits.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got["id"], json!(acc));
    }
    eventually("webhook failure counted", || async {
        logic
            .metrics()
            .await
            .contains("rim_logic_webhook_failures_total 1")
    })
    .await;
    assert_eq!(answered.load(Ordering::SeqCst), 0);
    logic.stop().await;
}

/// A bot that answers every forward with a redirect to `/elsewhere` (counting visits there) or,
/// at `/big`, with a 2 MiB body.
async fn misbehaving_bot() -> (String, Arc<AtomicUsize>) {
    let followed = Arc::new(AtomicUsize::new(0));
    let seen = followed.clone();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|| async {
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, "/elsewhere")],
                )
            }),
        )
        .route(
            "/elsewhere",
            axum::routing::post(move || {
                seen.fetch_add(1, Ordering::SeqCst);
                async { axum::Json(json!({"replies": []})) }
            }),
        )
        .route(
            "/big",
            axum::routing::post(|| async { " ".repeat(2 << 20) }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (base, followed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_answers_are_not_followed_elsewhere_nor_read_past_a_bound() {
    let (base, followed) = misbehaving_bot().await;
    for (path, failures) in [("/hook", 1), ("/big", 1)] {
        let redis = RedisServer::start();
        let logic = Logic::start(&redis, |c| {
            c.webhook.url = format!("{base}{path}");
            c.webhook.room_types = vec!["chat".into()];
            c.webhook.retries = 0;
        })
        .await;
        let rpc = logic.client().await;
        connect(&rpc, "c1", 5, "k5", "chat://lobby").await;
        say_in_lobby(&rpc, "1").await;
        let counted = format!("rim_logic_webhook_failures_total {failures}");
        eventually("webhook failure counted", || async {
            logic.metrics().await.contains(&counted)
        })
        .await;
        logic.stop().await;
    }
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );
}

/// A full forward queue drops the forward, counts it, and never delays or refuses the message:
/// with one worker stuck on a bot that never answers and a queue of one, the first message is
/// in flight, the second queued and the third dropped; all three are accepted and queued for
/// delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_webhook_queue_is_counted_and_never_delays_send() {
    let redis = RedisServer::start();
    let (url, mut hits, _) = bot(json!({}), None).await;
    let logic = Logic::start(&redis, |c| {
        c.webhook.url = url;
        c.webhook.room_types = vec!["chat".into()];
        c.webhook.queue = 1;
        c.webhook.concurrency = 1;
        c.webhook.timeout_ms = 60_000;
        c.webhook.retries = 0;
    })
    .await;
    let rpc = logic.client().await;
    let mut conn = redis.connection();
    connect(&rpc, "c1", 5, "k5", "chat://lobby").await;
    let first = say_in_lobby(&rpc, "1").await;
    // The only worker holds the first forward (the bot never answers), so the queue is empty.
    let got = tokio::time::timeout(rim_testkit::WAIT, hits.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got["id"], json!(first));
    let second = say_in_lobby(&rpc, "2").await;
    let third = say_in_lobby(&rpc, "3").await;
    let m = logic.metrics().await;
    assert!(m.contains("rim_logic_webhook_queued_total 2"), "{m}");
    assert!(m.contains("rim_logic_webhook_dropped_total 1"), "{m}");
    assert!(m.contains("rim_logic_webhook_failures_total 0"), "{m}");
    let queued: Vec<String> = all_jobs(&mut conn)
        .into_iter()
        .map(|(_, j)| j.msg_id)
        .collect();
    for id in [&first, &second, &third] {
        assert!(
            queued.contains(id),
            "message {id} was not queued: {queued:?}"
        );
    }
    assert!(hits.try_recv().is_err(), "nothing else reached the bot");
    logic.stop().await;
}
