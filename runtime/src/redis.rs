//! Redis plumbing shared by logic and job: the `[redis]` config section and its validation
//! (one server, a Redis Cluster or a Sentinel-managed primary; `rediss://` with an optional CA
//! file), the
//! stream partition count every tier must agree on, connecting with retry and backoff until Redis
//! is there (a tier started before Redis waits instead of exiting), and the readiness PING.
//!
//! The tiers' own keys and commands live in their store modules; this file only opens the
//! connection and checks the one value every tier shares (`rim:meta:partitions`).

use std::time::Duration;

use redis::aio::ConnectionLike;
use rim_proto::keys;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
pub use crate::redis_conn::{Bounds, Conn, Topology, retry_reason};
use crate::settings::{SettingsError, positive};

/// First and longest wait between attempts while Redis is unreachable at start.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// `[redis]`: where Redis is and how long one round trip may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`, `rediss://…` (TLS) or `redis+unix:///path`; ignored when `nodes`
    /// or `sentinels` is set.
    pub url: String,
    /// Redis Cluster seed nodes (`redis://` or `rediss://`); when non-empty rim uses the cluster
    /// client and `url` is ignored.
    pub nodes: Vec<String>,
    /// Sentinel addresses (`redis://host:port`); when non-empty rim asks them for the primary
    /// named `sentinel_master` and follows it across failovers.
    pub sentinels: Vec<String>,
    /// The primary's name as the sentinels know it (`sentinel monitor <name> …`).
    pub sentinel_master: String,
    /// ACL user for the data nodes (the one server, the cluster's nodes, or the primary the
    /// sentinels name); empty = the default user. Needs `password`.
    pub username: String,
    /// Password for the data nodes when their URLs carry none (the only way to give the primary
    /// behind sentinels one; a sentinel's own password goes in its URL). Best set through the
    /// environment (`RIM_<TIER>__REDIS__PASSWORD`) so it stays out of config files.
    pub password: String,
    /// PEM CA certificate(s) a `rediss://` server is verified against; empty = the system's
    /// root certificates (`/etc/ssl/certs`).
    pub ca_file: String,
    /// Upper bound on any one Redis round trip (ms); past it the call fails instead of hanging.
    pub timeout_ms: u64,
    /// A push is acknowledged only after `WAIT` confirms this many replicas hold it (0 = as soon
    /// as the primary does; a primary's death can then lose acknowledged pushes).
    pub wait_replicas: u32,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
            nodes: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: String::new(),
            username: String::new(),
            password: String::new(),
            ca_file: String::new(),
            timeout_ms: 2_000,
            wait_replicas: 0,
        }
    }
}

/// The env variables that take comma-separated lists (`RIM_<TIER>__REDIS__NODES=a,b,c`).
pub const LIST_KEYS: &[&str] = &["redis.nodes", "redis.sentinels"];

impl RedisConfig {
    /// Round-trip bound.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Checks the URL (or the cluster's nodes, or the sentinels) parse and the timeout is positive
    /// (fields named `redis.*`).
    pub fn validate(&self) -> Result<(), SettingsError> {
        let urls = |field: &'static str, list: &[String]| {
            for u in list {
                if !(u.starts_with("redis://") || u.starts_with("rediss://"))
                    || redis::Client::open(u.as_str()).is_err()
                {
                    return Err(SettingsError::invalid(
                        field,
                        format!("{:?} is not a redis:// or rediss:// URL", redact(u)),
                    ));
                }
            }
            Ok(())
        };
        urls("redis.nodes", &self.nodes)?;
        urls("redis.sentinels", &self.sentinels)?;
        if !self.nodes.is_empty() && !self.sentinels.is_empty() {
            return Err(SettingsError::invalid(
                "redis.sentinels",
                "set either redis.nodes (Redis Cluster) or redis.sentinels, not both",
            ));
        }
        if !self.sentinels.is_empty() && self.sentinel_master.is_empty() {
            return Err(SettingsError::invalid(
                "redis.sentinel_master",
                "is required with redis.sentinels (the name in `sentinel monitor <name>`)",
            ));
        }
        if !self.username.is_empty() && self.password.is_empty() {
            return Err(SettingsError::invalid(
                "redis.username",
                "needs redis.password (a user without a password cannot authenticate)",
            ));
        }
        if !self.password.is_empty() && self.sentinels.is_empty() {
            // The data nodes' URLs: a password in both places would leave one of them unused.
            let data = if self.nodes.is_empty() {
                std::slice::from_ref(&self.url)
            } else {
                &self.nodes[..]
            };
            if data.iter().any(|u| redact(u) != *u) {
                return Err(SettingsError::invalid(
                    "redis.password",
                    "the Redis URLs carry credentials too; give them in one place",
                ));
            }
        }
        if self.nodes.is_empty()
            && self.sentinels.is_empty()
            && let Err(e) = redis::Client::open(self.url.as_str())
        {
            return Err(SettingsError::invalid(
                "redis.url",
                format!(
                    "{:?} is not a redis://, rediss:// or redis+unix:// URL ({e})",
                    redact(&self.url)
                ),
            ));
        }
        if !self.ca_file.is_empty() {
            if !self.addresses().iter().all(|u| u.starts_with("rediss://")) {
                return Err(SettingsError::invalid(
                    "redis.ca_file",
                    "is only used with rediss:// addresses",
                ));
            }
            crate::tls::client_config(&self.ca_file)
                .map_err(|e| SettingsError::invalid("redis.ca_file", e.to_string()))?;
        }
        positive("redis.timeout_ms", self.timeout_ms)
    }

    /// The addresses in use: the cluster's nodes, the sentinels, or the one URL.
    pub fn addresses(&self) -> Vec<&str> {
        if !self.nodes.is_empty() {
            self.nodes.iter().map(String::as_str).collect()
        } else if !self.sentinels.is_empty() {
            self.sentinels.iter().map(String::as_str).collect()
        } else {
            vec![self.url.as_str()]
        }
    }

    /// Where Redis is, credentials hidden, for logs: `cluster redis://a:7000,…`.
    pub fn describe(&self) -> String {
        let list = self
            .addresses()
            .iter()
            .map(|u| redact(u))
            .collect::<Vec<_>>()
            .join(",");
        match self.topology_kind() {
            "cluster" => format!("cluster {list}"),
            "sentinel" => format!("sentinel {} via {list}", self.sentinel_master),
            _ => list,
        }
    }

    fn topology_kind(&self) -> &'static str {
        if !self.nodes.is_empty() {
            "cluster"
        } else if !self.sentinels.is_empty() {
            "sentinel"
        } else {
            "single"
        }
    }

    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, RedisStartError> {
        if self.ca_file.is_empty() {
            return Ok(None);
        }
        let root_cert = std::fs::read(&self.ca_file).map_err(|e| RedisStartError::CaFile {
            path: self.ca_file.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        }))
    }

    /// The redis-rs client for this topology: for `rediss://` with `ca_file`, trusting only that
    /// CA; else the system roots.
    pub fn topology(&self) -> Result<Topology, RedisStartError> {
        // redis-rs builds its rustls config on the process's default provider: rim's (ring).
        let _ = rustls::crypto::CryptoProvider::install_default((*crate::tls::provider()).clone());
        let certs = self.certificates()?;
        match self.topology_kind() {
            "cluster" => {
                let mut b =
                    redis::cluster::ClusterClient::builder(self.nodes.iter().map(String::as_str));
                if self.nodes.iter().any(|u| u.starts_with("rediss://")) {
                    b = b.tls(redis::TlsMode::Secure);
                }
                if let Some(certs) = certs {
                    b = b.certs(certs);
                }
                if !self.password.is_empty() {
                    b = b.password(&self.password);
                }
                if !self.username.is_empty() {
                    b = b.username(&self.username);
                }
                b.build()
                    .map(Topology::Cluster)
                    .map_err(RedisStartError::Url)
            }
            "sentinel" => {
                let mut node = redis::sentinel::SentinelNodeConnectionInfo::default();
                if self.sentinels.iter().any(|u| u.starts_with("rediss://")) {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                node = node.set_redis_connection_info(self.credentials(Default::default()));
                Topology::sentinel(&self.sentinels, &self.sentinel_master, node)
                    .map_err(RedisStartError::Url)
            }
            _ => {
                let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str())
                    .map_err(RedisStartError::Url)?;
                let settings = self.credentials(info.redis_settings().clone());
                let info = info.set_redis_settings(settings);
                match certs {
                    None => redis::Client::open(info),
                    Some(certs) => redis::Client::build_with_tls(info, certs),
                }
                .map(Topology::Single)
                .map_err(RedisStartError::Url)
            }
        }
    }

    /// `settings` with `username` and `password` applied (when set).
    fn credentials(&self, mut settings: redis::RedisConnectionInfo) -> redis::RedisConnectionInfo {
        if !self.password.is_empty() {
            settings = settings.set_password(&self.password);
        }
        if !self.username.is_empty() {
            settings = settings.set_username(&self.username);
        }
        settings
    }
}

/// `url` with its credentials hidden, for logs and error messages: `redis://user:***@host/`.
/// Everything before `@` in the authority may be a password (redis-rs also reads a lone
/// userinfo as one), so all of a password-less userinfo is hidden too.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let shown = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{shown}{}", &rest[at..])
}

/// Checks a configured partition count (`stream.partitions`).
pub fn validate_partitions(partitions: u16) -> Result<(), SettingsError> {
    positive("stream.partitions", partitions)
}

/// Why a tier cannot use this Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    /// The URL is not one redis-rs accepts.
    #[error("redis.url: {0}")]
    Url(redis::RedisError),
    /// `redis.ca_file` could not be read.
    #[error("redis.ca_file {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The cluster was started with another partition count.
    #[error(
        "stream.partitions is {configured} but the cluster uses {existing:?} ({key}); every logic \
         and job must use the same count",
        key = keys::META_PARTITIONS
    )]
    PartitionMismatch {
        /// From this tier's config.
        configured: u16,
        /// Found in Redis.
        existing: String,
    },
}

/// Connects an auto-reconnecting command connection on the configured topology and checks (or,
/// first in the cluster, records) the partition count, retrying with backoff while Redis is
/// unreachable. `Ok(None)` when `shutdown` came first; a partition mismatch fails at once.
pub async fn connect(
    cfg: &RedisConfig,
    bounds: Bounds,
    partitions: u16,
    shutdown: &CancellationToken,
) -> Result<Option<(Topology, Conn)>, RedisStartError> {
    let topology = cfg.topology()?;
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    loop {
        let attempt = async {
            let mut conn = topology.connect(bounds).await?;
            let existing = record_partitions(&mut conn, partitions).await?;
            Ok::<_, redis::RedisError>((conn, existing))
        };
        let bounded = tokio::time::timeout(bounds.connect * 3, attempt);
        let wait = match bounded.await {
            Ok(Ok((conn, existing))) => {
                if existing.trim().parse::<u16>().ok() != Some(partitions) {
                    return Err(RedisStartError::PartitionMismatch {
                        configured: partitions,
                        existing,
                    });
                }
                tracing::info!(redis = %cfg.describe(), topology = topology.kind(), "redis connected");
                return Ok(Some((topology, conn)));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", bounds.connect * 3),
        };
        let retry_in = backoff.next_delay();
        let redis = cfg.describe();
        tracing::warn!(%redis, error = %wait, ?retry_in, "redis unreachable; waiting for it before serving");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(retry_in) => {}
        }
    }
}

impl Bounds {
    /// Both bounds from `[redis] timeout_ms`.
    pub fn from_config(cfg: &RedisConfig) -> Self {
        Bounds {
            connect: cfg.timeout(),
            response: cfg.timeout(),
        }
    }
}

/// `SET rim:meta:partitions P NX`, then the value now stored.
async fn record_partitions(
    conn: &mut (impl ConnectionLike + Send),
    partitions: u16,
) -> redis::RedisResult<String> {
    let (existing,): (Option<String>,) = redis::pipe()
        .cmd("SET")
        .arg(keys::META_PARTITIONS)
        .arg(partitions)
        .arg("NX")
        .ignore()
        .cmd("GET")
        .arg(keys::META_PARTITIONS)
        .query_async(conn)
        .await?;
    Ok(existing.unwrap_or_default())
}

/// PING within `within`, for `/readyz`: the reason when Redis is not answering.
pub async fn ping(conn: &Conn, within: Duration) -> Result<(), String> {
    let mut conn = conn.clone();
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<String>(&mut conn);
    match tokio::time::timeout(within, ping).await {
        Ok(Ok(pong)) if pong == "PONG" => Ok(()),
        Ok(Ok(other)) => Err(format!("redis: unexpected PING reply {other:?}")),
        Ok(Err(e)) => Err(format!("redis: {e}")),
        Err(_) => Err(format!("redis: no PING answer within {within:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_field() {
        let bad_url = RedisConfig {
            url: "http://x".into(),
            ..RedisConfig::default()
        };
        let e = bad_url.validate().err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.starts_with("redis.url")));
        let zero = RedisConfig {
            timeout_ms: 0,
            ..RedisConfig::default()
        };
        let e = zero.validate().err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.starts_with("redis.timeout_ms")));
        assert!(RedisConfig::default().validate().is_ok());
    }

    /// The error `cfg` fails validation with ("" when valid).
    fn field(cfg: RedisConfig) -> String {
        cfg.validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn topology_errors_name_the_field() {
        let nodes = vec!["redis://127.0.0.1:7000".to_string()];
        let both = RedisConfig {
            nodes: nodes.clone(),
            sentinels: nodes.clone(),
            sentinel_master: "rim".into(),
            ..RedisConfig::default()
        };
        assert!(field(both).starts_with("redis.sentinels"));
        let nameless = RedisConfig {
            sentinels: nodes.clone(),
            ..RedisConfig::default()
        };
        assert!(field(nameless).starts_with("redis.sentinel_master"));
        let bad_node = RedisConfig {
            nodes: vec!["http://x:1".into()],
            ..RedisConfig::default()
        };
        assert!(field(bad_node).starts_with("redis.nodes"));
        let plain_with_ca = RedisConfig {
            nodes: nodes.clone(),
            ca_file: "/etc/ssl/certs/ca-certificates.crt".into(),
            ..RedisConfig::default()
        };
        assert!(field(plain_with_ca).starts_with("redis.ca_file"));
        // With nodes set, a url nobody reads is not validated; the description names the topology.
        let cluster = RedisConfig {
            url: "not a url".into(),
            nodes: vec!["redis://u:hunter2@127.0.0.1:7000".into()],
            ..RedisConfig::default()
        };
        assert!(cluster.validate().is_ok());
        assert_eq!(cluster.describe(), "cluster redis://u:***@127.0.0.1:7000");
        assert!(matches!(cluster.topology(), Ok(Topology::Cluster(_))));
    }

    #[test]
    fn credentials_are_given_in_one_place() {
        let twice = RedisConfig {
            url: "redis://:a@127.0.0.1:6379/".into(),
            password: "b".into(),
            ..RedisConfig::default()
        };
        assert!(field(twice).starts_with("redis.password"));
        let twice_on_nodes = RedisConfig {
            nodes: vec!["redis://:a@127.0.0.1:7000".into()],
            password: "b".into(),
            ..RedisConfig::default()
        };
        assert!(field(twice_on_nodes).starts_with("redis.password"));
        let user_only = RedisConfig {
            username: "rim".into(),
            ..RedisConfig::default()
        };
        assert!(field(user_only).starts_with("redis.username"));
        // Behind sentinels the password is the primary's; a sentinel's own is in its URL.
        let sentinel = RedisConfig {
            sentinels: vec!["redis://:sentinel-pw@127.0.0.1:26379".into()],
            sentinel_master: "rim".into(),
            password: "primary-pw".into(),
            ..RedisConfig::default()
        };
        assert!(sentinel.validate().is_ok());
        assert!(
            !sentinel.describe().contains("pw"),
            "{}",
            sentinel.describe()
        );
        let single = RedisConfig {
            password: "pw".into(),
            ..RedisConfig::default()
        };
        assert!(single.validate().is_ok());
        assert!(matches!(single.topology(), Ok(Topology::Single(_))));
    }

    #[test]
    fn credentials_never_leave_redact() {
        assert_eq!(redact("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        assert_eq!(
            redact("redis://app:hunter2@10.0.0.7:6379/0"),
            "redis://app:***@10.0.0.7:6379/0"
        );
        assert_eq!(
            redact("rediss://:hunter2@r.example/"),
            "rediss://:***@r.example/"
        );
        assert_eq!(redact("redis://hunter2@r.example"), "redis://***@r.example");
        assert_eq!(
            redact("redis+unix:///run/redis.sock"),
            "redis+unix:///run/redis.sock"
        );
        let bad = RedisConfig {
            url: "http://u:hunter2@x".into(),
            ..RedisConfig::default()
        };
        let e = bad
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn partition_count_must_be_positive() {
        let e = validate_partitions(0).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.starts_with("stream.partitions")));
        assert!(validate_partitions(1).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn connect_gives_up_at_shutdown_while_redis_is_unreachable() {
        // Port 1 on loopback refuses at once; the retry loop must still end with shutdown.
        let shutdown = CancellationToken::new();
        let opts = Bounds {
            connect: Duration::from_millis(100),
            response: Duration::from_millis(100),
        };
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.cancel();
        });
        let cfg = RedisConfig {
            url: "redis://127.0.0.1:1/".into(),
            ..RedisConfig::default()
        };
        let r = connect(&cfg, opts, 16, &shutdown).await;
        assert!(matches!(r, Ok(None)));
    }
}
