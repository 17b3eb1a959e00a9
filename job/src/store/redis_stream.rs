//! [`PartitionStream`] on Redis: stream `rim:push:{p}`, consumer group `rim-job`, read with
//! `XREADGROUP`, taken over with `XAUTOCLAIM`, acknowledged and trimmed by one Lua script.

use std::time::Duration;

use async_trait::async_trait;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisResult, Value};
use rim_proto::keys;
use rim_runtime::redis::{Conn, Topology};

use super::StreamEntry;
use super::{AckOutcome, ClaimPage, PartitionStream, PartitionStreams, StoreError, StoreResult};

/// `XACK` the batch (ARGV[3..]), then `XTRIM MINID` to the lower of ARGV[2] (the entry after the
/// batch; empty = no trim) and the oldest entry still pending, so an entry that was read but not
/// acknowledged (a lost read reply) is never trimmed away. One atomic step, one round trip.
/// Returns `{pending count, oldest pending id or nil, XLEN after the trim}`.
const ACK_LUA: &str = r"
local stream, group, trim_to = KEYS[1], ARGV[1], ARGV[2]
local i = 3
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  redis.call('XACK', stream, group, unpack(ARGV, i, j))
  i = j + 1
end
local p = redis.call('XPENDING', stream, group)
local oldest = p[2]
-- Stream ids are decimal 'ms-seq' without leading zeros: compare parts by length, then text
-- (exact for any u64, unlike Lua numbers).
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
if oldest and trim_to ~= '' and before(oldest, trim_to) then
  trim_to = oldest
end
if trim_to ~= '' then
  redis.call('XTRIM', stream, 'MINID', trim_to)
end
return {p[1], oldest, redis.call('XLEN', stream)}";

/// Opens [`RedisStream`]s on shared connections.
pub(super) struct RedisStreams {
    topology: Topology,
    redis: Conn,
}

impl RedisStreams {
    pub(super) fn new(topology: Topology, redis: Conn) -> Self {
        RedisStreams { topology, redis }
    }
}

impl PartitionStreams for RedisStreams {
    fn open(&self, partition: u16, consumer: &str) -> Box<dyn PartitionStream> {
        Box::new(RedisStream {
            stream: keys::push_stream(partition),
            consumer: consumer.to_owned(),
            topology: self.topology.clone(),
            redis: self.redis.clone(),
            blocking: None,
            ack_script: redis::Script::new(ACK_LUA),
        })
    }
}

/// One partition's stream, read by one consumer.
struct RedisStream {
    stream: String,
    consumer: String,
    /// For the blocking connection.
    topology: Topology,
    /// Auto-reconnecting connection for everything but `XREADGROUP … BLOCK`.
    redis: Conn,
    /// Connection for `XREADGROUP … BLOCK`, without a response timeout (the client's default
    /// 500 ms would cut every block short). Dropped after any read error and re-created (on a
    /// cluster or behind sentinels, to the stream's current master).
    blocking: Option<Conn>,
    ack_script: redis::Script,
}

impl RedisStream {
    /// `XREADGROUP GROUP rim-job <me> COUNT count BLOCK block STREAMS stream >` on the
    /// dedicated connection (no response timeout: the reply may legitimately take `block`).
    async fn read_group(&mut self, count: usize, block: Duration) -> StoreResult<Vec<StreamId>> {
        let conn = match self.blocking.as_mut() {
            Some(c) => c,
            None => {
                let conn = self.topology.blocking(Duration::from_secs(2)).await?;
                self.blocking.insert(conn)
            }
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(keys::PUSH_GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            // BLOCK 0 would wait forever; a linger that rounds to 0 ms waits 1 ms instead.
            .arg((block.as_millis() as u64).max(1))
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">");
        let query = cmd.query_async::<Option<StreamReadReply>>(conn);
        // No response timeout on this connection, so guard against a half-dead socket here.
        let reply = tokio::time::timeout(block + Duration::from_secs(5), query)
            .await
            .map_err(|_| StoreError::Overdue("XREADGROUP"))??;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }
}

/// The entry as the domain sees it: its id and the `job` field's bytes.
fn entry(raw: StreamId) -> StreamEntry {
    let job = match raw.map.get(keys::JOB_FIELD) {
        Some(Value::BulkString(bytes)) => Ok(bytes.clone()),
        Some(other) => Err(format!(
            "field {:?} is not a string: {other:?}",
            keys::JOB_FIELD
        )),
        None => Err(format!("no {:?} field", keys::JOB_FIELD)),
    };
    StreamEntry { id: raw.id, job }
}

#[async_trait]
impl PartitionStream for RedisStream {
    /// `XGROUP CREATE stream rim-job 0 MKSTREAM`, tolerating BUSYGROUP.
    async fn ensure_group(&mut self) -> StoreResult<()> {
        let r: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(keys::PUSH_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.redis)
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn read_new(&mut self, count: usize, block: Duration) -> StoreResult<Vec<StreamEntry>> {
        match self.read_group(count, block).await {
            Ok(raw) => Ok(raw.into_iter().map(entry).collect()),
            Err(e) => {
                // The socket may be half dead; the next read connects afresh.
                self.blocking = None;
                Err(e)
            }
        }
    }

    /// `XAUTOCLAIM stream rim-job <me> 0 <cursor> COUNT count`.
    async fn claim_pending(&mut self, cursor: &str, count: usize) -> StoreResult<ClaimPage> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(keys::PUSH_GROUP)
            .arg(&self.consumer)
            .arg(0)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.redis)
            .await?;
        Ok(ClaimPage {
            claimed: reply.claimed.into_iter().map(entry).collect(),
            deleted: reply.deleted_ids,
            next: (reply.next_stream_id != "0-0").then_some(reply.next_stream_id),
        })
    }

    /// `XPENDING stream rim-job IDLE <ms> - + 1`.
    async fn has_stale_pending(&mut self, idle: Duration) -> StoreResult<bool> {
        let found: Vec<Value> = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(keys::PUSH_GROUP)
            .arg("IDLE")
            .arg(idle.as_millis() as u64)
            .arg("-")
            .arg("+")
            .arg(1)
            .query_async(&mut self.redis)
            .await?;
        Ok(!found.is_empty())
    }

    /// [`ACK_LUA`]: one round trip, atomic.
    async fn ack_trim(
        &mut self,
        ids: &[String],
        trim_below: Option<&str>,
    ) -> StoreResult<AckOutcome> {
        let mut invocation = self.ack_script.key(&self.stream);
        invocation
            .arg(keys::PUSH_GROUP)
            .arg(trim_below.unwrap_or_default())
            .arg(ids);
        let (pending, oldest_pending, len): (u64, Option<String>, u64) =
            invocation.invoke_async(&mut self.redis).await?;
        Ok(AckOutcome {
            pending,
            oldest_pending,
            len,
        })
    }
}
