//! `[cluster] secret` against real processes: a comet, job or raw RPC client without the right
//! secret gets nothing done on logic's or a comet's RPC port and is counted; the RPC listener's
//! connection cap and frame limit hold. (The process helpers start every tier with
//! `process::CLUSTER_SECRET`; the tests override it per process.)
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use rim_proto::msg::AuthBody;
use rim_proto::rpc::{CometRpcClient, DeliverTarget, Delivery, LogicRpcClient, PushId};
use rim_runtime::cluster::{Cluster, ClusterConfig};
use rim_runtime::rpc::Link;
use rim_runtime::rpc_tls::RpcStream;
use rim_testkit::api::{Api, eventually, metric, streams_drained};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{self, CLUSTER_SECRET, CometAddrs, binary, free_addr, repo};
use rim_testkit::redis::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WRONG: &str = "a wrong secret of enough length";
const WAIT: Duration = Duration::from_secs(20);

/// Waits until `name` on `http` is at least `n`.
async fn metric_reaches(http: SocketAddr, name: &str, n: u64) {
    eventually(&format!("{name} >= {n} on {http}"), WAIT, || async move {
        metric(http, name).await.filter(|v| *v >= n).map(|_| ())
    })
    .await
    .unwrap();
}

const ACCEPT_REFUSED: &str = "rim_rpc_auth_refused_total{side=\"accept\"}";
const DIAL_REFUSED: &str = "rim_rpc_auth_refused_total{side=\"dial\"}";

fn secret_env(var: &'static str, secret: &str) -> Vec<(&'static str, String)> {
    vec![(var, secret.to_string())]
}

fn cluster(secret: &str) -> Cluster {
    let cfg = ClusterConfig {
        secret: secret.into(),
        ..ClusterConfig::default()
    };
    Cluster::new(&cfg, "test", Default::default())
}

fn logic_link(addr: SocketAddr, secret: &str) -> Link<LogicRpcClient> {
    let c = cluster(secret);
    Link::new("logic", vec![addr.to_string()], WAIT, c.clone(), move |s| {
        LogicRpcClient::new(Default::default(), c.transport(s)).spawn()
    })
}

fn comet_link(addr: SocketAddr, secret: &str) -> Link<CometRpcClient> {
    let c = cluster(secret);
    Link::new("comet", vec![addr.to_string()], WAIT, c.clone(), move |s| {
        CometRpcClient::new(Default::default(), c.transport(s)).spawn()
    })
}

fn auth(mid: i64) -> AuthBody {
    AuthBody {
        mid,
        platform: "test".into(),
        accepts: vec![1000],
        ..Default::default()
    }
}

async fn live_nodes(api: &Api) -> Vec<String> {
    let r = api.get("/goim/nodes/instances").await.unwrap();
    r.data()
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n["server"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comets_without_the_secret_cannot_register_or_authenticate_clients() {
    let redis = RedisServer::start();
    let (http, rpc) = (free_addr(), free_addr());
    let _logic = process::logic(&redis.url(), http, rpc, &[]);
    let (wrong, none, right) = (CometAddrs::free(), CometAddrs::free(), CometAddrs::free());
    let _c1 = process::comet(
        "comet-wrong",
        wrong,
        rpc,
        &secret_env("RIM_COMET__CLUSTER__SECRET", WRONG),
    );
    let _c2 = process::comet(
        "comet-none",
        none,
        rpc,
        &secret_env("RIM_COMET__CLUSTER__SECRET", ""),
    );
    let _c3 = process::comet("comet-right", right, rpc, &[]);
    let api = Api::new(http);
    api.wait_live_nodes(1, WAIT).await.unwrap();

    // Both bad comets keep trying (renewals every 200 ms) and are refused each time; the wrong
    // one also sees that logic cannot prove *its* secret.
    metric_reaches(http, ACCEPT_REFUSED, 6).await;
    metric_reaches(wrong.ops, DIAL_REFUSED, 2).await;
    assert_eq!(live_nodes(&api).await, vec!["comet-right".to_string()]);

    for bad in [wrong, none] {
        let r = Conn::connect(Transport::Tcp, bad.tcp, &auth(7)).await;
        assert!(
            r.is_err(),
            "a session authenticated through a refused comet"
        );
    }
    let ok = Conn::connect(Transport::Tcp, right.tcp, &auth(7)).await;
    assert!(ok.is_ok(), "{:?}", ok.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_the_secret_cannot_deliver_until_one_with_it_comes() {
    let redis = RedisServer::start();
    let (http, rpc) = (free_addr(), free_addr());
    let _logic = process::logic(&redis.url(), http, rpc, &[]);
    let comet = CometAddrs::free();
    let _comet = process::comet("comet-1", comet, rpc, &[]);
    let api = Api::new(http);
    api.wait_live_nodes(1, WAIT).await.unwrap();
    let mut client = Conn::connect(Transport::Tcp, comet.tcp, &auth(42))
        .await
        .unwrap();

    // Short leases so the next job takes the partition over quickly; no giving up on a comet.
    let job_env = |secret: &str| {
        vec![
            ("RIM_JOB__CLUSTER__SECRET", secret.to_string()),
            ("RIM_JOB__LEASE__TTL_MS", "1000".to_string()),
            ("RIM_JOB__LEASE__RENEW_MS", "250".to_string()),
            ("RIM_JOB__REGISTRY__REFRESH_MS", "200".to_string()),
            ("RIM_JOB__DELIVERY__RETRY_MAX_MS", "200".to_string()),
            ("RIM_JOB__DELIVERY__GIVE_UP_MS", "600000".to_string()),
            ("RIM_JOB__STREAM__BLOCK_MS", "200".to_string()),
        ]
    };
    api.push_mids(1000, &[42], b"held back").await.unwrap();

    // No secret: the comet refuses each attempt.
    let job_http = free_addr();
    let mut job = process::job(&redis.url(), job_http, &job_env(""));
    metric_reaches(comet.ops, ACCEPT_REFUSED, 2).await;
    job.kill9();
    // A wrong secret: refused on both sides.
    let job_http = free_addr();
    let mut job = process::job(&redis.url(), job_http, &job_env(WRONG));
    metric_reaches(job_http, DIAL_REFUSED, 2).await;
    let refused = metric(comet.ops, ACCEPT_REFUSED).await.unwrap();
    metric_reaches(comet.ops, ACCEPT_REFUSED, refused + 2).await;
    job.kill9();

    // Nothing was confirmed, so nothing was acknowledged: the push is still pending.
    assert!(!streams_drained(&mut redis.connection()).unwrap());

    // The right secret: the held push arrives, and the stream drains.
    let _job = process::job(&redis.url(), free_addr(), &job_env(CLUSTER_SECRET));
    let got = client.recv_push().await.unwrap();
    assert_eq!(&got.frame.body[..], b"held back");
    eventually("stream drained", WAIT, || {
        let mut conn = redis.connection();
        async move { streams_drained(&mut conn).ok().filter(|d| *d).map(|_| ()) }
    })
    .await
    .unwrap();
}

fn push_to(key: &str, seq: u64, body: &'static [u8]) -> Vec<Delivery> {
    vec![Delivery {
        id: PushId {
            partition: 0,
            ms: 1,
            seq,
        },
        op: 1000,
        body: Bytes::from_static(body),
        target: DeliverTarget::Keys(vec![key.to_string()]),
        exclude: None,
        recorded: false,
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_rpc_clients_without_the_secret_are_refused_before_any_method_runs() {
    let redis = RedisServer::start();
    let (http, rpc) = (free_addr(), free_addr());
    let _logic = process::logic(&redis.url(), http, rpc, &[]);
    let comet = CometAddrs::free();
    let _comet = process::comet("comet-1", comet, rpc, &[]);
    let api = Api::new(http);
    api.wait_live_nodes(1, WAIT).await.unwrap();
    let mut client = Conn::connect(Transport::Tcp, comet.tcp, &auth(5))
        .await
        .unwrap();
    let key = client.key().to_string();
    let cx = || rim_runtime::rpc::context(Duration::from_secs(5));

    // LogicRpc::push_mids, without and with a wrong secret: refused, counted, nothing queued.
    let before = metric(http, ACCEPT_REFUSED).await.unwrap();
    for secret in ["", WRONG] {
        let link = logic_link(rpc, secret);
        let r = link
            .call(|c| async move { c.push_mids(cx(), 1000, vec![5], Bytes::new()).await })
            .await;
        assert!(r.is_err(), "push_mids ran without the secret: {r:?}");
    }
    metric_reaches(http, ACCEPT_REFUSED, before + 2).await;
    let mids = metric(http, "rim_logic_pushes_accepted_total{kind=\"mids\"}").await;
    assert_eq!(mids, Some(0));

    // CometRpc::deliver likewise; then the same call with the secret goes through, and it is
    // the first push the session sees (the refused ones never reached it).
    for secret in ["", WRONG] {
        let link = comet_link(comet.rpc, secret);
        let items = push_to(&key, 1, b"forged");
        let r = link
            .call(|c| async move { c.deliver(cx(), items).await })
            .await;
        assert!(r.is_err(), "deliver ran without the secret: {r:?}");
    }
    metric_reaches(comet.ops, ACCEPT_REFUSED, 2).await;
    let link = comet_link(comet.rpc, CLUSTER_SECRET);
    let items = push_to(&key, 2, b"genuine");
    let report = link
        .call(|c| async move { c.deliver(cx(), items).await })
        .await
        .unwrap();
    assert_eq!(report.queued, 1);
    assert_eq!(
        &client.recv_push().await.unwrap().frame.body[..],
        b"genuine"
    );
}

/// A fresh connection to `addr` that passed the handshake with `secret`, or why not.
async fn handshaken(addr: SocketAddr, c: &Cluster) -> Result<RpcStream, String> {
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    c.dial(s, "comet").await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpc_listener_caps_connections_and_frames() {
    // A comet alone (its logic is not there; its CometRpc still serves).
    let comet = CometAddrs::free();
    let env = [
        ("RIM_COMET__CLUSTER__MAX_CONNECTIONS", "2".to_string()),
        ("RIM_COMET__CLUSTER__MAX_FRAME_BYTES", "65536".to_string()),
    ];
    let _comet = process::comet("comet-1", comet, free_addr(), &env);
    let c = cluster(CLUSTER_SECRET);
    let a = eventually("comet rpc up", WAIT, || {
        let c = c.clone();
        async move { handshaken(comet.rpc, &c).await.ok() }
    })
    .await
    .unwrap();
    let a = CometRpcClient::new(Default::default(), c.transport(a)).spawn();
    let cx = || rim_runtime::rpc::context(Duration::from_secs(5));
    assert!(a.deliver(cx(), vec![]).await.is_ok());
    let b = handshaken(comet.rpc, &c).await.unwrap();

    // Third connection: closed at once, counted.
    assert!(handshaken(comet.rpc, &c).await.is_err());
    metric_reaches(comet.ops, "rim_rpc_connections_refused_total", 1).await;

    // Below the cap again, connections are taken again.
    drop(b);
    let mut d = eventually("a slot frees up", WAIT, || {
        let c = c.clone();
        async move { handshaken(comet.rpc, &c).await.ok() }
    })
    .await
    .unwrap();

    // A frame over the limit closes that connection only, and is counted.
    d.write_all(&(65_537u32).to_be_bytes()).await.unwrap();
    d.write_all(&[0u8; 1024]).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(WAIT, d.read(&mut buf)).await.unwrap();
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    metric_reaches(comet.ops, "rim_rpc_frames_too_large_total", 1).await;
    assert!(
        a.deliver(cx(), vec![]).await.is_ok(),
        "the other connection still serves"
    );
}

#[test]
fn an_exposed_rpc_port_without_a_secret_does_not_start() {
    for (bin, config, var, secret_var) in [
        (
            "rim-logic",
            "logic.toml",
            "RIM_LOGIC__LISTEN__RPC",
            "RIM_LOGIC__CLUSTER__SECRET",
        ),
        (
            "rim-comet",
            "comet.toml",
            "RIM_COMET__LISTEN__RPC",
            "RIM_COMET__CLUSTER__SECRET",
        ),
    ] {
        let out = Command::new(binary(bin))
            .arg("--config")
            .arg(repo().join("config").join(config))
            .arg("--check")
            .env(var, "0.0.0.0:3999")
            .env(secret_var, "")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bin}: {stderr}");
        assert!(stderr.contains("cluster.secret"), "{bin}: {stderr}");
        assert!(!stderr.contains(CLUSTER_SECRET));
    }
}
