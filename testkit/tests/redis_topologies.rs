//! The multi-node Redis setups the cluster and sentinel tests run on are what they claim: a
//! Redis Cluster of three masters with a replica each, whose replica takes over a killed master
//! with the data it had replicated, and a Sentinel-managed primary whose replica is promoted when
//! it dies. (The tiers' behaviour on them is tested elsewhere; this pins the harness.)
#![allow(clippy::unwrap_used)]

use redis::Commands;
use rim_testkit::redis_cluster::{RedisCluster, SentinelSet};

#[test]
fn a_cluster_replica_takes_over_a_killed_master_with_its_data() {
    let mut cluster = RedisCluster::start(3, 1);
    let mut conn = cluster.connection();
    let masters: std::collections::BTreeSet<u16> = [0u16, 6000, 12000]
        .iter()
        .map(|s| cluster.master_of(*s))
        .collect();
    assert_eq!(
        masters.len(),
        3,
        "three masters share the slots: {masters:?}"
    );

    // "{rim}" hashes to one slot. The write and its WAIT go over one connection to that slot's
    // master: WAIT counts the replicas that hold the writes of the connection it is sent on, so
    // on any other connection it would answer at once, whether the replica has the key or not.
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("{rim}:k")
        .query(&mut conn)
        .unwrap();
    let old = cluster.master_of(slot);
    let mut master = redis::Client::open(format!("redis://127.0.0.1:{old}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("{rim}:k")
        .arg("v")
        .query(&mut master)
        .unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut master)
        .unwrap();
    assert_eq!(acked, 1);
    cluster.kill(old);
    let new = cluster.wait_failover(slot, old);
    assert_ne!(new, old);
    let mut conn = cluster.connection();
    let v: String = conn.get("{rim}:k").unwrap();
    assert_eq!(v, "v");
}

#[test]
fn sentinels_promote_the_replica_when_the_primary_dies() {
    let mut set = SentinelSet::start();
    let old = set.primary();
    let mut primary = redis::Client::open(format!("redis://127.0.0.1:{old}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = primary.set("k", "v").unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut primary)
        .unwrap();
    assert_eq!(acked, 1);
    set.kill(old);
    let new = set.wait_failover(old);
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{new}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let v: String = c.get("k").unwrap();
    assert_eq!(v, "v");
}
