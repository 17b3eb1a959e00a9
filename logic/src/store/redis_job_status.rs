//! [`JobStatus`] on Redis: each partition's push stream (`XINFO STREAM`), job's consumer group
//! on it (`XINFO GROUPS`) and its lease (`rim:lease:{p}`), read by one script per partition
//! (the three keys share the partition's slot); live workers from `rim:jobs`.

use std::sync::LazyLock;

use async_trait::async_trait;
use rim_proto::keys;

use super::{JobStatus, PartitionView, RedisConn, StoreResult, WorkerView};

/// KEYS = stream, lease; ARGV = group name.
/// Returns {length, entries added, lag or -1, pending, holder or false}.
/// Redis reports `lag` as nil when it cannot tell (after a deletion it cannot
/// place): -1 here. No stream: all zero.
static PARTITION: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local length, added, lag, pending = 0, 0, 0, 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'length' then length = info[i + 1]
    elseif info[i] == 'entries-added' then added = info[i + 1] end
  end
  -- Without job's group nothing was read: all of it is lag.
  lag = length
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == ARGV[1] then
      lag = f['lag'] or -1
      pending = f['pending'] or 0
    end
  end
end
return {length, added, lag, pending, redis.call('GET', KEYS[2])}
"#,
    )
});

#[async_trait]
impl JobStatus for RedisConn {
    async fn partitions(&self, count: u16) -> StoreResult<Vec<PartitionView>> {
        let mut out = Vec::with_capacity(usize::from(count));
        for p in 0..count {
            let (length, added, lag, pending, holder): (u64, u64, i64, u64, Option<String>) = self
                .script(
                    &PARTITION,
                    &[&keys::push_stream(p), &keys::partition_lease(p)],
                    &[keys::PUSH_GROUP],
                )
                .await?;
            out.push(PartitionView {
                partition: p,
                length,
                added,
                lag: u64::try_from(lag).ok(),
                pending,
                holder,
            });
        }
        Ok(out)
    }

    async fn workers(&self, now_ms: u64) -> StoreResult<Vec<WorkerView>> {
        let live: Vec<(String, u64)> = self
            .cmd(
                redis::cmd("ZRANGE")
                    .arg(keys::JOB_WORKERS)
                    .arg(format!("({now_ms}"))
                    .arg("+inf")
                    .arg("BYSCORE")
                    .arg("WITHSCORES"),
            )
            .await?;
        Ok(live
            .into_iter()
            .map(|(id, expiry_ms)| WorkerView { id, expiry_ms })
            .collect())
    }
}
