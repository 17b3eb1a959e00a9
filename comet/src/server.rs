//! Wiring of one comet, and nothing else: builds the shared state ([`Ctx`]) and the logic client,
//! registers with logic, starts the tasks (renewal, paced worker, `CometRpc` server, TCP and HTTP
//! listeners, their TLS twins and the SIGHUP certificate reload), then on shutdown drains the
//! sessions and unregisters.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rim_proto::rpc::CometRpc;
use rim_runtime::cluster::{Cluster, RpcMetrics};
use rim_runtime::settings::SettingsError;
use rim_runtime::tls::{TlsMetrics, TlsServer, reload_on_sighup};
use tarpc::server::Channel;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::ctx::Ctx;
use crate::deliver::CometServer;
use crate::logic::LogicClient;
use crate::node::{Bound, Ops};
use crate::{Listeners, RunError};

/// See [`crate::run`].
pub(crate) async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    use rim_runtime::settings::Validate;
    config.validate()?;
    let addr = |l: &Option<tokio::net::TcpListener>| l.as_ref().map(|l| l.local_addr()).transpose();
    let bound = Bound {
        http: listeners.http.local_addr()?,
        tcp: addr(&listeners.tcp)?,
        wss: addr(&listeners.wss)?,
        tls: addr(&listeners.tls)?,
        rpc: listeners.rpc.local_addr()?,
    };
    let ops_addr = addr(&listeners.ops)?;
    let tls_metrics = Arc::new(TlsMetrics::default());
    let tls = if config.tls.enabled() {
        let t = &config.tls;
        Some(TlsServer::load(
            "tls",
            &t.cert_file,
            &t.key_file,
            tls_metrics.clone(),
        )?)
    } else {
        for (field, l) in [
            ("listen.wss", &listeners.wss),
            ("listen.tls", &listeners.tls),
        ] {
            if l.is_some() {
                return Err(
                    SettingsError::invalid(field, "needs [tls] cert_file and key_file").into(),
                );
            }
        }
        None
    };
    let node = crate::node::node_info(&config, &bound);
    // One `[cluster]` for both directions: CometRpc served to job, the link dialled to logic.
    let rpc_metrics = Arc::new(RpcMetrics::default());
    let rpc_tls = config.cluster.rpc_tls(tls_metrics.clone())?;
    // Every certificate of this process reloads on SIGHUP: [tls] and [cluster] tls_cert_file.
    let reloadable: Vec<TlsServer> = tls.iter().chain(&rpc_tls.server).cloned().collect();
    let cluster = Cluster::with_tls(&config.cluster, "comet", rpc_metrics.clone(), rpc_tls);
    let logic = Arc::new(LogicClient::new(&config, cluster.clone()));
    let tracker = TaskTracker::new();
    let (paced, paced_rx) = mpsc::channel(crate::deliver::PACED_QUEUE);
    let mut ctx = Ctx::new(
        config,
        logic,
        node,
        paced,
        shutdown.clone(),
        tracker.clone(),
    );
    ctx.metrics.rpc = rpc_metrics;
    ctx.metrics.tls = tls_metrics;
    let ctx = Arc::new(ctx);
    tracing::info!(
        server = %ctx.cfg.server_id,
        http = %bound.http,
        tcp = ?bound.tcp,
        wss = ?bound.wss,
        tls = ?bound.tls,
        rpc = %bound.rpc,
        ops = ?ops_addr,
        "comet starting"
    );

    // Register before serving clients so job can route to this node from the first session on.
    tokio::select! {
        _ = crate::renew::renew_once(&ctx) => {}
        _ = shutdown.cancelled() => {}
    }
    tracker.spawn(crate::renew::run(ctx.clone()));
    tracker.spawn(crate::deliver::paced_worker(ctx.clone(), paced_rx));

    let rpc_ctx = ctx.clone();
    tracker.spawn(rim_runtime::rpc::accept_loop(
        listeners.rpc,
        "comet-rpc",
        cluster.clone(),
        shutdown.clone(),
        tracker.clone(),
        move |stream| {
            let server = CometServer::new(rpc_ctx.clone());
            tarpc::server::BaseChannel::with_defaults(cluster.transport(stream))
                .execute(server.serve())
                .for_each(|f| async {
                    tokio::spawn(f);
                })
        },
    ));

    let handshake = Duration::from_millis(ctx.cfg.session.handshake_timeout_ms);
    if let Some(tcp) = listeners.tcp {
        tracker.spawn(crate::tcp::accept_loop(ctx.clone(), tcp, None));
    }
    if let Some(reload) = reload_on_sighup(reloadable, shutdown.clone()) {
        tracker.spawn(reload);
    }
    if let (Some(server), Some(l)) = (&tls, listeners.tls) {
        let acceptor = server.acceptor(&[], handshake)?;
        tracker.spawn(crate::tcp::accept_loop(ctx.clone(), l, Some(acceptor)));
    }

    // `/metrics` goes to the ops listener when there is one: the client ports keep only the
    // health probes a load balancer needs.
    let ops_source: Arc<dyn rim_runtime::ops::OpsSource> = Arc::new(Ops(ctx.clone()));
    let client_ops = match &listeners.ops {
        Some(_) => rim_runtime::ops::health_router(ops_source.clone()),
        None => {
            tracing::warn!(
                "listen.ops is empty: /metrics is served on the client port listen.http (dev only)"
            );
            rim_runtime::ops::router(ops_source.clone())
        }
    };
    let app = crate::ws::router(ctx.clone()).merge(client_ops);
    if let Some(l) = listeners.ops {
        let opts = rim_runtime::http::ServeOptions {
            header_timeout: Duration::from_secs(10),
            grace: Duration::from_millis(ctx.cfg.shutdown_grace_ms),
        };
        tracker.spawn(rim_runtime::ops::serve(
            l,
            ops_source,
            shutdown.clone(),
            opts,
        ));
    }
    let stop = shutdown.clone();
    let max_sessions = ctx.cfg.session.max_connections;
    let cfg_http_cap = max_sessions.saturating_add(max_sessions / 10 + 64);
    let grace = Duration::from_millis(ctx.cfg.shutdown_grace_ms);
    // Sockets that have not upgraded yet are bounded here (sessions are bounded by
    // session.max_connections once they exist): a little headroom over the session cap, and
    // the handshake timeout to send a request at all (and to finish TLS, on listen.wss). After
    // that the session's own timers (auth, heartbeat) govern, so no read-idle limit.
    let guarded = |l| {
        rim_runtime::listener::GuardedListener::new(
            l,
            rim_runtime::listener::Limits {
                max_connections: cfg_http_cap,
                first_bytes: handshake,
                read_idle: None,
            },
        )
    };
    // The upgrade request itself must arrive within the handshake timeout too.
    let opts = rim_runtime::http::ServeOptions {
        header_timeout: handshake,
        grace,
    };
    if let (Some(l), Some(server)) = (listeners.wss, &tls) {
        let acceptor = server.acceptor(&[b"http/1.1"], handshake)?;
        let (wss, app, stop) = (guarded(l), app.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = rim_runtime::http::serve_tls(wss, app, stop, opts, acceptor).await {
                tracing::error!(error = %e, "wss server failed");
            }
        });
    }
    let http = guarded(listeners.http);
    tracker.spawn(async move {
        if let Err(e) = rim_runtime::http::serve(http, app, stop, opts).await {
            tracing::error!(error = %e, "http server failed");
        }
    });

    shutdown.cancelled().await;
    tracing::info!("comet draining: closing sessions");
    // Sessions watch the token themselves and send op 6 "server shutting down".
    let drained = rim_runtime::shutdown::drain(&tracker, grace, "comet").await;
    crate::renew::unregister(&ctx).await;
    tracing::info!(drained, "comet stopped");
    Ok(())
}
