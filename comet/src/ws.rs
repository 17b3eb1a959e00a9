//! WebSocket transport at `GET /sub`: one frame per client message (binary, or a binary frame in
//! a text message), or JSON mode when the first message is a JSON text object. The upgraded
//! socket is one [`Connection`] driven by one task.

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rim_proto::frame::Frame;
use rim_proto::json::{JsonFrameError, decode_client, encode_server, looks_like_json};
use rim_runtime::listener::PeerAddr;

use crate::connection::{Connection, ReadError, Transport};
use crate::ctx::Ctx;
use crate::driver::drive;
use crate::outbound::CloseSpec;
use crate::writer::{Out, close_reason, disconnect_frame, ws_binary_messages, ws_json_messages};

/// Bytes the WebSocket layer reads per call and keeps per connection. tungstenite's default
/// (128 KiB, zero-filled on first read) made an idle session cost ~144 KiB; client messages are
/// small (Auth, heartbeats, a chat line), and a larger one is read in several calls.
pub(crate) const READ_BUFFER: usize = 256;

/// The `/sub` route.
pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new().route("/sub", get(upgrade)).with_state(ctx)
}

/// Whether a request with this `Origin` header may upgrade: any when `allowed` is empty, and a
/// request without `Origin` (not from a browser) always; else an exact match.
pub(crate) fn origin_allowed(allowed: &[String], origin: Option<&HeaderValue>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = origin else { return true };
    let origin = origin.to_str().unwrap_or_default();
    allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

async fn upgrade(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(
        &ctx.cfg.websocket.allowed_origins,
        headers.get(header::ORIGIN),
    ) {
        ctx.metrics.limit_refused("ws_origin");
        tracing::debug!(%peer, origin = ?headers.get(header::ORIGIN), "websocket origin not allowed");
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    // Behind a trusted proxy the client is the one it names; limits and logs use that address.
    let client = ctx.limits.client_ip(
        peer.ip(),
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let peer = std::net::SocketAddr::new(client, peer.port());
    // Leave room above the frame limit so oversize frames reach our check and get close 1009.
    let limit = (16 + ctx.cfg.session.max_body) * 2 + 1024;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| {
            let tracker = ctx.tracker.clone();
            let max_body = ctx.cfg.session.max_body;
            let conn = WsConn {
                ws: socket,
                json: false,
                first: true,
                max_body,
            };
            tracker.track_future(drive(ctx, conn, peer, Transport::Ws))
        })
}

/// A WebSocket session; JSON mode is decided by its first message.
pub(crate) struct WsConn {
    ws: WebSocket,
    json: bool,
    first: bool,
    max_body: usize,
}

impl Connection for WsConn {
    async fn next(&mut self) -> Option<Result<Frame, ReadError>> {
        loop {
            let msg = match self.ws.next().await? {
                Ok(m) => m,
                Err(e) => return Some(Err(ReadError::Io(e.to_string()))),
            };
            let first = std::mem::replace(&mut self.first, false);
            return Some(match msg {
                Message::Binary(b) => {
                    Frame::decode_message(b, self.max_body).map_err(ReadError::Frame)
                }
                Message::Text(t) => {
                    if first && looks_like_json(t.as_str()) {
                        self.json = true;
                    }
                    if self.json {
                        decode_client(t.as_str(), self.max_body).map_err(|e| match e {
                            JsonFrameError::Frame(f) => ReadError::Frame(f),
                            other => ReadError::Json(other.to_string()),
                        })
                    } else {
                        Frame::decode_message(
                            Bytes::copy_from_slice(t.as_str().as_bytes()),
                            self.max_body,
                        )
                        .map_err(ReadError::Frame)
                    }
                }
                Message::Ping(_) | Message::Pong(_) => {
                    // Control frames do not count as the first message.
                    self.first = first;
                    continue;
                }
                Message::Close(_) => return None,
            });
        }
    }

    async fn write(&mut self, batch: &[Out]) -> Result<(), String> {
        if self.json {
            for m in ws_json_messages(batch) {
                self.ws
                    .feed(Message::Text(m))
                    .await
                    .map_err(|e| e.to_string())?;
            }
        } else {
            for m in ws_binary_messages(batch) {
                self.ws
                    .feed(Message::Binary(m))
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        self.ws.flush().await.map_err(|e| e.to_string())
    }

    async fn finish(&mut self, spec: &CloseSpec) -> Result<(), String> {
        if spec.op6 && spec.op6_on_ws {
            let f = disconnect_frame(&spec.reason);
            let msg = if self.json {
                let mut s = String::new();
                encode_server(&mut s, f.op, f.seq, &f.body);
                Message::Text(s.into())
            } else {
                Message::Binary(f.to_bytes())
            };
            self.ws.feed(msg).await.map_err(|e| e.to_string())?;
        }
        let close = CloseFrame {
            code: spec.ws_code,
            reason: close_reason(&spec.reason).into(),
        };
        self.ws
            .send(Message::Close(Some(close)))
            .await
            .map_err(|e| e.to_string())?;
        let _ = self.ws.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_allow_list() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(origin_allowed(&[], Some(&v("https://evil.example"))));
        let allowed = vec!["https://app.example.com".to_string()];
        assert!(origin_allowed(&allowed, None), "not a browser");
        assert!(origin_allowed(
            &allowed,
            Some(&v("https://app.example.com"))
        ));
        assert!(origin_allowed(
            &allowed,
            Some(&v("HTTPS://APP.example.com"))
        ));
        assert!(!origin_allowed(&allowed, Some(&v("https://evil.example"))));
        assert!(!origin_allowed(
            &allowed,
            Some(&v("https://app.example.com.evil"))
        ));
        assert!(!origin_allowed(&allowed, Some(&v("null"))));
    }
}
