//! Who is where, for people rather than routing: a room's members (from the member counts kept
//! by the registry scripts), a user's sessions, and the demo's dev sign-in that hands out mids
//! and display names.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::App;
use crate::store::StoreError;

/// First mid handed out, well above the small mids tests and tools like to use.
pub(crate) const FIRST_DEMO_MID: i64 = 100_000;

/// Fields one HSCAN call is asked for. Small hashes (listpack) come back whole regardless.
const SCAN_COUNT: usize = 512;
/// HSCAN calls one page may make before it returns short (sparse tables can yield empty batches).
const MAX_SCANS_PER_PAGE: usize = 64;

/// Where a member listing resumes: the HSCAN cursor of the batch, and the last mid returned from
/// that batch (batches are sorted by mid, so a page may end inside one and the next resumes
/// after that mid). `"0"` is the start (and, as an answer, the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MembersCursor {
    scan: u64,
    after: Option<i64>,
}

impl MembersCursor {
    /// Parses `scan` or `scan:after`.
    pub(crate) fn parse(s: &str) -> Option<MembersCursor> {
        let s = s.trim();
        match s.split_once(':') {
            None => Some(MembersCursor {
                scan: s.parse().ok()?,
                after: None,
            }),
            Some((scan, after)) => Some(MembersCursor {
                scan: scan.parse().ok()?,
                after: Some(after.parse().ok()?),
            }),
        }
    }

    fn render(&self) -> String {
        match self.after {
            None => self.scan.to_string(),
            Some(a) => format!("{}:{a}", self.scan),
        }
    }
}

impl App {
    /// One page of a room's members: `{"room","count","members":[{"mid","sessions","name"?}],"cursor"}`.
    ///
    /// Walks the member hash with HSCAN, sorting each batch by mid so a page can stop inside a
    /// batch and the next resume after the last mid given. Members present for the whole walk are
    /// listed exactly once; members joining or leaving meanwhile may or may not appear.
    pub(crate) async fn room_members(
        &self,
        room: &str,
        cursor: MembersCursor,
        limit: usize,
    ) -> Result<Value, StoreError> {
        let count = self.store.directory.member_count(room).await?;
        let mut page: Vec<(i64, i64)> = Vec::new();
        let mut at = cursor;
        let mut next = MembersCursor {
            scan: 0,
            after: None,
        };
        for _ in 0..MAX_SCANS_PER_PAGE {
            let (scan_next, found) = self
                .store
                .directory
                .scan_members(room, at.scan, SCAN_COUNT)
                .await?;
            let batch: BTreeMap<i64, i64> = found
                .into_iter()
                .filter(|(mid, n)| *n > 0 && at.after.is_none_or(|a| *mid > a))
                .collect();
            let room_left = limit.saturating_sub(page.len());
            if batch.len() > room_left {
                page.extend(batch.into_iter().take(room_left));
                let last = page.last().map(|(m, _)| *m);
                next = MembersCursor {
                    scan: at.scan,
                    after: last,
                };
                break;
            }
            page.extend(batch);
            if scan_next == 0 {
                next = MembersCursor {
                    scan: 0,
                    after: None,
                };
                break;
            }
            at = MembersCursor {
                scan: scan_next,
                after: None,
            };
            next = at;
            if page.len() >= limit {
                break;
            }
        }
        let names = self.names(page.iter().map(|(m, _)| *m)).await?;
        let members: Vec<Value> = page
            .iter()
            .map(|(mid, n)| {
                let mut m = json!({ "mid": mid, "sessions": n });
                if let Some(name) = names.get(mid) {
                    m["name"] = json!(name);
                }
                m
            })
            .collect();
        Ok(json!({
            "room": room,
            "count": count,
            "members": members,
            "cursor": next.render(),
        }))
    }

    /// Display names of these mids (from the dev sign-in), where known.
    async fn names(
        &self,
        mids: impl Iterator<Item = i64>,
    ) -> Result<HashMap<i64, String>, StoreError> {
        let mids: Vec<i64> = mids.collect();
        if mids.is_empty() {
            return Ok(HashMap::new());
        }
        let found = self.store.directory.names(&mids).await?;
        Ok(mids
            .into_iter()
            .zip(found)
            .filter_map(|(m, n)| n.map(|n| (m, n)))
            .collect())
    }

    /// A user's registered sessions: `[{"key","comet","platform","since","room"}]`, oldest first.
    pub(crate) async fn user_sessions(&self, mid: i64) -> Result<Value, StoreError> {
        let by_key = self.store.sessions.of_mid(mid).await?;
        let mut keys_sorted: Vec<String> = by_key.into_keys().collect();
        keys_sorted.sort();
        if keys_sorted.is_empty() {
            return Ok(json!([]));
        }
        let details = self.store.sessions.details(&keys_sorted).await?;
        let mut out: Vec<(u64, Value)> = Vec::new();
        for (key, d) in keys_sorted.into_iter().zip(details) {
            // A mid entry whose session lapsed or moved to another user is not a session.
            let (Some(server), Some(owner)) = (d.server, d.mid) else {
                continue;
            };
            if owner.parse::<i64>().ok() != Some(mid) {
                continue;
            }
            out.push((
                d.since_ms,
                json!({
                    "key": key,
                    "comet": server,
                    "platform": d.platform,
                    "since": d.since_ms,
                    // `room` as goim clients know it (the ChangeRoom/Auth room), `rooms` all.
                    "room": d.rooms.first(),
                    "rooms": d.rooms,
                }),
            ));
        }
        out.sort_by_key(|(since, _)| *since);
        Ok(Value::Array(out.into_iter().map(|(_, v)| v).collect()))
    }

    /// Dev sign-in: the mid of `name` (assigned on first use), recorded as its display name.
    pub(crate) async fn dev_sign_in(&self, name: &str) -> Result<i64, StoreError> {
        self.store.directory.sign_in(name, FIRST_DEMO_MID).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cursors_roundtrip() {
        let c = MembersCursor::parse("0").unwrap();
        assert_eq!(c.render(), "0");
        let c = MembersCursor::parse("17:-5").unwrap();
        assert_eq!((c.scan, c.after), (17, Some(-5)));
        assert_eq!(c.render(), "17:-5");
        assert!(MembersCursor::parse("x").is_none());
        assert!(MembersCursor::parse("1:y").is_none());
        assert!(MembersCursor::parse("-1").is_none());
    }
}
