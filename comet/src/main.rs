//! `rim-comet` binary: parse the CLI, load and validate config, start tracing, bind, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use rim_comet::{Config, Listeners};

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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config: Config =
        match rim_runtime::settings::load(cli.config.as_deref(), "comet", &["logic.addrs"]) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("rim-comet: config error: {e}");
                return ExitCode::from(64);
            }
        };
    if cli.check {
        eprintln!("rim-comet: config ok");
        return ExitCode::SUCCESS;
    }
    rim_runtime::logging::init(&config.log_level, config.log_json);
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "rim-comet failed");
            eprintln!("rim-comet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let http = tokio::net::TcpListener::bind(&config.listen.http)
        .await
        .with_context(|| format!("binding listen.http {}", config.listen.http))?;
    let tcp = if config.listen.tcp.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&config.listen.tcp)
                .await
                .with_context(|| format!("binding listen.tcp {}", config.listen.tcp))?,
        )
    };
    let rpc = tokio::net::TcpListener::bind(&config.listen.rpc)
        .await
        .with_context(|| format!("binding listen.rpc {}", config.listen.rpc))?;
    let shutdown = rim_runtime::shutdown::on_signal();
    rim_comet::run(Listeners { http, tcp, rpc }, config, shutdown).await?;
    Ok(())
}
