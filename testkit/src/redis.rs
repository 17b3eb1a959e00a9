//! A real `redis-server` per test, on a unix socket in a temporary directory, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running throwaway Redis.
pub struct RedisServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
    appendonly: bool,
    tls: Option<Tls>,
}

/// TLS settings of a [`RedisServer::start_tls`] server.
#[derive(Debug, Clone)]
struct Tls {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` with persistence off. Panics (test setup) if it cannot start.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// Starts `redis-server`, with `appendonly` persistence (fsync on every write) when asked
    /// (restart tests).
    pub fn start_with(appendonly: bool) -> RedisServer {
        Self::start_inner(appendonly, None)
    }

    /// Starts `redis-server` that also serves TLS on a free loopback port (`--tls-port`, client
    /// certificates not required) with the given PEM files; [`RedisServer::tls_url`] is its
    /// `rediss://` URL. The unix socket stays, for the tests' own assertions.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> RedisServer {
        let tls = Tls {
            port: crate::process::free_addr().port(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.to_path_buf(),
        };
        Self::start_inner(false, Some(tls))
    }

    fn start_inner(appendonly: bool, tls: Option<Tls>) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("rim-redis-")
            .tempdir()
            .expect("tempdir");
        let mut server = RedisServer {
            dir,
            child: None,
            appendonly,
            tls,
        };
        server.spawn();
        server
    }

    /// `rediss://127.0.0.1:<tls port>/` of a [`RedisServer::start_tls`] server.
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|t| format!("rediss://127.0.0.1:{}/", t.port))
    }

    fn spawn(&mut self) {
        let sock = self.socket_path();
        let mut cmd = Command::new("redis-server");
        if let Some(t) = &self.tls {
            cmd.args([
                "--tls-port",
                &t.port.to_string(),
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(&t.cert)
            .arg("--tls-key-file")
            .arg(&t.key)
            .arg("--tls-ca-cert-file")
            .arg(&t.ca);
        }
        let child = cmd
            .args(["--port", "0", "--unixsocket"])
            .arg(&sock)
            .args(["--unixsocketperm", "700", "--save", ""])
            .args(["--appendonly", if self.appendonly { "yes" } else { "no" }])
            // Every write on disk before Redis answers: an accepted push survives kill -9.
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        self.child = Some(child);
        wait_until_ready(&sock);
    }

    /// Path of the unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `redis+unix://` URL for the tiers' config.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket_path().display())
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts it again on the same socket (and data directory).
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.socket_path());
        self.spawn();
    }

    /// A synchronous connection, for test assertions on Redis state.
    pub fn connection(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to test redis")
    }
}

fn wait_until_ready(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if sock.exists()
            && let Ok(mut conn) = ::redis::Client::open(format!("redis+unix://{}", sock.display()))
                .and_then(|c| c.get_connection())
            && ::redis::cmd("PING").query::<String>(&mut conn).is_ok()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server did not come up on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
