//! Counters and gauges owned by each tier instance (not a global registry, so several tiers can
//! run in one test process with their own figures), rendered as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Builds a Prometheus text exposition.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a counter sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.sample(name, help, "counter", &[], value as f64)
    }

    /// Adds a gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) -> &mut Self {
        self.sample(name, help, "gauge", &[], value as f64)
    }

    /// Adds a sample with a fractional value (`kind` is `counter` or `gauge`).
    pub fn sample_f64(&mut self, name: &str, help: &str, kind: &str, value: f64) -> &mut Self {
        self.sample(name, help, kind, &[], value)
    }

    /// Adds a counter with one label, one sample per `(label value, count)`.
    pub fn labeled_counter(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) -> &mut Self {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} counter");
        for (lv, v) in values {
            let _ = writeln!(self.0, "{name}{{{label}=\"{}\"}} {v}", escape(lv));
        }
        self
    }

    fn sample(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) -> &mut Self {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        let _ = write!(self.0, "{name}");
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.0, " {value}");
        self
    }

    /// The text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.0)
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let c = Counter::default();
        c.add(3);
        let text = Exposition::new()
            .counter("rim_x_total", "X.", c.get())
            .labeled_counter("rim_y_total", "Y.", "reason", &[("a\"b", 2)])
            .finish();
        assert!(
            text.contains("# TYPE rim_x_total counter\nrim_x_total 3\n"),
            "{text}"
        );
        assert!(text.contains("rim_y_total{reason=\"a\\\"b\"} 2"), "{text}");
    }
}
