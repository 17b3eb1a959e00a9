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
use rim_proto::op;
use rim_proto::room::RoomId;
// The runtime's clock, so tests can pause it; the same as `std`'s when not paused.
use tokio::time::Instant;

use crate::config::SessionConfig;
use crate::ctx::Ctx;
use crate::outbound::CloseSpec;
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
            code => ClientOp::Unknown { op: code },
        }
    }

    /// Carries the request out for session `s` and queues its reply. Waits on logic where the
    /// request needs it (ChangeRoom, SendMsg), so the reply means logic has it.
    pub(crate) async fn apply(self, ctx: &Ctx, s: &Arc<Session>, st: &mut FrameState) {
        let reply = match self {
            ClientOp::Heartbeat { seq } => {
                if !st.admit_frame(ctx, s, "heartbeat") {
                    return;
                }
                let n = ctx.rooms.online_count(&ctx.buckets, s.room().as_ref());
                Frame::new(op::HEARTBEAT_REPLY, seq, n.to_be_bytes().to_vec())
            }
            ClientOp::ChangeRoom { seq, body, to } => {
                let reply = |body: Bytes| Frame::new(op::CHANGE_ROOM_REPLY, seq, body);
                if !st.admit(ctx, s, "change room") {
                    reply(error_body("rate limited"))
                } else {
                    match to {
                        Ok(to) => {
                            // Awaited before replying: logic's membership is updated once op 13
                            // is seen.
                            ctx.rooms.change(&ctx.buckets, s, to).await;
                            reply(body)
                        }
                        Err(msg) => {
                            st.log_refusal(s, "change room", &msg);
                            reply(error_body(&msg))
                        }
                    }
                }
            }
            ClientOp::Sub { seq, body, ops } => filter(ctx, s, st, true, seq, body, ops),
            ClientOp::Unsub { seq, body, ops } => filter(ctx, s, st, false, seq, body, ops),
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
    if !st.admit(ctx, s, what) {
        return Frame::new(reply_op, seq, error_body("rate limited"));
    }
    match ops.and_then(|ops| s.set_accepts(&ops, accept)) {
        Ok(()) => Frame::new(reply_op, seq, body),
        Err(msg) => {
            st.log_refusal(s, what, &msg);
            Frame::new(reply_op, seq, error_body(&msg))
        }
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
        self.log_refusal(s, what, "rate limited");
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{WAIT, authed};

    fn room(r: &str) -> RoomId {
        RoomId::parse(r).unwrap()
    }

    fn one_per_second_burst_two(c: &mut crate::config::Config) {
        c.session.send_rate_per_sec = 1;
        c.session.send_burst = 2;
    }

    /// ChangeRoom moves the membership, tells logic, and replies only once logic answered; a
    /// change to the same room, or out of no room, tells logic nothing.
    #[tokio::test(start_paused = true)]
    async fn change_room_tells_logic_and_moves_the_membership() {
        let (logic, ctx, mut c) = authed(30, |_| {}, "mv", "chat://1").await;
        assert_eq!(ctx.buckets.room_len(&room("chat://1")), 1);

        logic.hold("room_changed");
        c.send(op::CHANGE_ROOM, 2, "chat://2");
        logic.called("room_changed mv chat://1 chat://2").await;
        // Moved on this comet already, but no reply while logic has not answered.
        assert_eq!(ctx.buckets.room_len(&room("chat://1")), 0);
        assert_eq!(ctx.buckets.room_len(&room("chat://2")), 1);
        assert_eq!(
            ctx.buckets.get("mv").unwrap().room(),
            Some(room("chat://2"))
        );
        assert!(c.next_item(Duration::from_secs(10)).await.is_none());
        logic.release();
        let r = c.reply().await;
        assert_eq!(
            (r.op, r.seq, &r.body[..]),
            (op::CHANGE_ROOM_REPLY, 2, &b"chat://2"[..])
        );

        // Same room: answered, logic not called.
        let r = c.request(op::CHANGE_ROOM, 3, "chat://2").await;
        assert_eq!(&r.body[..], b"chat://2");
        // Out of the room, then again out of no room.
        let r = c.request(op::CHANGE_ROOM, 4, Bytes::new()).await;
        assert_eq!((r.op, &r.body[..]), (op::CHANGE_ROOM_REPLY, &b""[..]));
        assert_eq!(ctx.buckets.room_len(&room("chat://2")), 0);
        c.request(op::CHANGE_ROOM, 5, " ").await;
        // A bad room id: refused, the session stays where it is.
        let r = c.request(op::CHANGE_ROOM, 6, "nope").await;
        assert!(
            String::from_utf8_lossy(&r.body).contains("bad room id"),
            "{r:?}"
        );

        c.hang_up();
        c.task.await.unwrap();
        ctx.tracker.close();
        ctx.tracker.wait().await;
        assert_eq!(
            logic.calls(),
            vec![
                "connect mv",
                "room_joined chat://1",
                "room_joined chat://2",
                "room_changed mv chat://1 chat://2",
                "room_changed mv chat://2 -",
                "disconnect mv",
            ]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
            "one room_changed per change, nothing late"
        );
    }

    /// op 4 past the token bucket (1/s, burst 2) is refused with -429 without reaching logic;
    /// a token later (1 s on the paused clock) it goes through again.
    #[tokio::test(start_paused = true)]
    async fn upstream_messages_past_the_token_bucket_are_refused() {
        let (logic, ctx, mut c) = authed(30, one_per_second_burst_two, "fast", "").await;
        let mut send = async |seq: i32| {
            let r = c.request(op::SEND_MSG, seq, r#"{"mid":5,"op":1000}"#).await;
            assert_eq!(r.op, op::SEND_MSG_REPLY);
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
        };
        assert_eq!(send(1).await["code"], 0);
        assert_eq!(send(2).await["code"], 0);
        let refused = send(3).await;
        assert_eq!(refused["code"], upstream::RATE_LIMITED);
        assert_eq!(
            refused["message"],
            "rate limited: at most 1 messages per second (burst 2), retry in 1000 ms"
        );
        assert_eq!(
            logic.sends().len(),
            2,
            "the refused one never reached logic"
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(send(4).await["code"], upstream::RATE_LIMITED);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(send(5).await["code"], 0);
        assert_eq!(logic.sends().len(), 3);
        assert_eq!(ctx.metrics.upstream_sent.get(), 3);
        assert!(
            ctx.metrics
                .render()
                .contains(r#"rim_comet_upstream_refused_total{code="-429"} 2"#)
        );
    }

    /// ChangeRoom, Sub and Unsub share the session's token bucket; refusals keep the session.
    #[tokio::test(start_paused = true)]
    async fn room_changes_and_subs_share_the_rate_limit() {
        let (logic, ctx, mut c) = authed(30, one_per_second_burst_two, "rl", "").await;
        assert_eq!(&c.request(op::SUB, 1, "1001").await.body[..], b"1001");
        // A bad argument costs a token too.
        let r = c.request(op::CHANGE_ROOM, 2, "nope").await;
        assert!(String::from_utf8_lossy(&r.body).contains("bad room id"));
        for (o, reply) in [
            (op::CHANGE_ROOM, op::CHANGE_ROOM_REPLY),
            (op::UNSUB, op::UNSUB_REPLY),
        ] {
            let r = c.request(o, 3, "nope").await;
            assert_eq!(
                (r.op, &r.body[..]),
                (reply, &br#"{"error":"rate limited"}"#[..])
            );
        }
        assert_eq!(ctx.metrics.requests_rate_limited.get(), 2);
        assert!(ctx.buckets.get("rl").unwrap().accepts(1001));
        assert!(logic.calls_of("room_changed").is_empty());
    }

    #[test]
    fn frames_parse_into_requests_with_their_arguments() {
        let f = |op: i32, body: &'static str| ClientOp::parse(Frame::new(op, 9, body));
        assert!(matches!(
            f(op::HEARTBEAT, ""),
            ClientOp::Heartbeat { seq: 9 }
        ));
        assert!(matches!(
            f(op::CHANGE_ROOM, " live://1 "),
            ClientOp::ChangeRoom { to: Ok(Some(r)), .. } if r == room("live://1")
        ));
        assert!(matches!(
            f(op::CHANGE_ROOM, ""),
            ClientOp::ChangeRoom { to: Ok(None), .. }
        ));
        assert!(matches!(
            f(op::CHANGE_ROOM, "x"),
            ClientOp::ChangeRoom { to: Err(e), .. } if e.starts_with("bad room id")
        ));
        assert!(matches!(
            f(op::SUB, "1000, 1001"),
            ClientOp::Sub { ops: Ok(o), .. } if o == vec![1000, 1001]
        ));
        assert!(matches!(
            f(op::UNSUB, "a"),
            ClientOp::Unsub { ops: Err(e), .. } if e.starts_with("bad op list")
        ));
        let many = (0..=MAX_ACCEPTS)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(matches!(
            ClientOp::parse(Frame::new(op::SUB, 1, many)),
            ClientOp::Sub { ops: Err(e), .. } if e == "too many ops: at most 256"
        ));
        assert!(matches!(
            f(op::SEND_MSG, "{}"),
            ClientOp::SendMsg {
                seq: 9,
                msg: Err(_)
            }
        ));
        assert!(matches!(
            f(op::AUTH, "{}"),
            ClientOp::Unknown { op: op::AUTH }
        ));
    }

    /// Heartbeats cost a token: past the rate (1/s, burst 2) they are still answered but
    /// counted, and the MAX_STRIKES-th one before the bucket refills closes the session as "too
    /// many frames" (WebSocket 1008).
    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_flood_closes_the_session() {
        let (logic, ctx, mut c) = authed(30, one_per_second_burst_two, "hb", "").await;
        for seq in 2..2 + 2 + i32::from(MAX_STRIKES) {
            c.send(op::HEARTBEAT, seq, Bytes::new());
        }
        let spec = c.closed(WAIT).await.expect("closed");
        assert_eq!(spec, CloseSpec::policy("too many frames"));
        let answered: Vec<i32> = (2..1 + 2 + i32::from(MAX_STRIKES)).collect();
        assert_eq!(
            c.pending_reply_seqs(),
            answered,
            "all but the one that closed"
        );
        assert_eq!(
            ctx.metrics.requests_rate_limited.get(),
            u64::from(MAX_STRIKES)
        );
        assert_eq!(ctx.metrics.limit_refused[3].get(), 1, "limit=frame_rate");
        logic.called("disconnect hb").await;
    }

    /// Unknown ops cost a token like heartbeats and count as strikes too.
    #[tokio::test(start_paused = true)]
    async fn unknown_ops_count_against_the_rate() {
        let (_logic, ctx, mut c) = authed(30, one_per_second_burst_two, "uk", "").await;
        c.send(99, 2, Bytes::new());
        c.send(op::AUTH, 3, Bytes::new());
        c.send(op::HEARTBEAT, 4, Bytes::new());
        for seq in 5..5 + i32::from(MAX_STRIKES) - 1 {
            c.send(99, seq, Bytes::new());
        }
        let spec = c.closed(WAIT).await.expect("closed");
        assert_eq!(spec, CloseSpec::policy("too many frames"));
        assert_eq!(c.pending_reply_seqs(), vec![4], "the heartbeat is answered");
        assert_eq!(ctx.metrics.limit_refused[3].get(), 1);
    }

    /// Strikes are forgiven once the bucket is full again: a client that briefly went over keeps
    /// its session, and one heartbeating like goim (every 30 s) is always answered.
    #[tokio::test(start_paused = true)]
    async fn heartbeat_strikes_reset_once_the_bucket_refills() {
        let (_logic, ctx, mut c) = authed(30, one_per_second_burst_two, "ok", "").await;
        let below = i32::from(MAX_STRIKES) - 1;
        for seq in 2..4 + below {
            c.send(op::HEARTBEAT, seq, Bytes::new());
        }
        assert!(c.closed(Duration::from_millis(10)).await.is_none());
        assert_eq!(c.pending_reply_seqs(), (2..4 + below).collect::<Vec<_>>());
        for _ in 2..4 + below {
            c.reply().await;
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        // Full again: the strikes are forgiven, another round below the limit keeps the session.
        for seq in 100..102 + below {
            c.send(op::HEARTBEAT, seq, Bytes::new());
        }
        assert!(c.closed(Duration::from_millis(10)).await.is_none());
        assert_eq!(
            c.pending_reply_seqs(),
            (100..102 + below).collect::<Vec<_>>()
        );
        for _ in 100..102 + below {
            c.reply().await;
        }
        for i in 0..10 {
            tokio::time::advance(Duration::from_secs(30)).await;
            let r = c.request(op::HEARTBEAT, 200 + i, Bytes::new()).await;
            assert_eq!(r.op, op::HEARTBEAT_REPLY);
        }
        assert_eq!(ctx.metrics.limit_refused[3].get(), 0);
    }
}
