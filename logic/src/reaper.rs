//! Periodic removal of comets whose registration lapsed (crashed or partitioned away): their
//! node entry, room index entries and sessions. Every logic instance runs it; the per-node
//! claim in Redis makes concurrent runs harmless.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::App;

/// Runs until `shutdown`, every third of the node TTL, the first pass one node TTL after start.
///
/// The wait is what keeps a logic that comes back after an outage longer than the TTL (every
/// registration looks lapsed then) from reaping live comets: they renew every few seconds and
/// so have renewed with this logic (or another) before its first pass.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let ttl = Duration::from_millis(app.config.node.ttl_ms);
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(ttl) => {}
    }
    let period = Duration::from_millis((app.config.node.ttl_ms / 3).max(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A failed pass (Redis down) is simply retried at the next tick.
        if let Err(e) = app.reap().await {
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

    #[tokio::test(start_paused = true)]
    async fn the_first_pass_waits_a_node_ttl_so_live_comets_renew_first() {
        let mut config = Config::dev();
        config.node.ttl_ms = 1_500;
        let (app, mem) = App::in_memory(config);
        // Two comets whose registrations look lapsed, as after an outage longer than the TTL.
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
        let alive = NodeInfo {
            server: "alive".into(),
            ..NodeInfo::default()
        };
        app.renew_node(alive, OnlineReport::default())
            .await
            .unwrap();

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
}
