//! rim's history routes: `GET /rim/rooms/{room}/history` and `GET /rim/users/{mid}/history`
//! (`after`, `limit`), behind the push secret. Messages oldest first, bodies as in JSON mode.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use rim_proto::history::{HistoryPage, Source, parse_after};
use rim_proto::room::RoomId;

use super::envelope::RawData;
use super::guard::{Guard, check_secret};
use super::query::path_param;
use super::{ApiError, AppState, Query};
use crate::App;
use crate::history::{DEFAULT_LIMIT, MAX_LIMIT};

pub(super) async fn room(
    State(app): AppState,
    headers: HeaderMap,
    room: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<RawData, ApiError> {
    // Messages are what pushers sent, not listings: the secret whenever it is set.
    check_secret(&app, &headers, Guard::Always)?;
    let room = path_param(room, "room")?;
    let room = RoomId::parse(&room).map_err(|e| ApiError::bad(format!("room: {e}")))?;
    let ty = room.room_type().to_string();
    let not_kept = || {
        ApiError::not_found(format!(
            "rooms of type {ty:?} keep no history (history.rooms.{ty})"
        ))
    };
    read(&app, Source::Room(room), 0, raw.as_deref(), not_kept).await
}

pub(super) async fn user(
    State(app): AppState,
    headers: HeaderMap,
    mid: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<RawData, ApiError> {
    check_secret(&app, &headers, Guard::Always)?;
    let text = path_param(mid, "mid")?;
    let mid: i64 = text
        .trim()
        .parse()
        .map_err(|_| ApiError::bad(format!("mid: {text:?} is not an int64")))?;
    let not_kept = || ApiError::not_found("users keep no history (history.users.max_len is 0)");
    read(&app, Source::User, mid, raw.as_deref(), not_kept).await
}

async fn read(
    app: &App,
    source: Source,
    mid: i64,
    raw: Option<&str>,
    not_kept: impl FnOnce() -> ApiError,
) -> Result<RawData, ApiError> {
    let q = Query::parse(raw);
    let after = parse_after(q.get("after").unwrap_or_default())
        .map_err(|e| ApiError::bad(format!("after: {e}")))?;
    let limit = q.u32_or("limit", DEFAULT_LIMIT as u32)? as usize;
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad(format!("limit: must be 1-{MAX_LIMIT}")));
    }
    app.metrics.history_reads_http.inc();
    let page = app
        .history_page(&source, mid, after, limit)
        .await?
        .ok_or_else(not_kept)?;
    Ok(RawData(render(&page)))
}

/// `{"messages":[{"id","op","body","ts_ms"}...],"complete":bool}`.
fn render(page: &HistoryPage) -> String {
    use std::fmt::Write;
    let mut s = String::from(r#"{"messages":["#);
    for (i, e) in page.entries.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, r#"{{"id":"{}","op":{},"body":"#, e.id, e.op);
        rim_proto::json::encode_body(&mut s, &e.body);
        let _ = write!(s, r#","ts_ms":{}}}"#, e.ts_ms);
    }
    let _ = write!(s, r#"],"complete":{}}}"#, page.complete);
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rim_proto::history::{HistoryEntry, HistoryId};

    #[test]
    fn pages_render_bodies_as_json_mode_does() {
        let page = HistoryPage {
            entries: vec![
                HistoryEntry {
                    id: HistoryId { ms: 5, seq: 1 },
                    op: 1000,
                    body: Bytes::from_static(br#"{"n":12345678901234567890123}"#),
                    ts_ms: 7,
                },
                HistoryEntry {
                    id: HistoryId { ms: 6, seq: 0 },
                    op: 1001,
                    body: Bytes::from_static(b"plain \"text\""),
                    ts_ms: 8,
                },
            ],
            complete: false,
        };
        let text = render(&page);
        assert_eq!(
            text,
            r#"{"messages":[{"id":"5-1","op":1000,"body":{"n":12345678901234567890123},"ts_ms":7},{"id":"6-0","op":1001,"body":"plain \"text\"","ts_ms":8}],"complete":false}"#
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["messages"][1]["body"], "plain \"text\"");
    }
}
