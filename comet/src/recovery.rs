//! A session catching up on histories: asking logic for what it missed (offline messages at
//! connect) and queueing it, merged with the live pushes held meanwhile (see `catch_up`).

use std::sync::Arc;

use rim_proto::history::{HistoryId, HistoryWant, Source};

use crate::ctx::Ctx;
use crate::push::account;
use crate::session::Session;
use crate::writer::{EncodedBatch, Out};

/// Most messages one catch-up asks of a history (logic sends at most a whole history, which
/// it keeps at most 1000 of).
const CATCH_UP_LIMIT: u32 = 1_000;

/// Catches `session` up on `wants` (each begun with [`Session::begin_catch_up`]): reads them
/// from logic and queues, per history, its messages then the live pushes held meanwhile, as one
/// queue item. Returns, per want, whether the session got everything (`false` also when logic
/// could not be asked).
pub(crate) async fn catch_up(
    ctx: &Ctx,
    session: &Arc<Session>,
    wants: Vec<(Source, Option<HistoryId>)>,
) -> Vec<bool> {
    let asked: Vec<HistoryWant> = wants
        .iter()
        .map(|(source, after)| HistoryWant {
            source: source.clone(),
            after: *after,
            limit: CATCH_UP_LIMIT,
        })
        .collect();
    let sref = session.session_ref(&ctx.cfg.server_id);
    let pages = match ctx.logic.history(sref, asked).await {
        Ok(pages) if pages.len() == wants.len() => pages.into_iter().map(Some).collect(),
        Ok(pages) => {
            tracing::warn!(key = %session.key, asked = wants.len(), got = pages.len(), "catch-up: logic answered a different number of histories");
            vec![None; wants.len()]
        }
        Err(e) => {
            ctx.metrics.catch_up_failed.inc();
            tracing::warn!(key = %session.key, error = %e, "catch-up: history not read");
            vec![None; wants.len()]
        }
    };
    let mut complete = Vec::with_capacity(wants.len());
    for ((source, _), page) in wants.iter().zip(pages) {
        complete.push(page.as_ref().is_some_and(|p| p.complete));
        let Some(partition) = ctx.history_partition(source, session.mid) else {
            // Unknown partition count (an older logic): nothing can be matched, so nothing held.
            let (held, _) = session.finish_catch_up(source, 0, None);
            queue(ctx, session, held);
            continue;
        };
        let (items, from_history) = session.finish_catch_up(source, partition, page);
        ctx.metrics.caught_up.add(from_history as u64);
        queue(ctx, session, items);
    }
    complete
}

/// Queues `pushes` as one item (a catch-up must not overflow the queue one message at a time).
fn queue(ctx: &Ctx, session: &Session, pushes: Vec<Arc<crate::writer::EncodedPush>>) {
    let n = pushes.len();
    let item = match pushes.as_slice() {
        [] => return,
        [one] => Out::Push(one.clone()),
        _ => Out::Batch(Arc::new(EncodedBatch::new(pushes))),
    };
    let res = session.out.offer(item, &ctx.metrics);
    let mut report = rim_proto::rpc::DeliverReport::default();
    account(&ctx.metrics, session, res, n, &mut report);
}
