//! Raw TCP transport: frames back to back on the stream, on a plain socket (`listen.tcp`) or
//! inside TLS (`listen.tls`, the same frames). The stream is one [`Connection`] driven by one
//! task; the session code is the same for both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rim_proto::frame::{CodecError, Frame, FrameCodec, FrameError};
use rim_runtime::proxy_protocol::read_header;
use rim_runtime::tls::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;

use crate::connection::{Connection, ReadError, Transport};
use crate::ctx::Ctx;
use crate::driver::drive;
use crate::outbound::CloseSpec;
use crate::writer::{Out, disconnect_frame, tcp_bytes};

/// A TCP session. The read buffer holds at most one frame and is released between frames
/// (the codec reserves exactly the header, then exactly the body), so an idle session owns
/// none; a buffered reader would keep 8 KiB per session for nothing.
pub(crate) struct TcpConn<S> {
    stream: S,
    buf: BytesMut,
    codec: FrameCodec,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Connection for TcpConn<S> {
    async fn next(&mut self) -> Option<Result<Frame, ReadError>> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => {
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    return Some(Ok(f));
                }
                Ok(None) => {}
                Err(CodecError::Frame(e)) => return Some(Err(ReadError::Frame(e))),
                Err(CodecError::Io(e)) => return Some(Err(ReadError::Io(e.to_string()))),
            }
            // Cancel-safe: bytes read are in `buf` whether or not the caller keeps waiting.
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return None,
                Ok(0) => {
                    return Some(Err(ReadError::Frame(FrameError::Truncated {
                        buffered: self.buf.len(),
                    })));
                }
                Ok(_) => {}
                Err(e) => return Some(Err(ReadError::Io(e.to_string()))),
            }
        }
    }

    async fn write(&mut self, batch: &[Out]) -> Result<(), String> {
        let b = tcp_bytes(batch);
        self.stream.write_all(&b).await.map_err(|e| e.to_string())?;
        self.stream.flush().await.map_err(|e| e.to_string())
    }

    async fn finish(&mut self, spec: &CloseSpec) -> Result<(), String> {
        if spec.op6 {
            let f = disconnect_frame(&spec.reason);
            self.stream
                .write_all(&f.to_bytes())
                .await
                .map_err(|e| e.to_string())?;
        }
        self.stream.flush().await.map_err(|e| e.to_string())?;
        self.stream.shutdown().await.map_err(|e| e.to_string())
    }
}

/// Accepts TCP clients until shutdown; each connection runs in its own tracked task. With
/// `tls`, each connection first finishes its TLS handshake (under the acceptor's deadline).
pub(crate) async fn accept_loop(ctx: Arc<Ctx>, listener: TcpListener, tls: Option<Acceptor>) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (c, tls) = (ctx.clone(), tls.clone());
                ctx.tracker.spawn(async move {
                    // The PROXY header comes first, before TLS: the balancer knows nothing of it.
                    let Some((stream, peer)) = proxied(&c, stream, peer).await else {
                        return;
                    };
                    match tls {
                        None => serve(c, stream, peer).await,
                        Some(tls) => serve_tls(c, tls, stream, peer).await,
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The client behind `peer`: with `limits.proxy_protocol`, a trusted proxy's connection must
/// start with a PROXY header naming it (read within the handshake timeout); `None` (counted,
/// closed) when it does not. Anyone else is the client.
async fn proxied(
    ctx: &Ctx,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(TcpStream, SocketAddr)> {
    if !ctx.cfg.limits.proxy_protocol || !ctx.limits.is_trusted_proxy(peer.ip()) {
        return Some((stream, peer));
    }
    let wait = Duration::from_millis(ctx.cfg.session.handshake_timeout_ms);
    let read = tokio::select! {
        r = tokio::time::timeout(wait, read_header(&mut stream)) => r,
        () = ctx.shutdown.cancelled() => return None,
    };
    let why = match read {
        Ok(Ok(Some(client))) => return Some((stream, client)),
        // LOCAL / UNKNOWN: the balancer's own connection (a health check).
        Ok(Ok(None)) => return Some((stream, peer)),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no PROXY protocol header within the handshake timeout".to_string(),
    };
    ctx.metrics.limit_refused("proxy_header");
    rim_runtime::warn_throttled!(%peer, reason = %why, "connection from a trusted proxy refused");
    None
}

async fn serve_tls(ctx: Arc<Ctx>, tls: Acceptor, stream: TcpStream, peer: SocketAddr) {
    let handshake = tokio::select! {
        s = tls.accept(stream, peer) => s,
        () = ctx.shutdown.cancelled() => None,
    };
    if let Some(stream) = handshake {
        serve(ctx, stream, peer).await;
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ctx: Arc<Ctx>,
    stream: S,
    peer: SocketAddr,
) {
    let conn = TcpConn {
        stream,
        buf: BytesMut::new(),
        codec: FrameCodec::new(ctx.cfg.session.max_body),
    };
    drive(ctx, conn, peer, Transport::Tcp).await;
}
