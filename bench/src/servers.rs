//! The servers' own view of their cost: each tier's `/metrics` carries its process CPU time and
//! memory (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `rim_process_pss_bytes`), so the tool needs no access to the servers' pids.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

/// One scrape of one server.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// CPU seconds so far.
    pub cpu_s: f64,
    /// Resident bytes.
    pub rss: f64,
    /// Proportional set size, bytes.
    pub pss: f64,
}

/// Scrapes `addr`'s `/metrics`; `None` when it does not answer or lacks the process figures.
pub async fn scrape(http: &reqwest::Client, addr: SocketAddr) -> Option<Sample> {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let values: HashMap<&str, f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect();
    Some(Sample {
        cpu_s: *values.get("process_cpu_seconds_total")?,
        rss: *values.get("process_resident_memory_bytes")?,
        pss: *values.get("rim_process_pss_bytes")?,
    })
}

/// Scrapes every address; missing ones are left out (and named on stderr once by the caller).
pub async fn scrape_all(http: &reqwest::Client, addrs: &[SocketAddr]) -> Vec<Option<Sample>> {
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        out.push(scrape(http, *a).await);
    }
    out
}

/// Sum over servers present in both scrapes of `after - before`.
pub fn delta(before: &[Option<Sample>], after: &[Option<Sample>]) -> Sample {
    let mut d = Sample::default();
    for (b, a) in before.iter().zip(after) {
        if let (Some(b), Some(a)) = (b, a) {
            d.cpu_s += a.cpu_s - b.cpu_s;
            d.rss += a.rss - b.rss;
            d.pss += a.pss - b.pss;
        }
    }
    d
}

/// Per server (by address) `after - before` CPU seconds, for the servers present in both.
pub fn cpu_by_server(
    addrs: &[SocketAddr],
    before: &[Option<Sample>],
    after: &[Option<Sample>],
) -> serde_json::Map<String, serde_json::Value> {
    addrs
        .iter()
        .zip(before.iter().zip(after))
        .filter_map(|(a, (b, f))| {
            let (b, f) = (b.as_ref()?, f.as_ref()?);
            let cpu = ((f.cpu_s - b.cpu_s) * 1000.0).round() / 1000.0;
            Some((a.to_string(), serde_json::json!(cpu)))
        })
        .collect()
}
