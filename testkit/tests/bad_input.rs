//! Bad input gets a clear error or close reason, and the comet keeps serving everyone else.
#![allow(clippy::unwrap_used)]

mod common;

use common::Cluster;
use rim_proto::op;
use rim_testkit::client::{Conn, Transport, raw_frame};

/// A healthy session on the same comet still gets pushes after each bad client.
async fn still_serving(cluster: &Cluster, healthy: &mut Conn, tag: &str) {
    cluster
        .api
        .push_keys(1000, &[healthy.key()], tag.as_bytes())
        .await
        .unwrap();
    let r = healthy
        .recv_push()
        .await
        .unwrap_or_else(|e| panic!("healthy client after {tag}: {e}"));
    assert_eq!(&r.frame.body[..], tag.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_the_offender_with_a_precise_reason() {
    let cluster = Cluster::start().await;
    let comet = &cluster.comets[0];
    let mut healthy_ws = cluster.client(0, Transport::WsBinary, 1, "", &[1000]).await;
    let mut healthy_tcp = cluster.client(0, Transport::Tcp, 2, "", &[1000]).await;

    // First frame is not Auth.
    for t in [Transport::WsBinary, Transport::Tcp] {
        let mut c = Conn::open(t, comet.addr(t)).await.unwrap();
        c.send_op(op::HEARTBEAT, bytes::Bytes::new()).await.unwrap();
        let closed = c.expect_closed().await.unwrap();
        let reason = closed.disconnect_reason.clone().unwrap_or_default();
        assert_eq!(
            reason, "first frame must be op 7 Auth, got op 2",
            "{t:?}: {closed:?}"
        );
        if t == Transport::WsBinary {
            assert_eq!(closed.code, Some(1008), "{closed:?}");
        }
        still_serving(&cluster, &mut healthy_ws, "after-non-auth").await;
    }

    // Auth body is not JSON.
    for t in [Transport::WsBinary, Transport::Tcp] {
        let mut c = Conn::open(t, comet.addr(t)).await.unwrap();
        c.send_op(op::AUTH, &b"{mid:"[..]).await.unwrap();
        let closed = c.expect_closed().await.unwrap();
        assert!(closed.said("bad auth body"), "{t:?}: {closed:?}");
        still_serving(&cluster, &mut healthy_tcp, "after-bad-json").await;
    }

    // headerLen ≠ 16 → 1002 on WebSocket; op 6 and close on TCP.
    let mut c = Conn::open(Transport::WsBinary, comet.http).await.unwrap();
    c.send_raw(raw_frame(16, 12, op::AUTH, b"")).await.unwrap();
    let closed = c.expect_closed().await.unwrap();
    assert_eq!(closed.code, Some(1002), "{closed:?}");
    assert!(closed.reason.contains("headerLen"), "{closed:?}");
    let mut c = Conn::open(Transport::Tcp, comet.tcp).await.unwrap();
    c.send_raw(raw_frame(16, 20, op::AUTH, b"")).await.unwrap();
    let closed = c.expect_closed().await.unwrap();
    assert!(closed.said("headerLen"), "{closed:?}");
    still_serving(&cluster, &mut healthy_ws, "after-headerlen").await;

    // packLen over the limit (4096-byte bodies by default) → 1009.
    let mut c = Conn::open(Transport::WsBinary, comet.http).await.unwrap();
    let body = vec![b'x'; 5000];
    c.send_raw(raw_frame(16 + 5000, 16, op::AUTH, &body))
        .await
        .unwrap();
    let closed = c.expect_closed().await.unwrap();
    assert_eq!(closed.code, Some(1009), "{closed:?}");
    // On TCP the header alone is enough to refuse: the body is never buffered.
    let mut c = Conn::open(Transport::Tcp, comet.tcp).await.unwrap();
    c.send_raw(raw_frame(16 + 1_000_000, 16, op::AUTH, b""))
        .await
        .unwrap();
    let closed = c.expect_closed().await.unwrap();
    assert!(closed.said("exceeds"), "{closed:?}");
    still_serving(&cluster, &mut healthy_tcp, "after-oversize").await;

    // Truncated: a WebSocket message shorter than its packLen; a short header.
    let mut c = Conn::open(Transport::WsBinary, comet.http).await.unwrap();
    c.send_raw(raw_frame(40, 16, op::AUTH, b"{}"))
        .await
        .unwrap();
    let closed = c.expect_closed().await.unwrap();
    assert_eq!(closed.code, Some(1002), "{closed:?}");
    assert!(closed.reason.contains("packLen"), "{closed:?}");
    let mut c = Conn::open(Transport::WsBinary, comet.http).await.unwrap();
    c.send_raw(vec![0, 0, 0]).await.unwrap();
    let closed = c.expect_closed().await.unwrap();
    assert_eq!(closed.code, Some(1002), "{closed:?}");
    // TCP: half a frame, then the client goes away; the comet must just log and clean up.
    let mut c = Conn::open(Transport::Tcp, comet.tcp).await.unwrap();
    c.send_raw(raw_frame(100, 16, op::AUTH, b"{\"mid\":"))
        .await
        .unwrap();
    c.close().await;
    still_serving(&cluster, &mut healthy_ws, "after-truncated").await;
    still_serving(&cluster, &mut healthy_tcp, "after-truncated").await;

    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_room_ids_are_refused_with_a_reason() {
    let cluster = Cluster::start().await;
    let comet = &cluster.comets[0];
    let mut healthy = cluster
        .client(0, Transport::WsJson, 1, "live://ok", &[1000])
        .await;

    // At auth: refused with op 6 naming room_id.
    let mut c = Conn::open(Transport::Tcp, comet.tcp).await.unwrap();
    let auth = serde_json::json!({"mid": 5, "room_id": "no-separator", "accepts": [1000]});
    c.send_op(op::AUTH, serde_json::to_vec(&auth).unwrap())
        .await
        .unwrap();
    let closed = c.expect_closed().await.unwrap();
    assert!(closed.said("room"), "{closed:?}");

    // On ChangeRoom: the session stays, and the refusal says why.
    let mut c = cluster.client(0, Transport::WsBinary, 6, "", &[1000]).await;
    let seq = c.send_op(op::CHANGE_ROOM, &b"bad room"[..]).await.unwrap();
    let reply = c.recv_op(op::CHANGE_ROOM_REPLY).await.unwrap();
    assert_eq!(reply.frame.seq, seq);
    assert!(
        String::from_utf8_lossy(&reply.frame.body).contains("room"),
        "{reply:?}"
    );
    assert_eq!(
        c.heartbeat().await.unwrap(),
        0,
        "session still served, in no room"
    );

    still_serving(&cluster, &mut healthy, "after-bad-room").await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_push_parameters_are_checked_and_named() {
    let cluster = Cluster::start_with(common::Options {
        comets: 1,
        ..Default::default()
    })
    .await;
    // (request, words the 400's message must contain)
    let cases: &[(&str, &[&str])] = &[
        ("/goim/push/mids?mids=1", &["operation"]),
        ("/goim/push/mids?operation=1000&mids=12x", &["mids", "12x"]),
        ("/goim/push/mids?operation=abc&mids=1", &["operation"]),
        ("/goim/push/mids?operation=1000", &["mids"]),
        ("/goim/push/keys?operation=1000", &["keys"]),
        ("/goim/push/room?operation=1000&type=live", &["room"]),
        (
            "/goim/push/room?operation=1000&type=li%20ve&room=1",
            &["type"],
        ),
    ];
    for (path, words) in cases {
        let r = cluster.api.post(path, "x").await.unwrap();
        assert_eq!((r.status, r.code()), (400, -400), "{path}: {:?}", r.body);
        assert!(
            words.iter().all(|w| r.message().contains(w)),
            "{path}: {:?} should name {words:?}",
            r.body
        );
    }

    let big = vec![b'x'; 64 * 1024 + 1];
    let r = cluster
        .api
        .post("/goim/push/all?operation=1000", big)
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (400, -400), "{:?}", r.body);
    assert!(r.message().contains("65536"), "{:?}", r.body);

    // The API still works after all that.
    let r = cluster
        .api
        .post("/goim/push/all?operation=1000", "fine")
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (200, 0), "{:?}", r.body);
    cluster.stop().await;
}

/// xorshift64*: a fixed-seed source of garbage, so a failure replays exactly.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A malformed or hostile frame: random bytes, or a header lying about its length, op or size.
    fn frame(&mut self) -> Vec<u8> {
        let body_len = (self.next() % 64) as usize;
        let body: Vec<u8> = (0..body_len).map(|_| self.next() as u8).collect();
        match self.next() % 5 {
            0 => body,
            1 => raw_frame(self.next() as i32, 16, op::AUTH, &body),
            2 => raw_frame(
                16 + body_len as i32,
                (self.next() % 40) as i16,
                op::AUTH,
                &body,
            ),
            3 => raw_frame(16 + body_len as i32, 16, (self.next() % 40) as i32, &body),
            _ => raw_frame(16 + 5000, 16, op::SEND_MSG, &body),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_malformed_frames_while_legitimate_clients_keep_receiving() {
    let cluster = Cluster::start_with(common::Options {
        comets: 1,
        ..Default::default()
    })
    .await;
    let comet = &cluster.comets[0];
    let mut ws = cluster
        .client(0, Transport::WsBinary, 1, "live://flood", &[1000])
        .await;
    let mut tcp = cluster
        .client(0, Transport::Tcp, 2, "live://flood", &[1000])
        .await;
    let mut json = cluster
        .client(0, Transport::WsJson, 3, "live://flood", &[1000])
        .await;

    // Attackers: connections that open, spray garbage (binary and text) and get thrown out.
    const CONNECTIONS: u64 = 400;
    const FRAMES_PER_CONNECTION: u64 = 8;
    let (http, tcp_addr) = (comet.http, comet.tcp);
    let attack = tokio::spawn(async move {
        let mut g = Garbage(0x9e37_79b9_7f4a_7c15);
        let mut sent = 0u64;
        for i in 0..CONNECTIONS {
            let t = if i % 2 == 0 {
                Transport::Tcp
            } else {
                Transport::WsBinary
            };
            let addr = if t == Transport::Tcp { tcp_addr } else { http };
            let Ok(mut c) = Conn::open(t, addr).await else {
                continue;
            };
            for _ in 0..FRAMES_PER_CONNECTION {
                let frame = g.frame();
                let ok = if t == Transport::WsBinary && g.next().is_multiple_of(4) {
                    c.send_text(&String::from_utf8_lossy(&frame)).await
                } else {
                    c.send_raw(frame).await
                };
                if ok.is_err() {
                    break; // already thrown out: the next connection
                }
                sent += 1;
            }
            c.close().await;
        }
        sent
    });

    // Meanwhile the room keeps receiving, every push, in order, on every transport.
    for i in 0..100 {
        cluster
            .api
            .push_room(1000, "live", "flood", format!("n{i}").as_bytes())
            .await
            .unwrap();
        for c in [&mut ws, &mut tcp, &mut json] {
            let r = c.recv_push().await.unwrap();
            assert_eq!(
                r.frame.body,
                format!("n{i}").as_bytes(),
                "{:?}",
                c.transport()
            );
        }
    }
    let sent = attack.await.unwrap();
    assert!(
        sent >= CONNECTIONS,
        "garbage actually went out: {sent} frames"
    );

    // The comet counted what it refused and still serves new sessions.
    let metrics = reqwest::get(format!("http://{}/metrics", comet.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rejected: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("rim_comet_frames_rejected_total")
                || l.starts_with("rim_comet_auth_failures_total")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        rejected >= CONNECTIONS / 2,
        "rejections counted: {rejected}\n{metrics}"
    );
    let mut late = cluster
        .client(0, Transport::Tcp, 4, "live://flood", &[1000])
        .await;
    cluster
        .api
        .push_room(1000, "live", "flood", b"after")
        .await
        .unwrap();
    assert_eq!(&late.recv_push().await.unwrap().frame.body[..], b"after");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_sends_a_request_is_closed() {
    use tokio::io::AsyncReadExt;
    let cluster = Cluster::start_with(common::Options {
        comets: 1,
        comet: Box::new(|_, c| c.session.handshake_timeout_ms = 200),
        ..Default::default()
    })
    .await;
    // Connected to the WebSocket port, silent: before the fix it held a socket forever.
    let mut silent = tokio::net::TcpStream::connect(cluster.comets[0].http)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(rim_testkit::WAIT, silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the comet closed the silent socket: {read:?}"
    );
    let mut healthy = cluster.client(0, Transport::WsBinary, 1, "", &[1000]).await;
    still_serving(&cluster, &mut healthy, "after-silent-socket").await;
    cluster.stop().await;
}
