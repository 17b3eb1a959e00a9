//! Every call this comet makes to logic, in one place (goim's `internal/comet/operation.go`):
//! the [`Logic`] trait the rest of the comet talks to, its implementation over the tarpc link
//! ([`LogicClient`]), and the background session notices (heartbeat, disconnect) with their retry
//! rule.
//!
//! Sessions, rooms and renewals hold an `Arc<dyn Logic>`, so their rules can be unit tested
//! against an in-memory logic under a paused clock, without sockets or tarpc.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rim_proto::history::{HistoryId, HistoryPage, HistoryWant};
use rim_proto::room::RoomId;
use rim_proto::rpc::{
    ConnectReply, ConnectRequest, LogicError, LogicRpcClient, NodeInfo, OnlineCounts, OnlineReport,
    PushAccepted, SendMsgRequest, SessionRef, TokenGrant,
};
use rim_runtime::cluster::Cluster;
use rim_runtime::rpc::{Link, LinkError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// Why a call to logic gave no answer to use. Displays as the inner error, so log lines read as
/// they did when callers matched tarpc's nested results themselves.
#[derive(Debug, thiserror::Error)]
pub enum LogicCallError {
    /// logic answered and refused the request: final, retrying would get the same answer.
    #[error(transparent)]
    Refused(#[from] LogicError),
    /// logic could not be reached or did not answer within `logic.rpc_timeout_ms`.
    #[error(transparent)]
    Unreachable(#[from] LinkError),
}

/// The calls comet makes to logic (a subset of `LogicRpc`: the push calls are for backends).
#[async_trait]
pub trait Logic: Send + Sync {
    /// Authenticates a client's Auth and registers its session.
    async fn connect(&self, req: ConnectRequest) -> Result<ConnectReply, LogicCallError>;
    /// Unregisters a session that ended; `seen`: how far it got in its user's history.
    async fn disconnect(
        &self,
        session: SessionRef,
        seen: Option<HistoryId>,
    ) -> Result<(), LogicCallError>;
    /// Reads histories for a session catching up.
    async fn history(
        &self,
        session: SessionRef,
        wants: Vec<HistoryWant>,
    ) -> Result<Vec<HistoryPage>, LogicCallError>;
    /// Renews a live session's registration.
    async fn heartbeat(&self, session: SessionRef) -> Result<(), LogicCallError>;
    /// Announces that `server` has members in `room` (its first member here joined).
    async fn room_joined(&self, server: String, room: RoomId) -> Result<(), LogicCallError>;
    /// Reports a session's ChangeRoom, for member listings and presence events.
    async fn room_changed(
        &self,
        session: SessionRef,
        from: Option<RoomId>,
        to: Option<RoomId>,
    ) -> Result<(), LogicCallError>;
    /// Reports a session's JoinRoom (it is in `room` besides its other rooms).
    async fn join_room(&self, session: SessionRef, room: RoomId) -> Result<(), LogicCallError>;
    /// Reports a session's LeaveRoom.
    async fn leave_room(&self, session: SessionRef, room: RoomId) -> Result<(), LogicCallError>;
    /// Renews this node's registration with its room counts; answers cluster-wide counts.
    async fn renew_node(
        &self,
        node: NodeInfo,
        online: OnlineReport,
    ) -> Result<OnlineCounts, LogicCallError>;
    /// Removes this node's registration (graceful shutdown).
    async fn unregister_node(&self, server: String) -> Result<(), LogicCallError>;
    /// Publishes a client's upstream message (op 4).
    async fn send_msg(&self, req: SendMsgRequest) -> Result<PushAccepted, LogicCallError>;
    /// Asks whether a session holding `grant` may join `room` (a room of a guarded type).
    async fn check_join(
        &self,
        session: SessionRef,
        room: RoomId,
        grant: TokenGrant,
    ) -> Result<(), LogicCallError>;
    /// Checks a fresh token (op 22) for a live session; answers what it grants.
    async fn refresh_token(
        &self,
        session: SessionRef,
        token: String,
    ) -> Result<TokenGrant, LogicCallError>;
}

/// [`Logic`] over tarpc: one reconnecting link to logic's addresses, each call bounded by
/// `logic.rpc_timeout_ms`.
pub struct LogicClient {
    link: Link<LogicRpcClient>,
    timeout: Duration,
}

impl LogicClient {
    /// A link to `cfg.logic.addrs`, connected on first use after proving `cluster`'s secret.
    pub fn new(cfg: &Config, cluster: Cluster) -> Self {
        let link = Link::new(
            "logic",
            cfg.logic.addrs.clone(),
            Duration::from_millis(cfg.logic.connect_timeout_ms),
            cluster.clone(),
            move |stream| {
                LogicRpcClient::new(tarpc::client::Config::default(), cluster.transport(stream))
                    .spawn()
            },
        );
        LogicClient {
            link,
            timeout: cfg.rpc_timeout(),
        }
    }

    /// Runs one call; its deadline starts once the link is connected.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, LogicCallError>
    where
        F: FnOnce(LogicRpcClient, tarpc::context::Context) -> Fut,
        Fut: Future<Output = Result<Result<T, LogicError>, tarpc::client::RpcError>>,
    {
        let timeout = self.timeout;
        Ok(self
            .link
            .call(|c| f(c, rim_runtime::rpc::context(timeout)))
            .await??)
    }
}

#[async_trait]
impl Logic for LogicClient {
    async fn connect(&self, req: ConnectRequest) -> Result<ConnectReply, LogicCallError> {
        self.call(|c, cx| async move { c.connect(cx, req).await })
            .await
    }

    async fn disconnect(
        &self,
        session: SessionRef,
        seen: Option<HistoryId>,
    ) -> Result<(), LogicCallError> {
        self.call(|c, cx| async move { c.disconnect(cx, session, seen).await })
            .await
    }

    async fn history(
        &self,
        session: SessionRef,
        wants: Vec<HistoryWant>,
    ) -> Result<Vec<HistoryPage>, LogicCallError> {
        self.call(|c, cx| async move { c.history(cx, session, wants).await })
            .await
    }

    async fn heartbeat(&self, session: SessionRef) -> Result<(), LogicCallError> {
        self.call(|c, cx| async move { c.heartbeat(cx, session).await })
            .await
    }

    async fn room_joined(&self, server: String, room: RoomId) -> Result<(), LogicCallError> {
        self.call(|c, cx| async move { c.room_joined(cx, server, room).await })
            .await
    }

    async fn room_changed(
        &self,
        session: SessionRef,
        from: Option<RoomId>,
        to: Option<RoomId>,
    ) -> Result<(), LogicCallError> {
        self.call(|c, cx| async move { c.room_changed(cx, session, from, to).await })
            .await
    }

    async fn join_room(&self, session: SessionRef, room: RoomId) -> Result<(), LogicCallError> {
        self.call(|c, cx| async move { c.join_room(cx, session, room).await })
            .await
    }

    async fn leave_room(&self, session: SessionRef, room: RoomId) -> Result<(), LogicCallError> {
        self.call(|c, cx| async move { c.leave_room(cx, session, room).await })
            .await
    }

    async fn renew_node(
        &self,
        node: NodeInfo,
        online: OnlineReport,
    ) -> Result<OnlineCounts, LogicCallError> {
        self.call(|c, cx| async move { c.renew_node(cx, node, online).await })
            .await
    }

    async fn unregister_node(&self, server: String) -> Result<(), LogicCallError> {
        self.call(|c, cx| async move { c.unregister_node(cx, server).await })
            .await
    }

    async fn send_msg(&self, req: SendMsgRequest) -> Result<PushAccepted, LogicCallError> {
        self.call(|c, cx| async move { c.send_msg(cx, req).await })
            .await
    }

    async fn check_join(
        &self,
        session: SessionRef,
        room: RoomId,
        grant: TokenGrant,
    ) -> Result<(), LogicCallError> {
        self.call(|c, cx| async move { c.check_join(cx, session, room, grant).await })
            .await
    }

    async fn refresh_token(
        &self,
        session: SessionRef,
        token: String,
    ) -> Result<TokenGrant, LogicCallError> {
        self.call(|c, cx| async move { c.refresh_token(cx, session, token).await })
            .await
    }
}

/// A session notice sent to logic without holding up the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    /// Renews the registration (client activity).
    Heartbeat,
    /// Unregisters the session (it ended): how far it got in its user's history.
    Disconnect {
        /// See [`Logic::disconnect`].
        seen: Option<HistoryId>,
    },
}

impl Notice {
    /// The call's name in logs.
    fn what(self) -> &'static str {
        match self {
            Notice::Heartbeat => "session heartbeat",
            Notice::Disconnect { .. } => "disconnect",
        }
    }

    /// Tries before giving up. A heartbeat is tried once: the next client activity renews again.
    /// A disconnect lost to a logic blip would leave the session registered until its TTL, so it
    /// is retried.
    fn attempts(self) -> u32 {
        match self {
            Notice::Heartbeat => 1,
            Notice::Disconnect { .. } => 3,
        }
    }
}

/// Sends `notice` for `session` in a task on `tracker`. A transport failure is retried with
/// growing pauses (200 ms, then 4× each time); a refusal is final; failures are logged. When
/// `shutdown` fires, a pending retry goes at once rather than outliving the grace.
pub(crate) fn notify(
    logic: &Arc<dyn Logic>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    notice: Notice,
    session: SessionRef,
) {
    let logic = logic.clone();
    let shutdown = shutdown.clone();
    tracker.spawn(async move {
        let what = notice.what();
        let attempts = notice.attempts();
        let key = session.key.clone();
        let mut pause = Duration::from_millis(200);
        for attempt in 1..=attempts {
            let res = match notice {
                Notice::Heartbeat => logic.heartbeat(session.clone()).await,
                Notice::Disconnect { seen } => logic.disconnect(session.clone(), seen).await,
            };
            match res {
                Ok(()) => return,
                Err(LogicCallError::Refused(e)) => {
                    tracing::warn!(%key, error = %e, "{what} refused");
                    return;
                }
                Err(LogicCallError::Unreachable(e)) if attempt == attempts => {
                    tracing::warn!(%key, error = %e, attempts, "{what} failed; giving up");
                }
                Err(LogicCallError::Unreachable(e)) => {
                    tracing::debug!(%key, error = %e, attempt, "{what} failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    pause *= 4;
                }
            }
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::MemLogic;

    fn sref(key: &str) -> SessionRef {
        SessionRef {
            server: "comet-test".into(),
            mid: 7,
            key: key.into(),
        }
    }

    /// A disconnect lost to a logic blip is retried after 200 ms, then 800 ms; a heartbeat is
    /// tried once. Timed on the paused clock.
    #[tokio::test(start_paused = true)]
    async fn a_disconnect_lost_to_a_logic_blip_is_retried() {
        let mem = MemLogic::new(30);
        mem.fail("disconnect", 2);
        mem.fail("heartbeat", 1);
        let logic: Arc<dyn Logic> = mem.clone();
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let t0 = tokio::time::Instant::now();
        notify(
            &logic,
            &tracker,
            &shutdown,
            Notice::Disconnect { seen: None },
            sref("d"),
        );
        notify(&logic, &tracker, &shutdown, Notice::Heartbeat, sref("h"));
        tracker.close();
        tracker.wait().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(200 + 800));
        assert_eq!(mem.calls_of("disconnect d").len(), 3);
        assert_eq!(mem.calls_of("heartbeat h").len(), 1);
    }

    /// Shutdown cuts a retry's pause short: the last try goes at once.
    #[tokio::test(start_paused = true)]
    async fn a_retry_does_not_outlive_the_drain() {
        let mem = MemLogic::new(30);
        mem.fail("disconnect", 3);
        let logic: Arc<dyn Logic> = mem.clone();
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        shutdown.cancel();
        let t0 = tokio::time::Instant::now();
        notify(
            &logic,
            &tracker,
            &shutdown,
            Notice::Disconnect { seen: None },
            sref("d"),
        );
        tracker.close();
        tracker.wait().await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(mem.calls_of("disconnect d").len(), 3);
    }
}
