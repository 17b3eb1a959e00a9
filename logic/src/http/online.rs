//! goim's online and node routes: room counts, totals, and where clients should connect.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use rim_proto::room::RoomId;

use super::guard::{Guard, check_secret};
use super::query::check_max;
use super::{ApiError, ApiResult, AppState, Data, Query};

/// Most rooms `/goim/online/top` lists.
const MAX_TOP: usize = 1000;

pub(super) async fn top(
    State(app): AppState,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
    let q = Query::parse(raw.as_deref());
    let ty = q.room_type()?;
    let limit = q.u32_or("limit", 10)? as usize;
    if limit == 0 || limit > MAX_TOP {
        return Err(ApiError::bad(format!("limit: must be 1-{MAX_TOP}")));
    }
    let top = app.online_top(ty, limit).await?;
    serde_json::to_value(top)
        .map(Data)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

pub(super) async fn rooms(
    State(app): AppState,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
    let q = Query::parse(raw.as_deref());
    let ty = q.room_type()?;
    let ids: Vec<String> = q
        .list("rooms", true)
        .into_iter()
        .map(String::from)
        .collect();
    if ids.is_empty() {
        return Err(ApiError::bad("rooms: required"));
    }
    check_max("rooms", ids.len(), app.config.push.max_targets)?;
    for id in &ids {
        RoomId::from_parts(ty, id).map_err(|e| ApiError::bad(format!("rooms: {e}")))?;
    }
    Ok(Data(app.online_rooms(ty, &ids).await?))
}

pub(super) async fn total(State(app): AppState, headers: HeaderMap) -> ApiResult {
    check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
    Ok(Data(app.online_total().await?))
}

pub(super) async fn nodes_weighted(
    State(app): AppState,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
    let q = Query::parse(raw.as_deref());
    let platform = q.get("platform").unwrap_or_default();
    Ok(Data(app.nodes_weighted(platform).await?))
}

pub(super) async fn nodes_instances(State(app): AppState, headers: HeaderMap) -> ApiResult {
    check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
    Ok(Data(app.nodes_instances().await?))
}
