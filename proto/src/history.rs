//! History: where a recorded push is kept (its [`Source`]), the id it has there
//! ([`HistoryId`]), what clients send to resume ([`Recover`]) and what logic answers a catch-up
//! with ([`HistoryPage`]).
//!
//! A push recorded in a room's or a user's history keeps the id of its push stream entry: the
//! partition stream is appended in order and a room or a user always maps to one partition, so
//! ids grow within each history, and the id a comet carries as `rpc::PushId` for a live push is
//! the id the same message has in the history (`PushId::history_id`, `PushId::in_history`). Clients see ids as `"ms-seq"`.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::room::RoomId;

/// Where a recorded push is kept: the history a client resumes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Source {
    /// A room's history (room pushes and messages sent to the room).
    Room(RoomId),
    /// The recipient user's own history (pushes by mid and direct messages).
    User,
}

/// A message's id within its history: the push stream entry id (`ms-seq`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct HistoryId {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence part.
    pub seq: u64,
}

/// Why a client's history id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("history id {0:?} is not of the form ms-seq")]
pub struct BadHistoryId(pub String);

impl HistoryId {
    /// Parses `ms-seq` (as clients and Redis write it).
    pub fn parse(s: &str) -> Result<HistoryId, BadHistoryId> {
        let bad = || BadHistoryId(s.chars().take(64).collect());
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(HistoryId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for HistoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One recorded message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Its id in the history.
    pub id: HistoryId,
    /// Op it was pushed with.
    pub op: i32,
    /// Its body, untouched.
    pub body: Bytes,
    /// When logic accepted it (unix ms).
    pub ts_ms: u64,
}

/// What a comet asks of one history when a session catches up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryWant {
    /// Which history (a user want is always the session's own user).
    pub source: Source,
    /// Messages after this id; `None`: the latest ones.
    pub after: Option<HistoryId>,
    /// At most this many.
    pub limit: u32,
}

/// Messages of one history, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// The messages.
    pub entries: Vec<HistoryEntry>,
    /// False when messages after the requested id (or, without one, older messages) fell out
    /// of the retention window, or when the history is not kept at all: the client cannot
    /// have everything.
    pub complete: bool,
}

/// Auth's `recover` (rim extension): the client wants each push's id and source, and resumes
/// the histories it names from the last ids it saw (`""`: it saw none yet, send what is kept).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Recover {
    /// The last id seen in the user's own history.
    pub user: Option<String>,
    /// Room → the last id seen in its history.
    pub rooms: BTreeMap<String, String>,
}

/// Parses a client's resume position: `""` is "none seen yet".
pub fn parse_after(s: &str) -> Result<Option<HistoryId>, BadHistoryId> {
    if s.is_empty() {
        Ok(None)
    } else {
        HistoryId::parse(s).map(Some)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_print_as_stream_ids() {
        let id = HistoryId::parse("1700000000000-7").unwrap();
        assert_eq!(id.to_string(), "1700000000000-7");
        assert!(HistoryId::parse("17").is_err());
        assert!(HistoryId::parse("a-1").is_err());
        assert!(HistoryId::parse("1-").is_err());
        assert_eq!(parse_after("").unwrap(), None);
        let p = |s| HistoryId::parse(s).unwrap();
        assert!(p("1-2") < p("1-10"));
        assert!(p("2-0") > p("1-10"));
    }
}
