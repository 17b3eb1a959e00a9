//! logic against a Redis that hangs: a proxy between them (`rim_testkit::proxy`) stops relaying,
//! so connections stay open and nothing is answered, as with a stopped or wedged server. A push
//! is then answered 503 (the reply did not come within `redis.timeout_ms`) rather than left waiting, `/readyz`
//! says not ready, and once Redis answers again pushes are accepted; the push that was refused
//! never reaches the stream (its bytes died with the connection the hang held).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rim_testkit::proxy::{FaultProxy, Mode, Stats, Upstream};
use rim_testkit::redis::RedisServer;
use serde_json::Value;

mod common;
use common::{Logic, eventually};

/// Longer than anything logic should take: a reply missing past it means logic hung too.
const CLIENT_WAIT: Duration = Duration::from_secs(20);

async fn push(logic: &Logic, mid: i64) -> (u16, Value) {
    tokio::time::timeout(
        CLIENT_WAIT,
        logic.post(&format!("/goim/push/mids?operation=1000&mids={mid}"), "x"),
    )
    .await
    .expect("logic answers a push while Redis hangs")
}

async fn ready(logic: &Logic) -> u16 {
    tokio::time::timeout(CLIENT_WAIT, logic.get("/readyz"))
        .await
        .expect("logic answers /readyz while Redis hangs")
        .0
}

fn stream_entries(redis: &RedisServer) -> u64 {
    let mut c = redis.connection();
    (0..rim_proto::job::DEFAULT_PARTITIONS)
        .map(|p| {
            redis::cmd("XLEN")
                .arg(rim_proto::keys::push_stream(p))
                .query::<u64>(&mut c)
                .unwrap()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_gets_a_503_within_the_timeout_and_logic_recovers() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(Upstream::Unix(redis.socket_path())).await;
    let logic = Logic::start(&redis, |c| {
        c.redis.url = format!("redis://{}/", proxy.addr());
        c.redis.timeout_ms = 500;
    })
    .await;

    // A push to a user (kept for them while offline: users' history is on by default) is one
    // stream entry.
    let (status, v) = push(&logic, 1).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(stream_entries(&redis), 1);

    // The hang. Evidence first: the proxy relays nothing more, and a push is refused as Redis
    // being unavailable (a reply that did not come in time), not left waiting.
    proxy.set(Mode::Blackhole);
    let relayed = Stats::get(&proxy.stats().up);
    let (status, v) = push(&logic, 2).await;
    assert_eq!(status, 503, "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.starts_with("redis unavailable") && message.contains("time"),
        "{message}"
    );
    assert_eq!(
        Stats::get(&proxy.stats().up),
        relayed,
        "relayed during the hang"
    );
    assert_eq!(ready(&logic).await, 503);
    assert!(
        logic
            .metrics()
            .await
            .contains("\nrim_logic_pushes_refused_total 1\n")
    );

    // Redis comes back: the held connections are cut (what a wedged server's restart does), new
    // ones are relayed. logic reconnects by itself.
    proxy.set(Mode::Refuse);
    proxy.set(Mode::Forward);
    eventually("pushes accepted again", || async {
        tokio::time::timeout(
            CLIENT_WAIT,
            logic.post("/goim/push/mids?operation=1000&mids=3", "x"),
        )
        .await
        .is_ok_and(|(status, _)| status == 200)
    })
    .await;
    assert_eq!(ready(&logic).await, 200);
    // Only accepted pushes are in the streams: the first, and those after the recovery (the
    // eventually loop may have needed more than one). The refused one is not.
    let accepted = logic
        .metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("rim_logic_pushes_accepted_total{kind=\"mids\"} "))
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert_eq!(stream_entries(&redis), accepted);
    logic.stop().await;
}
