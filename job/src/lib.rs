//! rim's job tier: consumes the partitioned push streams, routes each push to the comets that
//! hold its recipients, and acknowledges it only after they confirmed.
//!
//! * [`config`]: what the operator can set.
//! * `lease`: worker liveness and partition leases (which partitions this worker reads).
//! * `partition`: one partition's consumer (replay pending, read, deliver, ack, trim).
//! * [`route`]: pure routing of a batch into per-comet ordered delivery lists.
//! * [`registry`]: the live comet cache and its RPC links.
//! * [`metrics`], [`backoff`]: figures and retry delays.
//!
//! See docs/architecture.md for why it works this way.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
mod lease;
pub mod metrics;
mod partition;
pub mod registry;
pub mod route;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use rim_proto::keys;
use rim_runtime::ops::OpsSource;
use rim_runtime::settings::{SettingsError, Validate};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use lease::fair_share;
use metrics::Metrics;
use registry::Registry;

/// Sockets the tier serves on, bound by the caller (port 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    /// Ops HTTP: `/healthz`, `/readyz`, `/metrics`.
    pub http: tokio::net::TcpListener,
}

/// Why the job tier could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The configuration is invalid or disagrees with the cluster (names the field).
    #[error("config: {0}")]
    Config(#[from] SettingsError),
    /// Redis refused something at start that retrying cannot fix.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The ops HTTP server failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// State shared by the lease manager and every partition task.
pub(crate) struct Ctx {
    pub(crate) cfg: Config,
    pub(crate) worker_id: String,
    /// For dedicated (blocking) connections.
    pub(crate) client: redis::Client,
    /// Auto-reconnecting connection for ordinary commands.
    pub(crate) redis: ConnectionManager,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    /// Comet → when its current run of failed deliveries began (removed on its next success).
    /// Shared by all partitions, so once a comet has failed for `delivery.give_up_ms` every
    /// batch gives it up after one more failed attempt instead of waiting the whole time again.
    pub(crate) failing_since:
        parking_lot::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

struct Ops {
    redis: ConnectionManager,
    metrics: Arc<Metrics>,
}

impl OpsSource for Ops {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        let mut redis = self.redis.clone();
        async move {
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut redis);
            match tokio::time::timeout(Duration::from_secs(2), ping).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("redis: {e}")),
                Err(_) => Err("redis: ping timed out".into()),
            }
        }
        .boxed()
    }

    fn metrics(&self) -> String {
        self.metrics.render()
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

/// Connects the command connection, retrying until it works or `shutdown` (`None`).
async fn connect(
    client: &redis::Client,
    shutdown: &CancellationToken,
) -> Option<ConnectionManager> {
    let mut bo = backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let cfg = ConnectionManagerConfig::new()
            // XAUTOCLAIM of a large batch can be megabytes: allow more than the 500 ms default.
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(2)));
        match client.get_connection_manager_with_config(cfg).await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to redis; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(bo.next_delay()) => {}
                }
            }
        }
    }
}

/// `SET rim:meta:partitions P NX`, then compares: every tier must agree on the partition count.
async fn check_partitions(
    redis: &mut ConnectionManager,
    partitions: u16,
    shutdown: &CancellationToken,
) -> Result<(), JobError> {
    let mut bo = backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let r: redis::RedisResult<String> = redis::pipe()
            .cmd("SET")
            .arg(keys::META_PARTITIONS)
            .arg(partitions)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(keys::META_PARTITIONS)
            .query_async::<(String,)>(redis)
            .await
            .map(|(v,)| v);
        match r {
            Ok(v) if v.trim().parse::<u16>().ok() == Some(partitions) => return Ok(()),
            Ok(v) => {
                return Err(SettingsError::invalid(
                    "stream.partitions",
                    format!(
                        "configured {partitions} but the cluster uses {v:?} ({})",
                        keys::META_PARTITIONS
                    ),
                )
                .into());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check partition count; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(bo.next_delay()) => {}
                }
            }
        }
    }
}

/// Runs a job worker until `shutdown`; then finishes and acknowledges in-flight batches, releases
/// its leases and leaves `rim:jobs` (bounded by `shutdown_grace_ms`). Errors only at start.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), JobError> {
    config.validate()?;
    let worker_id = if config.worker_id.is_empty() {
        default_worker_id()
    } else {
        config.worker_id.clone()
    };
    let client = redis::Client::open(config.redis.url.as_str())?;
    let Some(mut redis) = connect(&client, &shutdown).await else {
        return Ok(());
    };
    check_partitions(&mut redis, config.stream.partitions, &shutdown).await?;

    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(Registry::new(config.rpc_timeout()));
    if let Err(e) = registry.refresh(&mut redis).await {
        tracing::warn!(error = %e, "initial registry read failed; retrying in the background");
    }
    tracing::info!(worker = %worker_id, partitions = config.stream.partitions, "job worker starting");

    let tracker = TaskTracker::new();
    let ops = Arc::new(Ops {
        redis: redis.clone(),
        metrics: metrics.clone(),
    });
    let app = rim_runtime::ops::router(ops);
    let http_stop = shutdown.clone();
    tracker.spawn(async move {
        // Ops routes only (probes and scrapes): a small cap and short idle limits suffice.
        let http = rim_runtime::listener::GuardedListener::new(
            listeners.http,
            rim_runtime::listener::Limits {
                max_connections: 64,
                first_bytes: std::time::Duration::from_secs(10),
                read_idle: Some(std::time::Duration::from_secs(60)),
            },
        );
        let serve = axum::serve(http, app)
            .with_graceful_shutdown(async move { http_stop.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "ops http server failed");
        }
    });

    let ctx = Arc::new(Ctx {
        cfg: config.clone(),
        worker_id,
        client,
        redis: redis.clone(),
        registry: registry.clone(),
        metrics,
        failing_since: parking_lot::Mutex::new(std::collections::HashMap::new()),
    });

    // The registry must stay fresh while partitions drain, so it stops after the lease manager.
    let registry_stop = CancellationToken::new();
    {
        let stop = registry_stop.clone();
        let mut redis = redis.clone();
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
                if let Err(e) = registry.refresh(&mut redis).await {
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
