//! Turning a push into durable stream entries: resolve recipients to comets, group them by
//! partition, and append one `PushJob` per partition (all or none when there are several).
//! Shared by the HTTP API and `LogicRpc`; a push is accepted only once the append succeeded.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use rim_proto::job::{self, PushJob, Route, ServerKeys};
use rim_proto::room::RoomId;
use rim_proto::rpc::{LogicError as RpcError, PushAccepted};

use crate::App;
use crate::store::StoreError;

/// Partition → comet → keys, ordered so stream entries are written deterministically.
type Grouped = BTreeMap<u16, BTreeMap<String, Vec<String>>>;

/// A fresh message id.
pub(crate) fn new_msg_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl App {
    fn refused(&self, e: StoreError) -> RpcError {
        // A Redis outage fails every push: one line a second, every refusal counted.
        self.metrics.push_refused.inc();
        rim_runtime::warn_throttled!(error = %e, "push refused");
        RpcError::Unavailable(e.to_string())
    }

    /// Limits shared by every push path (HTTP checks them earlier with its own wording too).
    fn check_limits(&self, targets: usize, body: &Bytes, what: &str) -> Result<(), RpcError> {
        let push = &self.config.push;
        if body.len() > push.body_limit {
            return Err(RpcError::BadRequest(format!(
                "body exceeds push.body_limit of {} bytes",
                push.body_limit
            )));
        }
        if targets > push.max_targets {
            return Err(RpcError::BadRequest(format!(
                "{what}: {targets} targets exceed push.max_targets of {}",
                push.max_targets
            )));
        }
        if targets == 0 {
            return Err(RpcError::BadRequest(format!("{what}: required")));
        }
        Ok(())
    }

    /// Appends one job per `(partition, route)` atomically; `exclude` names a session key that
    /// must not receive it (the sender of a room message).
    pub(crate) async fn append_jobs(
        &self,
        msg_id: &str,
        op: i32,
        body: &Bytes,
        entries: Vec<(u16, Route)>,
        exclude: Option<&str>,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let accepted_ms = rim_runtime::unix_ms();
        let jobs: Vec<(u16, PushJob)> = entries
            .into_iter()
            .map(|(p, route)| {
                let job = PushJob {
                    msg_id: msg_id.to_string(),
                    op,
                    body: body.clone(),
                    route,
                    accepted_ms,
                    exclude: exclude.map(str::to_string),
                };
                (p, job)
            })
            .collect();
        let appended = self
            .store
            .streams
            .append(&jobs, self.config.stream.max_backlog)
            .await;
        if let Err(StoreError::Backlog { .. }) = &appended {
            self.metrics.push_backlog_full.inc();
        }
        appended
    }

    /// Queues a `Sessions` job per partition; returns the number of sessions routed.
    async fn publish_grouped(
        &self,
        msg_id: &str,
        op: i32,
        body: &Bytes,
        grouped: Grouped,
    ) -> Result<u64, StoreError> {
        let mut sessions = 0u64;
        let entries: Vec<(u16, Route)> = grouped
            .into_iter()
            .map(|(p, servers)| {
                let route = Route::Sessions(
                    servers
                        .into_iter()
                        .map(|(server, keys)| {
                            sessions += keys.len() as u64;
                            ServerKeys { server, keys }
                        })
                        .collect(),
                );
                (p, route)
            })
            .collect();
        self.append_jobs(msg_id, op, body, entries, None).await?;
        Ok(sessions)
    }

    /// Push to every online session of these users.
    pub(crate) async fn push_mids(
        &self,
        op: i32,
        mids: &[i64],
        body: Bytes,
    ) -> Result<PushAccepted, RpcError> {
        self.check_limits(mids.len(), &body, "mids")?;
        let mids: Vec<i64> = mids
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let found = self
            .store
            .sessions
            .of_mids(&mids)
            .await
            .map_err(|e| self.refused(e))?;
        let parts = self.config.stream.partitions;
        let mut grouped = Grouped::new();
        for (mid, sessions) in mids.iter().zip(found) {
            for (key, server) in sessions {
                grouped
                    .entry(job::mid_partition(*mid, parts))
                    .or_default()
                    .entry(server)
                    .or_default()
                    .push(key);
            }
        }
        // Hash order inside a mid's sessions is arbitrary; sort so jobs are reproducible.
        for servers in grouped.values_mut() {
            for keys in servers.values_mut() {
                keys.sort();
            }
        }
        let id = new_msg_id();
        let sessions = self
            .publish_grouped(&id, op, &body, grouped)
            .await
            .map_err(|e| self.refused(e))?;
        self.metrics.push_mids.inc();
        Ok(PushAccepted { id, sessions })
    }

    /// The online sessions of one user, grouped by comet (keys sorted): the `Sessions` route of
    /// a push to that user.
    pub(crate) async fn mid_route(&self, mid: i64) -> Result<Vec<ServerKeys>, StoreError> {
        let sessions = self.store.sessions.of_mid(mid).await?;
        let mut by_server: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, server) in sessions {
            by_server.entry(server).or_default().push(key);
        }
        Ok(by_server
            .into_iter()
            .map(|(server, mut keys)| {
                keys.sort();
                ServerKeys { server, keys }
            })
            .collect())
    }

    /// Push to these sessions, each partitioned by its user's mid (so it orders with pushes by mid).
    pub(crate) async fn push_keys(
        &self,
        op: i32,
        keys_in: &[String],
        body: Bytes,
    ) -> Result<PushAccepted, RpcError> {
        self.check_limits(keys_in.len(), &body, "keys")?;
        if let Some(bad) = keys_in.iter().find(|k| k.is_empty()) {
            return Err(RpcError::BadRequest(format!("keys: {bad:?} is empty")));
        }
        let uniq: Vec<&str> = keys_in
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let found = self
            .store
            .sessions
            .owners(&uniq)
            .await
            .map_err(|e| self.refused(e))?;
        let parts = self.config.stream.partitions;
        let mut grouped = Grouped::new();
        for (key, (mid, server)) in uniq.into_iter().zip(found) {
            let (Some(mid), Some(server)) = (mid.and_then(|m| m.parse::<i64>().ok()), server)
            else {
                continue; // offline: not routed
            };
            grouped
                .entry(job::mid_partition(mid, parts))
                .or_default()
                .entry(server)
                .or_default()
                .push(key.to_string());
        }
        let id = new_msg_id();
        let sessions = self
            .publish_grouped(&id, op, &body, grouped)
            .await
            .map_err(|e| self.refused(e))?;
        self.metrics.push_keys.inc();
        Ok(PushAccepted { id, sessions })
    }

    /// Push to a room.
    pub(crate) async fn push_room(
        &self,
        op: i32,
        room: RoomId,
        body: Bytes,
    ) -> Result<PushAccepted, RpcError> {
        self.check_limits(1, &body, "room")?;
        let p = job::room_partition(&room, self.config.stream.partitions);
        let id = new_msg_id();
        self.append_jobs(&id, op, &body, vec![(p, Route::Room(room))], None)
            .await
            .map_err(|e| self.refused(e))?;
        self.metrics.push_room.inc();
        Ok(PushAccepted { id, sessions: 0 })
    }

    /// Push to everyone.
    pub(crate) async fn push_all(
        &self,
        op: i32,
        speed: u32,
        body: Bytes,
    ) -> Result<PushAccepted, RpcError> {
        self.check_limits(1, &body, "all")?;
        let p = job::all_partition(self.config.stream.partitions);
        let id = new_msg_id();
        self.append_jobs(&id, op, &body, vec![(p, Route::All { speed })], None)
            .await
            .map_err(|e| self.refused(e))?;
        self.metrics.push_all.inc();
        Ok(PushAccepted { id, sessions: 0 })
    }

    /// The kick of `key` on `server` (it re-authenticated elsewhere), appended to the user's
    /// partition together with the new registration. `since_ms` is the replaced session's
    /// registration time, which identifies it to the comet.
    pub(crate) fn kick_job(&self, server: &str, key: &str, since_ms: u64) -> PushJob {
        PushJob {
            msg_id: new_msg_id(),
            op: rim_proto::op::DISCONNECT_REPLY,
            body: Bytes::from(rim_proto::msg::DisconnectBody::to_json(
                "replaced by a newer session",
            )),
            route: Route::Kick {
                server: server.to_string(),
                key: key.to_string(),
                since_ms,
            },
            accepted_ms: rim_runtime::unix_ms(),
            exclude: None,
        }
    }
}
