//! Command line of `rim-bench`. Defaults point at the cluster `scripts/dev-cluster.sh` starts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::{Parser, ValueEnum};

/// Load scenarios against a running rim cluster. Prints a summary on stderr and one JSON line on
/// stdout. Every run is bounded: a fixed number of sessions and pushes, and `--max-secs`.
#[derive(Debug, Clone, Parser)]
#[command(name = "rim-bench", version)]
pub struct Args {
    /// s1: idle sessions (memory and CPU per session); s2: room fan-out; s3: point-to-point pushes.
    #[arg(long, value_enum, default_value_t = Scenario::S2)]
    pub scenario: Scenario,
    /// Comet WebSocket (HTTP) listeners, comma-separated; sessions are spread over them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:3102,127.0.0.1:3202"
    )]
    pub ws: Vec<SocketAddr>,
    /// Comet TCP listeners, in the same order as `--ws`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:3101,127.0.0.1:3201"
    )]
    pub tcp: Vec<SocketAddr>,
    /// Comet ops listeners (`listen.ops`, where `/metrics` is), in the same order as `--ws`;
    /// `--ops ""` for comets serving `/metrics` on their WebSocket port (`listen.ops = ""`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:3103,127.0.0.1:3203",
        value_parser = maybe_addr
    )]
    pub ops: Vec<Option<SocketAddr>>,
    /// Session transport: ws (binary frames), json (WebSocket JSON mode), tcp, or mix (round robin).
    #[arg(long, value_enum, default_value_t = TransportArg::Ws)]
    pub transport: TransportArg,
    /// logic's HTTP API (pushes, and its /metrics).
    #[arg(long, default_value = "127.0.0.1:3111")]
    pub http: SocketAddr,
    /// logic's RPC listener, for `--via rpc`.
    #[arg(long, default_value = "127.0.0.1:3119")]
    pub rpc: SocketAddr,
    /// Push through logic's goim HTTP API or its LogicRpc.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// `Authorization: Bearer` secret for push routes (logic's push.secret), if set.
    #[arg(
        long,
        env = "RIM_BENCH_PUSH_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub push_secret: String,
    /// logic's `[cluster] secret`, proven to its LogicRpc with `--via rpc` (empty: none).
    #[arg(
        long,
        env = "RIM_BENCH_CLUSTER_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub cluster_secret: String,
    /// Extra `/metrics` endpoints (host:port) whose CPU and memory count as server cost, besides
    /// the comets' and logic's (e.g. job's ops listener); `--metrics ""` for none.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:3129", value_parser = maybe_addr)]
    pub metrics: Vec<Option<SocketAddr>>,
    /// S1: sessions.
    #[arg(long, default_value_t = 5000)]
    pub n: usize,
    /// S2: room members; S3: users (one session each).
    #[arg(long, default_value_t = 1000)]
    pub m: usize,
    /// Pushes (default: S2 2,000, S3 20,000).
    #[arg(long)]
    pub k: Option<usize>,
    /// Pushes in flight.
    #[arg(long, default_value_t = 32)]
    pub inflight: usize,
    /// Pace pushes at this many per second (0 = as fast as `--inflight` allows).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// Sessions are opened from 127.0.0.2 ... 127.0.0.(1+N), so tens of thousands fit in the
    /// ephemeral port range.
    #[arg(long, default_value_t = 8)]
    pub src_ips: u8,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 200)]
    pub conc: usize,
    /// Session processes for S1 (each holds at most ~15,000 sockets under a 20,000 fd limit);
    /// 0 = one per 15,000 sessions.
    #[arg(long, default_value_t = 0)]
    pub procs: usize,
    /// First mid used (mids are first .. first + sessions).
    #[arg(long, default_value_t = 1_000_000)]
    pub first_mid: i64,
    /// Room (type://id) for S2 (default: a fresh bench:// room per run).
    #[arg(long)]
    pub room: Option<String>,
    /// Wait after connecting before pushing (ms).
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// S1: hold after the last session opened before sampling memory (ms).
    #[arg(long, default_value_t = 3000)]
    pub hold_ms: u64,
    /// Stop waiting for deliveries after this long without one (ms).
    #[arg(long, default_value_t = 3000)]
    pub drain_idle_ms: u64,
    /// Hard limit on the whole run (s).
    #[arg(long, default_value_t = 240)]
    pub max_secs: u64,
    /// Seed of the S3 target sequence.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Label copied into the JSON line.
    #[arg(long, default_value = "")]
    pub tag: String,
    /// Internal: run as an S1 session process (driven over stdin/stdout by the parent).
    #[arg(long, hide = true)]
    pub child: Option<String>,
}

/// An address, or nothing for an empty value (so `--metrics ""` means none).
fn maybe_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| format!("{s:?}: {e}"))
}

/// Scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Idle sessions.
    S1,
    /// Room fan-out.
    S2,
    /// Point-to-point.
    S3,
}

/// Transport choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// WebSocket binary frames.
    Ws,
    /// WebSocket JSON mode.
    Json,
    /// Raw TCP frames.
    Tcp,
    /// Round robin over the three.
    Mix,
}

/// Push path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// `POST /goim/push/...` on logic.
    Http,
    /// `LogicRpc::push_mids` / `push_room`.
    Rpc,
}

impl Args {
    /// Source address of session `i`.
    pub fn src_ip(&self, i: usize) -> IpAddr {
        let n = usize::from(self.src_ips.max(1));
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % n) as u8))
    }

    /// Pushes for this scenario.
    pub fn pushes(&self) -> usize {
        self.k.unwrap_or(match self.scenario {
            Scenario::S3 => 20_000,
            _ => 2_000,
        })
    }

    /// Where each comet (in `--ws` order) serves `/metrics`: its `--ops` listener, or its
    /// WebSocket listener when `--ops` is empty.
    pub fn comet_metrics(&self) -> Vec<SocketAddr> {
        let ops: Vec<SocketAddr> = self.ops.iter().flatten().copied().collect();
        if ops.is_empty() { self.ws.clone() } else { ops }
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.ws.is_empty() {
            return Err("--ws: at least one comet".into());
        }
        if matches!(self.transport, TransportArg::Tcp | TransportArg::Mix)
            && self.tcp.len() != self.ws.len()
        {
            return Err("--tcp: one TCP listener per --ws comet, in the same order".into());
        }
        if self.comet_metrics().len() != self.ws.len() {
            return Err("--ops: one ops listener per --ws comet, in the same order".into());
        }
        if self.inflight == 0 {
            return Err("--inflight: at least 1".into());
        }
        if self.src_ips == 0 || self.src_ips > 250 {
            return Err("--src-ips: 1 to 250".into());
        }
        if self.conc == 0 {
            return Err("--conc: at least 1".into());
        }
        Ok(())
    }
}
