//! logic's HTTP front door: goim's push, online and node routes, rim's people routes, the chat
//! demo, and the ops routes, one file per concern. Handlers return [`ApiResult`]; every answer,
//! error or not, is goim's envelope (see [`envelope`]).
//!
//! * [`envelope`]: the envelope and [`ApiError`].
//! * [`query`]: query strings and path parameters.
//! * `guard`: the push secret and the bounded body read.
//! * `push`, `online`, `directory`, `history`, `demo`, `admin`: the routes.

mod admin;
mod demo;
mod directory;
pub mod envelope;
mod guard;
mod history;
mod online;
mod push;
pub mod query;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use envelope::{ApiError, ApiResult, Data};
pub use query::Query;

use crate::App;
use crate::metrics::Ops;

type AppState = State<Arc<App>>;

async fn count_responses(State(app): AppState, req: Request, next: Next) -> Response {
    // Cheap clones (the URI shares its bytes): the text is made only for a refusal.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let resp = next.run(req).await;
    let status = resp.status();
    app.metrics.http_response(status.as_u16());
    // Unknown routes (404, 405) are scanners' noise, and the probes' own routes answer 503
    // every few seconds while Redis is down: neither is a refusal an operator looks into.
    let probe = matches!(uri.path(), "/healthz" | "/readyz" | "/metrics");
    if (status.is_client_error() || status.is_server_error())
        && !matches!(status.as_u16(), 404 | 405)
        && !probe
    {
        return record_refusal(&app, format!("{method} {}", uri.path()), resp).await;
    }
    resp
}

/// Largest error body read for its message (the envelope is far smaller).
const REFUSAL_BODY_MAX: u64 = 64 * 1024;

/// Keeps an error answer in the recent refusals, with the message its envelope told the caller.
/// A body that is not known to be small is passed on untouched, without a message.
async fn record_refusal(app: &App, what: String, resp: Response) -> Response {
    use axum::body::HttpBody;
    let code = resp.status().as_u16();
    let small = resp
        .body()
        .size_hint()
        .upper()
        .is_some_and(|n| n <= REFUSAL_BODY_MAX);
    if !small {
        app.refusals.record("http", code.to_string(), what);
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, REFUSAL_BODY_MAX as usize).await {
        Ok(b) => b,
        Err(e) => {
            // The size hint said it fits: only a failing body gets here, and it fails as it
            // would have for the client.
            app.refusals.record("http", code.to_string(), what);
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
    };
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_default();
    app.refusals
        .record("http", format!("{code} {message}"), what);
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// The whole HTTP app: API routes, ops routes, envelope 404/405, response counting.
pub fn router(app: Arc<App>) -> Router {
    let ops = rim_runtime::ops::router(Arc::new(Ops {
        store: app.store.clone(),
        metrics: app.metrics.clone(),
    }));
    Router::new()
        .route("/goim/push/keys", post(push::keys))
        .route("/goim/push/mids", post(push::mids))
        .route("/goim/push/room", post(push::room))
        .route("/goim/push/all", post(push::all))
        .route("/goim/online/top", get(online::top))
        .route("/goim/online/room", get(online::rooms))
        .route("/goim/online/total", get(online::total))
        .route("/goim/nodes/weighted", get(online::nodes_weighted))
        .route("/goim/nodes/instances", get(online::nodes_instances))
        .route("/rim/rooms/{room}/members", get(directory::room_members))
        .route("/rim/users/{mid}/sessions", get(directory::user_sessions))
        .route("/rim/rooms/{room}/history", get(history::room))
        .route("/rim/users/{mid}/history", get(history::user))
        .route("/rim/dev/login", post(demo::dev_login))
        .route("/", get(demo::index))
        .route("/assets/{name}", get(demo::script_or_style))
        .route("/admin", get(admin::page))
        .route("/admin/admin.js", get(admin::script))
        .route("/admin/admin.css", get(admin::style))
        .route("/admin/state", get(admin::state))
        // Bodies are read by hand under push.body_limit (see guard::read_body).
        .layer(DefaultBodyLimit::disable())
        .with_state(app.clone())
        .merge(ops)
        .fallback(|| async { ApiError::not_found("no such route").into_response() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
            .into_response()
        })
        .layer(middleware::from_fn_with_state(app, count_responses))
}
