//! One client session: its shared handle (what delivery and buckets see) and the protocol driver
//! that runs it from the first frame (Auth) to the close, independent of the transport.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rim_proto::frame::{Frame, FrameError};
use rim_proto::msg::{AuthBody, AuthReplyBody};
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::{ConnectRequest, PushId, SessionRef};

use crate::outbound::{CloseSpec, Outbound};
use crate::server::Ctx;
use crate::upstream::TokenBucket;
use crate::writer::Out;

/// The shared handle of an authenticated session.
#[derive(Debug)]
pub struct Session {
    /// Unique per connection on this comet (tells a replaced session from its successor).
    pub id: u64,
    /// User id.
    pub mid: i64,
    /// Session key.
    pub key: String,
    /// Client address.
    pub peer: SocketAddr,
    /// Outbound queue.
    pub out: Arc<Outbound>,
    /// When logic registered this session (its `ConnectReply::since_ms`): identifies it in kicks,
    /// so a late kick for an older session with the same key leaves this one alone.
    pub since_ms: u64,
    /// Sorted, without duplicates: one op is the common case, so a small vector, not a set.
    accepts: RwLock<Vec<i32>>,
    /// Highest push id delivered per dedupe namespace (see [`MarkSpace`]); a session sees few
    /// partitions, so a small vec.
    marks: Mutex<Vec<(u32, u64, u64)>>,
    room: Mutex<Option<RoomId>>,
}

/// `ops` sorted and deduplicated, holding no spare capacity.
fn sorted_ops(ops: impl Iterator<Item = i32>) -> Vec<i32> {
    let mut v: Vec<i32> = ops.collect();
    v.sort_unstable();
    v.dedup();
    v.shrink_to_fit();
    v
}

/// Most ops one session may accept (Auth `accepts` plus Sub); a client cannot grow its filter
/// set without bound.
pub const MAX_ACCEPTS: usize = 256;

/// Which high-water mark a push is checked against.
///
/// Paced broadcasts (`All { speed > 0 }`) reach sessions long after pushes that job sent later
/// on the same partition, so they keep marks of their own: ordered among themselves (one paced
/// worker per comet) and independent of everything delivered at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkSpace {
    /// Everything delivered during the `deliver` call.
    Immediate,
    /// Paced broadcasts.
    Paced,
}

impl MarkSpace {
    /// The mark key: partitions are u16, so bit 16 keeps the two spaces apart for any partition.
    fn key(self, partition: u16) -> u32 {
        match self {
            MarkSpace::Immediate => u32::from(partition),
            MarkSpace::Paced => u32::from(partition) | 0x1_0000,
        }
    }
}

impl Session {
    /// A session accepting `accepts`.
    pub fn new(
        id: u64,
        mid: i64,
        key: String,
        peer: SocketAddr,
        out: Arc<Outbound>,
        accepts: &[i32],
    ) -> Self {
        Session {
            id,
            mid,
            key,
            peer,
            out,
            since_ms: 0,
            accepts: RwLock::new(sorted_ops(accepts.iter().copied().take(MAX_ACCEPTS))),
            marks: Mutex::new(Vec::new()),
            room: Mutex::new(None),
        }
    }

    /// Sets the registration time logic reported (see [`Session::since_ms`]).
    pub fn with_since(mut self, since_ms: u64) -> Self {
        self.since_ms = since_ms;
        self
    }

    /// Whether a push with `op` goes to this session.
    pub fn accepts(&self, op: i32) -> bool {
        self.accepts.read().binary_search(&op).is_ok()
    }

    /// Adds (Sub) or removes (Unsub) accepted ops. A Sub that would leave more than
    /// [`MAX_ACCEPTS`] ops changes nothing and is refused with the reason.
    pub fn set_accepts(&self, ops: &[i32], accept: bool) -> Result<(), String> {
        let mut a = self.accepts.write();
        let next = if accept {
            let next = sorted_ops(a.iter().chain(ops).copied());
            if next.len() > MAX_ACCEPTS {
                return Err(format!("too many ops: at most {MAX_ACCEPTS}"));
            }
            next
        } else {
            sorted_ops(a.iter().copied().filter(|op| !ops.contains(op)))
        };
        *a = next;
        Ok(())
    }

    /// Records `id` as delivered; false when it (or a later push of its partition) already was.
    pub fn mark(&self, id: PushId) -> bool {
        self.mark_in(MarkSpace::Immediate, id)
    }

    /// [`Session::mark`] against the high-water marks of `space`.
    pub fn mark_in(&self, space: MarkSpace, id: PushId) -> bool {
        let key = space.key(id.partition);
        let mut marks = self.marks.lock();
        match marks.iter_mut().find(|m| m.0 == key) {
            Some(m) if (id.ms, id.seq) <= (m.1, m.2) => false,
            Some(m) => {
                m.1 = id.ms;
                m.2 = id.seq;
                true
            }
            None => {
                marks.push((key, id.ms, id.seq));
                true
            }
        }
    }

    /// Takes over `old`'s high-water marks (a session replacing `old` with the same key on this
    /// comet): a takeover replay of pushes `old` already got must not show the client duplicates.
    pub fn inherit_marks(&self, old: &Session) {
        let theirs = old.marks.lock().clone();
        let mut mine = self.marks.lock();
        for (key, ms, seq) in theirs {
            match mine.iter_mut().find(|m| m.0 == key) {
                Some(m) if (ms, seq) > (m.1, m.2) => (m.1, m.2) = (ms, seq),
                Some(_) => {}
                None => mine.push((key, ms, seq)),
            }
        }
    }

    /// The session's room.
    pub fn room(&self) -> Option<RoomId> {
        self.room.lock().clone()
    }

    pub(crate) fn set_room(&self, room: Option<RoomId>) {
        *self.room.lock() = room;
    }

    /// Reference for logic calls.
    pub fn session_ref(&self, server: &str) -> SessionRef {
        SessionRef {
            server: server.to_string(),
            mid: self.mid,
            key: self.key.clone(),
        }
    }
}

/// Why reading the next client frame failed.
#[derive(Debug)]
pub enum ReadError {
    /// A malformed frame.
    Frame(FrameError),
    /// A JSON-mode message that is not a frame.
    Json(String),
    /// The socket failed.
    Io(String),
}

/// One client connection as the session driver sees it: frames in, queued items out, then the
/// close. A single task owns it, so reads and writes need neither split halves nor a second task.
pub trait Connection: Send {
    /// The next client frame; `None` when the client closed. Cancel-safe: the driver polls it
    /// in `select!` against the outbound queue and the deadlines.
    fn next(&mut self) -> impl Future<Output = Option<Result<Frame, ReadError>>> + Send;
    /// Writes a batch of queued items in the transport's shape.
    fn write(&mut self, batch: &[Out]) -> impl Future<Output = Result<(), String>> + Send;
    /// Sends what `spec` asks for (op 6, close frame) and shuts the connection.
    fn finish(&mut self, spec: &CloseSpec) -> impl Future<Output = Result<(), String>> + Send;
}

/// Which transport a connection came in on (metrics, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Raw TCP frames.
    Tcp,
    /// WebSocket.
    Ws,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
    }
}

/// Counts an open connection; the count drops with the guard.
pub(crate) struct ConnGuard {
    ctx: Arc<Ctx>,
    transport: Transport,
}

impl ConnGuard {
    fn admit(ctx: &Arc<Ctx>, transport: Transport) -> Option<ConnGuard> {
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
        })
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

fn reject_read(ctx: &Ctx, out: &Outbound, err: ReadError, peer: SocketAddr, t: Transport) {
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

fn refuse_auth(ctx: &Ctx, out: &Outbound, metric: &str, reason: &str, peer: SocketAddr) {
    ctx.metrics.auth_failed(metric);
    tracing::info!(%peer, reason, "auth refused");
    out.close(CloseSpec::policy(reason));
}

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
    let guard = if ctx.shutdown.is_cancelled() {
        ctx.metrics.conn_refused.inc();
        out.close(CloseSpec::shutdown());
        None
    } else {
        let g = ConnGuard::admit(&ctx, t);
        if g.is_none() {
            ctx.metrics.conn_refused.inc();
            tracing::warn!(%peer, "max_connections reached, refusing connection");
            out.close(CloseSpec::reason("too many connections", 1013));
        }
        g
    };
    if guard.is_some() {
        // Boxed: the auth phase (logic's connect, the room join) is the largest state of the
        // driver and runs once; the task keeps only the small steady state for its lifetime.
        if let Some(a) = Box::pin(authenticate(&ctx, &mut conn, &out, peer, t)).await {
            serve(&ctx, &mut conn, &a, peer, t, wt).await;
            ctx.end_session(&a.session);
        }
    }
    // Boxed like the other rare or bulky phases, so an idle session's task holds only the
    // frame loop's state (see docs/benchmarks.md, S1).
    Box::pin(close(&mut conn, &out, wt)).await;
    drop(guard);
}

/// An authenticated session and the heartbeat interval logic gave it.
struct Authed {
    session: Arc<Session>,
    heartbeat_secs: u32,
}

async fn authenticate<C: Connection>(
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
    let req = ConnectRequest {
        server: ctx.cfg.server_id.clone(),
        auth: body,
        remote_ip: peer.ip().to_string(),
    };
    let timeout = ctx.cfg.rpc_timeout();
    let reply = ctx
        .logic
        .call(|c| async move { c.connect(rim_runtime::rpc::context(timeout), req).await })
        .await;
    let reply = match reply {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            refuse_auth(ctx, out, "refused", &e.to_string(), peer);
            return None;
        }
        Err(e) => {
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
        .with_since(reply.since_ms),
    );
    if reply.replaced_elsewhere {
        // The older session elsewhere is closed by a kick job logic queued; nothing to do here.
        tracing::debug!(%peer, key = %reply.key, "session replaces one on another comet");
    }
    if let Some(old) = ctx.buckets.insert(session.clone()) {
        tracing::info!(key = %old.key, "same key authenticated again, replacing older session");
        old.out.close(CloseSpec::reason("replaced", 1000));
    }
    if let Some(room) = reply.room.clone() {
        ctx.join_room(&session, room).await;
    }
    let body = AuthReplyBody {
        mid: reply.mid,
        key: reply.key.clone(),
        room_id: reply
            .room
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default(),
        heartbeat: reply.heartbeat_secs,
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    session.out.offer(
        Out::Reply(Frame::new(op::AUTH_REPLY, auth.seq, body)),
        &ctx.metrics,
    );
    tracing::debug!(%peer, mid = reply.mid, key = %reply.key, since_ms = reply.since_ms, "session authenticated");
    Some(Authed {
        session,
        heartbeat_secs: reply.heartbeat_secs,
    })
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
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut st = FrameState {
        limit: TokenBucket::new(
            ctx.cfg.session.send_rate_per_sec,
            ctx.cfg.session.send_burst,
            Instant::now(),
        ),
        last_info: None,
    };
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
            r = tokio::time::timeout_at(deadline, conn.next()) => r,
            _ = out.changed() => continue,
        };
        match r {
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
                deadline = tokio::time::Instant::now() + idle;
                // Any frame keeps the session alive, so any frame renews the registration; a
                // client that only sends op 4 must not expire at logic.
                if last_renew.elapsed() >= renew_every {
                    last_renew = Instant::now();
                    ctx.session_heartbeat(session);
                }
                // Boxed: handlers that wait on logic are large and rare; the task stays small.
                let work = Box::pin(handle_frame(ctx, session, f, &mut st));
                Box::pin(while_writing(conn, out, wt, work)).await;
            }
        }
    }
}

/// Writes everything queued (unless a close was requested: the close decides what still goes
/// out). False when the socket failed; the session is then closing.
async fn flush<C: Connection>(conn: &mut C, out: &Outbound, wt: Duration) -> bool {
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
async fn while_writing<C: Connection, F: Future<Output = ()>>(
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
async fn close<C: Connection>(conn: &mut C, out: &Outbound, wt: Duration) {
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

/// How often a session's registration is renewed at logic at most. logic's TTL is
/// `heartbeat_secs * (misses + 1)`, at least two heartbeat intervals, and a live client sends a
/// frame at least every `heartbeat_secs * misses`; renewing at most every heartbeat interval (or
/// `renew_session_ms` when shorter) therefore always lands within the TTL.
pub(crate) fn renew_interval(renew_session_ms: u64, heartbeat_secs: u32) -> Duration {
    let hb_ms = u64::from(heartbeat_secs.max(1)) * 1000;
    Duration::from_millis(renew_session_ms.min(hb_ms))
}

/// Per-session state of the read loop: the rate limit shared by op 4, ChangeRoom, Sub and Unsub,
/// and when a refusal was last logged at info.
pub(crate) struct FrameState {
    limit: TokenBucket,
    last_info: Option<Instant>,
}

/// At most one info line per session per this; the rest of a session's refusals go to debug, so
/// a client sending bad frames in a loop cannot flood the logs.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

impl FrameState {
    /// Logs a refused request: at info at most once per [`REFUSAL_LOG_EVERY`], else at debug.
    fn log_refusal(&mut self, s: &Session, what: &str, reason: &str) {
        let now = Instant::now();
        if self
            .last_info
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY)
        {
            self.last_info = Some(now);
            tracing::info!(peer = %s.peer, key = %s.key, reason, "{what} refused (further refusals of this session within a minute are logged at debug)");
        } else {
            tracing::debug!(peer = %s.peer, key = %s.key, reason, "{what} refused");
        }
    }

    /// Takes a token for a ChangeRoom/Sub/Unsub; false (counted, logged) when over the limit.
    fn admit(&mut self, ctx: &Ctx, s: &Session, what: &str) -> bool {
        if self.limit.try_take(Instant::now()) {
            return true;
        }
        ctx.metrics.requests_rate_limited.inc();
        self.log_refusal(s, what, "rate limited");
        false
    }
}

fn error_body(msg: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": msg })).unwrap_or_default()
}

async fn handle_frame(ctx: &Arc<Ctx>, s: &Arc<Session>, f: Frame, st: &mut FrameState) {
    let reply = |op: i32, body: Vec<u8>| Out::Reply(Frame::new(op, f.seq, body));
    let out = match f.op {
        op::HEARTBEAT => {
            let n = ctx.online_count(s.room().as_ref());
            reply(op::HEARTBEAT_REPLY, n.to_be_bytes().to_vec())
        }
        op::CHANGE_ROOM => {
            if !st.admit(ctx, s, "change room") {
                s.out.offer(
                    reply(op::CHANGE_ROOM_REPLY, error_body("rate limited")),
                    &ctx.metrics,
                );
                return;
            }
            let text = String::from_utf8_lossy(&f.body);
            let text = text.trim();
            let to = if text.is_empty() {
                Ok(None)
            } else {
                RoomId::parse(text).map(Some)
            };
            match to {
                Ok(to) => {
                    // Awaited before replying: logic's membership is updated once op 13 is seen.
                    ctx.change_room(s, to).await;
                    Out::Reply(Frame::new(op::CHANGE_ROOM_REPLY, f.seq, f.body.clone()))
                }
                Err(e) => {
                    let msg = format!("bad room id: {e}");
                    st.log_refusal(s, "change room", &msg);
                    reply(op::CHANGE_ROOM_REPLY, error_body(&msg))
                }
            }
        }
        op::SUB | op::UNSUB => {
            let (reply_op, what) = if f.op == op::SUB {
                (op::SUB_REPLY, "sub")
            } else {
                (op::UNSUB_REPLY, "unsub")
            };
            if !st.admit(ctx, s, what) {
                s.out
                    .offer(reply(reply_op, error_body("rate limited")), &ctx.metrics);
                return;
            }
            let res = op::parse_op_list(&f.body)
                .map_err(|e| format!("bad op list: {e}"))
                .and_then(|ops| {
                    if ops.len() > MAX_ACCEPTS {
                        return Err(format!("too many ops: at most {MAX_ACCEPTS}"));
                    }
                    s.set_accepts(&ops, f.op == op::SUB)
                });
            match res {
                Ok(()) => Out::Reply(Frame::new(reply_op, f.seq, f.body.clone())),
                Err(msg) => {
                    st.log_refusal(s, what, &msg);
                    reply(reply_op, error_body(&msg))
                }
            }
        }
        op::SEND_MSG => {
            let body = crate::upstream::handle(ctx, s, &f.body, &mut st.limit).await;
            reply(
                op::SEND_MSG_REPLY,
                serde_json::to_vec(&body).unwrap_or_default(),
            )
        }
        other => {
            tracing::debug!(peer = %s.peer, op = other, name = op::name(other), "ignoring client op");
            return;
        }
    };
    s.out.offer(out, &ctx.metrics);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pid(partition: u16, ms: u64, seq: u64) -> PushId {
        PushId { partition, ms, seq }
    }

    fn session(queue: usize) -> Arc<Session> {
        let out = Outbound::new(queue);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Arc::new(Session::new(1, 7, "k".into(), peer, out, &[1000]))
    }

    #[test]
    fn dedupe_marks_are_per_partition_high_water() {
        let s = session(4);
        assert!(s.mark(pid(1, 10, 0)));
        assert!(!s.mark(pid(1, 10, 0)));
        assert!(!s.mark(pid(1, 9, 5)));
        assert!(s.mark(pid(1, 10, 1)));
        assert!(s.mark(pid(2, 1, 0)), "other partition is independent");
        assert!(!s.mark(pid(2, 1, 0)));
    }

    #[test]
    fn op_filter_follows_sub_and_unsub() {
        let s = session(4);
        assert!(s.accepts(1000));
        assert!(!s.accepts(1001));
        s.set_accepts(&[1001, 1002], true).unwrap();
        assert!(s.accepts(1001));
        s.set_accepts(&[1000], false).unwrap();
        assert!(!s.accepts(1000));
    }

    #[test]
    fn accepted_ops_are_capped() {
        let s = session(4);
        let many: Vec<i32> = (2000..2000 + MAX_ACCEPTS as i32).collect();
        let e = s.set_accepts(&many, true).unwrap_err();
        assert_eq!(e, format!("too many ops: at most {MAX_ACCEPTS}"));
        assert!(!s.accepts(2000), "a refused Sub changes nothing");
        // 1000 is already accepted, so this fills the set exactly.
        s.set_accepts(&many[..MAX_ACCEPTS - 1], true).unwrap();
        s.set_accepts(&[1000], true).unwrap();
        assert!(s.set_accepts(&[9999], true).is_err());
        s.set_accepts(&[1000], false).unwrap();
        s.set_accepts(&[9999], true).unwrap();
    }

    #[test]
    fn paced_marks_are_a_namespace_of_their_own() {
        let s = session(4);
        assert!(s.mark(pid(1, 10, 5)));
        // A paced broadcast sent earlier on the same partition still gets through.
        assert!(s.mark_in(MarkSpace::Paced, pid(1, 10, 3)));
        assert!(!s.mark_in(MarkSpace::Paced, pid(1, 10, 3)));
        assert!(s.mark_in(MarkSpace::Paced, pid(1, 10, 4)));
        assert!(!s.mark(pid(1, 10, 5)));
        // Partition 0xffff does not collide with the paced space of any partition.
        assert!(s.mark(pid(u16::MAX, 1, 0)));
        assert!(s.mark_in(MarkSpace::Paced, pid(u16::MAX, 1, 0)));
    }

    #[test]
    fn a_successor_inherits_marks() {
        let old = session(4);
        let new = session(4);
        assert!(old.mark(pid(1, 10, 5)));
        assert!(old.mark_in(MarkSpace::Paced, pid(1, 10, 2)));
        assert!(new.mark(pid(2, 1, 1)));
        new.inherit_marks(&old);
        assert!(!new.mark(pid(1, 10, 5)), "replayed push is a duplicate");
        assert!(!new.mark_in(MarkSpace::Paced, pid(1, 10, 2)));
        assert!(!new.mark(pid(2, 1, 1)), "own marks kept");
        assert!(new.mark(pid(1, 10, 6)));
    }

    #[test]
    fn renewal_interval_fits_the_ttl() {
        assert_eq!(renew_interval(60_000, 30), Duration::from_secs(30));
        assert_eq!(renew_interval(10_000, 30), Duration::from_secs(10));
        assert_eq!(renew_interval(60_000, 0), Duration::from_secs(1));
    }
}
