//! Every Redis key and stream rim uses. Logic writes sessions, nodes and push jobs; job reads
//! them and owns the stream consumer group and partition leases. See docs/architecture.md.

/// Consumer group of job workers on every push stream.
pub const PUSH_GROUP: &str = "rim-job";
/// Field of a push stream entry holding the MessagePack-encoded [`crate::job::PushJob`].
pub const JOB_FIELD: &str = "job";
/// Number of push partitions, written once by the first logic or job and checked by all others.
pub const META_PARTITIONS: &str = "rim:meta:partitions";
/// Hash: comet server id → JSON [`crate::rpc::NodeInfo`] of every registered comet.
pub const NODES: &str = "rim:nodes";
/// Sorted set: comet server id → registration expiry (unix ms). A node is live while its score is in the future.
pub const NODES_EXPIRY: &str = "rim:nodes:expiry";
/// Sorted set: job worker id → liveness expiry (unix ms); workers divide partitions among the live ones.
pub const JOB_WORKERS: &str = "rim:jobs";

/// Stream of push jobs for one partition.
pub fn push_stream(partition: u16) -> String {
    format!("rim:push:{partition}")
}

/// String: the job worker id holding a partition, with a TTL (the lease).
pub fn partition_lease(partition: u16) -> String {
    format!("rim:lease:{partition}")
}

/// Hash: session key → comet server id, for every session of a user. TTL renewed by heartbeats.
pub fn mid_sessions(mid: i64) -> String {
    format!("rim:mid:{mid}")
}

/// Hash describing one session: `mid`, `server`, `platform`, `since` (unix ms), `room` (current
/// room, absent when none). TTL renewed by heartbeats.
pub fn session(key: &str) -> String {
    format!("rim:key:{key}")
}

/// Set: session keys registered on a comet (to expire them when the comet dies).
pub fn node_sessions(server: &str) -> String {
    format!("rim:node:{server}:keys")
}

/// Hash: room id → members on this comet, as last reported (online counts).
pub fn node_rooms(server: &str) -> String {
    format!("rim:node:{server}:rooms")
}

/// Set: comet server ids that have (or recently had) members in a room. Room pushes go only there.
pub fn room_nodes(room: &str) -> String {
    format!("rim:room:{room}")
}

/// Hash: mid → number of that user's sessions in the room (member listing; a user is a member
/// while the count is positive).
pub fn room_members(room: &str) -> String {
    format!("rim:room:{room}:members")
}

/// Hash: mid → display name, registered by the demo's dev sign-in (shown in member listings).
pub const USER_NAMES: &str = "rim:user:names";

/// Hash: display name → mid, for the demo's dev sign-in (the same name gets the same mid).
pub const USER_MIDS: &str = "rim:user:mids";

/// Counter the demo's dev sign-in allocates new mids from (starting at 100000, clear of test mids).
pub const USER_NEXT_MID: &str = "rim:user:next_mid";
