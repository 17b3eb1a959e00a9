//! rim-client's self-reconnecting `Client` against a real cluster: it authenticates, receives
//! pushes, answers requests by seq (ChangeRoom, Sub, SendMsg) with the server's refusals as
//! errors, comes back under the same key after the server closed it, and stops with the reason
//! when a refusal cannot be fixed by reconnecting.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Cluster;
use rim_client::{Client, ClientConfig, ClientError, ConnectOptions, Event, Reconnect, Transport};
use rim_proto::msg::{AuthBody, SendMsgBody};
use rim_testkit::WAIT;
use rim_testkit::client::Conn;

fn config(c: &Cluster, transport: Transport, auth: AuthBody) -> ClientConfig {
    let mut cfg = ClientConfig::new(
        ConnectOptions::new(transport, c.comets[0].addr(transport)),
        auth,
    );
    cfg.reconnect = Reconnect {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
        max_attempts: Some(20),
    };
    cfg
}

/// The next event that is not a push, within [`WAIT`].
async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("an event in time")
        .expect("client still running")
}

async fn next_push(client: &mut Client) -> Vec<u8> {
    loop {
        match next_event(client).await {
            Event::Push(p) => return p.frame.body.to_vec(),
            Event::Notice(_) => continue,
            other => panic!("expected a push, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_receives_requests_and_reconnects_under_its_key() {
    let c = Cluster::start().await;
    for transport in [Transport::WsBinary, Transport::Tcp, Transport::WsJson] {
        let mid = match transport {
            Transport::WsBinary => 71,
            Transport::Tcp => 72,
            Transport::WsJson => 73,
        };
        let auth = AuthBody {
            mid,
            room_id: "live://client-a".into(),
            accepts: vec![1000],
            ..AuthBody::default()
        };
        let mut client = Client::start(config(&c, transport, auth.clone()));
        let first = client.connected().await.unwrap();
        assert_eq!(first.mid, mid);
        assert!(!first.key.is_empty(), "the server assigned a key");

        c.api.push_mids(1000, &[mid], b"to-user").await.unwrap();
        assert_eq!(next_push(&mut client).await, b"to-user");

        // Requests are answered by seq; refusals carry the server's reason.
        client.change_room("live://client-b").await.unwrap();
        c.api
            .push_room(1000, "live", "client-b", b"to-room")
            .await
            .unwrap();
        assert_eq!(next_push(&mut client).await, b"to-room");
        let e = client.change_room("not a room").await.unwrap_err();
        assert!(
            matches!(&e, ClientError::Refused { op: "ChangeRoom", message, .. } if message.contains("bad room id")),
            "{e}"
        );
        client.sub(&[1001]).await.unwrap();
        c.api.push_mids(1001, &[mid], b"op-1001").await.unwrap();
        assert_eq!(next_push(&mut client).await, b"op-1001");
        // A direct message to nobody online is accepted: kept in that user's history for its
        // next connect (users keep one by default), answered with the message id.
        let id = client
            .send_msg(&SendMsgBody {
                room: None,
                mid: Some(999_999),
                op: 1000,
                data: serde_json::json!("hi"),
            })
            .await
            .unwrap();
        assert!(!id.is_empty());

        // Another connection takes the key over: the client is closed as replaced, comes back
        // under the same key (so it replaces the intruder in turn) and keeps receiving.
        let intruder_auth = AuthBody {
            key: first.key.clone(),
            ..auth.clone()
        };
        let mut intruder = Conn::connect(transport, c.comets[1].addr(transport), &intruder_auth)
            .await
            .unwrap();
        match next_event(&mut client).await {
            Event::Disconnected { error, .. } => assert!(error.is_transient(), "{error}"),
            other => panic!("expected a disconnect, got {other:?}"),
        }
        let again = client.connected().await.unwrap();
        assert_eq!(again.key, first.key, "reconnected as the same session");
        let closed = intruder.expect_closed().await.unwrap();
        assert!(closed.said("replaced"), "{closed:?}");
        c.api.push_mids(1000, &[mid], b"after").await.unwrap();
        assert_eq!(next_push(&mut client).await, b"after");
        client.close().await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reconnecting_cannot_fix_stops_the_client_with_the_reason() {
    let c = Cluster::start().await;
    let owner = AuthBody {
        mid: 81,
        key: "taken-key".into(),
        ..AuthBody::default()
    };
    let _owner = Conn::connect(Transport::WsBinary, c.comets[0].http, &owner)
        .await
        .unwrap();
    let thief = AuthBody {
        mid: 82,
        ..owner.clone()
    };
    let mut client = Client::start(config(&c, Transport::WsBinary, thief));
    let e = client.connected().await.unwrap_err();
    assert!(
        matches!(&e, ClientError::AuthRefused(closed) if closed.said("another user")),
        "{e}"
    );
    assert!(!e.is_transient());
    assert!(
        client.next_event().await.is_none(),
        "no more events after Stopped"
    );
    c.stop().await;
}
