//! Raw TCP transport: frames back to back on the stream, read with `FrameCodec`, written plain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rim_proto::frame::{CodecError, Frame, FrameCodec};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedReadHalf;
use tokio_util::codec::FramedRead;

use crate::server::Ctx;
use crate::session::{FrameReader, Outbound, ReadError, Transport, drive};
use crate::writer::{self, WriterSink};

/// Frames from a TCP stream.
pub(crate) struct TcpReader(FramedRead<OwnedReadHalf, FrameCodec>);

impl FrameReader for TcpReader {
    async fn next(&mut self) -> Option<Result<Frame, ReadError>> {
        match self.0.next().await? {
            Ok(f) => Some(Ok(f)),
            Err(CodecError::Frame(e)) => Some(Err(ReadError::Frame(e))),
            Err(CodecError::Io(e)) => Some(Err(ReadError::Io(e.to_string()))),
        }
    }
}

/// Accepts TCP clients until shutdown; each connection runs in its own tracked task.
pub(crate) async fn accept_loop(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let c = ctx.clone();
                ctx.tracker.spawn(serve(c, stream, peer));
            }
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(ctx: Arc<Ctx>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let (r, w) = stream.into_split();
    let (out, rx) = Outbound::new(ctx.cfg.session.outbound_queue);
    let wt = Duration::from_millis(ctx.cfg.session.write_timeout_ms);
    let writer = tokio::spawn(writer::run(WriterSink::Tcp(w), rx, out.clone(), wt));
    let reader = TcpReader(FramedRead::new(
        r,
        FrameCodec::new(ctx.cfg.session.max_body),
    ));
    drive(ctx, reader, out, peer, Transport::Tcp).await;
    let _ = writer.await;
}
