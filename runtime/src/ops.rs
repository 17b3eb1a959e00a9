//! `/healthz`, `/readyz` and `/metrics`, the same on every tier, in logic's response envelope.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;

/// What the ops routes need from a tier.
pub trait OpsSource: Send + Sync + 'static {
    /// `Ok` when the tier can do its job (e.g. Redis reachable); `Err` says why not.
    fn ready(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Prometheus text.
    fn metrics(&self) -> String;
}

/// Serves the ops routes on a listener of their own (job's `listen.http`, comet's `listen.ops`)
/// until `shutdown`: a scraper and a few probes, so a small connection cap, 10 s for the first
/// bytes and idle connections closed after 60 s. Failures are logged.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<dyn OpsSource>,
    shutdown: tokio_util::sync::CancellationToken,
    opts: crate::http::ServeOptions,
) {
    let listener = crate::listener::GuardedListener::new(
        listener,
        crate::listener::Limits {
            max_connections: 64,
            first_bytes: std::time::Duration::from_secs(10),
            read_idle: Some(std::time::Duration::from_secs(60)),
        },
    );
    if let Err(e) = crate::http::serve(listener, router(source), shutdown, opts).await {
        tracing::error!(error = %e, "ops http server failed");
    }
}

/// Router with the three ops routes.
pub fn router(source: Arc<dyn OpsSource>) -> Router {
    routes(source, true)
}

/// Router with `/healthz` and `/readyz` only: for a client port when `/metrics` is served on a
/// separate ops listener (load balancers probe the client port; the counters stay private).
pub fn health_router(source: Arc<dyn OpsSource>) -> Router {
    routes(source, false)
}

fn routes(source: Arc<dyn OpsSource>, with_metrics: bool) -> Router {
    let r = Router::new()
        .route(
            "/healthz",
            get(|| async { envelope(StatusCode::OK, 0, "ok") }),
        )
        .route("/readyz", get(readyz));
    let r = if with_metrics {
        r.route("/metrics", get(metrics))
    } else {
        r
    };
    r.with_state(source)
}

async fn readyz(State(source): State<Arc<dyn OpsSource>>) -> Response {
    match source.ready().await {
        Ok(()) => envelope(StatusCode::OK, 0, "ready"),
        Err(why) => envelope(StatusCode::SERVICE_UNAVAILABLE, -503, &why),
    }
}

async fn metrics(State(source): State<Arc<dyn OpsSource>>) -> Response {
    let mut text = source.metrics();
    if let Some(p) = crate::process::ProcessStats::read() {
        let mut e = crate::metrics::Exposition::new();
        p.render(&mut e);
        text.push_str(&e.finish());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `{"code":..,"message":..}` with a matching status.
pub fn envelope(status: StatusCode, code: i32, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "code": code, "message": message })),
    )
        .into_response()
}
