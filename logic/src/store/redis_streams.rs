//! [`PushStreams`] on Redis: one stream per partition (`rim:push:{p}`), one `job` field per
//! entry holding the MessagePack-encoded `PushJob`. Each partition's entries are appended by one
//! script that checks the backlog, writes the histories that record each entry (same slot:
//! `rim:hist:{p}:…`, with the entry's id) and marks the push id (`rim:push:{p}:msg:{id}`), so an
//! append retried after a lost reply is not appended twice; with `redis.wait_replicas` the
//! script is followed on the same connection by `WAIT` (for half of `redis.timeout_ms`), so an
//! acknowledged push is on replicas and one they did not confirm is refused as not replicated.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use rim_proto::keys;

use super::redis_history::presence_field;
use super::{Append, PushStreams, RedisConn, Routed, StoreError, StoreResult};

/// How long a push id mark outlives the append: longer than any retry of it (a retry happens
/// within one call's `redis.timeout_ms`).
const MARK_MIN: Duration = Duration::from_secs(5);

/// Appends one partition's entries unless this push was appended there already, recording each
/// in its histories with the entry's id.
/// KEYS = stream, push id mark, histories (each followed by its devices' positions hash when
/// it names routed sessions); ARGV = max backlog, field name, mark TTL ms, then per entry:
/// encoded job, op, body, accepted ms, number of histories, and per history its KEYS index, max
/// length, max age (ms), number of routed sessions and per session its device and presence
/// field (`redis_history::presence_field`): the device's position moves to the entry only when
/// the session is present where it is routed.
/// Returns "ok", "dup" (appended before: nothing done), "full" (the stream holds max backlog
/// entries: nothing done) or "skipped:N" (appended, but N history writes were refused because
/// the history already held a later id, which only a deleted push stream can cause).
const APPEND: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 'dup' end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 'full' end
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function newer(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  return am > bm or (am == bm and as > bs)
end
local i = 4
local skipped = 0
while i <= #ARGV do
  local id = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[i])
  local op, body, ts, n = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
  i = i + 5
  local ms = parts(id)
  for _ = 1, n do
    local key = KEYS[tonumber(ARGV[i])]
    local max_len, age, ndev = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    local routed_at = i + 4
    i = i + 4 + 2 * ndev
    -- Routed live to sessions present there: not owed to their devices at their next connect.
    -- A session that is gone (or never registered there) leaves its device's position alone.
    if ndev > 0 then
      local seen = KEYS[tonumber(ARGV[routed_at - 4]) + 1]
      for d = 0, ndev - 1 do
        local at = routed_at + 2 * d
        if redis.call('HEXISTS', seen, ARGV[at + 1]) == 1 then
          redis.call('HSET', seen, ARGV[at], id)
        end
      end
      redis.call('PEXPIRE', seen, age)
    end
    local r = redis.pcall('XADD', key, id, 'op', op, 'body', body, 'ts', ts)
    if type(r) == 'table' and r.err then
      skipped = skipped + 1
    else
      -- Trimmed by hand, oldest first, so the newest id trimmed is known and recorded as the
      -- stream's max-deleted-entry-id (XADD MAXLEN and XTRIM do not record it).
      local cut = nil
      local over = redis.call('XLEN', key) - max_len
      if over > 0 then
        local old = redis.call('XRANGE', key, '-', '+', 'COUNT', over)
        cut = old[#old][1]
      end
      if ms > age then
        local aged = redis.call('XREVRANGE', key, string.format('(%d-0', ms - age), '-', 'COUNT', 1)
        if aged[1] and (cut == nil or newer(aged[1][1], cut)) then cut = aged[1][1] end
      end
      if cut then
        local cm, cs = parts(cut)
        redis.call('XTRIM', key, 'MINID', string.format('%d-%d', cm, cs + 1))
        redis.call('XSETID', key, id, 'MAXDELETEDID', cut)
      end
      redis.call('PEXPIRE', key, age)
    end
  end
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
if skipped > 0 then return 'skipped:' .. skipped end
return 'ok'
"#;

impl RedisConn {
    /// Appends `jobs` (all of one push) to `partition`'s stream: the script, then `WAIT` when
    /// replicas must confirm, in one pipeline on the connection to that stream's master.
    async fn append_partition(
        &self,
        partition: u16,
        entries: &[&Append],
        max_backlog: u64,
    ) -> StoreResult<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let stream = keys::push_stream(partition);
        let mark_ms = (self.timeout() * 2).max(MARK_MIN).as_millis() as u64;
        // KEYS first (the stream, the mark, then every history in entry order), so the
        // arguments can name each history by its index.
        let mut keys_in = vec![
            stream.clone(),
            keys::push_mark(partition, &first.job.msg_id),
        ];
        for e in entries {
            for r in &e.history {
                keys_in.push(r.of.key());
                keys_in.extend(r.positions_key());
            }
        }
        let mut pipe = redis::pipe();
        let eval = pipe
            .cmd("EVAL")
            .arg(APPEND)
            .arg(keys_in.len())
            .arg(&keys_in)
            .arg(max_backlog)
            .arg(keys::JOB_FIELD)
            .arg(mark_ms);
        let mut key_index = 2;
        for e in entries {
            eval.arg(e.job.encode())
                .arg(e.job.op)
                .arg(e.job.body.as_ref())
                .arg(e.job.accepted_ms)
                .arg(e.history.len());
            for r in &e.history {
                key_index += 1;
                let routed: &[Routed] = match r.positions_key() {
                    Some(_) => &r.routed,
                    None => &[],
                };
                eval.arg(key_index)
                    .arg(r.max_len.max(1))
                    .arg(r.max_age_ms.max(1))
                    .arg(routed.len());
                for s in routed {
                    eval.arg(&s.device).arg(presence_field(&s.key, &s.server));
                }
                key_index += routed.len().min(1); // the positions hash follows the history
            }
        }
        let wait = self.wait_replicas;
        if wait > 0 {
            // Short of replicas, WAIT answers only when its own timeout ends, and that answer
            // must arrive within the call's bound, which the script's run already started:
            // waiting the whole bound turned every missing replica into a timeout. Half of it
            // leaves the rest for the script and the round trip (at least 1 ms: 0 = forever).
            let wait_ms = (self.timeout() / 2).as_millis().max(1) as u64;
            pipe.cmd("WAIT").arg(wait).arg(wait_ms);
            let (outcome, replicas): (String, u32) = self.pipe(&pipe).await?;
            self.appended(&outcome, &stream, max_backlog)?;
            if replicas < wait {
                return Err(StoreError::NotReplicated {
                    stream,
                    wanted: wait,
                    got: replicas,
                });
            }
            return Ok(());
        }
        let (outcome,): (String,) = self.pipe(&pipe).await?;
        self.appended(&outcome, &stream, max_backlog)
    }

    fn appended(&self, outcome: &str, stream: &str, max: u64) -> StoreResult<()> {
        match outcome {
            "full" => Err(StoreError::Backlog {
                stream: stream.to_string(),
                max,
            }),
            skipped if skipped.starts_with("skipped:") => {
                // Accepted and queued, but not recorded everywhere: say so loudly.
                rim_runtime::warn_throttled!(%stream, outcome = skipped, "push not recorded in every history (the push stream was deleted and restarted below a history's last id)");
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl PushStreams for RedisConn {
    async fn append(&self, entries: &[Append], max_backlog: u64) -> StoreResult<()> {
        let mut by_partition: BTreeMap<u16, Vec<&Append>> = BTreeMap::new();
        for e in entries {
            by_partition.entry(e.partition).or_default().push(e);
        }
        // A full stream refuses the whole push before anything is written, as far as a read can
        // tell (the script checks again; a stream filling up in between refuses its part only).
        if by_partition.len() > 1 {
            let lens: Vec<redis::Cmd> = by_partition
                .keys()
                .map(|p| redis::cmd("XLEN").arg(keys::push_stream(*p)).to_owned())
                .collect();
            let lens: Vec<u64> = self.each(lens).await?;
            if let Some((p, _)) = by_partition
                .keys()
                .zip(lens)
                .find(|(_, n)| *n >= max_backlog)
            {
                return Err(StoreError::Backlog {
                    stream: keys::push_stream(*p),
                    max: max_backlog,
                });
            }
        }
        // Every partition is written (a refusal of one does not stop the others: each is
        // complete on its own), and the push is accepted only if all were.
        let results = futures::future::join_all(
            by_partition
                .iter()
                .map(|(p, jobs)| self.append_partition(*p, jobs, max_backlog)),
        )
        .await;
        results.into_iter().collect()
    }
}
