//! The goim-compatible HTTP API: push, online and node routes, plus the shared ops routes, and
//! rim's own: room member and user session listings, the demo page and its dev sign-in.
//!
//! Every answer is the envelope `{"code","message","data"}` (data left out when empty) with a
//! matching status. Query strings are parsed here (not by an extractor) so each error names the
//! parameter at fault, and bodies are read under `push.body_limit` so an oversized push gets a
//! 400 envelope rather than axum's plain-text 413, and within `push.body_timeout_ms` (408).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use rim_proto::room::RoomId;
use rim_proto::rpc::LogicError as RpcError;
use serde_json::{Value, json};

use crate::App;
use crate::auth::bearer_matches;
use crate::directory::MembersCursor;
use crate::metrics::Ops;
use crate::store::StoreError;

/// Most rooms `/goim/online/top` lists.
const MAX_TOP: usize = 1000;
/// Most members one `/rim/rooms/{room}/members` page lists.
const MAX_MEMBERS_PAGE: usize = 1000;
/// Longest dev sign-in name, in characters (after trimming).
const MAX_NAME_CHARS: usize = 32;
/// Lifetime of the token the dev sign-in issues.
const DEV_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The demo page and its scripts, embedded so the binary serves them with no files around.
const INDEX_HTML: &str = include_str!("../assets/index.html");
const RIM_CLIENT_JS: &str = include_str!("../assets/rim-client.js");
const CHAT_JS: &str = include_str!("../assets/chat.js");
const CHAT_CSS: &str = include_str!("../assets/chat.css");

/// An error answer: status, envelope code and the message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Envelope code (the negated status).
    pub code: i32,
    /// Names the parameter or condition at fault.
    pub message: String,
    /// The request body was left unread, so the server will not keep the connection: say so
    /// (`Connection: close`), or a client reusing it would see its next request fail.
    pub body_unread: bool,
}

impl ApiError {
    /// 400 naming a parameter.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// Any status; the code is the status negated.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: -i32::from(status.as_u16()),
            message: message.into(),
            body_unread: false,
        }
    }

    /// Marks the error as answered before the request body was read.
    fn before_body(mut self) -> Self {
        self.body_unread = true;
        self
    }
}

impl From<RpcError> for ApiError {
    fn from(e: RpcError) -> Self {
        match e {
            RpcError::BadRequest(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            RpcError::Unauthorized(m) => ApiError::new(StatusCode::UNAUTHORIZED, m),
            RpcError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
            RpcError::Internal(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
            RpcError::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, m),
            RpcError::Offline(m) => ApiError::new(StatusCode::NOT_FOUND, m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

/// The envelope for a result: `data` is left out when it is null.
pub fn envelope(result: Result<Value, ApiError>) -> Response {
    let close = result.as_ref().is_err_and(|e| e.body_unread);
    let (status, body) = match result {
        Ok(data) => {
            let mut body = json!({ "code": 0, "message": "ok" });
            if !data.is_null()
                && let Some(obj) = body.as_object_mut()
            {
                obj.insert("data".into(), data);
            }
            (StatusCode::OK, body)
        }
        Err(e) => (e.status, json!({ "code": e.code, "message": e.message })),
    };
    let mut response = (status, axum::Json(body)).into_response();
    if close {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// A parsed query string: every `name=value` pair in order (repeated names kept).
#[derive(Debug, Clone, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses a raw query string (percent-decoding, `+` as space).
    pub fn parse(raw: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first non-empty value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name`, or `name: required`.
    pub fn required(&self, name: &str) -> Result<&str, ApiError> {
        self.get(name)
            .ok_or_else(|| ApiError::bad(format!("{name}: required")))
    }

    /// Every value of a repeated `name`; with `split_commas`, `a,b` counts as two (goim tools
    /// send both forms). Empty values are ignored.
    pub fn list(&self, name: &str, split_commas: bool) -> Vec<&str> {
        let mut out = Vec::new();
        for (_, v) in self.0.iter().filter(|(k, _)| k == name) {
            if split_commas {
                out.extend(v.split(',').map(str::trim).filter(|s| !s.is_empty()));
            } else if !v.is_empty() {
                out.push(v.as_str());
            }
        }
        out
    }

    /// Required `operation` as an int32.
    pub fn op(&self) -> Result<i32, ApiError> {
        let v = self.required("operation")?;
        v.trim()
            .parse()
            .map_err(|_| ApiError::bad(format!("operation: {v:?} is not an int32")))
    }

    /// Required list of int64 `name`, at most `max` of them.
    pub fn i64_list(&self, name: &str, max: usize) -> Result<Vec<i64>, ApiError> {
        let raw = self.list(name, true);
        if raw.is_empty() {
            return Err(ApiError::bad(format!("{name}: required")));
        }
        check_max(name, raw.len(), max)?;
        raw.into_iter()
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::bad(format!("{name}: {v:?} is not an int64")))
            })
            .collect()
    }

    /// Optional unsigned `name`, `default` when absent.
    pub fn u32_or(&self, name: &str, default: u32) -> Result<u32, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| ApiError::bad(format!("{name}: {v:?} is not a non-negative integer"))),
        }
    }

    /// Required room `type`, validated.
    pub fn room_type(&self) -> Result<&str, ApiError> {
        let ty = self.required("type")?;
        RoomId::check_type(ty).map_err(|e| ApiError::bad(format!("type: {e}")))?;
        Ok(ty)
    }
}

fn check_max(name: &str, n: usize, max: usize) -> Result<(), ApiError> {
    if n > max {
        return Err(ApiError::bad(format!(
            "{name}: {n} values exceed push.max_targets of {max}"
        )));
    }
    Ok(())
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

type AppState = State<Arc<App>>;

/// Which routes `push.open_online` leaves open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// Push routes, and routes that reveal session keys (a key is enough to push to a session
    /// and was enough to claim it): the secret is required whenever it is set.
    Always,
    /// Online, node and member listings: open when `push.open_online`.
    UnlessOpenOnline,
}

/// The push secret check (401 envelope when set and not presented).
fn check_secret(app: &App, headers: &HeaderMap, guard: Guard) -> Result<(), ApiError> {
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

/// Parses the query and checks the secret, then reads the body (in that order, so a refused
/// request does not make us read 64 KiB).
async fn push_prelude(app: &App, req: Request) -> Result<(Query, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    check_secret(app, &parts.headers, Guard::Always).map_err(ApiError::before_body)?;
    let q = Query::parse(parts.uri.query());
    let timeout = std::time::Duration::from_millis(app.config.push.body_timeout_ms);
    let body = read_body(&parts.headers, body, app.config.push.body_limit, timeout).await?;
    Ok((q, body))
}

fn accepted(a: rim_proto::rpc::PushAccepted, with_sessions: bool) -> Value {
    if with_sessions {
        json!({ "id": a.id, "sessions": a.sessions })
    } else {
        json!({ "id": a.id })
    }
}

async fn push_keys(State(app): AppState, req: Request) -> Response {
    envelope(
        async {
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
        .await,
    )
}

async fn push_mids(State(app): AppState, req: Request) -> Response {
    envelope(
        async {
            let (q, body) = push_prelude(&app, req).await?;
            let op = q.op()?;
            let mids = q.i64_list("mids", app.config.push.max_targets)?;
            Ok(accepted(app.push_mids(op, &mids, body).await?, true))
        }
        .await,
    )
}

async fn push_room(State(app): AppState, req: Request) -> Response {
    envelope(
        async {
            let (q, body) = push_prelude(&app, req).await?;
            let op = q.op()?;
            let ty = q.room_type()?;
            let id = q.required("room")?;
            let room =
                RoomId::from_parts(ty, id).map_err(|e| ApiError::bad(format!("room: {e}")))?;
            Ok(accepted(app.push_room(op, room, body).await?, false))
        }
        .await,
    )
}

async fn push_all(State(app): AppState, req: Request) -> Response {
    envelope(
        async {
            let (q, body) = push_prelude(&app, req).await?;
            let op = q.op()?;
            let speed = q.u32_or("speed", 0)?;
            Ok(accepted(app.push_all(op, speed, body).await?, false))
        }
        .await,
    )
}

async fn online_top(State(app): AppState, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    envelope(
        async {
            check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
            let q = Query::parse(raw.as_deref());
            let ty = q.room_type()?;
            let limit = q.u32_or("limit", 10)? as usize;
            if limit == 0 || limit > MAX_TOP {
                return Err(ApiError::bad(format!("limit: must be 1-{MAX_TOP}")));
            }
            let top = app.online_top(ty, limit).await?;
            serde_json::to_value(top)
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
        .await,
    )
}

async fn online_room(
    State(app): AppState,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    envelope(
        async {
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
            Ok(app.online_rooms(ty, &ids).await?)
        }
        .await,
    )
}

async fn online_total(State(app): AppState, headers: HeaderMap) -> Response {
    envelope(
        async {
            check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
            Ok(app.online_total().await?)
        }
        .await,
    )
}

async fn nodes_weighted(
    State(app): AppState,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    envelope(
        async {
            check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
            let q = Query::parse(raw.as_deref());
            let platform = q.get("platform").unwrap_or_default();
            Ok(app.nodes_weighted(platform).await?)
        }
        .await,
    )
}

async fn nodes_instances(State(app): AppState, headers: HeaderMap) -> Response {
    envelope(
        async {
            check_secret(&app, &headers, Guard::UnlessOpenOnline)?;
            Ok(app.nodes_instances().await?)
        }
        .await,
    )
}

/// A path parameter, percent-decoded; a malformed one is a 400 naming it.
fn path_param(p: Result<Path<String>, PathRejection>, name: &str) -> Result<String, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::bad(format!("{name}: {e}")))
}

async fn room_members(
    State(app): AppState,
    headers: HeaderMap,
    room: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Response {
    envelope(
        async {
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
            Ok(app.room_members(room.as_str(), cursor, limit).await?)
        }
        .await,
    )
}

async fn user_sessions(
    State(app): AppState,
    headers: HeaderMap,
    mid: Result<Path<String>, PathRejection>,
) -> Response {
    envelope(
        async {
            check_secret(&app, &headers, Guard::Always)?;
            let raw = path_param(mid, "mid")?;
            let mid: i64 = raw
                .trim()
                .parse()
                .map_err(|_| ApiError::bad(format!("mid: {raw:?} is not an int64")))?;
            Ok(app.user_sessions(mid).await?)
        }
        .await,
    )
}

fn demo_off() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route (demo.enabled is false)",
    )
}

async fn dev_login(State(app): AppState, RawQuery(raw): RawQuery) -> Response {
    envelope(
        async {
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
            Ok(json!({ "mid": mid, "name": name, "token": token }))
        }
        .await,
    )
}

/// An embedded asset with its content type; `no-cache` so a rebuilt binary's page is picked up.
fn asset(app: &App, content_type: &'static str, body: &'static str) -> Response {
    if !app.config.demo.enabled {
        return envelope(Err(demo_off()));
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

async fn demo_index(State(app): AppState) -> Response {
    asset(&app, "text/html; charset=utf-8", INDEX_HTML)
}

async fn demo_asset(State(app): AppState, name: Result<Path<String>, PathRejection>) -> Response {
    let name = name.map(|Path(n)| n).unwrap_or_default();
    match name.as_str() {
        "rim-client.js" => asset(&app, "application/javascript; charset=utf-8", RIM_CLIENT_JS),
        "chat.js" => asset(&app, "application/javascript; charset=utf-8", CHAT_JS),
        "chat.css" => asset(&app, "text/css; charset=utf-8", CHAT_CSS),
        _ => envelope(Err(ApiError::new(StatusCode::NOT_FOUND, "no such asset"))),
    }
}

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
        .route("/goim/push/keys", post(push_keys))
        .route("/goim/push/mids", post(push_mids))
        .route("/goim/push/room", post(push_room))
        .route("/goim/push/all", post(push_all))
        .route("/goim/online/top", get(online_top))
        .route("/goim/online/room", get(online_room))
        .route("/goim/online/total", get(online_total))
        .route("/goim/nodes/weighted", get(nodes_weighted))
        .route("/goim/nodes/instances", get(nodes_instances))
        .route("/rim/rooms/{room}/members", get(room_members))
        .route("/rim/users/{mid}/sessions", get(user_sessions))
        .route("/rim/dev/login", post(dev_login))
        .route("/", get(demo_index))
        .route("/assets/{name}", get(demo_asset))
        // Bodies are read by hand under push.body_limit (see read_body).
        .layer(DefaultBodyLimit::disable())
        .with_state(app.clone())
        .merge(ops)
        .fallback(|| async { envelope(Err(ApiError::new(StatusCode::NOT_FOUND, "no such route"))) })
        .method_not_allowed_fallback(|| async {
            envelope(Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )))
        })
        .layer(middleware::from_fn_with_state(app, count_responses))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn q(s: &str) -> Query {
        Query::parse(Some(s))
    }

    #[test]
    fn query_errors_name_the_parameter() {
        assert_eq!(q("").op().unwrap_err().message, "operation: required");
        assert_eq!(
            q("operation=abc").op().unwrap_err().message,
            "operation: \"abc\" is not an int32"
        );
        assert_eq!(q("operation=1000").op().unwrap(), 1000);
        assert_eq!(
            q("mids=1&mids=12x")
                .i64_list("mids", 10)
                .unwrap_err()
                .message,
            "mids: \"12x\" is not an int64"
        );
        assert_eq!(
            q("x=1").i64_list("mids", 10).unwrap_err().message,
            "mids: required"
        );
        assert_eq!(
            q("mids=1,2,3").i64_list("mids", 2).unwrap_err().message,
            "mids: 3 values exceed push.max_targets of 2"
        );
        assert_eq!(
            q("mids=1&mids=2,3").i64_list("mids", 10).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(q("").room_type().unwrap_err().message, "type: required");
        assert!(
            q("type=a%20b")
                .room_type()
                .unwrap_err()
                .message
                .starts_with("type: ")
        );
        assert_eq!(q("keys=a,b&keys=c").list("keys", false), vec!["a,b", "c"]);
        assert_eq!(
            q("speed=-1").u32_or("speed", 0).unwrap_err().message,
            "speed: \"-1\" is not a non-negative integer"
        );
    }

    #[tokio::test]
    async fn envelope_shapes() {
        async fn body(r: Response) -> (StatusCode, Value) {
            let status = r.status();
            let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice(&b).unwrap())
        }
        let (s, v) = body(envelope(Ok(Value::Null))).await;
        assert_eq!((s, v), (StatusCode::OK, json!({"code":0,"message":"ok"})));
        let (s, v) = body(envelope(Ok(json!({"id":"x"})))).await;
        assert_eq!(
            (s, v),
            (
                StatusCode::OK,
                json!({"code":0,"message":"ok","data":{"id":"x"}})
            )
        );
        let (s, v) = body(envelope(Err(ApiError::bad("mids: required")))).await;
        assert_eq!(
            (s, v),
            (
                StatusCode::BAD_REQUEST,
                json!({"code":-400,"message":"mids: required"})
            )
        );
        let e: ApiError = RpcError::Unavailable("redis down".into()).into();
        assert_eq!((e.status.as_u16(), e.code), (503, -503));
    }
}
