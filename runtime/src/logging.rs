//! `tracing` setup: human-readable or JSON lines on stderr, filtered by `RUST_LOG` or the config.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is an `EnvFilter` directive used when `RUST_LOG` is unset.
/// Safe to call more than once (tests start several tiers in one process): later calls are no-ops.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: journald, container logs and files get plain
        // text. NO_COLOR turns it off at a terminal too.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Lets one log line through per interval and counts the ones held back, for failures that can
/// hit every request at once (a Redis outage failing every push, a hook down): the log shows a
/// line a second with how many were suppressed, not one line per request. Metrics count them all.
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    /// When a line was last let through, and how many were held back since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    /// At most one line per `every`.
    pub const fn new(every: std::time::Duration) -> Self {
        Throttle {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held back since the
    /// last one; `None` when this one is held back.
    pub fn allow(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.0 {
            Some(last) if now.duration_since(last) < self.every => {
                st.1 += 1;
                None
            }
            _ => {
                let held = st.1;
                *st = (Some(now), 0);
                Some(held)
            }
        }
    }
}

/// `tracing::warn!` at most once a second per call site (a [`Throttle`] of its own), with a
/// `held_back` field counting the lines suppressed since the last one. For warnings a failing
/// dependency can raise on every request; count every occurrence in a metric as well.
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static LOG: $crate::logging::Throttle =
            $crate::logging::Throttle::new(::std::time::Duration::from_secs(1));
        if let Some(held_back) = LOG.allow() {
            ::tracing::warn!(held_back, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::Throttle;
    use std::time::Duration;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        let zero = Throttle::new(Duration::ZERO);
        assert_eq!(zero.allow(), Some(0));
        assert_eq!(zero.allow(), Some(0), "no interval, nothing held back");
    }
}
