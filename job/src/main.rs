//! `rim-job`: parses the command line, loads config, binds the ops listener and runs the job tier.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rim_runtime::cli::{Tier, bind};

const TIER: Tier = Tier {
    bin: "rim-job",
    name: "job",
    list_keys: rim_runtime::redis::LIST_KEYS,
};

/// rim job worker: delivers queued pushes from Redis streams to comets.
#[derive(Debug, Parser)]
#[command(name = "rim-job", version)]
struct Cli {
    /// TOML config file, or the path in `RIM_CONFIG` (containers set it once for the command
    /// and the health check); `RIM_JOB__SECTION__FIELD` variables override its fields.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config: rim_job::Config = match TIER.load(cli.config.as_deref(), cli.check) {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    if cli.probe {
        return TIER.probe(&config.listen.http);
    }
    TIER.serve(config, |config, shutdown| async move {
        let http = bind("listen.http", &config.listen.http).await?;
        rim_job::run(rim_job::Listeners { http }, config, shutdown).await?;
        Ok::<_, anyhow::Error>(())
    })
}
