//! The three scenarios, shaped like the shared harness's: S1 idle sessions (memory and CPU per
//! session, in session processes of their own), S2 room fan-out and S3 point-to-point pushes
//! (sessions and publisher in this process). Each returns the JSON result; `main` prints it.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use crate::args::{Args, Scenario};
use crate::payload::now_us;
use crate::publish::{Target, publish};
use crate::servers::{Sample, cpu_by_server, delta, scrape_all};
use crate::sessions::{Ctl, Live, check_all, open_all, plan, stop_all};
use crate::stats::{Histogram, Totals};

/// Sockets one session process holds at most (the fd limit here is 20,000 per process).
const PER_PROC: usize = 15_000;

fn progress(args: &Args, msg: impl std::fmt::Display) {
    eprintln!("[rim-bench {:?}] {msg}", args.scenario);
}

/// Every server `/metrics` endpoint: comets (their ops listeners), logic, then `--metrics`.
fn server_addrs(args: &Args) -> Vec<std::net::SocketAddr> {
    let mut v = args.comet_metrics();
    v.push(args.http);
    v.extend(args.metrics.iter().flatten().copied());
    v
}

fn comet_delta(args: &Args, before: &[Option<Sample>], after: &[Option<Sample>]) -> Sample {
    let n = args.ws.len();
    delta(&before[..n], &after[..n])
}

fn kib(bytes: f64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        round(bytes / 1024.0 / n as f64, 2)
    }
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

fn merge_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

/// Runs the scenario `args` names.
pub async fn run(args: &Args) -> anyhow::Result<Value> {
    match args.scenario {
        Scenario::S1 => s1(args).await,
        Scenario::S2 | Scenario::S3 => push_scenario(args).await,
    }
}

// ---------- S1: idle sessions in session processes ----------

/// Child side: opens sessions `start .. start + count`, then follows the parent's commands on
/// stdin (`check`, `exit`), answering each with one JSON line on stdout.
pub async fn child(args: &Args, spec: &str) -> anyhow::Result<()> {
    let (start, count) = spec
        .split_once(',')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .context("--child START,COUNT")?;
    let live = Arc::new(Live::default());
    let (ctl, ctl_rx) = watch::channel(Ctl::Run);
    let opened = open_all(
        plan(args, start, count, None),
        args.conc,
        Duration::from_secs(30),
        live.clone(),
        ctl_rx,
    )
    .await;
    let mut stdout = tokio::io::stdout();
    let line = json!({"event": "connected", "opened": opened.tasks.len(), "failed": opened.failed,
        "secs": opened.elapsed.as_secs_f64()});
    stdout.write_all(format!("{line}\n").as_bytes()).await?;
    stdout.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut round = 0;
    while let Some(cmd) = lines.next_line().await? {
        match cmd.trim() {
            "check" => {
                round += 1;
                let alive = check_all(
                    &live,
                    &ctl,
                    round,
                    opened.tasks.len() as u64,
                    Duration::from_secs(30),
                )
                .await;
                let line = json!({"event": "checked", "alive": alive});
                stdout.write_all(format!("{line}\n").as_bytes()).await?;
                stdout.flush().await?;
            }
            _ => break,
        }
    }
    let outs = stop_all(opened.tasks, &ctl).await;
    let mut ended = BTreeMap::new();
    for o in &outs {
        if let Some(e) = &o.ended {
            *ended.entry(e.clone()).or_insert(0u64) += 1;
        }
    }
    let line = json!({"event": "done", "ended_early": ended});
    stdout.write_all(format!("{line}\n").as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

struct ChildProc {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl ChildProc {
    async fn next(&mut self, want: &str) -> anyhow::Result<Value> {
        while let Some(l) = self.lines.next_line().await? {
            match serde_json::from_str::<Value>(&l) {
                Ok(v) if v["event"] == want => return Ok(v),
                _ => {}
            }
        }
        bail!("session process ended before {want}")
    }

    async fn say(&mut self, cmd: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        Ok(self.stdin.flush().await?)
    }
}

async fn s1(args: &Args) -> anyhow::Result<Value> {
    let n = args.n;
    let procs = if args.procs == 0 {
        n.div_ceil(PER_PROC).max(1)
    } else {
        args.procs
    };
    let http = reqwest::Client::new();
    let addrs = server_addrs(args);
    let before = scrape_all(&http, &addrs).await;
    if let Some((addr, _)) = args
        .comet_metrics()
        .iter()
        .zip(&before)
        .find(|(_, s)| s.is_none())
    {
        bail!(
            "no process figures from http://{addr}/metrics: is the comet up (and a rim build \
             whose /metrics has rim_process_pss_bytes, on Linux)?"
        );
    }
    progress(
        args,
        format!("opening {n} sessions from {procs} process(es)"),
    );
    let exe = std::env::current_exe()?;
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let t0 = Instant::now();
    let mut children = Vec::new();
    for p in 0..procs {
        let start = n * p / procs;
        let count = n * (p + 1) / procs - start;
        let mut child = tokio::process::Command::new(&exe)
            .args(&raw)
            .arg("--child")
            .arg(format!("{start},{count}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a session process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        children.push(ChildProc {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        });
    }
    let mut opened = 0u64;
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    for c in &mut children {
        let v = c.next("connected").await?;
        opened += v["opened"].as_u64().unwrap_or(0);
        if let Ok(f) = serde_json::from_value::<BTreeMap<String, u64>>(v["failed"].clone()) {
            merge_counts(&mut failed, &f);
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let connected = scrape_all(&http, &addrs).await;
    progress(
        args,
        format!(
            "{opened} open in {connect_secs:.1} s; holding {} ms",
            args.hold_ms
        ),
    );
    tokio::time::sleep(Duration::from_millis(args.hold_ms)).await;
    let held = scrape_all(&http, &addrs).await;
    let mut alive = 0;
    for c in &mut children {
        c.say("check").await?;
    }
    for c in &mut children {
        alive += c.next("checked").await?["alive"].as_u64().unwrap_or(0);
    }
    let mut ended: BTreeMap<String, u64> = BTreeMap::new();
    for c in &mut children {
        c.say("exit").await?;
        let v = c.next("done").await?;
        if let Ok(e) = serde_json::from_value::<BTreeMap<String, u64>>(v["ended_early"].clone()) {
            merge_counts(&mut ended, &e);
        }
        let _ = c.child.wait().await;
    }
    let cpu = delta(&before, &connected);
    let mem_all = delta(&before, &held);
    let mem_comet = comet_delta(args, &before, &held);
    let comets_after: f64 = held[..args.ws.len()].iter().flatten().map(|s| s.pss).sum();
    Ok(json!({
        "scenario": "s1", "tool": "rim-bench", "tag": args.tag, "time_us": now_us(),
        "transport": format!("{:?}", args.transport).to_lowercase(), "comets": args.ws.len(),
        "n": n, "procs": procs, "opened": opened, "failed": failed, "alive_after_hold": alive,
        "lost_sessions": opened.saturating_sub(alive), "ended_early": ended,
        "connect_per_s": round(opened as f64 / connect_secs, 0),
        "server_cpu_us_per_session": round(cpu.cpu_s * 1e6 / opened.max(1) as f64, 1),
        "server_cpu_s_by_metrics_addr": cpu_by_server(&addrs, &before, &connected),
        "comet_kib_per_session_pss": kib(mem_comet.pss, opened),
        "comet_kib_per_session_rss": kib(mem_comet.rss, opened),
        "server_kib_per_session_pss": kib(mem_all.pss, opened),
        "comet_pss_mib_after": round(comets_after / 1048576.0, 1),
    }))
}

// ---------- S2 / S3: pushes to live sessions ----------

async fn push_scenario(args: &Args) -> anyhow::Result<Value> {
    let s2 = args.scenario == Scenario::S2;
    let m = args.m;
    let k = args.pushes();
    if m > PER_PROC {
        bail!("--m {m}: at most {PER_PROC} sessions in one process");
    }
    let room = args
        .room
        .clone()
        .unwrap_or_else(|| format!("bench://r{}", now_us() % 1_000_000_000));
    let live = Arc::new(Live::default());
    let (ctl, ctl_rx) = watch::channel(Ctl::Run);
    progress(args, format!("opening {m} sessions"));
    let opened = open_all(
        plan(args, 0, m, s2.then_some(room.as_str())),
        args.conc,
        Duration::from_secs(30),
        live.clone(),
        ctl_rx,
    )
    .await;
    let failed_open = opened.failed_count();
    if opened.tasks.is_empty() {
        bail!("no session opened: {:?}", opened.failed);
    }
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;

    let mut rng_state = args.seed.max(1);
    let mut rnd = move || {
        // xorshift64*: a fixed sequence per seed, so runs are repeatable.
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        rng_state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let targets: Vec<Target> = (0..k)
        .map(|_| {
            if s2 {
                Target::Room(room.clone())
            } else {
                Target::Mid(args.first_mid + (rnd() % m as u64) as i64)
            }
        })
        .collect();
    let targets = Arc::new(targets);
    let http = reqwest::Client::new();
    let addrs = server_addrs(args);
    let before = scrape_all(&http, &addrs).await;
    progress(args, format!("pushing {k} via {:?}", args.via));
    let published = publish(args, targets.clone()).await?;
    let ok = published.ok();
    // Owed deliveries: every acknowledged push, to each member it targets.
    let owed_total: u64 = if s2 {
        ok * opened.tasks.len() as u64
    } else {
        ok
    };
    let idle = Duration::from_millis(args.drain_idle_ms);
    let mut last_progress = (live.delivered.load(Ordering::Relaxed), Instant::now());
    loop {
        let now = live.delivered.load(Ordering::Relaxed);
        if now >= owed_total {
            break;
        }
        if now != last_progress.0 {
            last_progress = (now, Instant::now());
        } else if last_progress.1.elapsed() >= idle {
            progress(
                args,
                format!("no delivery for {idle:?}; {now} of {owed_total}"),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = scrape_all(&http, &addrs).await;
    let outs = stop_all(opened.tasks, &ctl).await;

    let mut totals = Totals::default();
    let mut latency = Histogram::default();
    let mut ended = BTreeMap::new();
    for o in &outs {
        latency.merge(&o.latency);
        if let Some(e) = &o.ended {
            *ended.entry(e.clone()).or_insert(0u64) += 1;
        }
        let owed = targets
            .iter()
            .enumerate()
            .filter(|(seq, t)| {
                published.acked[*seq]
                    && match t {
                        Target::Room(_) => true,
                        Target::Mid(mid) => *mid == o.mid,
                    }
            })
            .map(|(seq, _)| seq as u64);
        totals.add(&o.log, owed);
    }
    // Members that never connected are owed their pushes too.
    let connected: std::collections::HashSet<i64> = outs.iter().map(|o| o.mid).collect();
    let owed_absent: u64 = if s2 {
        failed_open * ok
    } else {
        targets
            .iter()
            .enumerate()
            .filter(|(seq, t)| {
                published.acked[*seq] && matches!(t, Target::Mid(mid) if !connected.contains(mid))
            })
            .count() as u64
    };
    let last = live
        .last_delivery_us
        .load(Ordering::Relaxed)
        .max(published.first_us + 1);
    let secs = (last - published.first_us) as f64 / 1e6;
    let cpu = delta(&before, &after);
    let push_secs = (published.last_us - published.first_us).max(1) as f64 / 1e6;
    Ok(json!({
        "scenario": if s2 { "s2" } else { "s3" }, "tool": "rim-bench", "tag": args.tag,
        "time_us": now_us(), "transport": format!("{:?}", args.transport).to_lowercase(),
        "via": format!("{:?}", args.via).to_lowercase(), "m": m, "k": k,
        "inflight": args.inflight, "rate": args.rate, "payload": args.payload,
        "opened": outs.len(), "failed_open": failed_open, "ended_early": ended,
        "pushes_ok": ok, "push_errors": published.errors,
        "pushes_per_s": round(ok as f64 / push_secs, 0),
        "deliveries": totals.unique, "deliveries_per_s": round(totals.unique as f64 / secs, 0),
        "lost": totals.lost + owed_absent,
        "dup": totals.dup, "ooo_raw": totals.ooo_raw, "ooo_causal": totals.ooo_causal,
        "misdelivered": totals.misdelivered,
        "latency_ms": {"p50": round(latency.quantile_ms(0.5), 3), "p95": round(latency.quantile_ms(0.95), 3),
            "p99": round(latency.quantile_ms(0.99), 3), "max": round(latency.max_ms(), 3)},
        "latency_samples": latency.count(),
        "push_rtt_ms": {"p50": round(published.round_trip.quantile_ms(0.5), 3),
            "p99": round(published.round_trip.quantile_ms(0.99), 3)},
        "server_cpu_s": round(cpu.cpu_s, 3),
        "server_cpu_s_by_metrics_addr": cpu_by_server(&addrs, &before, &after),
        "server_cpu_us_per_push": round(cpu.cpu_s * 1e6 / ok.max(1) as f64, 1),
        "deliveries_per_server_cpu_s": round(totals.unique as f64 / cpu.cpu_s.max(1e-9), 0),
    }))
}
