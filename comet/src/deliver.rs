//! `CometRpc` served to job: delivers push batches to local sessions, in order, with the op
//! filter (system pushes bypass it), sender exclusion, per-partition duplicate suppression and
//! slow-consumer detection.
//!
//! Consecutive items of one `deliver` call addressed to the same room form a *run*. Each member
//! gets a run as ONE queue item (one op 9 WebSocket message, one JSON array, one TCP write), so a
//! burst of room messages costs each member one write instead of one per message. The run's
//! encodings are built once and shared by every member that takes all of it; a member that takes
//! only part (op filter, exclusion, already seen) gets its own subset, still as one item.
//!
//! Paced broadcasts (`All { speed > 0 }`) are confirmed at once and walked later, one at a time,
//! by a single paced worker per comet fed by a bounded queue. They take their own dedupe
//! namespace ([`MarkSpace::Paced`]): pushes delivered meanwhile on the same partition must not
//! make the walk refuse them as already seen. So paced broadcasts are ordered among themselves
//! but not relative to other pushes.

use std::sync::Arc;
use std::time::Duration;

use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::{CometRpc, DeliverReport, DeliverTarget, Delivery, PushId};
use tarpc::context::Context;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::outbound::{CloseSpec, Offer};
use crate::server::Ctx;
use crate::session::{MarkSpace, Session};
use crate::writer::{EncodedBatch, EncodedPush, Out};

/// The `CometRpc` implementation.
#[derive(Clone)]
pub(crate) struct CometServer {
    ctx: Arc<Ctx>,
}

impl CometServer {
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        CometServer { ctx }
    }
}

/// One push, encoded once, with what decides who gets it.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    id: PushId,
    push: Arc<EncodedPush>,
    exclude: Option<String>,
    space: MarkSpace,
}

impl Prepared {
    fn new(item: &Delivery) -> Self {
        Prepared {
            id: item.id,
            push: Arc::new(EncodedPush::new(item.op, &item.body)),
            exclude: item.exclude.clone(),
            space: MarkSpace::Immediate,
        }
    }

    /// Whether `s` has not had this push yet (and records it as had).
    fn mark(&self, s: &Session) -> bool {
        s.mark_in(self.space, self.id)
    }

    /// Whether `s` is addressed at all: not the excluded sender, and accepting the op (system
    /// pushes such as room events reach everyone addressed). Says nothing about duplicates.
    fn wanted_by(&self, s: &Session) -> bool {
        if self.exclude.as_deref() == Some(s.key.as_str()) {
            return false;
        }
        op::is_system_push(self.push.op) || s.accepts(self.push.op)
    }
}

/// Accounts for one offer of `n` pushes as one queue item.
fn account(metrics: &Metrics, s: &Session, res: Offer, n: usize, report: &mut DeliverReport) {
    match res {
        Offer::Queued => {
            report.queued += n as u64;
            metrics.pushes_delivered.add(n as u64);
        }
        Offer::Slow => {
            report.slow_closed += 1;
            tracing::warn!(key = %s.key, peer = %s.peer, "slow consumer closed during delivery");
        }
        Offer::Closed => {
            // Neither queued nor a slow close: the session was closing already (replaced, kicked,
            // timed out). DeliverReport has no field for it, so it is counted here.
            metrics.pushes_dropped_closing.add(n as u64);
            tracing::debug!(key = %s.key, pushes = n, "push dropped: session closing");
        }
    }
}

/// Offers one push to one session, updating the report.
fn offer(metrics: &Metrics, s: &Session, p: &Prepared, report: &mut DeliverReport) {
    if !p.wanted_by(s) {
        return;
    }
    if !p.mark(s) {
        report.duplicates += 1;
        metrics.duplicates.inc();
        return;
    }
    let res = s.out.offer(Out::Push(p.push.clone()), metrics);
    account(metrics, s, res, 1, report);
}

/// A run of at least two consecutive pushes to one room, and its shared batch.
pub(crate) struct Run {
    items: Vec<Prepared>,
    shared: Arc<EncodedBatch>,
}

impl Run {
    pub(crate) fn new(items: Vec<Prepared>) -> Self {
        let shared = Arc::new(EncodedBatch::new(
            items.iter().map(|p| p.push.clone()).collect(),
        ));
        Run { items, shared }
    }

    /// The queue item for member `s`, and how many pushes it carries (0 = nothing for it).
    /// Marks what it includes as delivered and counts duplicates.
    pub(crate) fn item_for(
        &self,
        s: &Session,
        metrics: &Metrics,
        report: &mut DeliverReport,
    ) -> Option<(Out, usize)> {
        let mut picked: Vec<usize> = Vec::with_capacity(self.items.len());
        for (i, p) in self.items.iter().enumerate() {
            if !p.wanted_by(s) {
                continue;
            }
            if !p.mark(s) {
                report.duplicates += 1;
                metrics.duplicates.inc();
                continue;
            }
            picked.push(i);
        }
        match picked.len() {
            0 => None,
            // The common case: everything, so the shared encodings.
            n if n == self.items.len() => Some((Out::Batch(self.shared.clone()), n)),
            1 => Some((Out::Push(self.items[picked[0]].push.clone()), 1)),
            n => {
                let own = picked.iter().map(|&i| self.items[i].push.clone()).collect();
                Some((Out::Batch(Arc::new(EncodedBatch::new(own))), n))
            }
        }
    }
}

/// Delivers a run to every member of `room`.
fn deliver_run(ctx: &Ctx, room: &RoomId, run: &Run, report: &mut DeliverReport) {
    for b in ctx.buckets.all() {
        b.for_each_in_room(room, |s| {
            if let Some((item, n)) = run.item_for(s, &ctx.metrics, report) {
                let res = s.out.offer(item, &ctx.metrics);
                account(&ctx.metrics, s, res, n, report);
            }
        });
    }
}

/// Splits `items` at each change of target: consecutive `Room` items for the same room stay
/// together, everything else stands alone. Order is kept.
fn group(items: Vec<Delivery>) -> Vec<Vec<Delivery>> {
    let mut groups: Vec<Vec<Delivery>> = Vec::new();
    for item in items {
        if let Some(last) = groups.last_mut()
            && let (Some(DeliverTarget::Room(a)), DeliverTarget::Room(b)) =
                (last.first().map(|d| &d.target), &item.target)
            && a == b
        {
            last.push(item);
            continue;
        }
        groups.push(vec![item]);
    }
    groups
}

/// Delivers `items` in order and reports what happened.
pub(crate) fn deliver_items(ctx: &Arc<Ctx>, items: Vec<Delivery>) -> DeliverReport {
    let mut report = DeliverReport::default();
    for g in group(items) {
        if g.len() > 1
            && let Some(DeliverTarget::Room(room)) = g.first().map(|d| &d.target)
        {
            let run = Run::new(g.iter().map(Prepared::new).collect());
            deliver_run(ctx, room, &run, &mut report);
            continue;
        }
        for item in g {
            deliver_one(ctx, item, &mut report);
        }
    }
    report
}

fn deliver_one(ctx: &Arc<Ctx>, item: Delivery, report: &mut DeliverReport) {
    // Encoded once here; every recipient shares these bytes.
    let p = Prepared::new(&item);
    let m = &ctx.metrics;
    match item.target {
        DeliverTarget::Keys(keys) => {
            for key in keys {
                if p.exclude.as_deref() == Some(key.as_str()) {
                    // Deliberately skipped: neither missing nor a duplicate.
                    continue;
                }
                match ctx.buckets.get(&key) {
                    Some(s) => offer(m, &s, &p, report),
                    None => report.missing += 1,
                }
            }
        }
        DeliverTarget::Room(room) => {
            for b in ctx.buckets.all() {
                b.for_each_in_room(&room, |s| offer(m, s, &p, report));
            }
        }
        DeliverTarget::All { speed: 0 } => {
            for b in ctx.buckets.all() {
                b.for_each(|s| offer(m, s, &p, report));
            }
        }
        DeliverTarget::All { speed } => {
            // Paced like goim: confirmed at once, delivered bucket by bucket by the paced worker.
            let job = PacedJob {
                p: Prepared {
                    space: MarkSpace::Paced,
                    ..p
                },
                speed,
            };
            match ctx.paced.try_send(job) {
                Ok(()) => {}
                Err(
                    mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job),
                ) => {
                    // Too many paced broadcasts waiting (or shutting down): deliver this one at
                    // once, in order with the pushes around it, so in their namespace.
                    m.paced_overflow.inc();
                    tracing::info!(id = ?job.p.id, "paced queue full, broadcasting unpaced");
                    let p = Prepared {
                        space: MarkSpace::Immediate,
                        ..job.p
                    };
                    for b in ctx.buckets.all() {
                        b.for_each(|s| offer(m, s, &p, report));
                    }
                }
            }
        }
        DeliverTarget::Kick { key, since_ms } => match ctx.buckets.get(&key) {
            // since 0 = logic no longer knew when the replaced session registered (its record
            // was re-created after Redis lost it): the key is all there is to go by.
            Some(s) if since_ms == 0 || s.since_ms == since_ms => {
                tracing::info!(%key, since_ms, "kicked: replaced by a session elsewhere");
                s.out.close(CloseSpec::reason("replaced", 1000));
            }
            Some(s) => {
                // A late kick for an older session: this one registered afterwards and stays.
                tracing::debug!(%key, since_ms, current = s.since_ms, "kick for an older session ignored");
                report.missing += 1;
            }
            None => report.missing += 1,
        },
    }
}

/// Paced broadcasts waiting for the paced worker; when full, a broadcast is delivered unpaced.
pub(crate) const PACED_QUEUE: usize = 16;

/// One paced broadcast for the paced worker.
pub(crate) struct PacedJob {
    p: Prepared,
    speed: u32,
}

/// Walks paced broadcasts one at a time, in the order they were delivered, at `speed` sessions
/// per second (bucket by bucket), until shutdown.
pub(crate) async fn paced_worker(ctx: Arc<Ctx>, mut rx: mpsc::Receiver<PacedJob>) {
    loop {
        let job = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            job = rx.recv() => match job {
                Some(job) => job,
                None => return,
            },
        };
        let PacedJob { p, speed } = job;
        let mut r = DeliverReport::default();
        for b in ctx.buckets.all() {
            if ctx.shutdown.is_cancelled() {
                return;
            }
            let n = b.len();
            b.for_each(|s| offer(&ctx.metrics, s, &p, &mut r));
            if n > 0 {
                let pause = Duration::from_secs_f64(n as f64 / f64::from(speed.max(1)));
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
        tracing::debug!(
            id = ?p.id,
            queued = r.queued,
            duplicates = r.duplicates,
            "paced broadcast done"
        );
    }
}

impl CometRpc for CometServer {
    async fn deliver(self, _: Context, items: Vec<Delivery>) -> DeliverReport {
        deliver_items(&self.ctx, items)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;

    use crate::outbound::Outbound;

    fn sess(key: &str, accepts: &[i32]) -> Arc<Session> {
        let out = Outbound::new(16);
        let s = Session::new(
            1,
            7,
            key.into(),
            "127.0.0.1:1".parse().unwrap(),
            out,
            accepts,
        );
        Arc::new(s)
    }

    fn item(seq: u64, op: i32, room: &RoomId, exclude: Option<&str>) -> Delivery {
        Delivery {
            id: PushId {
                partition: 0,
                ms: 1,
                seq,
            },
            op,
            body: Bytes::from(format!("b{seq}")),
            target: DeliverTarget::Room(room.clone()),
            exclude: exclude.map(str::to_string),
        }
    }

    #[test]
    fn runs_group_consecutive_items_of_one_room() {
        let r1 = RoomId::parse("live://1").unwrap();
        let r2 = RoomId::parse("live://2").unwrap();
        let mut keys = item(9, 1000, &r1, None);
        keys.target = DeliverTarget::Keys(vec!["a".into()]);
        let items = vec![
            item(1, 1000, &r1, None),
            item(2, 1000, &r1, None),
            item(3, 1000, &r2, None),
            keys,
            item(4, 1000, &r1, None),
            item(5, 1000, &r1, None),
        ];
        let sizes: Vec<usize> = group(items).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 1, 1, 2]);
    }

    #[test]
    fn full_members_share_one_batch_and_partial_members_get_their_subset() {
        let room = RoomId::parse("live://1").unwrap();
        let items = [
            item(1, 1000, &room, None),
            item(2, 1001, &room, None),
            item(3, 1000, &room, Some("c")),
            item(4, op::ROOM_EVENT, &room, None),
        ];
        let run = Run::new(items.iter().map(Prepared::new).collect());
        let m = Metrics::default();
        let mut rep = DeliverReport::default();
        let a = sess("a", &[1000, 1001]);
        let b = sess("b", &[1000, 1001]);
        let c = sess("c", &[1000]);

        let (ia, na) = run.item_for(&a, &m, &mut rep).unwrap();
        let (ib, nb) = run.item_for(&b, &m, &mut rep).unwrap();
        let (Out::Batch(ba), Out::Batch(bb)) = (&ia, &ib) else {
            panic!("expected batches")
        };
        assert_eq!((na, nb), (4, 4));
        assert!(Arc::ptr_eq(ba, bb), "full members share one encoding");
        assert_eq!(ba.ws().as_ptr(), bb.ws().as_ptr());

        // c: op 1001 filtered, item 3 excluded, op 18 (system) kept despite accepts.
        let (ic, nc) = run.item_for(&c, &m, &mut rep).unwrap();
        let Out::Batch(bc) = &ic else {
            panic!("expected a batch")
        };
        assert_eq!(nc, 2);
        assert!(!Arc::ptr_eq(ba, bc));
        let ops: Vec<i32> = bc.pushes().iter().map(|p| p.op).collect();
        assert_eq!(ops, vec![1000, op::ROOM_EVENT]);

        // Seen already: nothing, counted as duplicates.
        assert!(run.item_for(&a, &m, &mut rep).is_none());
        assert_eq!(rep.duplicates, 4);
        assert_eq!(m.duplicates.get(), 4);
    }

    #[test]
    fn pushes_to_a_closing_session_are_counted_as_dropped() {
        let room = RoomId::parse("live://1").unwrap();
        let a = sess("a", &[1000]);
        a.out.close(CloseSpec::reason("replaced", 1000));
        let m = Metrics::default();
        let mut rep = DeliverReport::default();
        offer(
            &m,
            &a,
            &Prepared::new(&item(1, 1000, &room, None)),
            &mut rep,
        );
        assert_eq!((rep.queued, rep.slow_closed), (0, 0));
        assert_eq!(m.pushes_dropped_closing.get(), 1);
        assert!(
            m.render()
                .contains(r#"rim_comet_pushes_dropped_total{reason="closing"} 1"#)
        );
    }

    #[test]
    fn partial_dedupe_gives_a_single_push() {
        let room = RoomId::parse("live://1").unwrap();
        let items = [item(1, 1000, &room, None), item(2, 1000, &room, None)];
        let run = Run::new(items.iter().map(Prepared::new).collect());
        let a = sess("a", &[1000]);
        assert!(a.mark(items[0].id));
        let m = Metrics::default();
        let mut rep = DeliverReport::default();
        let (it, n) = run.item_for(&a, &m, &mut rep).unwrap();
        assert_eq!(n, 1);
        assert!(matches!(it, Out::Push(p) if p.body() == b"b2"));
        assert_eq!(rep.duplicates, 1);
    }
}
