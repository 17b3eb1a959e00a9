//! The most recent refusals this logic instance made, for the operator page: HTTP requests
//! answered with an error, sessions refused at Auth, upstream messages refused. A bounded ring
//! (the oldest drops out); the counters in `metrics` keep the totals.

use std::collections::VecDeque;

use parking_lot::Mutex;
use serde::Serialize;

/// How many refusals are kept.
pub const KEPT: usize = 50;
/// Longest reason or detail kept (longer ones are cut, on a character boundary).
const MAX_TEXT: usize = 200;

/// One refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// When (unix ms).
    pub at_ms: u64,
    /// What was refused: `http`, `auth`, `message`.
    pub kind: &'static str,
    /// Why, as the refused party was told.
    pub reason: String,
    /// Which request: method and path, the user, the room.
    pub detail: String,
}

/// The ring of recent refusals.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<VecDeque<Refusal>>);

fn cut(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl Refusals {
    /// Records a refusal now.
    pub fn record(&self, kind: &'static str, reason: impl Into<String>, detail: impl Into<String>) {
        let r = Refusal {
            at_ms: rim_runtime::unix_ms(),
            kind,
            reason: cut(reason.into()),
            detail: cut(detail.into()),
        };
        let mut ring = self.0.lock();
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(r);
    }

    /// The kept refusals, newest first.
    pub fn recent(&self) -> Vec<Refusal> {
        self.0.lock().iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_first_and_bounds_count_and_text() {
        let r = Refusals::default();
        for i in 0..KEPT + 5 {
            r.record("http", format!("reason {i}"), "POST /goim/push/mids");
        }
        let recent = r.recent();
        assert_eq!(recent.len(), KEPT);
        assert_eq!(recent[0].reason, format!("reason {}", KEPT + 4));
        assert_eq!(recent[KEPT - 1].reason, "reason 5");
        r.record("auth", "é".repeat(150), "");
        let long = &r.recent()[0].reason;
        assert!(long.len() <= MAX_TEXT + '…'.len_utf8() && long.ends_with('…'));
    }
}
