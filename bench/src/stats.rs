//! Delivery accounting per member (lost, duplicated, out of order, causally out of order) and a
//! log-bucket latency histogram (±0.5%), both mergeable across tasks.

use serde::Serialize;

use crate::payload::Payload;

/// Latency histogram: bucket `i` holds values in `[1.01^i, 1.01^(i+1))` µs.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

const GROWTH: f64 = 1.01;
/// Up to ~10^9 µs (16 minutes).
const BUCKETS: usize = 2100;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; BUCKETS],
            count: 0,
            max: 0,
        }
    }
}

impl Histogram {
    /// Records one value in µs.
    pub fn record(&mut self, us: u64) {
        let i = if us <= 1 {
            0
        } else {
            ((us as f64).ln() / GROWTH.ln()) as usize
        };
        self.buckets[i.min(BUCKETS - 1)] += 1;
        self.count += 1;
        self.max = self.max.max(us);
    }

    /// Adds `other`'s samples.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile (0..=1) in ms, at the middle of its bucket; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let mid = GROWTH.powf(i as f64 + 0.5);
                return (mid.min(self.max as f64)) / 1000.0;
            }
        }
        self.max as f64 / 1000.0
    }

    /// Largest value in ms.
    pub fn max_ms(&self) -> f64 {
        self.max as f64 / 1000.0
    }
}

/// What one member received.
#[derive(Debug, Clone, Default)]
pub struct MemberLog {
    seen: Vec<u64>,
    /// Unique pushes received.
    pub unique: u64,
    /// Pushes received again.
    pub dup: u64,
    /// Received after a higher seq (expected when pushes are concurrent).
    pub ooo_raw: u64,
    /// Received after a push sent only once this one had been answered: a real order violation.
    pub ooo_causal: u64,
    /// Payloads addressed to someone else.
    pub misdelivered: u64,
    /// Pushes that were not rim-bench payloads.
    pub foreign: u64,
    max_seq: Option<u64>,
    max_wm: Option<u64>,
}

impl MemberLog {
    /// Whether push `seq` was received.
    pub fn has(&self, seq: u64) -> bool {
        self.seen
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// Records one push body received by a member whose mid is `mid` (0: a room member).
    pub fn record(&mut self, body: &[u8], mid: i64, now_us: u64, lat: &mut Histogram) {
        let Some(p) = Payload::decode(body) else {
            self.foreign += 1;
            return;
        };
        if p.target != 0 && p.target != mid {
            self.misdelivered += 1;
            return;
        }
        let (word, bit) = ((p.seq / 64) as usize, p.seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.dup += 1;
            return;
        }
        self.seen[word] |= 1 << bit;
        self.unique += 1;
        lat.record(now_us.saturating_sub(p.t_us));
        if self.max_seq.is_some_and(|m| p.seq < m) {
            self.ooo_raw += 1;
        }
        if self.max_wm.is_some_and(|w| p.seq <= w) {
            self.ooo_causal += 1;
        }
        self.max_seq = Some(self.max_seq.map_or(p.seq, |m| m.max(p.seq)));
        if p.wm != u64::MAX {
            self.max_wm = Some(self.max_wm.map_or(p.wm, |w| w.max(p.wm)));
        }
    }
}

/// Sums over members.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Unique deliveries.
    pub unique: u64,
    /// Expected minus unique, per member, summed.
    pub lost: u64,
    /// Duplicates.
    pub dup: u64,
    /// Raw out of order.
    pub ooo_raw: u64,
    /// Causally out of order.
    pub ooo_causal: u64,
    /// Addressed to someone else.
    pub misdelivered: u64,
}

impl Totals {
    /// Adds a member that was owed the pushes `owed` yields (seqs).
    pub fn add(&mut self, m: &MemberLog, owed: impl IntoIterator<Item = u64>) {
        self.unique += m.unique;
        self.lost += owed.into_iter().filter(|s| !m.has(*s)).count() as u64;
        self.dup += m.dup;
        self.ooo_raw += m.ooo_raw;
        self.ooo_causal += m.ooo_causal;
        self.misdelivered += m.misdelivered;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(seq: u64, wm: u64, target: i64) -> Vec<u8> {
        Payload {
            seq,
            wm,
            t_us: 0,
            target,
        }
        .encode(32)
    }

    #[test]
    fn counts_dups_order_and_misdelivery() {
        let mut m = MemberLog::default();
        let mut h = Histogram::default();
        m.record(&body(1, u64::MAX, 0), 0, 1000, &mut h);
        m.record(&body(3, 1, 0), 0, 1000, &mut h);
        m.record(&body(2, u64::MAX, 0), 0, 1000, &mut h); // raw ooo, not causal (wm 1 < 2)
        m.record(&body(0, u64::MAX, 0), 0, 1000, &mut h); // raw and causal (0 <= wm 1)
        m.record(&body(3, 1, 0), 0, 1000, &mut h);
        m.record(&body(5, 1, 9), 7, 1000, &mut h);
        m.record(b"hello", 0, 1000, &mut h);
        assert_eq!((m.unique, m.dup, m.ooo_raw, m.ooo_causal), (4, 1, 2, 1));
        assert_eq!((m.misdelivered, m.foreign), (1, 1));
        let mut t = Totals::default();
        t.add(&m, 0..6);
        assert_eq!(t.lost, 2, "4 and 5 never arrived");
        assert!(m.has(3) && !m.has(4));
    }

    #[test]
    fn quantiles_are_within_a_percent() {
        let mut h = Histogram::default();
        for us in 1..=10_000u64 {
            h.record(us);
        }
        let p50 = h.quantile_ms(0.5);
        assert!((p50 - 5.0).abs() / 5.0 < 0.01, "{p50}");
        let p99 = h.quantile_ms(0.99);
        assert!((p99 - 9.9).abs() / 9.9 < 0.01, "{p99}");
        assert_eq!(h.max_ms(), 10.0);
        let mut g = Histogram::default();
        g.merge(&h);
        assert_eq!(g.count(), 10_000);
    }
}
