//! A whole rim cluster in one test process: a real redis-server (or Redis Cluster, with
//! `RIM_TEST_REDIS=cluster`), one logic, one job worker and N comets, each started through its library `run` on 127.0.0.1:0 listeners and wired only
//! through those listeners and Redis.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use rim_proto::msg::AuthBody;
use rim_testkit::api::{Api, eventually, streams_drained};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::CLUSTER_SECRET;
use rim_testkit::test_redis::TestRedis;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One running comet.
pub struct CometNode {
    pub server_id: String,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    pub rpc: SocketAddr,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<()>>,
}

impl CometNode {
    /// Address a client of `transport` connects to.
    pub fn addr(&self, transport: Transport) -> SocketAddr {
        match transport {
            Transport::Tcp => self.tcp,
            _ => self.http,
        }
    }
}

/// Adjusts comet `i`'s config before it starts.
pub type CometTweak = Box<dyn FnMut(usize, &mut rim_comet::Config)>;

/// Knobs a test may turn before the cluster starts.
pub struct Options {
    pub comets: usize,
    /// The Redis to run on; `None` = [`TestRedis::from_env`].
    pub redis: Option<TestRedis>,
    pub logic: Box<dyn FnMut(&mut rim_logic::Config)>,
    pub job: Box<dyn FnMut(&mut rim_job::Config)>,
    pub comet: CometTweak,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            comets: 2,
            redis: None,
            logic: Box::new(|_| {}),
            job: Box::new(|_| {}),
            comet: Box::new(|_, _| {}),
        }
    }
}

pub struct Cluster {
    pub redis: TestRedis,
    pub logic_http: SocketAddr,
    pub logic_rpc: SocketAddr,
    /// The job worker's HTTP (health and `/metrics`).
    pub job_http: SocketAddr,
    pub api: Api,
    pub comets: Vec<CometNode>,
    tiers: CancellationToken,
    handles: Vec<JoinHandle<()>>,
}

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Logs for a failing test: `RUST_LOG=rim=debug cargo test ...`.
pub fn init_logs() {
    rim_runtime::logging::init("warn", false);
}

impl Cluster {
    pub async fn start() -> Cluster {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(mut opts: Options) -> Cluster {
        init_logs();
        let redis = opts
            .redis
            .take()
            .unwrap_or_else(|| TestRedis::from_env(false));
        let tiers = CancellationToken::new();
        let mut handles = Vec::new();

        let (http, logic_http) = bind().await;
        let (rpc, logic_rpc) = bind().await;
        let mut logic = rim_logic::Config::dev();
        redis.configure(&mut logic.redis);
        logic.node.ttl_ms = 3_000;
        logic.cluster.secret = CLUSTER_SECRET.into();
        (opts.logic)(&mut logic);
        let token = tiers.clone();
        handles.push(tokio::spawn(async move {
            if let Err(e) = rim_logic::run(rim_logic::Listeners { http, rpc }, logic, token).await {
                panic!("logic failed: {e}");
            }
        }));

        let (jhttp, job_http) = bind().await;
        let mut job = rim_job::Config::default();
        redis.configure(&mut job.redis);
        job.registry.refresh_ms = 100;
        job.stream.block_ms = 200;
        job.cluster.secret = CLUSTER_SECRET.into();
        (opts.job)(&mut job);
        let token = tiers.clone();
        handles.push(tokio::spawn(async move {
            if let Err(e) = rim_job::run(rim_job::Listeners { http: jhttp }, job, token).await {
                panic!("job failed: {e}");
            }
        }));

        let mut comets = Vec::new();
        for i in 0..opts.comets {
            comets.push(start_comet(i, logic_rpc, &mut opts.comet).await);
        }
        let cluster = Cluster {
            redis,
            logic_http,
            logic_rpc,
            job_http,
            api: Api::new(logic_http),
            comets,
            tiers,
            handles,
        };
        cluster.wait_live_nodes(opts.comets).await;
        cluster
    }

    /// Waits until `n` comets are listed as live by logic.
    pub async fn wait_live_nodes(&self, n: usize) {
        self.api
            .wait_live_nodes(n, Duration::from_secs(10))
            .await
            .expect("comets register with logic");
    }

    /// Connects and authenticates a client to comet `node`.
    pub async fn client(
        &self,
        node: usize,
        transport: Transport,
        mid: i64,
        room: &str,
        accepts: &[i32],
    ) -> Conn {
        let auth = AuthBody {
            mid,
            room_id: room.to_string(),
            platform: "test".into(),
            accepts: accepts.to_vec(),
            ..Default::default()
        };
        Conn::connect(transport, self.comets[node].addr(transport), &auth)
            .await
            .expect("client connects")
    }

    /// Members of `room` as `(mid, sessions)`, sorted, and the count (`/rim/rooms/{room}/members`).
    pub async fn members(&self, room: &str) -> (Vec<(i64, i64)>, i64) {
        let enc: String = form_urlencoded::byte_serialize(room.as_bytes()).collect();
        let r = self
            .api
            .get(&format!("/rim/rooms/{enc}/members?limit=100"))
            .await
            .unwrap()
            .ok()
            .unwrap();
        let mut m: Vec<(i64, i64)> = r.data()["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["mid"].as_i64().unwrap(), m["sessions"].as_i64().unwrap()))
            .collect();
        m.sort();
        (m, r.data()["count"].as_i64().unwrap())
    }

    /// Waits until every accepted push has been confirmed by the comets it was routed to.
    pub async fn wait_drained(&self) {
        let redis = &self.redis;
        eventually("push streams drained", Duration::from_secs(10), || {
            let mut conn = redis.connection();
            async move { streams_drained(&mut conn).ok().filter(|d| *d).map(|_| ()) }
        })
        .await
        .expect("streams drain");
    }

    /// Stops every tier in the order an operator would (comets first, so they unregister while
    /// logic is up; then job; then logic) and waits for each `run` to return.
    pub async fn stop(mut self) {
        for c in &mut self.comets {
            c.shutdown.cancel();
            if let Some(h) = c.handle.take() {
                tokio::time::timeout(Duration::from_secs(20), h)
                    .await
                    .expect("comet stops")
                    .expect("comet task");
            }
        }
        self.tiers.cancel();
        for h in self.handles.drain(..) {
            tokio::time::timeout(Duration::from_secs(20), h)
                .await
                .expect("tier stops")
                .expect("tier task");
        }
    }
}

async fn start_comet(i: usize, logic_rpc: SocketAddr, tweak: &mut CometTweak) -> CometNode {
    let (http_l, http) = bind().await;
    let (tcp_l, tcp) = bind().await;
    let (rpc_l, rpc) = bind().await;
    let mut cfg = rim_comet::Config {
        server_id: format!("comet-{}", i + 1),
        ..Default::default()
    };
    cfg.logic.addrs = vec![logic_rpc.to_string()];
    cfg.renew.interval_ms = 200;
    cfg.cluster.secret = CLUSTER_SECRET.into();
    tweak(i, &mut cfg);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let server_id = cfg.server_id.clone();
    let handle = tokio::spawn(async move {
        let listeners = rim_comet::Listeners {
            http: http_l,
            tcp: Some(tcp_l),
            wss: None,
            tls: None,
            ops: None,
            rpc: rpc_l,
        };
        if let Err(e) = rim_comet::run(listeners, cfg, token).await {
            panic!("comet failed: {e}");
        }
    });
    CometNode {
        server_id,
        http,
        tcp,
        rpc,
        shutdown,
        handle: Some(handle),
    }
}
