//! Logic's configuration: listen addresses, Redis, push limits and secrets, session and node
//! lifetimes, partition count. Every field has a default (dev defaults are marked in
//! `config/logic.toml`); [`Validate`] names the first bad field.

use std::time::Duration;

use rim_runtime::settings::{SettingsError, Validate, positive, socket_addr};
use serde::Deserialize;

/// Dotted fields that take comma-separated lists from the environment (none today).
pub const LIST_KEYS: &[&str] = &[];

/// The whole logic config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listen addresses.
    pub listen: Listen,
    /// Redis connection.
    pub redis: RedisConfig,
    /// Push API limits and secret.
    pub push: PushConfig,
    /// Session lifetimes told to clients.
    pub session: SessionConfig,
    /// Comet registration lifetime and client placement hints.
    pub node: NodeConfig,
    /// Client authentication.
    pub auth: AuthConfig,
    /// Push streams.
    pub stream: StreamConfig,
    /// How long in-flight work may take to finish at shutdown (ms).
    pub shutdown_grace_ms: u64,
    /// Log filter used when `RUST_LOG` is unset.
    pub log_level: String,
    /// Log as JSON lines.
    pub log_json: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Listen::default(),
            redis: RedisConfig::default(),
            push: PushConfig::default(),
            session: SessionConfig::default(),
            node: NodeConfig::default(),
            auth: AuthConfig::default(),
            stream: StreamConfig::default(),
            shutdown_grace_ms: 10_000,
            log_level: "info".into(),
            log_json: false,
        }
    }
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// HTTP API (push, online, nodes, ops routes).
    pub http: String,
    /// `LogicRpc` (comets and backends).
    pub rpc: String,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: "0.0.0.0:3111".into(),
            rpc: "127.0.0.1:3119".into(),
        }
    }
}

/// Redis connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `redis+unix:///path`.
    pub url: String,
    /// Upper bound on any one Redis round trip (ms); past it the call fails instead of hanging.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
            timeout_ms: 2_000,
        }
    }
}

/// Push API limits and secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Largest push body in bytes.
    pub body_limit: usize,
    /// Most mids or keys in one push.
    pub max_targets: usize,
    /// Bearer secret required on push routes; empty = push routes open (dev only).
    pub secret: String,
    /// Whether online and node routes stay open without the secret.
    pub open_online: bool,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            body_limit: 65_536,
            max_targets: 1_000,
            secret: String::new(),
            open_online: true,
        }
    }
}

/// Session lifetimes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Heartbeat interval told to clients (seconds).
    pub heartbeat_secs: u32,
    /// Heartbeats a session may miss before it is dropped.
    pub heartbeat_misses: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            heartbeat_secs: 60,
            heartbeat_misses: 5,
        }
    }
}

impl SessionConfig {
    /// TTL of session keys in Redis: the allowed silence plus one interval of margin, so a
    /// session the comet still holds never lapses in Redis first.
    pub fn ttl_secs(&self) -> u64 {
        u64::from(self.heartbeat_secs) * (u64::from(self.heartbeat_misses) + 1)
    }
}

/// Comet registration lifetime and client placement hints.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// How long a comet registration lives without renewal (ms); comets renew more often.
    pub ttl_ms: u64,
    /// Reconnect backoff told to clients by `/goim/nodes/weighted`.
    pub backoff: Backoff,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            ttl_ms: 15_000,
            backoff: Backoff::default(),
        }
    }
}

/// Client reconnect backoff (goim's shape and defaults).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// Longest delay (seconds).
    pub max_delay: u32,
    /// First delay (seconds).
    pub base_delay: u32,
    /// Growth factor.
    pub factor: f64,
    /// Random jitter factor.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            max_delay: 300,
            base_delay: 3,
            factor: 1.8,
            jitter: 1.3,
        }
    }
}

/// Client authentication.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HMAC secret of client tokens; empty = trust mode (dev only: the client's mid is believed).
    pub secret: String,
}

/// Push streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Number of push partitions; must match every other logic and job.
    pub partitions: u16,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            partitions: rim_proto::job::DEFAULT_PARTITIONS,
        }
    }
}

impl Config {
    /// Shutdown grace as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// Redis round-trip bound as a duration.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis.timeout_ms)
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), SettingsError> {
        socket_addr("listen.http", &self.listen.http)?;
        socket_addr("listen.rpc", &self.listen.rpc)?;
        if redis::Client::open(self.redis.url.as_str()).is_err() {
            return Err(SettingsError::invalid(
                "redis.url",
                format!(
                    "{:?} is not a redis:// or redis+unix:// URL",
                    self.redis.url
                ),
            ));
        }
        positive("redis.timeout_ms", self.redis.timeout_ms)?;
        positive("push.body_limit", self.push.body_limit as u64)?;
        positive("push.max_targets", self.push.max_targets as u64)?;
        positive("session.heartbeat_secs", self.session.heartbeat_secs as u64)?;
        positive(
            "session.heartbeat_misses",
            self.session.heartbeat_misses as u64,
        )?;
        if self.node.ttl_ms < 100 {
            return Err(SettingsError::invalid("node.ttl_ms", "must be >= 100"));
        }
        let b = &self.node.backoff;
        if !(b.factor.is_finite() && b.factor >= 1.0) {
            return Err(SettingsError::invalid(
                "node.backoff.factor",
                "must be >= 1",
            ));
        }
        if !(b.jitter.is_finite() && b.jitter >= 0.0) {
            return Err(SettingsError::invalid(
                "node.backoff.jitter",
                "must be >= 0",
            ));
        }
        positive("stream.partitions", self.stream.partitions as u64)?;
        if self.log_level.trim().is_empty() {
            return Err(SettingsError::invalid("log_level", "must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_errors_name_fields() {
        Config::default().validate().expect("defaults are valid");
        let mut c = Config::default();
        c.stream.partitions = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("stream.partitions")
        );
        let mut c = Config::default();
        c.listen.http = "nope".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("listen.http")
        );
        let mut c = Config::default();
        c.redis.url = "http://x".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("redis.url")
        );
    }
}
