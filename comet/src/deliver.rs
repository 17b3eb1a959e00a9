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

use rim_proto::room::RoomId;
use rim_proto::rpc::{CometRpc, DeliverReport, DeliverTarget, Delivery};
use tarpc::context::Context;
use tokio::sync::mpsc;

use crate::ctx::Ctx;
use crate::outbound::CloseSpec;
use crate::push::{PacedJob, Prepared, Run, account, offer};
use crate::session::MarkSpace;

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
                p: p.in_space(MarkSpace::Paced),
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
                    let p = job.p.in_space(MarkSpace::Immediate);
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
    use crate::push::tests::item;

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
}
