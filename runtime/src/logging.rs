//! `tracing` setup: human-readable or JSON lines on stderr, filtered by `RUST_LOG` or the config.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is an `EnvFilter` directive used when `RUST_LOG` is unset.
/// Safe to call more than once (tests start several tiers in one process): later calls are no-ops.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: journald, container logs and files get plain
        // text. NO_COLOR turns it off at a terminal too.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
