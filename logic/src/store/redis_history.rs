//! [`HistoryStore`] on Redis: reading room and user histories (`rim:hist:{p}:room:{room}`,
//! `rim:hist:{p}:mid:{mid}`, streams written by the append script in `redis_streams`) and the
//! devices' positions in a user's history (`rim:hist:{p}:seen:{mid}`, device → id).
//!
//! The same hash holds which sessions are present where: field [`presence_field`] (`\x01` key
//! `\x01` comet) → where the device stood when the session registered there. Keys hold no
//! control characters (connect refuses them), so no device field starts with `\x01`; the
//! append script (same slot) reads these fields to decide whose positions a push moves.

use std::sync::LazyLock;

use async_trait::async_trait;
use bytes::Bytes;
use rim_proto::history::{HistoryEntry, HistoryId};
use rim_proto::keys;

use super::{
    Given, HistoryOf, HistoryRead, HistoryStore, Record, RedisConn, SessionAt, StoreError,
    StoreResult,
};

/// The positions hash field saying session `key` is present on comet `server`.
pub(super) fn presence_field(key: &str, server: &str) -> String {
    format!("\u{1}{key}\u{1}{server}")
}

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
    /// The hash of device positions the append moves, when this record names routed sessions
    /// (user histories only).
    pub(super) fn positions_key(&self) -> Option<String> {
        match (&self.of, self.routed.is_empty()) {
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

/// Moves a device's position forward, to the id if it is later (or the device has none).
/// KEYS = positions hash; ARGV = device, id ms, id seq, ttl ms.
static ADVANCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local nms, nseq = tonumber(ARGV[2]), tonumber(ARGV[3])
local set = true
if cur then
  local ms, seq = string.match(cur, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  if ms then set = nms > ms or (nms == ms and nseq > seq) end
end
if set then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '-' .. ARGV[3]) end
if cur or set then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
if set then return 1 end
return 0
"#,
    )
});

/// Lua shared by the presence scripts: `earlier(a, b)`, whether id `a` is before id `b` (an
/// unreadable id counts as `0-0`).
const EARLIER: &str = r#"
local function parts(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  return tonumber(ms) or 0, tonumber(seq) or 0
end
local function earlier(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  return am < bm or (am == bm and as < bs)
end
"#;

/// A session is present on its comet: its presence field holds where its device stands (the
/// earlier of that and what the field held).
/// KEYS = positions hash; ARGV = presence field, device, ttl ms.
static PRESENT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"{EARLIER}
local at = redis.call('HGET', KEYS[1], ARGV[2]) or '0-0'
local had = redis.call('HGET', KEYS[1], ARGV[1])
if had and earlier(had, at) then at = had end
redis.call('HSET', KEYS[1], ARGV[1], at)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
"#
    ))
});

/// A session is gone from its comet: its presence field goes and its device's position moves
/// back (if later) to what it was given (`upto`), or to where it stood at its presence
/// (`nothing`, when there was one), or stays (`unknown`).
/// KEYS = positions hash; ARGV = presence field, device, `upto`|`nothing`|`unknown`, id, ttl ms.
/// Returns 1 when the position moved back.
static GONE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"{EARLIER}
local at = redis.call('HGET', KEYS[1], ARGV[1])
if at then redis.call('HDEL', KEYS[1], ARGV[1]) end
local back = nil
if ARGV[3] == 'upto' then back = ARGV[4] elseif ARGV[3] == 'nothing' then back = at end
local cur = redis.call('HGET', KEYS[1], ARGV[2])
if back and cur and earlier(back, cur) then
  redis.call('HSET', KEYS[1], ARGV[2], back)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
"#
    ))
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
        let key = keys::user_seen(p, mid);
        let (ms, seq, ttl) = (
            seen.ms.to_string(),
            seen.seq.to_string(),
            ttl_ms.max(1).to_string(),
        );
        let _: i64 = self
            .script(&ADVANCE, &[key.as_str()], &[device, &ms, &seq, &ttl])
            .await?;
        Ok(())
    }

    async fn present(&self, at: &SessionAt<'_>, ttl_ms: u64) -> StoreResult<()> {
        let key = keys::user_seen(at.partition, at.mid);
        let field = presence_field(at.key, at.server);
        let ttl = ttl_ms.max(1).to_string();
        let _: i64 = self
            .script(&PRESENT, &[key.as_str()], &[&field, at.device, &ttl])
            .await?;
        Ok(())
    }

    async fn gone(&self, at: &SessionAt<'_>, given: Given, ttl_ms: u64) -> StoreResult<()> {
        let key = keys::user_seen(at.partition, at.mid);
        let field = presence_field(at.key, at.server);
        let (mode, id) = match given {
            Given::UpTo(id) => ("upto", id.to_string()),
            Given::Nothing => ("nothing", String::new()),
            Given::Unknown => ("unknown", String::new()),
        };
        let ttl = ttl_ms.max(1).to_string();
        let _: i64 = self
            .script(
                &GONE,
                &[key.as_str()],
                &[&field, at.device, mode, &id, &ttl],
            )
            .await?;
        Ok(())
    }
}
