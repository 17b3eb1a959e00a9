//! The logic tier started in-process on port 0 against a real throwaway redis-server, and the
//! small helpers the logic test files share.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use redis::Commands;
use rim_logic::{Config, Listeners};
use rim_proto::job::{self, PushJob};
use rim_proto::keys;
use rim_proto::msg::AuthBody;
use rim_proto::room::RoomId;
use rim_proto::rpc::{ConnectRequest, LogicRpcClient, SendMsgRequest, SendTarget, SessionRef};
use rim_testkit::redis::RedisServer;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A running logic.
pub struct Logic {
    pub http: String,
    pub rpc: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), rim_logic::RunError>>,
}

impl Logic {
    pub async fn start(redis: &RedisServer, tweak: impl FnOnce(&mut Config)) -> Logic {
        let mut config = Config::dev();
        config.redis.url = redis.url();
        config.redis.timeout_ms = 500;
        config.shutdown_grace_ms = 2_000;
        tweak(&mut config);
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (h, r) = (http.local_addr().unwrap(), rpc.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(rim_logic::run(
            Listeners { http, rpc },
            config,
            shutdown.clone(),
        ));
        let logic = Logic {
            http: format!("http://{h}"),
            rpc: r,
            shutdown,
            task,
        };
        // Ready once /healthz answers (run connects to Redis before serving).
        eventually("logic serving", || async {
            reqwest::get(format!("{}/healthz", logic.http))
                .await
                .is_ok()
        })
        .await;
        logic
    }

    pub async fn client(&self) -> LogicRpcClient {
        let stream = tokio::net::TcpStream::connect(self.rpc).await.unwrap();
        LogicRpcClient::new(Default::default(), rim_proto::rpc::transport(stream)).spawn()
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.http))
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::get(format!("{}{path}", self.http)).await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + rim_testkit::WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn ctx() -> tarpc::context::Context {
    tarpc::context::current()
}

pub fn jobs(conn: &mut redis::Connection, p: u16) -> Vec<PushJob> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(keys::push_stream(p)).unwrap();
    reply
        .ids
        .iter()
        .map(|e| {
            let raw: Vec<u8> = e.get(keys::JOB_FIELD).unwrap();
            PushJob::decode(&raw).unwrap()
        })
        .collect()
}

pub fn all_jobs(conn: &mut redis::Connection) -> Vec<(u16, PushJob)> {
    (0..job::DEFAULT_PARTITIONS)
        .flat_map(|p| jobs(conn, p).into_iter().map(move |j| (p, j)))
        .collect()
}

/// A room id the test knows is valid.
pub fn room(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

/// A session as its comet names it in an RPC.
pub fn sref(server: &str, mid: i64, key: &str) -> SessionRef {
    SessionRef {
        server: server.into(),
        mid,
        key: key.into(),
    }
}

/// Registers session `key` of `mid` on `server`, in `room` ("" = none).
pub async fn connect(rpc: &LogicRpcClient, server: &str, mid: i64, key: &str, room: &str) {
    let auth = AuthBody {
        mid,
        key: key.into(),
        room_id: room.into(),
        platform: "web".into(),
        accepts: vec![1000],
        ..AuthBody::default()
    };
    rpc.connect(
        ctx(),
        ConnectRequest {
            server: server.into(),
            auth,
            remote_ip: "127.0.0.1".into(),
        },
    )
    .await
    .unwrap()
    .unwrap();
}

/// An upstream message (op 1000) from `sender`, as its comet forwards it.
pub fn msg(
    sender: SessionRef,
    sender_room: Option<&str>,
    target: SendTarget,
    data: &str,
) -> SendMsgRequest {
    SendMsgRequest {
        sender,
        sender_room: sender_room.map(room),
        target,
        op: 1000,
        data_json: data.into(),
        grant: Default::default(),
    }
}
