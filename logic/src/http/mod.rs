//! logic's HTTP front door: goim's push, online and node routes, rim's people routes, the chat
//! demo, and the ops routes, one file per concern. Handlers return [`ApiResult`]; every answer,
//! error or not, is goim's envelope (see [`envelope`]).
//!
//! * [`envelope`]: the envelope and [`ApiError`].
//! * [`query`]: query strings and path parameters.
//! * `guard`: the push secret and the bounded body read.
//! * `push`, `online`, `directory`, `history`, `demo`: the routes.

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
    let resp = next.run(req).await;
    app.metrics.http_response(resp.status().as_u16());
    resp
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
