//! [`HistoryStore`] on Redis: reading room and user histories (`rim:hist:{p}:room:{room}`,
//! `rim:hist:{p}:mid:{mid}`, streams written by the append script in `redis_streams`) and the
//! devices' positions in a user's history (`rim:hist:{p}:seen:{mid}`, device → id).

use std::sync::LazyLock;

use async_trait::async_trait;
use bytes::Bytes;
use rim_proto::history::{HistoryEntry, HistoryId};
use rim_proto::keys;

use super::{HistoryOf, HistoryRead, HistoryStore, Record, RedisConn, StoreError, StoreResult};

impl HistoryOf {
    /// The history's stream key.
    pub(super) fn key(&self) -> String {
        match self {
            HistoryOf::Room(p, room) => keys::room_history(*p, room.as_str()),
            HistoryOf::User(p, mid) => keys::user_history(*p, *mid),
        }
    }
}

impl Record {
    /// The hash of device positions the append moves, when this record names devices (user
    /// histories only).
    pub(super) fn positions_key(&self) -> Option<String> {
        match (&self.of, self.devices.is_empty()) {
            (HistoryOf::User(p, mid), false) => Some(keys::user_seen(*p, *mid)),
            _ => None,
        }
    }
}

/// One snapshot of a history: whether it exists, the newest id ever trimmed from it, its oldest
/// id, and the messages asked for.
/// KEYS = history; ARGV = after id ("" = the latest), count.
/// Returns {exists 0/1, max deleted id, first id or false, entries}.
static READ: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, '0-0', false, {}} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local deleted = '0-0'
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local first_id = false
if first[1] then first_id = first[1][1] end
local entries
if ARGV[1] == '' then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[2])
else
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
end
return {1, deleted, first_id, entries}
"#,
    )
});

/// A device's position and the newest id of the user's history.
/// KEYS = positions hash, user history; ARGV = device.
static POSITION: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local seen = redis.call('HGET', KEYS[1], ARGV[1])
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local last_id = false
if last[1] then last_id = last[1][1] end
return {seen, last_id}
"#,
    )
});

/// Moves a device's position forward (`forward`: to the id if it is later) or back (`back`: to
/// the id if the position is later; a device without one gets none).
/// KEYS = positions hash; ARGV = device, id ms, id seq, ttl ms, direction.
static MOVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local nms, nseq = tonumber(ARGV[2]), tonumber(ARGV[3])
local later = nil
if cur then
  local ms, seq = string.match(cur, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  if ms then later = ms > nms or (ms == nms and seq > nseq) end
end
local set
if ARGV[5] == 'forward' then set = (later == nil) or (not later and cur ~= ARGV[2] .. '-' .. ARGV[3])
else set = later == true end
if set then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '-' .. ARGV[3]) end
if cur or set then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
if set then return 1 end
return 0
"#,
    )
});

/// A stream entry as the read script returns it: id and flat field/value pairs.
type RawEntry = (String, Vec<Vec<u8>>);

fn id_of(s: &str) -> StoreResult<HistoryId> {
    HistoryId::parse(s).map_err(|e| StoreError::Encode {
        what: "history id",
        reason: e.to_string(),
    })
}

fn entry_of((id, fields): RawEntry) -> StoreResult<HistoryEntry> {
    let mut e = HistoryEntry {
        id: id_of(&id)?,
        op: 0,
        body: Bytes::new(),
        ts_ms: 0,
    };
    for pair in fields.chunks(2) {
        let [name, value] = pair else { continue };
        let text = || std::str::from_utf8(value).unwrap_or_default();
        match name.as_slice() {
            b"op" => e.op = text().parse().unwrap_or_default(),
            b"ts" => e.ts_ms = text().parse().unwrap_or_default(),
            b"body" => e.body = Bytes::copy_from_slice(value),
            _ => {}
        }
    }
    Ok(e)
}

#[async_trait]
impl HistoryStore for RedisConn {
    async fn read(
        &self,
        of: &HistoryOf,
        after: Option<HistoryId>,
        limit: usize,
    ) -> StoreResult<HistoryRead> {
        let after = after.map(|a| a.to_string()).unwrap_or_default();
        let count = limit.max(1).to_string();
        let key = of.key();
        let (exists, deleted, first, raw): (i64, String, Option<String>, Vec<RawEntry>) = self
            .script(&READ, &[key.as_str()], &[&after, &count])
            .await?;
        let mut entries = raw
            .into_iter()
            .map(entry_of)
            .collect::<StoreResult<Vec<_>>>()?;
        if after.is_empty() {
            entries.reverse(); // read newest first
        }
        Ok(HistoryRead {
            entries,
            exists: exists == 1,
            first: first.as_deref().map(id_of).transpose()?,
            max_deleted: id_of(&deleted)?,
        })
    }

    async fn position(
        &self,
        p: u16,
        mid: i64,
        device: &str,
    ) -> StoreResult<(Option<HistoryId>, Option<HistoryId>)> {
        let seen_key = keys::user_seen(p, mid);
        let hist_key = keys::user_history(p, mid);
        let (seen, last): (Option<String>, Option<String>) = self
            .script(
                &POSITION,
                &[seen_key.as_str(), hist_key.as_str()],
                &[device],
            )
            .await?;
        Ok((
            seen.as_deref().and_then(|s| HistoryId::parse(s).ok()),
            last.as_deref().map(id_of).transpose()?,
        ))
    }

    async fn advance(
        &self,
        p: u16,
        mid: i64,
        device: &str,
        seen: HistoryId,
        ttl_ms: u64,
    ) -> StoreResult<()> {
        self.move_position(p, mid, device, seen, ttl_ms, "forward")
            .await
    }

    async fn retreat(
        &self,
        p: u16,
        mid: i64,
        device: &str,
        delivered: HistoryId,
        ttl_ms: u64,
    ) -> StoreResult<()> {
        self.move_position(p, mid, device, delivered, ttl_ms, "back")
            .await
    }
}

impl RedisConn {
    async fn move_position(
        &self,
        p: u16,
        mid: i64,
        device: &str,
        id: HistoryId,
        ttl_ms: u64,
        direction: &str,
    ) -> StoreResult<()> {
        let key = keys::user_seen(p, mid);
        let (ms, seq, ttl) = (
            id.ms.to_string(),
            id.seq.to_string(),
            ttl_ms.max(1).to_string(),
        );
        let _: i64 = self
            .script(
                &MOVE,
                &[key.as_str()],
                &[device, &ms, &seq, &ttl, direction],
            )
            .await?;
        Ok(())
    }
}
