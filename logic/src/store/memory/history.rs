//! The in-memory push streams and histories (see the parent module). Entry ids are
//! `(append number, 0)` per partition: growing like stream ids, without a clock. Age limits are
//! not applied (domain tests of them run on Redis).

use async_trait::async_trait;
use rim_proto::history::{HistoryEntry, HistoryId};

use super::Memory;
use crate::store::{
    Append, Given, HistoryOf, HistoryRead, HistoryStore, PushStreams, SessionAt, StoreError,
    StoreResult,
};

/// One history's messages, oldest first, and the newest id trimmed out of it.
#[derive(Debug, Default)]
pub(super) struct Kept {
    entries: Vec<HistoryEntry>,
    max_deleted: HistoryId,
}

#[async_trait]
impl PushStreams for Memory {
    async fn append(&self, entries: &[Append], max_backlog: u64) -> StoreResult<()> {
        let mut st = self.0.lock();
        for e in entries {
            if st.streams.get(&e.partition).map_or(0, Vec::len) as u64 >= max_backlog {
                return Err(StoreError::Backlog {
                    stream: rim_proto::keys::push_stream(e.partition),
                    max: max_backlog,
                });
            }
        }
        for e in entries {
            let stream = st.streams.entry(e.partition).or_default();
            stream.push(e.job.clone());
            let id = HistoryId {
                ms: stream.len() as u64,
                seq: 0,
            };
            for r in &e.history {
                if let HistoryOf::User(p, mid) = r.of {
                    for s in &r.routed {
                        let at = (p, mid, s.key.clone(), s.server.clone());
                        if st.present.contains_key(&at) {
                            st.seen.insert((p, mid, s.device.clone()), id);
                        }
                    }
                }
                let kept = st.histories.entry(r.of.key()).or_default();
                kept.entries.push(HistoryEntry {
                    id,
                    op: e.job.op,
                    body: e.job.body.clone(),
                    ts_ms: e.job.accepted_ms,
                });
                let over = kept.entries.len().saturating_sub(r.max_len.max(1) as usize);
                if over > 0 {
                    kept.max_deleted = kept.entries[over - 1].id;
                    kept.entries.drain(..over);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl HistoryStore for Memory {
    async fn read(
        &self,
        of: &HistoryOf,
        after: Option<HistoryId>,
        limit: usize,
    ) -> StoreResult<HistoryRead> {
        let st = self.0.lock();
        let Some(kept) = st.histories.get(&of.key()) else {
            return Ok(HistoryRead::default());
        };
        let limit = limit.max(1);
        let entries: Vec<HistoryEntry> = match after {
            Some(a) => kept
                .entries
                .iter()
                .filter(|e| e.id > a)
                .take(limit)
                .cloned()
                .collect(),
            None => {
                let skip = kept.entries.len().saturating_sub(limit);
                kept.entries[skip..].to_vec()
            }
        };
        Ok(HistoryRead {
            entries,
            exists: true,
            first: kept.entries.first().map(|e| e.id),
            max_deleted: kept.max_deleted,
        })
    }

    async fn position(
        &self,
        p: u16,
        mid: i64,
        device: &str,
    ) -> StoreResult<(Option<HistoryId>, Option<HistoryId>)> {
        let st = self.0.lock();
        let seen = st.seen.get(&(p, mid, device.to_string())).copied();
        let last = st
            .histories
            .get(&HistoryOf::User(p, mid).key())
            .and_then(|k| k.entries.last().map(|e| e.id));
        Ok((seen, last))
    }

    async fn advance(
        &self,
        p: u16,
        mid: i64,
        device: &str,
        seen: HistoryId,
        _ttl_ms: u64,
    ) -> StoreResult<()> {
        let mut st = self.0.lock();
        let at = st.seen.entry((p, mid, device.to_string())).or_default();
        *at = (*at).max(seen);
        Ok(())
    }

    async fn present(&self, at: &SessionAt<'_>, _ttl_ms: u64) -> StoreResult<()> {
        let mut st = self.0.lock();
        let stands = st
            .seen
            .get(&(at.partition, at.mid, at.device.to_string()))
            .copied()
            .unwrap_or_default();
        let field = (
            at.partition,
            at.mid,
            at.key.to_string(),
            at.server.to_string(),
        );
        let kept = st.present.entry(field).or_insert(stands);
        *kept = (*kept).min(stands);
        Ok(())
    }

    async fn gone(&self, at: &SessionAt<'_>, given: Given, _ttl_ms: u64) -> StoreResult<()> {
        let mut st = self.0.lock();
        let field = (
            at.partition,
            at.mid,
            at.key.to_string(),
            at.server.to_string(),
        );
        let stood = st.present.remove(&field);
        let back = match given {
            Given::UpTo(id) => Some(id),
            Given::Nothing => stood,
            Given::Unknown => None,
        };
        let device = (at.partition, at.mid, at.device.to_string());
        if let (Some(back), Some(pos)) = (back, st.seen.get_mut(&device)) {
            *pos = (*pos).min(back);
        }
        Ok(())
    }
}
