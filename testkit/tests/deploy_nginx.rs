//! The shipped nginx conf (`deploy/nginx/rim.conf` and `rim-locations.conf`) run by a real
//! nginx in front of a local cluster (logic, job, two comets), with only its paths and ports
//! moved into a temporary directory and a test certificate: a WebSocket session over TLS and an
//! HTTP push over TLS both go through it, plain HTTP is redirected to HTTPS, and the ops routes
//! stay private.
//!
//! Needs nginx (scripts/test.sh installs it) and `cargo build --bins` first.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rim_client::ConnectOptions;
use rim_proto::msg::AuthBody;
use rim_testkit::api::{Api, eventually};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::nginx::{Nginx, moved};
use rim_testkit::pki::{Pki, request};
use rim_testkit::process::{self, CometAddrs, free_addr, repo};
use rim_testkit::redis::RedisServer;

const PUSH_SECRET: &str = "nginx-test-push-secret";
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_and_an_http_push_go_through_the_shipped_nginx_conf() {
    let redis = RedisServer::start();
    let (http, rpc) = (free_addr(), free_addr());
    let _logic = process::logic(
        &redis.url(),
        http,
        rpc,
        &[("RIM_LOGIC__PUSH__SECRET", PUSH_SECRET.to_string())],
    );
    let _job = process::job(&redis.url(), free_addr(), &[]);
    let (a, b) = (CometAddrs::free(), CometAddrs::free());
    let _c1 = process::comet("nginx-comet-1", a, rpc, &[]);
    let _c2 = process::comet("nginx-comet-2", b, rpc, &[]);
    let api = Api::new(http).with_secret(PUSH_SECRET);
    api.wait_live_nodes(2, WAIT).await.unwrap();

    // The shipped files, moved: ports, upstream addresses, certificate and snippet paths.
    let pki = Pki::new();
    pki.leaf("nginx", "localhost");
    let (https_port, http_port) = (free_addr(), free_addr());
    let site = std::fs::read_to_string(repo().join("deploy/nginx/rim.conf")).unwrap();
    let mut nginx = Nginx::prepare("");
    let site = moved(
        "rim.conf",
        &site,
        &[
            ("server 127.0.0.1:3102 ", format!("server {} ", a.http)),
            ("server 127.0.0.1:3202 ", format!("server {} ", b.http)),
            ("server 127.0.0.1:3111 ", format!("server {http} ")),
            ("listen 80;", format!("listen {http_port};")),
            ("listen [::]:80;", String::new()),
            ("listen 443 ssl;", format!("listen {https_port} ssl;")),
            ("listen [::]:443 ssl;", String::new()),
            (
                "/etc/ssl/rim/fullchain.pem",
                pki.path("nginx.crt").display().to_string(),
            ),
            (
                "/etc/ssl/rim/privkey.pem",
                pki.path("nginx.key").display().to_string(),
            ),
            (
                "/etc/nginx/snippets/rim-locations.conf",
                nginx.path("rim-locations.conf").display().to_string(),
            ),
        ],
    );
    nginx.write("site.conf", &site);
    nginx.write(
        "rim-locations.conf",
        &std::fs::read_to_string(repo().join("deploy/nginx/rim-locations.conf")).unwrap(),
    );
    nginx.check().unwrap();
    nginx.start();
    eventually("nginx answering over TLS", WAIT, || async {
        request(&pki, https_port, "GET", "/goim/nodes/instances", &[], b"")
            .await
            .ok()
            .filter(|r| r.starts_with("HTTP/1.1 "))
    })
    .await
    .unwrap();

    // A WebSocket session (wss) through nginx.
    let mut opts = ConnectOptions::new(Transport::WsBinary, https_port);
    opts.tls = Some(pki.client());
    let mut client = Conn::open_with(&opts).await.unwrap();
    let mid = 515;
    client
        .auth(&AuthBody {
            mid,
            accepts: vec![1000],
            platform: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // An HTTP push (https, with the push secret) through nginx reaches it.
    let bearer = format!("Bearer {PUSH_SECRET}");
    let answer = request(
        &pki,
        https_port,
        "POST",
        &format!("/goim/push/mids?operation=1000&mids={mid}"),
        &[("authorization", &bearer)],
        b"through nginx",
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let got = client.recv_push().await.unwrap();
    assert_eq!(&got.frame.body[..], b"through nginx");

    // Without the secret nginx passes logic's refusal through.
    let refused = request(
        &pki,
        https_port,
        "POST",
        "/goim/push/mids?operation=1000&mids=1",
        &[],
        b"x",
    )
    .await
    .unwrap();
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

    // Ops routes stay private on the public name.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = request(&pki, https_port, "GET", path, &[], b"")
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
    }

    // Plain HTTP is redirected to HTTPS.
    let plain = plain_get(http_port, "/goim/push/all").await;
    assert!(plain.starts_with("HTTP/1.1 301"), "{plain}");
    assert!(
        plain
            .to_ascii_lowercase()
            .contains("location: https://localhost/goim/push/all"),
        "{plain}"
    );
}

/// One plain HTTP/1.1 GET; the whole answer.
async fn plain_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}
