//! [`SessionStore`] on Redis: session hashes (`rim:key:{key}`), users' session indexes
//! (`rim:mid:{mid}`, key → comet), comets' session sets (`rim:node:{server}:keys`) and room
//! member counts (`rim:room:{room}:members`, mid → sessions, with the counted sessions in
//! `rim:room:{room}:keys`).
//!
//! Each of these lives in its own hash slot (see `rim_proto::keys`), so an operation is a few
//! single-slot steps rather than one transaction, each atomic and idempotent on its own: the
//! session hash first (it decides), then the user's index, the comet's set and the room counts.
//! A step retried after a lost reply changes nothing twice. What a crash between steps can leave
//! is written on [`SessionStore`].

use std::collections::HashMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use rim_proto::keys;

use super::{
    Dropped, Membership, Moved, RedisConn, Registered, Registration, RoomChange, RoomCount,
    SessionDetails, SessionHead, SessionStore, StoreResult, join_rooms, room_diff, split_rooms,
};

/// Counts one session into a room, once: the session key is recorded in the room's
/// `rim:room:{room}:keys` (key → mid) and its user's count in `rim:room:{room}:members` (mid →
/// sessions) goes up only when the key was not recorded yet, so a retried join counts once.
/// KEYS = members, room sessions; ARGV = key, mid. Returns {1 if counted now, the user's count}.
static ROOM_JOIN: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  return {1, redis.call('HINCRBY', KEYS[1], ARGV[2], 1)}
end
return {0, tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')}
"#,
    )
});

/// Counts one session out of a room, once (see [`ROOM_JOIN`]); a user whose count reaches 0 is
/// no longer listed. KEYS = members, room sessions; ARGV = key. Returns {mid or '', the user's
/// count left, or -1 when the key was not counted there}.
static ROOM_LEAVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local mid = redis.call('HGET', KEYS[2], ARGV[1])
if not mid then return {'', -1} end
redis.call('HDEL', KEYS[2], ARGV[1])
local n = redis.call('HINCRBY', KEYS[1], mid, -1)
if n <= 0 then redis.call('HDEL', KEYS[1], mid); n = 0 end
return {mid, n}
"#,
    )
});

/// Drops one session if it still belongs to `server` (a reconnect elsewhere must survive).
/// KEYS[1] = session hash; ARGV = server. Returns {dropped 0/1, mid, rooms}.
///
/// A session's rooms are the hash's `rooms` field, space-separated (`join_rooms`); hashes
/// written before sessions could be in several rooms hold one `room` instead, read the same way.
static DROP_SESSION: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local h = redis.call('HMGET', KEYS[1], 'server', 'mid', 'rooms', 'room')
if h[1] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return {1, h[2] or '', h[3] or h[4] or ''}
end
return {0, '', ''}
"#,
    )
});

/// Writes a (new or replacing) session hash. KEYS[1] = session hash; ARGV = mid, server,
/// platform, since, ttl secs, rooms ('' = none). Returns {old mid or '', old rooms or ''}.
static CONNECT_SESSION: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local old = redis.call('HMGET', KEYS[1], 'mid', 'rooms', 'room')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'mid', ARGV[1], 'server', ARGV[2], 'platform', ARGV[3], 'since', ARGV[4])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'rooms', ARGV[6]) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {old[1] or '', old[2] or old[3] or ''}
"#,
    )
});

/// Changes a session's rooms, if it is still registered on the calling comet, as
/// the memory store's twin does: `set` replaces them, `join` appends one not there yet, `leave`
/// removes one. What it leaves is decided by the stored rooms (what was counted), not by the
/// caller's view. KEYS[1] = session hash; ARGV = server, `set`|`join`|`leave`, rooms
/// (space-separated for `set`, one otherwise). Returns {applied 0/1, mid, rooms before, after}.
static ROOMS_CHANGE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local h = redis.call('HMGET', KEYS[1], 'server', 'mid', 'rooms', 'room')
if h[1] ~= ARGV[1] or not h[2] then return {0, '', '', ''} end
local stored = h[3] or h[4] or ''
local list = {}
local function has(r)
  for _, x in ipairs(list) do if x == r then return true end end
  return false
end
if ARGV[2] == 'set' then
  for r in string.gmatch(ARGV[3], '%S+') do
    if not has(r) then table.insert(list, r) end
  end
else
  for r in string.gmatch(stored, '%S+') do
    if not (ARGV[2] == 'leave' and r == ARGV[3]) then table.insert(list, r) end
  end
  if ARGV[2] == 'join' and not has(ARGV[3]) then table.insert(list, ARGV[3]) end
end
local after = table.concat(list, ' ')
redis.call('HDEL', KEYS[1], 'room')
if after == '' then redis.call('HDEL', KEYS[1], 'rooms')
else redis.call('HSET', KEYS[1], 'rooms', after) end
return {1, h[2], stored, after}
"#,
    )
});

/// Renews a session, re-creating it if Redis lost it (restart), unless it moved to another comet.
///
/// A re-created hash holds only what the heartbeat knows. It gets no `rooms`: the session is then
/// not counted in any room's members (a Redis that lost the hash lost the member hashes too),
/// and a hash without `rooms` is never counted out at disconnect, so counts stay consistent.
/// Its `since` is `0`, meaning unknown: the session's real registration time is only known to
/// the comet, and a made-up one would make a later kick name a session that never existed.
/// KEYS[1] = session hash; ARGV = server, mid, ttl secs. Returns 1 when the session is `server`'s.
static HEARTBEAT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local s = redis.call('HGET', KEYS[1], 'server')
if not s then
  redis.call('HSET', KEYS[1], 'mid', ARGV[2], 'server', ARGV[1], 'platform', '', 'since', '0')
  s = ARGV[1]
end
if s ~= ARGV[1] then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"#,
    )
});

/// Removes a session key from a user's index if it still points at `server`.
/// KEYS[1] = the user's index; ARGV = key, server.
static UNINDEX: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"#,
    )
});

/// A (room, count) pair: no room, or -1 (nothing counted), means no change there.
fn counted(room: String, n: i64) -> Option<(String, u64)> {
    (!room.is_empty() && n >= 0).then_some((room, n.unsigned_abs()))
}

impl RedisConn {
    /// Counts `key` (of `mid`) into `room`; `Some` count only when it was counted now.
    async fn join(&self, room: &str, key: &str, mid: i64) -> StoreResult<Option<RoomCount>> {
        let (now, n): (i64, i64) = self
            .script(
                &ROOM_JOIN,
                &[&keys::room_members(room), &keys::room_sessions(room)],
                &[key, &mid.to_string()],
            )
            .await?;
        Ok((now == 1).then(|| (room.to_string(), n.unsigned_abs())))
    }

    /// Counts `key` out of `room`; the mid it was counted for and that user's count left.
    async fn leave(&self, room: &str, key: &str) -> StoreResult<(String, Option<RoomCount>)> {
        if room.is_empty() {
            return Ok((String::new(), None));
        }
        let (mid, n): (String, i64) = self
            .script(
                &ROOM_LEAVE,
                &[&keys::room_members(room), &keys::room_sessions(room)],
                &[key],
            )
            .await?;
        Ok((mid, counted(room.to_string(), n)))
    }

    /// Counts `key` (of `mid`) into each of `rooms`, concurrently (each room is its own slot);
    /// the rooms where it was counted now.
    async fn join_all(&self, rooms: &[String], key: &str, mid: i64) -> StoreResult<Vec<RoomCount>> {
        let joins = rooms.iter().map(|r| self.join(r, key, mid));
        Ok(futures::future::try_join_all(joins)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Counts `key` out of each of `rooms`; the rooms where it was counted until now.
    async fn leave_all(&self, rooms: &[String], key: &str) -> StoreResult<Vec<RoomCount>> {
        let leaves = rooms.iter().map(|r| self.leave(r, key));
        Ok(futures::future::try_join_all(leaves)
            .await?
            .into_iter()
            .filter_map(|(_, left)| left)
            .collect())
    }

    /// Points `mid`'s index at `server` for `key` and puts `key` in `server`'s set.
    async fn index(&self, mid: i64, key: &str, server: &str, ttl_secs: u64) -> StoreResult<()> {
        let mkey = keys::mid_sessions(mid);
        // One slot, one round trip; no MULTI needed: the entry without its renewed TTL (a
        // failure in between) only lives until the old TTL.
        let mut pipe = redis::pipe();
        pipe.hset(&mkey, key, server)
            .ignore()
            .expire(&mkey, ttl_secs as i64)
            .ignore();
        let add = redis::cmd("SADD")
            .arg(keys::node_sessions(server))
            .arg(key)
            .to_owned();
        let node = self.cmd::<()>(&add);
        let user = self.pipe::<()>(&pipe);
        futures::try_join!(user, node)?;
        Ok(())
    }
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
        // The kick first: once the hash names this comet, nothing would point at the old copy.
        // A kick appended twice (a retried call) closes nothing twice: it names one incarnation.
        if let Some(old) = &reg.replaces {
            let kick = redis::cmd("XADD")
                .arg(keys::push_stream(old.partition))
                .arg("*")
                .arg(keys::JOB_FIELD)
                .arg(old.kick.encode())
                .to_owned();
            let unset = redis::cmd("SREM")
                .arg(keys::node_sessions(&old.server))
                .arg(&reg.key)
                .to_owned();
            let _: Vec<redis::Value> = self.each(vec![kick, unset]).await?;
        }
        let rooms: Vec<String> = reg.rooms.iter().map(|r| r.to_string()).collect();
        let joined_rooms = join_rooms(&rooms);
        let (mid, since, ttl) = (
            reg.mid.to_string(),
            reg.since_ms.to_string(),
            reg.ttl_secs.to_string(),
        );
        let (old_mid, old_rooms): (String, String) = self
            .script(
                &CONNECT_SESSION,
                &[&keys::session(&reg.key)],
                &[
                    &mid,
                    &reg.server,
                    &reg.platform,
                    &since,
                    &ttl,
                    &joined_rooms,
                ],
            )
            .await?;
        let index = self.index(reg.mid, &reg.key, &reg.server, reg.ttl_secs);
        // The replaced session is counted out of its rooms, except those the same user stays in.
        let old_rooms = split_rooms(&old_rooms);
        let gone: Vec<String> = old_rooms
            .into_iter()
            .filter(|r| old_mid != mid || !rooms.contains(r))
            .collect();
        // Out before in: a room both left (by another user's copy of the key) and joined must
        // see the key counted out before it can be counted in again.
        let counts = async {
            let left = self.leave_all(&gone, &reg.key).await?;
            let joined = self.join_all(&rooms, &reg.key, reg.mid).await?;
            Ok::<_, super::StoreError>((left, joined))
        };
        let ((), (left, joined)) = futures::try_join!(index, counts)?;
        Ok(Registered {
            old_mid: (!old_mid.is_empty()).then_some(old_mid),
            membership: Membership { left, joined },
        })
    }

    async fn drop_session(&self, server: &str, key: &str) -> StoreResult<Option<Dropped>> {
        let (dropped, mid, rooms): (i64, String, String) = self
            .script(&DROP_SESSION, &[&keys::session(key)], &[server])
            .await?;
        if dropped != 1 {
            return Ok(None);
        }
        let mid: Option<i64> = mid.parse().ok();
        let unindex = async {
            match mid {
                Some(m) => {
                    self.script::<i64>(&UNINDEX, &[&keys::mid_sessions(m)], &[key, server])
                        .await?;
                    Ok(())
                }
                None => Ok(()),
            }
        };
        let rooms = split_rooms(&rooms);
        let ((), left) = futures::try_join!(unindex, self.leave_all(&rooms, key))?;
        Ok(Some(Dropped {
            mid,
            membership: Membership {
                left,
                joined: Vec::new(),
            },
        }))
    }

    async fn unlink(&self, mid: i64, server: &str, key: &str) -> StoreResult<()> {
        let mkey = keys::mid_sessions(mid);
        let (k, a) = ([mkey.as_str()], [key, server]);
        let unindex = self.script::<i64>(&UNINDEX, &k, &a);
        let srem = redis::cmd("SREM")
            .arg(keys::node_sessions(server))
            .arg(key)
            .to_owned();
        let unset = self.cmd::<()>(&srem);
        futures::try_join!(unindex, unset)?;
        Ok(())
    }

    async fn change_rooms(
        &self,
        server: &str,
        key: &str,
        change: RoomChange<'_>,
    ) -> StoreResult<Option<Moved>> {
        let (mode, arg) = match change {
            RoomChange::Set(rooms) => (
                "set",
                join_rooms(&rooms.iter().map(|r| r.to_string()).collect::<Vec<_>>()),
            ),
            RoomChange::Join(room) => ("join", room.to_string()),
            RoomChange::Leave(room) => ("leave", room.to_string()),
        };
        let (applied, mid, before, after): (i64, String, String, String) = self
            .script(&ROOMS_CHANGE, &[&keys::session(key)], &[server, mode, &arg])
            .await?;
        if applied == 0 {
            return Ok(None);
        }
        let mid_n: Option<i64> = mid.parse().ok();
        let (from, to) = (split_rooms(&before), split_rooms(&after));
        let (gone, mut new) = room_diff(&from, &to);
        if mid_n.is_none() {
            // An unreadable owner cannot be counted anywhere.
            new.clear();
        }
        let joined = self.join_all(&new, key, mid_n.unwrap_or_default());
        let (left, joined) = futures::try_join!(self.leave_all(&gone, key), joined)?;
        Ok(Some(Moved {
            mid: mid_n,
            from,
            to,
            membership: Membership { left, joined },
        }))
    }

    async fn heartbeat(
        &self,
        server: &str,
        key: &str,
        mid: i64,
        ttl_secs: u64,
    ) -> StoreResult<bool> {
        let mine: i64 = self
            .script(
                &HEARTBEAT,
                &[&keys::session(key)],
                &[server, &mid.to_string(), &ttl_secs.to_string()],
            )
            .await?;
        if mine != 1 {
            return Ok(false);
        }
        self.index(mid, key, server, ttl_secs).await?;
        Ok(true)
    }

    async fn of_mids(&self, mids: &[i64]) -> StoreResult<Vec<HashMap<String, String>>> {
        let cmds: Vec<redis::Cmd> = mids
            .iter()
            .map(|mid| {
                redis::cmd("HGETALL")
                    .arg(keys::mid_sessions(*mid))
                    .to_owned()
            })
            .collect();
        self.each(cmds).await
    }

    async fn owners(&self, keys_in: &[&str]) -> StoreResult<Vec<(Option<String>, Option<String>)>> {
        let cmds: Vec<redis::Cmd> = keys_in
            .iter()
            .map(|key| {
                redis::cmd("HMGET")
                    .arg(keys::session(key))
                    .arg("mid")
                    .arg("server")
                    .to_owned()
            })
            .collect();
        self.each(cmds).await
    }

    async fn details(&self, keys_in: &[String]) -> StoreResult<Vec<SessionDetails>> {
        let cmds: Vec<redis::Cmd> = keys_in
            .iter()
            .map(|key| redis::cmd("HGETALL").arg(keys::session(key)).to_owned())
            .collect();
        let hashes: Vec<HashMap<String, String>> = self.each(cmds).await?;
        Ok(hashes
            .into_iter()
            .map(|mut h| SessionDetails {
                mid: h.remove("mid"),
                server: h.remove("server"),
                platform: h.remove("platform").unwrap_or_default(),
                since_ms: h.get("since").and_then(|s| s.parse().ok()).unwrap_or(0),
                rooms: split_rooms(
                    &h.remove("rooms")
                        .or_else(|| h.remove("room"))
                        .unwrap_or_default(),
                ),
            })
            .collect())
    }

    async fn pop_node_sessions(&self, server: &str, n: usize) -> StoreResult<Vec<String>> {
        self.cmd(redis::cmd("SPOP").arg(keys::node_sessions(server)).arg(n))
            .await
    }
}
