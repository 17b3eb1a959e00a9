//! Turning a push into durable stream entries: resolve recipients to comets, group them by
//! partition, and append one `PushJob` per partition (all or none when there are several),
//! recorded in the room's or each user's history when those are kept. Shared by the HTTP API
//! and `LogicRpc`; a push is accepted only once the append succeeded.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use rim_proto::job::{self, PushJob, Route, ServerKeys};
use rim_proto::room::RoomId;
use rim_proto::rpc::{LogicError as RpcError, PushAccepted};

use crate::App;
use crate::store::{Append, Record, StoreError};

/// Partition → comet → keys, ordered so stream entries are written deterministically, and the
/// histories of the partition's recipients that record the push.
type Grouped = BTreeMap<u16, (BTreeMap<String, Vec<String>>, Vec<Record>)>;

/// One stream entry of a push: its partition, route, and the histories that record it.
pub(crate) struct Target {
    pub(crate) partition: u16,
    pub(crate) route: Route,
    pub(crate) history: Vec<Record>,
}

impl Target {
    /// An entry recorded nowhere.
    pub(crate) fn unrecorded(partition: u16, route: Route) -> Self {
        Target {
            partition,
            route,
            history: Vec::new(),
        }
    }
}

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

    /// Appends one job per target atomically; `exclude` names a session key that must not
    /// receive it (the sender of a room message). Returns whether a history recorded it.
    pub(crate) async fn append_jobs(
        &self,
        msg_id: &str,
        op: i32,
        body: &Bytes,
        targets: Vec<Target>,
        exclude: Option<&str>,
    ) -> Result<bool, StoreError> {
        if targets.is_empty() {
            return Ok(false);
        }
        let accepted_ms = rim_runtime::unix_ms();
        let entries: Vec<Append> = targets
            .into_iter()
            .map(|t| Append {
                partition: t.partition,
                job: PushJob {
                    msg_id: msg_id.to_string(),
                    op,
                    body: body.clone(),
                    route: t.route,
                    accepted_ms,
                    exclude: exclude.map(str::to_string),
                    recorded: !t.history.is_empty(),
                },
                history: t.history,
            })
            .collect();
        let stored = entries.iter().any(|e| !e.history.is_empty());
        let appended = self
            .store
            .streams
            .append(&entries, self.config.stream.max_backlog)
            .await;
        if let Err(StoreError::Backlog { .. }) = &appended {
            self.metrics.push_backlog_full.inc();
        }
        appended?;
        if stored {
            self.metrics.history_recorded.inc();
        }
        Ok(stored)
    }

    /// Queues a `Sessions` job per partition; returns the number of sessions routed and
    /// whether a history recorded the push.
    async fn publish_grouped(
        &self,
        msg_id: &str,
        op: i32,
        body: &Bytes,
        grouped: Grouped,
    ) -> Result<(u64, bool), StoreError> {
        let mut sessions = 0u64;
        let targets: Vec<Target> = grouped
            .into_iter()
            .map(|(partition, (servers, history))| {
                let route = Route::Sessions(
                    servers
                        .into_iter()
                        .map(|(server, keys)| {
                            sessions += keys.len() as u64;
                            ServerKeys { server, keys }
                        })
                        .collect(),
                );
                Target {
                    partition,
                    route,
                    history,
                }
            })
            .collect();
        let stored = self.append_jobs(msg_id, op, body, targets, None).await?;
        Ok((sessions, stored))
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
            // A recorded user gets an entry in its partition even with no session online: the
            // entry's id is the message's id in the user's history.
            let record = self.user_record(*mid, sessions.iter());
            if sessions.is_empty() && record.is_none() {
                continue;
            }
            let (servers, history) = grouped.entry(job::mid_partition(*mid, parts)).or_default();
            history.extend(record);
            for (key, server) in sessions {
                servers.entry(server).or_default().push(key);
            }
        }
        // Hash order inside a mid's sessions is arbitrary; sort so jobs are reproducible.
        for (servers, _) in grouped.values_mut() {
            for keys in servers.values_mut() {
                keys.sort();
            }
        }
        let id = new_msg_id();
        let (sessions, stored) = self
            .publish_grouped(&id, op, &body, grouped)
            .await
            .map_err(|e| self.refused(e))?;
        self.metrics.push_mids.inc();
        Ok(PushAccepted {
            id,
            sessions,
            stored,
        })
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
                .0
                .entry(server)
                .or_default()
                .push(key.to_string());
        }
        let id = new_msg_id();
        let (sessions, stored) = self
            .publish_grouped(&id, op, &body, grouped)
            .await
            .map_err(|e| self.refused(e))?;
        self.metrics.push_keys.inc();
        Ok(PushAccepted {
            id,
            sessions,
            stored,
        })
    }

    /// Push to a room.
    pub(crate) async fn push_room(
        &self,
        op: i32,
        room: RoomId,
        body: Bytes,
    ) -> Result<PushAccepted, RpcError> {
        self.check_limits(1, &body, "room")?;
        let id = new_msg_id();
        let stored = self
            .append_jobs(&id, op, &body, vec![self.room_target(room)], None)
            .await
            .map_err(|e| self.refused(e))?;
        self.metrics.push_room.inc();
        Ok(PushAccepted {
            id,
            sessions: 0,
            stored,
        })
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
        let target = Target::unrecorded(p, Route::All { speed });
        self.append_jobs(&id, op, &body, vec![target], None)
            .await
            .map_err(|e| self.refused(e))?;
        self.metrics.push_all.inc();
        Ok(PushAccepted {
            id,
            sessions: 0,
            stored: false,
        })
    }

    /// The entry of a push to `room`, recorded in its history when its type keeps one.
    pub(crate) fn room_target(&self, room: RoomId) -> Target {
        let partition = job::room_partition(&room, self.config.stream.partitions);
        Target {
            partition,
            history: self.room_record(&room).into_iter().collect(),
            route: Route::Room(room),
        }
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
            recorded: false,
        }
    }
}
