//! The chaos harness (`chaos.rs`, `chaos_network.rs`): a cluster of real processes tuned for
//! fast failure detection, recipients that record every numbered push and reconnect when their
//! comet goes away, a publisher that stages a fault a third of the way through, and the
//! exactly-once, in-order check of what each recipient was owed.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rim_proto::msg::AuthBody;
use rim_testkit::api::{Api, eventually};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{self, CLUSTER_SECRET, CometAddrs, Proc, free_addr};
use rim_testkit::proxy::{FaultProxy, Upstream};
use rim_testkit::test_redis::TestRedis;
use tokio::sync::watch;

pub const ROOM_TYPE: &str = "chaos";
pub const ROOM_ID: &str = "r";
pub const MID_OP: i32 = 1000;
pub const ROOM_OP: i32 = 1001;

pub struct CometProc {
    pub proc: Proc,
    pub server_id: String,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    /// `/metrics` (`listen.ops`).
    pub ops: SocketAddr,
}

impl CometProc {
    pub fn addr(&self, t: Transport) -> SocketAddr {
        if t == Transport::Tcp {
            self.tcp
        } else {
            self.http
        }
    }
}

/// logic + job workers + comets as processes, tuned for fast failure detection.
pub struct ProcCluster {
    pub redis: TestRedis,
    /// Held so the process lives (and is killed) with the cluster.
    pub _logic: Proc,
    pub logic_rpc: SocketAddr,
    /// logic's HTTP API and `/metrics`.
    pub logic_http: SocketAddr,
    pub api: Api,
    pub jobs: Vec<Proc>,
    /// Each job worker's `/metrics` (`listen.http`), in the order of `jobs`.
    pub job_http: Vec<SocketAddr>,
    pub comets: Vec<CometProc>,
    pub comet_env: Vec<(&'static str, String)>,
    pub job_env: Vec<(&'static str, String)>,
}

/// How to start a [`ProcCluster`].
#[derive(Default)]
pub struct ProcOpts {
    pub jobs: usize,
    pub comets: usize,
    /// Over every comet's defaults here.
    pub comet_env: Vec<(&'static str, String)>,
    /// Over every job worker's defaults here.
    pub job_env: Vec<(&'static str, String)>,
    /// Over logic's defaults here (its node TTL is 3 s).
    pub logic_env: Vec<(&'static str, String)>,
    /// What logic and job dial instead of the test Redis (a proxy in front of it).
    pub redis_url: Option<String>,
}

impl ProcCluster {
    pub async fn start(
        jobs: usize,
        comets: usize,
        comet_env: Vec<(&'static str, String)>,
    ) -> ProcCluster {
        Self::start_with(jobs, comets, comet_env, vec![]).await
    }

    /// Like `start`, with extra environment for the job workers too.
    pub async fn start_with(
        jobs: usize,
        comets: usize,
        comet_env: Vec<(&'static str, String)>,
        job_env: Vec<(&'static str, String)>,
    ) -> ProcCluster {
        let opts = ProcOpts {
            jobs,
            comets,
            comet_env,
            job_env,
            ..ProcOpts::default()
        };
        Self::start_opts(TestRedis::from_env(true), opts).await
    }

    /// A cluster on `redis` as `opts` says.
    pub async fn start_opts(redis: TestRedis, opts: ProcOpts) -> ProcCluster {
        let ProcOpts {
            jobs,
            comets,
            comet_env,
            mut job_env,
            logic_env,
            redis_url,
        } = opts;
        let http = free_addr();
        let rpc = free_addr();
        let redis_env = redis.env("LOGIC");
        let url_override = redis_url
            .iter()
            .map(|u| ("RIM_LOGIC__REDIS__URL", u.clone()))
            .collect::<Vec<_>>();
        let logic = Proc::spawn(
            "logic",
            "rim-logic",
            "logic.toml",
            &redis_env
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .chain([
                    ("RIM_LOGIC__LISTEN__HTTP", http.to_string()),
                    ("RIM_LOGIC__LISTEN__RPC", rpc.to_string()),
                    // Fast enough for the comet-kill scenario, slow enough that a comet renewing every
                    // 200 ms keeps its registration through a long stall of a loaded 2-core machine.
                    ("RIM_LOGIC__NODE__TTL_MS", "3000".into()),
                    ("RIM_LOGIC__CLUSTER__SECRET", CLUSTER_SECRET.into()),
                ])
                .chain(url_override)
                .chain(logic_env)
                .collect::<Vec<_>>(),
        );
        let api = Api::new(http);
        if let Some(u) = redis_url {
            job_env.push(("RIM_JOB__REDIS__URL", u));
        }
        let mut c = ProcCluster {
            logic_http: http,
            redis,
            _logic: logic,
            logic_rpc: rpc,
            api,
            jobs: Vec::new(),
            job_http: Vec::new(),
            comets: Vec::new(),
            comet_env,
            job_env,
        };
        c.api_ready().await;
        for _ in 0..jobs {
            c.add_job();
        }
        for _ in 0..comets {
            c.add_comet();
        }
        c.wait_live_nodes(comets).await;
        c
    }

    pub async fn api_ready(&self) {
        let api = self.api.clone();
        eventually("logic ready", Duration::from_secs(20), || {
            let api = api.clone();
            async move {
                api.get("/readyz")
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
                    .map(|_| ())
            }
        })
        .await
        .unwrap();
    }

    pub fn add_job(&mut self) {
        let n = self.jobs.len() + 1;
        let redis_env = self.redis.env("JOB");
        let http = free_addr();
        self.job_http.push(http);
        self.jobs.push(Proc::spawn(
            format!("job-{n}"),
            "rim-job",
            "job.toml",
            &[
                ("RIM_JOB__WORKER_ID", format!("job-{n}")),
                ("RIM_JOB__LISTEN__HTTP", http.to_string()),
                // A dead worker's partitions are taken over within 2 s; a live one renews five
                // times per TTL, so a stall on a loaded machine does not cost it its leases.
                ("RIM_JOB__LEASE__TTL_MS", "2000".into()),
                ("RIM_JOB__LEASE__RENEW_MS", "400".into()),
                ("RIM_JOB__REGISTRY__REFRESH_MS", "200".into()),
                ("RIM_JOB__DELIVERY__RPC_TIMEOUT_MS", "1000".into()),
                ("RIM_JOB__DELIVERY__RETRY_BASE_MS", "20".into()),
                ("RIM_JOB__DELIVERY__RETRY_MAX_MS", "200".into()),
                ("RIM_JOB__STREAM__BLOCK_MS", "200".into()),
                ("RIM_JOB__CLUSTER__SECRET", CLUSTER_SECRET.into()),
            ]
            .into_iter()
            .chain(redis_env.iter().map(|(k, v)| (k.as_str(), v.clone())))
            .chain(self.job_env.iter().cloned())
            .collect::<Vec<_>>(),
        ));
    }

    /// `jobs` workers and two comets, the first of which job reaches through a fault proxy the
    /// test controls (the address logic's registry publishes for it is the proxy's); delivery
    /// gives up far past any fault a test stages.
    pub async fn with_proxied_comet(jobs: usize) -> (ProcCluster, FaultProxy) {
        let mut cluster = ProcCluster::start_with(
            jobs,
            0,
            vec![],
            vec![("RIM_JOB__DELIVERY__GIVE_UP_MS", "60000".into())],
        )
        .await;
        let rpc = free_addr();
        let proxy = FaultProxy::start(Upstream::Tcp(rpc)).await;
        cluster.add_comet_with(
            rpc,
            vec![("RIM_COMET__ADVERTISE__RPC_ADDR", proxy.addr().to_string())],
        );
        cluster.add_comet();
        cluster.wait_live_nodes(2).await;
        (cluster, proxy)
    }

    pub fn add_comet(&mut self) {
        self.add_comet_with(free_addr(), vec![]);
    }

    /// A comet whose `CometRpc` listens on `rpc`, with `extra` environment (after the rest).
    pub fn add_comet_with(&mut self, rpc: SocketAddr, extra: Vec<(&'static str, String)>) {
        let server_id = format!("chaos-comet-{}", self.comets.len() + 1);
        let addrs = CometAddrs {
            http: free_addr(),
            tcp: free_addr(),
            rpc,
            ops: free_addr(),
        };
        let env: Vec<(&str, String)> = self.comet_env.iter().cloned().chain(extra).collect();
        let proc = process::comet(&server_id, addrs, self.logic_rpc, &env);
        self.comets.push(CometProc {
            proc,
            server_id,
            http: addrs.http,
            tcp: addrs.tcp,
            ops: addrs.ops,
        });
    }

    pub async fn live_nodes(&self) -> Vec<String> {
        let r = self.api.get("/goim/nodes/instances").await.unwrap();
        r.data()
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n["server"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn wait_live_nodes(&self, n: usize) {
        let api = self.api.clone();
        eventually("comets registered", Duration::from_secs(20), || {
            let api = api.clone();
            async move {
                let r = api.get("/goim/nodes/instances").await.ok()?;
                (r.data().as_array()?.len() == n).then_some(())
            }
        })
        .await
        .unwrap();
    }

    pub fn addrs(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.comets
            .iter()
            .map(|c| (c.addr(Transport::Tcp), c.addr(Transport::WsBinary)))
            .collect()
    }
}

/// What one recipient saw.
#[derive(Default)]
pub struct Seen {
    pub mid_seqs: Vec<u64>,
    pub room_seqs: Vec<u64>,
    /// When each (re-)authentication completed.
    pub authed_at: Vec<Instant>,
    /// At each reconnect, the highest mid and room numbers received until then.
    pub max_before: Vec<(u64, u64)>,
    pub disconnect_reasons: Vec<String>,
}

/// A client that records every push and, when its comet goes away, reconnects to the next one.
pub struct Recipient {
    pub mid: i64,
    pub home: usize,
    pub seen: Arc<Mutex<Seen>>,
}

pub fn parse_seq(body: &[u8], prefix: u8) -> Option<u64> {
    body.split_first()
        .filter(|(p, _)| **p == prefix)
        .and_then(|(_, n)| std::str::from_utf8(n).ok()?.parse().ok())
}

pub fn spawn_recipient(
    mid: i64,
    transport: Transport,
    home: usize,
    comets: Vec<(SocketAddr, SocketAddr)>,
    stop: watch::Receiver<bool>,
) -> (Recipient, tokio::sync::oneshot::Receiver<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let rec = Recipient {
        mid,
        home,
        seen: seen.clone(),
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let auth = AuthBody {
            mid,
            room_id: format!("{ROOM_TYPE}://{ROOM_ID}"),
            accepts: vec![MID_OP, ROOM_OP],
            platform: "chaos".into(),
            ..Default::default()
        };
        let mut ready_tx = Some(ready_tx);
        let mut node = home;
        'session: loop {
            if *stop.borrow() {
                return;
            }
            let (tcp, ws) = comets[node % comets.len()];
            let addr = if transport == Transport::Tcp { tcp } else { ws };
            let mut client = match Conn::connect(transport, addr, &auth).await {
                Ok(c) => c,
                Err(_) => {
                    // That comet is gone too (or not yet reachable): try the next one.
                    node += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            seen.lock().authed_at.push(Instant::now());
            if let Some(tx) = ready_tx.take() {
                let _ = tx.send(());
            }
            loop {
                if *stop.borrow() {
                    return;
                }
                match client.next_push(Duration::from_millis(200)).await {
                    Ok(None) => {}
                    Ok(Some(r)) => {
                        let mut s = seen.lock();
                        if let Some(n) = parse_seq(&r.frame.body, b'm') {
                            s.mid_seqs.push(n);
                        } else if let Some(n) = parse_seq(&r.frame.body, b'r') {
                            s.room_seqs.push(n);
                        }
                    }
                    Err(_) => {
                        let reason = client
                            .expect_closed()
                            .await
                            .ok()
                            .and_then(|c| c.disconnect_reason);
                        let mut s = seen.lock();
                        if let Some(reason) = reason {
                            s.disconnect_reasons.push(reason);
                        }
                        let top = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
                        let before = (top(&s.mid_seqs), top(&s.room_seqs));
                        s.max_before.push(before);
                        drop(s);
                        node += 1;
                        continue 'session;
                    }
                }
            }
        }
    });
    (rec, ready_rx)
}

/// One published number and its outcome.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub seq: u64,
    pub started: Instant,
    pub accepted: bool,
}

#[derive(Default)]
pub struct Published {
    pub mid: Vec<Sent>,
    pub room: Vec<Sent>,
    /// The first number published after the fault had finished.
    pub after_fault: u64,
}

/// Numbers every scenario publishes after its fault finished, so the recovered path carries
/// real traffic whatever the fault's duration.
pub const AFTER_FAULT: u64 = 30;

/// Publishes at least `count` numbers to the mids and to the room, spaced by `gap`, and fires
/// `fault` when number `fault_at` is about to go out; publishing goes on while the fault is
/// staged, and until `AFTER_FAULT` numbers went out after `fault_done` was set. Numbers whose
/// push was refused are recorded too.
pub async fn publish(
    api: &Api,
    mids: &[i64],
    count: u64,
    gap: Duration,
    fault_at: u64,
    fault: tokio::sync::oneshot::Sender<()>,
    fault_done: &std::sync::atomic::AtomicBool,
) -> Published {
    let mut out = Published::default();
    let mut fault = Some(fault);
    let q: Vec<String> = mids.iter().map(|m| format!("mids={m}")).collect();
    let mids_path = format!("/goim/push/mids?operation={MID_OP}&{}", q.join("&"));
    let room_path = format!("/goim/push/room?operation={ROOM_OP}&type={ROOM_TYPE}&room={ROOM_ID}");
    // A fault that never finishes fails its own wait; this bound only keeps the loop finite.
    let most = count * 40;
    for seq in 1.. {
        if out.after_fault == 0 && fault_done.load(std::sync::atomic::Ordering::SeqCst) {
            out.after_fault = seq;
        }
        if seq > count && out.after_fault > 0 && seq >= out.after_fault + AFTER_FAULT {
            break;
        }
        assert!(
            seq <= most,
            "the fault did not finish within {most} numbers"
        );
        if seq == fault_at
            && let Some(f) = fault.take()
        {
            let _ = f.send(());
        }
        let started = Instant::now();
        let ok = matches!(api.post(&mids_path, format!("m{seq}")).await, Ok(r) if r.status == 200 && r.code() == 0);
        out.mid.push(Sent {
            seq,
            started,
            accepted: ok,
        });
        let started = Instant::now();
        let ok = matches!(api.post(&room_path, format!("r{seq}")).await, Ok(r) if r.status == 200 && r.code() == 0);
        out.room.push(Sent {
            seq,
            started,
            accepted: ok,
        });
        tokio::time::sleep(gap).await; // pacing the publisher, not synchronisation
    }
    out
}

/// Runs the publisher and, concurrently, `fault` once the publisher reaches a third of the way;
/// publishing ends `AFTER_FAULT` numbers after the fault finished (and not before `COUNT`).
pub async fn publish_with_fault<Fut>(
    api: &Api,
    mids: &[i64],
    fault: impl FnOnce() -> Fut,
) -> Published
where
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done = std::sync::atomic::AtomicBool::new(false);
    let staged = async {
        if rx.await.is_ok() {
            fault().await;
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let (published, ()) =
        tokio::join!(publish(api, mids, COUNT, GAP, COUNT / 3, tx, &done), staged);
    published
}

/// The numbers a recipient is owed: every accepted one, except those that could be lost with a
/// session that ended: published before the last authentication and above the highest number
/// the recipient had got by then (order holds, so everything accepted below that was owed to
/// the old session and must have arrived).
pub fn owed(sent: &[Sent], authed_at: &[Instant], max_before_last: Option<u64>) -> BTreeSet<u64> {
    let reauthed = authed_at.last().filter(|_| authed_at.len() > 1);
    sent.iter()
        .filter(|s| s.accepted)
        .filter(|s| match (reauthed, max_before_last) {
            (Some(at), Some(max)) => s.started >= *at || s.seq <= max,
            _ => true,
        })
        .map(|s| s.seq)
        .collect()
}

/// Asserts each recipient authenticated exactly `expected(r)` times, and that one that never
/// had to reconnect was never disconnected.
pub fn assert_sessions(recipients: &[Recipient], expected: impl Fn(&Recipient) -> usize) {
    for r in recipients {
        let s = r.seen.lock();
        let want = expected(r);
        assert_eq!(
            s.authed_at.len(),
            want,
            "mid {} (home {}) authenticated {} times, expected {want}; disconnects: {:?}",
            r.mid,
            r.home,
            s.authed_at.len(),
            s.disconnect_reasons
        );
        if want == 1 {
            assert!(
                s.disconnect_reasons.is_empty(),
                "mid {}: {:?}",
                r.mid,
                s.disconnect_reasons
            );
        }
    }
}

/// Waits until every recipient has what it is owed, then checks exactly-once and order.
pub async fn check(recipients: &[Recipient], published: &Published) {
    for r in recipients {
        let seen = r.seen.clone();
        let (mid_owed, room_owed) = {
            let s = seen.lock();
            let last = s.max_before.last();
            (
                owed(&published.mid, &s.authed_at, last.map(|m| m.0)),
                owed(&published.room, &s.authed_at, last.map(|m| m.1)),
            )
        };
        let done = eventually("recipient caught up", Duration::from_secs(30), || {
            let seen = seen.clone();
            let (m, ro) = (mid_owed.clone(), room_owed.clone());
            async move {
                let s = seen.lock();
                let got_m: BTreeSet<u64> = s.mid_seqs.iter().copied().collect();
                let got_r: BTreeSet<u64> = s.room_seqs.iter().copied().collect();
                (m.is_subset(&got_m) && ro.is_subset(&got_r)).then_some(())
            }
        })
        .await;
        let s = seen.lock();
        for (what, got, owed_set, sent) in [
            ("mid", &s.mid_seqs, &mid_owed, &published.mid),
            ("room", &s.room_seqs, &room_owed, &published.room),
        ] {
            let missing: Vec<_> = owed_set.iter().filter(|n| !got.contains(n)).collect();
            assert!(
                done.is_ok() && missing.is_empty(),
                "mid {} ({what}) is missing {missing:?}",
                r.mid
            );
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "mid {} ({what}) got duplicates or reordering: {got:?}",
                r.mid
            );
            let published: BTreeSet<u64> = sent.iter().map(|s| s.seq).collect();
            assert!(
                got.iter().all(|n| published.contains(n)),
                "mid {} ({what}) got unpublished numbers",
                r.mid
            );
        }
    }
}

/// Recipients: on each comet a TCP and a WebSocket client, all in the room.
pub async fn recipients(cluster: &ProcCluster, stop: &watch::Receiver<bool>) -> Vec<Recipient> {
    let mut out = Vec::new();
    let mut mid = 500;
    for home in 0..cluster.comets.len() {
        for t in [Transport::Tcp, Transport::WsBinary] {
            mid += 1;
            let (r, ready) = spawn_recipient(mid, t, home, cluster.addrs(), stop.clone());
            ready.await.expect("recipient connected");
            out.push(r);
        }
    }
    out
}

pub fn all_accepted(p: &Published) -> bool {
    p.mid.iter().chain(&p.room).all(|s| s.accepted)
}

pub const COUNT: u64 = 150;
pub const WAIT: Duration = Duration::from_secs(10);
pub const GAP: Duration = Duration::from_millis(5);

/// Entries a job worker has read but not acknowledged, over all push streams.
pub fn pending_of(conn: &mut dyn redis::ConnectionLike, worker: &str) -> u64 {
    (0..16u16)
        .map(|p| {
            let r: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XPENDING")
                .arg(rim_proto::keys::push_stream(p))
                .arg(rim_proto::keys::PUSH_GROUP)
                .arg("-")
                .arg("+")
                .arg(1000)
                .arg(worker)
                .query(conn);
            r.map(|v| v.len() as u64).unwrap_or(0)
        })
        .sum()
}

/// The numbers (`m7` → 7, `r7` → 7) of the pushes a worker holds unacknowledged, by kind.
pub fn pending_numbers(conn: &mut dyn redis::ConnectionLike, worker: &str) -> (Vec<u64>, Vec<u64>) {
    let (mut mids, mut rooms) = (Vec::new(), Vec::new());
    for p in 0..16u16 {
        let stream = rim_proto::keys::push_stream(p);
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&stream)
            .arg(rim_proto::keys::PUSH_GROUP)
            .arg("-")
            .arg("+")
            .arg(1000)
            .arg(worker)
            .query(conn)
            .unwrap_or_default();
        for (id, ..) in pending {
            let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(&id)
                .arg(&id)
                .query(conn)
                .unwrap();
            for (kind, n) in entries.ids.iter().filter_map(entry_number) {
                if kind == b'm' {
                    mids.push(n)
                } else {
                    rooms.push(n)
                }
            }
        }
    }
    (mids, rooms)
}

/// The numbers (`m7` → (b'm', 7)) of every push entry in the push streams, read or not.
pub fn stream_numbers(conn: &mut dyn redis::ConnectionLike) -> BTreeSet<(u8, u64)> {
    let mut out = BTreeSet::new();
    for p in 0..16u16 {
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(rim_proto::keys::push_stream(p))
            .arg("-")
            .arg("+")
            .query(conn)
            .unwrap();
        out.extend(entries.ids.iter().filter_map(entry_number));
    }
    out
}

/// The kind and number of a push stream entry published by [`publish`] (`m7` → (b'm', 7)),
/// `None` for any other entry.
fn entry_number(e: &redis::streams::StreamId) -> Option<(u8, u64)> {
    let bytes = e.get::<Vec<u8>>(rim_proto::keys::JOB_FIELD)?;
    let job = rim_proto::job::PushJob::decode(&bytes).unwrap();
    [b'm', b'r']
        .into_iter()
        .find_map(|kind| parse_seq(&job.body, kind).map(|n| (kind, n)))
}

/// The status logic answers a push that is no recipient's (`mids=1`), used to watch an outage
/// begin and end.
pub async fn probe_push(api: &Api) -> Option<(u16, i64)> {
    let r = api
        .post("/goim/push/mids?operation=1000&mids=1", "probe")
        .await
        .ok()?;
    Some((r.status, r.code()))
}
