//! TLS on rim's ports, against real processes and certificates made here with rcgen: WSS and
//! goim frames over TLS on a comet, a certificate reload on SIGHUP under live sessions, the
//! handshake deadline, and config errors that name the field.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rim_client::ConnectOptions;
use rim_proto::msg::AuthBody;
use rim_testkit::api::{Api, eventually, metric};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::pki::{Pki, https};
use rim_testkit::process::{self, CometAddrs, Proc, binary, free_addr, repo};
use rim_testkit::redis::RedisServer;
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(20);

fn env_path(p: &Path) -> String {
    p.display().to_string()
}

fn auth(mid: i64) -> AuthBody {
    AuthBody {
        mid,
        platform: "test".into(),
        accepts: vec![1000],
        ..Default::default()
    }
}

/// Where a TLS comet listens, beyond the plain ports.
#[derive(Clone, Copy)]
struct TlsPorts {
    wss: SocketAddr,
    tls: SocketAddr,
}

/// A comet with `[tls]` from `pki`'s `comet.*` files and both TLS listeners on.
fn tls_comet(
    pki: &Pki,
    addrs: CometAddrs,
    logic_rpc: SocketAddr,
    extra: &[(&str, String)],
) -> (Proc, TlsPorts) {
    let ports = TlsPorts {
        wss: free_addr(),
        tls: free_addr(),
    };
    let mut env = vec![
        (
            "RIM_COMET__TLS__CERT_FILE",
            env_path(&pki.path("comet.crt")),
        ),
        ("RIM_COMET__TLS__KEY_FILE", env_path(&pki.path("comet.key"))),
        ("RIM_COMET__LISTEN__WSS", ports.wss.to_string()),
        ("RIM_COMET__LISTEN__TLS", ports.tls.to_string()),
    ];
    env.extend_from_slice(extra);
    (process::comet("comet-tls", addrs, logic_rpc, &env), ports)
}

async fn open(
    pki: &Pki,
    transport: Transport,
    addr: SocketAddr,
    mid: i64,
) -> Result<Conn, rim_client::ClientError> {
    let o = ConnectOptions {
        tls: Some(pki.client()),
        ..ConnectOptions::new(transport, addr)
    };
    let mut c = Conn::open_with(&o).await?;
    c.auth(&auth(mid)).await?;
    Ok(c)
}

fn leaf_of(c: &Conn) -> Vec<u8> {
    c.peer_certificates().unwrap().remove(0)
}

/// Waits until `name` on `http` is at least `n`.
async fn metric_reaches(http: SocketAddr, name: &str, n: u64) {
    eventually(&format!("{name} >= {n} on {http}"), WAIT, || async move {
        metric(http, name).await.filter(|v| *v >= n).map(|_| ())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_tls_sessions_get_pushes_and_keep_them_across_a_certificate_reload() {
    let pki = Pki::new();
    let first = pki.leaf("comet", "comet first");
    let redis = RedisServer::start();
    let (http, rpc) = (free_addr(), free_addr());
    let _logic = process::logic(&redis.url(), http, rpc, &[]);
    let _job = process::job(&redis.url(), free_addr(), &[]);
    let addrs = CometAddrs::free();
    let (comet, tls) = tls_comet(&pki, addrs, rpc, &[]);
    let api = Api::new(http);
    api.wait_live_nodes(1, WAIT).await.unwrap();

    // Both TLS listeners are published; the plain ones are unchanged.
    let nodes = api.get("/goim/nodes/instances").await.unwrap();
    let node = &nodes.data()[0];
    assert_eq!(node["wss_addr"], tls.wss.to_string());
    assert_eq!(node["tls_addr"], tls.tls.to_string());
    assert_eq!(node["tcp_addr"], addrs.tcp.to_string());

    let mut wss = open(&pki, Transport::WsBinary, tls.wss, 7).await.unwrap();
    let mut tcp = open(&pki, Transport::Tcp, tls.tls, 7).await.unwrap();
    let mut plain = Conn::connect(Transport::Tcp, addrs.tcp, &auth(7))
        .await
        .unwrap();
    assert_eq!(leaf_of(&wss), first);
    assert_eq!(leaf_of(&tcp), first);
    assert!(plain.peer_certificates().is_none());
    api.push_mids(1000, &[7], b"before").await.unwrap();
    for c in [&mut wss, &mut tcp, &mut plain] {
        assert_eq!(&c.recv_push().await.unwrap().frame.body[..], b"before");
    }

    // A new certificate on disk, then SIGHUP.
    let second = pki.leaf("comet", "comet second");
    assert_ne!(first, second);
    comet.signal("HUP");
    let ok = "rim_tls_reloads_total{result=\"ok\"}";
    metric_reaches(addrs.ops, ok, 1).await;

    // The open sessions were not dropped: they still get pushes, on the old handshake.
    api.push_mids(1000, &[7], b"after").await.unwrap();
    for c in [&mut wss, &mut tcp, &mut plain] {
        assert_eq!(&c.recv_push().await.unwrap().frame.body[..], b"after");
    }
    assert_eq!(leaf_of(&wss), first);
    // New connections get the new certificate, on both listeners.
    let new_wss = open(&pki, Transport::WsJson, tls.wss, 8).await.unwrap();
    let new_tcp = open(&pki, Transport::Tcp, tls.tls, 8).await.unwrap();
    assert_eq!(leaf_of(&new_wss), second);
    assert_eq!(leaf_of(&new_tcp), second);

    // A broken key on disk: the reload fails, is counted, and the good certificate stays.
    std::fs::write(pki.path("comet.key"), "not a key").unwrap();
    comet.signal("HUP");
    metric_reaches(addrs.ops, "rim_tls_reloads_total{result=\"failed\"}", 1).await;
    assert_eq!(metric(addrs.ops, ok).await, Some(1));
    let again = open(&pki, Transport::Tcp, tls.tls, 9).await.unwrap();
    assert_eq!(leaf_of(&again), second);
    api.push_mids(1000, &[7], b"still").await.unwrap();
    assert_eq!(&tcp.recv_push().await.unwrap().frame.body[..], b"still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_plain_client_on_a_tls_port_is_closed_and_counted() {
    let pki = Pki::new();
    pki.leaf("comet", "comet");
    let addrs = CometAddrs::free();
    // No logic is needed for the handshake; a short handshake deadline.
    let env = [(
        "RIM_COMET__SESSION__HANDSHAKE_TIMEOUT_MS",
        "300".to_string(),
    )];
    let (_comet, tls) = tls_comet(&pki, addrs, free_addr(), &env);
    eventually("comet serving metrics", WAIT, || async {
        metric(addrs.ops, "rim_tls_reloads_total{result=\"ok\"}").await
    })
    .await
    .unwrap();

    // A client that connects and never starts the handshake: closed at the deadline.
    for port in [tls.tls, tls.wss] {
        let mut silent = tokio::net::TcpStream::connect(port).await.unwrap();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(WAIT, silent.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0) | Err(_))),
            "silent client on {port}: {r:?}"
        );
    }
    metric_reaches(
        addrs.ops,
        "rim_tls_handshake_failures_total{reason=\"timeout\"}",
        1,
    )
    .await;

    // A plain goim client on the TLS port: refused by the handshake, counted.
    let r = Conn::connect(Transport::Tcp, tls.tls, &auth(1)).await;
    assert!(r.is_err(), "plain session on the TLS port");
    metric_reaches(
        addrs.ops,
        "rim_tls_handshake_failures_total{reason=\"error\"}",
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logic_serves_its_http_api_over_https() {
    let pki = Pki::new();
    pki.leaf("logic", "logic");
    let redis = RedisServer::start();
    let (http, rpc) = (free_addr(), free_addr());
    let env = [
        (
            "RIM_LOGIC__TLS__CERT_FILE",
            env_path(&pki.path("logic.crt")),
        ),
        ("RIM_LOGIC__TLS__KEY_FILE", env_path(&pki.path("logic.key"))),
    ];
    let _logic = process::logic(&redis.url(), http, rpc, &env);
    let _job = process::job(&redis.url(), free_addr(), &[]);
    let addrs = CometAddrs::free();
    let _comet = process::comet("comet-1", addrs, rpc, &[]);
    eventually("logic answering https", WAIT, || async {
        let r = https(&pki, http, "GET", "/goim/nodes/instances")
            .await
            .ok()?;
        (r.starts_with("HTTP/1.1 200") && r.contains("comet-1")).then_some(())
    })
    .await
    .unwrap();

    // A push through the HTTPS API reaches a session.
    let mut c = Conn::connect(Transport::Tcp, addrs.tcp, &auth(7))
        .await
        .unwrap();
    let r = https(&pki, http, "POST", "/goim/push/mids?operation=1000&mids=7")
        .await
        .unwrap();
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("\"code\":0"),
        "{r}"
    );
    assert!(c.recv_push().await.is_ok());

    // Its /metrics (over HTTPS) carries the TLS counters; plain HTTP gets no answer.
    let m = https(&pki, http, "GET", "/metrics").await.unwrap();
    assert!(m.contains("rim_tls_reloads_total{result=\"ok\"} 0"), "{m}");
    assert!(Api::new(http).get("/healthz").await.is_err());
    eventually("plain request counted", WAIT, || async {
        let m = https(&pki, http, "GET", "/metrics").await.ok()?;
        m.contains("rim_tls_handshake_failures_total{reason=\"error\"} 1")
            .then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logic_and_job_use_redis_over_rediss() {
    let pki = Pki::new();
    pki.leaf("redis", "redis");
    let ca = pki.path("ca.pem");
    let redis = RedisServer::start_tls(&pki.path("redis.crt"), &pki.path("redis.key"), &ca);
    let url = redis.tls_url().unwrap();
    let ca = env_path(&ca);
    let (http, rpc) = (free_addr(), free_addr());
    let logic_env = [("RIM_LOGIC__REDIS__CA_FILE", ca.clone())];
    let _logic = process::logic(&url, http, rpc, &logic_env);
    let _job = process::job(&url, free_addr(), &[("RIM_JOB__REDIS__CA_FILE", ca)]);
    let addrs = CometAddrs::free();
    let _comet = process::comet("comet-1", addrs, rpc, &[]);
    let api = Api::new(http);
    api.wait_live_nodes(1, WAIT).await.unwrap();

    // A push goes logic → Redis (XADD over TLS) → job (XREADGROUP over TLS) → comet.
    let mut c = Conn::connect(Transport::Tcp, addrs.tcp, &auth(7))
        .await
        .unwrap();
    api.push_mids(1000, &[7], b"via rediss").await.unwrap();
    assert_eq!(&c.recv_push().await.unwrap().frame.body[..], b"via rediss");
    // And it really went through that server (read back over its unix socket).
    let nodes: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(rim_proto::keys::NODES)
        .query(&mut redis.connection())
        .unwrap();
    assert!(nodes.contains_key("comet-1"), "{nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_verifies_the_server_against_redis_ca_file() {
    let pki = Pki::new();
    pki.leaf("redis", "redis");
    let other = Pki::new();
    let redis = RedisServer::start_tls(
        &pki.path("redis.crt"),
        &pki.path("redis.key"),
        &pki.path("ca.pem"),
    );
    let url = redis.tls_url().unwrap();
    let cfg = |ca_file: String| rim_runtime::redis::RedisConfig {
        url: url.clone(),
        ca_file,
        ..Default::default()
    };
    let ping = |cfg: rim_runtime::redis::RedisConfig| async move {
        let topology = cfg.topology().map_err(|e| e.to_string())?;
        let bounds = rim_runtime::redis::Bounds::from_config(&cfg);
        let mut conn = topology.connect(bounds).await.map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    assert_eq!(ping(cfg(pki.ca())).await.as_deref(), Ok("PONG"));
    // A CA that did not sign the server's certificate: no connection.
    let refused = ping(cfg(other.ca())).await;
    assert!(refused.is_err(), "{refused:?}");

    // An unreadable CA file stops the tier at start, naming the field.
    let missing = vec![
        ("RIM_LOGIC__REDIS__URL", url.clone()),
        (
            "RIM_LOGIC__REDIS__CA_FILE",
            env_path(&other.path("nope.pem")),
        ),
    ];
    let (code, stderr) = check("rim-logic", "logic.toml", &missing);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("redis.ca_file"), "{stderr}");
}

/// `[cluster]` TLS for tier `TIER`: the listener's certificate (where it has one) and the CA
/// its dialers verify against.
fn rpc_tls_env(tier: &'static str, pki: &Pki) -> Vec<(String, String)> {
    let mut env = vec![(format!("RIM_{tier}__CLUSTER__TLS_CA_FILE"), pki.ca())];
    if tier != "JOB" {
        env.push((
            format!("RIM_{tier}__CLUSTER__TLS_CERT_FILE"),
            env_path(&pki.path("rpc.crt")),
        ));
        env.push((
            format!("RIM_{tier}__CLUSTER__TLS_KEY_FILE"),
            env_path(&pki.path("rpc.key")),
        ));
    }
    env
}

fn as_env(v: &[(String, String)]) -> Vec<(&str, String)> {
    v.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_rpc_runs_over_tls_under_the_cluster_handshake() {
    let pki = Pki::new();
    pki.leaf("rpc", "rim rpc");
    let redis = RedisServer::start();
    let (http, rpc) = (free_addr(), free_addr());
    let _logic = process::logic(
        &redis.url(),
        http,
        rpc,
        &as_env(&rpc_tls_env("LOGIC", &pki)),
    );
    let _job = process::job(
        &redis.url(),
        free_addr(),
        &as_env(&rpc_tls_env("JOB", &pki)),
    );
    let addrs = CometAddrs::free();
    let comet_env = rpc_tls_env("COMET", &pki);
    let _comet = process::comet("comet-1", addrs, rpc, &as_env(&comet_env));
    let api = Api::new(http);
    // comet → logic (LogicRpc over TLS): registered, and sessions authenticate through it.
    api.wait_live_nodes(1, WAIT).await.unwrap();
    let mut c = Conn::connect(Transport::Tcp, addrs.tcp, &auth(7))
        .await
        .unwrap();
    // job → comet (CometRpc over TLS): the push is delivered.
    api.push_mids(1000, &[7], b"over rpc tls").await.unwrap();
    assert_eq!(
        &c.recv_push().await.unwrap().frame.body[..],
        b"over rpc tls"
    );

    // A dialer with the right secret but without TLS gets nothing from either RPC port.
    let plain = rim_runtime::cluster::Cluster::new(
        &rim_runtime::cluster::ClusterConfig {
            secret: process::CLUSTER_SECRET.into(),
            ..Default::default()
        },
        "test",
        Default::default(),
    );
    for (port, ops) in [(rpc, http), (addrs.rpc, addrs.ops)] {
        let s = tokio::net::TcpStream::connect(port).await.unwrap();
        assert!(plain.dial(s, &port.to_string()).await.is_err());
        metric_reaches(ops, "rim_tls_handshake_failures_total{reason=\"error\"}", 1).await;
    }
    // One that trusts another CA refuses the server's certificate.
    let other = Pki::new();
    let cfg = rim_runtime::cluster::ClusterConfig {
        secret: process::CLUSTER_SECRET.into(),
        tls_ca_file: other.ca(),
        ..Default::default()
    };
    let tls = cfg.rpc_tls(Default::default()).unwrap();
    let untrusting = rim_runtime::cluster::Cluster::with_tls(&cfg, "test", Default::default(), tls);
    let s = tokio::net::TcpStream::connect(rpc).await.unwrap();
    let err = untrusting.dial(s, &rpc.to_string()).await.unwrap_err();
    assert!(err.to_string().contains("tls"), "{err}");
}

/// `--check` of `bin` with `env`: exit code and stderr.
fn check(bin: &str, config: &str, env: &[(&str, String)]) -> (Option<i32>, String) {
    let out = Command::new(binary(bin))
        .arg("--config")
        .arg(repo().join("config").join(config))
        .arg("--check")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `--check` that must fail: binary, config file, environment, the field named.
type Case = (
    &'static str,
    &'static str,
    Vec<(&'static str, String)>,
    &'static str,
);

#[test]
fn tls_config_errors_exit_64_naming_the_field() {
    let pki = Pki::new();
    pki.leaf("c", "c");
    let (cert, key) = (env_path(&pki.path("c.crt")), env_path(&pki.path("c.key")));
    let missing = env_path(&pki.path("missing.pem"));
    let cases: Vec<Case> = vec![
        (
            "rim-comet",
            "comet.toml",
            vec![("RIM_COMET__LISTEN__WSS", "127.0.0.1:3443".into())],
            "listen.wss",
        ),
        (
            "rim-comet",
            "comet.toml",
            vec![("RIM_COMET__LISTEN__TLS", "127.0.0.1:3444".into())],
            "listen.tls",
        ),
        (
            "rim-comet",
            "comet.toml",
            vec![
                ("RIM_COMET__TLS__CERT_FILE", missing.clone()),
                ("RIM_COMET__TLS__KEY_FILE", key.clone()),
            ],
            "tls.cert_file",
        ),
        (
            "rim-comet",
            "comet.toml",
            vec![("RIM_COMET__TLS__CERT_FILE", cert.clone())],
            "tls.key_file",
        ),
        (
            "rim-comet",
            "comet.toml",
            vec![
                ("RIM_COMET__TLS__CERT_FILE", cert.clone()),
                ("RIM_COMET__TLS__KEY_FILE", cert.clone()),
            ],
            "tls.key_file",
        ),
        (
            "rim-logic",
            "logic.toml",
            vec![("RIM_LOGIC__CLUSTER__TLS_CERT_FILE", cert.clone())],
            "cluster.tls_key_file",
        ),
        (
            "rim-comet",
            "comet.toml",
            vec![("RIM_COMET__CLUSTER__TLS_CA_FILE", missing.clone())],
            "cluster.tls_ca_file",
        ),
        (
            "rim-logic",
            "logic.toml",
            vec![
                ("RIM_LOGIC__TLS__CERT_FILE", missing.clone()),
                ("RIM_LOGIC__TLS__KEY_FILE", key.clone()),
            ],
            "tls.cert_file",
        ),
    ];
    for (bin, config, env, field) in cases {
        let (code, stderr) = check(bin, config, &env);
        assert_eq!(code, Some(64), "{bin} {env:?}: {stderr}");
        assert!(stderr.contains(field), "{bin} {env:?}: {stderr}");
    }
    let ok = vec![
        ("RIM_COMET__TLS__CERT_FILE", cert),
        ("RIM_COMET__TLS__KEY_FILE", key),
        ("RIM_COMET__LISTEN__WSS", "127.0.0.1:3443".into()),
    ];
    let (code, stderr) = check("rim-comet", "comet.toml", &ok);
    assert_eq!(code, Some(0), "{stderr}");
}
