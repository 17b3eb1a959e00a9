//! Admission and authentication of a connection, and its registration: the connection cap,
//! the first frame (op 7 Auth within the handshake timeout), logic's `connect`, registering the
//! session in its bucket (closing one it replaces) and joining its room before the AuthReply
//! goes out; and the reverse when the session ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rim_proto::frame::Frame;
use rim_proto::history::Source;
use rim_proto::msg::{AuthBody, AuthReplyBody};
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::ConnectRequest;

use crate::connection::{Connection, Transport};
use crate::ctx::Ctx;
use crate::io::reject_read;
use crate::logic::{LogicCallError, Notice};
use crate::outbound::{CloseSpec, Outbound};
use crate::recovery::{Resume, catch_up, queue};
use crate::session::{MAX_ACCEPTS, Session};
use crate::writer::Out;

/// Counts an open connection; the count drops with the guard. The connection's count at its
/// address (`limits`) is released by [`ConnGuard::end`] with the peer the driver holds anyway:
/// keeping the address in the guard would grow every idle session's task by 16 bytes. The
/// driver always runs to its end (sessions are closed, never dropped, on shutdown), so `end`
/// is called exactly once for every admitted connection.
pub(crate) struct ConnGuard {
    ctx: Arc<Ctx>,
    transport: Transport,
    /// Counted by the per-address limits (released by `end`).
    counted: bool,
}

/// Admits a new connection: `None` (its close requested on `out`, counted as refused) while
/// draining, when `session.max_connections` are open already, or when a per-address limit
/// (`[limits]`, see `limits`) refuses the peer.
pub(crate) fn admit(
    ctx: &Arc<Ctx>,
    out: &Outbound,
    peer: SocketAddr,
    t: Transport,
) -> Option<ConnGuard> {
    if ctx.shutdown.is_cancelled() {
        ctx.metrics.conn_refused.inc();
        out.close(CloseSpec::shutdown());
        return None;
    }
    let g = ConnGuard::count(ctx, t);
    if g.is_none() {
        ctx.metrics.conn_refused.inc();
        tracing::warn!(%peer, "max_connections reached, refusing connection");
        out.close(CloseSpec::reason("too many connections", 1013));
    }
    let mut g = g?;
    match ctx.limits.admit(peer.ip(), tokio::time::Instant::now()) {
        Ok(()) => g.counted = true,
        Err(r) => {
            ctx.metrics.limit_refused(r.label());
            // Debug: a flood must not flood the log too; the metric counts every refusal.
            tracing::debug!(%peer, limit = r.label(), "connection refused by a per-address limit");
            out.close(CloseSpec::policy(r.reason()));
            return None;
        }
    }
    Some(g)
}

impl ConnGuard {
    /// Counts a new connection, or `None` when `session.max_connections` are open already.
    fn count(ctx: &Arc<Ctx>, transport: Transport) -> Option<ConnGuard> {
        let max = ctx.cfg.session.max_connections;
        let prev = ctx.conns.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            ctx.conns.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        match transport {
            Transport::Tcp => ctx.metrics.conn_tcp.inc(),
            Transport::Ws => ctx.metrics.conn_ws.inc(),
        }
        Some(ConnGuard {
            ctx: ctx.clone(),
            transport,
            counted: false,
        })
    }

    /// Ends the connection admitted from `peer`: releases its per-address count, then (on drop)
    /// the connection count.
    pub(crate) fn end(self, peer: SocketAddr) {
        if self.counted {
            self.ctx.limits.release(peer.ip());
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.ctx.conns.fetch_sub(1, Ordering::AcqRel);
        match self.transport {
            Transport::Tcp => self.ctx.metrics.conn_tcp.dec(),
            Transport::Ws => self.ctx.metrics.conn_ws.dec(),
        }
    }
}

fn refuse_auth(ctx: &Ctx, out: &Outbound, metric: &str, reason: &str, peer: SocketAddr) {
    ctx.metrics.auth_failed(metric);
    tracing::info!(%peer, reason, "auth refused");
    out.close(CloseSpec::policy(reason));
}

/// An authenticated session and the heartbeat interval logic gave it.
pub(crate) struct Authed {
    pub(crate) session: Arc<Session>,
    pub(crate) heartbeat_secs: u32,
}

/// Reads and checks the Auth frame, authenticates it at logic, registers the session and joins
/// its room, then queues the AuthReply. `None` when the session is refused (its close is
/// requested on `out`).
pub(crate) async fn authenticate<C: Connection>(
    ctx: &Arc<Ctx>,
    conn: &mut C,
    out: &Arc<Outbound>,
    peer: SocketAddr,
    t: Transport,
) -> Option<Authed> {
    let hs = Duration::from_millis(ctx.cfg.session.handshake_timeout_ms);
    let first = tokio::select! {
        _ = ctx.shutdown.cancelled() => {
            out.close(CloseSpec::shutdown());
            return None;
        }
        r = tokio::time::timeout(hs, conn.next()) => r,
    };
    let auth = match first {
        Err(_) => {
            refuse_auth(ctx, out, "timeout", "auth timeout", peer);
            return None;
        }
        Ok(None) => {
            out.close(CloseSpec::silent("client closed"));
            return None;
        }
        Ok(Some(Err(e))) => {
            reject_read(ctx, out, e, peer, t);
            return None;
        }
        Ok(Some(Ok(f))) => f,
    };
    if auth.op != op::AUTH {
        let reason = format!("first frame must be op 7 Auth, got op {}", auth.op);
        refuse_auth(ctx, out, "not_auth", &reason, peer);
        return None;
    }
    let body: AuthBody = match serde_json::from_slice(&auth.body) {
        Ok(b) => b,
        Err(e) => {
            refuse_auth(ctx, out, "bad_body", &format!("bad auth body: {e}"), peer);
            return None;
        }
    };
    // Counted before logic is asked: `room_id` and `rooms` together, a repeat once.
    let max = ctx.cfg.session.max_rooms;
    let mut asked: Vec<&str> = Vec::new();
    for r in std::iter::once(&body.room_id).chain(&body.rooms) {
        let r = r.trim();
        if !r.is_empty() && !asked.contains(&r) {
            asked.push(r);
            if asked.len() > max {
                break;
            }
        }
    }
    if asked.len() > max {
        let reason = format!("too many rooms: at most {max}");
        refuse_auth(ctx, out, "too_many_rooms", &reason, peer);
        return None;
    }
    let resume = match body.recover.as_ref().map(Resume::parse).transpose() {
        Ok(r) => r,
        Err(e) => {
            refuse_auth(ctx, out, "bad_body", &format!("bad auth body: {e}"), peer);
            return None;
        }
    };
    let req = ConnectRequest {
        server: ctx.cfg.server_id.clone(),
        auth: body,
        remote_ip: peer.ip().to_string(),
    };
    let reply = match ctx.logic.connect(req).await {
        Ok(r) => r,
        Err(LogicCallError::Refused(e)) => {
            refuse_auth(ctx, out, "refused", &e.to_string(), peer);
            return None;
        }
        Err(LogicCallError::Unreachable(e)) => {
            tracing::warn!(%peer, error = %e, "logic unreachable during auth");
            refuse_auth(ctx, out, "logic_unavailable", "logic unavailable", peer);
            return None;
        }
    };
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    if reply.accepts.len() > MAX_ACCEPTS {
        tracing::debug!(%peer, key = %reply.key, n = reply.accepts.len(), "auth accepts truncated to {MAX_ACCEPTS}");
    }
    let session = Arc::new(
        Session::new(
            id,
            reply.mid,
            reply.key.clone(),
            peer,
            out.clone(),
            &reply.accepts,
        )
        .with_since(reply.since_ms)
        .with_tagged(resume.is_some()),
    );
    session.set_grant(reply.grant.clone());
    ctx.set_guarded_room_types(&reply.guarded_room_types);
    ctx.set_partitions(reply.partitions);
    if reply.replaced_elsewhere {
        // The older session elsewhere is closed by a kick job logic queued; nothing to do here.
        tracing::debug!(%peer, key = %reply.key, "session replaces one on another comet");
    }
    // A reply without `rooms` (a logic that names only `room`) joins that one room.
    let rooms: Vec<RoomId> = if reply.rooms.is_empty() {
        reply.room.iter().cloned().collect()
    } else {
        reply.rooms.clone()
    };
    // What the session catches up on (messages waiting for the device, Auth's `recover`): its
    // live pushes of those histories are held from the moment it can get any until the
    // histories were read, so the two merge in order.
    let wants = Resume::wants(resume.as_ref(), reply.offline_after, &rooms);
    for (source, _) in &wants {
        session.begin_catch_up(source.clone());
    }
    if let Some(old) = ctx.buckets.insert(session.clone()) {
        tracing::info!(key = %old.key, "same key authenticated again, replacing older session");
        old.out.close(CloseSpec::reason("replaced", 1000));
    }
    for room in &rooms {
        ctx.rooms.join(&ctx.buckets, &session, room.clone()).await;
    }
    let (complete, items) = if wants.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        catch_up(ctx, &session, wants.clone()).await
    };
    let body = AuthReplyBody {
        mid: reply.mid,
        key: reply.key.clone(),
        room_id: rooms.first().map(|r| r.to_string()).unwrap_or_default(),
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        heartbeat: reply.heartbeat_secs,
        token_expires_ms: reply.grant.expires_ms,
        recovered: resume.as_ref().map(|r| r.recovered(&wants, &complete)),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    // Ahead of anything the session was given since it could be found (the writer starts once
    // this returns), and written once what was recovered is known.
    session
        .out
        .offer_front(Out::Reply(Frame::new(op::AUTH_REPLY, auth.seq, body)));
    queue(ctx, &session, items);
    tracing::debug!(%peer, mid = reply.mid, key = %reply.key, since_ms = reply.since_ms, "session authenticated");
    Some(Authed {
        session,
        heartbeat_secs: reply.heartbeat_secs,
    })
}

/// Removes an ended session: room, bucket, and (if still the registered one) logic.
pub(crate) fn end_session(ctx: &Ctx, s: &Session) {
    ctx.rooms.leave(&ctx.buckets, s);
    if !ctx.buckets.remove(s) {
        // Replaced by a newer session with the same key: its registration is the new one's.
        return;
    }
    let seen = ctx
        .history_partition(&Source::User, s.mid)
        .and_then(|p| s.user_seen(p));
    ctx.notify(Notice::Disconnect { seen }, s);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{MemLogic, WAIT, auth_body, comet, connect};

    /// logic refusing the Auth closes with op 6 carrying its reason, as a policy close (1008 on
    /// WebSocket), counted as `refused`; nothing is registered, so logic hears no disconnect.
    #[tokio::test(start_paused = true)]
    async fn auth_refused_by_logic_closes_with_its_reason_as_a_policy_close() {
        let logic = MemLogic::new(30);
        let ctx = comet(logic.clone(), |_| {});
        let mut c = connect(&ctx);
        let deny = AuthBody {
            token: "deny".into(),
            ..auth_body("d", "live://1")
        };
        c.send(op::AUTH, 1, serde_json::to_vec(&deny).unwrap());
        let spec = c.closed(WAIT).await.expect("closed");
        assert_eq!(spec, CloseSpec::policy("unauthorized: bad token"));
        assert_eq!((spec.ws_code, spec.op6, spec.op6_on_ws), (1008, true, true));
        c.task.await.unwrap();
        assert_eq!(ctx.metrics.auth_failures[3].get(), 1, "reason=refused");
        assert!(ctx.buckets.get("d").is_none());
        ctx.tracker.close();
        ctx.tracker.wait().await;
        assert_eq!(
            logic.calls(),
            vec!["connect d"],
            "no room join, no disconnect"
        );
        assert_eq!(ctx.metrics.conn_tcp.get(), 0);
    }

    /// An Auth asking for more than `session.max_rooms` rooms (`room_id` and `rooms`, a repeat
    /// counted once) is refused before logic is asked; one within the bound joins them all.
    #[tokio::test(start_paused = true)]
    async fn auth_with_more_rooms_than_max_rooms_is_refused() {
        let logic = MemLogic::new(30);
        let ctx = comet(logic.clone(), |c| c.session.max_rooms = 2);
        let mut c = connect(&ctx);
        let many = AuthBody {
            rooms: vec!["live://2".into(), "live://1".into(), "live://3".into()],
            ..auth_body("r", "live://1")
        };
        c.send(op::AUTH, 1, serde_json::to_vec(&many).unwrap());
        let spec = c.closed(WAIT).await.expect("closed");
        assert_eq!(spec, CloseSpec::policy("too many rooms: at most 2"));
        c.task.await.unwrap();
        assert_eq!(
            ctx.metrics.auth_failures[5].get(),
            1,
            "reason=too_many_rooms"
        );
        assert!(logic.calls_of("connect").is_empty());

        let mut c = connect(&ctx);
        let two = AuthBody {
            rooms: vec!["live://2".into(), "live://1".into()],
            ..auth_body("ok", "live://1")
        };
        c.send(op::AUTH, 1, serde_json::to_vec(&two).unwrap());
        let r = c.reply().await;
        let body: AuthReplyBody = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((body.room_id.as_str(), body.rooms.len()), ("live://1", 2));
        let s = ctx.buckets.get("ok").unwrap();
        assert_eq!(s.rooms().len(), 2);
        assert_eq!(ctx.buckets.room_len(&RoomId::parse("live://2").unwrap()), 1);
    }

    /// logic unreachable during Auth: "logic unavailable", counted as `logic_unavailable`.
    #[tokio::test(start_paused = true)]
    async fn auth_without_logic_closes_as_logic_unavailable() {
        let logic = MemLogic::new(30);
        logic.fail("connect", 1);
        let ctx = comet(logic.clone(), |_| {});
        let mut c = connect(&ctx);
        c.send(
            op::AUTH,
            1,
            serde_json::to_vec(&auth_body("u", "")).unwrap(),
        );
        let spec = c.closed(WAIT).await.expect("closed");
        assert_eq!(spec, CloseSpec::policy("logic unavailable"));
        assert_eq!(
            ctx.metrics.auth_failures[4].get(),
            1,
            "reason=logic_unavailable"
        );
        // The next Auth gets through.
        let mut c = connect(&ctx);
        c.auth(&auth_body("u", "")).await;
    }

    /// Silence instead of an Auth: closed after the handshake timeout, counted as `timeout`.
    #[tokio::test(start_paused = true)]
    async fn no_auth_within_the_handshake_timeout_closes() {
        let logic = MemLogic::new(30);
        let ctx = comet(logic, |c| c.session.handshake_timeout_ms = 5000);
        let mut c = connect(&ctx);
        let t0 = tokio::time::Instant::now();
        let spec = c.closed(WAIT).await.expect("closed");
        assert_eq!(spec, CloseSpec::policy("auth timeout"));
        assert_eq!(t0.elapsed(), Duration::from_millis(5000));
        assert_eq!(ctx.metrics.auth_failures[0].get(), 1, "reason=timeout");
    }

    /// The guard lives in every session's task: the per-address count must not grow it.
    #[test]
    fn conn_guard_stays_two_words() {
        assert_eq!(std::mem::size_of::<ConnGuard>(), 16);
    }

    /// `limits.sessions_per_ip = 2`: a third connection from the same address is refused before
    /// its Auth with op 6 "too many sessions from this address" (1008), counted; once one of the
    /// two ends, the next is admitted.
    #[tokio::test(start_paused = true)]
    async fn sessions_per_ip_refuses_the_third_and_admits_after_one_ends() {
        let logic = MemLogic::new(30);
        let ctx = comet(logic.clone(), |c| {
            c.limits.sessions_per_ip = 2;
            c.limits.exempt_loopback = false;
        });
        let mut a = connect(&ctx);
        a.auth(&auth_body("a", "")).await;
        let mut b = connect(&ctx);
        b.auth(&auth_body("b", "")).await;
        let mut c = connect(&ctx);
        let spec = c.closed(WAIT).await.expect("refused");
        assert_eq!(
            spec,
            CloseSpec::policy("too many sessions from this address")
        );
        assert_eq!((spec.ws_code, spec.op6_on_ws), (1008, true));
        c.task.await.unwrap();
        assert_eq!(
            ctx.metrics.limit_refused[0].get(),
            1,
            "limit=sessions_per_ip"
        );
        assert_eq!(ctx.metrics.conn_tcp.get(), 2);
        assert_eq!(logic.calls_of("connect").len(), 2, "refused before auth");

        a.hang_up();
        a.task.await.unwrap();
        let mut d = connect(&ctx);
        d.auth(&auth_body("d", "")).await;
        assert_eq!(ctx.metrics.limit_refused[0].get(), 1);
        b.hang_up();
        d.hang_up();
        b.task.await.unwrap();
        d.task.await.unwrap();
        assert_eq!(ctx.limits.tracked().0, 0, "released exactly once each");
    }

    /// `limits.auth_per_ip_per_sec = 1`, burst 2: the third connection at once is refused with
    /// "too many attempts", counted; a second later one is admitted again.
    #[tokio::test(start_paused = true)]
    async fn auth_attempts_per_ip_trip_and_recover() {
        let logic = MemLogic::new(30);
        let ctx = comet(logic.clone(), |c| {
            c.limits.auth_per_ip_per_sec = 1;
            c.limits.auth_per_ip_burst = 2;
            c.limits.exempt_loopback = false;
        });
        let mut a = connect(&ctx);
        a.auth(&auth_body("a", "")).await;
        let mut b = connect(&ctx);
        b.auth(&auth_body("b", "")).await;
        let mut c = connect(&ctx);
        assert_eq!(
            c.closed(WAIT).await.expect("refused"),
            CloseSpec::policy("too many attempts")
        );
        assert_eq!(ctx.metrics.limit_refused[1].get(), 1, "limit=auth_per_ip");
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut d = connect(&ctx);
        d.auth(&auth_body("d", "")).await;
        assert_eq!(ctx.metrics.limit_refused[1].get(), 1);
    }

    /// Messages waiting in the user's history reach the device right after the AuthReply and
    /// before live pushes that arrived while they were read; a message both carried is given
    /// once, a late replay of one is a duplicate, and the disconnect reports how far it got.
    #[tokio::test(start_paused = true)]
    async fn offline_messages_come_after_the_auth_reply_and_before_live_pushes_once() {
        use rim_proto::rpc::{DeliverTarget, Delivery, PushId};
        let logic = MemLogic::new(30);
        logic.set_offline(&[3, 4]);
        logic.hold("history");
        let ctx = comet(logic.clone(), |_| {});
        let mut c = connect(&ctx);
        c.send(
            op::AUTH,
            1,
            serde_json::to_vec(&auth_body("d", "")).unwrap(),
        );
        logic.called("history d").await;
        let p = ctx.history_partition(&Source::User, 7).unwrap();
        let live = |seq: u64| Delivery {
            id: PushId {
                partition: p,
                ms: 1,
                seq,
            },
            op: 1000,
            body: format!("m{seq}").into(),
            target: DeliverTarget::Keys(vec!["d".into()]),
            exclude: None,
            recorded: true,
        };
        // Job delivers 4 (also in the history) and 5 while the history is read.
        let rep = crate::deliver::deliver_items(&ctx, vec![live(4), live(5)]);
        assert_eq!((rep.queued, rep.duplicates), (2, 0));
        logic.release();
        assert_eq!(c.reply().await.op, op::AUTH_REPLY);
        let mut bodies = Vec::new();
        while bodies.len() < 3 {
            match c.next_item(WAIT).await {
                Some(Out::Push(p)) => bodies.push(p.body().to_vec()),
                Some(Out::Batch(b)) => bodies.extend(b.pushes().iter().map(|p| p.body().to_vec())),
                other => panic!("expected pushes, got {other:?}"),
            }
        }
        assert_eq!(bodies, [b"m3".to_vec(), b"m4".to_vec(), b"m5".to_vec()]);
        assert_eq!(
            ctx.metrics.caught_up.get(),
            1,
            "m3 only came from the history"
        );
        // Job was behind the read: 3 arriving live now is a duplicate.
        let rep = crate::deliver::deliver_items(&ctx, vec![live(3)]);
        assert_eq!(rep.duplicates, 1);
        assert!(c.next_item(Duration::from_millis(50)).await.is_none());
        c.hang_up();
        logic.called("disconnect d seen 1-5").await;
    }

    /// A catch-up logic cannot answer releases the held live pushes and reports where it
    /// started, so the device gets its offline messages at its next connect.
    #[tokio::test(start_paused = true)]
    async fn a_failed_catch_up_keeps_live_pushes_and_reports_no_position() {
        let logic = MemLogic::new(30);
        logic.set_offline(&[1]);
        logic.fail("history", 1);
        let ctx = comet(logic.clone(), |_| {});
        let mut c = connect(&ctx);
        c.auth(&auth_body("d", "")).await;
        assert_eq!(ctx.metrics.catch_up_failed.get(), 1);
        assert!(c.next_item(Duration::from_millis(50)).await.is_none());
        c.hang_up();
        // Where the catch-up started: the messages wait for the next connect.
        logic.called("disconnect d seen 0-0").await;
    }
}
