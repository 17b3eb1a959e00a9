//! A session's way out: writing its queue to the connection (also while a frame handler waits on
//! logic), turning a failed read into the right close, and performing the close itself. The
//! first close requested on the queue wins; this module only carries it out.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rim_proto::frame::FrameError;

use crate::connection::{Connection, ReadError, Transport};
use crate::ctx::Ctx;
use crate::outbound::{CloseSpec, Outbound};

/// Closes the session for a failed read: malformed input is counted and answered (op 6 or a
/// WebSocket close code), a socket error closes silently.
pub(crate) fn reject_read(
    ctx: &Ctx,
    out: &Outbound,
    err: ReadError,
    peer: SocketAddr,
    t: Transport,
) {
    match err {
        ReadError::Frame(e) => {
            let reason = if matches!(e, FrameError::TooBig { .. }) {
                "too_big"
            } else {
                "malformed"
            };
            ctx.metrics.frame_rejected(reason);
            tracing::warn!(%peer, transport = t.name(), reason = %e, "invalid frame, closing");
            out.close(CloseSpec::protocol(&e.to_string(), e.ws_close_code()));
        }
        ReadError::Json(e) => {
            ctx.metrics.frame_rejected("bad_json");
            tracing::warn!(%peer, transport = t.name(), reason = %e, "invalid JSON frame, closing");
            out.close(CloseSpec::protocol(&e, 1002));
        }
        ReadError::Io(e) => {
            tracing::debug!(%peer, transport = t.name(), error = %e, "read failed");
            out.close(CloseSpec::silent(&e));
        }
    }
}

/// Writes everything queued (unless a close was requested: the close decides what still goes
/// out). False when the socket failed; the session is then closing.
pub(crate) async fn flush<C: Connection>(conn: &mut C, out: &Outbound, wt: Duration) -> bool {
    loop {
        if out.is_closing() {
            return true;
        }
        let batch = out.take_batch();
        if batch.is_empty() {
            return true;
        }
        if let Err(e) = timed(wt, conn.write(&batch)).await {
            tracing::debug!(error = %e, "session write failed");
            out.close(CloseSpec::silent(&e));
            return false;
        }
    }
}

/// Runs `work` (a frame handler that may wait on logic) while still writing what is queued
/// meanwhile, so a slow call does not stall the session's pushes into a slow-consumer close.
pub(crate) async fn while_writing<C: Connection, F: Future<Output = ()>>(
    conn: &mut C,
    out: &Outbound,
    wt: Duration,
    work: F,
) {
    tokio::pin!(work);
    let mut writable = true;
    loop {
        tokio::select! {
            biased;
            () = &mut work => return,
            _ = out.changed(), if writable && !out.is_closing() => {
                writable = flush(conn, out, wt).await;
            }
        }
    }
}

/// Performs the requested close: what is still queued first when the close asks for it, then
/// op 6 and the close frame, each write bounded by `wt`.
pub(crate) async fn close<C: Connection>(conn: &mut C, out: &Outbound, wt: Duration) {
    let spec = out.spec().unwrap_or_else(|| CloseSpec::silent("closed"));
    if spec.drain {
        // Replies and pushes already queued still go out before the close (shutdown, kick).
        loop {
            let batch = out.take_batch();
            if batch.is_empty() {
                break;
            }
            if timed(wt, conn.write(&batch)).await.is_err() {
                return;
            }
        }
    }
    if let Err(e) = timed(wt, conn.finish(&spec)).await {
        tracing::debug!(error = %e, "session close write failed");
    }
}

/// `f` under a deadline of `t`.
async fn timed<F: Future<Output = Result<(), String>>>(t: Duration, f: F) -> Result<(), String> {
    match tokio::time::timeout(t, f).await {
        Ok(r) => r.map_err(|e| format!("write failed: {e}")),
        Err(_) => Err("write timed out".to_string()),
    }
}
