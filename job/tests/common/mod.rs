//! The job tier's end-to-end harness: a real Redis, fake comets served over tarpc, a worker run
//! in-process, and the Redis commands the tests check the streams with.

#![allow(clippy::unwrap_used, dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use redis::Commands;
use rim_job::{Config, Listeners, RunError};
use rim_proto::job::{PushJob, Route, ServerKeys};
use rim_proto::keys;
use rim_proto::rpc::{CometRpc, DeliverReport, Delivery, NodeInfo};
use rim_testkit::redis::RedisServer;
use tarpc::server::Channel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A comet that records what it is asked to deliver; while `failing`, it never answers (the call
/// runs into job's deadline, like a hung comet); while `gated`, each call waits for a
/// `gate.notify_one()` before it is confirmed (a comet slow to answer).
#[derive(Clone, Default)]
pub struct FakeComet {
    pub delivered: Arc<Mutex<Vec<Delivery>>>,
    /// Calls received, counted before they are held by `failing` or `gated`.
    pub attempts: Arc<AtomicUsize>,
    pub failing: Arc<AtomicBool>,
    pub gated: Arc<AtomicBool>,
    pub gate: Arc<tokio::sync::Notify>,
}

impl CometRpc for FakeComet {
    async fn deliver(self, _: tarpc::context::Context, items: Vec<Delivery>) -> DeliverReport {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.gated.load(Ordering::SeqCst) {
            self.gate.notified().await;
        }
        let n = items.len() as u64;
        self.delivered.lock().extend(items);
        DeliverReport {
            queued: n,
            ..DeliverReport::default()
        }
    }
}

impl FakeComet {
    pub fn delivered(&self) -> Vec<Delivery> {
        self.delivered.lock().clone()
    }
}

/// Serves a fake comet on 127.0.0.1:0 and registers it in Redis as logic would.
pub async fn start_comet(redis: &RedisServer, server: &str) -> FakeComet {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let comet = FakeComet::default();
    let serving = comet.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let channel =
                tarpc::server::BaseChannel::with_defaults(rim_proto::rpc::transport(stream));
            tokio::spawn(
                channel
                    .execute(serving.clone().serve())
                    .for_each(|f| async {
                        tokio::spawn(f);
                    }),
            );
        }
    });
    let info = NodeInfo {
        server: server.into(),
        rpc_addr: addr,
        ..NodeInfo::default()
    };
    let mut conn = redis.connection();
    let _: () = conn
        .hset(keys::NODES, server, serde_json::to_string(&info).unwrap())
        .unwrap();
    let expiry = rim_runtime::unix_ms() + 600_000;
    let _: () = conn.zadd(keys::NODES_EXPIRY, server, expiry).unwrap();
    comet
}

pub fn config(redis: &RedisServer, worker: &str) -> Config {
    let mut c = Config {
        worker_id: worker.into(),
        shutdown_grace_ms: 5000,
        ..Config::default()
    };
    c.redis.url = redis.url();
    c.listen.http = "127.0.0.1:0".into();
    c.stream.partitions = 4;
    c.stream.block_ms = 50;
    c.lease.ttl_ms = 1000;
    c.lease.renew_ms = 100;
    c.delivery.rpc_timeout_ms = 300;
    c.delivery.retry_base_ms = 20;
    c.delivery.retry_max_ms = 100;
    c.registry.refresh_ms = 50;
    c
}

pub struct Job {
    pub stop: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), RunError>>,
    pub http: std::net::SocketAddr,
}

pub async fn start_job(config: Config) -> Job {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(rim_job::run(Listeners { http }, config, stop.clone()));
    Job {
        stop,
        handle,
        http: addr,
    }
}

impl Job {
    pub async fn get(&self, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(self.http).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .expect("run ok");
    }
}

/// Polls `cond` every 20 ms for up to 10 s.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn job(msg: &str, route: Route) -> PushJob {
    PushJob {
        msg_id: msg.into(),
        op: 1000,
        body: Bytes::from(format!("body-{msg}")),
        route,
        accepted_ms: rim_runtime::unix_ms(),
        exclude: None,
        recorded: false,
    }
}

pub fn to(server: &str, key: &str) -> Route {
    Route::Sessions(vec![ServerKeys {
        server: server.into(),
        keys: vec![key.into()],
    }])
}

pub fn xadd(conn: &mut redis::Connection, partition: u16, job: &PushJob) -> String {
    conn.xadd(
        keys::push_stream(partition),
        "*",
        &[(keys::JOB_FIELD, job.encode())],
    )
    .unwrap()
}

pub fn pending(conn: &mut redis::Connection, partition: u16) -> u64 {
    let r: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(keys::push_stream(partition))
        .arg(keys::PUSH_GROUP)
        .query(conn);
    match r {
        Ok(redis::Value::Array(v)) => match v.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    }
}
pub fn stream_ids(conn: &mut redis::Connection, partition: u16) -> u64 {
    conn.xlen(keys::push_stream(partition)).unwrap()
}

pub fn create_group(conn: &mut redis::Connection, partition: u16) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys::push_stream(partition))
        .arg(keys::PUSH_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(conn)
        .unwrap();
}

/// Who holds `partition`'s lease (`GET rim:lease:{p}`).
pub fn lease_holder(conn: &mut redis::Connection, partition: u16) -> Option<String> {
    conn.get(keys::partition_lease(partition)).unwrap()
}

/// Waits (up to 10 s) until `/metrics` at `http` shows `name` at `want`.
pub async fn wait_metric(http: std::net::SocketAddr, name: &str, want: u64) {
    rim_testkit::api::eventually(name, Duration::from_secs(10), || async {
        (rim_testkit::api::metric(http, name).await == Some(want)).then_some(())
    })
    .await
    .unwrap();
}
