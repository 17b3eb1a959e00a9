//! Real multi-node Redis setups on loopback, per test, killed on drop: a Redis Cluster (masters
//! with replicas, made by `redis-cli --cluster create`, as operators make one) and a
//! Sentinel-managed primary with a replica and three sentinels. Timeouts are short (1 s node
//! timeout, 1 s down-after) so failover tests finish in seconds.
//!
//! Nodes listen on TCP (cluster and sentinel need it), on ports from [`free_addr`] whose cluster
//! bus port (+10000) is free too. Setup waits on the state it needs (cluster state `ok` on every
//! node, sentinels agreeing on the primary), never on a fixed delay.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::free_addr;

/// How long setup and failover waits may take before the test fails.
const SETUP: Duration = Duration::from_secs(30);

/// One `redis-server` (or sentinel) process, restartable with the arguments it was started with.
struct Node {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
    args: Vec<String>,
}

impl Node {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again (same port, data and arguments) if it is not running.
    fn restart(&mut self) {
        if self.child.is_none() {
            self.child = Some(spawn(&self.dir, &self.args));
        }
    }
}

/// A port whose cluster bus port (+10000) is free as well.
fn cluster_port() -> u16 {
    loop {
        let port = free_addr().port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Starts a `redis-server` on `port` on loopback, its data in `<dir>/<port>`, AOF on with fsync
/// on every write, plus `extra` arguments.
fn start_node(dir: &std::path::Path, port: u16, extra: &[&str]) -> Node {
    let data = dir.join(port.to_string());
    std::fs::create_dir_all(&data).expect("node dir");
    let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
        .iter()
        .chain(
            [
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                // A replica syncs at once (the default waits 5 s for more replicas to join).
                "--repl-diskless-sync-delay",
                "0",
            ]
            .iter(),
        )
        .map(|s| s.to_string())
        .collect();
    args.extend(["--dir".to_string(), data.to_string_lossy().into_owned()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Node {
        port,
        child: Some(spawn(&data, &args)),
        dir: data,
        args,
    }
}

fn spawn(dir: &std::path::Path, args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (.ci/run installs it)")
}

/// Starts a node with `make(port)` on a port from `pick` and waits until it answers `PING`.
/// A port probed free can be taken before the node binds it (ports are probed by closing a
/// listener; parallel tests and outgoing connections reuse them), and a node that cannot bind
/// exits at once: then it is started again on another port, rather than waited on for nothing.
fn start_answering(mut pick: impl FnMut() -> u16, mut make: impl FnMut(u16) -> Node) -> Node {
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        let mut node = make(pick());
        let up = wait_for(&format!("node {} to answer", node.port), || {
            let exited = node
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                return Some(false);
            }
            let mut c = connection(node.port)?;
            ::redis::cmd("PING")
                .query::<String>(&mut c)
                .ok()
                .map(|_| true)
        });
        if up {
            return node;
        }
        node.kill();
    }
    panic!("no node started in {ATTEMPTS} attempts (ports taken?)");
}

/// Waits until the Redis on `port` is a replica whose link to its master is up (synced).
fn wait_in_sync(port: u16) {
    wait_for(&format!("{port} to replicate its master"), || {
        let mut c = connection(port)?;
        let info: String = ::redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
        (info.contains("role:slave") && info.contains("master_link_status:up")).then_some(())
    });
}

fn connection(port: u16) -> Option<::redis::Connection> {
    let c = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    c.get_connection_with_timeout(Duration::from_millis(500))
        .ok()
}

/// Polls `f` every 50 ms until it returns `Some`, panicking with `what` after [`SETUP`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + SETUP;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running Redis Cluster.
pub struct RedisCluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each (`--cluster-replicas`), with AOF
    /// on and fsync on every write, and waits until every node reports `cluster_state:ok`.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("rim-redis-cluster-")
            .tempdir()
            .expect("tempdir");
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            nodes.push(start_answering(cluster_port, |port| {
                start_node(
                    dir.path(),
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        // Any replica may take over, however long it was cut off: tests kill
                        // masters.
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            }));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { _dir: dir, nodes };
        cluster.wait_ok();
        // A replica that has not finished its first sync holds nothing a failover could keep.
        for n in &cluster.nodes {
            let is_replica = connection(n.port)
                .and_then(|mut c| {
                    ::redis::cmd("INFO")
                        .arg("replication")
                        .query::<String>(&mut c)
                        .ok()
                })
                .is_some_and(|info| info.contains("role:slave"));
            if is_replica {
                wait_in_sync(n.port);
            }
        }
        cluster
    }

    /// Waits until every live node reports `cluster_state:ok` (every slot is served).
    pub fn wait_ok(&self) {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            wait_for(&format!("cluster_state:ok on {}", n.port), || {
                let mut c = connection(n.port)?;
                let info: String = ::redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok()?;
                info.contains("cluster_state:ok").then_some(())
            });
        }
    }

    /// `redis://` seed URLs of every node (what `[redis] nodes` takes).
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Port of the master serving `slot`, as a live node sees it.
    pub fn master_of(&self, slot: u16) -> u16 {
        wait_for(&format!("the master of slot {slot}"), || {
            self.nodes
                .iter()
                .filter(|n| n.child.is_some())
                .find_map(|n| slot_owner(n.port, slot))
        })
    }

    /// Kills (SIGKILL) the node on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.kill();
        }
    }

    /// Starts the killed node on `port` again and waits until it has rejoined as a replica with
    /// its master's data (`master_link_status:up`) and the cluster is `ok`.
    pub fn restart(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.restart();
        }
        wait_in_sync(port);
        self.wait_ok();
    }

    /// Waits until a node other than `old` serves `slot` (its replica took over) and the
    /// cluster is `ok` again; returns the new master's port.
    pub fn wait_failover(&self, slot: u16, old: u16) -> u16 {
        let new = wait_for(&format!("a new master for slot {slot}"), || {
            self.nodes
                .iter()
                .filter(|n| n.child.is_some())
                .find_map(|n| slot_owner(n.port, slot))
                .filter(|p| *p != old)
        });
        self.wait_ok();
        new
    }

    /// What every live node says about stream `key`: its role, the stream's length and last id,
    /// the consumer groups, and the clients blocked in `XREADGROUP` — printed when a failover
    /// test fails, to tell a stale route from lost data.
    pub fn describe_stream(&self, key: &str) -> String {
        let mut out = String::new();
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Some(mut c) = connection(n.port) else {
                out.push_str(&format!("{}: no connection\n", n.port));
                continue;
            };
            let role: String = ::redis::cmd("ROLE")
                .query::<Vec<::redis::Value>>(&mut c)
                .map(|v| format!("{:?}", v.first()))
                .unwrap_or_default();
            let stream = ::redis::cmd("XINFO")
                .arg("STREAM")
                .arg(key)
                .query::<::redis::Value>(&mut c);
            let groups = ::redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(key)
                .query::<::redis::Value>(&mut c);
            let clients: String = ::redis::cmd("CLIENT")
                .arg("LIST")
                .query::<String>(&mut c)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("xreadgroup"))
                .collect::<Vec<_>>()
                .join("; ");
            out.push_str(&format!(
                "{}: role {role}\n  stream {stream:?}\n  groups {groups:?}\n  blocked {clients}\n",
                n.port
            ));
        }
        out
    }

    /// A synchronous cluster connection, for test assertions on Redis state.
    pub fn connection(&self) -> ::redis::cluster::ClusterConnection {
        ::redis::cluster::ClusterClient::new(self.seed_urls())
            .and_then(|c| c.get_connection())
            .expect("connect to the test cluster")
    }
}

/// The port of the master serving `slot`, from `CLUSTER SLOTS` asked of the node on `port`.
fn slot_owner(port: u16, slot: u16) -> Option<u16> {
    let mut c = connection(port)?;
    let slots: Vec<::redis::Value> = ::redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).ok()?;
    for range in slots {
        let ::redis::Value::Array(items) = range else {
            continue;
        };
        let (Some(lo), Some(hi), Some(::redis::Value::Array(master))) =
            (items.first(), items.get(1), items.get(2))
        else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (
            ::redis::from_redis_value::<u16>(lo.clone()),
            ::redis::from_redis_value::<u16>(hi.clone()),
        ) else {
            continue;
        };
        if (lo..=hi).contains(&slot) {
            return master
                .get(1)
                .and_then(|p| ::redis::from_redis_value::<u16>(p.clone()).ok());
        }
    }
    None
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// The master name sentinels monitor in [`SentinelSet`].
pub const SENTINEL_MASTER: &str = "rim";

/// A primary, one replica and three sentinels (quorum 2) watching them.
pub struct SentinelSet {
    dir: tempfile::TempDir,
    redis: Vec<Node>,
    sentinels: Vec<Node>,
}

impl SentinelSet {
    /// Starts the primary, its replica and three sentinels; waits until the sentinels agree on
    /// the primary and see the replica.
    pub fn start() -> SentinelSet {
        let dir = tempfile::Builder::new()
            .prefix("rim-redis-sentinel-")
            .tempdir()
            .expect("tempdir");
        let free_port = || free_addr().port();
        let primary_node = start_answering(free_port, |port| start_node(dir.path(), port, &[]));
        let primary = primary_node.port;
        let primary_arg = primary.to_string();
        let replica_node = start_answering(free_port, |port| {
            start_node(
                dir.path(),
                port,
                &["--replicaof", "127.0.0.1", &primary_arg],
            )
        });
        let redis = vec![primary_node, replica_node];
        // The replica is a replica once its initial sync is done (before that, WAIT counts
        // nothing and sentinels have nothing to promote).
        wait_in_sync(redis[1].port);
        let mut set = SentinelSet {
            dir,
            redis,
            sentinels: Vec::new(),
        };
        for _ in 0..3 {
            let sentinel = start_answering(free_port, |port| set.sentinel(port, primary));
            set.sentinels.push(sentinel);
        }
        for s in &set.sentinels {
            wait_for(&format!("sentinel {} to see the replica", s.port), || {
                let mut c = connection(s.port)?;
                let replicas: Vec<::redis::Value> = ::redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(SENTINEL_MASTER)
                    .query(&mut c)
                    .ok()?;
                (!replicas.is_empty()).then_some(())
            });
        }
        set
    }

    /// Spawns a sentinel on `port` monitoring the primary on `primary`.
    fn sentinel(&self, port: u16, primary: u16) -> Node {
        let conf = self.dir.path().join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                 sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
            ),
        )
        .expect("sentinel config");
        let args = vec![conf.to_string_lossy().into_owned(), "--sentinel".into()];
        Node {
            port,
            child: Some(spawn(self.dir.path(), &args)),
            dir: self.dir.path().to_path_buf(),
            args,
        }
    }

    /// `redis://` URLs of the sentinels (what `[redis] sentinels` takes).
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The port of the primary, as the first sentinel that answers sees it.
    pub fn primary(&self) -> u16 {
        wait_for("a sentinel naming the primary", || {
            self.sentinels.iter().find_map(|s| {
                let mut c = connection(s.port)?;
                let (_, port): (String, u16) = ::redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(SENTINEL_MASTER)
                    .query(&mut c)
                    .ok()?;
                Some(port)
            })
        })
    }

    /// The port of a live Redis that is not the primary (the replica).
    pub fn replica(&self) -> u16 {
        let primary = self.primary();
        self.redis
            .iter()
            .find(|n| n.port != primary && n.child.is_some())
            .map(|n| n.port)
            .expect("a live replica")
    }

    /// A connection to the current primary.
    pub fn primary_connection(&self) -> ::redis::Connection {
        let port = self.primary();
        wait_for(
            &format!("the primary {port} to accept a connection"),
            || connection(port),
        )
    }

    /// Kills (SIGKILL) the Redis on `port` (primary or replica).
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.redis.iter_mut().find(|n| n.port == port) {
            n.kill();
        }
    }

    /// Starts the killed Redis on `port` again as a replica of the current primary (as an
    /// orchestrator restarts a failed primary; the sentinels would convert it themselves, but
    /// only after watching it act as a master for several seconds) and waits until it holds the
    /// primary's data (`master_link_status:up`).
    pub fn restart(&mut self, port: u16) {
        let primary = self.primary();
        if let Some(n) = self.redis.iter_mut().find(|n| n.port == port) {
            if let Some(at) = n.args.iter().position(|a| a == "--replicaof") {
                n.args.drain(at..at + 3);
            }
            if primary != port {
                n.args.extend([
                    "--replicaof".to_string(),
                    "127.0.0.1".to_string(),
                    primary.to_string(),
                ]);
            }
            n.restart();
        }
        wait_in_sync(port);
    }

    /// Waits until the sentinels name a primary other than `old` and it answers as a master.
    pub fn wait_failover(&self, old: u16) -> u16 {
        let new = wait_for("the sentinels to promote the replica", || {
            let p = self.primary();
            (p != old).then_some(p)
        });
        wait_for("the promoted replica to act as master", || {
            let mut c = connection(new)?;
            let info: String = ::redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
            info.contains("role:master").then_some(())
        });
        new
    }

    /// Data directory (logs of a failing test).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for n in self.sentinels.iter_mut().chain(self.redis.iter_mut()) {
            n.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_whose_port_was_taken_starts_again_on_another() {
        let dir = tempfile::tempdir().expect("tempdir");
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let taken_port = taken.local_addr().expect("addr").port();
        let mut ports = vec![free_addr().port(), taken_port];
        let mut node = start_answering(
            || ports.pop().expect("a port"),
            |port| start_node(dir.path(), port, &[]),
        );
        assert_ne!(node.port, taken_port);
        assert!(connection(node.port).is_some());
        node.kill();
    }
}
