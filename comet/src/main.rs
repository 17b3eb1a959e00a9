//! `rim-comet` binary: parse the CLI, load and validate config, start tracing, bind, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rim_comet::{Config, Listeners};
use rim_runtime::cli::{Tier, bind};

const TIER: Tier = Tier {
    bin: "rim-comet",
    name: "comet",
    list_keys: rim_comet::config::LIST_KEYS,
};

/// rim comet: client connections and push delivery.
#[derive(Debug, Parser)]
#[command(name = "rim-comet", version)]
struct Cli {
    /// TOML config file, or the path in `RIM_CONFIG` (containers set it once for the command
    /// and the health check); `RIM_COMET__SECTION__FIELD` variables override its fields.
    #[arg(long, env = "RIM_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
    /// Ask the instance this config describes for `/readyz` on its HTTP listener; exit 0 when
    /// it is ready, 1 when not (container health checks).
    #[arg(long)]
    probe: bool,
}

/// Binds `addr` unless it is empty (the listener is off).
async fn optional(
    field: &'static str,
    addr: &str,
) -> Result<Option<tokio::net::TcpListener>, rim_runtime::cli::BindError> {
    if addr.is_empty() {
        return Ok(None);
    }
    bind(field, addr).await.map(Some)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config: Config = match TIER.load(cli.config.as_deref(), cli.check) {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    if cli.probe {
        return TIER.probe(&config.listen.http);
    }
    TIER.serve(config, |config, shutdown| async move {
        let http = bind("listen.http", &config.listen.http).await?;
        let tcp = optional("listen.tcp", &config.listen.tcp).await?;
        let wss = optional("listen.wss", &config.listen.wss).await?;
        let tls = optional("listen.tls", &config.listen.tls).await?;
        let rpc = bind("listen.rpc", &config.listen.rpc).await?;
        let ops = optional("listen.ops", &config.listen.ops).await?;
        let listeners = Listeners {
            http,
            tcp,
            wss,
            tls,
            rpc,
            ops,
        };
        rim_comet::run(listeners, config, shutdown).await?;
        Ok::<_, anyhow::Error>(())
    })
}
