//! A session catching up on histories: asking logic for what it missed (offline messages at
//! connect, Auth's `recover`, a JoinRoom asking to recover) and turning it, merged with the live
//! pushes held meanwhile (see `catch_up`), into queue items for the caller to queue after its
//! reply.

use std::sync::Arc;

use rim_proto::history::{HistoryId, HistoryWant, Recover, Source, parse_after};
use rim_proto::msg::Recovered;
use rim_proto::room::RoomId;

use crate::ctx::Ctx;
use crate::push::account;
use crate::session::Session;
use crate::writer::{EncodedBatch, Out};

/// Most messages one catch-up asks of a history (logic sends at most a whole history, which
/// it keeps at most 1000 of).
const CATCH_UP_LIMIT: u32 = 1_000;

/// Catches `session` up on `wants` (each begun with [`Session::begin_catch_up`]): reads them
/// from logic and returns, per want, whether the session got everything (`false` also when
/// logic could not be asked), and the queue items: per history one item holding its messages
/// then the live pushes held meanwhile (the caller queues them after its reply).
pub(crate) async fn catch_up(
    ctx: &Ctx,
    session: &Arc<Session>,
    wants: Vec<(Source, Option<HistoryId>)>,
) -> (Vec<bool>, Vec<Out>) {
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
    let mut items = Vec::new();
    for ((source, after), page) in wants.iter().zip(pages) {
        complete.push(page.as_ref().is_some_and(|p| p.complete));
        // An unknown partition count (an older logic) matches nothing: only the held pushes.
        let (partition, page) = match ctx.history_partition(source, session.mid) {
            Some(p) => (p, page),
            None => (0, None),
        };
        let (pushes, from_history) = session.finish_catch_up(source, partition, *after, page);
        ctx.metrics.caught_up.add(from_history as u64);
        // One item per history: a catch-up must not overflow the queue a message at a time.
        match pushes.as_slice() {
            [] => {}
            [one] => items.push(Out::push(one.clone(), session.tagged)),
            _ => {
                let batch = Arc::new(EncodedBatch::new(pushes));
                items.push(Out::batch(batch, session.tagged));
            }
        }
    }
    (complete, items)
}

/// Queues catch-up items (after the caller's reply), counting them as delivered pushes.
pub(crate) fn queue(ctx: &Ctx, session: &Session, items: Vec<Out>) {
    for item in items {
        let n = match &item {
            Out::Batch(b) | Out::TaggedBatch(b) => b.len(),
            _ => 1,
        };
        let res = session.out.offer(item, &ctx.metrics);
        let mut report = rim_proto::rpc::DeliverReport::default();
        account(&ctx.metrics, session, res, n, &mut report);
    }
}

/// Auth's `recover`, checked: the user's position (`Some(None)`: none seen yet) and each room's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Resume {
    pub(crate) user: Option<Option<HistoryId>>,
    pub(crate) rooms: Vec<(RoomId, Option<HistoryId>)>,
}

impl Resume {
    /// Parses Auth's `recover`; the error names the bad entry.
    pub(crate) fn parse(r: &Recover) -> Result<Resume, String> {
        let user = r
            .user
            .as_deref()
            .map(parse_after)
            .transpose()
            .map_err(|e| format!("recover.user: {e}"))?;
        let mut rooms = Vec::with_capacity(r.rooms.len());
        for (room, after) in &r.rooms {
            let id = RoomId::parse(room).map_err(|e| format!("recover.rooms: {e}"))?;
            let after = parse_after(after).map_err(|e| format!("recover.rooms[{room}]: {e}"))?;
            rooms.push((id, after));
        }
        Ok(Resume { user, rooms })
    }

    /// What the session catches up on at Auth: the user's history from the client's position,
    /// or else from the device's when messages wait for it (`offline`), and each room it asked
    /// for that it is in.
    pub(crate) fn wants(
        resume: Option<&Resume>,
        offline: Option<HistoryId>,
        rooms: &[RoomId],
    ) -> Vec<(Source, Option<HistoryId>)> {
        let mut wants = Vec::new();
        match resume.and_then(|r| r.user) {
            Some(after) => wants.push((Source::User, after)),
            None => wants.extend(offline.map(|after| (Source::User, Some(after)))),
        }
        for (room, after) in resume.map(|r| r.rooms.as_slice()).unwrap_or_default() {
            if rooms.contains(room) {
                wants.push((Source::Room(room.clone()), *after));
            }
        }
        wants
    }

    /// The AuthReply's `recovered`: per history the client named, whether it got everything
    /// (a room it is not in: false).
    pub(crate) fn recovered(
        &self,
        wants: &[(Source, Option<HistoryId>)],
        complete: &[bool],
    ) -> Recovered {
        let done = |s: &Source| {
            wants
                .iter()
                .zip(complete)
                .find(|((w, _), _)| w == s)
                .is_some_and(|(_, c)| *c)
        };
        Recovered {
            user: self.user.map(|_| done(&Source::User)),
            rooms: self
                .rooms
                .iter()
                .map(|(room, _)| (room.to_string(), done(&Source::Room(room.clone()))))
                .collect(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn auth_recover_names_what_to_catch_up_and_reports_each() {
        let r = Recover {
            user: Some("5-1".into()),
            rooms: [
                ("chat://a".to_string(), "".to_string()),
                ("chat://b".to_string(), "7-0".to_string()),
            ]
            .into(),
        };
        let resume = Resume::parse(&r).unwrap();
        let a = RoomId::parse("chat://a").unwrap();
        let wants = Resume::wants(
            Some(&resume),
            Some(HistoryId::default()),
            std::slice::from_ref(&a),
        );
        // The client's position wins over the device's; chat://b is not joined.
        assert_eq!(
            wants,
            vec![
                (Source::User, Some(HistoryId { ms: 5, seq: 1 })),
                (Source::Room(a), None)
            ]
        );
        let rec = resume.recovered(&wants, &[true, false]);
        assert_eq!(rec.user, Some(true));
        assert!(!rec.rooms["chat://a"]);
        assert!(!rec.rooms["chat://b"]);
        // Without recover: offline messages only, nothing reported.
        let wants = Resume::wants(None, Some(HistoryId::default()), &[]);
        assert_eq!(wants, vec![(Source::User, Some(HistoryId::default()))]);
        let bad = Recover {
            user: Some("x".into()),
            ..Recover::default()
        };
        assert!(Resume::parse(&bad).unwrap_err().starts_with("recover.user"));
    }
}
