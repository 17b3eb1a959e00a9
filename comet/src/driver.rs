//! The protocol driver of one connection, independent of the transport: admission, auth, the
//! frame loop (reading client frames, writing what is queued, the heartbeat deadline, renewing
//! the registration), the end of the session and the close. It runs in the connection's own task
//! and is the only reader and writer of the connection.
//!
//! Built for many idle sessions: the rare or bulky phases (auth, writes, frame handlers, the
//! close) are boxed futures, so between frames the task keeps only the frame loop's small state
//! (see docs/benchmarks.md, S1).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

// The runtime's clock, so tests can pause it; the same as `std`'s when not paused.
use tokio::time::Instant;

use crate::admission::{Authed, admit, authenticate, end_session};
use crate::client_op::{ClientOp, FrameState};
use crate::connection::{Connection, Transport};
use crate::ctx::Ctx;
use crate::io::{close, flush, reject_read, while_writing};
use crate::logic::Notice;
use crate::outbound::{CloseSpec, Outbound};

/// Runs one connection from accept to close, in the caller's task: admission, auth, the frame
/// loop (reading frames and writing what is queued for the session), cleanup, and the close.
pub(crate) async fn drive<C: Connection>(
    ctx: Arc<Ctx>,
    mut conn: C,
    peer: SocketAddr,
    t: Transport,
) {
    let out = Outbound::new(ctx.cfg.session.outbound_queue);
    let wt = Duration::from_millis(ctx.cfg.session.write_timeout_ms);
    let guard = admit(&ctx, &out, peer, t);
    if guard.is_some() {
        // Boxed: the auth phase (logic's connect, the room join) is the largest state of the
        // driver and runs once; the task keeps only the small steady state for its lifetime.
        if let Some(a) = Box::pin(authenticate(&ctx, &mut conn, &out, peer, t)).await {
            serve(&ctx, &mut conn, &a, peer, t, wt).await;
            end_session(&ctx, &a.session);
        }
    }
    // Boxed like the other rare or bulky phases, so an idle session's task holds only the
    // frame loop's state.
    Box::pin(close(&mut conn, &out, wt)).await;
    if let Some(g) = guard {
        g.end(peer);
    }
}

/// The frame loop of an authenticated session: writes what is queued, reads frames, closes a
/// session silent for `heartbeat * heartbeat_misses`, renews the registration at most every
/// [`renew_interval`]. Returns once the session is closing.
async fn serve<C: Connection>(
    ctx: &Arc<Ctx>,
    conn: &mut C,
    a: &Authed,
    peer: SocketAddr,
    t: Transport,
    wt: Duration,
) {
    let session = &a.session;
    let out = &session.out;
    let hb = u64::from(a.heartbeat_secs.max(1));
    let idle = Duration::from_secs(hb * u64::from(ctx.cfg.session.heartbeat_misses));
    let renew_every = renew_interval(ctx.cfg.session.renew_session_ms, a.heartbeat_secs);
    let mut last_renew = Instant::now();
    // Only client frames move the deadline; pushes going out do not keep a silent client alive.
    let mut deadline = Instant::now() + idle;
    // The token's end, on the runtime's clock; recomputed only when a fresh token (op 22) moved
    // it, so converting from wall-clock time happens once per token.
    let mut expires_ms = session.expires_ms();
    let mut token_end = token_deadline(expires_ms);
    let mut st = FrameState::new(&ctx.cfg.session);
    loop {
        // Boxed, at one allocation per written batch (which already allocates its messages): the
        // write future is the frame loop's largest state, and an idle session should not carry it.
        if !out.is_empty() && !Box::pin(flush(conn, out, wt)).await {
            break;
        }
        if out.is_closing() {
            break;
        }
        // Client frames before the queue's wake-up: the queue is written at the top of every
        // iteration anyway, and a queue refilled during each write must not keep a busy
        // session's heartbeats unread (two tasks never had that problem; one task must not).
        let r = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => {
                out.close(CloseSpec::shutdown());
                break;
            }
            r = tokio::time::timeout_at(token_end.map_or(deadline, |t| t.min(deadline)), conn.next()) => r,
            _ = out.changed() => continue,
        };
        match r {
            // The token ended: at the deadline, or with a frame already waiting then (not served).
            Err(_) | Ok(Some(Ok(_))) if token_end.is_some_and(|t| t <= Instant::now()) => {
                ctx.metrics.token_expired.inc();
                tracing::info!(%peer, key = %session.key, "token expired");
                out.close(CloseSpec::policy("token expired"));
                break;
            }
            Err(_) => {
                ctx.metrics.heartbeat_timeouts.inc();
                tracing::info!(%peer, key = %session.key, "heartbeat timeout");
                out.close(CloseSpec::reason("heartbeat timeout", 1000));
                break;
            }
            Ok(None) => {
                out.close(CloseSpec::silent("client closed"));
                break;
            }
            Ok(Some(Err(e))) => {
                reject_read(ctx, out, e, peer, t);
                break;
            }
            Ok(Some(Ok(f))) => {
                deadline = Instant::now() + idle;
                // Any frame keeps the session alive, so any frame renews the registration; a
                // client that only sends op 4 must not expire at logic.
                if last_renew.elapsed() >= renew_every {
                    last_renew = Instant::now();
                    ctx.notify(Notice::Heartbeat, session);
                }
                // Boxed: handlers that wait on logic are large and rare; the task stays small.
                let work = Box::pin(ClientOp::parse(f).apply(ctx, session, &mut st));
                Box::pin(while_writing(conn, out, wt, work)).await;
                if session.expires_ms() != expires_ms {
                    expires_ms = session.expires_ms();
                    token_end = token_deadline(expires_ms);
                }
            }
        }
    }
}

/// When a token ending at `expires_ms` (unix ms; 0 = never) ends, on the runtime's clock.
/// An end too far ahead to represent is treated as never (a JWT may carry any `exp`).
fn token_deadline(expires_ms: u64) -> Option<Instant> {
    if expires_ms == 0 {
        return None;
    }
    Instant::now().checked_add(Duration::from_millis(
        expires_ms.saturating_sub(rim_runtime::unix_ms()),
    ))
}

/// How often a session's registration is renewed at logic at most. logic's TTL is
/// `heartbeat_secs * (misses + 1)`, at least two heartbeat intervals, and a live client sends a
/// frame at least every `heartbeat_secs * misses`; renewing at most every heartbeat interval (or
/// `renew_session_ms` when shorter) therefore always lands within the TTL.
pub(crate) fn renew_interval(renew_session_ms: u64, heartbeat_secs: u32) -> Duration {
    let hb_ms = u64::from(heartbeat_secs.max(1)) * 1000;
    Duration::from_millis(renew_session_ms.min(hb_ms))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{WAIT, authed};
    use rim_proto::op;

    /// Heartbeat 30 s, 3 misses: a session silent for 90 s is closed, not a moment earlier, and
    /// any client frame moves the deadline.
    #[tokio::test(start_paused = true)]
    async fn heartbeat_silence_closes_the_session_and_unregisters_it() {
        let (logic, ctx, mut c) = authed(30, |c| c.session.heartbeat_misses = 3, "quiet", "").await;
        let t0 = Instant::now();

        // A heartbeat at 60 s moves the deadline to 150 s.
        assert!(c.closed(Duration::from_secs(60)).await.is_none());
        let hb = c.request(op::HEARTBEAT, 2, Vec::new()).await;
        assert_eq!(hb.op, op::HEARTBEAT_REPLY);
        assert!(
            c.closed(Duration::from_secs(90) - Duration::from_millis(1))
                .await
                .is_none(),
            "closed before the deadline"
        );
        let spec = c.closed(WAIT).await.expect("closed at the deadline");
        assert_eq!(spec, CloseSpec::reason("heartbeat timeout", 1000));
        assert_eq!(Instant::now() - t0, Duration::from_secs(150));
        assert_eq!(ctx.metrics.heartbeat_timeouts.get(), 1);
        logic.called("disconnect quiet").await;
        assert!(ctx.buckets.get("quiet").is_none());
        c.task.await.unwrap();
        assert_eq!(ctx.metrics.conn_tcp.get(), 0);
    }

    /// Heartbeat 1 s: any frame (not only a heartbeat) renews the registration at logic, at most
    /// once per heartbeat interval (renew_session_ms is 60 s, so the interval caps it).
    #[tokio::test(start_paused = true)]
    async fn any_frame_renews_the_session_at_most_once_per_heartbeat_interval() {
        let (logic, ctx, mut c) = authed(1, |c| c.session.heartbeat_misses = 5, "busy", "").await;

        tokio::time::advance(Duration::from_millis(900)).await;
        assert_eq!(c.request(op::SUB, 2, "1001").await.op, op::SUB_REPLY);
        tokio::time::advance(Duration::from_millis(200)).await;
        // 1.1 s after auth: a Sub, not a heartbeat, renews.
        assert_eq!(c.request(op::SUB, 3, "1002").await.op, op::SUB_REPLY);
        logic.called("heartbeat busy").await;
        assert_eq!(
            c.request(op::HEARTBEAT, 4, Vec::new()).await.op,
            op::HEARTBEAT_REPLY
        );
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(
            c.request(op::HEARTBEAT, 5, Vec::new()).await.op,
            op::HEARTBEAT_REPLY
        );
        logic.called_n("heartbeat busy", 2).await;
        c.hang_up();
        c.task.await.unwrap();
        ctx.tracker.close();
        ctx.tracker.wait().await;
        assert_eq!(logic.calls_of("heartbeat").len(), 2, "{:?}", logic.calls());
    }

    #[test]
    fn renewal_interval_fits_the_ttl() {
        assert_eq!(renew_interval(60_000, 30), Duration::from_secs(30));
        assert_eq!(renew_interval(10_000, 30), Duration::from_secs(10));
        assert_eq!(renew_interval(60_000, 0), Duration::from_secs(1));
    }
}
