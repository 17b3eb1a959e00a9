//! A session catching up on a history (offline messages at connect, Auth's `recover`): what
//! happens to live pushes of that history meanwhile, and how the history's messages and those
//! live pushes are merged into one ordered sequence without a gap or a repeat.
//!
//! The session is in the room (or registered for its user's pushes) before the history is read,
//! so every message is either in what the read returns or arrives live afterwards, and some may
//! be both. While the read is under way, live pushes of that source are held back; then the
//! read's messages and the held ones go out merged by id, each once (a message in both is the
//! same id). A read can hold messages not yet delivered live and miss ones that were (job is
//! behind, or the read raced newer appends), so only the merge keeps the order. Live
//! pushes of the source that arrive later but were in the read (job was behind) are duplicates,
//! told apart by the newest id the read returned ([`CatchUp::caught`]). That mark is dropped at
//! the first live push past it: later ones are all newer.
//!
//! Messages of a history carry the ids of their push stream entries, so a history message and
//! its live push are the same [`PushId`]. The session's per-partition marks are not moved by
//! caught-up messages: a partition carries other rooms' and users' pushes too, and a message of
//! another source with a lower id may still be on its way live.

use std::sync::Arc;

use rim_proto::history::{HistoryId, HistoryPage, Source};
use rim_proto::rpc::PushId;

use crate::writer::EncodedPush;

/// What to do with a live push offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Deliver it now.
    Fresh,
    /// The session had it already.
    Duplicate,
    /// Its history is being caught up: kept, goes out after the history's messages.
    Held,
}

/// The catch-up state of one session (boxed, and only while needed).
#[derive(Debug, Default)]
pub struct CatchUp {
    /// Histories being read: their live pushes wait in `held`.
    pending: Vec<Source>,
    /// Live pushes of pending histories, in arrival order.
    held: Vec<(Source, PushId, Arc<EncodedPush>)>,
    /// Per history, the newest message the catch-up delivered.
    caught: Vec<(Source, PushId)>,
    /// The user's history could not be read from this position: the session reports it as how
    /// far it got, so the messages wait for its next connect.
    pub user_failed: Option<HistoryId>,
}

impl CatchUp {
    /// Starts holding live pushes of `source`.
    pub fn begin(&mut self, source: Source) {
        if !self.pending.contains(&source) {
            self.pending.push(source);
        }
    }

    /// Decides about a live push of `source` that passed the partition marks.
    pub fn admit(&mut self, source: &Source, id: PushId, push: &Arc<EncodedPush>) -> Admit {
        if self.pending.contains(source) {
            self.held.push((source.clone(), id, push.clone()));
            return Admit::Held;
        }
        if let Some(i) = self.caught.iter().position(|(s, _)| s == source) {
            if id <= self.caught[i].1 {
                return Admit::Duplicate;
            }
            // Live has passed the catch-up: every later push of this source is newer still.
            self.caught.swap_remove(i);
        }
        Admit::Fresh
    }

    /// Ends the catch-up of `source` from `after` (messages of `page`, ids in `partition`;
    /// `None`: the read failed) and returns what goes out now, in id order: the page's messages
    /// the session takes (`takes` filters by op) and the held live pushes, each once; and how
    /// many came from the page.
    pub fn finish(
        &mut self,
        source: &Source,
        partition: u16,
        after: Option<HistoryId>,
        page: Option<HistoryPage>,
        takes: impl Fn(i32) -> bool,
    ) -> (Vec<Arc<EncodedPush>>, usize) {
        self.pending.retain(|s| s != source);
        let (held, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(s, _, _)| s == source);
        self.held = rest;
        // The page's messages and the held live pushes, merged by id: a page message newer than
        // a held one (appended while the page was read, not delivered live yet) must not go out
        // ahead of it. A message in both goes out once (the held copy).
        let mut merged: Vec<(PushId, Arc<EncodedPush>, bool)> = Vec::new();
        match page {
            Some(page) => {
                let mut newest = None;
                for e in page.entries {
                    let id = PushId::in_history(e.id, partition);
                    newest = Some(id);
                    if held.iter().any(|(_, h, _)| *h == id) || !takes(e.op) {
                        continue;
                    }
                    let push = EncodedPush::new(e.op, &e.body).with_tag(e.id, source.clone());
                    merged.push((id, Arc::new(push), true));
                }
                if let Some(id) = newest {
                    self.caught.retain(|(s, _)| s != source);
                    self.caught.push((source.clone(), id));
                }
            }
            None if *source == Source::User => {
                self.user_failed = Some(after.unwrap_or_default());
            }
            None => {}
        }
        merged.extend(held.into_iter().map(|(_, id, p)| (id, p, false)));
        merged.sort_by_key(|(id, _, _)| *id);
        let from_history = merged.iter().filter(|(_, _, paged)| *paged).count();
        (
            merged.into_iter().map(|(_, p, _)| p).collect(),
            from_history,
        )
    }

    /// The newest caught-up id of `source`, if still tracked.
    pub fn caught(&self, source: &Source) -> Option<PushId> {
        self.caught
            .iter()
            .find(|(s, _)| s == source)
            .map(|(_, id)| *id)
    }

    /// Whether nothing is tracked any more (the session can drop this state).
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.held.is_empty()
            && self.caught.is_empty()
            && self.user_failed.is_none()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rim_proto::history::HistoryEntry;

    fn pid(seq: u64) -> PushId {
        PushId {
            partition: 2,
            ms: 1,
            seq,
        }
    }

    fn push(seq: u64) -> Arc<EncodedPush> {
        Arc::new(EncodedPush::new(1000, format!("m{seq}").as_bytes()))
    }

    fn page(seqs: &[u64]) -> HistoryPage {
        HistoryPage {
            entries: seqs
                .iter()
                .map(|&seq| HistoryEntry {
                    id: HistoryId { ms: 1, seq },
                    op: 1000,
                    body: Bytes::from(format!("m{seq}")),
                    ts_ms: 0,
                })
                .collect(),
            complete: true,
        }
    }

    fn bodies(v: &[Arc<EncodedPush>]) -> Vec<String> {
        v.iter()
            .map(|p| String::from_utf8_lossy(p.body()).into_owned())
            .collect()
    }

    #[test]
    fn history_then_held_live_pushes_without_repeats_or_gaps() {
        let user = Source::User;
        let mut c = CatchUp::default();
        c.begin(user.clone());
        // Live pushes 4 and 5 arrive while the history (3, 4) is read: both are held.
        assert_eq!(c.admit(&user, pid(4), &push(4)), Admit::Held);
        assert_eq!(c.admit(&user, pid(5), &push(5)), Admit::Held);
        let (out, from_history) = c.finish(&user, 2, None, Some(page(&[3, 4])), |_| true);
        assert_eq!(bodies(&out), ["m3", "m4", "m5"]);
        assert_eq!(from_history, 1);
        // 4 again (a replay) would be caught by the partition marks; a late live 3 (job was
        // behind the read) is a duplicate here; 6 is new and ends the tracking.
        assert_eq!(c.admit(&user, pid(3), &push(3)), Admit::Duplicate);
        assert_eq!(c.admit(&user, pid(6), &push(6)), Admit::Fresh);
        assert!(c.caught(&user).is_none());
        assert!(c.is_idle());
    }

    #[test]
    fn a_page_newer_than_a_held_push_is_merged_in_id_order() {
        let user = Source::User;
        let mut c = CatchUp::default();
        c.begin(user.clone());
        // 8 arrived live during the read; the read has 7, 8 and a 9 job has not delivered yet.
        assert_eq!(c.admit(&user, pid(8), &push(8)), Admit::Held);
        let (out, from_history) = c.finish(&user, 2, None, Some(page(&[7, 8, 9])), |_| true);
        assert_eq!(bodies(&out), ["m7", "m8", "m9"]);
        assert_eq!(from_history, 2);
        assert_eq!(c.admit(&user, pid(9), &push(9)), Admit::Duplicate);
    }

    #[test]
    fn other_sources_flow_while_one_is_caught_up() {
        let room = Source::Room(rim_proto::room::RoomId::parse("chat://a").unwrap());
        let mut c = CatchUp::default();
        c.begin(Source::User);
        assert_eq!(c.admit(&room, pid(9), &push(9)), Admit::Fresh);
        let (out, _) = c.finish(&Source::User, 2, None, Some(page(&[1])), |op| op != 1000);
        assert!(
            out.is_empty(),
            "ops the session does not accept are skipped"
        );
        assert_eq!(c.caught(&Source::User), Some(pid(1)));
    }

    #[test]
    fn a_failed_read_releases_the_held_pushes_and_remembers_the_failure() {
        let mut c = CatchUp::default();
        c.begin(Source::User);
        assert_eq!(c.admit(&Source::User, pid(7), &push(7)), Admit::Held);
        let from = HistoryId { ms: 1, seq: 2 };
        let (out, _) = c.finish(&Source::User, 2, Some(from), None, |_| true);
        assert_eq!(bodies(&out), ["m7"]);
        assert_eq!(c.user_failed, Some(from));
        assert!(!c.is_idle());
    }
}
