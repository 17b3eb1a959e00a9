//! Push jobs as logic writes them into the partitioned Redis streams and job reads them.
//!
//! A push is appended to the stream of the partition its recipients hash to, so that every push
//! to one user (by mid or key) or one room lands in one stream, in acceptance order. Broadcasts
//! have a partition of their own. Entries hold one field, [`crate::keys::JOB_FIELD`], with the
//! MessagePack-encoded [`PushJob`] (named fields, so later versions can add fields).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::room::RoomId;

/// Default number of push partitions.
pub const DEFAULT_PARTITIONS: u16 = 16;

/// One queued push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushJob {
    /// Message id returned to the pusher.
    pub msg_id: String,
    /// Op the recipients receive it with.
    pub op: i32,
    /// Body, delivered untouched.
    pub body: Bytes,
    /// Who receives it.
    pub route: Route,
    /// When logic accepted it (unix ms).
    pub accepted_ms: u64,
    /// Session key that must not receive it (the sender of a room message).
    #[serde(default)]
    pub exclude: Option<String>,
    /// Recorded in the history of its room (room routes) or of each recipient user (session
    /// routes): comets tag it with its id and source for sessions that asked for them.
    #[serde(default)]
    pub recorded: bool,
}

/// Recipients of a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Route {
    /// Sessions resolved by logic at acceptance, grouped by the comet holding them.
    Sessions(Vec<ServerKeys>),
    /// Every member of a room, on whichever comet.
    Room(RoomId),
    /// Every session; `speed` > 0 paces the broadcast at that many sessions per second per comet.
    All {
        /// Sessions per second per comet (0 = as fast as possible).
        speed: u32,
    },
    /// Close the session a newer one with the same key replaced. `since_ms` identifies the old
    /// session exactly (its registration time, as logic stamped it), so a late kick never closes
    /// a session that reconnected to that comet afterwards.
    Kick {
        /// Comet holding the replaced session.
        server: String,
        /// Its key.
        key: String,
        /// Its `since` as registered (see [`crate::rpc::ConnectReply::since_ms`]).
        since_ms: u64,
    },
}

/// Session keys on one comet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerKeys {
    /// Comet server id.
    pub server: String,
    /// Session keys on it.
    pub keys: Vec<String>,
}

/// A stream entry that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("undecodable push job: {0}")]
pub struct JobDecodeError(#[from] rmp_serde::decode::Error);

impl PushJob {
    /// Bytes stored in the stream entry.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising owned plain data into a Vec cannot fail.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    /// Parses a stream entry's bytes.
    pub fn decode(bytes: &[u8]) -> Result<PushJob, JobDecodeError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

/// Partition of a user's pushes (by mid, and by key through the key's mid).
pub fn mid_partition(mid: i64, partitions: u16) -> u16 {
    partition_of(&format!("mid:{mid}"), partitions)
}

/// Partition of a room's pushes.
pub fn room_partition(room: &RoomId, partitions: u16) -> u16 {
    partition_of(&format!("room:{room}"), partitions)
}

/// Partition of broadcasts.
pub fn all_partition(partitions: u16) -> u16 {
    partition_of("all", partitions)
}

/// Stable hash (FNV-1a 64) of a routing key onto `0..partitions`; the same in every process and version.
pub fn partition_of(route_key: &str, partitions: u16) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in route_key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_roundtrip() {
        let job = PushJob {
            msg_id: "m1".into(),
            op: 1000,
            body: Bytes::from_static(b"\x00\xffhello"),
            route: Route::Sessions(vec![ServerKeys {
                server: "c1".into(),
                keys: vec!["k".into()],
            }]),
            accepted_ms: 5,
            exclude: Some("sender".into()),
            recorded: true,
        };
        assert_eq!(PushJob::decode(&job.encode()).unwrap(), job);
        let room = PushJob {
            route: Route::Room(RoomId::parse("live://1").unwrap()),
            ..job.clone()
        };
        assert_eq!(PushJob::decode(&room.encode()).unwrap(), room);
        assert!(PushJob::decode(b"\xc1garbage").is_err());
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        // Pinned: changing the hash would reorder in-flight pushes across an upgrade.
        assert_eq!(partition_of("mid:1", 16), partition_of("mid:1", 16));
        assert_eq!(partition_of("", 16), (0xcbf2_9ce4_8422_2325u64 % 16) as u16);
        for mid in 0..1000 {
            assert!(mid_partition(mid, 16) < 16);
        }
        assert_eq!(partition_of("x", 0), 0);
    }
}
