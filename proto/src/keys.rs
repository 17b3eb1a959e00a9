//! Every Redis key and stream rim uses. Logic writes sessions, nodes and push jobs; job reads
//! them and owns the stream consumer group and partition leases. See docs/architecture.md.
//!
//! Keys are laid out for Redis Cluster: the part in `{…}` is the hash tag, so every key a
//! transaction, script or multi-key command touches shares one hash slot. Each push partition has
//! its own tag (its stream, lease and push-id marks), so partitions spread over the masters; a
//! room's member counts, counted sessions and comet index share the room's tag; the comet
//! registry and the demo's names each have one fixed tag. Sessions, users' session indexes and
//! comets' session sets are tagged by their own id and only ever touched one key per command.
//! A single Redis ignores the tags.

/// Consumer group of job workers on every push stream.
pub const PUSH_GROUP: &str = "rim-job";
/// Field of a push stream entry holding the MessagePack-encoded [`crate::job::PushJob`].
pub const JOB_FIELD: &str = "job";
/// Number of push partitions, written once by the first logic or job and checked by all others.
pub const META_PARTITIONS: &str = "rim:meta:partitions";
/// Hash: comet server id → JSON [`crate::rpc::NodeInfo`] of every registered comet.
pub const NODES: &str = "rim:{nodes}";
/// Sorted set: comet server id → registration expiry (unix ms). A node is live while its score is
/// in the future. Same hash slot as [`NODES`] (they change together).
pub const NODES_EXPIRY: &str = "rim:{nodes}:expiry";
/// Sorted set: job worker id → liveness expiry (unix ms); workers divide partitions among the live ones.
pub const JOB_WORKERS: &str = "rim:jobs";

/// Stream of push jobs for one partition.
pub fn push_stream(partition: u16) -> String {
    format!("rim:push:{{{partition}}}")
}

/// String with a TTL: marks that the push `msg_id` was appended to `partition`'s stream, so a
/// retried append (a reply lost in a failover) does not append it twice. Same slot as the stream.
pub fn push_mark(partition: u16, msg_id: &str) -> String {
    format!("rim:push:{{{partition}}}:msg:{msg_id}")
}

/// Stream: a room's history (`op`, `body`, `ts` per entry, ids those of the push stream
/// entries). In the room's partition's slot, so the append script writes it with the push.
pub fn room_history(partition: u16, room: &str) -> String {
    format!("rim:hist:{{{partition}}}:room:{room}")
}

/// Stream: a user's history (pushes by mid and direct messages), like [`room_history`], in the
/// user's partition's slot.
pub fn user_history(partition: u16, mid: i64) -> String {
    format!("rim:hist:{{{partition}}}:mid:{mid}")
}

/// Hash: device (session key, or `*` for sessions that authenticated without one, whose keys
/// logic generates with a `~` prefix) → the last id of the user's history routed or given to
/// that device: where its offline messages resume. Written by the push append script. Also one
/// presence field per registered session (`\x01<key>\x01<server>` → the device's position at
/// its connect): the append moves a device only for sessions present on the comet it routes to.
pub fn user_seen(partition: u16, mid: i64) -> String {
    format!("rim:hist:{{{partition}}}:seen:{mid}")
}

/// String: the job worker id holding a partition, with a TTL (the lease).
pub fn partition_lease(partition: u16) -> String {
    format!("rim:lease:{{{partition}}}")
}

/// Hash: session key → comet server id, for every session of a user. TTL renewed by heartbeats.
pub fn mid_sessions(mid: i64) -> String {
    format!("rim:mid:{{{mid}}}")
}

/// Hash describing one session: `mid`, `server`, `platform`, `since` (unix ms), `rooms` (the
/// rooms it is in, space-separated, first = its goim room; absent when none; hashes written
/// before sessions could be in several rooms have one `room` instead). TTL renewed by heartbeats.
pub fn session(key: &str) -> String {
    format!("rim:key:{{{key}}}")
}

/// Set: session keys registered on a comet (to expire them when the comet dies).
pub fn node_sessions(server: &str) -> String {
    format!("rim:node:{{{server}}}:keys")
}

/// Hash: room id → members on this comet, as last reported (online counts).
pub fn node_rooms(server: &str) -> String {
    format!("rim:node:{{{server}}}:rooms")
}

/// Set: comet server ids that have (or recently had) members in a room. Room pushes go only there.
pub fn room_nodes(room: &str) -> String {
    format!("rim:room:{{{room}}}")
}

/// Hash: mid → number of that user's sessions in the room (member listing; a user is a member
/// while the count is positive).
pub fn room_members(room: &str) -> String {
    format!("rim:room:{{{room}}}:members")
}

/// Hash: session key → mid of every session counted in [`room_members`], so a join or leave
/// retried after a lost reply counts once. Same slot as the counts.
pub fn room_sessions(room: &str) -> String {
    format!("rim:room:{{{room}}}:keys")
}

/// Hash: mid → display name, registered by the demo's dev sign-in (shown in member listings).
pub const USER_NAMES: &str = "rim:{users}:names";

/// Hash: display name → mid, for the demo's dev sign-in (the same name gets the same mid).
pub const USER_MIDS: &str = "rim:{users}:mids";

/// Counter the demo's dev sign-in allocates new mids from (starting at 100000, clear of test mids).
pub const USER_NEXT_MID: &str = "rim:{users}:next_mid";

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag Redis Cluster slots a key by: the text in the first `{…}`, if non-empty.
    fn tag(key: &str) -> &str {
        key.find('{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                rest.find('}')
                    .filter(|&n| n > 0)
                    .map(|close| &rest[..close])
            })
            .unwrap_or(key)
    }

    #[test]
    fn keys_changed_together_share_a_hash_tag() {
        assert_eq!(tag(&push_stream(3)), tag(&push_mark(3, "abc")));
        assert_eq!(tag(&push_stream(3)), "3");
        assert_eq!(tag(&push_stream(3)), tag(&room_history(3, "chat://{x}")));
        assert_eq!(tag(&push_stream(3)), tag(&user_history(3, 7)));
        assert_eq!(tag(&push_stream(3)), tag(&user_seen(3, 7)));
        assert_ne!(tag(&push_stream(3)), tag(&push_stream(4)));
        assert_eq!(tag(NODES), tag(NODES_EXPIRY));
        assert_eq!(tag(USER_NAMES), tag(USER_MIDS));
        assert_eq!(tag(USER_NAMES), tag(USER_NEXT_MID));
        // A room's keys share its tag even when the id holds braces (a room type never starts
        // with '}', so the tag is never empty).
        for room in ["live://1", "chat://a}b", "chat://{x}"] {
            assert_eq!(tag(&room_members(room)), tag(&room_sessions(room)));
            assert_eq!(tag(&room_members(room)), tag(&room_nodes(room)));
            assert!(!tag(&room_members(room)).is_empty());
        }
    }
}
