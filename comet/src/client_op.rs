//! Op dispatch of an authenticated session: each client frame is parsed into the request it
//! makes ([`ClientOp::parse`]), which then applies itself to the session ([`ClientOp::apply`])
//! and queues its reply. Also the state those requests share per session ([`FrameState`]): the
//! rate limit and how often refusals are logged.
//!
//! No request closes the session: every refusal (rate limit, bad argument, logic's answer) is a
//! reply echoing the frame's seq.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rim_proto::frame::Frame;
use rim_proto::history::{HistoryId, Source, parse_after};
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::TokenGrant;
// The runtime's clock, so tests can pause it; the same as `std`'s when not paused.
use tokio::time::Instant;

use crate::config::SessionConfig;
use crate::ctx::Ctx;
use crate::logic::LogicCallError;
use crate::outbound::CloseSpec;
use crate::recovery::{catch_up, queue};
use crate::session::{MAX_ACCEPTS, Session};
use crate::upstream::{self, TokenBucket};
use crate::writer::Out;

/// A client request, parsed from its frame.
///
/// An argument that does not parse is kept as the refusal's text rather than refused here: the
/// rate limit is checked first when the request applies, so a bad request costs a token like a
/// good one and a rate-limited one is answered "rate limited" whatever its body.
#[derive(Debug)]
pub(crate) enum ClientOp {
    /// Op 2: answered with the online count of the session's room.
    Heartbeat { seq: i32 },
    /// Op 12: move to a room (`None`: out of any room). The reply echoes `body`.
    ChangeRoom {
        seq: i32,
        body: Bytes,
        to: Result<Option<RoomId>, String>,
    },
    /// Op 18: join a room besides the session's others. The reply (op 19) echoes `body`; a JSON
    /// body `{"room","recover":"ID"|""}` also catches up on the room's history after that id
    /// (`""`: what it keeps), answered `{"room","recovered":bool}`.
    JoinRoom {
        seq: i32,
        body: Bytes,
        room: Result<RoomId, String>,
        recover: Option<Option<HistoryId>>,
    },
    /// Op 20: leave one room, staying in the others. The reply (op 21) echoes `body`.
    LeaveRoom {
        seq: i32,
        body: Bytes,
        room: Result<RoomId, String>,
    },
    /// Op 14: accept more ops. The reply echoes `body`.
    Sub {
        seq: i32,
        body: Bytes,
        ops: Result<Vec<i32>, String>,
    },
    /// Op 16: accept fewer ops. The reply echoes `body`.
    Unsub {
        seq: i32,
        body: Bytes,
        ops: Result<Vec<i32>, String>,
    },
    /// Op 22: a fresh token for this session (body: the token).
    RefreshToken {
        seq: i32,
        token: Result<String, String>,
    },
    /// Op 4: an upstream message for logic (see `upstream`).
    SendMsg {
        seq: i32,
        msg: Result<upstream::Parsed, String>,
    },
    /// Any other op: not a client request after Auth; ignored.
    Unknown { op: i32 },
}

impl ClientOp {
    /// The request `f` makes. Never fails: bad arguments are kept for the reply (see the type).
    pub(crate) fn parse(f: Frame) -> ClientOp {
        let Frame {
            op: code,
            seq,
            body,
            ..
        } = f;
        match code {
            op::HEARTBEAT => ClientOp::Heartbeat { seq },
            op::CHANGE_ROOM => ClientOp::ChangeRoom {
                seq,
                to: parse_room(&body),
                body,
            },
            op::JOIN_ROOM => {
                let (room, recover) = parse_join(&body);
                ClientOp::JoinRoom {
                    seq,
                    room,
                    recover,
                    body,
                }
            }
            op::LEAVE_ROOM => ClientOp::LeaveRoom {
                seq,
                room: parse_one_room(&body),
                body,
            },
            op::SUB => ClientOp::Sub {
                seq,
                ops: parse_ops(&body),
                body,
            },
            op::UNSUB => ClientOp::Unsub {
                seq,
                ops: parse_ops(&body),
                body,
            },
            op::SEND_MSG => ClientOp::SendMsg {
                seq,
                msg: upstream::parse(&body),
            },
            op::REFRESH_TOKEN => ClientOp::RefreshToken {
                seq,
                token: parse_token(&body),
            },
            code => ClientOp::Unknown { op: code },
        }
    }

    /// Carries the request out for session `s` and queues its reply. Waits on logic where the
    /// request needs it (ChangeRoom, SendMsg), so the reply means logic has it.
    pub(crate) async fn apply(self, ctx: &Ctx, s: &Arc<Session>, st: &mut FrameState) {
        // What goes out after the reply (a JoinRoom's catch-up).
        let mut then = Vec::new();
        let reply = match self {
            ClientOp::Heartbeat { seq } => {
                if !st.admit_frame(ctx, s, "heartbeat") {
                    return;
                }
                let n = ctx.rooms.online_count(&ctx.buckets, s.room().as_ref());
                Frame::new(op::HEARTBEAT_REPLY, seq, n.to_be_bytes().to_vec())
            }
            // Room requests are awaited before replying: logic's membership is updated by the
            // time the client sees op 13, 19 or 21.
            ClientOp::ChangeRoom { seq, body, to } => {
                let done = request(ctx, s, st, "change room", || async move {
                    let to = to?;
                    may_join(ctx, s, to.as_ref()).await?;
                    ctx.rooms.change(&ctx.buckets, s, to).await;
                    Ok(())
                })
                .await;
                echo_or_error(op::CHANGE_ROOM_REPLY, seq, body, done)
            }
            ClientOp::JoinRoom {
                seq,
                body,
                room,
                recover,
            } => {
                let done = request(ctx, s, st, "join room", || async move {
                    let room = may_enter(ctx, s, room).await?;
                    let Some(after) = recover else {
                        ctx.rooms.enter(&ctx.buckets, s, room).await;
                        return Ok(None);
                    };
                    // Held from before the join until the history was read (see `catch_up`).
                    let source = Source::Room(room.clone());
                    s.begin_catch_up(source.clone());
                    ctx.rooms.enter(&ctx.buckets, s, room.clone()).await;
                    let (complete, items) = catch_up(ctx, s, vec![(source, after)]).await;
                    Ok(Some((
                        room,
                        complete.first().copied().unwrap_or(false),
                        items,
                    )))
                })
                .await;
                match done {
                    Ok(Some((room, recovered, items))) => {
                        then = items;
                        let answer =
                            serde_json::json!({"room": room.as_str(), "recovered": recovered});
                        Frame::new(
                            op::JOIN_ROOM_REPLY,
                            seq,
                            serde_json::to_vec(&answer).unwrap_or_default(),
                        )
                    }
                    Ok(None) => echo_or_error(op::JOIN_ROOM_REPLY, seq, body, Ok(())),
                    Err(msg) => echo_or_error(op::JOIN_ROOM_REPLY, seq, body, Err(msg)),
                }
            }
            ClientOp::LeaveRoom { seq, body, room } => {
                let done = request(ctx, s, st, "leave room", || async move {
                    ctx.rooms.exit(&ctx.buckets, s, room?).await;
                    Ok(())
                })
                .await;
                echo_or_error(op::LEAVE_ROOM_REPLY, seq, body, done)
            }
            ClientOp::Sub { seq, body, ops } => filter(ctx, s, st, true, seq, body, ops),
            ClientOp::Unsub { seq, body, ops } => filter(ctx, s, st, false, seq, body, ops),
            ClientOp::RefreshToken { seq, token } => {
                let body =
                    match request(ctx, s, st, "refresh token", || refresh(ctx, s, token)).await {
                        Ok(expires_ms) => {
                            serde_json::to_vec(&serde_json::json!({ "expires_ms": expires_ms }))
                                .unwrap_or_default()
                                .into()
                        }
                        Err(msg) => error_body(&msg),
                    };
                Frame::new(op::REFRESH_TOKEN_REPLY, seq, body)
            }
            ClientOp::SendMsg { seq, msg } => {
                let body = upstream::handle(ctx, s, msg, &mut st.limit).await;
                let body = serde_json::to_vec(&body).unwrap_or_default();
                Frame::new(op::SEND_MSG_REPLY, seq, body)
            }
            ClientOp::Unknown { op: code } => {
                st.admit_frame(ctx, s, "unknown op");
                tracing::debug!(peer = %s.peer, op = code, name = op::name(code), "ignoring client op");
                return;
            }
        };
        s.out.offer(Out::Reply(reply), &ctx.metrics);
        queue(ctx, s, then);
    }
}

/// Whether `s` may move into `to` (leaving a room is always allowed); see [`room_allowed`].
async fn may_join(ctx: &Ctx, s: &Session, to: Option<&RoomId>) -> Result<(), String> {
    match to {
        Some(room) if !s.in_room(room) => room_allowed(ctx, s, room, &s.grant()).await,
        _ => Ok(()),
    }
}

/// Whether `s` may join `room` besides its other rooms (JoinRoom): within `session.max_rooms`
/// and allowed (see [`room_allowed`]); a room it is in already is fine (a no-op).
async fn may_enter(ctx: &Ctx, s: &Session, room: Result<RoomId, String>) -> Result<RoomId, String> {
    let room = room?;
    if s.in_room(&room) {
        return Ok(room);
    }
    let max = ctx.cfg.session.max_rooms;
    if s.room_count() >= max {
        return Err(format!("too many rooms: at most {max}"));
    }
    room_allowed(ctx, s, &room, &s.grant()).await?;
    Ok(room)
}

/// Whether a session holding `grant` may be in `room`: the token's `rooms` claim first
/// (checked here), then, for a room type logic guards, logic's verdict.
async fn room_allowed(
    ctx: &Ctx,
    s: &Session,
    room: &RoomId,
    grant: &TokenGrant,
) -> Result<(), String> {
    if !grant.allows_room(room.as_str()) {
        return Err("room not allowed by token".into());
    }
    if !ctx.join_needs_check(room) {
        return Ok(());
    }
    let sref = s.session_ref(&ctx.cfg.server_id);
    ctx.logic
        .check_join(sref, room.clone(), grant.clone())
        .await
        .map_err(refusal)
}

/// A failed logic call as the `{"error":...}` text a client gets.
fn refusal(e: LogicCallError) -> String {
    match e {
        LogicCallError::Refused(e) => e.to_string(),
        LogicCallError::Unreachable(_) => "logic unavailable".into(),
    }
}

/// Checks a fresh token at logic and puts what it grants in force; answers the session's new end
/// (unix ms, 0 = never). A token that would not let the session be in each of its rooms (its
/// `rooms` claim or the room's policy) is refused, and the old token stays in force.
async fn refresh(ctx: &Ctx, s: &Session, token: Result<String, String>) -> Result<u64, String> {
    let sref = s.session_ref(&ctx.cfg.server_id);
    let grant = ctx
        .logic
        .refresh_token(sref, token?)
        .await
        .map_err(refusal)?;
    for room in s.rooms() {
        room_allowed(ctx, s, &room, &grant).await?;
    }
    let expires_ms = grant.expires_ms;
    s.set_grant(grant);
    Ok(expires_ms)
}

/// A RefreshToken body: the token, blanks around it ignored.
fn parse_token(body: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(body).map_err(|_| "token is not UTF-8".to_string())?;
    match text.trim() {
        "" => Err("token required".into()),
        t => Ok(t.to_string()),
    }
}

/// A ChangeRoom body: a room id, or nothing (blank) to leave the room.
fn parse_room(body: &[u8]) -> Result<Option<RoomId>, String> {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    RoomId::parse(text)
        .map(Some)
        .map_err(|e| format!("bad room id: {e}"))
}

/// A JoinRoom body: a room id, or `{"room":"type://id","recover":"ID"|""}` to catch up on its
/// history too.
fn parse_join(body: &[u8]) -> (Result<RoomId, String>, Option<Option<HistoryId>>) {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Join {
        room: String,
        recover: Option<String>,
    }
    if !body.trim_ascii_start().starts_with(b"{") {
        return (parse_one_room(body), None);
    }
    let join: Join = match serde_json::from_slice(body) {
        Ok(j) => j,
        Err(e) => return (Err(format!("bad join body: {e}")), None),
    };
    let recover = match join.recover.as_deref().map(parse_after).transpose() {
        Ok(r) => r,
        Err(e) => return (Err(format!("recover: {e}")), None),
    };
    (parse_one_room(join.room.as_bytes()), recover)
}

/// A JoinRoom/LeaveRoom body: one room id (blanks around it ignored).
fn parse_one_room(body: &[u8]) -> Result<RoomId, String> {
    parse_room(body)?.ok_or_else(|| "room id required".to_string())
}

/// A Sub/Unsub body: comma-separated ops, at most [`MAX_ACCEPTS`].
fn parse_ops(body: &[u8]) -> Result<Vec<i32>, String> {
    let ops = op::parse_op_list(body).map_err(|e| format!("bad op list: {e}"))?;
    if ops.len() > MAX_ACCEPTS {
        return Err(format!("too many ops: at most {MAX_ACCEPTS}"));
    }
    Ok(ops)
}

/// Applies a Sub (`accept`) or an Unsub and returns its reply.
fn filter(
    ctx: &Ctx,
    s: &Session,
    st: &mut FrameState,
    accept: bool,
    seq: i32,
    body: Bytes,
    ops: Result<Vec<i32>, String>,
) -> Frame {
    let (reply_op, what) = if accept {
        (op::SUB_REPLY, "sub")
    } else {
        (op::UNSUB_REPLY, "unsub")
    };
    let done = if st.admit(ctx, s, what) {
        ops.and_then(|ops| s.set_accepts(&ops, accept))
            .inspect_err(|msg| st.log_refusal(s, what, msg))
    } else {
        Err(RATE_LIMITED.into())
    };
    echo_or_error(reply_op, seq, body, done)
}

/// Refusal text of a request over the session's rate limit.
const RATE_LIMITED: &str = "rate limited";

/// Runs a request that may wait on logic (`act`, which checks it and carries it out) if the
/// session's rate limit has a token for it; a refusal is logged (see [`FrameState`]).
async fn request<T, Fut>(
    ctx: &Ctx,
    s: &Session,
    st: &mut FrameState,
    what: &str,
    act: impl FnOnce() -> Fut,
) -> Result<T, String>
where
    Fut: std::future::Future<Output = Result<T, String>>,
{
    if !st.admit(ctx, s, what) {
        return Err(RATE_LIMITED.into());
    }
    act().await.inspect_err(|msg| st.log_refusal(s, what, msg))
}

/// A request's reply on `reply_op`: its body echoed when it was done, else `{"error":...}`.
fn echo_or_error(reply_op: i32, seq: i32, body: Bytes, done: Result<(), String>) -> Frame {
    match done {
        Ok(()) => Frame::new(reply_op, seq, body),
        Err(msg) => Frame::new(reply_op, seq, error_body(&msg)),
    }
}

fn error_body(msg: &str) -> Bytes {
    serde_json::to_vec(&serde_json::json!({ "error": msg }))
        .unwrap_or_default()
        .into()
}

/// Per-session state of the requests: the rate limit shared by op 4, ChangeRoom, Sub and Unsub,
/// and when a refusal was last logged at info.
pub(crate) struct FrameState {
    limit: TokenBucket,
    last_info: Option<Instant>,
    /// Heartbeats and unknown ops over the rate since the bucket was last full (see
    /// [`FrameState::admit_frame`]).
    strikes: u8,
}

/// Heartbeats and unknown ops over the session's rate, without the bucket refilling completely
/// in between, that close the session ("too many frames"). A client whose requests briefly used
/// up the bucket still gets its heartbeats answered and keeps its session; a flood is closed.
pub(crate) const MAX_STRIKES: u8 = 8;

/// At most one info line per session per this; the rest of a session's refusals go to debug, so
/// a client sending bad frames in a loop cannot flood the logs.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

impl FrameState {
    /// A full rate limit (a new session may send a burst at once).
    pub(crate) fn new(cfg: &SessionConfig) -> Self {
        FrameState {
            limit: TokenBucket::new(cfg.send_rate_per_sec, cfg.send_burst, Instant::now()),
            last_info: None,
            strikes: 0,
        }
    }

    /// Takes a token for a heartbeat or an unknown op (they cost one like a request, so a
    /// client cannot keep the comet busy with them). Over the rate the frame is still handled
    /// (a client that spent its budget on requests keeps its heartbeat replies) but counted, and
    /// the [`MAX_STRIKES`]-th such frame before the bucket is full again closes the session:
    /// false then.
    fn admit_frame(&mut self, ctx: &Ctx, s: &Session, what: &str) -> bool {
        let now = Instant::now();
        if self.strikes > 0 && self.limit.is_full(now) {
            self.strikes = 0;
        }
        if self.limit.try_take(now) {
            return true;
        }
        ctx.metrics.requests_rate_limited.inc();
        self.strikes = self.strikes.saturating_add(1);
        if self.strikes < MAX_STRIKES {
            self.log_refusal(s, what, "over the rate");
            return true;
        }
        ctx.metrics.limit_refused("frame_rate");
        tracing::info!(peer = %s.peer, key = %s.key, "too many frames, closing the session");
        s.out.close(CloseSpec::policy("too many frames"));
        false
    }

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
        self.log_refusal(s, what, RATE_LIMITED);
        false
    }
}

#[cfg(test)]
#[path = "client_op_tests.rs"]
mod tests;
