//! `CometRpc` served to job: delivers push batches to local sessions, in order, with the op
//! filter, per-partition duplicate suppression and slow-consumer detection.

use std::sync::Arc;
use std::time::Duration;

use rim_proto::rpc::{CometRpc, DeliverReport, DeliverTarget, Delivery, PushId};
use tarpc::context::Context;

use crate::server::Ctx;
use crate::session::{CloseSpec, Offer, Session};
use crate::writer::{EncodedPush, Out};

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

/// Offers one push to one session, updating the report.
fn offer(ctx: &Ctx, s: &Session, id: PushId, push: &Arc<EncodedPush>, report: &mut DeliverReport) {
    if !s.accepts(push.op) {
        return;
    }
    if !s.mark(id) {
        report.duplicates += 1;
        ctx.metrics.duplicates.inc();
        return;
    }
    match s.out.offer(Out::Push(push.clone()), &ctx.metrics) {
        Offer::Queued => {
            report.queued += 1;
            ctx.metrics.pushes_delivered.inc();
        }
        Offer::Slow => {
            report.slow_closed += 1;
            tracing::warn!(key = %s.key, peer = %s.peer, "slow consumer closed during delivery");
        }
        Offer::Closed => {}
    }
}

/// Delivers `items` in order and reports what happened.
pub(crate) fn deliver_items(ctx: &Arc<Ctx>, items: Vec<Delivery>) -> DeliverReport {
    let mut report = DeliverReport::default();
    for item in items {
        // Encoded once here; every recipient shares these bytes.
        let push = Arc::new(EncodedPush::new(item.op, &item.body));
        match item.target {
            DeliverTarget::Keys(keys) => {
                for key in keys {
                    match ctx.buckets.get(&key) {
                        Some(s) => offer(ctx, &s, item.id, &push, &mut report),
                        None => report.missing += 1,
                    }
                }
            }
            DeliverTarget::Room(room) => {
                for b in ctx.buckets.all() {
                    b.for_each_in_room(&room, |s| offer(ctx, s, item.id, &push, &mut report));
                }
            }
            DeliverTarget::All { speed: 0 } => {
                for b in ctx.buckets.all() {
                    b.for_each(|s| offer(ctx, s, item.id, &push, &mut report));
                }
            }
            DeliverTarget::All { speed } => {
                // Paced like goim: confirmed at once, delivered bucket by bucket in the background.
                let c = ctx.clone();
                let id = item.id;
                ctx.tracker.spawn(async move {
                    let mut r = DeliverReport::default();
                    for b in c.buckets.all() {
                        if c.shutdown.is_cancelled() {
                            break;
                        }
                        let n = b.len();
                        b.for_each(|s| offer(&c, s, id, &push, &mut r));
                        if n > 0 {
                            let pause = Duration::from_secs_f64(n as f64 / f64::from(speed));
                            tokio::select! {
                                _ = c.shutdown.cancelled() => break,
                                _ = tokio::time::sleep(pause) => {}
                            }
                        }
                    }
                    tracing::debug!(
                        ?id,
                        queued = r.queued,
                        duplicates = r.duplicates,
                        "paced broadcast done"
                    );
                });
            }
            DeliverTarget::Kick(keys) => {
                for key in keys {
                    match ctx.buckets.get(&key) {
                        Some(s) => {
                            tracing::info!(%key, "kicked: replaced by a session elsewhere");
                            s.out.close(CloseSpec::reason("replaced", 1000));
                        }
                        None => report.missing += 1,
                    }
                }
            }
        }
    }
    report
}

impl CometRpc for CometServer {
    async fn deliver(self, _: Context, items: Vec<Delivery>) -> DeliverReport {
        deliver_items(&self.ctx, items)
    }
}
