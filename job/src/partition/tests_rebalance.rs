//! Giving a partition up on request (rebalancing, shutdown) under a paused clock: the batch in
//! flight is finished and acknowledged by this worker, the lease is kept (renewed) meanwhile, and
//! only then released; nothing newer is read once the stop was requested.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::tests::{Call, WAIT, WORKER, World, config, push, start_leases, until, world};
use crate::store::Leases;

/// Partition 1's batch in flight.
const Q: u16 = 1;

struct InFlight {
    w: World,
    call: Call,
    id: String,
    shutdown: CancellationToken,
    manager: JoinHandle<()>,
}

/// One worker holding both of two partitions, with one entry of partition 1 sent to `c1` and not
/// answered.
async fn a_batch_in_flight_on_partition_1() -> InFlight {
    let mut cfg = config();
    cfg.stream.partitions = 2;
    // Far beyond the waits below: the call is neither timed out nor retried meanwhile.
    cfg.delivery.rpc_timeout_ms = 60_000;
    let mut w = world(cfg).await;
    let (shutdown, manager) = start_leases(&w);
    let m = w.ctx.metrics.clone();
    until("both held", || m.partitions_held.get() == 2).await;
    let id = w.streams.append(Q, &push("a"));
    let call = w.next_call().await;
    assert_eq!(call.items.len(), 1);
    assert_eq!(call.items[0].id.partition, Q);
    InFlight {
        w,
        call,
        id,
        shutdown,
        manager,
    }
}

/// Several lease TTLs on: the batch is still unconfirmed, so partition 1 is still ours
/// (renewed), its entry pending, nothing acknowledged, and the call still awaited.
async fn assert_kept_while_unconfirmed(f: &InFlight) {
    let w = &f.w;
    tokio::time::sleep(Duration::from_millis(5 * w.ctx.cfg.lease.ttl_ms)).await;
    assert_eq!(w.leases.holder(Q).as_deref(), Some(WORKER), "kept");
    let pending: Vec<String> = w.streams.pending(Q).into_iter().map(|(id, _)| id).collect();
    assert_eq!(pending, vec![f.id.clone()]);
    assert_eq!(w.ctx.metrics.acked.get(), 0);
    assert_eq!(w.ctx.metrics.leases_lost.get(), 0);
    assert!(!f.call.reply.is_closed(), "the call is still awaited");
}

/// After the confirmation: acknowledged and trimmed by this worker, then released; `newer`
/// (appended after the stop) was not read.
async fn assert_acked_then_released(w: &mut World, newer: &str) {
    until("partition 1 released", || w.leases.holder(Q).is_none()).await;
    assert_eq!(w.ctx.metrics.acked.get(), 1);
    assert_eq!(w.ctx.metrics.batches.get(), 1);
    assert!(w.streams.pending(Q).is_empty(), "acked by this worker");
    assert_eq!(w.streams.ids(Q), vec![newer.to_owned()], "trimmed");
    assert!(w.calls.try_recv().is_err(), "nothing read after the stop");
    assert_eq!(w.ctx.metrics.leases_lost.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_rebalanced_partition_is_released_only_after_its_in_flight_batch_is_acked() {
    let f = a_batch_in_flight_on_partition_1().await;
    // A second worker joins: the share drops to 1, so partition 1 (the highest) is surplus.
    f.w.leases
        .heartbeat("w2", rim_runtime::unix_ms(), 60_000)
        .await
        .unwrap();
    assert_kept_while_unconfirmed(&f).await;
    let newer = f.w.streams.append(Q, &push("b"));

    let InFlight {
        mut w,
        call,
        shutdown,
        manager,
        ..
    } = f;
    call.confirm();
    assert_acked_then_released(&mut w, &newer).await;
    let m = &w.ctx.metrics;
    until("one partition held", || m.partitions_held.get() == 1).await;
    assert_eq!(
        w.leases.holder(0).as_deref(),
        Some(WORKER),
        "partition 0 kept"
    );

    shutdown.cancel();
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stopped_worker_acks_its_in_flight_batch_then_releases_and_leaves() {
    let f = a_batch_in_flight_on_partition_1().await;
    f.shutdown.cancel();
    assert_kept_while_unconfirmed(&f).await;
    assert_eq!(
        f.w.leases.holder(0),
        None,
        "the idle partition is released at once"
    );
    assert_eq!(
        f.w.leases.workers(),
        vec![WORKER.to_owned()],
        "not left yet"
    );
    assert!(!f.manager.is_finished());
    let newer = f.w.streams.append(Q, &push("b"));

    let InFlight {
        mut w,
        call,
        manager,
        ..
    } = f;
    call.confirm();
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
    assert_acked_then_released(&mut w, &newer).await;
    assert!(w.leases.workers().is_empty(), "left rim:jobs");
    assert_eq!(w.ctx.metrics.partitions_held.get(), 0);
}
