//! `rim-logic`: parses the CLI, loads and validates config (exit 64 naming the field), starts
//! tracing, binds the listeners and runs [`rim_logic::run`]. `token` issues a client token.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rim_logic::Config;
use rim_runtime::cli::{Tier, bind};

const TIER: Tier = Tier {
    bin: "rim-logic",
    name: "logic",
    list_keys: rim_logic::config::LIST_KEYS,
};

/// rim logic tier: HTTP push/online API and LogicRpc.
#[derive(Debug, Parser)]
#[command(name = "rim-logic", version)]
struct Cli {
    /// TOML config file, or the path in `RIM_CONFIG` (containers set it once for the command
    /// and the health check); `RIM_LOGIC__SECTION__FIELD` variables override its fields.
    #[arg(long, env = "RIM_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config and exit 0.
    #[arg(long)]
    check: bool,
    /// Ask the instance this config describes for `/readyz` on its HTTP listener; exit 0 when
    /// it is ready, 1 when not (container health checks).
    #[arg(long)]
    probe: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a client token signed with `auth.secret`.
    Token {
        /// User id the token is for.
        #[arg(long, allow_negative_numbers = true)]
        mid: i64,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
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
    if let Some(Command::Token { mid, ttl_secs }) = cli.command {
        if config.auth.secret.is_empty() {
            return TIER.config_error("auth.secret", "must be set to issue tokens");
        }
        let token = rim_logic::issue_token(&config.auth.secret, mid, Duration::from_secs(ttl_secs));
        #[allow(clippy::print_stdout)]
        {
            println!("{token}");
        }
        return ExitCode::SUCCESS;
    }
    TIER.serve(config, |config, shutdown| async move {
        let http = bind("listen.http", &config.listen.http).await?;
        let rpc = bind("listen.rpc", &config.listen.rpc).await?;
        rim_logic::run(rim_logic::Listeners { http, rpc }, config, shutdown).await?;
        Ok::<_, anyhow::Error>(())
    })
}
