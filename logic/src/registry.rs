//! The session and node registry in Redis (logic is its only writer): sessions registered at
//! connect and dropped at disconnect, comets renewed with their room counts, expired or departed
//! comets removed with everything they held. Also the cached cluster view the online API and
//! `renew_node` read.
//!
//! Room member counts (`rim:room:{room}:members`) change only inside the scripts that write the
//! session hash's `room` field (connect, room change, drop), so the two always agree and a count
//! is exactly the number of that user's registered sessions in the room.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use rim_proto::keys;
use rim_proto::room::RoomId;
use rim_proto::rpc::{
    ConnectReply, ConnectRequest, LogicError as RpcError, NodeInfo, OnlineCounts, OnlineReport,
    SessionRef,
};

use crate::App;
use crate::auth;
use crate::store::StoreError;

/// How long the cluster view may be reused (avoids O(nodes) reads per renewal and online query).
const VIEW_TTL: Duration = Duration::from_secs(1);
/// Keys removed per round trip when dropping a dead comet's sessions.
const REAP_BATCH: usize = 512;

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

/// `rim:mid:` — the prefix of [`keys::mid_sessions`], for the Lua scripts that derive a mid's key.
fn mid_prefix() -> String {
    let k = keys::mid_sessions(0);
    k.strip_suffix('0').unwrap_or(&k).to_string()
}

/// `rim:room:` and `:members`: the parts of [`keys::room_members`] around the room id, for the
/// Lua scripts that derive a room's member hash.
pub(crate) fn members_affixes() -> (String, String) {
    const MARK: &str = "\u{1}";
    let k = keys::room_members(MARK);
    match k.split_once(MARK) {
        Some((pre, suf)) => (pre.to_string(), suf.to_string()),
        None => (k, String::new()),
    }
}

/// A membership change reported by a script: the user left `left.0` (now `left.1` sessions
/// there) and/or joined `joined.0` (now `joined.1`).
#[derive(Debug, Default)]
pub(crate) struct MemberChange {
    /// The user.
    pub mid: i64,
    /// Room left and that user's sessions remaining in it.
    pub left: Option<(String, i64)>,
    /// Room joined and that user's sessions now in it.
    pub joined: Option<(String, i64)>,
}

impl MemberChange {
    fn new(mid: i64, left: (String, i64), joined: (String, i64)) -> MemberChange {
        let keep = |(room, n): (String, i64)| (!room.is_empty() && n >= 0).then_some((room, n));
        MemberChange {
            mid,
            left: keep(left),
            joined: keep(joined),
        }
    }
}

fn unavailable(e: StoreError) -> RpcError {
    RpcError::Unavailable(e.to_string())
}

/// One live comet and its last reported room counts.
#[derive(Debug, Clone)]
pub struct LiveNode {
    /// As the comet reported it (with `renewed_ms` stamped by logic).
    pub info: NodeInfo,
    /// Registration expiry (unix ms).
    pub expiry_ms: u64,
    /// Room → members on that comet.
    pub rooms: HashMap<String, u64>,
}

/// Every live comet, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Live comets, in server id order.
    pub nodes: Vec<LiveNode>,
}

impl ClusterView {
    /// Members of `room` across all comets except `skip`.
    pub fn room_count(&self, room: &str, skip: Option<&str>) -> u64 {
        self.nodes
            .iter()
            .filter(|n| Some(n.info.server.as_str()) != skip)
            .filter_map(|n| n.rooms.get(room))
            .sum()
    }

    /// Members per room across all comets.
    pub fn rooms(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for n in &self.nodes {
            for (r, c) in &n.rooms {
                *out.entry(r.clone()).or_insert(0) += c;
            }
        }
        out
    }
}

/// Cache slot for the cluster view.
#[derive(Default)]
pub struct ViewCache(parking_lot::Mutex<Option<(Instant, Arc<ClusterView>)>>);

impl App {
    fn session_ttl(&self) -> u64 {
        self.config.session.ttl_secs()
    }

    /// Authenticates and registers a session.
    pub(crate) async fn connect(&self, req: ConnectRequest) -> Result<ConnectReply, RpcError> {
        let r = self.connect_inner(req).await;
        match &r {
            Ok(_) => self.metrics.connects.inc(),
            Err(_) => self.metrics.connects_refused.inc(),
        }
        r
    }

    async fn connect_inner(&self, req: ConnectRequest) -> Result<ConnectReply, RpcError> {
        let a = &req.auth;
        if req.server.is_empty() {
            return Err(RpcError::BadRequest("server: required".into()));
        }
        // Trust mode accepts any mid (goim does); with a secret the token binds the mid.
        if !self.config.auth.secret.is_empty() {
            auth::verify_token(&self.config.auth.secret, a.mid, &a.token)
                .map_err(|e| RpcError::Unauthorized(e.to_string()))?;
        }
        let room = if a.room_id.is_empty() {
            None
        } else {
            Some(
                RoomId::parse(&a.room_id)
                    .map_err(|e| RpcError::BadRequest(format!("room_id: {e}")))?,
            )
        };
        if a.key.len() > 128 || a.key.chars().any(|c| c.is_control()) {
            return Err(RpcError::BadRequest(
                "key: must be at most 128 characters without control characters".into(),
            ));
        }
        let key = if a.key.is_empty() {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            a.key.clone()
        };
        let skey = keys::session(&key);
        let (old_server, old_mid, old_since): (Option<String>, Option<String>, Option<String>) =
            self.store
                .cmd(
                    redis::cmd("HMGET")
                        .arg(&skey)
                        .arg("server")
                        .arg("mid")
                        .arg("since"),
                )
                .await
                .map_err(unavailable)?;
        // A key registered to another user is not up for grabs: keys are listed by
        // /rim/users/{mid}/sessions, and taking one over would kick its owner and route the
        // owner's pushes by key to the taker. A free (lapsed or disconnected) key may be reused.
        if let Some(om) = old_mid.as_deref()
            && om.parse::<i64>().ok() != Some(a.mid)
        {
            return Err(RpcError::Unauthorized("key belongs to another user".into()));
        }
        let ttl = self.session_ttl() as i64;
        let mkey = keys::mid_sessions(a.mid);
        let since = rim_runtime::unix_ms();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut replaced_elsewhere = false;
        if let Some(old) = old_server.as_deref()
            && old != req.server
        {
            replaced_elsewhere = true;
            pipe.srem(keys::node_sessions(old), &key).ignore();
            // The kick names the replaced session by its `since`, so a late kick cannot close a
            // session that reconnected to that comet afterwards. 0 = unknown (a hash re-created
            // by a heartbeat after Redis lost it).
            let old_since = old_since.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            self.kick_cmd(&mut pipe, a.mid, old, &key, old_since);
            pipe.ignore();
        }
        pipe.hset(&mkey, &key, &req.server).ignore();
        pipe.expire(&mkey, ttl).ignore();
        pipe.sadd(keys::node_sessions(&req.server), &key).ignore();
        // The session hash and the room member counts last, in one script: it reads the
        // replaced session's room inside the transaction, so a re-auth never double counts.
        let (pre, suf) = members_affixes();
        pipe.cmd("EVAL")
            .arg(CONNECT_SESSION.as_str())
            .arg(1)
            .arg(&skey)
            .arg(a.mid)
            .arg(&req.server)
            .arg(&a.platform)
            .arg(since)
            .arg(ttl)
            .arg(room.as_ref().map(RoomId::as_str).unwrap_or_default())
            .arg(&pre)
            .arg(&suf);
        let out: Vec<(String, String, i64, i64)> =
            self.store.pipe(&pipe).await.map_err(unavailable)?;
        if replaced_elsewhere {
            self.metrics.kicks.inc();
        }
        if let Some((old_mid, old_room, left, joined)) = out.into_iter().next() {
            let new_room = room.as_ref().map(|r| r.as_str().to_string());
            match old_mid.parse::<i64>() {
                // The replaced session belonged to someone else (only if another user took the
                // key between the check above and the transaction): two users' presence changed.
                Ok(om) if om != a.mid => {
                    self.presence(MemberChange::new(om, (old_room, left), (String::new(), -1)))
                        .await;
                    self.presence(MemberChange::new(
                        a.mid,
                        (String::new(), -1),
                        (new_room.unwrap_or_default(), joined),
                    ))
                    .await;
                }
                _ => {
                    self.presence(MemberChange::new(
                        a.mid,
                        (old_room, left),
                        (new_room.unwrap_or_default(), joined),
                    ))
                    .await;
                }
            }
        }
        tracing::debug!(mid = a.mid, %key, server = %req.server, ip = %req.remote_ip, "session registered");
        Ok(ConnectReply {
            mid: a.mid,
            key,
            room,
            accepts: a.accepts.clone(),
            heartbeat_secs: self.config.session.heartbeat_secs,
            replaced_elsewhere,
            since_ms: since,
        })
    }

    /// Removes a session if it is still registered on the calling comet.
    pub(crate) async fn disconnect(&self, s: SessionRef) -> Result<(), RpcError> {
        self.drop_session(&s.server, &s.key)
            .await
            .map_err(unavailable)?;
        // The session hash may already have expired; still clean the mid hash and node set.
        let mkey = keys::mid_sessions(s.mid);
        let owner: Option<String> = self
            .store
            .cmd(redis::cmd("HGET").arg(&mkey).arg(&s.key))
            .await
            .map_err(unavailable)?;
        let mut pipe = redis::pipe();
        if owner.as_deref() == Some(s.server.as_str()) {
            pipe.hdel(&mkey, &s.key).ignore();
        }
        pipe.srem(keys::node_sessions(&s.server), &s.key).ignore();
        let _: () = self.store.pipe(&pipe).await.map_err(unavailable)?;
        self.metrics.disconnects.inc();
        Ok(())
    }

    /// Runs [`DROP_SESSION`] for `key` on `server` and publishes the presence change it caused.
    /// Returns whether the session was dropped.
    async fn drop_session(&self, server: &str, key: &str) -> Result<bool, StoreError> {
        let skey = keys::session(key);
        let prefix = mid_prefix();
        let (pre, suf) = members_affixes();
        let (dropped, mid, room, left): (i64, String, String, i64) = self
            .store
            .script(&DROP_SESSION, &[&skey], &[server, key, &prefix, &pre, &suf])
            .await?;
        if let Ok(mid) = mid.parse::<i64>() {
            self.presence(MemberChange::new(mid, (room, left), (String::new(), -1)))
                .await;
        }
        Ok(dropped == 1)
    }

    /// A session moved between rooms: moves its membership from the room stored in its hash to
    /// `to` (ignored unless the session is registered on the calling comet).
    pub(crate) async fn room_changed(
        &self,
        s: SessionRef,
        from: Option<RoomId>,
        to: Option<RoomId>,
    ) -> Result<(), RpcError> {
        let skey = keys::session(&s.key);
        let (pre, suf) = members_affixes();
        let to_s = to.as_ref().map(RoomId::as_str).unwrap_or_default();
        let (applied, mid, old, left, joined): (i64, String, String, i64, i64) = self
            .store
            .script(&ROOM_MOVE, &[&skey], &[&s.server, to_s, &pre, &suf])
            .await
            .map_err(unavailable)?;
        if applied == 0 {
            tracing::debug!(key = %s.key, server = %s.server, "room change for a session not registered there: ignored");
            return Ok(());
        }
        let claimed = from.as_ref().map(RoomId::as_str).unwrap_or_default();
        if claimed != old {
            // The stored room is what was counted, so it wins; a mismatch means a lost or
            // reordered notice from the comet.
            tracing::debug!(key = %s.key, stored = %old, claimed, "room change: stored room differs from the comet's");
        }
        if let Ok(mid) = mid.parse::<i64>() {
            self.presence(MemberChange::new(
                mid,
                (old, left),
                (to_s.to_string(), joined),
            ))
            .await;
        }
        Ok(())
    }

    /// Renews a session's TTL (re-creating it when Redis lost it).
    pub(crate) async fn heartbeat(&self, s: SessionRef) -> Result<(), RpcError> {
        let skey = keys::session(&s.key);
        let mkey = keys::mid_sessions(s.mid);
        let nkey = keys::node_sessions(&s.server);
        let (mid, ttl) = (s.mid.to_string(), self.session_ttl().to_string());
        let _: i64 = self
            .store
            .script(
                &HEARTBEAT,
                &[&skey, &mkey, &nkey],
                &[&s.server, &s.key, &mid, &ttl],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// A comet has members in `room` from now on.
    ///
    /// The room is also recorded under the node (count 0 until the next renewal reports it), in
    /// the same transaction: removal from the room index only ever looks at the node's room hash
    /// (the next renewal SREMs rooms missing from its report, the reaper SREMs every room in
    /// it), so a room joined and left within one renewal period would otherwise stay indexed.
    pub(crate) async fn room_joined(&self, server: String, room: RoomId) -> Result<(), RpcError> {
        let rooms_key = keys::node_rooms(&server);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.sadd(keys::room_nodes(room.as_str()), &server).ignore();
        pipe.hset_nx(&rooms_key, room.as_str(), 0).ignore();
        // Same lifetime as a renewal gives the hash (see renew_node).
        pipe.cmd("PEXPIRE")
            .arg(&rooms_key)
            .arg(self.config.node.ttl_ms.saturating_mul(4))
            .ignore();
        let _: () = self.store.pipe(&pipe).await.map_err(unavailable)?;
        Ok(())
    }

    /// Registers or renews a comet with its room counts; answers cluster-wide counts.
    pub(crate) async fn renew_node(
        &self,
        mut node: NodeInfo,
        online: OnlineReport,
    ) -> Result<OnlineCounts, RpcError> {
        if node.server.is_empty() {
            return Err(RpcError::BadRequest("server: required".into()));
        }
        let now = rim_runtime::unix_ms();
        node.renewed_ms = now;
        let json = serde_json::to_string(&node).map_err(|e| RpcError::Internal(e.to_string()))?;
        let server = node.server.clone();
        // A comet restarted under the same server id before its registration lapsed: the
        // previous incarnation's sessions and room entries are dead but would never be reaped
        // (the id stays live). Purge them as the reaper would. The comet renews once before it
        // serves any client, so none of the new incarnation's sessions exist yet.
        let stored: Option<String> = self
            .store
            .cmd(redis::cmd("HGET").arg(keys::NODES).arg(&server))
            .await
            .map_err(unavailable)?;
        let previous = stored.and_then(|j| serde_json::from_str::<NodeInfo>(&j).ok());
        if let Some(prev) = previous
            && prev.started_ms != node.started_ms
        {
            let sessions = self.purge_node(&server).await.map_err(unavailable)?;
            tracing::info!(%server, previous_start = prev.started_ms, start = node.started_ms, sessions, "comet restarted: purged its previous incarnation");
        }
        let rooms_key = keys::node_rooms(&server);
        let old: Vec<String> = self
            .store
            .cmd(redis::cmd("HKEYS").arg(&rooms_key))
            .await
            .map_err(unavailable)?;
        let mut reported: BTreeMap<String, u64> = BTreeMap::new();
        for (room, count) in &online.rooms {
            if *count > 0 {
                *reported.entry(room.as_str().to_string()).or_insert(0) += u64::from(*count);
            }
        }
        let ttl_ms = self.config.node.ttl_ms;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.hset(keys::NODES, &server, &json).ignore();
        pipe.zadd(keys::NODES_EXPIRY, &server, now + ttl_ms)
            .ignore();
        pipe.del(&rooms_key).ignore();
        if !reported.is_empty() {
            let fields: Vec<(&str, u64)> = reported.iter().map(|(r, c)| (r.as_str(), *c)).collect();
            pipe.hset_multiple(&rooms_key, &fields).ignore();
            // Outlive the registration: the reaper (every ttl/3 after expiry) reads this hash to
            // remove the node from each room's index. The TTL only guards against a leak if no
            // logic ever reaps; online counts already ignore expired nodes.
            pipe.cmd("PEXPIRE")
                .arg(&rooms_key)
                .arg(ttl_ms.saturating_mul(4))
                .ignore();
        }
        for room in old.iter().filter(|r| !reported.contains_key(*r)) {
            pipe.srem(keys::room_nodes(room), &server).ignore();
        }
        for room in reported.keys() {
            pipe.sadd(keys::room_nodes(room), &server).ignore();
        }
        let _: () = self.store.pipe(&pipe).await.map_err(unavailable)?;
        let view = self.cluster_view().await.map_err(unavailable)?;
        // Patch this comet's fresh figures into the cached view so this instance's online
        // answers reflect the renewal at once, without re-reading every node.
        self.patch_view(LiveNode {
            info: node,
            expiry_ms: now + ttl_ms,
            rooms: reported.into_iter().collect(),
        });
        // Other comets from the (possibly cached) view, this comet from what it just reported.
        let rooms = online
            .rooms
            .iter()
            .map(|(room, count)| {
                let others = view.room_count(room.as_str(), Some(&server));
                (room.clone(), others + u64::from(*count))
            })
            .collect();
        Ok(OnlineCounts { rooms })
    }

    /// Removes a comet now (graceful shutdown).
    pub(crate) async fn unregister_node(&self, server: String) -> Result<(), RpcError> {
        let mut pipe = redis::pipe();
        pipe.zrem(keys::NODES_EXPIRY, &server).ignore();
        pipe.hdel(keys::NODES, &server).ignore();
        let _: () = self.store.pipe(&pipe).await.map_err(unavailable)?;
        self.purge_node(&server).await.map_err(unavailable)?;
        self.invalidate_view();
        Ok(())
    }

    /// Drops a departed comet's room index entries and sessions. Idempotent: keys are popped from
    /// the comet's set, and each session is dropped only if it still points at that comet.
    pub(crate) async fn purge_node(&self, server: &str) -> Result<u64, StoreError> {
        let rooms_key = keys::node_rooms(server);
        let rooms: Vec<String> = self.store.cmd(redis::cmd("HKEYS").arg(&rooms_key)).await?;
        let mut pipe = redis::pipe();
        for room in &rooms {
            pipe.srem(keys::room_nodes(room), server).ignore();
        }
        pipe.del(&rooms_key).ignore();
        let _: () = self.store.pipe(&pipe).await?;

        let nkey = keys::node_sessions(server);
        let mut dropped = 0u64;
        loop {
            let batch: Vec<String> = self
                .store
                .cmd(redis::cmd("SPOP").arg(&nkey).arg(REAP_BATCH))
                .await?;
            if batch.is_empty() {
                break;
            }
            // One script call per key: sequential, but only the reaper and unregister pay it.
            for key in &batch {
                if self.drop_session(server, key).await? {
                    dropped += 1;
                }
            }
        }
        Ok(dropped)
    }

    /// Removes every comet whose registration expired. Returns how many this instance removed.
    pub(crate) async fn reap(&self) -> Result<u64, StoreError> {
        let now = rim_runtime::unix_ms();
        let expired: Vec<String> = self
            .store
            .cmd(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(keys::NODES_EXPIRY)
                    .arg("-inf")
                    .arg(now),
            )
            .await?;
        let mut reaped = 0;
        let now_s = now.to_string();
        for server in expired {
            let claimed: i64 = self
                .store
                .script(
                    &CLAIM_EXPIRED,
                    &[keys::NODES_EXPIRY, keys::NODES],
                    &[&server, &now_s],
                )
                .await?;
            if claimed == 1 {
                let sessions = self.purge_node(&server).await?;
                tracing::info!(%server, sessions, "reaped expired comet");
                self.metrics.nodes_reaped.inc();
                reaped += 1;
            }
        }
        if reaped > 0 {
            self.invalidate_view();
        }
        Ok(reaped)
    }

    fn patch_view(&self, fresh: LiveNode) {
        let mut slot = self.view.0.lock();
        if let Some((at, view)) = slot.as_ref() {
            let mut nodes: Vec<LiveNode> = view
                .nodes
                .iter()
                .filter(|n| n.info.server != fresh.info.server)
                .cloned()
                .collect();
            nodes.push(fresh);
            nodes.sort_by(|a, b| a.info.server.cmp(&b.info.server));
            *slot = Some((*at, Arc::new(ClusterView { nodes })));
        }
    }

    fn invalidate_view(&self) {
        *self.view.0.lock() = None;
    }

    /// The live comets and their room counts, cached for [`VIEW_TTL`].
    pub(crate) async fn cluster_view(&self) -> Result<Arc<ClusterView>, StoreError> {
        if let Some((at, view)) = self.view.0.lock().as_ref()
            && at.elapsed() < VIEW_TTL
        {
            return Ok(view.clone());
        }
        let view = Arc::new(self.read_cluster_view().await?);
        *self.view.0.lock() = Some((Instant::now(), view.clone()));
        Ok(view)
    }

    async fn read_cluster_view(&self) -> Result<ClusterView, StoreError> {
        let now = rim_runtime::unix_ms();
        let live: Vec<(String, u64)> = self
            .store
            .cmd(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(keys::NODES_EXPIRY)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .arg("WITHSCORES"),
            )
            .await?;
        if live.is_empty() {
            return Ok(ClusterView::default());
        }
        let mut pipe = redis::pipe();
        for (server, _) in &live {
            pipe.hget(keys::NODES, server);
            pipe.hgetall(keys::node_rooms(server));
        }
        let values: Vec<redis::Value> = self.store.pipe(&pipe).await?;
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
        Ok(ClusterView { nodes })
    }
}
