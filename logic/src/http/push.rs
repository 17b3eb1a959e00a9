//! goim's push routes: `/goim/push/{keys,mids,room,all}?operation=…`, the body delivered as is.

use axum::extract::{Request, State};
use rim_proto::room::RoomId;
use serde_json::{Value, json};

use super::guard::push_prelude;
use super::query::check_max;
use super::{ApiError, ApiResult, AppState, Data};

/// The answer to an accepted push: its id, for mids and keys the sessions it was routed to, and
/// `delivery`: `live` (routed to online sessions or, for rooms and broadcasts, to whoever is
/// there), `stored` (recorded for later only), `both`, or `none` (nobody online and not kept).
fn accepted(a: rim_proto::rpc::PushAccepted, with_sessions: bool) -> Data {
    let live = !with_sessions || a.sessions > 0;
    let delivery = match (live, a.stored) {
        (true, true) => "both",
        (true, false) => "live",
        (false, true) => "stored",
        (false, false) => "none",
    };
    let v: Value = if with_sessions {
        json!({ "id": a.id, "sessions": a.sessions, "delivery": delivery })
    } else {
        json!({ "id": a.id, "delivery": delivery })
    };
    Data(v)
}

pub(super) async fn keys(State(app): AppState, req: Request) -> ApiResult {
    let (q, body) = push_prelude(&app, req).await?;
    let op = q.op()?;
    let keys: Vec<String> = q
        .list("keys", false)
        .into_iter()
        .map(String::from)
        .collect();
    if keys.is_empty() {
        return Err(ApiError::bad("keys: required"));
    }
    check_max("keys", keys.len(), app.config.push.max_targets)?;
    Ok(accepted(app.push_keys(op, &keys, body).await?, true))
}

pub(super) async fn mids(State(app): AppState, req: Request) -> ApiResult {
    let (q, body) = push_prelude(&app, req).await?;
    let op = q.op()?;
    let mids = q.i64_list("mids", app.config.push.max_targets)?;
    Ok(accepted(app.push_mids(op, &mids, body).await?, true))
}

pub(super) async fn room(State(app): AppState, req: Request) -> ApiResult {
    let (q, body) = push_prelude(&app, req).await?;
    let op = q.op()?;
    let ty = q.room_type()?;
    let id = q.required("room")?;
    let room = RoomId::from_parts(ty, id).map_err(|e| ApiError::bad(format!("room: {e}")))?;
    Ok(accepted(app.push_room(op, room, body).await?, false))
}

pub(super) async fn all(State(app): AppState, req: Request) -> ApiResult {
    let (q, body) = push_prelude(&app, req).await?;
    let op = q.op()?;
    let speed = q.u32_or("speed", 0)?;
    Ok(accepted(app.push_all(op, speed, body).await?, false))
}
