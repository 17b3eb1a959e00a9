//! Logic's own counters (per instance), and the ops source behind `/readyz` and `/metrics`.

use std::sync::Arc;

use futures::future::BoxFuture;
use rim_runtime::metrics::{Counter, Exposition};
use rim_runtime::ops::OpsSource;

use crate::store::Stores;

/// HTTP statuses counted individually; anything else lands in "other".
const STATUSES: [u16; 9] = [200, 400, 401, 403, 404, 405, 429, 500, 503];

/// Every counter logic exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Internal RPC connections: handshake refusals, cap, frame limit (`rim_rpc_*`).
    pub rpc: Arc<rim_runtime::cluster::RpcMetrics>,
    /// HTTPS handshakes and certificate reloads (`rim_tls_*`).
    pub tls: Arc<rim_runtime::tls::TlsMetrics>,
    /// Redis calls retried, by reason (`rim_logic_redis_retries_total`).
    pub redis_retries: Arc<rim_runtime::redis_conn::RetryCounts>,
    /// Pushes accepted, by kind.
    pub push_keys: Counter,
    /// See `push_keys`.
    pub push_mids: Counter,
    /// See `push_keys`.
    pub push_room: Counter,
    /// See `push_keys`.
    pub push_all: Counter,
    /// Pushes refused because Redis failed.
    pub push_refused: Counter,
    /// Pushes refused because a push stream held `stream.max_backlog` entries.
    pub push_backlog_full: Counter,
    /// Pushes recorded in a room's or users' history.
    pub history_recorded: Counter,
    /// History reads through the HTTP API.
    pub history_reads_http: Counter,
    /// History reads for sessions catching up (offline messages, recovery).
    pub history_reads_catch_up: Counter,
    /// Connects that found offline messages waiting for the device.
    pub offline_waiting: Counter,
    /// HTTP responses by status (index into `STATUSES`, last = other).
    http: [Counter; STATUSES.len() + 1],
    /// Sessions registered.
    pub connects: Counter,
    /// Connects refused (auth or bad request).
    pub connects_refused: Counter,
    /// Sessions unregistered.
    pub disconnects: Counter,
    /// Kick jobs queued for sessions replaced on another comet.
    pub kicks: Counter,
    /// Expired comets removed by the reaper.
    pub nodes_reaped: Counter,
    /// Upstream messages accepted, by target.
    pub msgs_room: Counter,
    /// See `msgs_room`.
    pub msgs_mid: Counter,
    /// Upstream messages refused, by reason (index into `REFUSALS`).
    msgs_refused: [Counter; REFUSALS.len()],
    /// Presence events (op 24) queued.
    pub presence_events: Counter,
    /// Presence events that could not be queued (Redis failed after the membership change).
    pub presence_failed: Counter,
    /// Webhook forwards queued for a worker.
    pub webhook_queued: Counter,
    /// Webhook forwards dropped because the queue was full.
    pub webhook_dropped: Counter,
    /// Webhook forwards that failed after all retries (or got a 4xx).
    pub webhook_failures: Counter,
    /// Webhook answers (or single replies in them) that could not be used.
    pub webhook_bad_replies: Counter,
    /// Bot replies queued as pushes.
    pub webhook_replies: Counter,
    /// Room permission checks by action (join, post) and outcome (allowed, refused,
    /// unavailable: the room hook failed).
    room_checks: [[Counter; 3]; 2],
    /// Connects refused by `session.max_per_mid`.
    pub sessions_per_mid_refused: Counter,
    /// Push requests refused by `push.rate_per_sec`.
    pub push_rate_limited: Counter,
    /// Token refreshes (op 22) accepted.
    pub token_refreshes: Counter,
    /// Token refreshes refused.
    pub token_refreshes_refused: Counter,
}

/// Outcomes of a room check, as metric labels.
const ROOM_CHECK_RESULTS: [&str; 3] = ["allowed", "refused", "unavailable"];

/// Why an upstream message was refused (the `LogicError` variant), as metric labels.
const REFUSALS: [&str; 6] = [
    "bad_request",
    "unauthorized",
    "forbidden",
    "offline",
    "unavailable",
    "internal",
];

impl Metrics {
    /// Counts one HTTP response.
    pub fn http_response(&self, status: u16) {
        let idx = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        if let Some(c) = self.http.get(idx) {
            c.inc();
        }
    }

    /// Counts one refused upstream message under its reason.
    pub fn msg_refused(&self, e: &rim_proto::rpc::LogicError) {
        use rim_proto::rpc::LogicError as E;
        let idx = match e {
            E::BadRequest(_) => 0,
            E::Unauthorized(_) => 1,
            E::Forbidden(_) => 2,
            E::Offline(_) => 3,
            E::Unavailable(_) => 4,
            E::Internal(_) => 5,
        };
        if let Some(c) = self.msgs_refused.get(idx) {
            c.inc();
        }
    }

    /// Counts one room permission check.
    pub fn room_check(
        &self,
        action: crate::room_policy::Action,
        r: &Result<(), rim_proto::rpc::LogicError>,
    ) {
        let a = match action {
            crate::room_policy::Action::Join => 0,
            crate::room_policy::Action::Post => 1,
        };
        let o = match r {
            Ok(()) => 0,
            Err(rim_proto::rpc::LogicError::Unavailable(_)) => 2,
            Err(_) => 1,
        };
        self.room_checks[a][o].inc();
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let statuses: Vec<String> = STATUSES.iter().map(|s| s.to_string()).collect();
        let mut http: Vec<(&str, u64)> = statuses
            .iter()
            .zip(&self.http)
            .map(|(s, c)| (s.as_str(), c.get()))
            .collect();
        http.push(("other", self.http[STATUSES.len()].get()));
        let refused: Vec<(&str, u64)> = REFUSALS
            .iter()
            .zip(&self.msgs_refused)
            .map(|(r, c)| (*r, c.get()))
            .collect();
        let checks: Vec<Vec<(&str, u64)>> = self
            .room_checks
            .iter()
            .map(|per| {
                ROOM_CHECK_RESULTS
                    .iter()
                    .zip(per)
                    .map(|(r, c)| (*r, c.get()))
                    .collect()
            })
            .collect();
        Exposition::new()
            .labeled_counter(
                "rim_logic_pushes_accepted_total",
                "Pushes durably queued, by kind.",
                "kind",
                &[
                    ("keys", self.push_keys.get()),
                    ("mids", self.push_mids.get()),
                    ("room", self.push_room.get()),
                    ("all", self.push_all.get()),
                ],
            )
            .counter(
                "rim_logic_pushes_refused_total",
                "Pushes refused because Redis could not take them.",
                self.push_refused.get(),
            )
            .counter(
                "rim_logic_push_backlog_full_total",
                "Pushes refused because a push stream held stream.max_backlog entries (job behind).",
                self.push_backlog_full.get(),
            )
            .counter(
                "rim_logic_history_recorded_total",
                "Pushes recorded in a room's or users' history.",
                self.history_recorded.get(),
            )
            .labeled_counter(
                "rim_logic_history_reads_total",
                "History reads, by who asked.",
                "by",
                &[
                    ("http", self.history_reads_http.get()),
                    ("catch_up", self.history_reads_catch_up.get()),
                ],
            )
            .counter(
                "rim_logic_offline_waiting_total",
                "Connects of a device that had messages waiting in its user's history.",
                self.offline_waiting.get(),
            )
            .labeled_counter(
                "rim_logic_http_responses_total",
                "HTTP responses by status.",
                "status",
                &http,
            )
            .counter(
                "rim_logic_connects_total",
                "Sessions registered.",
                self.connects.get(),
            )
            .counter(
                "rim_logic_connects_refused_total",
                "Session registrations refused.",
                self.connects_refused.get(),
            )
            .counter(
                "rim_logic_disconnects_total",
                "Sessions unregistered.",
                self.disconnects.get(),
            )
            .counter(
                "rim_logic_kicks_total",
                "Sessions replaced on another comet.",
                self.kicks.get(),
            )
            .counter(
                "rim_logic_nodes_reaped_total",
                "Expired comets removed.",
                self.nodes_reaped.get(),
            )
            .labeled_counter(
                "rim_logic_messages_accepted_total",
                "Upstream messages (SendMsg) queued, by target.",
                "target",
                &[("room", self.msgs_room.get()), ("mid", self.msgs_mid.get())],
            )
            .labeled_counter(
                "rim_logic_messages_refused_total",
                "Upstream messages refused, by reason.",
                "reason",
                &refused,
            )
            .counter(
                "rim_logic_presence_events_total",
                "Room join/leave events (op 24) queued.",
                self.presence_events.get(),
            )
            .counter(
                "rim_logic_presence_failed_total",
                "Room join/leave events that could not be queued.",
                self.presence_failed.get(),
            )
            .counter(
                "rim_logic_webhook_queued_total",
                "Upstream messages handed to the webhook workers.",
                self.webhook_queued.get(),
            )
            .counter(
                "rim_logic_webhook_dropped_total",
                "Upstream messages not forwarded because the webhook queue was full.",
                self.webhook_dropped.get(),
            )
            .counter(
                "rim_logic_webhook_failures_total",
                "Webhook forwards that failed after all retries.",
                self.webhook_failures.get(),
            )
            .counter(
                "rim_logic_webhook_bad_replies_total",
                "Webhook answers or replies that could not be used.",
                self.webhook_bad_replies.get(),
            )
            .counter(
                "rim_logic_webhook_replies_total",
                "Bot replies queued as pushes.",
                self.webhook_replies.get(),
            )
            .labeled_counter(
                "rim_logic_room_join_checks_total",
                "Room join permission checks, by result (unavailable: the room hook failed).",
                "result",
                &checks[0],
            )
            .labeled_counter(
                "rim_logic_room_post_checks_total",
                "Room post permission checks, by result (unavailable: the room hook failed).",
                "result",
                &checks[1],
            )
            .labeled_counter(
                "rim_logic_redis_retries_total",
                "Redis calls retried within redis.timeout_ms, by reason (moved, ask, tryagain, \
                 clusterdown: cluster redirects and failovers; io: connection lost; readonly, \
                 masterdown, sentinel: a primary changed; loading: a Redis loading its data; \
                 noreplicas: too few replicas for WAIT).",
                "reason",
                &self.redis_retries.samples(),
            )
            .labeled_counter(
                "rim_logic_limit_refused_total",
                "Requests refused by a limit: sessions_per_mid (session.max_per_mid, at Auth), \
                 push_rate (push.rate_per_sec, HTTP 429).",
                "limit",
                &[
                    ("sessions_per_mid", self.sessions_per_mid_refused.get()),
                    ("push_rate", self.push_rate_limited.get()),
                ],
            )
            .counter(
                "rim_logic_token_refreshes_total",
                "Fresh tokens (op 22) accepted for live sessions.",
                self.token_refreshes.get(),
            )
            .counter(
                "rim_logic_token_refreshes_refused_total",
                "Fresh tokens (op 22) refused.",
                self.token_refreshes_refused.get(),
            )
            .finish()
    }
}

/// What `/readyz` and `/metrics` read.
pub struct Ops {
    /// Redis handle for readiness.
    pub store: Stores,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl OpsSource for Ops {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        // Readiness must answer fast even when Redis is black-holed.
        self.store
            .health
            .ping(std::time::Duration::from_millis(500))
    }

    fn metrics(&self) -> String {
        self.metrics.render() + &self.metrics.rpc.render() + &self.metrics.tls.render()
    }
}
