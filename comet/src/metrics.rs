//! The comet's own counters and gauges, rendered as Prometheus text on `/metrics`.

use rim_runtime::metrics::{Counter, Exposition, Gauge};

/// Why an auth failed (label values of `rim_comet_auth_failures_total`).
pub const AUTH_REASONS: [&str; 6] = [
    "timeout",
    "not_auth",
    "bad_body",
    "refused",
    "logic_unavailable",
    "too_many_rooms",
];

/// Why a client frame was rejected (label values of `rim_comet_frames_rejected_total`).
pub const FRAME_REASONS: [&str; 3] = ["malformed", "too_big", "bad_json"];

/// Limits that refuse clients (label values of `rim_comet_limit_refused_total`); `frame_rate`
/// counts sessions closed for heartbeats or unknown ops over their rate, `proxy_header` TCP
/// connections from a trusted proxy without a valid PROXY protocol header.
pub const LIMITS: [&str; 5] = [
    "sessions_per_ip",
    "auth_per_ip",
    "ws_origin",
    "frame_rate",
    "proxy_header",
];

/// Codes a refused upstream message (op 5) can carry (label values of
/// `rim_comet_upstream_refused_total`); codes outside this list count as `-500`.
pub const SEND_CODES: [&str; 7] = ["-400", "-401", "-403", "-404", "-429", "-500", "-503"];

/// Per-instance metrics of one comet.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Internal RPC connections: handshake refusals, cap, frame limit (`rim_rpc_*`).
    pub rpc: std::sync::Arc<rim_runtime::cluster::RpcMetrics>,
    /// TLS handshakes and certificate reloads (`rim_tls_*`).
    pub tls: std::sync::Arc<rim_runtime::tls::TlsMetrics>,
    /// Open TCP sessions (connections, authenticated or not).
    pub conn_tcp: Gauge,
    /// Open WebSocket sessions.
    pub conn_ws: Gauge,
    /// Connections refused by `max_connections` or shutdown.
    pub conn_refused: Counter,
    /// Connections refused by a client-port limit, indexed like [`LIMITS`].
    pub limit_refused: [Counter; 5],
    /// Auth failures, indexed like [`AUTH_REASONS`].
    pub auth_failures: [Counter; AUTH_REASONS.len()],
    /// Rejected frames, indexed like [`FRAME_REASONS`].
    pub frames_rejected: [Counter; FRAME_REASONS.len()],
    /// Push writes queued to sessions.
    pub pushes_delivered: Counter,
    /// Pushes skipped as already delivered.
    pub duplicates: Counter,
    /// Messages a session was given from a history when it caught up (offline messages).
    pub caught_up: Counter,
    /// Catch-ups whose history could not be read.
    pub catch_up_failed: Counter,
    /// Sessions closed because their outbound queue was full.
    pub slow_consumer_closed: Counter,
    /// Pushes offered to a session that was already closing (`reason="closing"`).
    pub pushes_dropped_closing: Counter,
    /// Paced broadcasts delivered at once because the paced queue was full.
    pub paced_overflow: Counter,
    /// ChangeRoom, Sub, Unsub, heartbeat and unknown-op frames refused by the session's rate
    /// limit.
    pub requests_rate_limited: Counter,
    /// Sessions closed after heartbeat silence.
    pub heartbeat_timeouts: Counter,
    /// Sessions closed because their token expired (no fresh one by op 22).
    pub token_expired: Counter,
    /// Successful node renewals.
    pub renewals: Counter,
    /// Failed node renewals.
    pub renew_failures: Counter,
    /// Upstream messages (op 4) logic accepted.
    pub upstream_sent: Counter,
    /// Upstream messages refused, indexed like [`SEND_CODES`].
    pub upstream_refused: [Counter; 7],
}

impl Metrics {
    /// Counts an auth failure by reason (unknown reasons are ignored).
    pub fn auth_failed(&self, reason: &str) {
        if let Some(i) = AUTH_REASONS.iter().position(|r| *r == reason) {
            self.auth_failures[i].inc();
        }
    }

    /// Counts a connection refused by a limit (unknown limits are ignored).
    pub fn limit_refused(&self, limit: &str) {
        if let Some(i) = LIMITS.iter().position(|r| *r == limit) {
            self.limit_refused[i].inc();
        }
    }

    /// Counts a rejected frame by reason.
    pub fn frame_rejected(&self, reason: &str) {
        if let Some(i) = FRAME_REASONS.iter().position(|r| *r == reason) {
            self.frames_rejected[i].inc();
        }
    }

    /// Counts a refused upstream message by its reply code.
    pub fn upstream_refused(&self, code: i32) {
        let label = code.to_string();
        let i = SEND_CODES
            .iter()
            .position(|c| *c == label)
            .or_else(|| SEND_CODES.iter().position(|c| *c == "-500"));
        if let Some(i) = i {
            self.upstream_refused[i].inc();
        }
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let auth: Vec<(&str, u64)> = AUTH_REASONS
            .iter()
            .zip(&self.auth_failures)
            .map(|(r, c)| (*r, c.get()))
            .collect();
        let frames: Vec<(&str, u64)> = FRAME_REASONS
            .iter()
            .zip(&self.frames_rejected)
            .map(|(r, c)| (*r, c.get()))
            .collect();
        let refused: Vec<(&str, u64)> = SEND_CODES
            .iter()
            .zip(&self.upstream_refused)
            .map(|(r, c)| (*r, c.get()))
            .collect();
        let limits: Vec<(&str, u64)> = LIMITS
            .iter()
            .zip(&self.limit_refused)
            .map(|(r, c)| (*r, c.get()))
            .collect();
        let mut e = Exposition::new();
        e.gauge(
            "rim_comet_connections_tcp",
            "Open TCP connections.",
            self.conn_tcp.get(),
        )
        .gauge(
            "rim_comet_connections_ws",
            "Open WebSocket connections.",
            self.conn_ws.get(),
        )
        .counter(
            "rim_comet_connections_refused_total",
            "Connections refused (limit or shutdown).",
            self.conn_refused.get(),
        )
        .labeled_counter(
            "rim_comet_limit_refused_total",
            "Clients refused by a client-port limit ([limits], [websocket]), by limit.",
            "limit",
            &limits,
        )
        .labeled_counter(
            "rim_comet_auth_failures_total",
            "Failed authentications by reason.",
            "reason",
            &auth,
        )
        .labeled_counter(
            "rim_comet_frames_rejected_total",
            "Client frames rejected by reason.",
            "reason",
            &frames,
        )
        .counter(
            "rim_comet_pushes_delivered_total",
            "Push writes queued to sessions.",
            self.pushes_delivered.get(),
        )
        .counter(
            "rim_comet_push_duplicates_total",
            "Pushes skipped because the session already had them.",
            self.duplicates.get(),
        )
        .counter(
            "rim_comet_caught_up_total",
            "Messages sessions were given from a history when catching up (offline messages).",
            self.caught_up.get(),
        )
        .counter(
            "rim_comet_catch_up_failed_total",
            "Catch-ups whose histories logic could not read (the session keeps its live pushes).",
            self.catch_up_failed.get(),
        )
        .counter(
            "rim_comet_slow_consumer_closed_total",
            "Sessions closed because their outbound queue was full.",
            self.slow_consumer_closed.get(),
        )
        .labeled_counter(
            "rim_comet_pushes_dropped_total",
            "Pushes not queued to an addressed session, by reason (closing = the session was closing).",
            "reason",
            &[("closing", self.pushes_dropped_closing.get())],
        )
        .counter(
            "rim_comet_paced_overflow_total",
            "Paced broadcasts delivered unpaced because the paced queue was full.",
            self.paced_overflow.get(),
        )
        .counter(
            "rim_comet_requests_rate_limited_total",
            "ChangeRoom, Sub, Unsub, heartbeat and unknown-op frames refused by the per-session rate limit.",
            self.requests_rate_limited.get(),
        )
        .counter(
            "rim_comet_heartbeat_timeouts_total",
            "Sessions closed after heartbeat silence.",
            self.heartbeat_timeouts.get(),
        )
        .counter(
            "rim_comet_token_expired_total",
            "Sessions closed with op 6 \"token expired\" (no fresh token by op 22).",
            self.token_expired.get(),
        )
        .counter(
            "rim_comet_renewals_total",
            "Successful node renewals.",
            self.renewals.get(),
        )
        .counter(
            "rim_comet_renew_failures_total",
            "Failed node renewals.",
            self.renew_failures.get(),
        )
        .counter(
            "rim_comet_upstream_sent_total",
            "Upstream messages (op 4) accepted by logic.",
            self.upstream_sent.get(),
        )
        .labeled_counter(
            "rim_comet_upstream_refused_total",
            "Upstream messages refused, by op 5 code.",
            "code",
            &refused,
        );
        e.finish()
    }
}
