//! The registry rule of a batch, under a paused clock: a comet the worker's cached view does not
//! know is looked up again before its pushes are dropped as "comet gone", and a view that cannot
//! be re-read never calls a comet gone (the batch waits).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rim_proto::job::{PushJob, Route, ServerKeys};

use super::tests::{P, World, config, push, seqs, world};

/// A push for key `k1` on comet `server`.
fn push_to(server: &str, msg: &str) -> PushJob {
    PushJob {
        route: Route::Sessions(vec![ServerKeys {
            server: server.into(),
            keys: vec!["k1".into()],
        }]),
        ..push(msg)
    }
}

/// Registers `c2` after the worker's last registry read, so its cache does not know it, and
/// appends a push routed to it. The paused clock does not move: the last read and the miss carry
/// the same instant, which `Registry::refresh_since` must not trust (on a coarse clock such a
/// read may have started before the comet registered).
async fn c2_registers_after_the_last_read(w: &World) -> String {
    w.directory
        .register("c2", "127.0.0.1:2", rim_runtime::unix_ms() + 3_600_000);
    assert!(w.ctx.registry.link("c2").is_none(), "not cached yet");
    w.streams.append(P, &push_to("c2", "a"))
}

#[tokio::test(start_paused = true)]
async fn a_comet_missing_from_the_cache_is_looked_up_again_before_it_is_called_gone() {
    let mut w = world(config()).await;
    let id = c2_registers_after_the_last_read(&w).await;
    let running = w.start_partition();

    let call = w.next_call().await;
    assert_eq!(call.server, "c2");
    assert_eq!(call.seqs(), seqs(std::slice::from_ref(&id)));
    call.confirm();
    w.all_acked().await;
    let m = &w.ctx.metrics;
    assert_eq!(m.dropped_comet_gone.get(), 0);
    assert_eq!(m.deliveries.get(), 1);
    assert_eq!(m.acked.get(), 1);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_registry_that_cannot_be_reread_never_calls_a_comet_gone() {
    let mut w = world(config()).await;
    let id = c2_registers_after_the_last_read(&w).await;
    w.directory.set_down(true);
    let running = w.start_partition();

    // Redis unreadable for 10 s: the re-read is retried (backoff 50 ms doubling, capped at 2 s:
    // at 0, 50, 150, 350, 750, 1550, 3150, 5150, 7150 and 9150 ms), nothing is called, dropped or
    // acknowledged.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), w.calls.recv())
            .await
            .is_err(),
        "no call while the registry is unreadable"
    );
    let m = &w.ctx.metrics;
    assert_eq!(m.dropped_comet_gone.get(), 0);
    assert_eq!(m.acked.get(), 0);
    assert_eq!(w.pending_ids(), vec![id.clone()]);
    assert_eq!(m.redis_errors.get(), 10);

    // Readable again: the next retry finds c2 and the push goes to it.
    w.directory.set_down(false);
    let call = w.next_call().await;
    assert_eq!(call.server, "c2");
    assert_eq!(call.seqs(), seqs(std::slice::from_ref(&id)));
    call.confirm();
    w.all_acked().await;
    assert_eq!(w.ctx.metrics.dropped_comet_gone.get(), 0);
    assert_eq!(w.ctx.metrics.deliveries.get(), 1);
    running.stop().await;
}
