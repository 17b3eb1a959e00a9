//! [`SessionStore`] on Redis: session hashes (`rim:session:{key}`), users' session indexes
//! (`rim:mid:{mid}`, key → comet), comets' session sets (`rim:node:{server}:sessions`) and room
//! member counts (`rim:room:{room}:members`, mid → sessions), with the Lua scripts that keep the
//! counts in step with the sessions' stored rooms.

use std::collections::HashMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use rim_proto::keys;
use rim_proto::room::RoomId;

use super::{
    Dropped, Membership, Moved, RedisConn, Registered, Registration, SessionDetails, SessionHead,
    SessionStore, StoreResult,
};

/// Lua helpers shared by the scripts that keep room member counts
/// (`rim:room:{room}:members`, mid → sessions of that user in the room). Both return the new
/// count; `mem_dec` returns -1 when there was nothing to decrement, so counts never go negative
/// and a field reaching 0 is deleted (a user is a member while its field exists).
const MEMBERS_LUA: &str = r#"
local function mem_inc(pre, suf, room, mid)
  return redis.call('HINCRBY', pre .. room .. suf, mid, 1)
end
local function mem_dec(pre, suf, room, mid)
  local k = pre .. room .. suf
  local n = tonumber(redis.call('HGET', k, mid) or '0')
  if n <= 0 then
    redis.call('HDEL', k, mid)
    return -1
  end
  n = redis.call('HINCRBY', k, mid, -1)
  if n <= 0 then redis.call('HDEL', k, mid); n = 0 end
  return n
end
"#;

/// Drops one session if it still belongs to `server` (a reconnect elsewhere must survive), and
/// its membership in the room stored in its hash.
/// KEYS[1] = session hash; ARGV = server, key, mid-hash key prefix, members prefix, members suffix.
/// Returns {dropped 0/1, mid, room, that mid's sessions left in the room or -1}.
static DROP_SESSION: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{MEMBERS_LUA}{}",
        r#"
local h = redis.call('HMGET', KEYS[1], 'server', 'mid', 'room')
if h[1] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  local left = -1
  if h[2] then
    local mk = ARGV[3] .. h[2]
    if redis.call('HGET', mk, ARGV[2]) == ARGV[1] then redis.call('HDEL', mk, ARGV[2]) end
    if h[3] then left = mem_dec(ARGV[4], ARGV[5], h[3], h[2]) end
  end
  return {1, h[2] or '', h[3] or '', left}
end
return {0, '', '', -1}
"#
    ))
});

/// Writes a (new or replacing) session hash and moves its room membership: the replaced
/// session's room loses one of the old mid's sessions, the new room gains one. Run with EVAL
/// inside connect's MULTI so registration and counts commit together.
/// KEYS[1] = session hash; ARGV = mid, server, platform, since, ttl secs, room ('' = none),
/// members prefix, members suffix. Returns {old mid or '', old room or '', left or -1, joined or -1}.
static CONNECT_SESSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{MEMBERS_LUA}{}",
        r#"
local old = redis.call('HMGET', KEYS[1], 'mid', 'room')
local room = ARGV[6]
local oldroom, left, joined = '', -1, -1
if not (old[1] == ARGV[1] and old[2] == room) then
  if old[1] and old[2] then
    oldroom = old[2]
    left = mem_dec(ARGV[7], ARGV[8], old[2], old[1])
  end
  if room ~= '' then joined = mem_inc(ARGV[7], ARGV[8], room, ARGV[1]) end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'mid', ARGV[1], 'server', ARGV[2], 'platform', ARGV[3], 'since', ARGV[4])
if room ~= '' then redis.call('HSET', KEYS[1], 'room', room) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {old[1] or '', oldroom, left, joined}
"#
    )
});

/// Moves a session between rooms (ChangeRoom), if it is still registered on the calling comet.
/// The room it leaves is the one stored in its hash (what was counted), not the caller's claim.
/// KEYS[1] = session hash; ARGV = server, new room ('' = none), members prefix, members suffix.
/// Returns {applied 0/1, mid, old room, left or -1, joined or -1}.
static ROOM_MOVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{MEMBERS_LUA}{}",
        r#"
local h = redis.call('HMGET', KEYS[1], 'server', 'mid', 'room')
if h[1] ~= ARGV[1] or not h[2] then return {0, '', '', -1, -1} end
local from = h[3] or ''
if from == ARGV[2] then return {1, h[2], from, -1, -1} end
local left, joined = -1, -1
if from ~= '' then
  left = mem_dec(ARGV[3], ARGV[4], from, h[2])
  redis.call('HDEL', KEYS[1], 'room')
end
if ARGV[2] ~= '' then
  joined = mem_inc(ARGV[3], ARGV[4], ARGV[2], h[2])
  redis.call('HSET', KEYS[1], 'room', ARGV[2])
end
return {1, h[2], from, left, joined}
"#
    ))
});

/// Renews a session, re-creating it if Redis lost it (restart), unless it moved to another comet.
///
/// A re-created hash holds only what the heartbeat knows. It gets no `room`: the session is then
/// not counted in any room's members (a Redis that lost the hash lost the member hashes too),
/// and a hash without `room` is never decremented at disconnect, so counts stay consistent.
/// Its `since` is `0`, meaning unknown: the session's real registration time is only known to
/// the comet, and a made-up one would make a later kick name a session that never existed.
/// KEYS = session hash, mid hash, node keys set; ARGV = server, key, mid, ttl secs.
static HEARTBEAT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local s = redis.call('HGET', KEYS[1], 'server')
if not s then
  redis.call('HSET', KEYS[1], 'mid', ARGV[3], 'server', ARGV[1], 'platform', '', 'since', '0')
  s = ARGV[1]
end
if s ~= ARGV[1] then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"#,
    )
});

/// `rim:mid:` — the prefix of [`keys::mid_sessions`], for the Lua scripts that derive a mid's key.
fn mid_prefix() -> String {
    let k = keys::mid_sessions(0);
    k.strip_suffix('0').unwrap_or(&k).to_string()
}

/// `rim:room:` and `:members`: the parts of [`keys::room_members`] around the room id, for the
/// Lua scripts that derive a room's member hash.
fn members_affixes() -> (String, String) {
    const MARK: &str = "\u{1}";
    let k = keys::room_members(MARK);
    match k.split_once(MARK) {
        Some((pre, suf)) => (pre.to_string(), suf.to_string()),
        None => (k, String::new()),
    }
}

/// A script's (room, count) pair: no room, or -1 (nothing counted), means no change there.
fn counted(room: String, n: i64) -> Option<(String, u64)> {
    (!room.is_empty() && n >= 0).then_some((room, n.unsigned_abs()))
}

#[async_trait]
impl SessionStore for RedisConn {
    async fn head(&self, key: &str) -> StoreResult<SessionHead> {
        let (server, mid, since): (Option<String>, Option<String>, Option<String>) = self
            .cmd(
                redis::cmd("HMGET")
                    .arg(keys::session(key))
                    .arg("server")
                    .arg("mid")
                    .arg("since"),
            )
            .await?;
        Ok(SessionHead {
            server,
            mid,
            since_ms: since.and_then(|s| s.parse().ok()).unwrap_or(0),
        })
    }

    async fn register(&self, reg: &Registration) -> StoreResult<Registered> {
        let mkey = keys::mid_sessions(reg.mid);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if let Some(old) = &reg.replaces {
            pipe.srem(keys::node_sessions(&old.server), &reg.key)
                .ignore();
            pipe.cmd("XADD")
                .arg(keys::push_stream(old.partition))
                .arg("*")
                .arg(keys::JOB_FIELD)
                .arg(old.kick.encode())
                .ignore();
        }
        pipe.hset(&mkey, &reg.key, &reg.server).ignore();
        pipe.expire(&mkey, reg.ttl_secs as i64).ignore();
        pipe.sadd(keys::node_sessions(&reg.server), &reg.key)
            .ignore();
        // The session hash and the room member counts last, in one script: it reads the
        // replaced session's room inside the transaction, so a re-auth never double counts.
        let (pre, suf) = members_affixes();
        pipe.cmd("EVAL")
            .arg(CONNECT_SESSION.as_str())
            .arg(1)
            .arg(keys::session(&reg.key))
            .arg(reg.mid)
            .arg(&reg.server)
            .arg(&reg.platform)
            .arg(reg.since_ms)
            .arg(reg.ttl_secs)
            .arg(reg.room.as_ref().map(RoomId::as_str).unwrap_or_default())
            .arg(&pre)
            .arg(&suf);
        let out: Vec<(String, String, i64, i64)> = self.pipe(&pipe).await?;
        let Some((old_mid, old_room, left, joined)) = out.into_iter().next() else {
            return Ok(Registered::default());
        };
        let new_room = reg.room.as_ref().map(|r| r.as_str().to_string());
        Ok(Registered {
            old_mid: (!old_mid.is_empty()).then_some(old_mid),
            membership: Membership {
                left: counted(old_room, left),
                joined: counted(new_room.unwrap_or_default(), joined),
            },
        })
    }

    async fn drop_session(&self, server: &str, key: &str) -> StoreResult<Option<Dropped>> {
        let skey = keys::session(key);
        let prefix = mid_prefix();
        let (pre, suf) = members_affixes();
        let (dropped, mid, room, left): (i64, String, String, i64) = self
            .script(&DROP_SESSION, &[&skey], &[server, key, &prefix, &pre, &suf])
            .await?;
        if dropped != 1 {
            return Ok(None);
        }
        Ok(Some(Dropped {
            mid: mid.parse().ok(),
            membership: Membership {
                left: counted(room, left),
                joined: None,
            },
        }))
    }

    async fn unlink(&self, mid: i64, server: &str, key: &str) -> StoreResult<()> {
        let mkey = keys::mid_sessions(mid);
        let owner: Option<String> = self.cmd(redis::cmd("HGET").arg(&mkey).arg(key)).await?;
        let mut pipe = redis::pipe();
        if owner.as_deref() == Some(server) {
            pipe.hdel(&mkey, key).ignore();
        }
        pipe.srem(keys::node_sessions(server), key).ignore();
        self.pipe(&pipe).await
    }

    async fn move_room(
        &self,
        server: &str,
        key: &str,
        to: Option<&RoomId>,
    ) -> StoreResult<Option<Moved>> {
        let skey = keys::session(key);
        let (pre, suf) = members_affixes();
        let to_s = to.map(RoomId::as_str).unwrap_or_default();
        let (applied, mid, from, left, joined): (i64, String, String, i64, i64) = self
            .script(&ROOM_MOVE, &[&skey], &[server, to_s, &pre, &suf])
            .await?;
        if applied == 0 {
            return Ok(None);
        }
        Ok(Some(Moved {
            mid: mid.parse().ok(),
            membership: Membership {
                left: counted(from.clone(), left),
                joined: counted(to_s.to_string(), joined),
            },
            from,
        }))
    }

    async fn heartbeat(
        &self,
        server: &str,
        key: &str,
        mid: i64,
        ttl_secs: u64,
    ) -> StoreResult<bool> {
        let skey = keys::session(key);
        let mkey = keys::mid_sessions(mid);
        let nkey = keys::node_sessions(server);
        let (mid, ttl) = (mid.to_string(), ttl_secs.to_string());
        let mine: i64 = self
            .script(
                &HEARTBEAT,
                &[&skey, &mkey, &nkey],
                &[server, key, &mid, &ttl],
            )
            .await?;
        Ok(mine == 1)
    }

    async fn of_mids(&self, mids: &[i64]) -> StoreResult<Vec<HashMap<String, String>>> {
        let mut pipe = redis::pipe();
        for mid in mids {
            pipe.hgetall(keys::mid_sessions(*mid));
        }
        self.pipe(&pipe).await
    }

    async fn owners(&self, keys_in: &[&str]) -> StoreResult<Vec<(Option<String>, Option<String>)>> {
        let mut pipe = redis::pipe();
        for key in keys_in {
            pipe.cmd("HMGET")
                .arg(keys::session(key))
                .arg("mid")
                .arg("server");
        }
        self.pipe(&pipe).await
    }

    async fn details(&self, keys_in: &[String]) -> StoreResult<Vec<SessionDetails>> {
        let mut pipe = redis::pipe();
        for key in keys_in {
            pipe.hgetall(keys::session(key));
        }
        let hashes: Vec<HashMap<String, String>> = self.pipe(&pipe).await?;
        Ok(hashes
            .into_iter()
            .map(|mut h| SessionDetails {
                mid: h.remove("mid"),
                server: h.remove("server"),
                platform: h.remove("platform").unwrap_or_default(),
                since_ms: h.get("since").and_then(|s| s.parse().ok()).unwrap_or(0),
                room: h.remove("room"),
            })
            .collect())
    }

    async fn pop_node_sessions(&self, server: &str, n: usize) -> StoreResult<Vec<String>> {
        self.cmd(redis::cmd("SPOP").arg(keys::node_sessions(server)).arg(n))
            .await
    }
}
