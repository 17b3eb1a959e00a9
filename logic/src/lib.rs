//! rim's logic tier: the goim-compatible HTTP API and `LogicRpc`, and the only writer of
//! sessions, nodes and push jobs in Redis (see docs/architecture.md).
//!
//! * [`config`]: configuration and validation.
//! * [`auth`]: client tokens and the push bearer secret.
//! * `store`: the Redis connection, every call time-bounded.
//! * `publish`: pushes → partitioned stream entries.
//! * `registry`: sessions and comets in Redis, the cached cluster view.
//! * `online`: online counts and comet placement.
//! * `chat`: upstream messages under the send policy, presence events.
//! * `directory`: room member and user session listings, the demo's dev sign-in.
//! * `webhook`: forwarding messages to a bot and publishing its replies.
//! * `http`, `rpc`: the two front doors; `reaper`: removal of dead comets.
#![forbid(unsafe_code)]

pub mod auth;
mod chat;
pub mod config;
mod directory;
mod http;
mod metrics;
mod online;
mod publish;
mod reaper;
mod registry;
mod rpc;
mod store;
mod webhook;

use std::future::IntoFuture;
use std::sync::Arc;

use futures::StreamExt;
use rim_proto::keys;
use rim_proto::rpc::LogicRpc;
use std::time::Duration;
use tarpc::server::{BaseChannel, Channel};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::issue_token;
pub use config::Config;
pub use http::{ApiError, Query};

use metrics::Metrics;
use registry::ViewCache;
use store::Store;

/// Most requests one `LogicRpc` connection may have running at once (a comet's sessions share
/// its one connection, so this is generous; past it a request is answered with an error).
const MAX_RPC_IN_FLIGHT_PER_CHANNEL: usize = 1_000;

/// The two already-bound listeners logic serves on.
#[derive(Debug)]
pub struct Listeners {
    /// HTTP API.
    pub http: tokio::net::TcpListener,
    /// `LogicRpc`.
    pub rpc: tokio::net::TcpListener,
}

/// Why logic could not start (or stopped abnormally).
#[derive(Debug, thiserror::Error)]
pub enum LogicError {
    /// Redis unreachable at start.
    #[error("redis at {url}: {reason}")]
    Redis {
        /// Configured URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The partition count in Redis differs from this config.
    #[error(
        "stream.partitions is {configured} but the cluster uses {existing} (rim:meta:partitions); \
         every logic and job must use the same count"
    )]
    PartitionMismatch {
        /// From config.
        configured: u16,
        /// Found in Redis.
        existing: String,
    },
    /// The webhook client could not be built.
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
}

/// State shared by the HTTP handlers, RPC server and reaper.
pub(crate) struct App {
    pub(crate) config: Config,
    pub(crate) store: Store,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) view: ViewCache,
    /// The bot webhook's queue, when `[webhook]` is on.
    pub(crate) webhook: Option<webhook::Webhook>,
}

/// Checks (or records, when first) the cluster's partition count.
/// Connects to Redis and checks the partition count, retrying with backoff while Redis is
/// unreachable. `None` when shutdown came first; a partition mismatch is an error at once.
async fn connect_redis(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<Store>, LogicError> {
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let store = Store::connect(&config.redis.url, config.redis_timeout())
                .await
                .map_err(|e| LogicError::Redis {
                    url: config.redis.url.clone(),
                    reason: e.to_string(),
                })?;
            guard_partitions(&store, config.stream.partitions).await?;
            Ok(store)
        };
        match attempt.await {
            Ok(store) => return Ok(Some(store)),
            Err(LogicError::Redis { reason, .. }) => {
                tracing::warn!(url = %config.redis.url, error = %reason, retry_in = ?delay, "redis unreachable; waiting for it before serving");
            }
            Err(other) => return Err(other),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn guard_partitions(store: &Store, partitions: u16) -> Result<(), LogicError> {
    let redis_err = |e: store::StoreError| LogicError::Redis {
        url: String::new(),
        reason: e.to_string(),
    };
    let _: redis::Value = store
        .cmd(
            redis::cmd("SET")
                .arg(keys::META_PARTITIONS)
                .arg(partitions)
                .arg("NX"),
        )
        .await
        .map_err(redis_err)?;
    let existing: Option<String> = store
        .cmd(redis::cmd("GET").arg(keys::META_PARTITIONS))
        .await
        .map_err(redis_err)?;
    let existing = existing.unwrap_or_default();
    if existing.trim().parse::<u16>().ok() != Some(partitions) {
        return Err(LogicError::PartitionMismatch {
            configured: partitions,
            existing,
        });
    }
    Ok(())
}

/// Runs logic until `shutdown` is cancelled and in-flight work drained (bounded by
/// `shutdown_grace_ms`), or returns early on a fatal start error.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), LogicError> {
    // Like job, logic waits for Redis rather than exiting when it starts first: an operator's
    // start order (or a Redis restart under systemd) must not need a restart loop.
    let Some(store) = connect_redis(&config, &shutdown).await? else {
        return Ok(());
    };
    let grace = config.shutdown_grace();
    let (hook, hook_workers) = match webhook::setup(&config.webhook)? {
        Some((h, w)) => (Some(h), Some(w)),
        None => (None, None),
    };
    let app = Arc::new(App {
        config,
        store,
        metrics: Arc::new(Metrics::default()),
        view: ViewCache::default(),
        webhook: hook,
    });
    let tracker = TaskTracker::new();
    if let Some(w) = hook_workers {
        webhook::spawn(app.clone(), w, &tracker, shutdown.clone());
    }

    if let (Ok(h), Ok(r)) = (listeners.http.local_addr(), listeners.rpc.local_addr()) {
        tracing::info!(http = %h, rpc = %r, "logic serving");
    }
    let server = rpc::LogicServer(app.clone());
    tracker.spawn(rim_runtime::rpc::accept_loop(
        listeners.rpc,
        "logic",
        shutdown.clone(),
        tracker.clone(),
        move |stream| {
            // One misbehaving peer must not queue unbounded work: requests past the limit on
            // a channel are answered with an error instead of being run.
            BaseChannel::with_defaults(rim_proto::rpc::transport(stream))
                .max_concurrent_requests(MAX_RPC_IN_FLIGHT_PER_CHANNEL)
                .execute(server.clone().serve())
                .for_each(|f| async {
                    tokio::spawn(f);
                })
        },
    ));
    // Started once RPC is being served; its first pass waits a node TTL (see reaper::run).
    tracker.spawn(reaper::run(app.clone(), shutdown.clone()));

    let idle = Duration::from_millis(app.config.listen.idle_timeout_ms);
    let http_listener = rim_runtime::listener::GuardedListener::new(
        listeners.http,
        rim_runtime::listener::Limits {
            max_connections: app.config.listen.max_connections,
            first_bytes: idle,
            read_idle: Some(idle),
        },
    );
    let serve = axum::serve(http_listener, http::router(app.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let mut serve = std::pin::pin!(serve);
    let result = tokio::select! {
        r = &mut serve => r,
        () = shutdown.cancelled() => {
            // Graceful shutdown waits for every open request, and a client trickling a body
            // (or never reading its answer) would hold SIGTERM forever: bound it by the grace.
            match tokio::time::timeout(grace, &mut serve).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(?grace, "http requests still open after the grace period; closing them");
                    Ok(())
                }
            }
        }
    };
    // The HTTP server returns once shutdown began (or on a fatal error): stop the rest too.
    shutdown.cancel();
    rim_runtime::shutdown::drain(&tracker, grace, "logic").await;
    result.map_err(LogicError::Http)
}
