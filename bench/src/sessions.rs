//! Opening many sessions with rim-client and keeping them: each session is one task that
//! heartbeats at the interval the server asked for, records every push into its [`MemberLog`],
//! answers liveness checks, and hands its log back when told to stop.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use rim_client::{ClientError, Conn, ConnectOptions, Transport};
use rim_proto::msg::AuthBody;
use rim_proto::op;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::args::{Args, TransportArg};
use crate::payload::now_us;
use crate::stats::{Histogram, MemberLog};

/// One session to open.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Comet listener.
    pub addr: SocketAddr,
    /// Transport.
    pub transport: Transport,
    /// Source address.
    pub local_ip: IpAddr,
    /// Auth body.
    pub auth: AuthBody,
}

/// Sessions `start .. start + count`: mid `first_mid + i`, comet `i % comets`, transport by
/// `--transport`, source address by `--src-ips`, in `room` when given.
pub fn plan(args: &Args, start: usize, count: usize, room: Option<&str>) -> Vec<Plan> {
    (start..start + count)
        .map(|i| {
            let transport = match args.transport {
                TransportArg::Ws => Transport::WsBinary,
                TransportArg::Json => Transport::WsJson,
                TransportArg::Tcp => Transport::Tcp,
                TransportArg::Mix => {
                    [Transport::WsBinary, Transport::Tcp, Transport::WsJson][i % 3]
                }
            };
            let comet = i % args.ws.len();
            let addr = match transport {
                Transport::Tcp => args.tcp[comet],
                _ => args.ws[comet],
            };
            Plan {
                addr,
                transport,
                local_ip: args.src_ip(i),
                auth: AuthBody {
                    mid: args.first_mid + i as i64,
                    room_id: room.unwrap_or_default().to_string(),
                    platform: "bench".into(),
                    accepts: vec![1000],
                    ..AuthBody::default()
                },
            }
        })
        .collect()
}

/// What every session task updates as it goes (read by the orchestrator while waiting).
#[derive(Debug, Default)]
pub struct Live {
    /// Pushes received (all sessions, duplicates included).
    pub delivered: AtomicU64,
    /// Wall clock of the latest push received (µs).
    pub last_delivery_us: AtomicU64,
    /// Sessions that answered the latest liveness check.
    pub checked: AtomicU64,
    /// Sessions that ended before being told to stop.
    pub lost_sessions: AtomicU64,
}

/// What the orchestrator tells every session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctl {
    /// Keep going.
    Run,
    /// Send a heartbeat and count the reply in [`Live::checked`] (the number tells rounds apart).
    Check(u32),
    /// Close and return the log.
    Stop,
}

/// How one session ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Its mid.
    pub mid: i64,
    /// What it received.
    pub log: MemberLog,
    /// Push latencies.
    pub latency: Histogram,
    /// Why it ended early, if it did.
    pub ended: Option<String>,
}

/// The opened sessions.
pub struct Opened {
    /// One task per session.
    pub tasks: Vec<JoinHandle<Outcome>>,
    /// Sessions that could not be opened, by reason.
    pub failed: BTreeMap<String, u64>,
    /// Time from the first handshake to the last.
    pub elapsed: Duration,
}

impl Opened {
    /// Sessions that failed to open.
    pub fn failed_count(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// A short, countable name for an error (`connect: Connection refused (os error 111)` → key).
fn reason(e: &ClientError) -> String {
    let s = e.to_string();
    s.split(" (os error")
        .next()
        .unwrap_or(&s)
        .chars()
        .take(120)
        .collect()
}

/// Opens every plan with `conc` handshakes in flight; each opened session starts its task.
pub async fn open_all(
    plans: Vec<Plan>,
    conc: usize,
    wait: Duration,
    live: Arc<Live>,
    ctl: watch::Receiver<Ctl>,
) -> Opened {
    let t0 = Instant::now();
    let mut failed = BTreeMap::new();
    let mut tasks = Vec::with_capacity(plans.len());
    let mut results = futures::stream::iter(plans)
        .map(|p| async move {
            let o = ConnectOptions {
                addr: p.addr,
                transport: p.transport,
                local_ip: Some(p.local_ip),
                wait,
                tls: None,
            };
            let mut conn = Conn::open_with(&o).await?;
            let reply = conn.auth(&p.auth).await?;
            Ok::<_, ClientError>((conn, p.auth.mid, reply.heartbeat))
        })
        .buffer_unordered(conc.max(1));
    while let Some(r) = results.next().await {
        match r {
            Ok((conn, mid, hb)) => {
                let hb = Duration::from_secs(u64::from(hb.max(1)));
                tasks.push(tokio::spawn(run(conn, mid, hb, live.clone(), ctl.clone())));
            }
            Err(e) => *failed.entry(reason(&e)).or_insert(0) += 1,
        }
    }
    Opened {
        tasks,
        failed,
        elapsed: t0.elapsed(),
    }
}

async fn run(
    mut conn: Conn,
    mid: i64,
    heartbeat: Duration,
    live: Arc<Live>,
    mut ctl: watch::Receiver<Ctl>,
) -> Outcome {
    let mut out = Outcome {
        mid,
        ..Outcome::default()
    };
    // The payload's target is 0 for room pushes; a session only checks misdelivery by mid.
    let mut next_hb = tokio::time::Instant::now() + heartbeat;
    let mut check: Option<i32> = None;
    loop {
        tokio::select! {
            changed = ctl.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *ctl.borrow_and_update();
                match now {
                    Ctl::Stop => break,
                    Ctl::Run => {}
                    Ctl::Check(_) => match conn.send_op(op::HEARTBEAT, Bytes::new()).await {
                        Ok(seq) => check = Some(seq),
                        Err(e) => {
                            out.ended = Some(reason(&e));
                            break;
                        }
                    },
                }
            }
            _ = tokio::time::sleep_until(next_hb) => {
                next_hb += heartbeat;
                if let Err(e) = conn.send_op(op::HEARTBEAT, Bytes::new()).await {
                    out.ended = Some(reason(&e));
                    break;
                }
            }
            r = conn.read_message() => match r {
                Ok(frames) => {
                    let now = now_us();
                    for r in frames {
                        if r.is_push() {
                            out.log.record(&r.frame.body, mid, now, &mut out.latency);
                            live.delivered.fetch_add(1, Ordering::Relaxed);
                            live.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                        } else if r.frame.op == op::HEARTBEAT_REPLY && check == Some(r.frame.seq) {
                            check = None;
                            live.checked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => {
                    out.ended = Some(reason(&e));
                    break;
                }
            },
        }
    }
    if out.ended.is_some() {
        live.lost_sessions.fetch_add(1, Ordering::Relaxed);
    } else {
        conn.close().await;
    }
    out
}

/// Tells every session to stop and collects their outcomes.
pub async fn stop_all(tasks: Vec<JoinHandle<Outcome>>, ctl: &watch::Sender<Ctl>) -> Vec<Outcome> {
    let _ = ctl.send(Ctl::Stop);
    let mut outs = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(o) = t.await {
            outs.push(o);
        }
    }
    outs
}

/// Sends a heartbeat on every session and waits (up to `wait`) until all answered; returns how
/// many did.
pub async fn check_all(
    live: &Live,
    ctl: &watch::Sender<Ctl>,
    round: u32,
    sessions: u64,
    wait: Duration,
) -> u64 {
    live.checked.store(0, Ordering::Relaxed);
    let _ = ctl.send(Ctl::Check(round));
    let deadline = Instant::now() + wait;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < deadline {
        tick.tick().await;
        let lost = live.lost_sessions.load(Ordering::Relaxed);
        if live.checked.load(Ordering::Relaxed) + lost >= sessions {
            break;
        }
    }
    let _ = ctl.send(Ctl::Run);
    live.checked.load(Ordering::Relaxed)
}
