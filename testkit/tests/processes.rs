//! The three built binaries as separate processes, started from the example configs in
//! `config/` with ports and Redis changed by environment variables, pushed to over HTTP.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use rim_proto::msg::AuthBody;
use rim_testkit::api::Api;
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{self, CometAddrs, binary, free_addr, repo};
use rim_testkit::redis::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_binaries_from_example_configs_deliver_http_pushes() {
    let redis = RedisServer::start();
    let logic_http = free_addr();
    let logic_rpc = free_addr();
    let mut logic = process::logic(&redis.url(), logic_http, logic_rpc, &[]);
    let mut job = process::job(&redis.url(), free_addr(), &[]);
    let mut comets = Vec::new();
    let mut addrs = Vec::new();
    for i in 1..=2 {
        let a = CometAddrs::free();
        comets.push(process::comet(
            &format!("proc-comet-{i}"),
            a,
            logic_rpc,
            &[],
        ));
        addrs.push(a);
    }

    let api = Api::new(logic_http);
    api.wait_live_nodes(2, Duration::from_secs(20))
        .await
        .unwrap();

    let auth = |mid: i64| AuthBody {
        mid,
        room_id: "live://proc".into(),
        accepts: vec![1000],
        platform: "test".into(),
        ..Default::default()
    };
    let mut c1 = Conn::connect(Transport::Tcp, addrs[0].tcp, &auth(1))
        .await
        .unwrap();
    let mut c2 = Conn::connect(Transport::WsBinary, addrs[1].http, &auth(2))
        .await
        .unwrap();

    let data = api.push_mids(1000, &[2], b"hello-2").await.unwrap();
    assert_eq!(data["sessions"], 1);
    let r = c2.recv_push().await.unwrap();
    assert_eq!(&r.frame.body[..], b"hello-2");

    api.push_room(1000, "live", "proc", b"room-hello")
        .await
        .unwrap();
    for c in [&mut c1, &mut c2] {
        let r = c.recv_push().await.unwrap();
        assert_eq!(&r.frame.body[..], b"room-hello");
    }

    // SIGTERM: a comet tells its clients before it goes, and every tier exits cleanly.
    comets[0].signal("TERM");
    let closed = c1.expect_closed().await.unwrap();
    assert_eq!(
        closed.disconnect_reason.as_deref(),
        Some("server shutting down"),
        "op 6 before the close: {closed:?}"
    );
    for p in comets.iter_mut() {
        p.signal("TERM");
        assert!(
            p.wait_exit(Duration::from_secs(20)).success(),
            "comet exits 0"
        );
    }
    job.signal("TERM");
    assert!(
        job.wait_exit(Duration::from_secs(20)).success(),
        "job exits 0"
    );
    // A drained worker released its leases and left the worker set itself (checked at once:
    // the example's lease TTL is seconds, not milliseconds).
    let mut conn = redis.connection();
    for p in 0..rim_proto::job::DEFAULT_PARTITIONS {
        let holder: Option<String> = redis::cmd("GET")
            .arg(rim_proto::keys::partition_lease(p))
            .query(&mut conn)
            .unwrap();
        assert_eq!(holder, None, "partition {p} still leased after the drain");
    }
    let workers: u64 = redis::cmd("ZCARD")
        .arg(rim_proto::keys::JOB_WORKERS)
        .query(&mut conn)
        .unwrap();
    assert_eq!(workers, 0, "the drained worker left rim:jobs");
    logic.signal("TERM");
    assert!(
        logic.wait_exit(Duration::from_secs(20)).success(),
        "logic exits 0"
    );
}

#[test]
fn example_configs_validate_and_bad_config_exits_64_naming_the_field() {
    for (bin, cfg) in [
        ("rim-comet", "comet.toml"),
        ("rim-logic", "logic.toml"),
        ("rim-job", "job.toml"),
    ] {
        let out = Command::new(binary(bin))
            .arg("--config")
            .arg(repo().join("config").join(cfg))
            .arg("--check")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{bin} --check {cfg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let help = Command::new(binary(bin))
            .arg("--help")
            .output()
            .expect("run");
        assert!(
            help.status.success() && String::from_utf8_lossy(&help.stdout).contains("--config"),
            "{bin} --help"
        );
    }

    let out = Command::new(binary("rim-comet"))
        .arg("--config")
        .arg(repo().join("config/comet.toml"))
        .env("RIM_COMET__SERVER_ID", "")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("server_id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(binary("rim-logic"))
        .arg("--config")
        .arg(repo().join("config/logic.toml"))
        .env("RIM_LOGIC__PUSH__BODY_LIMIT", "lots")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("body_limit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(binary("rim-job"))
        .arg("--config")
        .arg("/nonexistent/job.toml")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "missing config file");
}
