//! The built rim binaries as child processes: located next to the test executable, started from
//! the example configs in `config/` with environment overrides, killed on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// A child process, killed (SIGKILL) on drop so a failing test leaves nothing behind.
pub struct Proc {
    /// Name for messages.
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `bin --config config/<config>` with `env` added.
    pub fn spawn(name: impl Into<String>, bin: &str, config: &str, env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(binary(bin));
        cmd.arg("--config")
            .arg(repo().join("config").join(config))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd.env(
            "RUST_LOG",
            std::env::var("RIM_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            name: name.into(),
            child: cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}")),
        }
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

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
