//! Wiring of one comet: shared state ([`Ctx`]), the listeners' tasks, the renew task, the
//! `CometRpc` server, and the shutdown drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use rim_proto::room::RoomId;
use rim_proto::rpc::{CometRpc, LogicError as LogicRpcError, LogicRpcClient, NodeInfo, SessionRef};
use rim_runtime::ops::OpsSource;
use rim_runtime::rpc::Link;
use tarpc::server::Channel;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bucket::Buckets;
use crate::config::Config;
use crate::deliver::CometServer;
use crate::deliver::PacedJob;
use crate::metrics::Metrics;
use crate::room::{Presence, Rooms};
use crate::session::Session;
use crate::{Listeners, RunError};

/// State shared by every task of one comet.
pub(crate) struct Ctx {
    pub cfg: Config,
    pub logic: Arc<Link<LogicRpcClient>>,
    pub buckets: Buckets,
    pub rooms: Rooms,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub conns: AtomicUsize,
    pub next_id: AtomicU64,
    /// Set after the first successful renewal: job can find this node.
    pub registered: AtomicBool,
    /// Whether the last renewal reached logic.
    pub logic_ok: AtomicBool,
    /// Addresses and placement data sent with each renewal.
    pub node: NodeInfo,
    /// Queue of the paced broadcast worker (see `deliver`).
    pub paced: mpsc::Sender<PacedJob>,
}

impl Ctx {
    /// Joins `room`; a room's first member here is announced to logic before this returns.
    /// False when the session is no longer registered (replaced meanwhile) and did not join.
    ///
    /// Only joiners of the same room wait for each other (see `room` for the ordering against
    /// renewals); no comet-wide lock is held across the `room_joined` call.
    pub async fn join_room(&self, s: &Arc<Session>, room: RoomId) -> bool {
        loop {
            // The lock guard must not live across an await (it is not Send), hence the block.
            let step = {
                let mut p = self.rooms.presence();
                if let Some(w) = p.joining.get(&room) {
                    // Someone is announcing this room: wait for it, then look again.
                    Err(w.subscribe())
                } else if self.buckets.room_len(&room) > 0 {
                    // logic knows the room already. Joining in the same critical section as the
                    // check keeps a renewal snapshot from seeing neither the old members nor us.
                    return self.join_now(s, room);
                } else {
                    p.joining
                        .insert(room.clone(), Arc::new(watch::Sender::new(false)));
                    Ok(p.renewing.then_some(p.epoch))
                }
            };
            let overlapped = match step {
                Ok(overlapped) => overlapped,
                Err(mut rx) => {
                    // Err = the announcer went away (its guard removed the entry): look again.
                    let _ = rx.wait_for(|done| *done).await;
                    continue;
                }
            };
            let guard = Announcing {
                ctx: self,
                room: &room,
            };
            self.announce(&room).await;
            if let Some(epoch) = overlapped {
                // A renewal snapshotted before this announcement started and may reach logic
                // after it, erasing the room: wait for it to finish, then announce again.
                let bound = self.cfg.rpc_timeout() * 2;
                if tokio::time::timeout(bound, self.rooms.wait_renewal(epoch))
                    .await
                    .is_err()
                {
                    tracing::warn!(%room, "renewal still unfinished; announcing the room again anyway");
                }
                self.announce(&room).await;
            }
            // Join and end the announcement in one critical section: every snapshot from the
            // announcement's start on includes the room (pending, then as a member).
            let mut p = self.rooms.presence();
            let joined = self.join_now(s, room.clone());
            guard.finish(&mut p);
            return joined;
        }
    }

    /// Adds `s` to `room` now (the room is known to logic).
    fn join_now(&self, s: &Arc<Session>, room: RoomId) -> bool {
        if self.buckets.join(&room, s) {
            s.set_room(Some(room));
            true
        } else {
            false
        }
    }

    /// Tells logic this comet has members in `room`.
    async fn announce(&self, room: &RoomId) {
        let timeout = self.cfg.rpc_timeout();
        let server = self.cfg.server_id.clone();
        let r = room.clone();
        let res = self
            .logic
            .call(|c| async move {
                c.room_joined(rim_runtime::rpc::context(timeout), server, r)
                    .await
            })
            .await;
        match res {
            Ok(Ok(())) => {}
            // The session still joins: the next renewal reports the room anyway.
            Ok(Err(e)) => tracing::warn!(%room, error = %e, "room_joined refused"),
            Err(e) => tracing::warn!(%room, error = %e, "room_joined failed"),
        }
    }

    /// Leaves the session's room, if any.
    pub fn leave_room(&self, s: &Session) {
        if let Some(room) = s.room() {
            self.buckets.leave(&room, s);
            s.set_room(None);
        }
    }

    /// Moves the session to `to` (`None` = out of any room) for ChangeRoom, then tells logic
    /// (`room_changed`) and waits for it, so member listings and presence events are right by
    /// the time the client sees op 13. Nothing happens when the room does not change.
    pub async fn change_room(&self, s: &Arc<Session>, to: Option<RoomId>) {
        let from = s.room();
        if from == to {
            return;
        }
        self.leave_room(s);
        if let Some(room) = to.clone() {
            self.join_room(s, room).await;
        }
        if self.buckets.get(&s.key).is_none_or(|cur| cur.id != s.id) {
            // Replaced by a newer session with the same key: the key's membership is the new
            // session's business now, so logic must not hear about this one.
            return;
        }
        let sref = s.session_ref(&self.cfg.server_id);
        let timeout = self.cfg.rpc_timeout();
        let (f, t) = (from.clone(), to.clone());
        let res = self
            .logic
            .call(|c| async move {
                c.room_changed(rim_runtime::rpc::context(timeout), sref, f, t)
                    .await
            })
            .await;
        match res {
            Ok(Ok(())) => {}
            // The move stands on this comet; logic's listing catches up at the next change or
            // disconnect. The client still gets its reply.
            Ok(Err(e)) => {
                tracing::warn!(key = %s.key, ?from, ?to, error = %e, "room_changed refused")
            }
            Err(e) => tracing::warn!(key = %s.key, ?from, ?to, error = %e, "room_changed failed"),
        }
    }

    /// Online count for a heartbeat reply: cluster-wide when known, else local; 0 without room.
    pub fn online_count(&self, room: Option<&RoomId>) -> i32 {
        let Some(room) = room else { return 0 };
        let n = self
            .rooms
            .cluster_count(room)
            .unwrap_or(self.buckets.room_len(room) as u64);
        i32::try_from(n).unwrap_or(i32::MAX)
    }

    /// Renews the session's registration at logic in the background.
    pub fn session_heartbeat(&self, s: &Session) {
        // One try: the next client activity renews again.
        self.tell_logic("session heartbeat", s, 1, |c, ctx, sref| async move {
            c.heartbeat(ctx, sref).await
        });
    }

    /// Removes an ended session: room, bucket, and (if still the registered one) logic.
    pub fn end_session(&self, s: &Session) {
        self.leave_room(s);
        if !self.buckets.remove(s) {
            // Replaced by a newer session with the same key: its registration is the new one's.
            return;
        }
        self.tell_logic("disconnect", s, 3, |c, ctx, sref| async move {
            c.disconnect(ctx, sref).await
        });
    }

    /// Sends a session notice to logic without holding up the session. A transport failure is
    /// retried `attempts - 1` times with growing pauses (a disconnect lost to a logic blip would
    /// leave the session registered until its TTL); a refusal is final. Failures are logged.
    fn tell_logic<F, Fut>(&self, what: &'static str, s: &Session, attempts: u32, call: F)
    where
        F: Fn(LogicRpcClient, tarpc::context::Context, SessionRef) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Result<(), LogicRpcError>, tarpc::client::RpcError>>
            + Send,
    {
        let sref = s.session_ref(&self.cfg.server_id);
        let logic = self.logic.clone();
        let timeout = self.cfg.rpc_timeout();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            let key = sref.key.clone();
            let mut pause = Duration::from_millis(200);
            for attempt in 1..=attempts.max(1) {
                let sref = sref.clone();
                match logic
                    .call(|c| call(c, rim_runtime::rpc::context(timeout), sref))
                    .await
                {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => {
                        tracing::warn!(%key, error = %e, "{what} refused");
                        return;
                    }
                    Err(e) if attempt == attempts.max(1) => {
                        tracing::warn!(%key, error = %e, attempts, "{what} failed; giving up");
                    }
                    Err(e) => {
                        tracing::debug!(%key, error = %e, attempt, "{what} failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            // Draining: one last try now rather than outliving the grace.
                            _ = shutdown.cancelled() => {}
                        }
                        pause *= 4;
                    }
                }
            }
        });
    }
}

/// A room announcement in flight; ends it (waking the room's waiters) when finished or dropped.
struct Announcing<'a> {
    ctx: &'a Ctx,
    room: &'a RoomId,
}

impl Announcing<'_> {
    /// Ends the announcement under an already held presence lock.
    fn finish(self, p: &mut Presence) {
        end_announcement(p, self.room);
        std::mem::forget(self);
    }
}

impl Drop for Announcing<'_> {
    /// Only reached when the joining task is cancelled mid-announcement.
    fn drop(&mut self) {
        end_announcement(&mut self.ctx.rooms.presence(), self.room);
    }
}

fn end_announcement(p: &mut Presence, room: &RoomId) {
    if let Some(w) = p.joining.remove(room) {
        w.send_replace(true);
    }
}

/// `/readyz` and `/metrics` of the comet.
struct Ops(Arc<Ctx>);

impl OpsSource for Ops {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if !self.0.registered.load(Ordering::Acquire) {
                return Err("not registered with logic yet".into());
            }
            if !self.0.logic_ok.load(Ordering::Acquire) {
                return Err("logic unreachable".into());
            }
            Ok(())
        })
    }

    fn metrics(&self) -> String {
        self.0.metrics.render()
    }
}

/// The address published for a listener: the configured one, else the bound one. A wildcard
/// bind (0.0.0.0 / ::) is no address a peer can dial, so it is published as `domain:port`, or as
/// loopback (with a warning) when no domain is configured.
fn advertised(field: &str, configured: &str, domain: &str, bound: Option<SocketAddr>) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let Some(bound) = bound else {
        return String::new();
    };
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    if !domain.is_empty() {
        return format!("{domain}:{}", bound.port());
    }
    let loopback = SocketAddr::new(
        if bound.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        },
        bound.port(),
    );
    tracing::warn!(%bound, advertised = %loopback, "listener bound to a wildcard address; set {field} or advertise.domain so other hosts can reach it");
    loopback.to_string()
}

/// See [`crate::run`].
pub(crate) async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    use rim_runtime::settings::Validate;
    config.validate()?;
    let http_addr = listeners.http.local_addr()?;
    let rpc_addr = listeners.rpc.local_addr()?;
    let tcp_addr = match &listeners.tcp {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let node = NodeInfo {
        server: config.server_id.clone(),
        rpc_addr: advertised(
            "advertise.rpc_addr",
            &config.advertise.rpc_addr,
            &config.advertise.domain,
            Some(rpc_addr),
        ),
        domain: config.advertise.domain.clone(),
        tcp_addr: advertised(
            "advertise.tcp_addr",
            &config.advertise.tcp_addr,
            &config.advertise.domain,
            tcp_addr,
        ),
        ws_addr: advertised(
            "advertise.ws_addr",
            &config.advertise.ws_addr,
            &config.advertise.domain,
            Some(http_addr),
        ),
        wss_addr: String::new(),
        connections: 0,
        ips: 0,
        weight: config.advertise.weight,
        started_ms: rim_runtime::unix_ms(),
        renewed_ms: 0,
    };
    let logic = Link::new(
        "logic",
        config.logic.addrs.clone(),
        Duration::from_millis(config.logic.connect_timeout_ms),
        |stream| {
            LogicRpcClient::new(
                tarpc::client::Config::default(),
                rim_proto::rpc::transport(stream),
            )
            .spawn()
        },
    );
    let tracker = TaskTracker::new();
    let (paced, paced_rx) = mpsc::channel(crate::deliver::PACED_QUEUE);
    let ctx = Arc::new(Ctx {
        paced,
        buckets: Buckets::new(config.bucket.count),
        cfg: config,
        logic: Arc::new(logic),
        rooms: Rooms::default(),
        metrics: Metrics::default(),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        conns: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        registered: AtomicBool::new(false),
        logic_ok: AtomicBool::new(false),
        node,
    });
    tracing::info!(
        server = %ctx.cfg.server_id,
        http = %http_addr,
        tcp = ?tcp_addr,
        rpc = %rpc_addr,
        "comet starting"
    );

    // Register before serving clients so job can route to this node from the first session on.
    tokio::select! {
        _ = crate::renew::renew_once(&ctx) => {}
        _ = shutdown.cancelled() => {}
    }
    tracker.spawn(crate::renew::run(ctx.clone()));
    tracker.spawn(crate::deliver::paced_worker(ctx.clone(), paced_rx));

    let rpc_ctx = ctx.clone();
    tracker.spawn(rim_runtime::rpc::accept_loop(
        listeners.rpc,
        "comet-rpc",
        shutdown.clone(),
        tracker.clone(),
        move |stream| {
            let server = CometServer::new(rpc_ctx.clone());
            tarpc::server::BaseChannel::with_defaults(rim_proto::rpc::transport(stream))
                .execute(server.serve())
                .for_each(|f| async {
                    tokio::spawn(f);
                })
        },
    ));

    if let Some(tcp) = listeners.tcp {
        tracker.spawn(crate::tcp::accept_loop(ctx.clone(), tcp));
    }

    let app =
        crate::ws::router(ctx.clone()).merge(rim_runtime::ops::router(Arc::new(Ops(ctx.clone()))));
    let stop = shutdown.clone();
    let max_sessions = ctx.cfg.session.max_connections;
    let cfg_http_cap = max_sessions.saturating_add(max_sessions / 10 + 64);
    let handshake = Duration::from_millis(ctx.cfg.session.handshake_timeout_ms);
    let grace = Duration::from_millis(ctx.cfg.shutdown_grace_ms);
    tracker.spawn(async move {
        // Sockets that have not upgraded yet are bounded here (sessions are bounded by
        // session.max_connections once they exist): a little headroom over the session cap, and
        // the handshake timeout to send a request at all. After that the session's own timers
        // (auth, heartbeat) govern, so no read-idle limit.
        let http = rim_runtime::listener::GuardedListener::new(
            listeners.http,
            rim_runtime::listener::Limits {
                max_connections: cfg_http_cap,
                first_bytes: handshake,
                read_idle: None,
            },
        );
        if let Err(e) = rim_runtime::http::serve(http, app, stop, grace).await {
            tracing::error!(error = %e, "http server failed");
        }
    });

    shutdown.cancelled().await;
    tracing::info!("comet draining: closing sessions");
    // Sessions watch the token themselves and send op 6 "server shutting down".
    let grace = Duration::from_millis(ctx.cfg.shutdown_grace_ms);
    let drained = rim_runtime::shutdown::drain(&tracker, grace, "comet").await;
    let timeout = ctx.cfg.rpc_timeout();
    let server = ctx.cfg.server_id.clone();
    match ctx
        .logic
        .call(|c| async move {
            c.unregister_node(rim_runtime::rpc::context(timeout), server)
                .await
        })
        .await
    {
        Ok(Ok(())) => tracing::info!("unregistered from logic"),
        Ok(Err(e)) => tracing::warn!(error = %e, "unregister_node refused"),
        Err(e) => tracing::warn!(error = %e, "unregister_node failed"),
    }
    tracing::info!(drained, "comet stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::advertised;

    #[test]
    fn wildcard_binds_are_published_as_a_dialable_address() {
        let any = Some("0.0.0.0:3101".parse().unwrap());
        assert_eq!(advertised("f", "", "", any), "127.0.0.1:3101");
        assert_eq!(
            advertised("f", "", "push.example.com", any),
            "push.example.com:3101"
        );
        assert_eq!(
            advertised("f", "10.0.0.1:9", "push.example.com", any),
            "10.0.0.1:9"
        );
        assert_eq!(
            advertised("f", "", "", Some("127.0.0.2:5".parse().unwrap())),
            "127.0.0.2:5"
        );
        assert_eq!(advertised("f", "", "", None), "");
    }
}
