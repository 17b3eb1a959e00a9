//! Counting what an in-process tier logs, for tests whose evidence is a log line (a wait that
//! is otherwise invisible, such as a tier retrying Redis before it serves).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Installs, process-wide, a subscriber that counts the warnings and errors whose message
/// contains `needle`, and returns the count. Only one test of a binary may call it (a second
/// global subscriber is refused), so it suits test files with one such test.
pub fn count_warnings(needle: &'static str) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::set_global_default(CountLogs {
        needle,
        seen: seen.clone(),
    })
    .expect("the only global subscriber of this test binary");
    seen
}

struct CountLogs {
    needle: &'static str,
    seen: Arc<AtomicUsize>,
}

impl tracing::Subscriber for CountLogs {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        if m.0.contains(self.needle) {
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
