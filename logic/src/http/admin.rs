//! The operator page: `GET /admin` (the page, its script and style: no data in them) and
//! `GET /admin/state`, the data the page polls, behind `admin.secret` or `push.secret`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiResult, AppState, Data};
use crate::App;
use crate::auth::bearer_matches;

const ADMIN_HTML: &str = include_str!("../../assets/admin.html");
const ADMIN_JS: &str = include_str!("../../assets/admin.js");
const ADMIN_CSS: &str = include_str!("../../assets/admin.css");

/// The page's own files may load from logic only, and it may not be framed.
const CSP: &str = "default-src 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn page() -> Response {
    asset("text/html; charset=utf-8", ADMIN_HTML)
}

pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", ADMIN_JS)
}

pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", ADMIN_CSS)
}

/// `admin.secret` or `push.secret` as a bearer token; open only when both are empty (which
/// config validation allows on a loopback `listen.http` alone).
fn check_admin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let secrets: Vec<&str> = [&app.config.admin.secret, &app.config.push.secret]
        .into_iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    if secrets.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if secrets.iter().any(|s| bearer_matches(given, s)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authorization: Bearer <admin.secret or push.secret> required",
        ))
    }
}

pub(super) async fn state(State(app): AppState, headers: HeaderMap) -> ApiResult {
    check_admin(&app, &headers)?;
    Ok(Data(app.admin_state().await?))
}
