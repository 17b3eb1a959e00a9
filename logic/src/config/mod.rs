//! Logic's configuration: listen addresses, Redis, push limits and secrets, session and node
//! lifetimes, partition count, chat policy, bot webhook and demo. Every field has a default (dev
//! defaults are marked in `config/logic.toml`); [`Validate`] names the first bad field.

use std::collections::HashMap;
use std::time::Duration;

pub use crate::auth::{AuthConfig, AuthMode};
pub use crate::history::{HistoryConfig, Retention};
pub use crate::room_policy::{Access, RoomHookConfig, RoomTypePolicy};
use rim_proto::room::RoomId;
pub use rim_runtime::cluster::ClusterConfig;
pub use rim_runtime::redis::RedisConfig;
use rim_runtime::settings::{SettingsError, Validate, positive, socket_addr};
pub use rim_runtime::tls::TlsConfig;
use serde::Deserialize;

mod admin;
mod dev;

pub use admin::AdminConfig;

/// Dotted fields that take comma-separated lists from the environment.
pub const LIST_KEYS: &[&str] = &[
    "chat.presence_room_types",
    "webhook.room_types",
    "webhook.mids",
    "redis.nodes",
    "redis.sentinels",
];

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
    /// Upstream messages (SendMsg): send policy, size limit, presence events.
    pub chat: ChatConfig,
    /// Bot webhook that upstream messages are forwarded to.
    pub webhook: WebhookConfig,
    /// Room permissions per room type (`[rooms.<type>]`: who may join, who may post).
    pub rooms: HashMap<String, RoomTypePolicy>,
    /// The backend asked about rooms whose policy is `backend`.
    pub room_hook: RoomHookConfig,
    /// Room and user histories: what is kept, for how long, offline delivery.
    pub history: HistoryConfig,
    /// Demo page and dev sign-in.
    pub demo: DemoConfig,
    /// The operator page's access.
    pub admin: AdminConfig,
    /// Shared secret and bounds of internal RPC (`LogicRpc`).
    pub cluster: ClusterConfig,
    /// Certificate for HTTPS on `listen.http` (off when unset), reloaded on SIGHUP.
    pub tls: TlsConfig,
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
            chat: ChatConfig::default(),
            webhook: WebhookConfig::default(),
            rooms: HashMap::new(),
            room_hook: RoomHookConfig::default(),
            history: HistoryConfig::default(),
            demo: DemoConfig::default(),
            admin: AdminConfig::default(),
            cluster: ClusterConfig::default(),
            tls: TlsConfig::default(),
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
    /// Most HTTP connections open at once; beyond it new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// An HTTP connection that sends nothing for this long (no first request, or idle between
    /// keep-alive requests) is closed, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Longest a request's headers may take to arrive (ms); a slower (slow-loris) socket is
    /// closed.
    pub header_timeout_ms: u64,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: "127.0.0.1:3111".into(),
            rpc: "127.0.0.1:3119".into(),
            max_connections: 10_000,
            idle_timeout_ms: 60_000,
            header_timeout_ms: 10_000,
        }
    }
}

/// Push API limits and secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Largest push body in bytes.
    pub body_limit: usize,
    /// Longest a push body may take to arrive (ms); past it the request gets a 408, so a client
    /// trickling bytes cannot hold a connection (or shutdown) indefinitely.
    pub body_timeout_ms: u64,
    /// Most mids or keys in one push.
    pub max_targets: usize,
    /// Bearer secret required on push routes; empty = push routes open (dev only).
    pub secret: String,
    /// Whether online, node and room member routes stay open without the secret (the user
    /// sessions route never does: it lists session keys).
    pub open_online: bool,
    /// Push requests per second accepted for the push secret (rim has one secret, so one
    /// bucket per logic); past it 429. 0 = no limit.
    pub rate_per_sec: u32,
    /// Push requests that may arrive at once above `rate_per_sec` (0 = `rate_per_sec`).
    pub rate_burst: u32,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            body_limit: 65_536,
            body_timeout_ms: 10_000,
            max_targets: 1_000,
            secret: String::new(),
            open_online: false,
            rate_per_sec: 0,
            rate_burst: 0,
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
    /// Most sessions one mid may have at once, cluster-wide; past it a new session's Auth is
    /// refused (`too many sessions for this user`). Re-authenticating a key the mid already
    /// holds does not count twice. 0 = no limit.
    pub max_per_mid: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            heartbeat_secs: 60,
            heartbeat_misses: 5,
            max_per_mid: 100,
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

/// Push streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Number of push partitions; must match every other logic and job.
    pub partitions: u16,
    /// Most entries one push stream may hold (job trims what it delivered, so this bounds its
    /// backlog); a push to a full stream is refused with 503 rather than filling Redis.
    pub max_backlog: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            partitions: rim_proto::job::DEFAULT_PARTITIONS,
            max_backlog: 100_000,
        }
    }
}

/// Upstream message (SendMsg) policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Members may post to the room they are in (and only to that one).
    pub room_post: bool,
    /// Any user may message any mid directly.
    pub direct: bool,
    /// Room messages are also delivered back to the sending session.
    pub echo_to_sender: bool,
    /// Largest `data` payload (JSON text) in bytes.
    pub max_data_bytes: usize,
    /// Room types whose rooms get join/leave events (op 24). Empty = off: big rooms would drown.
    pub presence_room_types: Vec<String>,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            room_post: true,
            direct: true,
            echo_to_sender: false,
            max_data_bytes: 4096,
            presence_room_types: Vec::new(),
        }
    }
}

/// The bot webhook: matching upstream messages are POSTed to `url` after they were queued.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` URL to POST to; empty = off. (No TLS client is built in: put a local
    /// TLS-terminating proxy in front of an https endpoint.)
    pub url: String,
    /// Messages to rooms of these types are forwarded.
    pub room_types: Vec<String>,
    /// Messages to these mids are forwarded.
    pub mids: Vec<i64>,
    /// Bound on one POST (ms).
    pub timeout_ms: u64,
    /// Extra attempts after a timeout, connection error or 5xx (exponential backoff).
    pub retries: u32,
    /// Forwards waiting for a worker; when full, new ones are dropped (counted).
    pub queue: usize,
    /// Concurrent POSTs.
    pub concurrency: usize,
    /// Mid the bot's replies are sent as.
    pub bot_mid: i64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            room_types: Vec::new(),
            mids: Vec::new(),
            timeout_ms: 2_000,
            retries: 2,
            queue: 1_000,
            concurrency: 4,
            bot_mid: 0,
        }
    }
}

impl WebhookConfig {
    /// Whether the webhook is configured at all.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

/// Demo page (`/`, `/assets/*`) and dev sign-in (`/rim/dev/login`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Serve them. Off unless set: anyone who reaches `listen.http` could mint a user and, with
    /// `auth.secret`, a valid token (dev only, logged at start).
    pub enabled: bool,
}

impl Config {
    /// Shutdown grace as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

impl rim_runtime::cli::LogSettings for Config {
    fn log_level(&self) -> &str {
        &self.log_level
    }
    fn log_json(&self) -> bool {
        self.log_json
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), SettingsError> {
        let http = socket_addr("listen.http", &self.listen.http)?;
        socket_addr("listen.rpc", &self.listen.rpc)?;
        if self.auth.mode == AuthMode::Token && self.auth.secret.is_empty() && !self.auth.jwt() {
            return Err(SettingsError::invalid(
                "auth.secret",
                "must be set when auth.mode is \"token\" (the default), unless a JWT key is \
                 (auth.jwt_secret, auth.jwt_public_key_file or auth.jwks_file); auth.mode = \
                 \"trust\" believes the mid a client claims instead (goim compatibility, dev only)",
            ));
        }
        crate::jwt::Verifier::load(&self.auth)?;
        crate::room_policy::validate(&self.rooms, &self.room_hook)?;
        self.history.validate()?;
        self.admin.validate()?;
        if self.push.secret.is_empty() && !http.ip().is_loopback() {
            return Err(SettingsError::invalid(
                "push.secret",
                format!(
                    "must be set when listen.http ({}) is not a loopback address: without it \
                     anyone who reaches it can push and list sessions",
                    self.listen.http
                ),
            ));
        }
        positive("listen.max_connections", self.listen.max_connections as u64)?;
        positive("listen.idle_timeout_ms", self.listen.idle_timeout_ms)?;
        positive("listen.header_timeout_ms", self.listen.header_timeout_ms)?;
        self.redis.validate()?;
        self.tls.validate()?;
        self.cluster
            .validate(&[("listen.rpc", self.listen.rpc.as_str())])?;
        positive("push.body_limit", self.push.body_limit as u64)?;
        positive("push.body_timeout_ms", self.push.body_timeout_ms)?;
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
        rim_runtime::redis::validate_partitions(self.stream.partitions)?;
        positive("stream.max_backlog", self.stream.max_backlog)?;
        positive("chat.max_data_bytes", self.chat.max_data_bytes as u64)?;
        for ty in &self.chat.presence_room_types {
            RoomId::check_type(ty)
                .map_err(|e| SettingsError::invalid("chat.presence_room_types", e.to_string()))?;
        }
        let w = &self.webhook;
        if w.enabled() {
            match reqwest::Url::parse(&w.url) {
                Ok(u) if u.scheme() == "http" && u.host_str().is_some() => {}
                Ok(u) if u.scheme() == "https" => {
                    return Err(SettingsError::invalid(
                        "webhook.url",
                        "https is not supported yet: point it at a local TLS-terminating proxy (http://)",
                    ));
                }
                _ => {
                    return Err(SettingsError::invalid(
                        "webhook.url",
                        format!("{:?} is not an http:// URL", w.url),
                    ));
                }
            }
        }
        for ty in &w.room_types {
            RoomId::check_type(ty)
                .map_err(|e| SettingsError::invalid("webhook.room_types", e.to_string()))?;
        }
        positive("webhook.timeout_ms", w.timeout_ms)?;
        positive("webhook.queue", w.queue as u64)?;
        positive("webhook.concurrency", w.concurrency as u64)?;
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

    /// The defaults plus the one thing they lack: a token secret.
    fn valid() -> Config {
        let mut c = Config::default();
        c.auth.secret = "s3cret".into();
        c
    }

    fn field_at_fault(c: &Config) -> String {
        let e = c.validate().unwrap_err().to_string();
        e.split(':').next().unwrap().to_string()
    }

    #[test]
    fn defaults_are_production_safe() {
        let d = Config::default();
        assert_eq!(d.auth.mode, AuthMode::Token);
        assert!(!d.demo.enabled, "no [demo] section means no demo");
        assert!(!d.push.open_online);
        assert_eq!(
            field_at_fault(&d),
            "auth.secret",
            "token mode needs its secret"
        );
        valid()
            .validate()
            .expect("defaults with a token secret are valid");

        let mut trust = Config::default();
        trust.auth.mode = AuthMode::Trust;
        trust
            .validate()
            .expect("trust mode when asked for, on loopback");

        let mut exposed = valid();
        exposed.listen.http = "0.0.0.0:3111".into();
        assert_eq!(field_at_fault(&exposed), "push.secret");
        exposed.push.secret = "p".into();
        exposed.validate().expect("exposed with a push secret");
    }

    #[test]
    fn each_dev_convenience_is_named() {
        assert!(
            valid().dev_conveniences().len() == 1,
            "only the open push routes"
        );
        let mut c = valid();
        c.push.secret = "p".into();
        assert!(c.dev_conveniences().is_empty(), "production: nothing open");
        c.auth.mode = AuthMode::Trust;
        c.push.open_online = true;
        c.demo.enabled = true;
        let warned = c.dev_conveniences().join("\n");
        for field in ["auth.mode", "push.open_online", "demo.enabled"] {
            assert!(warned.contains(field), "{field} in {warned}");
        }
    }

    #[test]
    fn errors_name_fields() {
        let mut c = valid();
        c.stream.partitions = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("stream.partitions")
        );
        let mut c = valid();
        c.listen.http = "nope".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("listen.http")
        );
        let mut c = valid();
        c.redis.url = "http://x".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("redis.url")
        );
        let mut c = valid();
        c.webhook.url = "https://bot.example/hook".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("webhook.url")
        );
        c.webhook.url = "http://127.0.0.1:9/hook".into();
        c.validate().expect("http webhook is valid");
        c.chat.presence_room_types = vec!["bad type".into()];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("chat.presence_room_types")
        );
    }
}
