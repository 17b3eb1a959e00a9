//! The lease manager's timing under a paused clock: an unconfirmed lease is fenced at its
//! deadline (`renewed + ttl - renew_ms`), not at the next tick after it; a slow but answering
//! Redis is renewed once a tick and never fenced; a partition being released does not count
//! toward the share, so the worker takes a free one meanwhile; a lease found taken stops its
//! partition at that renewal, one released by its own partition mid-renewal is not a loss, and a
//! worker never takes more than its share.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tests::{WAIT, WORKER, World, config, push, start_leases, until, world};
use crate::Ctx;
use crate::store::memory::MemoryLeases;
use crate::store::{Leases, StoreResult, Stores};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// [`MemoryLeases`] behind a link that takes `latency` to answer every call (success or
/// failure alike), counting renewals.
struct Latent {
    inner: Arc<MemoryLeases>,
    latency: Duration,
    renewals: AtomicUsize,
}

#[async_trait]
impl Leases for Latent {
    async fn heartbeat(&self, worker: &str, now_ms: u64, ttl_ms: u64) -> StoreResult<u64> {
        tokio::time::sleep(self.latency).await;
        self.inner.heartbeat(worker, now_ms, ttl_ms).await
    }

    async fn leave(&self, worker: &str) -> StoreResult<()> {
        tokio::time::sleep(self.latency).await;
        self.inner.leave(worker).await
    }

    async fn acquire(&self, partition: u16, worker: &str, ttl_ms: u64) -> StoreResult<bool> {
        tokio::time::sleep(self.latency).await;
        self.inner.acquire(partition, worker, ttl_ms).await
    }

    async fn renew(&self, partition: u16, worker: &str, ttl_ms: u64) -> StoreResult<bool> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        self.inner.renew(partition, worker, ttl_ms).await
    }

    async fn release(&self, partition: u16, worker: &str) -> StoreResult<bool> {
        tokio::time::sleep(self.latency).await;
        self.inner.release(partition, worker).await
    }
}

/// `w`'s worker with its leases reached through a link of `latency` (ttl 5000 ms, renewed every
/// 1500 ms: fencing comes 3500 ms after the last confirmed renewal was sent, between two ticks).
async fn latent_world(latency: Duration) -> (World, Arc<Latent>, Arc<Ctx>) {
    let mut cfg = config();
    cfg.lease.ttl_ms = 5000;
    cfg.lease.renew_ms = 1500;
    // A call to a comet is neither timed out nor retried during a test.
    cfg.delivery.rpc_timeout_ms = 60_000;
    let w = world(cfg).await;
    let leases = Arc::new(Latent {
        inner: w.leases.clone(),
        latency,
        renewals: AtomicUsize::new(0),
    });
    let stores = Stores {
        streams: w.ctx.stores.streams.clone(),
        leases: leases.clone(),
        directory: w.ctx.stores.directory.clone(),
    };
    let ctx = Arc::new(Ctx::new(
        w.ctx.cfg.clone(),
        WORKER.into(),
        stores,
        w.ctx.registry.clone(),
        w.ctx.metrics.clone(),
    ));
    (w, leases, ctx)
}

fn start_manager(ctx: &Arc<Ctx>) -> (CancellationToken, JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(crate::lease::run(
        ctx.clone(),
        shutdown.clone(),
        TaskTracker::new(),
    ));
    (shutdown, task)
}

/// Renewals fail from 2000 ms on; the last confirmed one was sent at the 1500 ms tick, so the
/// partition must stop at 5000 ms: the manager wakes for that deadline rather than at the
/// 6000 ms tick, which would leave 500 ms, not a renewal period, before the lease may expire at
/// 6500 ms and another worker take the partition over.
#[tokio::test(start_paused = true)]
async fn an_unconfirmed_lease_is_fenced_at_its_deadline_not_at_the_next_tick() {
    let (w, leases, ctx) = latent_world(ms(10)).await;
    let m = &ctx.metrics;
    let start = Instant::now();
    let (shutdown, manager) = start_manager(&ctx);
    tokio::time::sleep_until(start + ms(2000)).await;
    assert_eq!(m.partitions_held.get(), 1);
    assert_eq!(leases.renewals.load(Ordering::SeqCst), 1, "renewed at 1500");
    w.leases.set_down(true);

    // Looked at every millisecond, so the instant of fencing is known to within one.
    let fenced = async {
        while m.leases_lost.get() == 0 {
            tokio::time::sleep(ms(1)).await;
        }
        Instant::now()
    };
    let fenced_at = tokio::time::timeout(WAIT, fenced).await.expect("fenced") - start;
    assert!(
        fenced_at >= ms(5000) && fenced_at <= ms(5001),
        "fenced 3500 ms after the renewal sent at 1500 ms, not at a tick: at {fenced_at:?}"
    );
    until("partition stopped", || m.partitions_held.get() == 0).await;

    shutdown.cancel();
    w.leases.set_down(false);
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
}

/// Redis answering every call 300 ms late is slow, not gone: each round waits for its renewal
/// (a round is bounded by the fencing deadline, 3500 ms away, not cut at once), so the lease is
/// confirmed every tick and never fenced; and renewals come once a tick, not back to back.
#[tokio::test(start_paused = true)]
async fn a_slow_redis_is_renewed_once_a_tick_and_never_fenced() {
    let (w, leases, ctx) = latent_world(ms(300)).await;
    let m = &ctx.metrics;
    let start = Instant::now();
    let (shutdown, manager) = start_manager(&ctx);
    // Twenty renewal periods (six lease TTLs), looked at mid-period.
    tokio::time::sleep_until(start + ms(20 * 1500 + 750)).await;
    assert_eq!(m.leases_lost.get(), 0, "never fenced");
    assert_eq!(m.redis_errors.get(), 0, "no round cut short");
    assert_eq!(m.partitions_held.get(), 1);
    assert_eq!(w.leases.holder(0).as_deref(), Some(WORKER));
    assert_eq!(
        leases.renewals.load(Ordering::SeqCst),
        20,
        "one renewal per tick (1500 ms .. 30000 ms)"
    );

    shutdown.cancel();
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
}

/// A partition being released (its batch still in flight) no longer counts toward the share:
/// when the share grows back meanwhile, the worker takes a free partition at once instead of
/// waiting for that release to finish.
#[tokio::test(start_paused = true)]
async fn a_partition_being_released_does_not_count_toward_the_share() {
    let mut cfg = config();
    cfg.stream.partitions = 3;
    // Far beyond the waits below: the call is neither timed out nor retried meanwhile.
    cfg.delivery.rpc_timeout_ms = 60_000;
    let mut w = world(cfg).await;
    let m = w.ctx.metrics.clone();
    let ttl_ms = w.ctx.cfg.lease.ttl_ms;
    let leases = w.leases.clone();
    let live = move |worker: &'static str| {
        let leases = leases.clone();
        async move {
            leases
                .heartbeat(worker, rim_runtime::unix_ms(), 3_600_000)
                .await
                .unwrap()
        }
    };
    // Two workers live: a share of ceil(3 / 2) = 2.
    live("w2").await;
    let (shutdown, manager) = start_leases(&w);
    until("two held", || m.partitions_held.get() == 2).await;
    let ours: Vec<u16> = (0..3)
        .filter(|p| w.leases.holder(*p).as_deref() == Some(WORKER))
        .collect();
    let free = (0..3).find(|p| !ours.contains(p)).unwrap();
    let highest = *ours.iter().max().unwrap();
    // A batch in flight on the highest one, the one a smaller share gives up.
    w.streams.append(highest, &push("a"));
    let call = w.next_call().await;
    assert_eq!(call.items[0].id.partition, highest);

    // A third worker: a share of 1, so `highest` is being released (its batch still unanswered).
    live("w3").await;
    tokio::time::sleep(ms(3 * ttl_ms)).await;
    assert_eq!(w.leases.holder(free), None, "over the share: nothing taken");
    assert_eq!(w.leases.holder(highest).as_deref(), Some(WORKER), "kept");

    // It leaves: a share of 2 again, held by one active partition and one being released.
    w.leases.leave("w3").await.unwrap();
    until("the free partition taken", || {
        w.leases.holder(free).as_deref() == Some(WORKER)
    })
    .await;
    assert!(
        !call.reply.is_closed(),
        "while the release is still under way"
    );
    assert_eq!(w.leases.holder(highest).as_deref(), Some(WORKER));

    call.confirm();
    until("released", || w.leases.holder(highest).is_none()).await;
    until("two held", || m.partitions_held.get() == 2).await;
    assert_eq!(m.leases_lost.get(), 0);
    shutdown.cancel();
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
}

/// Waits (looking every millisecond) until `cond` holds; returns when, from `start`.
async fn when(start: Instant, what: &str, cond: impl Fn() -> bool) -> Duration {
    let poll = async {
        while !cond() {
            tokio::time::sleep(ms(1)).await;
        }
        Instant::now() - start
    };
    tokio::time::timeout(WAIT, poll)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A renewal that finds the lease taken by another worker stops the partition there and then,
/// at the 3000 ms tick, not when the last confirmed renewal (sent at 1500 ms) runs out at 5000 ms:
/// the new owner is consuming the partition already.
#[tokio::test(start_paused = true)]
async fn a_lease_found_taken_stops_its_partition_at_that_renewal() {
    let mut cfg = config();
    cfg.lease.ttl_ms = 5000;
    cfg.lease.renew_ms = 1500;
    let w = world(cfg).await;
    let m = w.ctx.metrics.clone();
    let start = Instant::now();
    let (shutdown, manager) = start_leases(&w);
    tokio::time::sleep_until(start + ms(2000)).await;
    assert_eq!(m.partitions_held.get(), 1);

    w.leases.take_over(0, "w2", Duration::from_secs(60));
    let lost_at = when(start, "partition stopped", || m.partitions_held.get() == 0).await;
    assert!(
        lost_at >= ms(3000) && lost_at <= ms(3001),
        "stopped by the 3000 ms renewal: at {lost_at:?}"
    );
    assert_eq!(m.leases_lost.get(), 1);
    assert_eq!(
        w.leases.holder(0).as_deref(),
        Some("w2"),
        "not released by us"
    );

    shutdown.cancel();
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
}

/// A partition released on shutdown while a renewal of its lease is on the wire: the renewal
/// (sent at the 3000 ms tick) finds the lease gone because the partition deleted it itself
/// (its release, sent at 2900 ms, landed at 3200 ms), which is not a lost lease.
#[tokio::test(start_paused = true)]
async fn a_lease_released_while_its_renewal_is_in_flight_is_not_counted_lost() {
    let (mut w, _leases, ctx) = latent_world(ms(300)).await;
    let m = &ctx.metrics;
    let start = Instant::now();
    let (shutdown, manager) = start_manager(&ctx);
    w.append("a");
    let call = w.next_call().await;
    tokio::time::sleep_until(start + ms(2000)).await;
    shutdown.cancel();
    tokio::time::sleep_until(start + ms(2900)).await;
    assert_eq!(
        w.leases.holder(0).as_deref(),
        Some(WORKER),
        "kept for the batch"
    );
    call.confirm();

    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
    assert_eq!(m.acked.get(), 1);
    assert_eq!(w.leases.holder(0), None, "released");
    assert_eq!(m.leases_lost.get(), 0, "a release is not a loss");
}

/// A worker never takes more partitions than its share, not even for one round: with two
/// workers live and four partitions it takes two, leaving two for the other.
#[tokio::test(start_paused = true)]
async fn a_worker_takes_no_more_than_its_share() {
    let mut cfg = config();
    cfg.stream.partitions = 4;
    let w = world(cfg).await;
    let m = w.ctx.metrics.clone();
    w.leases
        .heartbeat("w2", rim_runtime::unix_ms(), 3_600_000)
        .await
        .unwrap();
    let (shutdown, manager) = start_leases(&w);
    let ours = || {
        (0..4)
            .filter(|p| w.leases.holder(*p).as_deref() == Some(WORKER))
            .count()
    };
    // Right after the first round, then over several TTLs.
    tokio::time::sleep(ms(1)).await;
    assert_eq!(ours(), 2, "the share of two out of four");
    for _ in 0..50 {
        tokio::time::sleep(ms(w.ctx.cfg.lease.renew_ms)).await;
        assert_eq!(ours(), 2);
        assert_eq!(m.partitions_held.get(), 2);
    }

    shutdown.cancel();
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
}
