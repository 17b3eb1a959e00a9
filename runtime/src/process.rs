//! The process's own CPU time and memory, read from `/proc/self` (Linux) and appended to every
//! tier's `/metrics`, so load tools and operators see what a session or a push costs without
//! access to the host: `process_cpu_seconds_total`, `process_resident_memory_bytes` (the usual
//! Prometheus names), `rim_process_pss_bytes` (proportional set size: shared pages split
//! between the processes sharing them, the fairest per-process figure), and
//! `process_open_fds` / `process_max_fds` (a comet holds one descriptor per session, so these
//! say how close it is to `LimitNOFILE`). Absent where `/proc` is not.

use crate::metrics::Exposition;

/// `/proc` reports CPU time in USER_HZ ticks, which Linux fixes at 100 for user space.
const USER_HZ: f64 = 100.0;

/// What `/proc/self` says about this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size, in bytes.
    pub rss_bytes: u64,
    /// Proportional set size, in bytes.
    pub pss_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors (`RLIMIT_NOFILE`); 0 when unlimited or unknown.
    pub max_fds: u64,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` when it is not there (not Linux).
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
        Some(ProcessStats {
            cpu_seconds: cpu_seconds(&stat)?,
            rss_bytes: kib_field(&rollup, "Rss:")? * 1024,
            pss_bytes: kib_field(&rollup, "Pss:")? * 1024,
            open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
            max_fds: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|l| soft_limit(&l, "Max open files"))
                .unwrap_or(0),
        })
    }

    /// Appends the samples.
    pub fn render(&self, e: &mut Exposition) {
        e.sample_f64(
            "process_cpu_seconds_total",
            "User and system CPU time spent by this process, in seconds.",
            "counter",
            self.cpu_seconds,
        );
        e.gauge(
            "process_resident_memory_bytes",
            "Resident memory of this process, in bytes.",
            i64::try_from(self.rss_bytes).unwrap_or(i64::MAX),
        );
        e.gauge(
            "rim_process_pss_bytes",
            "Proportional set size of this process (shared pages split among sharers), in bytes.",
            i64::try_from(self.pss_bytes).unwrap_or(i64::MAX),
        );
        e.gauge(
            "process_open_fds",
            "Open file descriptors of this process.",
            i64::try_from(self.open_fds).unwrap_or(i64::MAX),
        );
        e.gauge(
            "process_max_fds",
            "Soft limit on open file descriptors (LimitNOFILE); 0 = unlimited.",
            i64::try_from(self.max_fds).unwrap_or(i64::MAX),
        );
    }
}

/// The soft limit on the `/proc/<pid>/limits` line starting with `name`
/// (`Max open files            1024                 524288               files`).
fn soft_limit(limits: &str, name: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// utime + stime from `/proc/<pid>/stat`; the command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let stat =
            "1234 (rim comet) S 1 1234 1234 0 -1 4194560 2000 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        let rollup = "55d0-7ffc ---p 00000000 00:00 0  [rollup]\nRss:               10240 kB\nPss:                9000 kB\n";
        assert_eq!(kib_field(rollup, "Rss:"), Some(10240));
        assert_eq!(kib_field(rollup, "Pss:"), Some(9000));
        assert_eq!(kib_field(rollup, "Swap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n\
                      Max locked memory         unlimited            unlimited            bytes\n";
        assert_eq!(soft_limit(limits, "Max open files"), Some(1024));
        assert_eq!(soft_limit(limits, "Max locked memory"), None);
    }

    #[test]
    fn reads_this_process_on_linux() {
        if !std::path::Path::new("/proc/self/smaps_rollup").exists() {
            return;
        }
        let s = ProcessStats::read().expect("readable on Linux");
        assert!(s.rss_bytes > 0 && s.pss_bytes > 0, "{s:?}");
        assert!(s.open_fds >= 3 && s.open_fds <= s.max_fds, "{s:?}");
        let mut e = Exposition::new();
        s.render(&mut e);
        let text = e.finish();
        assert!(text.contains("\nrim_process_pss_bytes "), "{text}");
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
    }
}
