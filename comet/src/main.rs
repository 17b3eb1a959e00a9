//! `rim-comet` binary: parse the CLI, load and validate config, start tracing, bind, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rim_comet::{Config, Listeners};
use rim_runtime::cli::{Tier, bind};

const TIER: Tier = Tier {
    bin: "rim-comet",
    name: "comet",
    list_keys: &[
        "logic.addrs",
        "websocket.allowed_origins",
        "limits.trusted_proxies",
    ],
};

/// rim comet: client connections and push delivery.
#[derive(Debug, Parser)]
#[command(name = "rim-comet", version)]
struct Cli {
    /// TOML config file (environment `RIM_COMET__SECTION__FIELD` overrides it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config: Config = match TIER.load(cli.config.as_deref(), cli.check) {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    TIER.serve(config, |config, shutdown| async move {
        let http = bind("listen.http", &config.listen.http).await?;
        let tcp = if config.listen.tcp.is_empty() {
            None
        } else {
            Some(bind("listen.tcp", &config.listen.tcp).await?)
        };
        let rpc = bind("listen.rpc", &config.listen.rpc).await?;
        rim_comet::run(Listeners { http, tcp, rpc }, config, shutdown).await?;
        Ok::<_, anyhow::Error>(())
    })
}
