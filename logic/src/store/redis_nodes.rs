//! [`NodeStore`] on Redis: registrations (`rim:nodes`, server → JSON), their expiry
//! (`rim:nodes:expiry`, a sorted set by unix ms), each comet's room counts
//! (`rim:node:{server}:rooms`) and the room → comets index job routes by (`rim:room:{room}:nodes`).

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use async_trait::async_trait;
use rim_proto::keys;
use rim_proto::room::RoomId;
use rim_proto::rpc::NodeInfo;

use super::{LiveNode, NodeStore, RedisConn, StoreError, StoreResult};

/// Claims an expired node for removal: only the logic instance whose ZREM wins cleans it up.
/// KEYS = nodes expiry zset, nodes hash; ARGV = server, now ms.
static CLAIM_EXPIRED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"#,
    )
});

impl RedisConn {
    /// `SADD` or `SREM` of `server` in each room's comet index (one slot per room).
    async fn index_rooms(
        &self,
        op: &str,
        rooms: impl Iterator<Item = &String>,
        server: &str,
    ) -> StoreResult<()> {
        let cmds: Vec<redis::Cmd> = rooms
            .map(|room| {
                redis::cmd(op)
                    .arg(keys::room_nodes(room))
                    .arg(server)
                    .to_owned()
            })
            .collect();
        let _: Vec<redis::Value> = self.each(cmds).await?;
        Ok(())
    }
}

#[async_trait]
impl NodeStore for RedisConn {
    async fn stored(&self, server: &str) -> StoreResult<Option<NodeInfo>> {
        let stored: Option<String> = self
            .cmd(redis::cmd("HGET").arg(keys::NODES).arg(server))
            .await?;
        Ok(stored.and_then(|j| serde_json::from_str::<NodeInfo>(&j).ok()))
    }

    async fn room_joined(&self, server: &str, room: &RoomId, rooms_ttl_ms: u64) -> StoreResult<()> {
        // Recorded under the comet before it is indexed: an indexed room is always one a later
        // renewal or purge looks at.
        let rooms_key = keys::node_rooms(server);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.hset_nx(&rooms_key, room.as_str(), 0).ignore();
        pipe.cmd("PEXPIRE")
            .arg(&rooms_key)
            .arg(rooms_ttl_ms)
            .ignore();
        self.pipe::<()>(&pipe).await?;
        self.cmd(
            redis::cmd("SADD")
                .arg(keys::room_nodes(room.as_str()))
                .arg(server),
        )
        .await
    }

    async fn renew(
        &self,
        node: &NodeInfo,
        expiry_ms: u64,
        reported: &BTreeMap<String, u64>,
        rooms_ttl_ms: u64,
    ) -> StoreResult<()> {
        let json = serde_json::to_string(node).map_err(|e| StoreError::Encode {
            what: "node registration",
            reason: e.to_string(),
        })?;
        let server = node.server.as_str();
        let rooms_key = keys::node_rooms(server);
        let old: Vec<String> = self.cmd(redis::cmd("HKEYS").arg(&rooms_key)).await?;
        // Index the reported rooms first, so a room with members is never missing from it; drop
        // the rooms no longer reported last, once the record no longer lists them.
        self.index_rooms("SADD", reported.keys(), server).await?;
        let mut rooms = redis::pipe();
        rooms.atomic();
        rooms.del(&rooms_key).ignore();
        if !reported.is_empty() {
            let fields: Vec<(&str, u64)> = reported.iter().map(|(r, c)| (r.as_str(), *c)).collect();
            rooms.hset_multiple(&rooms_key, &fields).ignore();
            rooms
                .cmd("PEXPIRE")
                .arg(&rooms_key)
                .arg(rooms_ttl_ms)
                .ignore();
        }
        let mut registry = redis::pipe();
        registry.atomic();
        registry.hset(keys::NODES, server, &json).ignore();
        registry
            .zadd(keys::NODES_EXPIRY, server, expiry_ms)
            .ignore();
        futures::try_join!(self.pipe::<()>(&rooms), self.pipe::<()>(&registry))?;
        let gone = old.iter().filter(|r| !reported.contains_key(*r));
        self.index_rooms("SREM", gone, server).await?;
        Ok(())
    }

    async fn remove(&self, server: &str) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.zrem(keys::NODES_EXPIRY, server).ignore();
        pipe.hdel(keys::NODES, server).ignore();
        self.pipe(&pipe).await
    }

    async fn drop_rooms(&self, server: &str) -> StoreResult<()> {
        let rooms_key = keys::node_rooms(server);
        let rooms: Vec<String> = self.cmd(redis::cmd("HKEYS").arg(&rooms_key)).await?;
        self.index_rooms("SREM", rooms.iter(), server).await?;
        self.cmd(redis::cmd("DEL").arg(&rooms_key)).await
    }

    async fn expired(&self, now_ms: u64) -> StoreResult<Vec<String>> {
        self.cmd(
            redis::cmd("ZRANGEBYSCORE")
                .arg(keys::NODES_EXPIRY)
                .arg("-inf")
                .arg(now_ms),
        )
        .await
    }

    async fn claim_expired(&self, server: &str, now_ms: u64) -> StoreResult<bool> {
        let claimed: i64 = self
            .script(
                &CLAIM_EXPIRED,
                &[keys::NODES_EXPIRY, keys::NODES],
                &[server, &now_ms.to_string()],
            )
            .await?;
        Ok(claimed == 1)
    }

    async fn live(&self, now_ms: u64) -> StoreResult<Vec<LiveNode>> {
        let live: Vec<(String, u64)> = self
            .cmd(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(keys::NODES_EXPIRY)
                    .arg(format!("({now_ms}"))
                    .arg("+inf")
                    .arg("WITHSCORES"),
            )
            .await?;
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmds = Vec::with_capacity(live.len() * 2);
        for (server, _) in &live {
            cmds.push(redis::cmd("HGET").arg(keys::NODES).arg(server).to_owned());
            cmds.push(
                redis::cmd("HGETALL")
                    .arg(keys::node_rooms(server))
                    .to_owned(),
            );
        }
        let values: Vec<redis::Value> = self.each(cmds).await?;
        let mut nodes = Vec::with_capacity(live.len());
        let mut it = values.into_iter();
        for (server, expiry_ms) in live {
            let (Some(info), Some(rooms)) = (it.next(), it.next()) else {
                break;
            };
            let info: Option<String> = redis::from_redis_value(info).unwrap_or(None);
            let mut rooms: HashMap<String, u64> =
                redis::from_redis_value(rooms).unwrap_or_default();
            // Rooms recorded by room_joined and not yet counted by a renewal hold 0.
            rooms.retain(|_, n| *n > 0);
            // A node whose JSON is unreadable (foreign writer, older version) still counts by id.
            let info = info
                .and_then(|j| serde_json::from_str::<NodeInfo>(&j).ok())
                .unwrap_or_else(|| NodeInfo {
                    server: server.clone(),
                    ..NodeInfo::default()
                });
            nodes.push(LiveNode {
                info,
                expiry_ms,
                rooms,
            });
        }
        nodes.sort_by(|a, b| a.info.server.cmp(&b.info.server));
        Ok(nodes)
    }
}
