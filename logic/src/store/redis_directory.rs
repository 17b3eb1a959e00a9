//! [`Directory`] on Redis: room member counts read for listings (`rim:room:{room}:members`) and
//! the demo's names (`rim:user:mids` name → mid, `rim:user:names` mid → name,
//! `rim:user:next_mid`).

use std::sync::LazyLock;

use async_trait::async_trait;
use rim_proto::keys::{self, USER_MIDS, USER_NAMES, USER_NEXT_MID};

use super::{Directory, RedisConn, StoreResult};

/// Looks a name up or assigns it the next mid, atomically, and records mid → name.
/// KEYS = name→mid hash, mid counter, mid→name hash; ARGV = name, first mid.
static SIGN_IN: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local m = redis.call('HGET', KEYS[1], ARGV[1])
if m then
  redis.call('HSET', KEYS[3], m, ARGV[1])
  return tonumber(m)
end
local n = redis.call('INCR', KEYS[2])
if n < tonumber(ARGV[2]) then
  n = tonumber(ARGV[2])
  redis.call('SET', KEYS[2], n)
end
redis.call('HSET', KEYS[1], ARGV[1], n)
redis.call('HSET', KEYS[3], n, ARGV[1])
return n
"#,
    )
});

#[async_trait]
impl Directory for RedisConn {
    async fn member_count(&self, room: &str) -> StoreResult<u64> {
        self.cmd(redis::cmd("HLEN").arg(keys::room_members(room)))
            .await
    }

    async fn scan_members(
        &self,
        room: &str,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<(i64, i64)>)> {
        let (next, flat): (u64, Vec<String>) = self
            .cmd(
                redis::cmd("HSCAN")
                    .arg(keys::room_members(room))
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        let members = flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [mid, n] => Some((mid.parse().ok()?, n.parse().ok()?)),
                _ => None,
            })
            .collect();
        Ok((next, members))
    }

    async fn names(&self, mids: &[i64]) -> StoreResult<Vec<Option<String>>> {
        if mids.is_empty() {
            return Ok(Vec::new());
        }
        self.cmd(redis::cmd("HMGET").arg(USER_NAMES).arg(mids))
            .await
    }

    async fn sign_in(&self, name: &str, first_mid: i64) -> StoreResult<i64> {
        let first = first_mid.to_string();
        self.script(
            &SIGN_IN,
            &[USER_MIDS, USER_NEXT_MID, USER_NAMES],
            &[name, &first],
        )
        .await
    }
}
