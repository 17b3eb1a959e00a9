//! Comet configuration: every field defaulted except `server_id`, validated before `run`.
//!
//! Loaded by `rim_runtime::settings::load(path, "comet", ..)` from `config/comet.toml` and the
//! `RIM_COMET__SECTION__FIELD` environment.

use std::time::Duration;

pub use rim_runtime::cluster::ClusterConfig;
use rim_runtime::settings::{SettingsError, Validate, positive, socket_addr};
pub use rim_runtime::tls::TlsConfig;
use serde::Deserialize;

/// Fields that take comma-separated lists from the environment (`RIM_COMET__LOGIC__ADDRS=a,b`).
pub const LIST_KEYS: &[&str] = &[
    "logic.addrs",
    "websocket.allowed_origins",
    "limits.trusted_proxies",
];

/// Whole comet configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unique id of this node in the cluster (required).
    pub server_id: String,
    /// Addresses `main.rs` binds.
    pub listen: Listen,
    /// Addresses published to the cluster (empty = the bound listener's address).
    pub advertise: Advertise,
    /// How to reach logic.
    pub logic: Logic,
    /// Client session limits and timers.
    pub session: SessionConfig,
    /// Per-address limits on the client ports.
    pub limits: LimitsConfig,
    /// WebSocket-only settings.
    pub websocket: WebSocketConfig,
    /// Session sharding.
    pub bucket: BucketConfig,
    /// Node renewal.
    pub renew: Renew,
    /// Shared secret and bounds of internal RPC (`CometRpc`, and the link to logic).
    pub cluster: ClusterConfig,
    /// Certificate of the TLS client listeners (`listen.wss`, `listen.tls`), reloaded on SIGHUP.
    pub tls: TlsConfig,
    /// How long shutdown waits for sessions and tasks to finish.
    pub shutdown_grace_ms: u64,
    /// `tracing` filter used when `RUST_LOG` is unset.
    pub log_level: String,
    /// JSON log lines instead of human-readable ones.
    pub log_json: bool,
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// WebSocket (`/sub`), `/healthz` and `/readyz` (and `/metrics` when `ops` is empty).
    pub http: String,
    /// Raw TCP frames; empty = off.
    pub tcp: String,
    /// WebSocket over TLS (`/sub`, and the ops routes); empty = off. Needs `[tls]`.
    pub wss: String,
    /// Raw TCP frames over TLS; empty = off. Needs `[tls]`.
    pub tls: String,
    /// `CometRpc` for job.
    pub rpc: String,
    /// Ops routes (`/metrics`, `/healthz`, `/readyz`) for the scraper, off the client ports;
    /// empty = served on `http`, where clients can read them (dev only, warned at start).
    pub ops: String,
}

/// Addresses and placement data published in `NodeInfo`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Advertise {
    /// Where job reaches `CometRpc`.
    pub rpc_addr: String,
    /// Client-facing TCP address.
    pub tcp_addr: String,
    /// Client-facing WebSocket address.
    pub ws_addr: String,
    /// Client-facing WebSocket over TLS address.
    pub wss_addr: String,
    /// Client-facing TCP over TLS address.
    pub tls_addr: String,
    /// Host name clients should use.
    pub domain: String,
    /// Relative weight for client placement.
    pub weight: u32,
}

/// Logic link.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Logic {
    /// Logic RPC addresses, tried in turn.
    pub addrs: Vec<String>,
    /// Deadline of one RPC call.
    pub rpc_timeout_ms: u64,
    /// TCP connect timeout per address.
    pub connect_timeout_ms: u64,
}

/// Client session settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Time allowed between accept and the Auth frame.
    pub handshake_timeout_ms: u64,
    /// Largest body accepted from a client.
    pub max_body: usize,
    /// Bounded outbound queue per session; full = slow consumer, closed.
    pub outbound_queue: usize,
    /// Connections beyond this are refused.
    pub max_connections: usize,
    /// Idle timeout = heartbeat interval (from logic) times this.
    pub heartbeat_misses: u32,
    /// Minimum interval between `logic.heartbeat` calls of one session (any client frame
    /// renews; the effective interval is at most the heartbeat interval logic announces).
    pub renew_session_ms: u64,
    /// A single socket write taking longer than this closes the session.
    pub write_timeout_ms: u64,
    /// Upstream messages (op 4) a session may send per second, sustained.
    pub send_rate_per_sec: u32,
    /// Upstream messages a session may send at once before the rate applies.
    pub send_burst: u32,
    /// Rooms one session may be in at once (Auth's `room_id` and `rooms`, JoinRoom); beyond it
    /// Auth is refused and JoinRoom answered with an error.
    pub max_rooms: usize,
}

/// Per-address limits on the client ports. Addresses are counted as IPv4 addresses and IPv6
/// /64 prefixes (one host usually holds a whole /64).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open connections (authenticated or not) from one address; 0 = no limit.
    pub sessions_per_ip: u32,
    /// New connections (each one Auth attempt) per second from one address, sustained;
    /// 0 = no limit.
    pub auth_per_ip_per_sec: u32,
    /// Connections from one address at once before `auth_per_ip_per_sec` applies.
    pub auth_per_ip_burst: u32,
    /// Loopback peers (a TLS proxy on the same host, local tools) are not limited per address:
    /// such a peer carries many clients, and counting it would cap all of them together.
    pub exempt_loopback: bool,
    /// Proxies (IPs or CIDRs like `10.0.0.0/8`) whose `X-Forwarded-For` names the client of a
    /// WebSocket: only when the TCP peer is one of them is the header read (the last address not
    /// itself a trusted proxy). Empty = the header is never believed.
    pub trusted_proxies: Vec<String>,
    /// TCP connections (`listen.tcp`, `listen.tls`) from `trusted_proxies` start with a PROXY
    /// protocol header (v1 or v2, as HAProxy or nginx `proxy_protocol` send it) naming the
    /// client: required from them (a connection without one is closed), never read from anyone
    /// else.
    pub proxy_protocol: bool,
}

/// WebSocket settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// `Origin` values a browser may upgrade `/sub` from (exact match, e.g.
    /// `https://app.example.com`); empty = any. A request without `Origin` (not a browser) is
    /// always allowed.
    pub allowed_origins: Vec<String>,
}

/// Bucket sharding.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BucketConfig {
    /// Number of shards sessions are spread over by key hash.
    pub count: usize,
}

/// Node renewal.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Renew {
    /// Period of `renew_node` calls.
    pub interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_id: String::new(),
            listen: Listen::default(),
            advertise: Advertise::default(),
            logic: Logic::default(),
            session: SessionConfig::default(),
            limits: LimitsConfig::default(),
            websocket: WebSocketConfig::default(),
            bucket: BucketConfig::default(),
            renew: Renew::default(),
            cluster: ClusterConfig::default(),
            tls: TlsConfig::default(),
            shutdown_grace_ms: 10_000,
            log_level: "info".into(),
            log_json: false,
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: "0.0.0.0:3102".into(),
            tcp: "0.0.0.0:3101".into(),
            wss: String::new(),
            tls: String::new(),
            rpc: "127.0.0.1:3109".into(),
            ops: "127.0.0.1:3103".into(),
        }
    }
}

impl Default for Advertise {
    fn default() -> Self {
        Advertise {
            rpc_addr: String::new(),
            tcp_addr: String::new(),
            ws_addr: String::new(),
            wss_addr: String::new(),
            tls_addr: String::new(),
            domain: String::new(),
            weight: 10,
        }
    }
}

impl Default for Logic {
    fn default() -> Self {
        Logic {
            addrs: vec!["127.0.0.1:3119".into()],
            rpc_timeout_ms: 3000,
            connect_timeout_ms: 1000,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            handshake_timeout_ms: 5000,
            max_body: rim_proto::frame::DEFAULT_MAX_BODY,
            outbound_queue: 1024,
            max_connections: 100_000,
            heartbeat_misses: 5,
            renew_session_ms: 60_000,
            write_timeout_ms: 10_000,
            send_rate_per_sec: 20,
            send_burst: 40,
            max_rooms: 64,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            sessions_per_ip: 1000,
            auth_per_ip_per_sec: 20,
            auth_per_ip_burst: 100,
            exempt_loopback: true,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        }
    }
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig { count: 32 }
    }
}

impl Default for Renew {
    fn default() -> Self {
        Renew { interval_ms: 5000 }
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
        if self.server_id.trim().is_empty() {
            return Err(SettingsError::invalid("server_id", "must not be empty"));
        }
        socket_addr("listen.http", &self.listen.http)?;
        if !self.listen.tcp.is_empty() {
            socket_addr("listen.tcp", &self.listen.tcp)?;
        }
        socket_addr("listen.rpc", &self.listen.rpc)?;
        if !self.listen.ops.is_empty() {
            socket_addr("listen.ops", &self.listen.ops)?;
        }
        for (field, addr) in [
            ("listen.wss", &self.listen.wss),
            ("listen.tls", &self.listen.tls),
        ] {
            if addr.is_empty() {
                continue;
            }
            socket_addr(field, addr)?;
            if !self.tls.enabled() {
                return Err(SettingsError::invalid(
                    field,
                    "needs a certificate: set [tls] cert_file and key_file",
                ));
            }
        }
        self.tls.validate()?;
        if self.logic.addrs.iter().all(|a| a.trim().is_empty()) {
            return Err(SettingsError::invalid(
                "logic.addrs",
                "needs at least one address",
            ));
        }
        let mut rpc_addrs = vec![("listen.rpc", self.listen.rpc.as_str())];
        rpc_addrs.extend(self.logic.addrs.iter().map(|a| ("logic.addrs", a.as_str())));
        self.cluster.validate(&rpc_addrs)?;
        positive("logic.rpc_timeout_ms", self.logic.rpc_timeout_ms)?;
        positive("logic.connect_timeout_ms", self.logic.connect_timeout_ms)?;
        positive(
            "session.handshake_timeout_ms",
            self.session.handshake_timeout_ms,
        )?;
        positive("session.max_body", self.session.max_body as u64)?;
        if self.session.max_body > 16 * 1024 * 1024 {
            return Err(SettingsError::invalid(
                "session.max_body",
                "must be at most 16777216",
            ));
        }
        positive("session.outbound_queue", self.session.outbound_queue as u64)?;
        positive(
            "session.max_connections",
            self.session.max_connections as u64,
        )?;
        positive(
            "session.heartbeat_misses",
            u64::from(self.session.heartbeat_misses),
        )?;
        positive("session.write_timeout_ms", self.session.write_timeout_ms)?;
        positive(
            "session.send_rate_per_sec",
            u64::from(self.session.send_rate_per_sec),
        )?;
        positive("session.send_burst", u64::from(self.session.send_burst))?;
        positive("session.max_rooms", self.session.max_rooms as u64)?;
        if self.limits.auth_per_ip_per_sec > 0 {
            positive(
                "limits.auth_per_ip_burst",
                u64::from(self.limits.auth_per_ip_burst),
            )?;
        }
        for p in &self.limits.trusted_proxies {
            if crate::cidr::Cidr::parse(p).is_none() {
                return Err(SettingsError::invalid(
                    "limits.trusted_proxies",
                    "each entry is an IP address or a CIDR like 10.0.0.0/8",
                ));
            }
        }
        for o in &self.websocket.allowed_origins {
            if o.trim().is_empty() || o.ends_with('/') {
                return Err(SettingsError::invalid(
                    "websocket.allowed_origins",
                    "each entry is an origin like https://app.example.com (no path, no trailing /)",
                ));
            }
        }
        positive("bucket.count", self.bucket.count as u64)?;
        if self.bucket.count > usize::from(u16::MAX) {
            return Err(SettingsError::invalid(
                "bucket.count",
                "must be at most 65535",
            ));
        }
        positive("renew.interval_ms", self.renew.interval_ms)?;
        Ok(())
    }
}

impl Config {
    pub(crate) fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.logic.rpc_timeout_ms)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn server_id_is_required_and_defaults_validate() {
        let err = Config::default().validate().unwrap_err();
        assert_eq!(err.to_string(), "server_id: must not be empty");
        let c = Config {
            server_id: "c1".into(),
            ..Config::default()
        };
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.bucket.count = 0;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .starts_with("bucket.count")
        );
        let mut bad = c.clone();
        bad.session.send_burst = 0;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .starts_with("session.send_burst")
        );
    }
}
