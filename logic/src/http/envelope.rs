//! goim's response envelope, `{"code","message","data"}`, and the API's error type. Handlers
//! return `Result<Data, ApiError>` (see axum's `examples/error-handling`); both sides render
//! themselves as the envelope, so no handler builds one by hand.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use rim_proto::rpc::LogicError as RpcError;
use serde_json::{Value, json};

use crate::store::StoreError;

/// A handler's result.
pub type ApiResult = Result<Data, ApiError>;

/// A successful answer's `data` (left out of the envelope when null).
#[derive(Debug, Clone, PartialEq)]
pub struct Data(pub Value);

impl From<Value> for Data {
    fn from(v: Value) -> Self {
        Data(v)
    }
}

impl IntoResponse for Data {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": 0, "message": "ok" });
        if !self.0.is_null()
            && let Some(obj) = body.as_object_mut()
        {
            obj.insert("data".into(), self.0);
        }
        (StatusCode::OK, axum::Json(body)).into_response()
    }
}

/// A successful answer whose `data` is JSON text already (history bodies are embedded as
/// their own text, so numbers keep every digit: a `Value` would round them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawData(pub String);

impl IntoResponse for RawData {
    fn into_response(self) -> Response {
        let body = format!(r#"{{"code":0,"message":"ok","data":{}}}"#, self.0);
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

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

    /// 404 naming what is missing.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// Marks the error as answered before the request body was read.
    pub(super) fn before_body(mut self) -> Self {
        self.body_unread = true;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.code, "message": self.message });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.body_unread {
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        response
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn body(r: Response) -> (StatusCode, Value) {
        let status = r.status();
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&b).unwrap())
    }

    #[tokio::test]
    async fn envelope_shapes() {
        let (s, v) = body(Data(Value::Null).into_response()).await;
        assert_eq!((s, v), (StatusCode::OK, json!({"code":0,"message":"ok"})));
        let (s, v) = body(Data(json!({"id":"x"})).into_response()).await;
        assert_eq!(
            (s, v),
            (
                StatusCode::OK,
                json!({"code":0,"message":"ok","data":{"id":"x"}})
            )
        );
        let (s, v) = body(ApiError::bad("mids: required").into_response()).await;
        assert_eq!(
            (s, v),
            (
                StatusCode::BAD_REQUEST,
                json!({"code":-400,"message":"mids: required"})
            )
        );
        let e: ApiError = RpcError::Unavailable("redis down".into()).into();
        assert_eq!((e.status.as_u16(), e.code), (503, -503));
        let unread = ApiError::bad("too big").before_body().into_response();
        assert_eq!(unread.headers().get(header::CONNECTION).unwrap(), "close");
    }
}
