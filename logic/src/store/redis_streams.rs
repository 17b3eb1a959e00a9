//! [`PushStreams`] on Redis: one stream per partition (`rim:push:{p}`), one `job` field per
//! entry holding the MessagePack-encoded `PushJob`, appended by one script that first checks
//! every target's backlog, so a push is appended to all its partitions or to none.

use std::sync::LazyLock;

use async_trait::async_trait;
use rim_proto::job::PushJob;
use rim_proto::keys;

use super::{PushStreams, RedisConn, StoreError, StoreResult};

/// Appends one entry per stream, all or nothing: if any stream already holds ARGV[1] entries it
/// returns that stream's name and appends nothing; else "" after the appends.
/// KEYS = streams; ARGV = max backlog, field name, one encoded job per key (same order).
static APPEND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local max = tonumber(ARGV[1])
for _, k in ipairs(KEYS) do
  if redis.call('XLEN', k) >= max then return k end
end
for i, k in ipairs(KEYS) do
  redis.call('XADD', k, '*', ARGV[2], ARGV[2 + i])
end
return ''
"#,
    )
});

#[async_trait]
impl PushStreams for RedisConn {
    async fn append(&self, entries: &[(u16, PushJob)], max_backlog: u64) -> StoreResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let streams: Vec<String> = entries.iter().map(|(p, _)| keys::push_stream(*p)).collect();
        let mut inv = APPEND.prepare_invoke();
        for s in &streams {
            inv.key(s);
        }
        inv.arg(max_backlog).arg(keys::JOB_FIELD);
        for (_, job) in entries {
            inv.arg(job.encode());
        }
        let full: String = self.invoke(&inv).await?;
        if full.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Backlog {
                stream: full,
                max: max_backlog,
            })
        }
    }
}
