//! WebSocket transport at `GET /sub`: one frame per client message (binary, or a binary frame in
//! a text message), or JSON mode when the first message is a JSON text object.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::SplitStream;
use rim_proto::frame::Frame;
use rim_proto::json::{JsonFrameError, decode_client, looks_like_json};
use rim_runtime::listener::PeerAddr;

use crate::server::Ctx;
use crate::session::{FrameReader, Outbound, ReadError, Transport, drive};
use crate::writer::{self, WriterSink};

/// The `/sub` route.
pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new().route("/sub", get(upgrade)).with_state(ctx)
}

async fn upgrade(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    // Leave room above the frame limit so oversize frames reach our check and get close 1009.
    let limit = (16 + ctx.cfg.session.max_body) * 2 + 1024;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let tracker = ctx.tracker.clone();
            tracker.track_future(serve(ctx, socket, peer))
        })
}

/// Frames from WebSocket messages; decides JSON mode on the first message.
pub(crate) struct WsReader {
    stream: SplitStream<WebSocket>,
    json: Arc<AtomicBool>,
    first: bool,
    max_body: usize,
}

impl FrameReader for WsReader {
    async fn next(&mut self) -> Option<Result<Frame, ReadError>> {
        loop {
            let msg = match self.stream.next().await? {
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
                        self.json.store(true, Ordering::Release);
                    }
                    if self.json.load(Ordering::Acquire) {
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
}

async fn serve(ctx: Arc<Ctx>, socket: WebSocket, peer: SocketAddr) {
    let (sink, stream) = socket.split();
    let json = Arc::new(AtomicBool::new(false));
    let (out, rx) = Outbound::new(ctx.cfg.session.outbound_queue);
    let wt = Duration::from_millis(ctx.cfg.session.write_timeout_ms);
    let writer = tokio::spawn(writer::run(
        WriterSink::Ws {
            sink,
            json: json.clone(),
        },
        rx,
        out.clone(),
        wt,
    ));
    let reader = WsReader {
        stream,
        json,
        first: true,
        max_body: ctx.cfg.session.max_body,
    };
    drive(ctx, reader, out, peer, Transport::Ws).await;
    let _ = writer.await;
}
