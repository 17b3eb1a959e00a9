//! The session and node registry (logic is its only writer): sessions registered at connect and
//! dropped at disconnect, comets renewed with their room counts, expired or departed comets
//! removed with everything they held. Also the cached cluster view the online API and
//! `renew_node` read. What is stored where, and atomically with what, is the stores' business
//! ([`crate::store::SessionStore`], [`crate::store::NodeStore`]); this file holds the rules.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rim_proto::history::HistoryId;
use rim_proto::job;
use rim_proto::room::RoomId;
use rim_proto::rpc::{
    ConnectReply, ConnectRequest, LogicError as RpcError, NodeInfo, OnlineCounts, OnlineReport,
    SessionRef, TokenGrant,
};
use tokio::time::Instant;

use crate::App;
use crate::auth::TokenError;
use crate::config::AuthMode;
use crate::room_policy::Action;
use crate::store::{Given, Membership, Moved, Registration, Replaced, RoomChange, StoreError};

pub use crate::store::LiveNode;

/// How long the cluster view may be reused (avoids O(nodes) reads per renewal and online query).
const VIEW_TTL: Duration = Duration::from_secs(1);
/// Keys removed per round trip when dropping a dead comet's sessions.
const REAP_BATCH: usize = 512;

fn unavailable(e: StoreError) -> RpcError {
    RpcError::Unavailable(e.to_string())
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
        let (mid, room) = (req.auth.mid, req.auth.room_id.clone());
        let r = self.connect_inner(req).await;
        match &r {
            Ok(_) => self.metrics.connects.inc(),
            Err(e) => {
                self.metrics.connects_refused.inc();
                self.refusals
                    .record("auth", e.to_string(), format!("mid {mid} room {room:?}"));
            }
        }
        r
    }

    async fn connect_inner(&self, req: ConnectRequest) -> Result<ConnectReply, RpcError> {
        let a = &req.auth;
        if req.server.is_empty() {
            return Err(RpcError::BadRequest("server: required".into()));
        }
        // Trust mode accepts any mid (goim does); in token mode the token binds the mid.
        let grant = if self.config.auth.mode == AuthMode::Token {
            self.tokens
                .verify(a.mid, &a.token)
                .map_err(|e| RpcError::Unauthorized(e.to_string()))?
        } else {
            TokenGrant::default()
        };
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
            // Marked as generated: such sessions share their user's keyless device (offline).
            format!(
                "{}{}",
                crate::history::KEYLESS_PREFIX,
                uuid::Uuid::new_v4().simple()
            )
        } else {
            a.key.clone()
        };
        let old = self.store.sessions.head(&key).await.map_err(unavailable)?;
        self.check_sessions_per_mid(a.mid, &key).await?;
        // A key registered to another user is not up for grabs: keys are listed by
        // /rim/users/{mid}/sessions, and taking one over would kick its owner and route the
        // owner's pushes by key to the taker. A free (lapsed or disconnected) key may be reused.
        if let Some(om) = old.mid.as_deref()
            && om.parse::<i64>().ok() != Some(a.mid)
        {
            return Err(RpcError::Unauthorized("key belongs to another user".into()));
        }
        // The room joined at connect answers to the same permissions as a ChangeRoom into it;
        // one outside the token's own `rooms` is an auth failure, as it always was.
        // `room_id` first, then the extra `rooms` (a repeat is the same room, joined once).
        let mut rooms: Vec<RoomId> = room.iter().cloned().collect();
        // Blanks around an id are ignored and blank entries skipped, as the comet counts them.
        for (i, r) in a.rooms.iter().enumerate() {
            let r = r.trim();
            if r.is_empty() {
                continue;
            }
            let r =
                RoomId::parse(r).map_err(|e| RpcError::BadRequest(format!("rooms[{i}]: {e}")))?;
            if !rooms.contains(&r) {
                rooms.push(r);
            }
        }
        for r in &rooms {
            if !grant.allows_room(r.as_str()) {
                return Err(RpcError::Unauthorized(TokenError::Room.to_string()));
            }
            self.check_room(Action::Join, a.mid, &key, r, &grant)
                .await?;
        }
        let since = rim_runtime::unix_ms();
        // The kick names the replaced session by its `since`, so a late kick cannot close a
        // session that reconnected to that comet afterwards (0 = unknown: a hash re-created by a
        // heartbeat after Redis lost it).
        let replaces = old
            .server
            .filter(|old_server| *old_server != req.server)
            .map(|old_server| Replaced {
                partition: job::mid_partition(a.mid, self.config.stream.partitions),
                kick: self.kick_job(&old_server, &key, old.since_ms),
                server: old_server,
            });
        let replaced_elsewhere = replaces.is_some();
        // Present before indexed: a push routed to this session counts as given to its device.
        self.device_present(a.mid, &key, &req.server)
            .await
            .map_err(unavailable)?;
        let reg = Registration {
            key: key.clone(),
            mid: a.mid,
            server: req.server.clone(),
            platform: a.platform.clone(),
            since_ms: since,
            ttl_secs: self.session_ttl(),
            rooms: rooms.clone(),
            replaces,
        };
        let registered = match self.store.sessions.register(&reg).await {
            Ok(r) => r,
            Err(e) => {
                // No session, no disconnect to come: what was routed to it waits (best effort).
                let _ = self
                    .device_gone(a.mid, &key, &req.server, Given::Nothing)
                    .await;
                return Err(unavailable(e));
            }
        };
        if replaced_elsewhere {
            self.metrics.kicks.inc();
        }
        let Membership { left, joined } = registered.membership;
        match registered.old_mid.and_then(|m| m.parse::<i64>().ok()) {
            // The replaced session belonged to someone else (only if another user took the key
            // between the check above and the transaction): two users' presence changed.
            Some(om) if om != a.mid => {
                let gone = Membership {
                    left,
                    joined: Vec::new(),
                };
                self.presence(om, gone).await;
                let came = Membership {
                    left: Vec::new(),
                    joined,
                };
                self.presence(a.mid, came).await;
            }
            _ => self.presence(a.mid, Membership { left, joined }).await,
        }
        tracing::debug!(mid = a.mid, %key, server = %req.server, ip = %req.remote_ip, "session registered");
        // Read after registering: a message recorded from here on is also routed to this
        // session, so the comet's catch-up and the live pushes overlap instead of leaving a gap
        // (the comet drops the overlap by id).
        let offline_after = self
            .offline_after(a.mid, crate::history::device(&key))
            .await
            .map_err(unavailable)?;
        if offline_after.is_some() {
            self.metrics.offline_waiting.inc();
        }
        Ok(ConnectReply {
            mid: a.mid,
            key,
            room,
            accepts: a.accepts.clone(),
            heartbeat_secs: self.config.session.heartbeat_secs,
            replaced_elsewhere,
            since_ms: since,
            grant,
            guarded_room_types: self.guarded_room_types.clone(),
            rooms,
            offline_after,
            partitions: self.config.stream.partitions,
        })
    }

    /// Removes a session if it is still registered on the calling comet, and records how far
    /// its device got in its user's history (`seen`; none: nothing since it connected). The
    /// device's position first (a push appended from then on is owed to it), then the session.
    pub(crate) async fn disconnect(
        &self,
        s: SessionRef,
        seen: Option<HistoryId>,
    ) -> Result<(), RpcError> {
        let given = seen.map_or(Given::Nothing, Given::UpTo);
        self.device_gone(s.mid, &s.key, &s.server, given)
            .await
            .map_err(unavailable)?;
        self.drop_session(&s.server, &s.key)
            .await
            .map_err(unavailable)?;
        // The session hash may already have expired; still clean the mid index and node set.
        self.store
            .sessions
            .unlink(s.mid, &s.server, &s.key)
            .await
            .map_err(unavailable)?;
        self.metrics.disconnects.inc();
        Ok(())
    }

    /// Drops `key` if `server` holds it and publishes the presence change it caused. Returns
    /// the owner (when readable) of a session dropped, `None` when none was.
    async fn drop_session(
        &self,
        server: &str,
        key: &str,
    ) -> Result<Option<Option<i64>>, StoreError> {
        let Some(dropped) = self.store.sessions.drop_session(server, key).await? else {
            return Ok(None);
        };
        if let Some(mid) = dropped.mid {
            self.presence(mid, dropped.membership).await;
        }
        Ok(Some(dropped.mid))
    }

    /// A session moved between rooms: moves its membership from the room stored for it to `to`
    /// (ignored unless the session is registered on the calling comet).
    pub(crate) async fn room_changed(
        &self,
        s: SessionRef,
        from: Option<RoomId>,
        to: Option<RoomId>,
    ) -> Result<(), RpcError> {
        let to: Vec<RoomId> = to.into_iter().collect();
        let Some(moved) = self.change_rooms(&s, RoomChange::Set(&to)).await? else {
            return Ok(());
        };
        // The comet names the session's first room only.
        let claimed = from.as_ref().map(RoomId::as_str);
        if claimed != moved.from.first().map(String::as_str) {
            // The stored rooms are what was counted, so they win; a mismatch means a lost or
            // reordered notice from the comet.
            tracing::debug!(key = %s.key, stored = ?moved.from, ?claimed, "room change: stored rooms differ from the comet's");
        }
        Ok(())
    }

    /// A session joined `room` besides its other rooms (JoinRoom); ignored unless the session is
    /// registered on the calling comet.
    pub(crate) async fn join_room(&self, s: SessionRef, room: RoomId) -> Result<(), RpcError> {
        self.change_rooms(&s, RoomChange::Join(&room)).await?;
        Ok(())
    }

    /// A session left `room` (LeaveRoom) and stays in its other rooms.
    pub(crate) async fn leave_room(&self, s: SessionRef, room: RoomId) -> Result<(), RpcError> {
        self.change_rooms(&s, RoomChange::Leave(&room)).await?;
        Ok(())
    }

    /// Applies `change` to the rooms of session `s` and publishes the presence change it
    /// caused; `None` (ignored) unless the session is registered on the calling comet.
    async fn change_rooms(
        &self,
        s: &SessionRef,
        change: RoomChange<'_>,
    ) -> Result<Option<Moved>, RpcError> {
        let moved = self
            .store
            .sessions
            .change_rooms(&s.server, &s.key, change)
            .await
            .map_err(unavailable)?;
        let Some(moved) = moved else {
            tracing::debug!(key = %s.key, server = %s.server, ?change, "room change for a session not registered there: ignored");
            return Ok(None);
        };
        let mut moved = moved;
        if let Some(mid) = moved.mid {
            self.presence(mid, std::mem::take(&mut moved.membership))
                .await;
        }
        Ok(Some(moved))
    }

    /// Refuses a new session past `session.max_per_mid` for `mid` (a key the mid already holds
    /// is a re-authentication, not a new session). Read, then registered: connects racing each
    /// other can pass together, so the bound may be exceeded by that many.
    async fn check_sessions_per_mid(&self, mid: i64, key: &str) -> Result<(), RpcError> {
        let max = self.config.session.max_per_mid;
        if max == 0 {
            return Ok(());
        }
        let sessions = self.store.sessions.of_mid(mid).await.map_err(unavailable)?;
        let others: Vec<&str> = sessions
            .keys()
            .map(String::as_str)
            .filter(|k| *k != key)
            .collect();
        if others.len() < max as usize {
            return Ok(());
        }
        // The user's index can hold sessions whose disconnect was lost: only sessions still
        // registered (their hash alive, for this mid) count, or the cap would lock users out.
        let me = mid.to_string();
        let others = self
            .store
            .sessions
            .owners(&others)
            .await
            .map_err(unavailable)?
            .into_iter()
            .filter(|(m, _)| m.as_deref() == Some(me.as_str()))
            .count();
        if others >= max as usize {
            self.metrics.sessions_per_mid_refused.inc();
            return Err(RpcError::Forbidden(format!(
                "too many sessions for this user (session.max_per_mid is {max})"
            )));
        }
        Ok(())
    }

    /// Checks a fresh token (op 22) for a live session: the same checks as at connect, for the
    /// session's mid.
    pub(crate) fn refresh_token(
        &self,
        s: &SessionRef,
        token: &str,
    ) -> Result<TokenGrant, RpcError> {
        let r = if self.config.auth.mode == AuthMode::Token {
            self.tokens
                .verify(s.mid, token)
                .map_err(|e| RpcError::Unauthorized(e.to_string()))
        } else {
            // Trust mode: nothing expires, nothing to refresh.
            Ok(TokenGrant::default())
        };
        match &r {
            Ok(_) => self.metrics.token_refreshes.inc(),
            Err(_) => self.metrics.token_refreshes_refused.inc(),
        }
        r
    }

    /// Renews a session's TTL (re-creating it when Redis lost it).
    pub(crate) async fn heartbeat(&self, s: SessionRef) -> Result<(), RpcError> {
        self.store
            .sessions
            .heartbeat(&s.server, &s.key, s.mid, self.session_ttl())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// How long a comet's room record outlives its registration: the reaper (every ttl/3 after
    /// expiry) reads it to remove the comet from each room's index. The TTL only guards against
    /// a leak if no logic ever reaps; online counts already ignore expired comets.
    fn rooms_ttl_ms(&self) -> u64 {
        self.config.node.ttl_ms.saturating_mul(4)
    }

    /// A comet has members in `room` from now on (recorded under the comet too: see
    /// [`crate::store::NodeStore`] on why).
    pub(crate) async fn room_joined(&self, server: String, room: RoomId) -> Result<(), RpcError> {
        self.store
            .nodes
            .room_joined(&server, &room, self.rooms_ttl_ms())
            .await
            .map_err(unavailable)
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
        let server = node.server.clone();
        // A comet restarted under the same server id before its registration lapsed: the
        // previous incarnation's sessions and room entries are dead but would never be reaped
        // (the id stays live). Purge them as the reaper would. The comet renews once before it
        // serves any client, so none of the new incarnation's sessions exist yet.
        let previous = self
            .store
            .nodes
            .stored(&server)
            .await
            .map_err(unavailable)?;
        if let Some(prev) = previous
            && prev.started_ms != node.started_ms
        {
            let sessions = self.purge_node(&server).await.map_err(unavailable)?;
            tracing::info!(%server, previous_start = prev.started_ms, start = node.started_ms, sessions, "comet restarted: purged its previous incarnation");
        }
        let mut reported: BTreeMap<String, u64> = BTreeMap::new();
        for (room, count) in &online.rooms {
            if *count > 0 {
                *reported.entry(room.as_str().to_string()).or_insert(0) += u64::from(*count);
            }
        }
        let expiry_ms = now + self.config.node.ttl_ms;
        self.store
            .nodes
            .renew(&node, expiry_ms, &reported, self.rooms_ttl_ms())
            .await
            .map_err(unavailable)?;
        let view = self.cluster_view().await.map_err(unavailable)?;
        // Patch this comet's fresh figures into the cached view so this instance's online
        // answers reflect the renewal at once, without re-reading every node.
        self.patch_view(LiveNode {
            info: node,
            expiry_ms,
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
        self.store
            .nodes
            .remove(&server)
            .await
            .map_err(unavailable)?;
        self.purge_node(&server).await.map_err(unavailable)?;
        self.invalidate_view();
        Ok(())
    }

    /// Drops a departed comet's room index entries and sessions. Idempotent: keys are taken out
    /// of the comet's set, and each session is dropped only if it still points at that comet.
    pub(crate) async fn purge_node(&self, server: &str) -> Result<u64, StoreError> {
        self.store.nodes.drop_rooms(server).await?;
        let mut dropped = 0u64;
        loop {
            let batch = self
                .store
                .sessions
                .pop_node_sessions(server, REAP_BATCH)
                .await?;
            if batch.is_empty() {
                break;
            }
            // One call per key: sequential, but only the reaper and unregister pay it.
            for key in &batch {
                let Some(mid) = self.drop_session(server, key).await? else {
                    continue;
                };
                dropped += 1;
                // Nothing reported: positions stay (see crate::history), the presence goes (or,
                // failing, expires with them: the index no longer routes to it either way).
                if let Some(mid) = mid
                    && let Err(e) = self.device_gone(mid, key, server, Given::Unknown).await
                {
                    tracing::warn!(%server, %key, error = %e, "purge: presence not removed");
                }
            }
        }
        Ok(dropped)
    }

    /// Removes the comets in `expired` (from [`crate::store::NodeStore::expired`] at `now`)
    /// whose registration is still expired. Returns how many this instance removed.
    pub(crate) async fn reap(&self, expired: Vec<String>, now: u64) -> Result<u64, StoreError> {
        let mut reaped = 0;
        for server in expired {
            if self.store.nodes.claim_expired(&server, now).await? {
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
        let nodes = self.store.nodes.live(rim_runtime::unix_ms()).await?;
        Ok(ClusterView { nodes })
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
