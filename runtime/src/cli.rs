//! What every tier's `main` does around its own listeners, written once: load and validate the
//! config (exit 64 naming the field), `--check`, start tracing, build the runtime, install the
//! signal handler, run, and report a failure on stderr and in the log with exit status 1.
//!
//! A tier's `main.rs` keeps only what is its own: its clap arguments, which sockets it binds,
//! and the call into its library's `run(listeners, config, shutdown)`.

use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::settings::{self, Validate};

/// Exit status for a bad config or command line (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// The log settings every tier config has.
pub trait LogSettings {
    /// `tracing` filter used when `RUST_LOG` is unset.
    fn log_level(&self) -> &str;
    /// JSON lines instead of human-readable text.
    fn log_json(&self) -> bool;
}

/// One tier binary: its name in messages and how its config is read.
#[derive(Debug, Clone, Copy)]
pub struct Tier {
    /// Binary name, the prefix of every message (`rim-comet`).
    pub bin: &'static str,
    /// Config tier, the environment prefix (`comet` → `RIM_COMET__…`).
    pub name: &'static str,
    /// Dotted fields that take comma-separated lists from the environment.
    pub list_keys: &'static [&'static str],
}

impl Tier {
    /// Loads and validates the config. `Err` carries the exit status `main` should return:
    /// 64 after printing the field at fault, or success after `--check` printed "config ok".
    pub fn load<C: DeserializeOwned + Validate>(
        &self,
        path: Option<&Path>,
        check: bool,
    ) -> Result<C, ExitCode> {
        let config = settings::load(path, self.name, self.list_keys).map_err(|e| {
            eprintln!("{}: config error: {e}", self.bin);
            ExitCode::from(EXIT_CONFIG)
        })?;
        if check {
            eprintln!("{}: config ok", self.bin);
            return Err(ExitCode::SUCCESS);
        }
        Ok(config)
    }

    /// Exits 64 naming `field` (for checks that need more than the config, such as a subcommand's
    /// own requirements).
    pub fn config_error(&self, field: &str, message: &str) -> ExitCode {
        eprintln!("{}: config error: {field}: {message}", self.bin);
        ExitCode::from(EXIT_CONFIG)
    }

    /// Starts tracing and a multi-threaded runtime, then runs `serve` with the shutdown token
    /// that SIGTERM / SIGINT cancel. A failure is logged and printed; the status is then 1.
    pub fn serve<C, F, Fut, E>(&self, config: C, serve: F) -> ExitCode
    where
        C: LogSettings,
        F: FnOnce(C, CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        crate::logging::init(config.log_level(), config.log_json());
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("{}: cannot start the async runtime: {e}", self.bin);
                return ExitCode::FAILURE;
            }
        };
        let result = runtime.block_on(async {
            let shutdown = crate::shutdown::on_signal();
            serve(config, shutdown).await
        });
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // `{:#}`: an anyhow error prints its whole chain of causes.
                let e = format!("{e:#}");
                tracing::error!(error = %e, "{} failed", self.bin);
                eprintln!("{}: {e}", self.bin);
                ExitCode::FAILURE
            }
        }
    }
}

impl Tier {
    /// `--probe`: asks the instance listening on `addr` (the config's own HTTP listener) for
    /// `/readyz` and exits 0 when it answers 200, 1 otherwise, saying why on stderr. For container
    /// `HEALTHCHECK`s and scripts: the address comes from the same config and environment the
    /// instance started with, so a port moved by `RIM_<TIER>__LISTEN__HTTP` is followed.
    pub fn probe(&self, addr: &str) -> ExitCode {
        match probe_ready(addr, std::time::Duration::from_secs(3)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("{}: not ready: {why}", self.bin);
                ExitCode::FAILURE
            }
        }
    }
}

/// `GET /readyz` on `addr` (a wildcard host is asked on loopback), HTTP/1.0 so the answer ends
/// at close; `Ok` on status 200.
fn probe_ready(addr: &str, timeout: std::time::Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, ToSocketAddrs};
    // Every address the name gives, wildcards asked on loopback, the first that accepts.
    let targets: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .map(|mut a| {
            if a.ip().is_unspecified() {
                a.set_ip(match a {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            a
        })
        .collect();
    let mut last = format!("{addr}: no address");
    let mut connected = None;
    for a in &targets {
        match std::net::TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                connected = Some((*a, s));
                break;
            }
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    let (target, mut stream) = connected.ok_or(last)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n"))
        .map_err(|e| format!("{target}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| format!("{target}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        Err(format!("{target}/readyz: {status} {body}"))
    }
}

/// A listener that could not be bound, naming the config field of its address.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {field} {addr}: {source}")]
pub struct BindError {
    /// Config field, e.g. `listen.http`.
    pub field: &'static str,
    /// The configured address.
    pub addr: String,
    /// Why.
    pub source: std::io::Error,
}

/// Binds the TCP listener configured at `field`.
pub async fn bind(field: &'static str, addr: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        field,
        addr: addr.to_string(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn bind_error_names_the_field_and_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = bind("listen.rpc", &addr).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("cannot bind listen.rpc {addr}: ")),
            "{text}"
        );
    }

    /// Serves one canned HTTP answer per connection on a loopback port.
    fn answering(answer: &'static str) -> std::net::SocketAddr {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().map_while(Result::ok) {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn probe_is_ready_on_200_and_says_why_otherwise() {
        let ok = answering("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(probe_ready(&ok.to_string(), Duration::from_secs(2)), Ok(()));
        // A wildcard address is asked on loopback.
        let wildcard = format!("0.0.0.0:{}", ok.port());
        assert_eq!(probe_ready(&wildcard, Duration::from_secs(2)), Ok(()));
        let busy = answering("HTTP/1.1 503 Service Unavailable\r\n\r\nredis down");
        let why = probe_ready(&busy.to_string(), Duration::from_secs(2)).unwrap_err();
        assert!(why.contains("503") && why.contains("redis down"), "{why}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap().to_string();
        drop(closed);
        assert!(probe_ready(&gone, Duration::from_secs(2)).is_err());
    }
}
