//! Promises of the client port that each need a test that fails if broken: the connection cap
//! (`session.max_connections`), the WebSocket close codes of server-side closes, paced broadcasts
//! beyond the paced queue, the cap on accepted ops (Auth `accepts`, Sub), and unknown ops. Each test names the
//! mechanism it guards; breaking that mechanism in comet/src makes it fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use rim_client::Transport;
use rim_proto::frame::Frame;
use rim_proto::op;
use rim_proto::rpc::{DeliverTarget, Delivery, PushId};

fn to(key: &str) -> DeliverTarget {
    DeliverTarget::Keys(vec![key.into()])
}

/// `session.max_connections` open: a TCP client gets op 6 "too many connections", a WebSocket
/// client op 6 and close 1013; both are counted. Guards admission.rs `ConnGuard::count`.
#[tokio::test]
async fn max_connections_refuses_with_op6_and_1013_counts_and_recovers() {
    let mut h = start(|c| c.session.max_connections = 1).await;
    let a = h.tcp_session("a", "", &[1000]).await;

    let mut tcp = h.open(Transport::Tcp).await;
    let closed = disconnected(&mut tcp).await;
    assert_eq!(closed.why(), "too many connections", "{closed:?}");
    // The HTTP listener keeps headroom for upgrades, so the refusal is the session's own.
    let mut ws = h.open(Transport::WsBinary).await;
    let closed = disconnected(&mut ws).await;
    assert_eq!(
        (closed.code, closed.why()),
        (Some(1013), "too many connections"),
        "{closed:?}"
    );
    assert_eq!(
        h.metric("rim_comet_connections_refused_total").await,
        Some(2)
    );
    assert_eq!(h.metric("rim_comet_connections_tcp").await, Some(1));
    assert_eq!(h.metric("rim_comet_connections_ws").await, Some(0));

    // Once the first session has left, the slot is free again, for either transport.
    drop(a);
    h.expect_event("disconnect a").await;
    h.wait_metric("rim_comet_connections_tcp", 0).await;
    let b = h.session(Transport::WsBinary, 2, "b", "", &[1000]).await;
    assert_eq!(h.metric("rim_comet_connections_ws").await, Some(1));
    assert_eq!(
        h.metric("rim_comet_connections_refused_total").await,
        Some(2)
    );
    drop(b);
}

/// Heartbeat silence closes a WebSocket session with op 6 and close code 1000 (driver.rs).
#[tokio::test]
async fn ws_heartbeat_timeout_closes_with_1000() {
    let mut h = start_with(1, |c| c.session.heartbeat_misses = 1).await;
    let mut ws = h.session(Transport::WsBinary, 1, "quiet", "", &[]).await;
    let closed = disconnected(&mut ws).await;
    assert_eq!(
        (closed.why(), closed.code, closed.reason.as_str()),
        ("heartbeat timeout", Some(1000), "heartbeat timeout"),
        "{closed:?}"
    );
    h.expect_event("disconnect quiet").await;
}

/// A second session with the same key closes the first with op 6 "replaced" and close code
/// 1000 (admission.rs); the new one is served.
#[tokio::test]
async fn ws_replaced_session_closes_with_1000() {
    let mut h = start(|_| {}).await;
    let mut old = h.session(Transport::WsBinary, 1, "dup", "", &[1000]).await;
    let mut new = h.session(Transport::WsBinary, 1, "dup", "", &[1000]).await;
    let closed = disconnected(&mut old).await;
    assert_eq!(
        (closed.why(), closed.code, closed.reason.as_str()),
        ("replaced", Some(1000), "replaced"),
        "{closed:?}"
    );
    let r = h.push(1000, "to new", to("dup")).await;
    assert_eq!(r.queued, 1, "{r:?}");
    assert_eq!(body_text(&new.recv_any().await.unwrap()), "to new");
}

/// An outbound queue overflow closes a WebSocket session with op 6 "slow consumer" and close
/// code 1008, nothing queued written first (outbound.rs `CloseSpec::slow`).
#[tokio::test]
async fn ws_slow_consumer_closes_with_1008() {
    let mut h = start(|c| c.session.outbound_queue = 2).await;
    let mut ws = h.session(Transport::WsBinary, 1, "slow", "", &[1000]).await;
    let body = Bytes::from("x".repeat(1000));
    let items = (0..50)
        .map(|_| Delivery {
            id: h.push_id(),
            op: 1000,
            body: body.clone(),
            target: to("slow"),
            exclude: None,
            recorded: false,
        })
        .collect();
    let r = h.deliver(items).await;
    assert_eq!(r.slow_closed, 1, "{r:?}");
    let closed = disconnected(&mut ws).await;
    assert_eq!(
        (closed.why(), closed.code, closed.reason.as_str()),
        ("slow consumer", Some(1008), "slow consumer"),
        "{closed:?}"
    );
    assert_eq!(
        h.metric("rim_comet_slow_consumer_closed_total").await,
        Some(1)
    );
}

/// Paced broadcasts beyond the paced queue (deliver.rs `PACED_QUEUE` = 16) go out at once, in
/// the `deliver` call, and are counted; the queued ones are walked afterwards. The test runtime
/// is single-threaded, so the paced worker takes nothing from the queue during the call.
#[tokio::test]
async fn paced_broadcasts_beyond_the_queue_go_out_at_once_and_are_counted() {
    let h = start(|_| {}).await;
    let mut c = h.tcp_session("p", "", &[1000]).await;
    let items = (1..=18)
        .map(|i| Delivery {
            id: PushId {
                partition: 3,
                ms: 10,
                seq: i,
            },
            op: 1000,
            body: Bytes::from(format!("p{i}")),
            target: DeliverTarget::All { speed: 1 },
            exclude: None,
            recorded: false,
        })
        .collect();
    let r = h.deliver(items).await;
    // p1..p16 fill the queue (confirmed, not yet delivered); p17 and p18 went out at once.
    assert_eq!(
        (r.queued, r.missing, r.duplicates, r.slow_closed),
        (2, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!(h.metric("rim_comet_paced_overflow_total").await, Some(2));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(body_text(&c.recv_any().await.unwrap()));
    }
    // At 1 session/s the walk of p2 starts a second after p1's.
    assert_eq!(got, ["p17", "p18", "p1"]);
}

/// Auth `accepts` beyond 256 (`session::MAX_ACCEPTS`) are ignored: the first 256 are taken.
#[tokio::test]
async fn auth_accepts_beyond_256_are_ignored() {
    let mut h = start(|_| {}).await;
    let accepts: Vec<i32> = (2000..2300).collect();
    let mut c = h.tcp_session("many", "", &accepts).await;
    for (o, queued) in [(2000, 1), (2255, 1), (2256, 0), (2299, 0)] {
        let r = h.push(o, &format!("op{o}"), to("many")).await;
        assert_eq!((r.queued, r.missing), (queued, 0), "op {o}: {r:?}");
    }
    let got = [c.recv_any().await.unwrap(), c.recv_any().await.unwrap()];
    let got = got.map(|r| (r.frame.op, body_text(&r)));
    assert_eq!(got, [(2000, "op2000".into()), (2255, "op2255".into())]);
    // The set is full: a Sub of one more op is refused.
    let f = request(&mut c, op::SUB, 1, "1").await.frame;
    assert_eq!((f.op, f.seq), (op::SUB_REPLY, 1));
    assert_eq!(&f.body[..], br#"{"error":"too many ops: at most 256"}"#);
}

/// A Sub that would take a session past 256 accepted ops is refused and changes nothing
/// (session.rs `set_accepts`); so is one whose own list is longer (client_op.rs, parsing).
#[tokio::test]
async fn a_refused_sub_leaves_the_accepted_ops_unchanged() {
    let mut h = start(|_| {}).await;
    let mut c = h.tcp_session("sub", "", &[1000]).await;
    let list = |ops: std::ops::Range<i32>| ops.map(|o| o.to_string()).collect::<Vec<_>>().join(",");
    // 256 ops: a valid list, but with 1000 the session would accept 257.
    // 300 ops: refused before the session is asked.
    for (seq, ops) in [(1, 2000..2256), (2, 3000..3300)] {
        let f = request(&mut c, op::SUB, seq, list(ops)).await.frame;
        assert_eq!((f.op, f.seq), (op::SUB_REPLY, seq));
        assert_eq!(&f.body[..], br#"{"error":"too many ops: at most 256"}"#);
    }
    for (o, queued) in [(2000, 0), (2255, 0), (3000, 0), (1000, 1)] {
        let r = h.push(o, &format!("op{o}"), to("sub")).await;
        assert_eq!((r.queued, r.missing), (queued, 0), "op {o}: {r:?}");
    }
    let p = c.recv_any().await.unwrap();
    assert_eq!((p.frame.op, body_text(&p)), (1000, "op1000".to_string()));
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
}

/// An unknown op gets no reply and costs nothing but a rate token: the session stays, the next
/// request is answered first, pushes still arrive, no refusal is counted (client_op.rs
/// `ClientOp::Unknown`).
#[tokio::test]
async fn unknown_ops_are_ignored() {
    let mut h = start(|_| {}).await;
    for (t, key) in [(Transport::Tcp, "u-tcp"), (Transport::WsBinary, "u-ws")] {
        let mut c = h.session(t, 1, key, "", &[1000]).await;
        c.send_frame(Frame::new(99, 5, Bytes::from_static(b"?")))
            .await
            .unwrap();
        // The first frame after it answers the heartbeat sent after it.
        let hb = request(&mut c, op::HEARTBEAT, 6, Bytes::new()).await.frame;
        assert_eq!((hb.op, hb.seq), (op::HEARTBEAT_REPLY, 6), "{t:?}: {hb:?}");
        let r = h.push(1000, "still", to(key)).await;
        assert_eq!(r.queued, 1, "{t:?}: {r:?}");
        assert_eq!(body_text(&c.recv_any().await.unwrap()), "still");
        assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    }
    let rejected = h.rejections().await;
    assert!(rejected.is_empty(), "{rejected:?}");
    for series in [
        "rim_comet_requests_rate_limited_total",
        r#"rim_comet_limit_refused_total{limit="frame_rate"}"#,
    ] {
        assert_eq!(h.metric(series).await, Some(0), "{series}");
    }
}

/// A paced broadcast walks the buckets at `speed` sessions per second: after a bucket of two
/// sessions, the walk pauses two seconds before the next bucket (deliver.rs `paced_worker`). A
/// push delivered unpaced meanwhile reaches the later bucket's session first.
#[tokio::test]
async fn a_paced_broadcast_pauses_between_buckets_at_its_speed() {
    let h = start(|c| c.bucket.count = 2).await;
    // Two sessions in bucket 0 (walked first), one in bucket 1.
    let in_bucket = |b: u16| {
        (0..)
            .map(|i| format!("k{i}"))
            .filter(move |k| rim_proto::job::partition_of(k, 2) == b)
    };
    let first: Vec<String> = in_bucket(0).take(2).collect();
    let later = in_bucket(1).next().unwrap();
    let mut early_clients = Vec::new();
    for k in &first {
        early_clients.push(h.tcp_session(k, "", &[1000]).await);
    }
    let mut late = h.tcp_session(&later, "", &[1000]).await;
    let paced = Delivery {
        id: PushId {
            partition: 3,
            ms: 10,
            seq: 1,
        },
        op: 1000,
        body: Bytes::from_static(b"paced"),
        target: DeliverTarget::All { speed: 1 },
        exclude: None,
        recorded: false,
    };
    h.deliver(vec![paced.clone()]).await;
    for c in &mut early_clients {
        assert_eq!(body_text(&c.recv_any().await.unwrap()), "paced");
    }
    // Bucket 0 has been walked; bucket 1 waits two seconds: nothing reaches it in the first half
    // second, and an unpaced push sent now is first there.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), late.recv_any())
            .await
            .is_err(),
        "the later bucket was walked without the pause"
    );
    let now = Delivery {
        id: PushId { seq: 2, ..paced.id },
        body: Bytes::from_static(b"now"),
        target: DeliverTarget::Keys(vec![later.clone()]),
        ..paced
    };
    assert_eq!(h.deliver(vec![now]).await.queued, 1);
    assert_eq!(body_text(&late.recv_any().await.unwrap()), "now");
    assert_eq!(body_text(&late.recv_any().await.unwrap()), "paced");
}
