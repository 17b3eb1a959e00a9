//! rim's logic tier: the goim-compatible HTTP API and `LogicRpc`, and the only writer of
//! sessions, nodes and push jobs in Redis (see docs/architecture.md).
//!
//! * [`config`]: configuration and validation.
//! * [`auth`]: v1 client tokens and the push bearer secret; [`jwt`]: JWT client tokens.
//! * `store`: everything kept in Redis, behind typed store traits (and in memory for tests).
//! * `publish`: pushes → partitioned stream entries.
//! * `registry`: sessions and comets in Redis, the cached cluster view.
//! * `online`: online counts and comet placement.
//! * `chat`: upstream messages under the send policy, presence events.
//! * `history`: room and user histories: what is recorded, reads, offline positions.
//! * `directory`: room member and user session listings, the demo's dev sign-in.
//! * `webhook`: forwarding messages to a bot and publishing its replies.
//! * `room_policy`: who may join and post per room type, the room hook; `hook_answer`: capped
//!   reads of the hooks' answers.
//! * `http`, `rpc`: the two front doors; `reaper`: removal of dead comets.
#![forbid(unsafe_code)]

mod admin;
pub mod auth;
mod chat;
pub mod config;
mod directory;
mod history;
mod hook_answer;
mod http;
pub mod jwt;
mod metrics;
mod online;
mod publish;
mod reaper;
mod refusals;
mod registry;
mod room_policy;
mod rpc;
mod store;
mod webhook;

use std::sync::Arc;

use futures::StreamExt;
use rim_proto::rpc::LogicRpc;
use rim_runtime::redis::{Bounds, RedisStartError};
use rim_runtime::settings::Validate;
use rim_runtime::tls::{TlsServer, reload_on_sighup};
use std::time::Duration;
use tarpc::server::{BaseChannel, Channel};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::issue_token;
pub use config::Config;
pub use http::{ApiError, Query};

use metrics::Metrics;
use registry::ViewCache;
use store::{RedisConn, Stores};

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
pub enum RunError {
    /// The configuration is invalid (names the field).
    #[error("config: {0}")]
    Config(#[from] rim_runtime::settings::SettingsError),
    /// Redis refused something at start that retrying cannot fix (a partition count that
    /// disagrees with the cluster's names `stream.partitions`).
    #[error(transparent)]
    Redis(#[from] RedisStartError),
    /// The webhook client could not be built.
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    /// The room hook client could not be built.
    #[error(transparent)]
    RoomHook(#[from] room_policy::RoomHookError),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
    /// The `[tls]` certificate could not be loaded.
    #[error(transparent)]
    Tls(#[from] rim_runtime::tls::TlsError),
}

/// State shared by the HTTP handlers, RPC server and reaper.
pub(crate) struct App {
    pub(crate) config: Config,
    pub(crate) store: Stores,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) view: ViewCache,
    /// The bot webhook's queue, when `[webhook]` is on.
    pub(crate) webhook: Option<webhook::Webhook>,
    /// Checks client tokens (v1 and JWT), keys loaded from `[auth]` at start.
    pub(crate) tokens: jwt::Verifier,
    /// The client of `[room_hook]`, when set.
    pub(crate) room_hook: Option<room_policy::RoomHook>,
    /// `[rooms]` types whose joins logic must approve (see [`room_policy::guarded_room_types`]).
    pub(crate) guarded_room_types: Vec<String>,
    /// `push.rate_per_sec` for the push secret, when set.
    pub(crate) push_rate: Option<parking_lot::Mutex<rim_runtime::rate::TokenBucket>>,
    /// This instance's recent refusals, for the operator page.
    pub(crate) refusals: refusals::Refusals,
}

/// The push API's token bucket, when `push.rate_per_sec` is set.
fn push_rate(c: &config::PushConfig) -> Option<parking_lot::Mutex<rim_runtime::rate::TokenBucket>> {
    (c.rate_per_sec > 0).then(|| {
        let burst = if c.rate_burst == 0 {
            c.rate_per_sec
        } else {
            c.rate_burst
        };
        parking_lot::Mutex::new(rim_runtime::rate::TokenBucket::new(
            c.rate_per_sec,
            burst,
            tokio::time::Instant::now(),
        ))
    })
}

#[cfg(test)]
impl App {
    /// An app on in-memory stores, for unit tests of the domain rules.
    pub(crate) fn in_memory(config: Config) -> (Arc<App>, Arc<store::memory::Memory>) {
        let (store, memory) = Stores::memory();
        let tokens = jwt::Verifier::load(&config.auth).expect("test auth config loads");
        let push_rate = push_rate(&config.push);
        let guarded_room_types = room_policy::guarded_room_types(&config.rooms);
        let app = App {
            tokens,
            config,
            store,
            metrics: Arc::new(Metrics::default()),
            view: ViewCache::default(),
            webhook: None,
            room_hook: None,
            guarded_room_types,
            push_rate,
            refusals: refusals::Refusals::default(),
        };
        (Arc::new(app), memory)
    }
}

/// Runs logic until `shutdown` is cancelled and in-flight work drained (bounded by
/// `shutdown_grace_ms`), or returns early on a fatal start error.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    for warning in config.dev_conveniences() {
        tracing::warn!("{warning}");
    }
    // Like job, logic waits for Redis rather than exiting when it starts first: an operator's
    // start order (or a Redis restart under systemd) must not need a restart loop.
    let Some((_, conn)) = rim_runtime::redis::connect(
        &config.redis,
        Bounds::from_config(&config.redis),
        config.stream.partitions,
        &shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    let metrics = Metrics::default();
    let store = Stores::redis(RedisConn::new(
        conn,
        config.redis.timeout(),
        config.redis.wait_replicas,
        metrics.redis_retries.clone(),
    ));
    let grace = config.shutdown_grace();
    let (hook, hook_workers) = match webhook::setup(&config.webhook)? {
        Some((h, w)) => (Some(h), Some(w)),
        None => (None, None),
    };
    let tokens = jwt::Verifier::load(&config.auth)?;
    let room_hook = room_policy::RoomHook::setup(&config.room_hook)?;
    let https = match config.tls.enabled() {
        true => Some(TlsServer::load(
            "tls",
            &config.tls.cert_file,
            &config.tls.key_file,
            metrics.tls.clone(),
        )?),
        false => None,
    };
    let app = Arc::new(App {
        tokens,
        room_hook,
        guarded_room_types: room_policy::guarded_room_types(&config.rooms),
        push_rate: push_rate(&config.push),
        config,
        store,
        metrics: Arc::new(metrics),
        view: ViewCache::default(),
        webhook: hook,
        refusals: refusals::Refusals::default(),
    });
    let tracker = TaskTracker::new();
    if let Some(w) = hook_workers {
        webhook::spawn(app.clone(), w, &tracker, shutdown.clone());
    }

    if let (Ok(h), Ok(r)) = (listeners.http.local_addr(), listeners.rpc.local_addr()) {
        tracing::info!(http = %h, rpc = %r, "logic serving");
    }
    let server = rpc::LogicServer(app.clone());
    let cfg = &app.config.cluster;
    let rpc_tls = cfg.rpc_tls(app.metrics.tls.clone())?;
    // Every certificate of this process reloads on SIGHUP: [tls] and [cluster] tls_cert_file.
    let reloadable: Vec<TlsServer> = https.iter().chain(&rpc_tls.server).cloned().collect();
    if let Some(reload) = reload_on_sighup(reloadable, shutdown.clone()) {
        tracker.spawn(reload);
    }
    let cluster =
        rim_runtime::cluster::Cluster::with_tls(cfg, "logic", app.metrics.rpc.clone(), rpc_tls);
    tracker.spawn(rim_runtime::rpc::accept_loop(
        listeners.rpc,
        "logic",
        cluster.clone(),
        shutdown.clone(),
        tracker.clone(),
        move |stream| {
            // One misbehaving peer must not queue unbounded work: requests past the limit on
            // a channel are answered with an error instead of being run.
            BaseChannel::with_defaults(cluster.transport(stream))
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
    let header_timeout = Duration::from_millis(app.config.listen.header_timeout_ms);
    let opts = rim_runtime::http::ServeOptions {
        header_timeout,
        grace,
    };
    let router = http::router(app.clone());
    let result = match https {
        None => rim_runtime::http::serve(http_listener, router, shutdown.clone(), opts).await,
        Some(server) => {
            // The handshake gets the header deadline too: a stalled one is closed.
            let acceptor = server.acceptor(&[b"http/1.1"], header_timeout)?;
            rim_runtime::http::serve_tls(http_listener, router, shutdown.clone(), opts, acceptor)
                .await
        }
    };
    // The HTTP server returns once shutdown began (or on a fatal error): stop the rest too.
    shutdown.cancel();
    rim_runtime::shutdown::drain(&tracker, grace, "logic").await;
    result.map_err(RunError::Http)
}
