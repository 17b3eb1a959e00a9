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
}
