//! JSON bodies carried inside frames: what clients send in Auth, what the server answers.
//!
//! Unknown fields are ignored so goim clients (which send a subset or extras) work unchanged.

use serde::{Deserialize, Serialize};

/// Body of an op 7 Auth frame.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthBody {
    /// User id. Several sessions may share one.
    pub mid: i64,
    /// Session key; logic assigns one when empty.
    pub key: String,
    /// Room to join at once (`type://id`), or empty.
    pub room_id: String,
    /// Client platform (`web`, `ios`, `android`, ...).
    pub platform: String,
    /// Ops the session accepts pushes for.
    pub accepts: Vec<i32>,
    /// Credential checked by logic when it is configured to.
    pub token: String,
    /// rim extension: more rooms to join at once besides `room_id` (`type://id` each).
    pub rooms: Vec<String>,
    /// rim extension: tag each push with its id and source, and resume these histories (see
    /// docs/protocol.md, "History and recovery").
    pub recover: Option<crate::history::Recover>,
}

/// Body of op 8 AuthReply (goim clients ignore it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthReplyBody {
    /// Authenticated user id.
    pub mid: i64,
    /// Session key (assigned when the client gave none).
    pub key: String,
    /// Room joined, or empty.
    pub room_id: String,
    /// rim extension: every room joined (`room_id` first); absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<String>,
    /// Heartbeat interval the client should keep, in seconds.
    pub heartbeat: u32,
    /// rim extension: when the session ends unless the client sends a fresh token with op 22
    /// (unix ms; absent when the token never expires, as in trust mode).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub token_expires_ms: u64,
    /// rim extension, only for sessions that asked to `recover`: for each history it resumed,
    /// whether it got everything it missed (false: some fell out of the window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<Recovered>,
}

/// What a session asking to recover got back, per history it named.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    /// The user's own history, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<bool>,
    /// Each room's history asked for.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rooms: std::collections::BTreeMap<String, bool>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Body of op 6 DisconnectReply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisconnectBody {
    /// Why the server closes the session.
    pub reason: String,
}

impl DisconnectBody {
    /// JSON bytes of `{"reason": ...}`.
    pub fn to_json(reason: &str) -> Vec<u8> {
        serde_json::to_vec(&DisconnectBody {
            reason: reason.to_string(),
        })
        .unwrap_or_default()
    }
}

/// Body of op 4 SendMsg: exactly one of `room` and `mid`, the op and the payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendMsgBody {
    /// Target room (`type://id`).
    #[serde(default)]
    pub room: Option<String>,
    /// Target user.
    #[serde(default)]
    pub mid: Option<i64>,
    /// Op recipients receive the message with.
    pub op: i32,
    /// Payload, any JSON.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// What a recipient of an upstream message receives as the push body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatBody {
    /// Sender's mid, from its authenticated session (never from the frame).
    pub from: i64,
    /// The sender's payload, untouched.
    pub data: serde_json::Value,
}

/// Body of op 24 RoomEvent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomEventBody {
    /// `join` (the user's first session entered the room) or `leave` (its last one left).
    pub event: String,
    /// The user.
    pub mid: i64,
    /// The room.
    pub room: String,
}

/// Body of op 5 SendMsgReply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendMsgReplyBody {
    /// 0 on success, negative on refusal.
    pub code: i32,
    /// Message id, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goim_auth_body_parses() {
        let a: AuthBody = serde_json::from_str(
            r#"{"mid":123,"room_id":"live://1000","platform":"web","accepts":[1000,1001]}"#,
        )
        .unwrap();
        assert_eq!(a.mid, 123);
        assert_eq!(a.key, "");
        assert_eq!(a.accepts, vec![1000, 1001]);
    }
}
