//! Slow-loris sockets on every HTTP port: a client that trickles its request headers (a
//! WebSocket upgrade on the comet, an API call on logic, a scrape on job) is closed when the
//! port's header deadline passes, while other clients are served meanwhile.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use rim_proto::msg::AuthBody;
use rim_testkit::api::Api;
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{self, CometAddrs, free_addr};
use rim_testkit::redis::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Each port's header deadline in this test.
const HEADER_MS: &str = "600";

/// Opens a request with `head` and keeps adding a header line every 100 ms (so no idle timer
/// can be what closes it); finishes when the server closed the socket.
fn loris(addr: SocketAddr, head: &'static str) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a 408 or similar answer before the close is fine
                },
                // Pacing the attacker, not synchronisation: the test waits on the close.
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_is_closed_at_the_header_deadline_on_every_http_port() {
    let redis = RedisServer::start();
    let (logic_http, logic_rpc, job_http) = (free_addr(), free_addr(), free_addr());
    let _logic = process::logic(
        &redis.url(),
        logic_http,
        logic_rpc,
        &[("RIM_LOGIC__LISTEN__HEADER_TIMEOUT_MS", HEADER_MS.into())],
    );
    let _job = process::job(
        &redis.url(),
        job_http,
        &[("RIM_JOB__LISTEN__HEADER_TIMEOUT_MS", HEADER_MS.into())],
    );
    let comet = CometAddrs::free();
    let _comet = process::comet(
        "loris-comet",
        comet,
        logic_rpc,
        &[("RIM_COMET__SESSION__HANDSHAKE_TIMEOUT_MS", HEADER_MS.into())],
    );
    let api = Api::new(logic_http);
    api.wait_live_nodes(1, Duration::from_secs(20))
        .await
        .unwrap();

    let slow = [
        loris(
            comet.http,
            "GET /sub HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
        ),
        loris(
            logic_http,
            "POST /goim/push/all?operation=1000 HTTP/1.1\r\nHost: x\r\n",
        ),
        loris(job_http, "GET /metrics HTTP/1.1\r\nHost: x\r\n"),
    ];

    // Everyone else is served while the slow sockets hang on.
    let mut c = Conn::connect(
        Transport::WsBinary,
        comet.http,
        &AuthBody {
            mid: 1,
            accepts: vec![1000],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    api.push_mids(1000, &[1], b"served").await.unwrap();
    assert_eq!(&c.recv_push().await.unwrap().frame.body[..], b"served");
    let job_ops = Api::new(job_http);
    assert_eq!(job_ops.get("/healthz").await.unwrap().status, 200);

    for (port, handle) in ["comet http", "logic http", "job http"].iter().zip(slow) {
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .unwrap_or_else(|_| panic!("{port}: a trickled request was never closed"))
            .unwrap();
    }
    // And the ports still serve after closing them.
    api.push_mids(1000, &[1], b"after").await.unwrap();
    assert_eq!(&c.recv_push().await.unwrap().frame.body[..], b"after");
}
