//! Room and user histories: which pushes are recorded (`[history]`), reading them (HTTP and the
//! comets' catch-up RPC) with the rule that says whether a read is complete, and the devices'
//! positions that decide which of a user's messages wait for a device when it connects.
//!
//! A device's position is the newest message of its user's history routed to a session of it
//! that is present on the comet it was routed to (written by the push append itself) or sent to
//! it by a catch-up; a session that ends reports what it was actually given, and a position
//! past that goes back (those messages were routed to it but never reached it).
//!
//! Present means registered there and not ended: connect records the session's presence on its
//! comet before the session is indexed for routing, and disconnect removes it, moving the
//! position back in the same atomic step, before the session is unlinked. So a push that read
//! the user's index before an unlink and is appended after the disconnect (routed to a session
//! that is gone) moves no position and waits for the device's next connect, and one appended
//! before is undone by the move back unless the session got it. A session given nothing (its
//! comet reports no position) goes back to where its device stood when it registered. A comet
//! that dies reports nothing: what was routed to it while it was still registered is lost for
//! that device, as live pushes queued there always were, and nothing is given twice.
//!
//! Recording happens in the push append itself (`publish` passes a [`Record`] per history to
//! the stream store), so a message is in its history exactly when its push was accepted.

use std::collections::HashMap;

use rim_proto::history::{HistoryId, HistoryPage, HistoryWant, Source};
use rim_proto::job;
use rim_proto::room::RoomId;
use rim_runtime::settings::SettingsError;
use serde::Deserialize;

use crate::App;
use crate::store::{Given, HistoryOf, HistoryRead, Record, Routed, SessionAt, StoreError};

/// Most messages one history keeps (`max_len`): a catch-up sends up to a whole history.
pub const MAX_LEN: u64 = 1_000;

/// Most messages one HTTP history read returns; `limit` defaults to [`DEFAULT_LIMIT`].
pub const MAX_LIMIT: usize = 1_000;
/// `limit` of an HTTP history read that names none.
pub const DEFAULT_LIMIT: usize = 50;

/// The device name of sessions that authenticated without a key (goim's clients): they share
/// one position per user, so "the next connect" gets what none of them was given.
pub const KEYLESS_DEVICE: &str = "*";

/// How the keys logic generates for sessions that gave none begin (a client may not know it
/// asked for none, but the key says so wherever it is seen: routing, catch-up, disconnect).
pub const KEYLESS_PREFIX: &str = "~";

/// The device a session key is of, for offline positions.
pub fn device(key: &str) -> &str {
    if key.starts_with(KEYLESS_PREFIX) {
        KEYLESS_DEVICE
    } else {
        key
    }
}

/// How much of one history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Most messages kept (0: none, the history is off).
    pub max_len: u64,
    /// Oldest message kept (seconds); an idle history disappears this long after its last.
    pub max_age_secs: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_len: 100,
            max_age_secs: 86_400,
        }
    }
}

impl Retention {
    fn max_age_ms(&self) -> u64 {
        self.max_age_secs.saturating_mul(1000)
    }

    fn on(&self) -> bool {
        self.max_len > 0
    }

    fn validate(&self, field: &str) -> Result<(), SettingsError> {
        if self.max_len > MAX_LEN {
            return Err(SettingsError::invalid(
                format!("{field}.max_len"),
                format!("must be at most {MAX_LEN} (a catch-up sends a whole history)"),
            ));
        }
        if self.on() && self.max_age_secs == 0 {
            return Err(SettingsError::invalid(
                format!("{field}.max_age_secs"),
                "must be > 0 when max_len is (0 max_len turns the history off)",
            ));
        }
        Ok(())
    }
}

/// `[history]`: which pushes are recorded, for how long, and what connecting devices get.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Each user's history: pushes by mid and direct messages (`max_len = 0` turns it off).
    pub users: Retention,
    /// Room histories by room type (`[history.rooms.chat]`); rooms of types not listed keep none.
    pub rooms: HashMap<String, Retention>,
    /// A device that connects gets the messages of its user's history it was not given yet,
    /// before any newer push (goim's clients too).
    pub deliver_on_connect: bool,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            users: Retention::default(),
            rooms: HashMap::new(),
            deliver_on_connect: true,
        }
    }
}

impl HistoryConfig {
    /// Checks every retention and room type.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.users.validate("history.users")?;
        for (ty, r) in &self.rooms {
            let field = format!("history.rooms.{ty}");
            RoomId::check_type(ty)
                .map_err(|e| SettingsError::invalid(field.clone(), e.to_string()))?;
            r.validate(&field)?;
        }
        Ok(())
    }

    /// How a room's history is kept, if it is.
    fn room(&self, room: &RoomId) -> Option<Retention> {
        self.rooms
            .get(room.room_type())
            .copied()
            .filter(Retention::on)
    }

    /// How users' histories are kept, if they are.
    fn user(&self) -> Option<Retention> {
        Some(self.users).filter(Retention::on)
    }
}

/// Whether a read holds everything the client asked for, as far as retention goes: nothing
/// newer than `after` (without it: nothing at all) fell out of the history.
///
/// * Trimming is seen in the history's newest trimmed id.
/// * A history that expired whole (idle for its max age) and was started again has forgotten
///   its trims; any message it lost is older than its first message by more than the max age,
///   so a gap that long after `after` is taken as a loss.
/// * A history that does not exist now lost nothing newer than `after` if `after` is younger
///   than the max age (such a message would have kept it alive).
pub fn complete(
    read: &HistoryRead,
    after: Option<HistoryId>,
    now_ms: u64,
    max_age_ms: u64,
) -> bool {
    // `0-0` is "from the beginning", like no id at all.
    let after = after.filter(|a| *a != HistoryId::default());
    let nothing_trimmed = read.max_deleted == HistoryId::default();
    match after {
        None => !read.exists || nothing_trimmed,
        Some(a) if !read.exists => now_ms.saturating_sub(a.ms) < max_age_ms,
        Some(a) => {
            read.max_deleted <= a
                && read
                    .first
                    .is_none_or(|f| f <= a || f.ms.saturating_sub(a.ms) <= max_age_ms)
        }
    }
}

impl App {
    fn partitions(&self) -> u16 {
        self.config.stream.partitions
    }

    /// The record of a push to `room`, when rooms of its type keep history.
    pub(crate) fn room_record(&self, room: &RoomId) -> Option<Record> {
        let r = self.config.history.room(room)?;
        Some(Record {
            of: HistoryOf::Room(job::room_partition(room, self.partitions()), room.clone()),
            max_len: r.max_len,
            max_age_ms: r.max_age_ms(),
            routed: Vec::new(),
        })
    }

    /// The record of a push to user `mid`, when users keep history, routed live to the
    /// sessions `sessions` (key, comet): the devices of those present there are given it (not
    /// owed it at their next connect).
    pub(crate) fn user_record<'a>(
        &self,
        mid: i64,
        sessions: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Option<Record> {
        let r = self.config.history.user()?;
        let mut routed: Vec<Routed> = Vec::new();
        if self.config.history.deliver_on_connect {
            routed.extend(sessions.into_iter().map(|(key, server)| Routed {
                device: device(key).to_string(),
                key: key.clone(),
                server: server.clone(),
            }));
        }
        Some(Record {
            of: HistoryOf::User(job::mid_partition(mid, self.partitions()), mid),
            max_len: r.max_len,
            max_age_ms: r.max_age_ms(),
            routed,
        })
    }

    /// Up to `limit` messages of a history after `after` (the latest without it), oldest
    /// first. `None` when that history is not kept (its room type is not configured).
    pub(crate) async fn history_page(
        &self,
        source: &Source,
        mid: i64,
        after: Option<HistoryId>,
        limit: usize,
    ) -> Result<Option<HistoryPage>, StoreError> {
        let record = match source {
            Source::Room(room) => self.room_record(room),
            Source::User => self.user_record(mid, std::iter::empty()),
        };
        let Some(record) = record else {
            return Ok(None);
        };
        let read = self
            .store
            .history
            .read(&record.of, after, limit.max(1))
            .await?;
        let complete = complete(&read, after, rim_runtime::unix_ms(), record.max_age_ms);
        Ok(Some(HistoryPage {
            entries: read.entries,
            complete,
        }))
    }

    /// The pages a comet asked for while session `key` of `mid` catches up: each as much as its
    /// history keeps after the given id, a history that is not kept as an empty incomplete
    /// page. Pages are cut at half an RPC frame in all; a cut page is incomplete. The user's
    /// messages sent count as given to the session's device.
    pub(crate) async fn catch_up(
        &self,
        mid: i64,
        key: &str,
        wants: &[HistoryWant],
    ) -> Result<Vec<HistoryPage>, StoreError> {
        let mut budget = self.config.cluster.max_frame_bytes / 2;
        let mut pages = Vec::with_capacity(wants.len());
        for w in wants {
            let limit = (w.limit as usize).clamp(1, MAX_LEN as usize);
            let Some(mut page) = self.history_page(&w.source, mid, w.after, limit).await? else {
                pages.push(HistoryPage::default());
                continue;
            };
            let fits = page
                .entries
                .iter()
                .take_while(|e| match budget.checked_sub(e.body.len() + 64) {
                    Some(left) => {
                        budget = left;
                        true
                    }
                    None => false,
                })
                .count();
            if fits < page.entries.len() {
                tracing::warn!(mid, ?w.source, kept = fits, "catch-up cut at half of cluster.max_frame_bytes");
                page.entries.truncate(fits);
                page.complete = false;
            }
            if let (Source::User, Some(last)) = (&w.source, page.entries.last()) {
                self.device_given(mid, device(key), last.id).await?;
            }
            pages.push(page);
        }
        Ok(pages)
    }

    /// Where a connecting device's offline messages start, when some wait for it: its position
    /// in its user's history (`0-0` when it has none), if the history holds a later message.
    pub(crate) async fn offline_after(
        &self,
        mid: i64,
        device: &str,
    ) -> Result<Option<HistoryId>, StoreError> {
        let Some((p, _)) = self.positions_of(mid) else {
            return Ok(None);
        };
        let (seen, last) = self.store.history.position(p, mid, device).await?;
        let seen = seen.unwrap_or_default();
        Ok(last.filter(|l| *l > seen).map(|_| seen))
    }

    /// Where user `mid`'s device positions live (partition) and for how long (ms), when
    /// positions are kept at all (users' history and `deliver_on_connect` on).
    fn positions_of(&self, mid: i64) -> Option<(u16, u64)> {
        let r = self.config.history.user()?;
        self.config
            .history
            .deliver_on_connect
            .then(|| (job::mid_partition(mid, self.partitions()), r.max_age_ms()))
    }

    /// Records that `device` was given its user's messages up to `id` (a catch-up sent them).
    async fn device_given(&self, mid: i64, device: &str, id: HistoryId) -> Result<(), StoreError> {
        match self.positions_of(mid) {
            Some((p, ttl)) => self.store.history.advance(p, mid, device, id, ttl).await,
            None => Ok(()),
        }
    }

    /// Session `key` of `mid` is registering on `server`: from now on pushes routed to it
    /// there count as given to its device (until [`App::device_gone`]).
    pub(crate) async fn device_present(
        &self,
        mid: i64,
        key: &str,
        server: &str,
    ) -> Result<(), StoreError> {
        match self.session_at(mid, key, server) {
            Some((at, ttl)) => self.store.history.present(&at, ttl).await,
            None => Ok(()),
        }
    }

    /// Session `key` of `mid` on `server` ended having been `given` what it says: pushes routed
    /// to it there no longer count as given, and its device's position goes back past those it
    /// did not get (they wait for the device's next connect).
    pub(crate) async fn device_gone(
        &self,
        mid: i64,
        key: &str,
        server: &str,
        given: Given,
    ) -> Result<(), StoreError> {
        match self.session_at(mid, key, server) {
            Some((at, ttl)) => self.store.history.gone(&at, given, ttl).await,
            None => Ok(()),
        }
    }

    /// Where session `key` of `mid` on `server` stands in its user's device positions, and their
    /// TTL; `None` when device positions are not kept.
    fn session_at<'a>(
        &self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> Option<(SessionAt<'a>, u64)> {
        let (partition, ttl) = self.positions_of(mid)?;
        let at = SessionAt {
            partition,
            mid,
            device: device(key),
            key,
            server,
        };
        Some((at, ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> HistoryId {
        HistoryId { ms, seq }
    }

    fn read(exists: bool, first: Option<HistoryId>, max_deleted: HistoryId) -> HistoryRead {
        HistoryRead {
            entries: Vec::new(),
            exists,
            first,
            max_deleted,
        }
    }

    const AGE: u64 = 60_000;

    #[test]
    fn a_read_is_incomplete_only_when_something_after_it_fell_out() {
        let untrimmed = read(true, Some(id(1_000, 0)), id(0, 0));
        assert!(complete(&untrimmed, None, 2_000, AGE));
        assert!(complete(&untrimmed, Some(id(500, 0)), 2_000, AGE));
        // `0-0` reads from the beginning.
        assert!(complete(&untrimmed, Some(id(0, 0)), 2_000, AGE));

        let trimmed = read(true, Some(id(1_000, 0)), id(900, 3));
        assert!(!complete(&trimmed, None, 2_000, AGE));
        assert!(!complete(&trimmed, Some(id(900, 2)), 2_000, AGE));
        assert!(complete(&trimmed, Some(id(900, 3)), 2_000, AGE));
        assert!(!complete(&trimmed, Some(id(0, 0)), 2_000, AGE));
    }

    #[test]
    fn a_history_that_expired_and_restarted_reports_a_long_gap_as_a_loss() {
        // Started again at 200 000 with nothing trimmed since: a client at 100 000 may have
        // missed messages of the old history (it lived until at least 100 000 + AGE).
        let restarted = read(true, Some(id(200_000, 0)), id(0, 0));
        assert!(!complete(&restarted, Some(id(100_000, 0)), 200_001, AGE));
        assert!(complete(&restarted, Some(id(150_000, 0)), 200_001, AGE));
        assert!(complete(&restarted, Some(id(200_000, 0)), 200_001, AGE));
    }

    #[test]
    fn a_missing_history_lost_nothing_younger_than_its_max_age() {
        let gone = read(false, None, id(0, 0));
        assert!(complete(&gone, None, 10_000, AGE));
        assert!(complete(&gone, Some(id(9_000, 0)), 10_000, AGE));
        assert!(!complete(&gone, Some(id(9_000, 0)), 9_000 + AGE, AGE));
    }

    #[test]
    fn retention_is_validated_per_field() {
        let mut c = HistoryConfig::default();
        c.validate().unwrap_or_else(|e| panic!("{e}"));
        c.rooms.insert(
            "chat".into(),
            Retention {
                max_len: MAX_LEN + 1,
                max_age_secs: 1,
            },
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("history.rooms.chat.max_len"), "{e}");
        c.rooms.clear();
        c.rooms.insert(
            "bad type!".into(),
            Retention {
                max_len: 1,
                max_age_secs: 1,
            },
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("history.rooms.bad type!"), "{e}");
        c.rooms.clear();
        c.users.max_age_secs = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("history.users.max_age_secs"), "{e}");
        c.users.max_len = 0;
        c.validate().unwrap_or_else(|e| panic!("{e}"));
    }
}
