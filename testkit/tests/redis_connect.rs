//! How rim's Redis connections meet each topology's particulars, against real servers: a
//! password given in `[redis] password` (the one way to authenticate to the primary sentinels
//! name), and the errors a failover leaves behind inside transactions, which must be retried.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rim_runtime::redis::{Bounds, Conn, RedisConfig, retry_reason};
use rim_testkit::redis::RedisServer;
use rim_testkit::redis_cluster::{RedisCluster, SENTINEL_MASTER, SentinelSet};

const PASSWORD: &str = "test-only-secret";

const BOUNDS: Bounds = Bounds {
    connect: Duration::from_secs(2),
    response: Duration::from_secs(2),
};

/// Connects the way logic and job do and runs a write and a read; the error if any step fails.
async fn write_and_read(cfg: &RedisConfig) -> Result<(), redis::RedisError> {
    let mut conn: Conn = cfg.topology().unwrap().connect(BOUNDS).await?;
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await?;
    let v: String = redis::cmd("GET").arg("k").query_async(&mut conn).await?;
    assert_eq!(v, "v");
    Ok(())
}

fn requirepass(c: &mut redis::Connection) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query(c)
        .unwrap();
}

#[tokio::test]
async fn a_password_in_config_authenticates_to_a_single_server() {
    let server = RedisServer::start();
    requirepass(&mut server.connection());
    let mut cfg = RedisConfig {
        url: server.url(),
        ..RedisConfig::default()
    };
    let e = write_and_read(&cfg).await.expect_err("no password");
    assert!(
        e.to_string().contains("NOAUTH") || e.to_string().contains("Authentication"),
        "{e}"
    );
    cfg.password = PASSWORD.into();
    write_and_read(&cfg).await.unwrap();
}

#[tokio::test]
async fn a_password_in_config_authenticates_to_the_primary_the_sentinels_name() {
    let set = tokio::task::spawn_blocking(|| {
        let set = SentinelSet::start();
        // Protect both servers (the replica must authenticate to the primary) and tell the
        // sentinels, as an operator turning on `requirepass` does.
        for port in [set.replica(), set.primary()] {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection())
                .unwrap();
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("masterauth")
                .arg(PASSWORD)
                .query(&mut c)
                .unwrap();
            requirepass(&mut c);
        }
        for url in set.sentinel_urls() {
            let mut c = redis::Client::open(url)
                .and_then(|c| c.get_connection())
                .unwrap();
            let _: () = redis::cmd("SENTINEL")
                .arg("SET")
                .arg(SENTINEL_MASTER)
                .arg("auth-pass")
                .arg(PASSWORD)
                .query(&mut c)
                .unwrap();
        }
        set
    })
    .await
    .unwrap();
    let mut cfg = RedisConfig {
        sentinels: set.sentinel_urls(),
        sentinel_master: SENTINEL_MASTER.into(),
        ..RedisConfig::default()
    };
    cfg.validate().unwrap();
    write_and_read(&cfg).await.expect_err("no password");
    cfg.password = PASSWORD.into();
    write_and_read(&cfg).await.unwrap();
}

/// `MULTI <cmd> EXEC` sent on a plain connection to the Redis on `port`; the error it ends in.
fn transaction_on(port: u16, cmd: redis::Cmd) -> redis::RedisError {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .and_then(|c| c.get_connection())
        .unwrap();
    let mut pipe = redis::pipe();
    pipe.atomic().add_command(cmd).ignore();
    pipe.query::<()>(&mut c)
        .expect_err("the transaction is refused")
}

fn set(key: &str) -> redis::Cmd {
    redis::cmd("SET").arg(key).arg("v").to_owned()
}

/// A transaction logic sends right after a failover may reach a demoted primary (a restarted
/// one now replicating) or a node that no longer owns the slot: Redis aborts it (`EXECABORT`)
/// with `READONLY` or `MOVED` inside, which redis-rs does not follow. Both are failovers to retry
/// (and, behind sentinels, a cue to ask them for the primary again), not errors to return.
#[test]
fn transactions_aborted_by_a_failover_are_retryable() {
    let sentinels = SentinelSet::start();
    let e = transaction_on(sentinels.replica(), set("k"));
    assert_eq!(retry_reason(&e), Some("readonly"), "{e}");

    let cluster = RedisCluster::start(3, 0);
    let key = "rim:push:{0}";
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut cluster.connection())
        .unwrap();
    let owner = cluster.master_of(slot);
    let other = cluster
        .seed_urls()
        .iter()
        .filter_map(|u| u.rsplit(':').next()?.parse::<u16>().ok())
        .find(|p| *p != owner)
        .unwrap();
    let e = transaction_on(other, set(key));
    assert_eq!(retry_reason(&e), Some("moved"), "{e}");

    // Aborted for a reason no retry fixes (a malformed command): an error to return at once.
    let e = transaction_on(owner, redis::cmd("SET").arg(key).to_owned());
    assert_eq!(retry_reason(&e), None, "{e}");
}
