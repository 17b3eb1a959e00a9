//! Operation codes of protocol.md. Ops at or above [`APP_MIN`] belong to applications.

/// Reserved (goim handshake).
pub const HANDSHAKE: i32 = 0;
/// Reserved (goim handshake reply).
pub const HANDSHAKE_REPLY: i32 = 1;
/// Client heartbeat.
pub const HEARTBEAT: i32 = 2;
/// Heartbeat reply; body is the room's online count as a big-endian i32.
pub const HEARTBEAT_REPLY: i32 = 3;
/// Upstream message from a client.
pub const SEND_MSG: i32 = 4;
/// Reply to [`SEND_MSG`].
pub const SEND_MSG_REPLY: i32 = 5;
/// Sent before the server closes a session on purpose; body `{"reason":...}`.
pub const DISCONNECT_REPLY: i32 = 6;
/// First client frame: authentication.
pub const AUTH: i32 = 7;
/// Reply to [`AUTH`].
pub const AUTH_REPLY: i32 = 8;
/// Server → client WebSocket wrapper: body holds whole frames back to back.
pub const RAW: i32 = 9;
/// Internal, never on the wire.
pub const PROTO_READY: i32 = 10;
/// Internal, never on the wire.
pub const PROTO_FINISH: i32 = 11;
/// Change (or with an empty body, leave) the session's room.
pub const CHANGE_ROOM: i32 = 12;
/// Reply to [`CHANGE_ROOM`], echoing the body.
pub const CHANGE_ROOM_REPLY: i32 = 13;
/// Add accepted ops (body: comma-separated ops).
pub const SUB: i32 = 14;
/// Reply to [`SUB`].
pub const SUB_REPLY: i32 = 15;
/// Remove accepted ops (body: comma-separated ops).
pub const UNSUB: i32 = 16;
/// Reply to [`UNSUB`].
pub const UNSUB_REPLY: i32 = 17;
/// rim extension, client → server: join a room besides the ones the session is in (body: the
/// room id). A session is in at most `session.max_rooms` rooms.
pub const JOIN_ROOM: i32 = 18;
/// Reply to [`JOIN_ROOM`]: the body echoed, or `{"error":"..."}`.
pub const JOIN_ROOM_REPLY: i32 = 19;
/// rim extension, client → server: leave one room, staying in the others (body: the room id).
pub const LEAVE_ROOM: i32 = 20;
/// Reply to [`LEAVE_ROOM`]: the body echoed, or `{"error":"..."}`.
pub const LEAVE_ROOM_REPLY: i32 = 21;
/// rim extension, server → client: a member joined or left one of the session's rooms
/// (body [`crate::msg::RoomEventBody`]). Sent only for room types configured for it.
pub const ROOM_EVENT: i32 = 24;
/// rim extension, client → server: a fresh token for the live session (body: the token), so it
/// is not closed with op 6 `token expired` when the one it authenticated with expires.
pub const REFRESH_TOKEN: i32 = 22;
/// Reply to [`REFRESH_TOKEN`]: `{"expires_ms":N}` (0 = never), or `{"error":"..."}` with the
/// session's old token still in force.
pub const REFRESH_TOKEN_REPLY: i32 = 23;
/// rim extension, server → client, only to sessions that opted in with Auth's `recover`: the
/// id and source of the push frame that follows it (body `{"id":"ms-seq","room":"type://id"}`
/// or `{"id":"ms-seq","user":true}`). Binary transports only; JSON mode puts both in the push.
pub const PUSH_META: i32 = 25;
/// Lowest op an application may push with.
pub const APP_MIN: i32 = 1000;

/// Human-readable name of an op, for logs.
pub fn name(op: i32) -> &'static str {
    match op {
        HANDSHAKE => "Handshake",
        HANDSHAKE_REPLY => "HandshakeReply",
        HEARTBEAT => "Heartbeat",
        HEARTBEAT_REPLY => "HeartbeatReply",
        SEND_MSG => "SendMsg",
        SEND_MSG_REPLY => "SendMsgReply",
        DISCONNECT_REPLY => "DisconnectReply",
        AUTH => "Auth",
        AUTH_REPLY => "AuthReply",
        RAW => "Raw",
        PROTO_READY => "ProtoReady",
        PROTO_FINISH => "ProtoFinish",
        CHANGE_ROOM => "ChangeRoom",
        CHANGE_ROOM_REPLY => "ChangeRoomReply",
        SUB => "Sub",
        SUB_REPLY => "SubReply",
        UNSUB => "Unsub",
        UNSUB_REPLY => "UnsubReply",
        JOIN_ROOM => "JoinRoom",
        JOIN_ROOM_REPLY => "JoinRoomReply",
        LEAVE_ROOM => "LeaveRoom",
        LEAVE_ROOM_REPLY => "LeaveRoomReply",
        ROOM_EVENT => "RoomEvent",
        REFRESH_TOKEN => "RefreshToken",
        REFRESH_TOKEN_REPLY => "RefreshTokenReply",
        PUSH_META => "PushMeta",
        op if op >= APP_MIN => "App",
        _ => "Unknown",
    }
}

/// Whether a pushed op is a system push every recipient gets, whatever ops it accepted.
pub fn is_system_push(op: i32) -> bool {
    op == ROOM_EVENT
}

/// Parses a Sub/Unsub body: comma-separated ops, blanks around commas allowed.
pub fn parse_op_list(body: &[u8]) -> Result<Vec<i32>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "op list is not UTF-8".to_string())?;
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<i32>().map_err(|_| format!("{s:?} is not an op")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_list_parses_and_rejects() {
        assert_eq!(
            parse_op_list(b"1000, 1001,,1002"),
            Ok(vec![1000, 1001, 1002])
        );
        assert_eq!(parse_op_list(b""), Ok(vec![]));
        assert!(parse_op_list(b"1000,x").unwrap_err().contains("\"x\""));
    }
}
