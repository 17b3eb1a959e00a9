//! Exponential backoff: Redis reconnects in every tier, comet delivery retries in job.

use std::time::Duration;

/// Delay before retry number `attempt` (0-based): `base * 2^attempt`, capped at `max`.
pub fn delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    // Shifting past 31 would overflow; by then the cap applies anyway.
    let factor = 1u32 << attempt.min(20);
    base.saturating_mul(factor).min(max)
}

/// Retry state for one operation.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay, advancing the attempt count.
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.base, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Back to `base` after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(50), ms(2000));
        let seq: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_eq!(
            seq,
            vec![
                ms(50),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(2000),
                ms(2000)
            ]
        );
        b.reset();
        assert_eq!(b.next_delay(), ms(50));
        assert_eq!(delay(ms(50), ms(2000), u32::MAX), ms(2000));
    }
}
