//! `rim-logic`: parses the CLI, loads and validates config (exit 64 naming the field), starts
//! tracing, binds the listeners and runs [`rim_logic::run`]. `token` issues a client token.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rim_logic::Config;

/// rim logic tier: HTTP push/online API and LogicRpc.
#[derive(Debug, Parser)]
#[command(name = "rim-logic", version)]
struct Cli {
    /// Config file (TOML); `RIM_LOGIC__SECTION__FIELD` environment variables override it.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config and exit 0.
    #[arg(long)]
    check: bool,
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

fn main() {
    let cli = Cli::parse();
    let config: Config = match rim_runtime::settings::load(
        cli.config.as_deref(),
        "logic",
        rim_logic::config::LIST_KEYS,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rim-logic: config error: {e}");
            std::process::exit(64);
        }
    };
    if cli.check {
        eprintln!("rim-logic: config ok");
        return;
    }
    if let Some(Command::Token { mid, ttl_secs }) = cli.command {
        if config.auth.secret.is_empty() {
            eprintln!("rim-logic: config error: auth.secret: must be set to issue tokens");
            std::process::exit(64);
        }
        let token = rim_logic::issue_token(&config.auth.secret, mid, Duration::from_secs(ttl_secs));
        #[allow(clippy::print_stdout)]
        {
            println!("{token}");
        }
        return;
    }
    if let Err(e) = serve(config) {
        eprintln!("rim-logic: {e:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn serve(config: Config) -> anyhow::Result<()> {
    rim_runtime::logging::init(&config.log_level, config.log_json);
    let http = tokio::net::TcpListener::bind(&config.listen.http)
        .await
        .with_context(|| format!("cannot bind listen.http {}", config.listen.http))?;
    let rpc = tokio::net::TcpListener::bind(&config.listen.rpc)
        .await
        .with_context(|| format!("cannot bind listen.rpc {}", config.listen.rpc))?;
    let shutdown = rim_runtime::shutdown::on_signal();
    rim_logic::run(rim_logic::Listeners { http, rpc }, config, shutdown).await?;
    Ok(())
}
