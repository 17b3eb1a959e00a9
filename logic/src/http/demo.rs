//! The chat demo: its page and scripts (embedded, so the binary serves them with no files
//! around) and the dev sign-in, all behind `demo.enabled`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, ApiResult, AppState, Data, Query};
use crate::App;

/// Longest dev sign-in name, in characters (after trimming).
const MAX_NAME_CHARS: usize = 32;
/// Lifetime of the token the dev sign-in issues.
const DEV_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(86_400);

const INDEX_HTML: &str = include_str!("../../assets/index.html");
const RIM_CLIENT_JS: &str = include_str!("../../assets/rim-client.js");
const CHAT_JS: &str = include_str!("../../assets/chat.js");
const CHAT_CSS: &str = include_str!("../../assets/chat.css");

fn demo_off() -> ApiError {
    ApiError::not_found("no such route (demo.enabled is false)")
}

pub(super) async fn dev_login(State(app): AppState, RawQuery(raw): RawQuery) -> ApiResult {
    if !app.config.demo.enabled {
        return Err(demo_off());
    }
    let q = Query::parse(raw.as_deref());
    let name = q.get("name").unwrap_or_default().trim();
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(ApiError::bad(format!(
            "name: must be 1-{MAX_NAME_CHARS} characters (after trimming), without control characters"
        )));
    }
    let mid = app.dev_sign_in(name).await?;
    let secret = &app.config.auth.secret;
    let token = if secret.is_empty() {
        String::new()
    } else {
        crate::auth::issue_token(secret, mid, DEV_TOKEN_TTL)
    };
    Ok(Data(json!({ "mid": mid, "name": name, "token": token })))
}

/// An embedded asset with its content type; `no-cache` so a rebuilt binary's page is picked up.
fn asset(app: &App, content_type: &'static str, body: &'static str) -> Response {
    if !app.config.demo.enabled {
        return demo_off().into_response();
    }
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn index(State(app): AppState) -> Response {
    asset(&app, "text/html; charset=utf-8", INDEX_HTML)
}

pub(super) async fn script_or_style(
    State(app): AppState,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = name.map(|Path(n)| n).unwrap_or_default();
    match name.as_str() {
        "rim-client.js" => asset(&app, "application/javascript; charset=utf-8", RIM_CLIENT_JS),
        "chat.js" => asset(&app, "application/javascript; charset=utf-8", CHAT_JS),
        "chat.css" => asset(&app, "text/css; charset=utf-8", CHAT_CSS),
        _ => ApiError::not_found("no such asset").into_response(),
    }
}
