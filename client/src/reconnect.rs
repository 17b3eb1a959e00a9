//! When a [`crate::Client`] tries again: exponential backoff with jitter, so the sessions of a
//! comet that restarts do not all come back in the same millisecond.

use std::time::Duration;

/// Reconnect policy: attempt `n` (0-based) waits a random time in `[d/2, d]` where
/// `d = min(initial * 2^n, max)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Cap on the delay.
    pub max: Duration,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(20),
            max_attempts: None,
        }
    }
}

impl Reconnect {
    /// Never reconnect: the first loss stops the client.
    pub fn never() -> Self {
        Reconnect {
            max_attempts: Some(0),
            ..Reconnect::default()
        }
    }

    /// Delay before attempt `attempt`, or `None` when the policy gives up.
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        if self.max_attempts.is_some_and(|m| attempt >= m) {
            return None;
        }
        let cap = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let half = cap / 2;
        Some(half + cap.saturating_sub(half).mul_f64(rand::random::<f64>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_and_cap() {
        let r = Reconnect {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            max_attempts: Some(6),
        };
        for (attempt, cap) in [(0, 100), (1, 200), (2, 400), (3, 800), (4, 1000), (5, 1000)] {
            let d = r.delay(attempt).unwrap();
            let cap = Duration::from_millis(cap);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        assert_eq!(r.delay(6), None, "gives up after max_attempts");
        assert_eq!(Reconnect::never().delay(0), None);
        assert!(Reconnect::default().delay(u32::MAX).unwrap() <= Duration::from_secs(20));
    }
}
