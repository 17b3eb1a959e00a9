//! comet's client-port limits against real processes (`[limits]`, `[websocket]`): sessions per
//! address, Auth attempts per address per second, the WebSocket `Origin` allow-list. Each limit
//! trips with its reason, is counted on `/metrics`, leaves other addresses alone, and recovers.
//! One test acts as several client addresses by binding 127.0.0.x source addresses.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rim_client::{ClientError, ConnectOptions};
use rim_proto::msg::AuthBody;
use rim_testkit::api::{Api, eventually, metric};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{self, CometAddrs, Proc, free_addr};
use rim_testkit::redis::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// Redis, logic and one comet started with `env`, the comet registered.
struct Cluster {
    _redis: RedisServer,
    _logic: Proc,
    _comet: Proc,
    comet: CometAddrs,
}

/// Clients reach the comet on loopback here, so `limits.exempt_loopback` is off.
async fn cluster(env: &[(&str, String)]) -> Cluster {
    let mut env = env.to_vec();
    env.push(("RIM_COMET__LIMITS__EXEMPT_LOOPBACK", "false".into()));
    let redis = RedisServer::start();
    let (http, rpc) = (free_addr(), free_addr());
    let logic = process::logic(&redis.url(), http, rpc, &[]);
    let addrs = CometAddrs::free();
    let comet = process::comet("comet-limits", addrs, rpc, &env);
    Api::new(http).wait_live_nodes(1, WAIT).await.unwrap();
    Cluster {
        _redis: redis,
        _logic: logic,
        _comet: comet,
        comet: addrs,
    }
}

fn auth(mid: i64) -> AuthBody {
    AuthBody {
        mid,
        accepts: vec![1000],
        platform: "test".into(),
        ..Default::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn from(transport: Transport, addr: SocketAddr, local: &str) -> ConnectOptions {
    ConnectOptions {
        local_ip: Some(ip(local)),
        ..ConnectOptions::new(transport, addr)
    }
}

/// Opens `o` and authenticates with `a`.
async fn connect(o: &ConnectOptions, a: &AuthBody) -> Result<Conn, ClientError> {
    let mut c = Conn::open_with(o).await?;
    c.auth(a).await?;
    Ok(c)
}

/// Waits until `name` on `http` equals `n`.
async fn metric_is(http: SocketAddr, name: &str, n: u64) {
    eventually(&format!("{name} == {n}"), WAIT, || async move {
        metric(http, name).await.filter(|v| *v == n).map(|_| ())
    })
    .await
    .unwrap();
}

const SESSIONS_REFUSED: &str = "rim_comet_limit_refused_total{limit=\"sessions_per_ip\"}";
const ATTEMPTS_REFUSED: &str = "rim_comet_limit_refused_total{limit=\"auth_per_ip\"}";
const ORIGIN_REFUSED: &str = "rim_comet_limit_refused_total{limit=\"ws_origin\"}";

/// `sessions_per_ip = 2`: the third connection from 127.0.0.2 (WebSocket, then TCP) is closed
/// before Auth with "too many sessions from this address" (WebSocket 1008), counted; 127.0.0.3
/// still connects; once one of the two closes, 127.0.0.2 connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_session_from_one_address_is_refused_until_one_closes() {
    let c = cluster(&[
        ("RIM_COMET__LIMITS__SESSIONS_PER_IP", "2".into()),
        ("RIM_COMET__LIMITS__AUTH_PER_IP_PER_SEC", "0".into()),
    ])
    .await;
    let (ws, tcp) = (c.comet.http, c.comet.tcp);
    let a1 = connect(&from(Transport::WsBinary, ws, "127.0.0.2"), &auth(1))
        .await
        .unwrap();
    let _a2 = connect(&from(Transport::Tcp, tcp, "127.0.0.2"), &auth(2))
        .await
        .unwrap();

    let mut a3 = Conn::open_with(&from(Transport::WsBinary, ws, "127.0.0.2"))
        .await
        .unwrap();
    let closed = a3.expect_closed().await.unwrap();
    assert_eq!(closed.code, Some(1008), "{closed:?}");
    assert!(
        closed.said("too many sessions from this address"),
        "{closed:?}"
    );
    let mut a4 = Conn::open_with(&from(Transport::Tcp, tcp, "127.0.0.2"))
        .await
        .unwrap();
    let closed = a4.expect_closed().await.unwrap();
    assert!(
        closed.said("too many sessions from this address"),
        "{closed:?}"
    );
    assert_eq!(metric(c.comet.ops, SESSIONS_REFUSED).await, Some(2));

    // Another address is not affected.
    let _b = connect(&from(Transport::WsBinary, ws, "127.0.0.3"), &auth(3))
        .await
        .unwrap();

    // One of the two closes: once the comet has let it go, the address has room again.
    a1.close().await;
    metric_is(c.comet.ops, "rim_comet_connections_ws", 1).await;
    let _a5 = connect(&from(Transport::WsBinary, ws, "127.0.0.2"), &auth(5))
        .await
        .unwrap();
    assert_eq!(metric(c.comet.ops, SESSIONS_REFUSED).await, Some(2));
}

/// `auth_per_ip_per_sec = 1`, burst 3: a flood of connections from 127.0.0.4 gets "too many
/// attempts" after the burst, counted, while 127.0.0.5 still connects; a little later (a token
/// refilled) 127.0.0.4 authenticates again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_flood_from_one_address_trips_then_recovers() {
    let c = cluster(&[
        ("RIM_COMET__LIMITS__AUTH_PER_IP_PER_SEC", "1".into()),
        ("RIM_COMET__LIMITS__AUTH_PER_IP_BURST", "3".into()),
    ])
    .await;
    let tcp = c.comet.tcp;
    let flood = from(Transport::Tcp, tcp, "127.0.0.4");
    let mut accepted = 0;
    let mut refused = None;
    for mid in 0..20 {
        match connect(&flood, &auth(100 + mid)).await {
            Ok(conn) => {
                accepted += 1;
                conn.close().await;
            }
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("the flood was never refused");
    assert!(refused.contains("too many attempts"), "{refused}");
    assert!(accepted >= 3, "the burst of 3 goes through: {accepted}");
    assert_eq!(metric(c.comet.ops, ATTEMPTS_REFUSED).await, Some(1));

    let _other = connect(&from(Transport::Tcp, tcp, "127.0.0.5"), &auth(200))
        .await
        .unwrap();

    // Recovers once a token refilled; refused tries in the meantime do not cost one.
    eventually("127.0.0.4 admitted again", WAIT, || {
        let flood = flood.clone();
        async move {
            // Pacing the retries (eventually polls every 20 ms), not synchronisation.
            connect(&flood, &auth(300)).await.ok()
        }
    })
    .await
    .unwrap();
}

/// Sends a WebSocket upgrade of `/sub` with `origin` and returns the response's status line.
async fn upgrade_status(http: SocketAddr, origin: Option<&str>) -> String {
    let headers = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    upgrade(http, "127.0.0.1", &headers).await.1
}

/// Sends a WebSocket upgrade of `/sub` from source address `local` with extra `headers` (each
/// ending in CRLF); returns the socket (to keep the session open) and the status line.
async fn upgrade(http: SocketAddr, local: &str, headers: &str) -> (TcpStream, String) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(ip(local), 0)).unwrap();
    let mut s = sock.connect(http).await.unwrap();
    let req = format!(
        "GET /sub HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert!(n > 0, "closed without a response");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let status = text.lines().next().unwrap_or_default().to_string();
    (s, status)
}

/// `limits.trusted_proxies`: from a trusted proxy (127.0.0.6) the client is the address its
/// `X-Forwarded-For` names, so two clients behind it are limited separately
/// (`sessions_per_ip = 1`); from any other peer (127.0.0.7) the header is ignored and the peer
/// itself is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    let c = cluster(&[
        ("RIM_COMET__LIMITS__SESSIONS_PER_IP", "1".into()),
        ("RIM_COMET__LIMITS__AUTH_PER_IP_PER_SEC", "0".into()),
        ("RIM_COMET__LIMITS__TRUSTED_PROXIES", "127.0.0.6".into()),
        // The raw sessions below never authenticate; keep them open for the test.
        ("RIM_COMET__SESSION__HANDSHAKE_TIMEOUT_MS", "120000".into()),
    ])
    .await;
    let http = c.comet.http;
    let xff = |a: &str| format!("X-Forwarded-For: {a}\r\n");
    let mut held = Vec::new();
    for (local, client) in [
        ("127.0.0.6", "198.51.100.7"),
        ("127.0.0.6", "198.51.100.7"), // the same client again: refused
        ("127.0.0.6", "198.51.100.8"), // another client behind the proxy
        ("127.0.0.7", "198.51.100.9"),
        ("127.0.0.7", "198.51.100.10"), // untrusted peer: counted as 127.0.0.7, refused
    ] {
        let (sock, status) = upgrade(http, local, &xff(client)).await;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        held.push(sock);
    }
    metric_is(c.comet.ops, SESSIONS_REFUSED, 2).await;
    metric_is(c.comet.ops, "rim_comet_connections_ws", 3).await;
}

/// `websocket.allowed_origins` (a list from the environment): another site's Origin gets 403
/// before the upgrade, counted; a listed one upgrades, and so does a client without Origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_origin_outside_the_allow_list_gets_403() {
    let c = cluster(&[(
        "RIM_COMET__WEBSOCKET__ALLOWED_ORIGINS",
        "https://app.example,https://good.example".into(),
    )])
    .await;
    let http = c.comet.http;
    let evil = upgrade_status(http, Some("https://evil.example")).await;
    assert!(evil.starts_with("HTTP/1.1 403"), "{evil}");
    assert_eq!(metric(c.comet.ops, ORIGIN_REFUSED).await, Some(1));
    let good = upgrade_status(http, Some("https://good.example")).await;
    assert!(good.starts_with("HTTP/1.1 101"), "{good}");
    // rim's client sends no Origin: not a browser, allowed.
    Conn::connect(Transport::WsBinary, http, &auth(9))
        .await
        .unwrap();
    assert_eq!(metric(c.comet.ops, ORIGIN_REFUSED).await, Some(1));
}

/// `proxy_protocol` with `trusted_proxies = 127.0.0.8` and one session per address: a TCP
/// connection from the proxy names its client in a PROXY header (v1 or v2), and the limit counts
/// that client, not the proxy; a second session of the same client is refused; a connection from
/// the proxy without a header is closed and counted as `proxy_header`; an untrusted peer's
/// header is not believed (the comet reads it as a frame and refuses the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_names_the_tcp_client_behind_a_trusted_proxy() {
    let c = cluster(&[
        ("RIM_COMET__LIMITS__SESSIONS_PER_IP", "1".into()),
        ("RIM_COMET__LIMITS__AUTH_PER_IP_PER_SEC", "0".into()),
        ("RIM_COMET__LIMITS__TRUSTED_PROXIES", "127.0.0.8".into()),
        ("RIM_COMET__LIMITS__PROXY_PROTOCOL", "true".into()),
    ])
    .await;
    let tcp = c.comet.tcp;
    let v1 = |client: &str| format!("PROXY TCP4 {client} 10.0.0.1 40000 3101\r\n").into_bytes();
    let v2 = |client: [u8; 4]| {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12]);
        h.extend_from_slice(&client);
        h.extend_from_slice(&[10, 0, 0, 1, 0x9c, 0x40, 0x0c, 0x1d]);
        h
    };
    let behind = |local: &'static str, header: Vec<u8>| async move {
        let mut conn = Conn::open_with(&from(Transport::Tcp, tcp, local))
            .await
            .unwrap();
        conn.send_raw(header).await.unwrap();
        conn
    };

    // Two clients behind the one proxy address: each is its own address.
    let mut a = behind("127.0.0.8", v1("198.51.100.20")).await;
    a.auth(&auth(20)).await.unwrap();
    let mut b = behind("127.0.0.8", v2([198, 51, 100, 21])).await;
    b.auth(&auth(21)).await.unwrap();
    // The first client again: its address already holds its one session.
    let mut again = behind("127.0.0.8", v1("198.51.100.20")).await;
    let closed = again.expect_closed().await.unwrap();
    assert!(
        closed.said("too many sessions from this address"),
        "{closed:?}"
    );
    // From the proxy without a header: closed before anything is read as a frame, counted.
    let mut bare = Conn::open_with(&from(Transport::Tcp, tcp, "127.0.0.8"))
        .await
        .unwrap();
    assert!(bare.auth(&auth(22)).await.is_err());
    metric_is(
        c.comet.ops,
        "rim_comet_limit_refused_total{limit=\"proxy_header\"}",
        1,
    )
    .await;
    // An untrusted peer cannot name a client: its header is no frame, and it is refused.
    let mut forged = behind("127.0.0.9", v1("198.51.100.30")).await;
    assert!(forged.auth(&auth(23)).await.is_err());
    // The two proxied sessions are unaffected.
    a.heartbeat().await.unwrap();
    b.heartbeat().await.unwrap();
}

/// `/metrics` lives on the ops listener (`listen.ops`) only; the client port keeps the health
/// probes a load balancer needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_on_the_ops_listener_not_the_client_port() {
    let c = cluster(&[]).await;
    let get = |addr: SocketAddr, path: &'static str| async move {
        reqwest::get(format!("http://{addr}{path}"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get(c.comet.http, "/metrics").await, 404);
    assert_eq!(get(c.comet.http, "/healthz").await, 200);
    assert_eq!(get(c.comet.http, "/readyz").await, 200);
    assert_eq!(get(c.comet.ops, "/metrics").await, 200);
    assert!(
        metric(c.comet.ops, "rim_comet_connections_ws")
            .await
            .is_some(),
        "the comet's own series are there"
    );
}
