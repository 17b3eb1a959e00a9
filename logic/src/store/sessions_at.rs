//! The sessions a user's offline positions know about (see [`super::HistoryStore`]): those a
//! push is routed to, those present on a comet, and what one that ended was given.

use rim_proto::history::HistoryId;

/// A session a push to its user is routed to, as the user's index named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// Its device (its key, or the keyless device): whose position the push may move.
    pub device: String,
    /// Session key.
    pub key: String,
    /// The comet the push goes to for it.
    pub server: String,
}

/// One session of a user's device on one comet, as the device's offline position knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionAt<'a> {
    /// The user's partition (where the user's history and positions live).
    pub partition: u16,
    /// The user.
    pub mid: i64,
    /// The session's device (see [`Routed::device`]).
    pub device: &'a str,
    /// Session key.
    pub key: &'a str,
    /// The comet holding it.
    pub server: &'a str,
}

/// What a session that ended was given of its user's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Given {
    /// Everything up to this id, nothing later (its comet's report).
    UpTo(HistoryId),
    /// Nothing since it connected (its comet reports no position).
    Nothing,
    /// Not known (its comet is gone and reported nothing).
    Unknown,
}
