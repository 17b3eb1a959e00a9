//! Periodic removal of comets whose registration lapsed (crashed or partitioned away): their
//! node entry, room index entries and sessions. Every logic instance runs it; the per-node
//! claim in Redis makes concurrent runs harmless.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::App;

/// Runs until `shutdown`, every third of the node TTL, the first pass one node TTL after start.
///
/// The wait is what keeps a logic that comes back after an outage longer than the TTL (every
/// registration looks lapsed then) from reaping live comets: they renew every few seconds and
/// so have renewed with this logic (or another) before its first pass.
///
/// The same holds for Redis: comets cannot renew while it is unreachable, so registrations lapse
/// during an outage through no fault of theirs (a restarted Redis may come back with all of them
/// expired). Each pass first reads the expired comets; when that read fails or has to wait
/// longer than a pass period (Redis was down or stalled: calls retry within
/// `redis.timeout_ms`), reaping pauses until one node TTL after a prompt read. A comet that is
/// really gone is reaped then. (An outage long enough to make a registration lapse, more than
/// two thirds of the TTL, always overlaps a pass.)
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let ttl = Duration::from_millis(app.config.node.ttl_ms);
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(ttl) => {}
    }
    let period = Duration::from_millis((app.config.node.ttl_ms / 3).max(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resume_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        let now_ms = rim_runtime::unix_ms();
        let probe = app.store.nodes.expired(now_ms).await;
        if probe.is_err() || started.elapsed() > period {
            if resume_at.is_none_or(|t| t <= started) {
                tracing::warn!(wait = ?ttl, "redis unreachable or stalled; reaping pauses until comets had a node TTL to renew");
            }
            resume_at = Some(Instant::now() + ttl);
            continue;
        }
        if resume_at.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        if let Ok(expired) = probe
            && !expired.is_empty()
            && let Err(e) = app.reap(expired, now_ms).await
        {
            tracing::warn!(error = %e, "reaper pass failed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rim_proto::msg::AuthBody;
    use rim_proto::rpc::{ConnectRequest, NodeInfo, OnlineReport};

    use super::*;
    use crate::config::Config;

    fn req(server: &str, key: &str) -> ConnectRequest {
        ConnectRequest {
            server: server.into(),
            auth: AuthBody {
                mid: 6,
                key: key.into(),
                ..AuthBody::default()
            },
            remote_ip: String::new(),
        }
    }

    /// Lets the reaper task run what is due at the paused clock's current time.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Registers comets "alive" and "dead", each with session `k-<name>`, with registrations
    /// that look lapsed (expiry long past), as after an outage.
    async fn lapsed_comets(app: &App) {
        for server in ["alive", "dead"] {
            let node = NodeInfo {
                server: server.into(),
                ..NodeInfo::default()
            };
            app.store
                .nodes
                .renew(&node, 1, &Default::default(), 60_000)
                .await
                .unwrap();
            app.connect(req(server, &format!("k-{server}")))
                .await
                .unwrap();
        }
    }

    /// "alive" renews.
    async fn alive_renews(app: &App) {
        let alive = NodeInfo {
            server: "alive".into(),
            ..NodeInfo::default()
        };
        app.renew_node(alive, OnlineReport::default())
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_pass_waits_a_node_ttl_so_live_comets_renew_first() {
        let mut config = Config::dev();
        config.node.ttl_ms = 1_500;
        let (app, mem) = App::in_memory(config);
        // Two comets whose registrations look lapsed, as after an outage longer than the TTL.
        lapsed_comets(&app).await;
        let stop = CancellationToken::new();
        let reaper = tokio::spawn(run(app.clone(), stop.clone()));
        settle().await; // the reaper starts its wait now

        tokio::time::advance(Duration::from_millis(1_400)).await;
        settle().await;
        assert!(
            mem.session("k-dead").is_some(),
            "no pass within the first TTL"
        );
        // "alive" renews within its renewal interval of logic coming back.
        alive_renews(&app).await;

        tokio::time::advance(Duration::from_millis(200)).await;
        settle().await;
        assert!(
            mem.session("k-dead").is_none(),
            "the lapsed comet is reaped"
        );
        assert!(mem.session("k-alive").is_some(), "the renewed one is not");
        assert_eq!(app.metrics.nodes_reaped.get(), 1);
        stop.cancel();
        reaper.await.unwrap();
    }

    /// Comets cannot renew while Redis is unreachable: registrations that lapsed during an
    /// outage are not reaped until the comets had a node TTL to renew after it.
    #[tokio::test(start_paused = true)]
    async fn after_a_redis_outage_lapsed_comets_get_a_node_ttl_to_renew() {
        let mut config = Config::dev();
        config.node.ttl_ms = 1_500;
        let (app, mem) = App::in_memory(config);
        let stop = CancellationToken::new();
        let reaper = tokio::spawn(run(app.clone(), stop.clone()));
        settle().await;
        tokio::time::advance(Duration::from_millis(1_500)).await;
        settle().await;

        mem.set_down(true);
        tokio::time::advance(Duration::from_millis(500)).await;
        settle().await;
        // While Redis was down both registrations lapsed.
        lapsed_comets(&app).await;
        mem.set_down(false);
        for _ in 0..2 {
            tokio::time::advance(Duration::from_millis(500)).await;
            settle().await;
        }
        assert!(
            mem.session("k-dead").is_some(),
            "not reaped within a node TTL of Redis answering again"
        );
        alive_renews(&app).await;
        for _ in 0..3 {
            tokio::time::advance(Duration::from_millis(500)).await;
            settle().await;
        }
        assert!(mem.session("k-dead").is_none(), "reaped after the wait");
        assert!(
            mem.session("k-alive").is_some(),
            "the one that renewed stays"
        );
        stop.cancel();
        reaper.await.unwrap();
    }
}
