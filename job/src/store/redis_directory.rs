//! [`CometDirectory`] on Redis: reads the registry logic writes (`rim:nodes:expiry`, `rim:nodes`)
//! and the room routing index (`rim:room:{room}`).

use async_trait::async_trait;
use rim_proto::keys;
use rim_proto::rpc::NodeInfo;
use rim_runtime::redis::Conn;

use super::{CometDirectory, CometRecord, StoreResult};

pub(super) struct RedisDirectory {
    redis: Conn,
}

impl RedisDirectory {
    pub(super) fn new(redis: Conn) -> Self {
        RedisDirectory { redis }
    }
}

#[async_trait]
impl CometDirectory for RedisDirectory {
    /// `ZRANGEBYSCORE rim:nodes:expiry (<now> +inf WITHSCORES`, then `HMGET rim:nodes` of those.
    async fn live_comets(&self, now_ms: u64) -> StoreResult<Vec<CometRecord>> {
        let mut redis = self.redis.clone();
        // `(now` = strictly in the future, matching "live while its score is in the future".
        let live: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys::NODES_EXPIRY)
            .arg(format!("({now_ms}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(&mut redis)
            .await?;
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(keys::NODES);
        for (id, _) in &live {
            cmd.arg(id);
        }
        let infos: Vec<Option<String>> = cmd.query_async(&mut redis).await?;
        Ok(live
            .into_iter()
            .zip(infos)
            .map(|((server, expiry), json)| CometRecord {
                server,
                expiry_ms: expiry as u64,
                info: json.map(|j| serde_json::from_str::<NodeInfo>(&j).map_err(|e| e.to_string())),
            })
            .collect())
    }

    /// `SMEMBERS rim:room:{room}`.
    async fn room_comets(&self, room: &str) -> StoreResult<Vec<String>> {
        let mut redis = self.redis.clone();
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys::room_nodes(room))
            .query_async(&mut redis)
            .await?;
        Ok(members)
    }
}
