//! What a request must pass before its handler runs: the push secret (`push.secret`, with
//! `push.open_online` opening the listings) and, for pushes, a body read under
//! `push.body_limit` within `push.body_timeout_ms`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;

use super::{ApiError, Query};
use crate::App;
use crate::auth::bearer_matches;

/// Which routes `push.open_online` leaves open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Guard {
    /// Push routes, and routes that reveal session keys (a key is enough to push to a session
    /// and was enough to claim it): the secret is required whenever it is set.
    Always,
    /// Online, node and member listings: open when `push.open_online`.
    UnlessOpenOnline,
}

/// The push secret check (401 envelope when set and not presented).
pub(super) fn check_secret(app: &App, headers: &HeaderMap, guard: Guard) -> Result<(), ApiError> {
    let secret = &app.config.push.secret;
    if secret.is_empty() || (guard == Guard::UnlessOpenOnline && app.config.push.open_online) {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if bearer_matches(given, secret) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authorization: Bearer <push.secret> required",
        ))
    }
}

/// `push.rate_per_sec`: 429 past it, before the body is read.
fn check_push_rate(app: &App) -> Result<(), ApiError> {
    let Some(bucket) = &app.push_rate else {
        return Ok(());
    };
    if bucket.lock().try_take(tokio::time::Instant::now()) {
        return Ok(());
    }
    app.metrics.push_rate_limited.inc();
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "push rate over push.rate_per_sec of {}/s: retry later",
            app.config.push.rate_per_sec
        ),
    ))
}

/// Parses the query and checks the secret, then reads the body (in that order, so a refused
/// request does not make us read 64 KiB).
pub(super) async fn push_prelude(app: &App, req: Request) -> Result<(Query, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    check_secret(app, &parts.headers, Guard::Always).map_err(ApiError::before_body)?;
    check_push_rate(app).map_err(ApiError::before_body)?;
    let q = Query::parse(parts.uri.query());
    let timeout = std::time::Duration::from_millis(app.config.push.body_timeout_ms);
    let body = read_body(&parts.headers, body, app.config.push.body_limit, timeout).await?;
    Ok((q, body))
}

/// Reads the body under the size limit and within `timeout`, answering with the envelope
/// rather than a bare 413 (or waiting forever on a client that trickles bytes).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let too_big = || ApiError::bad(format!("body exceeds push.body_limit of {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_big().before_body());
    }
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            // The rest of the body is still on the connection: it cannot be reused.
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "body: not received within push.body_timeout_ms of {} ms",
                    timeout.as_millis()
                ),
            )
            .before_body()
        })?;
    read.map_err(|e| {
        let is_limit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if is_limit {
            // Reading stopped at the limit: the rest of the body is still on the connection.
            too_big().before_body()
        } else {
            ApiError::bad(format!("body: could not be read: {e}"))
        }
    })
}
