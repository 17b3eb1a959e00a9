//! The job worker's counters and gauges (one set per instance), rendered as Prometheus text.

use rim_proto::rpc::DeliverReport;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use parking_lot::Mutex;
use rim_runtime::metrics::{Counter, Exposition, Gauge};

/// Figures of one job worker.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Internal RPC connections: handshake refusals, cap, frame limit (`rim_rpc_*`).
    pub rpc: std::sync::Arc<rim_runtime::cluster::RpcMetrics>,
    /// Stream entries taken from a partition (read or claimed), decodable or not.
    pub entries: Counter,
    /// Batches completed and acknowledged.
    pub batches: Counter,
    /// Entries acknowledged (`XACK`).
    pub acked: Counter,
    /// Delivery items confirmed by comets.
    pub deliveries: Counter,
    /// `deliver` calls that failed (connect, RPC error, timeout).
    pub rpc_failures: Counter,
    /// `deliver` calls re-sent after a failure.
    pub rpc_retries: Counter,
    /// Deliveries dropped because the comet was not live.
    pub dropped_comet_gone: Counter,
    /// Stream entries dropped because they could not be decoded.
    pub dropped_undecodable: Counter,
    /// Deliveries dropped because their comet kept failing for `delivery.give_up_ms`.
    pub dropped_comet_unreachable: Counter,
    /// Pending entries found trimmed away before delivery (`XAUTOCLAIM`'s deleted ids): should stay 0.
    pub dropped_trimmed: Counter,
    /// Entries left in each held partition's stream as of its last trim (`XLEN`), by partition.
    pub backlog: Mutex<BTreeMap<u16, u64>>,
    /// Partition leases held now.
    pub partitions_held: Gauge,
    /// Leases found taken by someone else at renewal.
    pub leases_lost: Counter,
    /// Redis commands that failed (each is retried).
    pub redis_errors: Counter,
    /// Session writes queued, as comets reported.
    pub queued: Counter,
    /// Duplicates comets suppressed.
    pub duplicates: Counter,
    /// Addressed keys comets did not hold.
    pub missing: Counter,
    /// Sessions comets closed as slow consumers.
    pub slow_closed: Counter,
}

impl Metrics {
    /// Adds one comet's confirmation to the totals.
    pub fn add_report(&self, report: &DeliverReport) {
        self.queued.add(report.queued);
        self.duplicates.add(report.duplicates);
        self.missing.add(report.missing);
        self.slow_closed.add(report.slow_closed);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let mut text = self.render_flat();
        // `Exposition` has no labeled gauge; the per-partition samples are written by hand.
        let backlog = self.backlog.lock();
        let name = "rim_job_partition_backlog";
        let _ = writeln!(
            text,
            "# HELP {name} Entries left in a held partition's stream (XLEN after its last trim).\n# TYPE {name} gauge"
        );
        for (p, n) in backlog.iter() {
            let _ = writeln!(text, "{name}{{partition=\"{p}\"}} {n}");
        }
        text
    }

    fn render_flat(&self) -> String {
        Exposition::new()
            .counter(
                "rim_job_entries_total",
                "Stream entries taken.",
                self.entries.get(),
            )
            .counter(
                "rim_job_batches_total",
                "Batches acknowledged.",
                self.batches.get(),
            )
            .counter(
                "rim_job_acked_total",
                "Entries acknowledged.",
                self.acked.get(),
            )
            .counter(
                "rim_job_deliveries_total",
                "Delivery items confirmed by comets.",
                self.deliveries.get(),
            )
            .counter(
                "rim_job_rpc_failures_total",
                "Failed deliver calls.",
                self.rpc_failures.get(),
            )
            .counter(
                "rim_job_rpc_retries_total",
                "Re-sent deliver calls.",
                self.rpc_retries.get(),
            )
            .labeled_counter(
                "rim_job_dropped_total",
                "Deliveries or entries dropped, by reason.",
                "reason",
                &[
                    ("comet_gone", self.dropped_comet_gone.get()),
                    ("undecodable", self.dropped_undecodable.get()),
                    ("comet_unreachable", self.dropped_comet_unreachable.get()),
                    ("trimmed", self.dropped_trimmed.get()),
                ],
            )
            .gauge(
                "rim_job_partitions_held",
                "Partition leases held.",
                self.partitions_held.get(),
            )
            .counter(
                "rim_job_leases_lost_total",
                "Leases lost.",
                self.leases_lost.get(),
            )
            .counter(
                "rim_job_redis_errors_total",
                "Failed Redis commands.",
                self.redis_errors.get(),
            )
            .counter(
                "rim_job_queued_total",
                "Session writes queued by comets.",
                self.queued.get(),
            )
            .counter(
                "rim_job_duplicates_total",
                "Duplicates suppressed by comets.",
                self.duplicates.get(),
            )
            .counter(
                "rim_job_missing_total",
                "Keys not found on comets.",
                self.missing.get(),
            )
            .counter(
                "rim_job_slow_closed_total",
                "Sessions closed as slow consumers.",
                self.slow_closed.get(),
            )
            .finish()
    }
}
