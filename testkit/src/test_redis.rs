//! The Redis a test's rim cluster runs on: one redis-server, or, when `RIM_TEST_REDIS=cluster`,
//! a Redis Cluster of three masters with a replica each. The spine, chat and delivery suites
//! take theirs from [`TestRedis::from_env`], so `scripts/test.sh` runs them once on each without
//! a second copy of any scenario.

use redis::cluster::ClusterConnection;
use redis::{Cmd, RedisResult, Value};

use crate::redis::RedisServer;
use crate::redis_cluster::{RedisCluster, SENTINEL_MASTER, SentinelSet};

/// Environment variable choosing the Redis topology of the tier suites (`cluster` or unset).
pub const TOPOLOGY_ENV: &str = "RIM_TEST_REDIS";

/// One redis-server or a Redis Cluster.
pub enum TestRedis {
    /// One server (`redis.url`).
    Single(RedisServer),
    /// Three masters with one replica each (`redis.nodes`).
    Cluster(RedisCluster),
    /// A primary and a replica behind three sentinels (`redis.sentinels`).
    Sentinel(SentinelSet),
}

impl TestRedis {
    /// The topology `RIM_TEST_REDIS` asks for; `appendonly` for a single server.
    pub fn from_env(appendonly: bool) -> TestRedis {
        match std::env::var(TOPOLOGY_ENV).as_deref() {
            Ok("cluster") => TestRedis::Cluster(RedisCluster::start(3, 1)),
            Ok("sentinel") => TestRedis::Sentinel(SentinelSet::start()),
            Ok("") | Err(_) => TestRedis::Single(RedisServer::start_with(appendonly)),
            Ok(other) => {
                panic!("{TOPOLOGY_ENV}={other:?}: expected \"cluster\", \"sentinel\" or nothing")
            }
        }
    }

    /// Points a tier's `[redis]` here.
    pub fn configure(&self, cfg: &mut rim_runtime::redis::RedisConfig) {
        match self {
            TestRedis::Single(r) => cfg.url = r.url(),
            TestRedis::Cluster(c) => cfg.nodes = c.seed_urls(),
            TestRedis::Sentinel(s) => {
                cfg.sentinels = s.sentinel_urls();
                cfg.sentinel_master = SENTINEL_MASTER.into();
            }
        }
    }

    /// The environment that points a tier process here (`tier` = `LOGIC` or `JOB`).
    pub fn env(&self, tier: &str) -> Vec<(String, String)> {
        let var = |field: &str| format!("RIM_{tier}__REDIS__{field}");
        match self {
            TestRedis::Single(r) => vec![(var("URL"), r.url())],
            TestRedis::Cluster(c) => vec![(var("NODES"), c.seed_urls().join(","))],
            TestRedis::Sentinel(s) => vec![
                (var("SENTINELS"), s.sentinel_urls().join(",")),
                (var("SENTINEL_MASTER"), SENTINEL_MASTER.into()),
            ],
        }
    }

    /// A synchronous connection for assertions (on a cluster, commands follow their keys).
    pub fn connection(&self) -> TestConn {
        match self {
            TestRedis::Single(r) => TestConn::Single(r.connection()),
            TestRedis::Cluster(c) => TestConn::Cluster(Box::new(c.connection())),
            TestRedis::Sentinel(s) => TestConn::Single(s.primary_connection()),
        }
    }

    /// The single server, for tests of what happens to it (a restart).
    pub fn single(&mut self) -> &mut RedisServer {
        match self {
            TestRedis::Single(r) => r,
            _ => panic!("this test needs a single redis-server"),
        }
    }
}

/// A connection from [`TestRedis::connection`].
pub enum TestConn {
    /// To the one server.
    Single(redis::Connection),
    /// To the cluster.
    Cluster(Box<ClusterConnection>),
}

impl redis::ConnectionLike for TestConn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            TestConn::Single(c) => c.req_packed_command(cmd),
            TestConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            TestConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            TestConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        // The cluster routes by the command's keys, so it must see the command, not its bytes.
        match self {
            TestConn::Single(c) => c.req_command(cmd),
            TestConn::Cluster(c) => c.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            TestConn::Single(c) => c.get_db(),
            TestConn::Cluster(c) => c.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            TestConn::Single(c) => c.check_connection(),
            TestConn::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            TestConn::Single(c) => c.is_open(),
            TestConn::Cluster(c) => c.is_open(),
        }
    }
}
