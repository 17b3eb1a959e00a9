//! `rim-job`: parses the command line, loads config, binds the ops listener and runs the job tier.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// rim job worker: delivers queued pushes from Redis streams to comets.
#[derive(Debug, Parser)]
#[command(name = "rim-job", version)]
struct Cli {
    /// TOML config file (optional; `RIM_JOB__…` environment variables override it).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config: rim_job::Config =
        match rim_runtime::settings::load(cli.config.as_deref(), "job", &[]) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("rim-job: config error: {e}");
                return ExitCode::from(64);
            }
        };
    if cli.check {
        eprintln!("rim-job: config ok");
        return ExitCode::SUCCESS;
    }
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rim-job: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn serve(config: rim_job::Config) -> anyhow::Result<()> {
    rim_runtime::logging::init(&config.log_level, config.log_json);
    let http = tokio::net::TcpListener::bind(&config.listen.http)
        .await
        .with_context(|| format!("bind listen.http {}", config.listen.http))?;
    let shutdown = rim_runtime::shutdown::on_signal();
    rim_job::run(rim_job::Listeners { http }, config, shutdown).await?;
    Ok(())
}
