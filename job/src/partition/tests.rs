//! The partition's delivery rules against the in-memory stores and fake comets, under a paused
//! clock: stream order, acknowledgement only after confirmation, retries with backoff, fencing
//! on a lost lease, and replay of pending entries before newer ones.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rim_proto::job::{PushJob, Route, ServerKeys};
use rim_proto::room::RoomId;
use rim_proto::rpc::{DeliverReport, Delivery};
use rim_runtime::rpc::LinkError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tests_faults::Faults;
use crate::metrics::Metrics;
use crate::registry::{CometClient, Connector, Registry};
use crate::store::Stores;
use crate::store::memory::{MemoryDirectory, MemoryLeases, MemoryStreams};
use crate::{Config, Ctx};

pub(super) const P: u16 = 0;
pub(super) const WORKER: &str = "w1";
/// Bound on waiting for any one event (virtual time: the clock is paused).
pub(super) const WAIT: Duration = Duration::from_secs(30);

/// One `deliver` call a fake comet received; the test answers it through `reply`.
pub(super) struct Call {
    pub(super) server: String,
    pub(super) items: Vec<Delivery>,
    pub(super) at: Instant,
    pub(super) reply: oneshot::Sender<Result<DeliverReport, LinkError>>,
}

impl Call {
    pub(super) fn seqs(&self) -> Vec<u64> {
        self.items.iter().map(|d| d.id.seq).collect()
    }

    pub(super) fn confirm(self) {
        let queued = self.items.len() as u64;
        let _ = self.reply.send(Ok(DeliverReport {
            queued,
            ..DeliverReport::default()
        }));
    }

    /// The comet is up but refuses this worker's cluster secret.
    fn refuse(self) {
        let _ = self.reply.send(Err(LinkError::Refused {
            name: format!("comet {}", self.server),
            addrs: Vec::new(),
            last: "cluster secret mismatch".into(),
        }));
    }

    fn fail(self) {
        let _ = self.reply.send(Err(LinkError::Connect {
            name: format!("comet {}", self.server),
            addrs: Vec::new(),
            last: "connection refused".into(),
        }));
    }
}

/// A comet that hands every call to the test and answers what the test says.
struct FakeComet {
    server: String,
    calls: mpsc::UnboundedSender<Call>,
}

#[async_trait]
impl CometClient for FakeComet {
    async fn deliver(
        &self,
        items: Vec<Delivery>,
        _timeout: Duration,
    ) -> Result<DeliverReport, LinkError> {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            server: self.server.clone(),
            items,
            at: Instant::now(),
            reply,
        };
        if self.calls.send(call).is_ok()
            && let Ok(answer) = answer.await
        {
            return answer;
        }
        // Unanswered: a hung comet (job's own deadline ends the call).
        std::future::pending().await
    }
}

/// One worker's stores, registry and fake comet `c1` (every comet registered in `directory` is a
/// fake whose calls arrive on `calls`). The partition reaches the streams and room index through
/// `faults`, which counts its commands and can fail them.
pub(super) struct World {
    pub(super) streams: MemoryStreams,
    pub(super) leases: Arc<MemoryLeases>,
    pub(super) directory: Arc<MemoryDirectory>,
    pub(super) faults: Arc<Faults>,
    pub(super) ctx: Arc<Ctx>,
    pub(super) calls: mpsc::UnboundedReceiver<Call>,
}

pub(super) fn config() -> Config {
    let mut c = Config {
        worker_id: WORKER.into(),
        ..Config::default()
    };
    c.stream.partitions = 1;
    c.stream.batch_max = 2;
    c.stream.block_ms = 50;
    c.lease.ttl_ms = 1000;
    c.lease.renew_ms = 100;
    c.delivery.rpc_timeout_ms = 300;
    c.delivery.retry_base_ms = 20;
    c.delivery.retry_max_ms = 100;
    c
}

pub(super) async fn world(cfg: Config) -> World {
    let streams = MemoryStreams::new();
    let leases = Arc::new(MemoryLeases::new());
    let directory = Arc::new(MemoryDirectory::new());
    // Registry liveness is judged on the wall clock (logic's expiries are unix ms).
    directory.register("c1", "127.0.0.1:1", rim_runtime::unix_ms() + 3_600_000);
    let (tx, calls) = mpsc::unbounded_channel();
    let connector: Connector = Arc::new(move |server: &str, _addr: &str| {
        Arc::new(FakeComet {
            server: server.to_owned(),
            calls: tx.clone(),
        }) as Arc<dyn CometClient>
    });
    let registry = Arc::new(Registry::with_connector(
        directory.clone(),
        connector,
        Duration::from_secs(10),
    ));
    registry.refresh().await.unwrap();
    let faults = Arc::new(Faults::default());
    let stores = Stores {
        streams: faults.streams(&streams),
        leases: leases.clone(),
        directory: faults.directory(&directory),
    };
    let ctx = Arc::new(Ctx::new(
        cfg,
        WORKER.into(),
        stores,
        registry,
        Arc::new(Metrics::default()),
    ));
    World {
        streams,
        leases,
        directory,
        faults,
        ctx,
        calls,
    }
}

pub(super) fn push(msg: &str) -> PushJob {
    PushJob {
        msg_id: msg.into(),
        op: 1000,
        body: Bytes::from(msg.to_owned()),
        route: Route::Sessions(vec![ServerKeys {
            server: "c1".into(),
            keys: vec!["k1".into()],
        }]),
        accepted_ms: 1,
        exclude: None,
        recorded: false,
    }
}

/// A push to every member of `room` (`live://{room}`).
pub(super) fn room_push(msg: &str, room: &str) -> PushJob {
    let room = RoomId::parse(&format!("live://{room}")).unwrap();
    PushJob {
        route: Route::Room(room),
        ..push(msg)
    }
}

/// The sequence part of stream ids.
pub(super) fn seqs(ids: &[String]) -> Vec<u64> {
    ids.iter()
        .map(|id| id.split_once('-').unwrap().1.parse().unwrap())
        .collect()
}

impl World {
    pub(super) fn append(&self, msg: &str) -> String {
        self.streams.append(P, &push(msg))
    }

    pub(super) fn pending_ids(&self) -> Vec<String> {
        self.streams
            .pending(P)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    pub(super) async fn next_call(&mut self) -> Call {
        tokio::time::timeout(WAIT, self.calls.recv())
            .await
            .expect("a deliver call")
            .expect("comets alive")
    }

    /// Takes the next call, checks it carries exactly `expected` (in order) and confirms it.
    pub(super) async fn confirm_next(&mut self, expected: &[String], what: &str) {
        let call = self.next_call().await;
        assert_eq!(call.seqs(), seqs(expected), "{what}");
        call.confirm();
    }

    /// Runs the partition task directly (as if the lease were held).
    pub(super) fn start_partition(&self) -> Running {
        let (stop, lost) = (CancellationToken::new(), CancellationToken::new());
        let (done, _) = mpsc::unbounded_channel();
        let task = tokio::spawn(super::run(self.ctx.clone(), P, stop.clone(), lost, done));
        Running { stop, task }
    }

    /// Waits until nothing is pending and the stream is trimmed empty.
    pub(super) async fn all_acked(&self) {
        let wait = self
            .streams
            .wait_until(|s| s.pending(P).is_empty() && s.ids(P).is_empty());
        tokio::time::timeout(WAIT, wait).await.expect("all acked");
    }
}

pub(super) struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    pub(super) async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("partition stops")
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn entries_are_delivered_in_stream_order_and_acked_only_after_the_comet_confirmed() {
    let mut w = world(config()).await;
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|m| w.append(m)).collect();
    let running = w.start_partition();

    let first = w.next_call().await;
    assert_eq!(first.server, "c1");
    assert_eq!(
        first.seqs(),
        seqs(&ids[..2]),
        "a batch of batch_max, in order"
    );
    assert!(first.items.iter().all(|d| d.id.partition == P));
    // Unconfirmed: read, so pending for this worker, and not acknowledged or trimmed.
    assert_eq!(w.pending_ids(), ids[..2].to_vec());
    assert!(w.streams.pending(P).iter().all(|(_, c)| c == WORKER));
    assert_eq!(w.streams.ids(P), ids);
    // Nothing newer goes out while the batch waits for its confirmation.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), w.calls.recv())
            .await
            .is_err()
    );
    assert_eq!(w.ctx.metrics.acked.get(), 0);
    first.confirm();

    let second = w.next_call().await;
    assert_eq!(second.seqs(), seqs(&ids[2..]));
    assert_eq!(w.pending_ids(), ids[2..].to_vec(), "first batch acked");
    assert_eq!(w.streams.ids(P), ids[2..].to_vec(), "and trimmed");
    second.confirm();
    w.all_acked().await;
    assert_eq!(w.ctx.metrics.acked.get(), 3);
    assert_eq!(w.ctx.metrics.deliveries.get(), 3);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_delivery_is_retried_with_backoff_and_not_acked_meanwhile() {
    let mut w = world(config()).await;
    let id = w.append("a");
    let running = w.start_partition();

    let mut last = w.next_call().await;
    let mut gaps = Vec::new();
    for _ in 0..3 {
        let failed_at = Instant::now();
        last.fail();
        let retry = w.next_call().await;
        gaps.push(retry.at - failed_at);
        assert_eq!(retry.seqs(), seqs(std::slice::from_ref(&id)), "same items");
        assert_eq!(w.pending_ids(), vec![id.clone()], "not acked meanwhile");
        assert_eq!(w.ctx.metrics.acked.get(), 0);
        last = retry;
    }
    // retry_base_ms doubling: 20, 40, 80 ms.
    let ms = Duration::from_millis;
    assert!(
        gaps[0] >= ms(20) && gaps[1] >= ms(40) && gaps[2] >= ms(80),
        "{gaps:?}"
    );
    last.confirm();
    w.all_acked().await;
    assert_eq!(w.ctx.metrics.rpc_failures.get(), 3);
    assert_eq!(w.ctx.metrics.rpc_retries.get(), 3);
    assert_eq!(w.ctx.metrics.deliveries.get(), 1);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_comet_failing_for_give_up_ms_is_given_up_and_the_batch_acked() {
    let mut cfg = config();
    cfg.delivery.give_up_ms = 1000;
    let mut w = world(cfg).await;
    w.append("a");
    let running = w.start_partition();

    // Every attempt fails at once until the share is given up and the batch acknowledged.
    let started = Instant::now();
    let World { streams, calls, .. } = &mut w;
    let acked = streams.wait_until(|s| s.pending(P).is_empty() && s.ids(P).is_empty());
    let fail_all = async {
        let mut acked = std::pin::pin!(acked);
        loop {
            tokio::select! {
                _ = &mut acked => break,
                call = calls.recv() => call.expect("comets alive").fail(),
            }
        }
    };
    tokio::time::timeout(WAIT, fail_all)
        .await
        .expect("given up");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1200),
        "{took:?}"
    );
    assert_eq!(w.ctx.metrics.dropped_comet_unreachable.get(), 1);
    assert_eq!(w.ctx.metrics.deliveries.get(), 0);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_comet_refusing_the_cluster_secret_is_never_given_up() {
    let mut cfg = config();
    cfg.delivery.give_up_ms = 1000;
    let mut w = world(cfg).await;
    let id = w.append("a");
    let running = w.start_partition();

    // Refused for ten times give_up_ms: the batch is neither dropped nor acknowledged.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let call = tokio::time::timeout(WAIT, w.calls.recv())
            .await
            .expect("retried")
            .expect("comets alive");
        call.refuse();
    }
    assert_eq!(w.pending_ids(), vec![id]);
    assert_eq!(w.ctx.metrics.dropped_comet_unreachable.get(), 0);
    assert_eq!(w.ctx.metrics.acked.get(), 0);
    // Once the secrets match, the same batch is delivered and acknowledged.
    let call = tokio::time::timeout(WAIT, w.calls.recv())
        .await
        .expect("retried")
        .expect("comets alive");
    assert_eq!(call.seqs().len(), 1);
    call.confirm();
    let acked = w.streams.wait_until(|s| s.pending(P).is_empty());
    tokio::time::timeout(WAIT, acked).await.expect("acked");
    running.stop().await;
}

/// Runs the lease manager (which starts the partition once it holds the lease).
pub(super) fn start_leases(w: &World) -> (CancellationToken, JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(crate::lease::run(
        w.ctx.clone(),
        shutdown.clone(),
        TaskTracker::new(),
    ));
    (shutdown, task)
}

/// After the partition dropped an unconfirmed batch: nothing was acknowledged, and nothing newer
/// is read or delivered.
async fn assert_stopped_without_acking(w: &mut World, unconfirmed: &str) {
    assert_eq!(w.pending_ids(), vec![unconfirmed.to_owned()]);
    assert_eq!(w.ctx.metrics.acked.get(), 0);
    let newer = w.append("newer");
    assert!(
        tokio::time::timeout(Duration::from_secs(3), w.calls.recv())
            .await
            .is_err(),
        "no delivery after the lease was lost"
    );
    assert_eq!(w.pending_ids(), vec![unconfirmed.to_owned()]);
    assert!(w.streams.ids(P).contains(&newer));
    assert_eq!(w.ctx.metrics.partitions_held.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_stops_the_partition_without_acking_further_entries() {
    let mut w = world(config()).await;
    let (shutdown, manager) = start_leases(&w);
    let id = w.append("a");
    let mut call = w.next_call().await;
    assert_eq!(w.leases.holder(P).as_deref(), Some(WORKER));

    // Another worker holds the lease now (ours lapsed, as far as the store knows).
    w.leases.take_over(P, "w2", Duration::from_secs(60));
    // The next renewal finds it taken and drops the task with its in-flight delivery.
    tokio::time::timeout(WAIT, call.reply.closed())
        .await
        .expect("in-flight delivery dropped");
    assert_eq!(w.ctx.metrics.leases_lost.get(), 1);
    assert_stopped_without_acking(&mut w, &id).await;
    assert_eq!(
        w.leases.holder(P).as_deref(),
        Some("w2"),
        "not released by us"
    );

    shutdown.cancel();
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
    assert!(w.leases.workers().is_empty(), "left rim:jobs");
}

#[tokio::test(start_paused = true)]
async fn an_unconfirmable_lease_is_fenced_before_it_can_expire() {
    let mut w = world(config()).await;
    let (shutdown, manager) = start_leases(&w);
    let id = w.append("a");
    let mut call = w.next_call().await;

    // Redis unreachable: renewals fail, so the lease may lapse at ttl_ms after the last one.
    let down_at = Instant::now();
    w.leases.set_down(true);
    tokio::time::timeout(WAIT, call.reply.closed())
        .await
        .expect("in-flight delivery dropped");
    assert!(
        down_at.elapsed() < Duration::from_millis(1000),
        "stopped before the lease could expire: {:?}",
        down_at.elapsed()
    );
    assert_stopped_without_acking(&mut w, &id).await;

    shutdown.cancel();
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
}

/// Polls `cond` on the (paused) clock until it holds, failing after [`WAIT`].
pub(super) async fn until(what: &str, cond: impl Fn() -> bool) {
    let poll = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, poll)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// On a Redis Cluster the leases live on several masters: one that stops answering fences only
/// the partitions whose leases it holds, and the others keep theirs (renewals are independent).
#[tokio::test(start_paused = true)]
async fn a_hung_lease_fences_only_its_own_partition() {
    let mut cfg = config();
    cfg.stream.partitions = 2;
    let w = world(cfg).await;
    let m = &w.ctx.metrics;
    let (shutdown, manager) = start_leases(&w);
    until("both held", || m.partitions_held.get() == 2).await;

    // Partition 0's master hangs: its renewals never answer (renewed first, so a round that
    // waited on it would never renew partition 1).
    w.leases.set_silent(0, true);
    until("partition 0 fenced", || m.leases_lost.get() == 1).await;
    // Many lease TTLs later, partition 1 is still ours and was never fenced.
    tokio::time::sleep(Duration::from_millis(10 * w.ctx.cfg.lease.ttl_ms)).await;
    assert_eq!(m.leases_lost.get(), 1);
    assert_eq!(m.partitions_held.get(), 1);
    assert_eq!(w.leases.holder(1).as_deref(), Some(WORKER));

    // Back: partition 0 is taken again (its lease lapsed meanwhile).
    w.leases.set_silent(0, false);
    until("partition 0 held again", || m.partitions_held.get() == 2).await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, manager).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn entries_read_without_the_reply_arriving_are_replayed_before_newer_ones() {
    let mut w = world(config()).await;
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|m| w.append(m)).collect();
    // The first read takes a and b, but its reply never reaches the worker.
    w.streams.lose_next_read(P);
    let running = w.start_partition();

    w.confirm_next(&ids[..2], "pending a, b before newer c")
        .await;
    w.confirm_next(&ids[2..], "then c").await;
    w.all_acked().await;
    assert_eq!(w.ctx.metrics.redis_errors.get(), 1);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_workers_pending_entries_are_replayed_before_newer_ones() {
    let mut cfg = config();
    cfg.stream.batch_max = 8;
    let mut w = world(cfg).await;
    let old: Vec<String> = ["a", "b"].iter().map(|m| w.append(m)).collect();
    // A dead owner read a and b and never acknowledged them.
    assert_eq!(w.streams.read_as(P, "dead", 8), old);
    let newer = w.append("c");
    let running = w.start_partition();

    let first = w.next_call().await;
    assert_eq!(
        first.seqs(),
        seqs(&old),
        "replay: the dead owner's entries only"
    );
    assert!(
        w.streams.pending(P).iter().all(|(_, c)| c == WORKER),
        "claimed"
    );
    first.confirm();
    w.confirm_next(std::slice::from_ref(&newer), "then the newer entry")
        .await;
    w.all_acked().await;
    running.stop().await;
}
