//! Logic's own counters (per instance), and the ops source behind `/readyz` and `/metrics`.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use rim_runtime::metrics::{Counter, Exposition};
use rim_runtime::ops::OpsSource;

use crate::store::Store;

/// HTTP statuses counted individually; anything else lands in "other".
const STATUSES: [u16; 7] = [200, 400, 401, 404, 405, 500, 503];

/// Every counter logic exports.
#[derive(Debug, Default)]
pub struct Metrics {
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
}

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

    /// Prometheus text.
    pub fn render(&self) -> String {
        let statuses: Vec<String> = STATUSES.iter().map(|s| s.to_string()).collect();
        let mut http: Vec<(&str, u64)> = statuses
            .iter()
            .zip(&self.http)
            .map(|(s, c)| (s.as_str(), c.get()))
            .collect();
        http.push(("other", self.http[STATUSES.len()].get()));
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
            .finish()
    }
}

/// What `/readyz` and `/metrics` read.
pub struct Ops {
    /// Redis handle for readiness.
    pub store: Store,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl OpsSource for Ops {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        async move {
            // Readiness must answer fast even when Redis is black-holed.
            match tokio::time::timeout(std::time::Duration::from_millis(500), self.store.ping())
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("redis unavailable: PING timed out".into()),
            }
        }
        .boxed()
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}
