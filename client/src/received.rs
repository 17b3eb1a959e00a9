//! What a client receives, decoded: binary frames (op 9 batches unpacked) or JSON-mode text,
//! and the readings of a frame tests and applications need (a disconnect's reason, a heartbeat
//! reply's online count).

use bytes::Bytes;
use rim_proto::frame::Frame;
use rim_proto::json::decode_server;
use rim_proto::msg::DisconnectBody;
use rim_proto::op;
use serde_json::Value;

use crate::error::ClientError;

/// Largest frame body a client accepts from a server.
pub const MAX_SERVER_BODY: usize = 16 * 1024 * 1024;

/// One frame as the client received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The frame (in JSON mode the body is the string's bytes, or the JSON text of `body`).
    pub frame: Frame,
    /// Whether it came inside an op 9 wrapper.
    pub in_raw: bool,
    /// JSON mode: the `body` value as sent.
    pub json_body: Option<Value>,
}

impl Received {
    /// Whether this is a push (op ≥ 1000), not a reply or a notice.
    pub fn is_push(&self) -> bool {
        self.frame.op >= op::APP_MIN
    }
}

pub(crate) fn decode_binary(b: Bytes) -> Result<Vec<Received>, ClientError> {
    let bad = |e: rim_proto::FrameError| ClientError::Protocol(e.to_string());
    let f = Frame::decode_message(b, MAX_SERVER_BODY).map_err(bad)?;
    if f.op == op::RAW {
        Ok(Frame::split_batch(f.body, MAX_SERVER_BODY)
            .map_err(bad)?
            .into_iter()
            .map(|frame| Received {
                frame,
                in_raw: true,
                json_body: None,
            })
            .collect())
    } else {
        Ok(vec![Received {
            frame: f,
            in_raw: false,
            json_body: None,
        }])
    }
}

pub(crate) fn decode_json(text: &str) -> Result<Vec<Received>, ClientError> {
    Ok(decode_server(text)
        .map_err(|e| ClientError::Protocol(format!("server sent invalid JSON: {e}")))?
        .into_iter()
        .map(|f| Received {
            frame: f.frame,
            in_raw: false,
            json_body: Some(f.body),
        })
        .collect())
}

pub(crate) fn disconnect_reason(r: &Received) -> String {
    serde_json::from_slice::<DisconnectBody>(&r.frame.body)
        .map(|d| d.reason)
        .unwrap_or_else(|_| String::from_utf8_lossy(&r.frame.body).into_owned())
}

/// Online count of a heartbeat reply, in either mode.
pub fn online_of(r: &Received) -> Result<i32, ClientError> {
    if let Some(v) = &r.json_body {
        return v
            .get("online")
            .and_then(Value::as_i64)
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| ClientError::Protocol(format!("no online count in {v}")));
    }
    let b: [u8; 4] = r.frame.body[..].try_into().map_err(|_| {
        ClientError::Protocol(format!(
            "heartbeat reply body is {} bytes, not 4",
            r.frame.body.len()
        ))
    })?;
    Ok(i32::from_be_bytes(b))
}
