//! Per-address limits on the client ports, checked when a connection is admitted (before its
//! Auth frame is read): open connections per address (`limits.sessions_per_ip`) and new
//! connections, each one Auth attempt, per address per second (`limits.auth_per_ip_per_sec`, a
//! token bucket per address).
//!
//! An address is an IPv4 address or an IPv6 /64 prefix (a host usually holds a whole /64, so
//! counting single IPv6 addresses would limit nothing). Both maps are bounded: the session counts
//! hold an entry only while that address has a connection open (so at most
//! `session.max_connections` entries), and the attempt buckets at most [`MAX_TRACKED`], idle
//! (full) buckets being forgotten when it fills up. Loopback peers are exempt by default
//! (`limits.exempt_loopback`): a proxy on the same host carries every client.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use parking_lot::Mutex;
// The runtime's clock, so tests can pause it; the same as `std`'s when not paused.
use tokio::time::Instant;

use crate::cidr::Cidr;
use crate::config::LimitsConfig;
use rim_runtime::rate::TokenBucket;

/// Most addresses whose attempt buckets are remembered at once.
pub(crate) const MAX_TRACKED: usize = 65_536;

/// Least time between two sweeps of a full attempt map (a sweep walks all of it).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `limits.sessions_per_ip` connections from the address are open already.
    Sessions,
    /// The address's attempt bucket is empty (or the attempt map is full of busy addresses).
    Attempts,
}

impl Refusal {
    /// The op 6 / close reason the client gets.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::Sessions => "too many sessions from this address",
            Refusal::Attempts => "too many attempts",
        }
    }

    /// The `limit` label of `rim_comet_limit_refused_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::Sessions => "sessions_per_ip",
            Refusal::Attempts => "auth_per_ip",
        }
    }
}

/// The address a limit counts `ip` under: IPv4 (also IPv4-mapped IPv6) as is, IPv6 by /64.
pub(crate) fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
            )),
        },
    }
}

struct Attempts {
    buckets: HashMap<IpAddr, TokenBucket>,
    last_sweep: Option<Instant>,
}

/// The per-address counts of one comet.
pub(crate) struct PeerLimits {
    cfg: LimitsConfig,
    proxies: Vec<Cidr>,
    sessions: Mutex<HashMap<IpAddr, u32>>,
    attempts: Mutex<Attempts>,
}

impl PeerLimits {
    pub(crate) fn new(cfg: &LimitsConfig) -> Self {
        PeerLimits {
            proxies: cfg
                .trusted_proxies
                .iter()
                .filter_map(|p| Cidr::parse(p))
                .collect(),
            cfg: cfg.clone(),
            sessions: Mutex::new(HashMap::new()),
            attempts: Mutex::new(Attempts {
                buckets: HashMap::new(),
                last_sweep: None,
            }),
        }
    }

    /// Checks a new connection from `ip` against both limits and counts it as open; the caller
    /// calls [`PeerLimits::release`] exactly once when it ends (only after `Ok`).
    pub(crate) fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.exempt(ip) {
            return Ok(());
        }
        let k = addr_key(ip);
        if self.cfg.auth_per_ip_per_sec > 0 {
            self.take_attempt(k, now)?;
        }
        if self.cfg.sessions_per_ip > 0 {
            let mut m = self.sessions.lock();
            let n = m.entry(k).or_insert(0);
            if *n >= self.cfg.sessions_per_ip {
                return Err(Refusal::Sessions);
            }
            *n += 1;
        }
        Ok(())
    }

    /// Releases a connection [`PeerLimits::admit`] counted.
    pub(crate) fn release(&self, ip: IpAddr) {
        if self.cfg.sessions_per_ip == 0 || self.exempt(ip) {
            return;
        }
        let mut m = self.sessions.lock();
        if let Entry::Occupied(mut e) = m.entry(addr_key(ip)) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
    }

    /// The client's address of a WebSocket request from `peer` carrying `forwarded`
    /// (`X-Forwarded-For` values, in order): `peer` unless it is a trusted proxy; else the last
    /// forwarded address that is not a trusted proxy (the first entries are the client's own
    /// claim, which only the hop after it can vouch for). An unparsable entry ends the walk.
    pub(crate) fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded: impl DoubleEndedIterator<Item = &'a str>,
    ) -> IpAddr {
        let trusted = |ip: IpAddr| self.is_trusted_proxy(ip);
        if !trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for hop in forwarded.rev().flat_map(|v| v.rsplit(',')) {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip.to_canonical();
            if !trusted(client) {
                break;
            }
        }
        client
    }

    /// Whether `ip` is one of `limits.trusted_proxies`.
    pub(crate) fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.proxies.iter().any(|c| c.contains(ip))
    }

    /// Whether `ip` is not limited (`limits.exempt_loopback`).
    fn exempt(&self, ip: IpAddr) -> bool {
        self.cfg.exempt_loopback && ip.to_canonical().is_loopback()
    }

    fn take_attempt(&self, k: IpAddr, now: Instant) -> Result<(), Refusal> {
        let mut a = self.attempts.lock();
        if !a.buckets.contains_key(&k) && a.buckets.len() >= MAX_TRACKED {
            // Full: forget idle addresses, at most once per SWEEP_EVERY; still full = refuse
            // (fail closed rather than grow without bound under a flood of addresses).
            if a.last_sweep
                .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY)
            {
                a.last_sweep = Some(now);
                a.buckets.retain(|_, b| !b.is_full(now));
            }
            if a.buckets.len() >= MAX_TRACKED {
                return Err(Refusal::Attempts);
            }
        }
        let (rate, burst) = (self.cfg.auth_per_ip_per_sec, self.cfg.auth_per_ip_burst);
        let b = a
            .buckets
            .entry(k)
            .or_insert_with(|| TokenBucket::new(rate, burst, now));
        if b.try_take(now) {
            Ok(())
        } else {
            Err(Refusal::Attempts)
        }
    }

    /// Addresses with open connections counted, and addresses with attempt buckets (tests).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> (usize, usize) {
        (
            self.sessions.lock().len(),
            self.attempts.lock().buckets.len(),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits(sessions: u32, rate: u32, burst: u32) -> PeerLimits {
        PeerLimits::new(&LimitsConfig {
            sessions_per_ip: sessions,
            auth_per_ip_per_sec: rate,
            auth_per_ip_burst: burst,
            exempt_loopback: true,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_is_exempt_unless_configured_otherwise() {
        let l = limits(1, 0, 0);
        let lo = ip("127.0.0.2");
        for _ in 0..3 {
            assert_eq!(l.admit(lo, Instant::now()), Ok(()));
        }
        assert_eq!(l.tracked(), (0, 0));
        let l = PeerLimits::new(&LimitsConfig {
            sessions_per_ip: 1,
            exempt_loopback: false,
            ..LimitsConfig::default()
        });
        assert_eq!(l.admit(lo, Instant::now()), Ok(()));
        assert_eq!(l.admit(lo, Instant::now()), Err(Refusal::Sessions));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let l = PeerLimits::new(&LimitsConfig {
            trusted_proxies: vec!["10.0.0.0/8".into(), "192.0.2.1".into()],
            ..LimitsConfig::default()
        });
        let one = |peer: &str, xff: &[&'static str]| l.client_ip(ip(peer), xff.iter().copied());
        // An untrusted peer's header is ignored.
        assert_eq!(one("203.0.113.5", &["198.51.100.1"]), ip("203.0.113.5"));
        // Trusted: the last hop that is not a trusted proxy, across header lines.
        assert_eq!(one("10.1.2.3", &["198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(
            one("10.1.2.3", &["1.1.1.1, 198.51.100.1", "192.0.2.1"]),
            ip("198.51.100.1"),
            "a client's own claim (1.1.1.1) is not believed"
        );
        assert_eq!(one("192.0.2.1", &[]), ip("192.0.2.1"));
        assert_eq!(
            one("10.1.2.3", &["10.9.9.9"]),
            ip("10.9.9.9"),
            "all trusted"
        );
        assert_eq!(one("10.1.2.3", &["junk, 198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(one("10.1.2.3", &["198.51.100.1, junk"]), ip("10.1.2.3"));
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert_eq!(Cidr::parse("nope"), None);
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("::ffff:1.2.3.4"))
        );
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(addr_key(ip("10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(addr_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(addr_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            addr_key(ip("2001:db8:1:2:bbbb::9")),
            addr_key(ip("2001:db8:1:2:aaaa::1"))
        );
    }

    /// The third connection from one address is refused, another address is not, and a release
    /// makes room again; the entry goes when the address has nothing open.
    #[test]
    fn sessions_per_ip_trips_and_recovers_on_release() {
        let l = limits(2, 0, 0);
        let now = Instant::now();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert_eq!(l.admit(a, now), Ok(()));
        assert_eq!(l.admit(a, now), Ok(()));
        assert_eq!(l.admit(a, now), Err(Refusal::Sessions));
        assert_eq!(l.admit(b, now), Ok(()));
        l.release(a);
        assert_eq!(l.admit(a, now), Ok(()));
        for x in [a, a, b] {
            l.release(x);
        }
        assert_eq!(l.tracked(), (0, 0));
        // Releasing what is not counted changes nothing.
        l.release(a);
        assert_eq!(l.tracked(), (0, 0));
    }

    /// Burst 3 at 1/s: the fourth attempt at once is refused, one more a second later.
    #[tokio::test(start_paused = true)]
    async fn attempts_per_ip_trip_and_recover_as_time_passes() {
        let l = limits(0, 1, 3);
        let a = ip("10.0.0.1");
        for _ in 0..3 {
            assert_eq!(l.admit(a, Instant::now()), Ok(()));
        }
        assert_eq!(l.admit(a, Instant::now()), Err(Refusal::Attempts));
        assert_eq!(l.admit(ip("10.0.0.2"), Instant::now()), Ok(()));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(l.admit(a, Instant::now()), Err(Refusal::Attempts));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(l.admit(a, Instant::now()), Ok(()));
        assert_eq!(l.admit(a, Instant::now()), Err(Refusal::Attempts));
    }

    /// A flood of distinct addresses cannot grow the attempt map past MAX_TRACKED: while every
    /// bucket is busy a new address is refused; once they are idle (full again) they are swept.
    #[tokio::test(start_paused = true)]
    async fn attempt_map_is_bounded_and_idle_entries_are_swept() {
        let l = limits(0, 1, 2);
        let now = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            assert_eq!(l.admit(IpAddr::from(i.to_be_bytes()), now), Ok(()));
        }
        assert_eq!(l.tracked().1, MAX_TRACKED);
        let new = ip("203.0.113.9");
        assert_eq!(l.admit(new, now), Err(Refusal::Attempts));
        assert_eq!(l.tracked().1, MAX_TRACKED);
        // One token used of two at 1/s: full again after 1 s.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(l.admit(new, Instant::now()), Ok(()));
        assert_eq!(l.tracked().1, 1);
    }
}
