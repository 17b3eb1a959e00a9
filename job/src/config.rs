//! The job tier's configuration: what `config/job.toml` and `RIM_JOB__…` variables may set.
//!
//! Every field has a default so an empty file (or none) gives a working local worker; `validate`
//! names the first field at fault so `rim-job` can exit 64 with a useful message.

use std::time::Duration;

pub use rim_runtime::cluster::ClusterConfig;
pub use rim_runtime::redis::RedisConfig;
use rim_runtime::settings::{SettingsError, Validate, positive, socket_addr};
use serde::Deserialize;

/// Complete job configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Consumer name in the stream group and holder id of leases. Empty = `hostname-pid-random`,
    /// unique per process (two processes must never share one: leases would be confused).
    pub worker_id: String,
    /// Listen addresses.
    pub listen: ListenConfig,
    /// Redis connection.
    pub redis: RedisConfig,
    /// Push stream consumption.
    pub stream: StreamConfig,
    /// Room message batching.
    pub room_batch: RoomBatchConfig,
    /// Partition leases.
    pub lease: LeaseConfig,
    /// Delivery to comets.
    pub delivery: DeliveryConfig,
    /// Comet registry cache.
    pub registry: RegistryConfig,
    /// Shared secret and bounds of internal RPC (the links to comets).
    pub cluster: ClusterConfig,
    /// How long shutdown waits for in-flight batches, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// `tracing` filter used when `RUST_LOG` is unset.
    pub log_level: String,
    /// JSON log lines instead of human-readable ones.
    pub log_json: bool,
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// Ops HTTP (`/healthz`, `/readyz`, `/metrics`).
    pub http: String,
    /// Longest a request's headers may take to arrive (ms); a slower socket is closed.
    pub header_timeout_ms: u64,
}

/// Push stream consumption.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Number of push partitions; must equal logic's (checked against `rim:meta:partitions`).
    pub partitions: u16,
    /// Entries read (and delivered as one batch) per `XREADGROUP` / `XAUTOCLAIM`.
    pub batch_max: usize,
    /// How long one `XREADGROUP` blocks waiting for new entries, in milliseconds.
    pub block_ms: u64,
    /// How often an idle partition checks for entries pending for this worker that it is not
    /// delivering (a read whose reply was lost unnoticed), in milliseconds; found ones are
    /// replayed before newer entries.
    pub pending_check_ms: u64,
}

/// Room message batching: a batch that holds room pushes waits a little for more, so a burst of
/// room messages reaches each comet in one RPC and each member in one WebSocket message.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomBatchConfig {
    /// Stop waiting once one room has this many messages in the batch.
    pub max: usize,
    /// Longest wait for more messages after the first room push, in milliseconds (0 = no waiting:
    /// only what is already queued is batched).
    pub linger_ms: u64,
}

impl Default for RoomBatchConfig {
    fn default() -> Self {
        RoomBatchConfig {
            max: 64,
            linger_ms: 10,
        }
    }
}

/// Partition leases.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// Lease and worker-liveness TTL in milliseconds: a dead worker's partitions are taken over within about this.
    pub ttl_ms: u64,
    /// How often leases and liveness are renewed and partitions rebalanced, in milliseconds.
    pub renew_ms: u64,
}

/// Delivery to comets.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Deadline of one `deliver` call (and of connecting to a comet), in milliseconds.
    pub rpc_timeout_ms: u64,
    /// First retry delay after a failed delivery, in milliseconds (doubles per attempt).
    pub retry_base_ms: u64,
    /// Largest retry delay, in milliseconds.
    pub retry_max_ms: u64,
    /// A comet that keeps failing this long without one success (while registered) is given up:
    /// its share of the batch is dropped and counted, and the batch acknowledged, so one
    /// unreachable comet cannot stall the partitions. In milliseconds.
    pub give_up_ms: u64,
}

/// Comet registry cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// How often the live comet list is re-read from Redis, in milliseconds.
    pub refresh_ms: u64,
    /// After Redis was unreadable, how long a comet that was live before stays live to job
    /// although its registration lapsed (it could not renew meanwhile), in milliseconds: at
    /// least two of the comets' `renew.interval_ms`.
    pub outage_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            worker_id: String::new(),
            listen: ListenConfig::default(),
            room_batch: RoomBatchConfig::default(),
            redis: RedisConfig::default(),
            stream: StreamConfig::default(),
            lease: LeaseConfig::default(),
            delivery: DeliveryConfig::default(),
            registry: RegistryConfig::default(),
            cluster: ClusterConfig::default(),
            shutdown_grace_ms: 10_000,
            log_level: "info".into(),
            log_json: false,
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            http: "127.0.0.1:3129".into(),
            header_timeout_ms: 10_000,
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            partitions: rim_proto::job::DEFAULT_PARTITIONS,
            batch_max: 256,
            block_ms: 1000,
            pending_check_ms: 5000,
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl_ms: 5000,
            renew_ms: 1500,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            rpc_timeout_ms: 5000,
            retry_base_ms: 50,
            retry_max_ms: 2000,
            give_up_ms: 30_000,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            refresh_ms: 1000,
            outage_grace_ms: 10_000,
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), SettingsError> {
        socket_addr("listen.http", &self.listen.http)?;
        positive("listen.header_timeout_ms", self.listen.header_timeout_ms)?;
        self.redis.validate()?;
        // job listens for no RPC, and the comets it dials are found at run time: an empty secret
        // is allowed (warned at start); a comet that has one refuses it.
        self.cluster.validate(&[])?;
        if self.worker_id.chars().any(char::is_whitespace) {
            return Err(SettingsError::invalid(
                "worker_id",
                "must not contain whitespace",
            ));
        }
        rim_runtime::redis::validate_partitions(self.stream.partitions)?;
        positive("stream.batch_max", self.stream.batch_max as u64)?;
        positive("room_batch.max", self.room_batch.max as u64)?;
        // BLOCK 0 means "forever" to Redis: the task could not notice shutdown or lease loss.
        positive("stream.block_ms", self.stream.block_ms)?;
        positive("stream.pending_check_ms", self.stream.pending_check_ms)?;
        positive("lease.renew_ms", self.lease.renew_ms)?;
        if self.lease.ttl_ms < self.lease.renew_ms.saturating_mul(2) {
            // One missed renewal must not already cost the lease.
            return Err(SettingsError::invalid(
                "lease.ttl_ms",
                "must be at least twice lease.renew_ms",
            ));
        }
        // A partition fenced mid-read leaves its blocking read running on Redis until it times
        // out; it must be over before the lease can lapse (at least renew_ms after the fence)
        // and another owner replays, or entries it takes would be replayed after newer ones.
        let longest_read = self.stream.block_ms.max(self.room_batch.linger_ms);
        if longest_read >= self.lease.renew_ms {
            let field = if self.stream.block_ms >= self.room_batch.linger_ms {
                "stream.block_ms"
            } else {
                "room_batch.linger_ms"
            };
            return Err(SettingsError::invalid(
                field,
                "must be less than lease.renew_ms (a fenced partition's last read must end before its lease can be taken over)",
            ));
        }
        positive("delivery.rpc_timeout_ms", self.delivery.rpc_timeout_ms)?;
        positive("delivery.retry_base_ms", self.delivery.retry_base_ms)?;
        if self.delivery.retry_max_ms < self.delivery.retry_base_ms {
            return Err(SettingsError::invalid(
                "delivery.retry_max_ms",
                "must be at least delivery.retry_base_ms",
            ));
        }
        positive("delivery.give_up_ms", self.delivery.give_up_ms)?;
        positive("registry.refresh_ms", self.registry.refresh_ms)?;
        Ok(())
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

impl Config {
    pub(crate) fn room_linger(&self) -> Duration {
        Duration::from_millis(self.room_batch.linger_ms)
    }
    pub(crate) fn block(&self) -> Duration {
        Duration::from_millis(self.stream.block_ms)
    }
    pub(crate) fn renew_every(&self) -> Duration {
        Duration::from_millis(self.lease.renew_ms)
    }
    /// How long a lease may go unconfirmed before its partition is stopped: one renewal period
    /// short of the TTL, so this worker stops before the lease can expire and be taken.
    pub(crate) fn fence_after(&self) -> Duration {
        Duration::from_millis(self.lease.ttl_ms.saturating_sub(self.lease.renew_ms))
    }
    pub(crate) fn pending_check(&self) -> Duration {
        Duration::from_millis(self.stream.pending_check_ms)
    }
    pub(crate) fn give_up(&self) -> Duration {
        Duration::from_millis(self.delivery.give_up_ms)
    }
    pub(crate) fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.delivery.rpc_timeout_ms)
    }
    pub(crate) fn retry_base(&self) -> Duration {
        Duration::from_millis(self.delivery.retry_base_ms)
    }
    pub(crate) fn retry_max(&self) -> Duration {
        Duration::from_millis(self.delivery.retry_max_ms)
    }
    pub(crate) fn refresh_every(&self) -> Duration {
        Duration::from_millis(self.registry.refresh_ms)
    }
    pub(crate) fn outage_grace(&self) -> Duration {
        Duration::from_millis(self.registry.outage_grace_ms)
    }
    pub(crate) fn grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The field `change` makes validation fail on, starting from the defaults.
    fn refused_field(change: impl FnOnce(&mut Config)) -> String {
        let mut c = Config::default();
        change(&mut c);
        c.validate().map(|()| String::new()).unwrap_or_else(|e| {
            let e = e.to_string();
            e.split(':').next().unwrap_or_default().to_string()
        })
    }

    #[test]
    fn defaults_are_valid_and_errors_name_fields() {
        Config::default().validate().expect("defaults valid");
        type Change = fn(&mut Config);
        let cases: [(&str, Change); 5] = [
            ("stream.block_ms", |c| c.stream.block_ms = c.lease.renew_ms),
            ("room_batch.linger_ms", |c| {
                c.room_batch.linger_ms = c.lease.renew_ms + 1
            }),
            ("lease.ttl_ms", |c| c.lease.ttl_ms = 1000),
            ("stream.partitions", |c| c.stream.partitions = 0),
            ("listen.http", |c| c.listen.http = "nope".into()),
        ];
        for (field, change) in cases {
            assert_eq!(refused_field(change), field);
        }
    }
}
