//! The publisher: pushes `k` payloads through logic's HTTP API or its LogicRpc with `inflight`
//! requests outstanding, at full speed or paced, and records which were acknowledged (2xx) so
//! only acknowledged pushes count as owed, and the watermark each payload carries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rim_proto::room::RoomId;
use rim_proto::rpc::LogicRpcClient;
use rim_runtime::cluster::{Cluster, ClusterConfig};
use rim_runtime::rpc::Link;
use tokio::time::Instant;

use crate::args::{Args, Via};
use crate::payload::{Payload, now_us};
use crate::stats::Histogram;

/// Where push `seq` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A room (`type://id`).
    Room(String),
    /// A user.
    Mid(i64),
}

/// What the publisher did.
#[derive(Debug, Default)]
pub struct Published {
    /// Per seq: answered 2xx.
    pub acked: Vec<bool>,
    /// Failures by reason.
    pub errors: BTreeMap<String, u64>,
    /// Wall clock of the first request (µs).
    pub first_us: u64,
    /// Wall clock when the last answer came (µs).
    pub last_us: u64,
    /// Request round trips.
    pub round_trip: Histogram,
}

impl Published {
    /// Pushes answered 2xx.
    pub fn ok(&self) -> u64 {
        self.acked.iter().filter(|a| **a).count() as u64
    }
}

/// Tracks the highest seq below which every push was acknowledged.
#[derive(Debug)]
struct Watermark {
    inner: std::sync::Mutex<(Vec<bool>, usize)>,
}

impl Watermark {
    fn new(k: usize) -> Self {
        Watermark {
            inner: std::sync::Mutex::new((vec![false; k], 0)),
        }
    }

    /// Highest seq with every seq up to it acknowledged, or `u64::MAX` for none yet.
    fn get(&self) -> u64 {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 == 0 { u64::MAX } else { g.1 as u64 - 1 }
    }

    fn ack(&self, seq: usize) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0[seq] = true;
        while g.1 < g.0.len() && g.0[g.1] {
            g.1 += 1;
        }
    }

    fn into_acked(self) -> Vec<bool> {
        self.inner.into_inner().unwrap_or_else(|e| e.into_inner()).0
    }
}

enum Sender {
    Http {
        client: reqwest::Client,
        base: String,
        secret: String,
    },
    Rpc(Link<LogicRpcClient>),
}

impl Sender {
    fn new(args: &Args) -> anyhow::Result<Sender> {
        Ok(match args.via {
            Via::Http => Sender::Http {
                client: reqwest::Client::builder()
                    .pool_max_idle_per_host(args.inflight)
                    .timeout(Duration::from_secs(10))
                    .build()?,
                base: format!("http://{}", args.http),
                secret: args.push_secret.clone(),
            },
            Via::Rpc => Sender::Rpc(rpc_link(args.rpc, &args.cluster_secret)),
        })
    }

    async fn send(&self, target: &Target, body: Vec<u8>) -> Result<(), String> {
        match self {
            Sender::Http {
                client,
                base,
                secret,
            } => {
                let url = match target {
                    Target::Room(r) => {
                        let room = RoomId::parse(r).map_err(|e| e.to_string())?;
                        format!(
                            "{base}/goim/push/room?operation=1000&type={}&room={}",
                            room.room_type(),
                            room.id_part()
                        )
                    }
                    Target::Mid(m) => format!("{base}/goim/push/mids?operation=1000&mids={m}"),
                };
                let mut req = client.post(url).body(body);
                if !secret.is_empty() {
                    req = req.bearer_auth(secret);
                }
                let resp = req.send().await.map_err(|e| {
                    if e.is_timeout() {
                        "http timeout".to_string()
                    } else {
                        "http error".to_string()
                    }
                })?;
                if resp.status().is_success() {
                    // The body says code 0; drain it so the connection is reused.
                    let _ = resp.bytes().await;
                    Ok(())
                } else {
                    Err(format!("http {}", resp.status().as_u16()))
                }
            }
            Sender::Rpc(link) => {
                let body = Bytes::from(body);
                let ctx = || rim_runtime::rpc::context(Duration::from_secs(10));
                let r = match target {
                    Target::Room(r) => {
                        let room = RoomId::parse(r).map_err(|e| e.to_string())?;
                        link.call(|c| async move { c.push_room(ctx(), 1000, room, body).await })
                            .await
                    }
                    Target::Mid(m) => {
                        let m = *m;
                        link.call(|c| async move { c.push_mids(ctx(), 1000, vec![m], body).await })
                            .await
                    }
                };
                match r {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("rpc refused: {e}")),
                    Err(_) => Err("rpc error".into()),
                }
            }
        }
    }
}

/// A LogicRpc link to `addr`, proving the cluster `secret` (empty: none) at connect.
pub fn rpc_link(addr: SocketAddr, secret: &str) -> Link<LogicRpcClient> {
    let cfg = ClusterConfig {
        secret: secret.to_string(),
        ..ClusterConfig::default()
    };
    let cluster = Cluster::new(&cfg, "bench", Default::default());
    Link::new(
        "logic",
        vec![addr.to_string()],
        Duration::from_secs(2),
        cluster.clone(),
        move |stream| {
            LogicRpcClient::new(tarpc::client::Config::default(), cluster.transport(stream)).spawn()
        },
    )
}

/// Sends every push of `targets` (seq = index) and returns what was acknowledged.
pub async fn publish(args: &Args, targets: Arc<Vec<Target>>) -> anyhow::Result<Published> {
    let sender = Arc::new(Sender::new(args)?);
    let k = targets.len();
    let wm = Arc::new(Watermark::new(k));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let first_us = now_us();
    let rate = args.rate;
    let size = args.payload;
    let mut workers = Vec::new();
    for _ in 0..args.inflight.min(k.max(1)) {
        let (sender, targets, wm, next) =
            (sender.clone(), targets.clone(), wm.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut rtt = Histogram::default();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= targets.len() {
                    break;
                }
                if rate > 0 {
                    let at = start + Duration::from_secs_f64(seq as f64 / rate as f64);
                    tokio::time::sleep_until(at).await;
                }
                let target = &targets[seq];
                let t_us = now_us();
                let body = Payload {
                    seq: seq as u64,
                    wm: wm.get(),
                    t_us,
                    target: match target {
                        Target::Mid(m) => *m,
                        Target::Room(_) => 0,
                    },
                }
                .encode(size);
                match sender.send(target, body).await {
                    Ok(()) => {
                        rtt.record(now_us().saturating_sub(t_us));
                        wm.ack(seq);
                    }
                    Err(e) => *errors.entry(e).or_insert(0) += 1,
                }
            }
            (errors, rtt)
        }));
    }
    let mut out = Published {
        first_us,
        ..Published::default()
    };
    for w in workers {
        let (errors, rtt) = w.await?;
        for (e, n) in errors {
            *out.errors.entry(e).or_insert(0) += n;
        }
        out.round_trip.merge(&rtt);
    }
    out.last_us = now_us();
    out.acked = Arc::try_unwrap(wm)
        .map(Watermark::into_acked)
        .unwrap_or_default();
    Ok(out)
}
