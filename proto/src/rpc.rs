//! RPC between tiers (tarpc over TCP or TLS, length-delimited MessagePack).
//!
//! * [`LogicRpc`], served by logic: comets authenticate sessions and report liveness through it
//!   (logic owns every Redis write about sessions and nodes); backends push through it.
//! * [`CometRpc`], served by each comet: job delivers pushes through it.
//!
//! MessagePack here is the compact (positional) form: message types must not use
//! `skip_serializing_if`, `flatten` or untagged enums, and fields are only ever appended.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tarpc::tokio_serde::formats::MessagePack;
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::history::{HistoryId, HistoryPage, HistoryWant};
use crate::msg::AuthBody;
use crate::room::RoomId;

/// Default largest RPC message (a delivery batch of many 64 KiB pushes fits); the tiers use
/// their `[cluster] max_frame_bytes`.
pub const MAX_RPC_FRAME: usize = 32 * 1024 * 1024;

/// A tarpc transport over a TCP stream with rim's framing and codec.
pub type Transport<In, Out> = StreamTransport<TcpStream, In, Out>;

/// A tarpc transport over any byte stream (TCP, or TLS over it) with rim's framing and codec.
pub type StreamTransport<S, In, Out> =
    tarpc::serde_transport::Transport<S, In, Out, MessagePack<In, Out>>;

/// Wraps a connected stream (either side) in rim's RPC framing and codec.
pub fn transport<In, Out>(stream: TcpStream) -> Transport<In, Out>
where
    In: for<'de> Deserialize<'de>,
    Out: Serialize,
{
    let _ = stream.set_nodelay(true);
    transport_with_limit(stream, MAX_RPC_FRAME)
}

/// [`transport`] over any stream, with another frame limit (either direction; a larger frame
/// fails the stream).
pub fn transport_with_limit<S, In, Out>(stream: S, max_frame: usize) -> StreamTransport<S, In, Out>
where
    S: AsyncRead + AsyncWrite,
    In: for<'de> Deserialize<'de>,
    Out: Serialize,
{
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_framed(stream);
    tarpc::serde_transport::new(framed, MessagePack::default())
}

/// Why logic refused or failed an RPC. Maps onto the HTTP API's codes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LogicError {
    /// Malformed request; the text names the field.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Credentials missing or wrong.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Redis unreachable: not accepted, retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("internal error: {0}")]
    Internal(String),
    /// The send policy does not allow this (e.g. posting to a room the sender is not in).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The target user has no session online.
    #[error("offline: {0}")]
    Offline(String),
}

impl LogicError {
    /// The negative code clients and the HTTP API see for this error.
    pub fn code(&self) -> i32 {
        match self {
            LogicError::BadRequest(_) => -400,
            LogicError::Unauthorized(_) => -401,
            LogicError::Forbidden(_) => -403,
            LogicError::Offline(_) => -404,
            LogicError::Unavailable(_) => -503,
            LogicError::Internal(_) => -500,
        }
    }
}

/// Where an upstream message goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendTarget {
    /// Everyone in this room (on every comet).
    Room(RoomId),
    /// Every session of this user.
    Mid(i64),
}

/// An upstream message (op 4) forwarded by the comet with the sender's authenticated identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendMsgRequest {
    /// The sending session (server, mid, key) as authenticated.
    pub sender: SessionRef,
    /// The sender's current room, if any (the send policy checks room posts against it).
    pub sender_room: Option<RoomId>,
    /// Recipients.
    pub target: SendTarget,
    /// Op recipients receive it with (≥ 1000).
    pub op: i32,
    /// The payload as JSON text (kept as text: the RPC codec is positional MessagePack).
    pub data_json: String,
    /// The sender's token grant (room post policies check it).
    #[serde(default)]
    pub grant: TokenGrant,
}

/// A comet asks logic to authenticate a new session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// Comet server id.
    pub server: String,
    /// The client's auth body.
    pub auth: AuthBody,
    /// Client IP, for logs and IP counts.
    pub remote_ip: String,
}

/// An authenticated session, as logic registered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReply {
    /// User id.
    pub mid: i64,
    /// Session key (assigned when the client gave none).
    pub key: String,
    /// Room to join, if any.
    pub room: Option<RoomId>,
    /// Ops the session accepts.
    pub accepts: Vec<i32>,
    /// Heartbeat interval the client should keep, in seconds.
    pub heartbeat_secs: u32,
    /// A session with this key was online on another comet and must be replaced (it is kicked through job).
    pub replaced_elsewhere: bool,
    /// When logic registered this session (unix ms, logic's clock); the session's identity in kicks.
    pub since_ms: u64,
    /// What the client's token grants: the rooms it may be in and when the session must end.
    #[serde(default)]
    pub grant: TokenGrant,
    /// Room types whose joins logic must approve ([`LogicRpc::check_join`]): their policy is
    /// not `open` (see docs/security.md, room permissions).
    #[serde(default)]
    pub guarded_room_types: Vec<String>,
    /// Every room joined at connect: `room` first, then Auth's `rooms` (no repeats).
    #[serde(default)]
    pub rooms: Vec<RoomId>,
    /// Messages wait in the user's history for this device (`history.deliver_on_connect`):
    /// the device's last position there (`0-0`: none); the comet asks for what follows.
    #[serde(default)]
    pub offline_after: Option<HistoryId>,
    /// The cluster's `stream.partitions`: which partition a room's or a user's history ids
    /// belong to (comets mark caught-up messages with their `PushId`).
    #[serde(default)]
    pub partitions: u16,
}

/// What a verified client token grants beyond its mid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    /// Rooms the session may be in (`None`: any), as exact ids (`live://1000`) or room types
    /// (`chat://*`): a JWT's `rooms` claim.
    pub rooms: Option<Vec<String>>,
    /// When the session must end unless the client sends a fresh token (unix ms, clock skew
    /// allowance included; 0 = never: trust mode).
    pub expires_ms: u64,
}

impl TokenGrant {
    /// Whether `room` (a valid `type://id`) is allowed.
    pub fn allows_room(&self, room: &str) -> bool {
        let Some(rooms) = &self.rooms else {
            return true;
        };
        rooms.iter().any(|r| match r.strip_suffix('*') {
            Some(prefix) if prefix.ends_with("://") => room.starts_with(prefix),
            _ => r == room,
        })
    }

    /// Whether the token names `room` explicitly (by id or type): what a room type with the
    /// `token` join or post policy requires.
    pub fn names_room(&self, room: &str) -> bool {
        self.rooms.is_some() && self.allows_room(room)
    }
}

/// Identifies one session to logic (disconnect, heartbeat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    /// Comet server id.
    pub server: String,
    /// User id.
    pub mid: i64,
    /// Session key.
    pub key: String,
}

/// What a comet tells the cluster about itself, periodically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Unique comet server id (from its config).
    pub server: String,
    /// Address job reaches its [`CometRpc`] at.
    pub rpc_addr: String,
    /// Host name clients should use (from config; empty = the listen address).
    pub domain: String,
    /// Client-facing TCP address, if the TCP listener is on.
    pub tcp_addr: String,
    /// Client-facing WebSocket address (`/sub`), if on.
    pub ws_addr: String,
    /// Client-facing WebSocket over TLS address, if on.
    pub wss_addr: String,
    /// Open sessions.
    pub connections: u64,
    /// Distinct client IPs.
    pub ips: u64,
    /// Relative weight for client placement.
    pub weight: u32,
    /// When the node started (unix ms).
    pub started_ms: u64,
    /// Last renewal (unix ms), stamped by logic.
    pub renewed_ms: u64,
    /// Client-facing TCP over TLS address (goim frames inside TLS), if on. Last and defaulted,
    /// so a `NodeInfo` from a comet without it still decodes.
    #[serde(default)]
    pub tls_addr: String,
}

/// Room member counts a comet reports with its renewal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineReport {
    /// Members per room on this comet.
    pub rooms: Vec<(RoomId, u32)>,
}

/// Cluster-wide member counts for the rooms of an [`OnlineReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineCounts {
    /// Members per room across all live comets.
    pub rooms: Vec<(RoomId, u64)>,
}

/// A push accepted and durably queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushAccepted {
    /// Message id.
    pub id: String,
    /// Sessions it was routed to (pushes to keys and mids; 0 for rooms and broadcasts).
    pub sessions: u64,
    /// Recorded in a history (the room's, or each user's) for later reads and catch-up.
    #[serde(default)]
    pub stored: bool,
}

/// Logic's RPC service.
#[tarpc::service]
pub trait LogicRpc {
    /// Authenticates and registers a session.
    async fn connect(req: ConnectRequest) -> Result<ConnectReply, LogicError>;
    /// Removes a session's registration. `seen`: how far it got in its user's history (its
    /// high-water mark in the user's partition); messages routed to it past that were not
    /// delivered, so its device's offline messages resume from there.
    async fn disconnect(session: SessionRef, seen: Option<HistoryId>) -> Result<(), LogicError>;
    /// Renews a session's registration TTL.
    async fn heartbeat(session: SessionRef) -> Result<(), LogicError>;
    /// A room gained its first member on a comet: room pushes must reach it from now on.
    async fn room_joined(server: String, room: RoomId) -> Result<(), LogicError>;
    /// Registers or renews a comet and its room counts; returns cluster-wide counts for those rooms.
    async fn renew_node(node: NodeInfo, online: OnlineReport) -> Result<OnlineCounts, LogicError>;
    /// Removes a comet's registration (graceful shutdown).
    async fn unregister_node(server: String) -> Result<(), LogicError>;
    /// Push to sessions by key.
    async fn push_keys(op: i32, keys: Vec<String>, body: Bytes)
    -> Result<PushAccepted, LogicError>;
    /// Push to every session of these users.
    async fn push_mids(op: i32, mids: Vec<i64>, body: Bytes) -> Result<PushAccepted, LogicError>;
    /// Push to a room.
    async fn push_room(op: i32, room: RoomId, body: Bytes) -> Result<PushAccepted, LogicError>;
    /// Push to everyone; `speed` > 0 paces it per comet (sessions per second).
    async fn push_all(op: i32, speed: u32, body: Bytes) -> Result<PushAccepted, LogicError>;
    /// Accepts an upstream message under the send policy; returns its message id.
    async fn send_msg(req: SendMsgRequest) -> Result<PushAccepted, LogicError>;
    /// A session moved between rooms (ChangeRoom): keeps member listings and presence events right.
    async fn room_changed(
        session: SessionRef,
        from: Option<RoomId>,
        to: Option<RoomId>,
    ) -> Result<(), LogicError>;
    /// A session joined `room` besides the rooms it is in (JoinRoom): counted in its members.
    async fn join_room(session: SessionRef, room: RoomId) -> Result<(), LogicError>;
    /// A session left `room` (LeaveRoom), staying in its other rooms.
    async fn leave_room(session: SessionRef, room: RoomId) -> Result<(), LogicError>;
    /// Whether a session holding `grant` may join `room` (asked before a ChangeRoom into a room
    /// of a guarded type); `Forbidden` names the reason.
    async fn check_join(
        session: SessionRef,
        room: RoomId,
        grant: TokenGrant,
    ) -> Result<(), LogicError>;
    /// Checks a fresh token for a live session (op 22): what it grants from now on.
    async fn refresh_token(session: SessionRef, token: String) -> Result<TokenGrant, LogicError>;
    /// Reads histories for a session catching up (Auth's `recover`, a JoinRoom asking to
    /// recover, offline messages): one page per want, in order.
    async fn history(
        session: SessionRef,
        wants: Vec<HistoryWant>,
    ) -> Result<Vec<HistoryPage>, LogicError>;
}

/// Position of a push in its partition stream: the unit of ordering and duplicate suppression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PushId {
    /// Partition the push was queued in.
    pub partition: u16,
    /// Stream entry id, milliseconds part.
    pub ms: u64,
    /// Stream entry id, sequence part.
    pub seq: u64,
}

impl PushId {
    /// Parses a Redis stream entry id (`ms-seq`).
    pub fn from_stream_id(partition: u16, id: &str) -> Option<PushId> {
        let (ms, seq) = id.split_once('-')?;
        Some(PushId {
            partition,
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The stream entry id (`ms-seq`).
    pub fn stream_id(&self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }

    /// The id this push has in the history that recorded it.
    pub fn history_id(&self) -> HistoryId {
        HistoryId {
            ms: self.ms,
            seq: self.seq,
        }
    }

    /// The push id of a history's message, whose history lives in `partition`.
    pub fn in_history(id: HistoryId, partition: u16) -> PushId {
        PushId {
            partition,
            ms: id.ms,
            seq: id.seq,
        }
    }
}

/// Who on a comet receives a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliverTarget {
    /// These sessions.
    Keys(Vec<String>),
    /// Members of this room.
    Room(RoomId),
    /// Every session; `speed` > 0 paces it (sessions per second).
    All {
        /// Sessions per second (0 = as fast as possible).
        speed: u32,
    },
    /// Close the session with this key with op 6 `replaced`, only if it is the one registered at
    /// `since_ms` (a newer session with the same key must survive a late kick).
    Kick {
        /// Session key.
        key: String,
        /// The replaced session's `since` (from its [`ConnectReply::since_ms`]).
        since_ms: u64,
    },
}

/// One push for one comet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Ordering and duplicate-suppression id.
    pub id: PushId,
    /// Op of the pushed frame.
    pub op: i32,
    /// Body of the pushed frame.
    pub body: Bytes,
    /// Recipients on this comet.
    pub target: DeliverTarget,
    /// Session key that must not receive it (the sender of a room message).
    pub exclude: Option<String>,
    /// Recorded in its room's history (room targets) or its recipients' user histories (keys).
    #[serde(default)]
    pub recorded: bool,
}

/// What a comet did with a delivery batch. Returning it is the comet's confirmation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverReport {
    /// Session writes queued.
    pub queued: u64,
    /// Skipped because the session had already received that push id.
    pub duplicates: u64,
    /// Addressed keys not connected here (any more).
    pub missing: u64,
    /// Sessions disconnected because their outbound queue was full.
    pub slow_closed: u64,
}

/// Each comet's RPC service.
#[tarpc::service]
pub trait CometRpc {
    /// Delivers pushes, in order, to local sessions. Items of one batch share one partition.
    async fn deliver(items: Vec<Delivery>) -> DeliverReport;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_roundtrip() {
        let id = PushId::from_stream_id(3, "1700000000000-7").unwrap();
        assert_eq!(
            id,
            PushId {
                partition: 3,
                ms: 1_700_000_000_000,
                seq: 7
            }
        );
        assert_eq!(id.stream_id(), "1700000000000-7");
        assert_eq!(id.history_id().to_string(), "1700000000000-7");
        assert_eq!(PushId::in_history(id.history_id(), 3), id);
        assert!(PushId::from_stream_id(0, "x-1").is_none());
        assert!(PushId::from_stream_id(0, "17").is_none());
    }
}
