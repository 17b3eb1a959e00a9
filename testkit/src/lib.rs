//! Test kit shared by every integration test and the load tool: a throwaway `redis-server`
//! ([`redis`]), and protocol clients speaking goim frames over TCP and WebSocket and rim's JSON
//! mode ([`client`]). It depends on no tier, so tiers can use it in their own tests.
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod process;
pub mod redis;

/// Default time a test waits for an event before failing.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(10);
