//! Process plumbing shared by rim's three binaries, so each tier's `main.rs` stays thin and every
//! tier behaves the same to an operator: what `main` does ([`cli`]), config loading and
//! validation ([`settings`]), logging ([`logging`]), shutdown ([`shutdown`]), HTTP serving
//! ([`http`], [`listener`]), the ops HTTP routes and Prometheus text ([`ops`], [`metrics`],
//! [`process`]), tarpc serving and reconnecting client links ([`rpc`]) behind the cluster
//! secret handshake and RPC bounds ([`cluster`], [`handshake`]), optionally inside TLS
//! ([`rpc_tls`]), the Redis connection on one server, a cluster or sentinels ([`redis_conn`])
//! and shared `[redis]` / partition settings ([`redis`]), TLS with certificate reload on SIGHUP
//! ([`tls`]), and retry delays ([`backoff`]).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod cluster;
pub mod handshake;
pub mod hmac;
pub mod http;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod process;
pub mod proxy_protocol;
pub mod rate;
pub mod redis;
pub mod redis_conn;
pub mod rpc;
pub mod rpc_tls;
pub mod settings;
pub mod shutdown;
pub mod tls;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
