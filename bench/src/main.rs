//! `rim-bench`: rim's load tool. Thin: parse, validate (exit 64 naming the option), run the
//! scenario under `--max-secs`, print a summary on stderr and one JSON line on stdout.
#![forbid(unsafe_code)]

mod args;
mod payload;
mod publish;
mod scenario;
mod servers;
mod sessions;
mod stats;

use std::time::Duration;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = args::Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("rim-bench: {e}");
        return std::process::ExitCode::from(64);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rim-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let limit = Duration::from_secs(args.max_secs);
    let result = rt.block_on(async {
        if let Some(spec) = &args.child {
            return scenario::child(&args, spec).await.map(|()| None);
        }
        match tokio::time::timeout(limit, scenario::run(&args)).await {
            Ok(r) => r.map(Some),
            Err(_) => Err(anyhow::anyhow!("--max-secs {} reached", args.max_secs)),
        }
    });
    // Session tasks may still be closing; do not wait for them.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(Some(v)) => {
            summary(&v);
            #[allow(clippy::print_stdout)]
            {
                println!("{v}");
            }
            std::process::ExitCode::SUCCESS
        }
        Ok(None) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rim-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A few human lines on stderr.
fn summary(v: &serde_json::Value) {
    let g = |k: &str| v.get(k).cloned().unwrap_or_default();
    match v["scenario"].as_str() {
        Some("s1") => eprintln!(
            "S1 {} {} sessions: opened {}, alive after hold {}, {} connects/s, comet {} KiB/session (PSS), server CPU {} µs/session",
            g("transport"),
            g("n"),
            g("opened"),
            g("alive_after_hold"),
            g("connect_per_s"),
            g("comet_kib_per_session_pss"),
            g("server_cpu_us_per_session")
        ),
        _ => eprintln!(
            "{} {} × {} pushes: {} pushes/s, {} deliveries/s, latency p50 {} ms p99 {} ms; lost {} dup {} ooo causal {} misdelivered {}; {} deliveries per server CPU-s",
            v["scenario"].as_str().unwrap_or("?").to_uppercase(),
            g("m"),
            g("k"),
            g("pushes_per_s"),
            g("deliveries_per_s"),
            v["latency_ms"]["p50"],
            v["latency_ms"]["p99"],
            g("lost"),
            g("dup"),
            g("ooo_causal"),
            g("misdelivered"),
            g("deliveries_per_server_cpu_s")
        ),
    }
}
