//! [`PushStreams`] on Redis: one stream per partition (`rim:push:{p}`), one `job` field per
//! entry holding the MessagePack-encoded `PushJob`. Each partition's entries are appended by one
//! script that checks the backlog and marks the push id (`rim:push:{p}:msg:{id}`, same slot), so
//! an append retried after a lost reply is not appended twice; with `redis.wait_replicas` the
//! script is followed on the same connection by `WAIT`, so an acknowledged push is on replicas.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use rim_proto::job::PushJob;
use rim_proto::keys;

use super::{PushStreams, RedisConn, StoreError, StoreResult};

/// How long a push id mark outlives the append: longer than any retry of it (a retry happens
/// within one call's `redis.timeout_ms`).
const MARK_MIN: Duration = Duration::from_secs(5);

/// Appends one partition's entries unless this push was appended there already.
/// KEYS = stream, push id mark; ARGV = max backlog, field name, mark TTL ms, encoded jobs.
/// Returns "ok", "dup" (appended before: nothing done) or "full" (the stream holds max backlog
/// entries: nothing done).
const APPEND: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 'dup' end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 'full' end
for i = 4, #ARGV do
  redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[i])
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return 'ok'
"#;

impl RedisConn {
    /// Appends `jobs` (all of one push) to `partition`'s stream: the script, then `WAIT` when
    /// replicas must confirm, in one pipeline on the connection to that stream's master.
    async fn append_partition(
        &self,
        partition: u16,
        jobs: &[&PushJob],
        max_backlog: u64,
    ) -> StoreResult<()> {
        let Some(first) = jobs.first() else {
            return Ok(());
        };
        let stream = keys::push_stream(partition);
        let mark_ms = (self.timeout() * 2).max(MARK_MIN).as_millis() as u64;
        let mut pipe = redis::pipe();
        let eval = pipe
            .cmd("EVAL")
            .arg(APPEND)
            .arg(2)
            .arg(&stream)
            .arg(keys::push_mark(partition, &first.msg_id))
            .arg(max_backlog)
            .arg(keys::JOB_FIELD)
            .arg(mark_ms);
        for job in jobs {
            eval.arg(job.encode());
        }
        let wait = self.wait_replicas;
        if wait > 0 {
            pipe.cmd("WAIT")
                .arg(wait)
                .arg(self.timeout().as_millis() as u64);
            let (outcome, replicas): (String, u32) = self.pipe(&pipe).await?;
            appended(&outcome, &stream, max_backlog)?;
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
        appended(&outcome, &stream, max_backlog)
    }
}

fn appended(outcome: &str, stream: &str, max: u64) -> StoreResult<()> {
    match outcome {
        "full" => Err(StoreError::Backlog {
            stream: stream.to_string(),
            max,
        }),
        _ => Ok(()),
    }
}

#[async_trait]
impl PushStreams for RedisConn {
    async fn append(&self, entries: &[(u16, PushJob)], max_backlog: u64) -> StoreResult<()> {
        let mut by_partition: BTreeMap<u16, Vec<&PushJob>> = BTreeMap::new();
        for (p, job) in entries {
            by_partition.entry(*p).or_default().push(job);
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
