//! rim's people routes: a room's members (paged) and a user's sessions.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use rim_proto::room::RoomId;

use super::guard::{Guard, check_secret};
use super::query::path_param;
use super::{ApiError, ApiResult, AppState, Data, Query};
use crate::directory::MembersCursor;

/// Most members one `/rim/rooms/{room}/members` page lists.
const MAX_MEMBERS_PAGE: usize = 1000;

pub(super) async fn room_members(
    State(app): AppState,
    headers: HeaderMap,
    room: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
    let room = path_param(room, "room")?;
    let room = RoomId::parse(&room).map_err(|e| ApiError::bad(format!("room: {e}")))?;
    let q = Query::parse(raw.as_deref());
    let cursor = match q.get("cursor") {
        None => MembersCursor::parse("0"),
        Some(c) => MembersCursor::parse(c),
    }
    .ok_or_else(|| ApiError::bad("cursor: not a cursor from a previous page"))?;
    let limit = q.u32_or("limit", 100)? as usize;
    if limit == 0 || limit > MAX_MEMBERS_PAGE {
        return Err(ApiError::bad(format!(
            "limit: must be 1-{MAX_MEMBERS_PAGE}"
        )));
    }
    Ok(Data(app.room_members(room.as_str(), cursor, limit).await?))
}

pub(super) async fn user_sessions(
    State(app): AppState,
    headers: HeaderMap,
    mid: Result<Path<String>, PathRejection>,
) -> ApiResult {
    // Session keys are enough to push to a session: never open without the secret.
    check_secret(&app, &headers, Guard::Always)?;
    let raw = path_param(mid, "mid")?;
    let mid: i64 = raw
        .trim()
        .parse()
        .map_err(|_| ApiError::bad(format!("mid: {raw:?} is not an int64")))?;
    Ok(Data(app.user_sessions(mid).await?))
}
