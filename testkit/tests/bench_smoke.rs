//! A tiny run of the load tool (`rim-bench`) against a real cluster of built binaries, so the
//! tool cannot rot: each scenario must open every session and account for every push (nothing
//! lost, duplicated, misdelivered or causally out of order). Figures such as rates and latencies
//! are printed by the tool and never asserted here (they live in docs/benchmarks.md).
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use rim_proto::msg::AuthBody;
use rim_testkit::api::Api;
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{self, CometAddrs, Proc, binary, free_addr};
use rim_testkit::redis::RedisServer;
use serde_json::Value;

struct Cluster {
    _redis: RedisServer,
    _procs: Vec<Proc>,
    logic_http: SocketAddr,
    logic_rpc: SocketAddr,
    job_http: SocketAddr,
    ws: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    ops: Vec<SocketAddr>,
}

async fn cluster() -> Cluster {
    let redis = RedisServer::start();
    let (logic_http, logic_rpc, job_http) = (free_addr(), free_addr(), free_addr());
    let mut procs = vec![
        process::logic(&redis.url(), logic_http, logic_rpc, &[]),
        process::job(&redis.url(), job_http, &[]),
    ];
    let (mut ws, mut tcp, mut ops) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=2 {
        let a = CometAddrs::free();
        procs.push(process::comet(
            &format!("bench-comet-{i}"),
            a,
            logic_rpc,
            &[],
        ));
        ws.push(a.http);
        tcp.push(a.tcp);
        ops.push(a.ops);
    }
    // Ready when both comets are registered and a push reaches a session on each (job knows
    // them too).
    let api = Api::new(logic_http);
    api.wait_live_nodes(2, Duration::from_secs(20))
        .await
        .unwrap();
    for (i, addr) in ws.iter().enumerate() {
        let mid = 900 + i as i64;
        let auth = AuthBody {
            mid,
            accepts: vec![1000],
            ..AuthBody::default()
        };
        let mut c = Conn::connect(Transport::WsBinary, *addr, &auth)
            .await
            .unwrap();
        let mut delivered = false;
        for _ in 0..20 {
            api.push_mids(1000, &[mid], b"probe").await.unwrap();
            if c.next_push(Duration::from_millis(500))
                .await
                .unwrap()
                .is_some()
            {
                delivered = true;
                break;
            }
        }
        assert!(delivered, "no probe push reached comet {addr}");
        c.close().await;
    }
    Cluster {
        _redis: redis,
        _procs: procs,
        logic_http,
        logic_rpc,
        job_http,
        ws,
        tcp,
        ops,
    }
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs rim-bench with `args` against `c`; returns its JSON line.
fn bench(c: &Cluster, args: &[&str]) -> Value {
    let out = Command::new(binary("rim-bench"))
        .args([
            "--ws",
            &join(&c.ws),
            "--tcp",
            &join(&c.tcp),
            "--ops",
            &join(&c.ops),
        ])
        .args(["--http", &c.logic_http.to_string()])
        .args(["--rpc", &c.logic_rpc.to_string()])
        .env("RIM_BENCH_CLUSTER_SECRET", process::CLUSTER_SECRET)
        .args(["--metrics", &c.job_http.to_string()])
        .args(["--settle-ms", "300", "--hold-ms", "300", "--max-secs", "90"])
        .args(args)
        .output()
        .expect("run rim-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rim-bench {args:?} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{stderr}"))
}

fn assert_accounted(v: &Value, owed_deliveries: u64) {
    for field in ["lost", "dup", "misdelivered", "ooo_causal", "failed_open"] {
        assert_eq!(v[field], 0, "{field} in {v}");
    }
    assert_eq!(v["deliveries"], owed_deliveries, "{v}");
    assert_eq!(v["ended_early"], serde_json::json!({}), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rim_bench_runs_every_scenario_and_accounts_for_every_push() {
    let c = cluster().await;

    // S1: idle sessions over all three transports, in a session process of their own.
    let v = bench(&c, &["--scenario", "s1", "--n", "60", "--transport", "mix"]);
    assert_eq!(v["opened"], 60, "{v}");
    assert_eq!(v["alive_after_hold"], 60, "{v}");
    assert_eq!(v["failed"], serde_json::json!({}), "{v}");
    assert!(v["comet_kib_per_session_pss"].is_number(), "{v}");

    // S2: room fan-out; every member gets every push.
    let v = bench(
        &c,
        &[
            "--scenario",
            "s2",
            "--m",
            "30",
            "--k",
            "20",
            "--transport",
            "mix",
        ],
    );
    assert_eq!(v["pushes_ok"], 20, "{v}");
    assert_accounted(&v, 30 * 20);

    // S3: point-to-point through the HTTP API, then through LogicRpc, one paced.
    let v = bench(&c, &["--scenario", "s3", "--m", "30", "--k", "100"]);
    assert_eq!(v["pushes_ok"], 100, "{v}");
    assert_accounted(&v, 100);
    let v = bench(
        &c,
        &[
            "--scenario",
            "s3",
            "--m",
            "20",
            "--k",
            "40",
            "--via",
            "rpc",
            "--rate",
            "200",
            "--transport",
            "tcp",
            "--first-mid",
            "2000000",
        ],
    );
    assert_eq!(v["pushes_ok"], 40, "{v}");
    assert_accounted(&v, 40);
}
