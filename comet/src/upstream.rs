//! Upstream messages (op 4 SendMsg): per-session rate limiting, validation of the body, and
//! forwarding to logic with the session's authenticated identity. Every outcome is an op 5 reply
//! `{"code":..}` echoing the seq; none of them closes the session.
//!
//! The sender is always the session (its mid and key as logic authenticated them) and its
//! current room: anything in the body that claims otherwise (`from`, `mid_from`, ...) is ignored,
//! so a client cannot post in someone else's name.

use rim_proto::msg::{SendMsgBody, SendMsgReplyBody};
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::{SendMsgRequest, SendTarget};
// The runtime's clock, so tests can pause it; the same as `std`'s when not paused.
use tokio::time::Instant;

use crate::ctx::Ctx;
use crate::logic::LogicCallError;
use crate::session::Session;

pub use rim_runtime::rate::TokenBucket;

/// Code of a refused SendMsg whose body is invalid.
pub const BAD_REQUEST: i32 = -400;
/// Code of a SendMsg over the session's rate limit.
pub const RATE_LIMITED: i32 = -429;
/// Code of a SendMsg that could not reach logic.
pub const UNAVAILABLE: i32 = -503;

/// A validated SendMsg body.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// Recipients.
    pub target: SendTarget,
    /// Op the recipients get it with.
    pub op: i32,
    /// The payload as JSON text.
    pub data_json: String,
}

/// Validates an op 4 body; the error names the problem (it becomes the reply's `message`).
pub fn parse(body: &[u8]) -> Result<Parsed, String> {
    // Two steps so "not JSON at all" and "JSON of the wrong shape" read differently.
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    if !value.is_object() {
        return Err("body must be a JSON object {\"room\"|\"mid\", \"op\", \"data\"}".into());
    }
    let b: SendMsgBody = serde_json::from_value(value).map_err(|e| format!("bad body: {e}"))?;
    let target = match (b.room, b.mid) {
        (Some(room), None) => {
            SendTarget::Room(RoomId::parse(&room).map_err(|e| format!("bad room id: {e}"))?)
        }
        (None, Some(mid)) => SendTarget::Mid(mid),
        (Some(_), Some(_)) => return Err("give exactly one of room and mid, not both".into()),
        (None, None) => return Err("give exactly one of room and mid".into()),
    };
    if b.op < op::APP_MIN {
        return Err(format!("op must be >= {}, got {}", op::APP_MIN, b.op));
    }
    let data_json = serde_json::to_string(&b.data).map_err(|e| format!("bad data: {e}"))?;
    Ok(Parsed {
        target,
        op: b.op,
        data_json,
    })
}

fn refused(code: i32, message: impl Into<String>) -> SendMsgReplyBody {
    SendMsgReplyBody {
        code,
        id: None,
        message: Some(message.into()),
    }
}

/// Handles one SendMsg from `s` (its body already validated into `msg`) and returns the op 5
/// body. Awaits logic inline: the client waits for op 5 anyway, and replies stay in the order of
/// the client's frames.
pub(crate) async fn handle(
    ctx: &Ctx,
    s: &Session,
    msg: Result<Parsed, String>,
    limiter: &mut TokenBucket,
) -> SendMsgReplyBody {
    let reply = handle_inner(ctx, s, msg, limiter).await;
    if reply.code == 0 {
        ctx.metrics.upstream_sent.inc();
    } else {
        ctx.metrics.upstream_refused(reply.code);
        tracing::debug!(
            peer = %s.peer,
            key = %s.key,
            code = reply.code,
            message = reply.message.as_deref().unwrap_or_default(),
            "send msg refused"
        );
    }
    reply
}

async fn handle_inner(
    ctx: &Ctx,
    s: &Session,
    msg: Result<Parsed, String>,
    limiter: &mut TokenBucket,
) -> SendMsgReplyBody {
    // The limit before the body's validity: an invalid message costs a token too.
    if !limiter.try_take(Instant::now()) {
        return refused(
            RATE_LIMITED,
            format!(
                "rate limited: at most {} messages per second (burst {}), retry in {} ms",
                ctx.cfg.session.send_rate_per_sec,
                ctx.cfg.session.send_burst,
                limiter.wait().as_millis().max(1)
            ),
        );
    }
    let parsed = match msg {
        Ok(p) => p,
        Err(e) => return refused(BAD_REQUEST, e),
    };
    // logic checks a room post against the sender's room: the target when the session is in it
    // (it may be in several), else its first room (refused as "not a member").
    let sender_room = match &parsed.target {
        SendTarget::Room(room) if s.in_room(room) => Some(room.clone()),
        _ => s.room(),
    };
    let req = SendMsgRequest {
        sender: s.session_ref(&ctx.cfg.server_id),
        sender_room,
        target: parsed.target,
        op: parsed.op,
        data_json: parsed.data_json,
        grant: s.grant(),
    };
    match ctx.logic.send_msg(req).await {
        Ok(accepted) => SendMsgReplyBody {
            code: 0,
            id: Some(accepted.id),
            message: None,
        },
        Err(LogicCallError::Refused(e)) => refused(e.code(), e.to_string()),
        Err(LogicCallError::Unreachable(e)) => {
            rim_runtime::warn_throttled!(key = %s.key, error = %e, "logic unreachable for send msg");
            refused(UNAVAILABLE, "logic unavailable")
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parse_validates_and_ignores_sender_claims() {
        let p =
            parse(br#"{"room":"live://1","op":1000,"data":{"t":"hi"},"from":999,"mid_from":5}"#)
                .unwrap();
        assert_eq!(
            p,
            Parsed {
                target: SendTarget::Room(RoomId::parse("live://1").unwrap()),
                op: 1000,
                data_json: r#"{"t":"hi"}"#.into(),
            }
        );
        let p = parse(br#"{"mid":2,"op":1001}"#).unwrap();
        assert_eq!(
            (p.target, p.data_json.as_str()),
            (SendTarget::Mid(2), "null")
        );

        for (body, want) in [
            (&b"{oops"[..], "not JSON"),
            (b"[1]", "JSON object"),
            (br#"{"op":1000,"data":1}"#, "exactly one"),
            (br#"{"room":"live://1","mid":2,"op":1000}"#, "not both"),
            (br#"{"room":"nope","op":1000}"#, "bad room id"),
            (br#"{"mid":2,"op":999}"#, "op must be >= 1000"),
            (br#"{"mid":2}"#, "missing field `op`"),
            (br#"{"mid":"x","op":1000}"#, "bad body"),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }
}
