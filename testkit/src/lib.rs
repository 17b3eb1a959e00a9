//! Test kit shared by the integration tests: a throwaway `redis-server` ([`redis`]), Redis Cluster
//! and Sentinel setups ([`redis_cluster`]) and the choice between them ([`test_redis`]), the HTTP API
//! client ([`api`]), process helpers ([`process`]), log counting ([`logs`]), the protocol client ([`client`]: rim-client's
//! `Conn`, plus malformed frames for bad-input tests), and the real-browser tests' prerequisites
//! ([`browser`]). It depends on no tier, so tiers can use it in their own tests.
#![forbid(unsafe_code)]

pub mod api;
pub mod browser;
pub mod client;
pub mod logs;
pub mod nginx;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod redis_cluster;
pub mod test_redis;

/// Default time a test waits for an event before failing.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(10);
