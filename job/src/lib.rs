//! rim's job tier: consumes the partitioned push streams, routes each push to the comets that
//! hold its recipients, and acknowledges it only after they confirmed.
//!
//! * [`config`]: what the operator can set.
//! * `lease`: worker liveness and partition leases (which partitions this worker reads).
//! * `partition`: one partition's consumer (replay pending, read, deliver, ack, trim).
//! * [`route`]: pure routing of a batch into per-comet ordered delivery lists.
//! * [`registry`]: the live comet cache and its RPC links.
//! * [`store`]: every Redis key, command and script of the tier, behind typed traits (with
//!   in-memory implementations for unit tests).
//! * [`metrics`]: counters and gauges for `/metrics`.
//!
//! See docs/architecture.md for why it works this way.
#![forbid(unsafe_code)]

pub mod config;
mod lease;
pub mod metrics;
mod partition;
pub mod registry;
pub mod route;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use rim_runtime::ops::OpsSource;
use rim_runtime::redis::RedisStartError;
use rim_runtime::settings::{SettingsError, Validate};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use lease::fair_share;
use metrics::Metrics;
use registry::Registry;
use store::{RedisBackend, Stores};

/// Sockets the tier serves on, bound by the caller (port 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    /// Ops HTTP: `/healthz`, `/readyz`, `/metrics`.
    pub http: tokio::net::TcpListener,
}

/// Why the job tier could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid or disagrees with the cluster (names the field).
    #[error("config: {0}")]
    Config(#[from] SettingsError),
    /// Redis refused something at start that retrying cannot fix (a partition count that
    /// disagrees with the cluster's names `stream.partitions`).
    #[error(transparent)]
    Redis(#[from] RedisStartError),
    /// The ops HTTP server failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A `[cluster]` TLS file could not be loaded.
    #[error(transparent)]
    Tls(#[from] rim_runtime::tls::TlsError),
}

/// State shared by the lease manager and every partition task.
pub(crate) struct Ctx {
    pub(crate) cfg: Config,
    pub(crate) worker_id: String,
    pub(crate) stores: Stores,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    /// Comet → when its current run of failed deliveries began (removed on its next success).
    /// Shared by all partitions, so once a comet has failed for `delivery.give_up_ms` every
    /// batch gives it up after one more failed attempt instead of waiting the whole time again.
    pub(crate) failing_since:
        parking_lot::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
}

impl Ctx {
    pub(crate) fn new(
        cfg: Config,
        worker_id: String,
        stores: Stores,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Ctx {
            cfg,
            worker_id,
            stores,
            registry,
            metrics,
            failing_since: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

struct Ops {
    redis: RedisBackend,
    metrics: Arc<Metrics>,
}

impl OpsSource for Ops {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        self.redis.ready().boxed()
    }

    fn metrics(&self) -> String {
        self.metrics.render() + &self.metrics.rpc.render()
    }
}

/// A process-unique worker id: `hostname-pid-random`.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "job".into());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &rand[..8])
}

/// Runs a job worker until `shutdown`; then finishes and acknowledges in-flight batches, releases
/// its leases and leaves `rim:jobs` (bounded by `shutdown_grace_ms`). Errors only at start.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    let worker_id = if config.worker_id.is_empty() {
        default_worker_id()
    } else {
        config.worker_id.clone()
    };
    let Some(redis) = RedisBackend::connect(&config, &shutdown).await? else {
        return Ok(());
    };
    let stores = redis.stores();

    let metrics = Arc::new(Metrics::default());
    // job only dials RPC: of [cluster]'s TLS settings only tls_ca_file applies.
    let rpc_tls = config.cluster.rpc_tls(Arc::default())?;
    let cluster = rim_runtime::cluster::Cluster::with_tls(
        &config.cluster,
        "job",
        metrics.rpc.clone(),
        rpc_tls,
    );
    let registry = Arc::new(Registry::new(
        stores.directory.clone(),
        config.rpc_timeout(),
        cluster,
        config.outage_grace(),
    ));
    if let Err(e) = registry.refresh().await {
        tracing::warn!(error = %e, "initial registry read failed; retrying in the background");
    }
    tracing::info!(worker = %worker_id, partitions = config.stream.partitions, "job worker starting");

    let tracker = TaskTracker::new();
    let ops = Arc::new(Ops {
        redis,
        metrics: metrics.clone(),
    });
    let opts = rim_runtime::http::ServeOptions {
        header_timeout: Duration::from_millis(config.listen.header_timeout_ms),
        grace: config.grace(),
    };
    tracker.spawn(rim_runtime::ops::serve(
        listeners.http,
        ops,
        shutdown.clone(),
        opts,
    ));

    let ctx = Arc::new(Ctx::new(
        config.clone(),
        worker_id,
        stores,
        registry.clone(),
        metrics,
    ));

    // The registry must stay fresh while partitions drain, so it stops after the lease manager.
    let registry_stop = CancellationToken::new();
    {
        let stop = registry_stop.clone();
        let every = config.refresh_every();
        let metrics = ctx.metrics.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = registry.refresh().await {
                    metrics.redis_errors.inc();
                    tracing::warn!(error = %e, "registry refresh failed; keeping the cached view");
                }
            }
        });
    }
    {
        let ctx = ctx.clone();
        let stop = shutdown.clone();
        let inner = tracker.clone();
        tracker.spawn(async move {
            lease::run(ctx, stop, inner).await;
            registry_stop.cancel();
        });
    }

    shutdown.cancelled().await;
    rim_runtime::shutdown::drain(&tracker, config.grace(), "job").await;
    Ok(())
}
