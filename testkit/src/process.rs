//! The built rim binaries as child processes: located next to the test executable, started from
//! the example configs in `config/` with environment overrides, killed on drop.
//!
//! A child's log goes to a file, not to the test's terminal: dozens of processes retrying
//! through a fault would bury the one failing assertion. When a test fails (its thread is
//! unwinding as the process is dropped), the tail of each of its processes' logs is printed into
//! the test's own captured output, next to the panic message. `RIM_TEST_LOG=debug` raises the
//! level; `RIM_TEST_LOG_KEEP=1` keeps every log file and says where.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Path of a built binary (`rim-comet`, ...). Panics with instructions when it is missing.
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/; the binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A loopback address with a port free at the time of the call.
///
/// The port is taken below the kernel's ephemeral range (32768-60999 on Linux): a port from
/// `bind(0)` comes from that range, and between this call and the child process binding it, any
/// outgoing connection of the many tests running in parallel could be given the same port. A
/// process-wide counter (started at a per-process offset) keeps two tests of this process from
/// picking the same one.
pub fn free_addr() -> SocketAddr {
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000; // 10000..32000
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// Lines of a child's log printed when its test fails.
const LOG_TAIL_LINES: usize = 40;

/// A child process, killed (SIGKILL) on drop so a failing test leaves nothing behind.
pub struct Proc {
    /// Name for messages.
    pub name: String,
    child: Child,
    /// The child's stderr (its log); removed on drop unless the test failed or keeping was asked.
    log: Option<tempfile::NamedTempFile>,
}

impl Proc {
    /// Starts `bin --config config/<config>` with `env` added.
    pub fn spawn(name: impl Into<String>, bin: &str, config: &str, env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(binary(bin));
        cmd.arg("--config").arg(repo().join("config").join(config));
        Proc::start(name, cmd, env)
    }

    /// Starts `cmd` (any program and arguments, e.g. a unit's `ExecStart` line) with `env` added,
    /// its stderr kept as the log.
    pub fn start(name: impl Into<String>, mut cmd: Command, env: &[(&str, String)]) -> Proc {
        let name = name.into();
        let log = tempfile::Builder::new()
            .prefix(&format!("rim-test-{name}-"))
            .suffix(".log")
            .tempfile()
            .ok();
        let stderr = log
            .as_ref()
            .and_then(|f| f.reopen().ok())
            .map_or_else(Stdio::inherit, Stdio::from);
        cmd.stdout(Stdio::null()).stderr(stderr);
        cmd.env(
            "RUST_LOG",
            std::env::var("RIM_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", cmd.get_program().display())),
            name,
            log,
        }
    }

    /// Prints the last lines of the child's log into the test's output.
    fn print_log_tail(&self, path: &Path) {
        let Ok(file) = std::fs::File::open(path) else {
            return;
        };
        let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        eprintln!(
            "---- log of {} ({} lines, last {} below; kept at {})",
            self.name,
            lines.len(),
            lines.len() - from,
            path.display()
        );
        for line in &lines[from..] {
            eprintln!("{line}");
        }
    }

    /// What the child has logged so far (its stderr).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f.path()).ok())
            .unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `KILL`, ...).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} {}", self.name);
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, failing the test after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `[cluster] secret` [`logic`], [`job`] and [`comet`] start with, so integration tests
/// exercise authenticated RPC; a test passes its own `RIM_*__CLUSTER__SECRET` in `extra` to
/// override it (the later value wins).
pub const CLUSTER_SECRET: &str = "testkit cluster secret (tests only)";

/// `rim-logic` from `config/logic.toml` on the Redis at `redis_url`, listening on `http` and
/// `rpc`, with `extra` environment on top.
pub fn logic(redis_url: &str, http: SocketAddr, rpc: SocketAddr, extra: &[(&str, String)]) -> Proc {
    let mut env = vec![
        ("RIM_LOGIC__REDIS__URL", redis_url.to_string()),
        ("RIM_LOGIC__LISTEN__HTTP", http.to_string()),
        ("RIM_LOGIC__LISTEN__RPC", rpc.to_string()),
        ("RIM_LOGIC__CLUSTER__SECRET", CLUSTER_SECRET.to_string()),
    ];
    env.extend_from_slice(extra);
    Proc::spawn("logic", "rim-logic", "logic.toml", &env)
}

/// `rim-job` from `config/job.toml` on the Redis at `redis_url`, its ops routes on `http`.
pub fn job(redis_url: &str, http: SocketAddr, extra: &[(&str, String)]) -> Proc {
    let mut env = vec![
        ("RIM_JOB__REDIS__URL", redis_url.to_string()),
        ("RIM_JOB__LISTEN__HTTP", http.to_string()),
        ("RIM_JOB__CLUSTER__SECRET", CLUSTER_SECRET.to_string()),
    ];
    env.extend_from_slice(extra);
    Proc::spawn("job", "rim-job", "job.toml", &env)
}

/// Where a comet started by [`comet`] listens.
#[derive(Debug, Clone, Copy)]
pub struct CometAddrs {
    /// WebSocket `/sub`, `/healthz`, `/readyz`.
    pub http: SocketAddr,
    /// Raw TCP frames.
    pub tcp: SocketAddr,
    /// `CometRpc`.
    pub rpc: SocketAddr,
    /// `/metrics` (and the health routes): `listen.ops`.
    pub ops: SocketAddr,
}

impl CometAddrs {
    /// Four free loopback ports.
    pub fn free() -> CometAddrs {
        CometAddrs {
            http: free_addr(),
            tcp: free_addr(),
            rpc: free_addr(),
            ops: free_addr(),
        }
    }
}

/// `rim-comet` from `config/comet.toml` as `server_id`, on `addrs`, talking to logic at
/// `logic_rpc`, renewing every 200 ms (so tests see it registered quickly).
pub fn comet(
    server_id: &str,
    addrs: CometAddrs,
    logic_rpc: SocketAddr,
    extra: &[(&str, String)],
) -> Proc {
    let mut env = vec![
        ("RIM_COMET__SERVER_ID", server_id.to_string()),
        ("RIM_COMET__LISTEN__HTTP", addrs.http.to_string()),
        ("RIM_COMET__LISTEN__TCP", addrs.tcp.to_string()),
        ("RIM_COMET__LISTEN__RPC", addrs.rpc.to_string()),
        ("RIM_COMET__LISTEN__OPS", addrs.ops.to_string()),
        ("RIM_COMET__LOGIC__ADDRS", logic_rpc.to_string()),
        ("RIM_COMET__RENEW__INTERVAL_MS", "200".to_string()),
        ("RIM_COMET__CLUSTER__SECRET", CLUSTER_SECRET.to_string()),
    ];
    env.extend_from_slice(extra);
    Proc::spawn(server_id, "rim-comet", "comet.toml", &env)
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        let Some(log) = self.log.take() else { return };
        let failing = std::thread::panicking();
        let keep = std::env::var_os("RIM_TEST_LOG_KEEP").is_some();
        if failing || keep {
            match log.keep() {
                Ok((_, path)) if failing => self.print_log_tail(&path),
                Ok((_, path)) => eprintln!("log of {} kept at {}", self.name, path.display()),
                Err(e) => eprintln!("log of {} lost: {e}", self.name),
            }
        }
    }
}
