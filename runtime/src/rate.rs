//! A token bucket, the one rate limiter of rim: a comet session's requests, the comet's
//! per-address auth rate and logic's push API rate use it.

use std::time::Duration;

// The runtime's clock, so tests can pause it; the same as `std`'s when not paused.
use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, holding at most `burst`; one token per message.
/// Rate and burst are kept as the configured integers (8 bytes, not 16): every session holds one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u32,
    burst: u32,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket (a new session may send a burst at once).
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = burst.max(1);
        TokenBucket {
            rate: rate_per_sec,
            burst,
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes a token if one is there.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * f64::from(self.rate)).min(f64::from(self.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now` (an idle entry that can be forgotten: a new
    /// bucket would behave the same).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * f64::from(self.rate) >= f64::from(self.burst)
    }

    /// How long until the next token (for the refusal message).
    pub fn wait(&self) -> Duration {
        if self.rate == 0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64(((1.0 - self.tokens).max(0.0)) / f64::from(self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, 3, t0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0), "burst used up");
        assert!(b.wait() > Duration::ZERO);
        assert!(!b.try_take(t0 + Duration::from_millis(400)));
        assert!(
            b.try_take(t0 + Duration::from_millis(500)),
            "refilled at 2/s"
        );
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
    }
}
