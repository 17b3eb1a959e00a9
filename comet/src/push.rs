//! One push encoded once and offered to sessions: who it is for (op filter, system pushes,
//! sender exclusion), duplicate suppression against the session's marks, and the accounting of
//! each offer in the `DeliverReport`. A run of room pushes ([`Run`]) goes to each member as one
//! queue item whose encodings are shared by every member that takes all of it.
//!
//! Kept apart from `deliver` (the `CometRpc` and the paced worker) so that the shared state
//! (`ctx`) can name the paced queue's item without importing the code that runs on that state.

use std::sync::Arc;

use rim_proto::history::Source;
use rim_proto::op;
use rim_proto::rpc::{DeliverReport, DeliverTarget, Delivery, PushId};

use crate::catch_up::Admit;
use crate::metrics::Metrics;
use crate::outbound::Offer;
use crate::session::{MarkSpace, Session};
use crate::writer::{EncodedBatch, EncodedPush, Out};

/// One push, encoded once, with what decides who gets it.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) id: PushId,
    push: Arc<EncodedPush>,
    pub(crate) exclude: Option<String>,
    space: MarkSpace,
    /// The history that recorded it: its room's, or its recipients' own (session pushes).
    source: Option<Source>,
}

impl Prepared {
    pub(crate) fn new(item: &Delivery) -> Self {
        let source = match (&item.target, item.recorded) {
            (DeliverTarget::Room(room), true) => Some(Source::Room(room.clone())),
            (DeliverTarget::Keys(_), true) => Some(Source::User),
            _ => None,
        };
        let mut push = EncodedPush::new(item.op, &item.body);
        if let Some(source) = &source {
            push = push.with_tag(item.id.history_id(), source.clone());
        }
        Prepared {
            id: item.id,
            push: Arc::new(push),
            exclude: item.exclude.clone(),
            space: MarkSpace::Immediate,
            source,
        }
    }

    /// The same push, checked against the marks of `space`.
    pub(crate) fn in_space(self, space: MarkSpace) -> Self {
        Prepared { space, ..self }
    }

    /// Whether `s` gets this push now: addressed, and not had yet (recorded as had from here
    /// on). A push it already had is counted as a duplicate; one held for after a catch-up of
    /// its history is counted as queued (it goes out with the catch-up).
    fn take_for(&self, s: &Session, metrics: &Metrics, report: &mut DeliverReport) -> bool {
        if !self.wanted_by(s) {
            return false;
        }
        match s.admit(self.space, self.id, self.source.as_ref(), &self.push) {
            Admit::Fresh => true,
            Admit::Duplicate => {
                report.duplicates += 1;
                metrics.duplicates.inc();
                false
            }
            Admit::Held => {
                report.queued += 1;
                false
            }
        }
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
pub(crate) fn account(
    metrics: &Metrics,
    s: &Session,
    res: Offer,
    n: usize,
    report: &mut DeliverReport,
) {
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
pub(crate) fn offer(metrics: &Metrics, s: &Session, p: &Prepared, report: &mut DeliverReport) {
    if !p.take_for(s, metrics, report) {
        return;
    }
    let res = s.out.offer(Out::push(p.push.clone(), s.tagged), metrics);
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
            if p.take_for(s, metrics, report) {
                picked.push(i);
            }
        }
        match picked.len() {
            0 => None,
            // The common case: everything, so the shared encodings.
            n if n == self.items.len() => Some((Out::batch(self.shared.clone(), s.tagged), n)),
            1 => Some((Out::push(self.items[picked[0]].push.clone(), s.tagged), 1)),
            n => {
                let own = picked.iter().map(|&i| self.items[i].push.clone()).collect();
                Some((Out::batch(Arc::new(EncodedBatch::new(own)), s.tagged), n))
            }
        }
    }
}

/// One paced broadcast for the paced worker (see `deliver`).
pub(crate) struct PacedJob {
    pub(crate) p: Prepared,
    pub(crate) speed: u32,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;
    use rim_proto::room::RoomId;

    use crate::outbound::CloseSpec;
    use crate::testing::session;
    pub(crate) fn item(seq: u64, op: i32, room: &RoomId, exclude: Option<&str>) -> Delivery {
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
            recorded: false,
        }
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
        let a = session(1, "a", &[1000, 1001]);
        let b = session(1, "b", &[1000, 1001]);
        let c = session(1, "c", &[1000]);

        let (ia, na) = run.item_for(&a, &m, &mut rep).unwrap();
        let (ib, nb) = run.item_for(&b, &m, &mut rep).unwrap();
        let (Out::Batch(ba), Out::Batch(bb)) = (&ia, &ib) else {
            panic!("expected batches")
        };
        assert_eq!((na, nb), (4, 4));
        assert!(Arc::ptr_eq(ba, bb), "full members share one encoding");
        assert_eq!(ba.ws().as_ptr(), bb.ws().as_ptr());

        // c: op 1001 filtered, item 3 excluded, op 24 (system) kept despite accepts.
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
        let a = session(1, "a", &[1000]);
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
        let a = session(1, "a", &[1000]);
        assert!(a.mark(items[0].id));
        let m = Metrics::default();
        let mut rep = DeliverReport::default();
        let (it, n) = run.item_for(&a, &m, &mut rep).unwrap();
        assert_eq!(n, 1);
        assert!(matches!(it, Out::Push(p) if p.body() == b"b2"));
        assert_eq!(rep.duplicates, 1);
    }
}
