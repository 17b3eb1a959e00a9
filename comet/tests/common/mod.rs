//! The harness shared by comet's end-to-end tests: a fake logic (a tarpc `LogicRpc` server
//! recording calls as events), a comet started against it, a `CometRpc` client playing job, and
//! helpers for rim-client connections (TCP, WebSocket binary and JSON).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use rim_client::{Closed, Conn, Received, Transport};
use rim_comet::{Config, Listeners};
use rim_proto::frame::Frame;
use rim_proto::msg::AuthBody;
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::{
    CometRpcClient, ConnectReply, ConnectRequest, DeliverReport, DeliverTarget, Delivery,
    LogicError, LogicRpc, NodeInfo, OnlineCounts, OnlineReport, PushAccepted, PushId,
    SendMsgRequest, SendTarget, SessionRef, TokenGrant,
};
use tarpc::context::Context;
use tarpc::server::Channel;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(5);

// ---------- fake logic ----------

#[derive(Clone)]
struct FakeLogic {
    events: mpsc::UnboundedSender<String>,
    next: Arc<AtomicU64>,
    heartbeat_secs: u32,
    renews: Arc<Mutex<Vec<(NodeInfo, OnlineReport)>>>,
    sends: Arc<Mutex<Vec<SendMsgRequest>>>,
    /// Key → the `since_ms` its latest connect was given (a counter, so each connect differs).
    sinces: Arc<Mutex<std::collections::HashMap<String, u64>>>,
    /// Keys starting `hang-once` whose first disconnect already hung (past the comet's deadline).
    hung: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Announcements of `slow://` rooms wait until this is true.
    slow_gate: Arc<watch::Sender<bool>>,
    /// `room_changed` of a key starting `gated` waits for a permit of its own.
    changed_gate: Arc<Semaphore>,
}

fn room_name(r: &Option<RoomId>) -> String {
    r.as_ref()
        .map_or_else(|| "-".to_string(), |r| r.to_string())
}

impl LogicRpc for FakeLogic {
    async fn connect(self, _: Context, req: ConnectRequest) -> Result<ConnectReply, LogicError> {
        if req.auth.token == "deny" {
            return Err(LogicError::Unauthorized("bad token".into()));
        }
        let key = if req.auth.key.is_empty() {
            format!("k{}", self.next.fetch_add(1, Ordering::Relaxed))
        } else {
            req.auth.key.clone()
        };
        let room = if req.auth.room_id.is_empty() {
            None
        } else {
            Some(
                RoomId::parse(&req.auth.room_id)
                    .map_err(|e| LogicError::BadRequest(e.to_string()))?,
            )
        };
        let _ = self.events.send(format!("connect {key}"));
        let since_ms = 1_000_000 + self.next.fetch_add(1, Ordering::Relaxed);
        self.sinces.lock().insert(key.clone(), since_ms);
        Ok(ConnectReply {
            since_ms,
            mid: req.auth.mid,
            key,
            room,
            accepts: req.auth.accepts,
            heartbeat_secs: self.heartbeat_secs,
            replaced_elsewhere: false,
            grant: TokenGrant::default(),
            guarded_room_types: Vec::new(),
            rooms: Vec::new(),
            offline_after: None,
            partitions: 16,
        })
    }
    async fn history(
        self,
        _: Context,
        _: SessionRef,
        wants: Vec<rim_proto::history::HistoryWant>,
    ) -> Result<Vec<rim_proto::history::HistoryPage>, LogicError> {
        Ok(vec![Default::default(); wants.len()])
    }
    async fn disconnect(
        self,
        _: Context,
        s: SessionRef,
        _: Option<rim_proto::history::HistoryId>,
    ) -> Result<(), LogicError> {
        if s.key.starts_with("hang-once") && self.hung.lock().insert(s.key.clone()) {
            // A logic blip: this call never answers, the comet's deadline must fire.
            std::future::pending::<()>().await;
        }
        let _ = self.events.send(format!("disconnect {}", s.key));
        Ok(())
    }
    async fn heartbeat(self, _: Context, s: SessionRef) -> Result<(), LogicError> {
        let _ = self.events.send(format!("heartbeat {}", s.key));
        Ok(())
    }
    async fn room_joined(
        self,
        _: Context,
        _server: String,
        room: RoomId,
    ) -> Result<(), LogicError> {
        if room.to_string().starts_with("slow://") {
            // A slow announcement, answered when the test opens the gate: joins of other rooms
            // must not wait for it.
            let _ = self.events.send(format!("room_joining {room}"));
            let _ = self.slow_gate.subscribe().wait_for(|open| *open).await;
        }
        let _ = self.events.send(format!("room_joined {room}"));
        Ok(())
    }
    async fn join_room(self, _: Context, s: SessionRef, room: RoomId) -> Result<(), LogicError> {
        let _ = self.events.send(format!("join_room {} {room}", s.key));
        Ok(())
    }
    async fn leave_room(self, _: Context, s: SessionRef, room: RoomId) -> Result<(), LogicError> {
        let _ = self.events.send(format!("leave_room {} {room}", s.key));
        Ok(())
    }
    async fn renew_node(
        self,
        _: Context,
        node: NodeInfo,
        online: OnlineReport,
    ) -> Result<OnlineCounts, LogicError> {
        self.renews.lock().push((node, online.clone()));
        let _ = self.events.send("renew".into());
        Ok(OnlineCounts {
            rooms: online
                .rooms
                .into_iter()
                .map(|(r, n)| (r, u64::from(n) + 100))
                .collect(),
        })
    }
    async fn unregister_node(self, _: Context, server: String) -> Result<(), LogicError> {
        let _ = self.events.send(format!("unregister {server}"));
        Ok(())
    }
    async fn push_keys(
        self,
        _: Context,
        _: i32,
        _: Vec<String>,
        _: Bytes,
    ) -> Result<PushAccepted, LogicError> {
        Err(LogicError::Internal("not in fake".into()))
    }
    async fn push_mids(
        self,
        _: Context,
        _: i32,
        _: Vec<i64>,
        _: Bytes,
    ) -> Result<PushAccepted, LogicError> {
        Err(LogicError::Internal("not in fake".into()))
    }
    async fn push_room(
        self,
        _: Context,
        _: i32,
        _: RoomId,
        _: Bytes,
    ) -> Result<PushAccepted, LogicError> {
        Err(LogicError::Internal("not in fake".into()))
    }
    async fn push_all(
        self,
        _: Context,
        _: i32,
        _: u32,
        _: Bytes,
    ) -> Result<PushAccepted, LogicError> {
        Err(LogicError::Internal("not in fake".into()))
    }
    /// Mid targets pick the outcome: 403 forbidden, 404 offline, 503 never answers (timeout).
    async fn send_msg(self, _: Context, req: SendMsgRequest) -> Result<PushAccepted, LogicError> {
        match req.target {
            SendTarget::Mid(403) => return Err(LogicError::Forbidden("not allowed".into())),
            SendTarget::Mid(404) => return Err(LogicError::Offline("mid 404".into())),
            // Never answers: the comet's deadline must fire.
            SendTarget::Mid(503) => std::future::pending().await,
            _ => {}
        }
        self.sends.lock().push(req);
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send("send_msg".into());
        Ok(PushAccepted {
            id: format!("msg-{n}"),
            sessions: 1,
            stored: false,
        })
    }
    /// Held for keys starting `gated`: the call is announced (`room_changing ...`) and answered
    /// only when the test adds a permit to `changed_gate`, so a test can check that the client
    /// gets no op 13 while logic has not answered.
    async fn room_changed(
        self,
        _: Context,
        s: SessionRef,
        from: Option<RoomId>,
        to: Option<RoomId>,
    ) -> Result<(), LogicError> {
        let what = format!("{} {} {}", s.key, room_name(&from), room_name(&to));
        if s.key.starts_with("gated") {
            let _ = self.events.send(format!("room_changing {what}"));
            self.changed_gate.acquire().await.unwrap().forget();
        }
        let _ = self.events.send(format!("room_changed {what}"));
        Ok(())
    }
    async fn check_join(
        self,
        _: Context,
        _: SessionRef,
        _: RoomId,
        _: TokenGrant,
    ) -> Result<(), LogicError> {
        Ok(())
    }
    async fn refresh_token(
        self,
        _: Context,
        _: SessionRef,
        _: String,
    ) -> Result<TokenGrant, LogicError> {
        Ok(TokenGrant::default())
    }
}

pub struct Harness {
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    #[allow(dead_code)] // not used by every test binary
    pub shutdown: CancellationToken,
    #[allow(dead_code)] // not used by every test binary
    pub done: tokio::task::JoinHandle<Result<(), rim_comet::RunError>>,
    events: mpsc::UnboundedReceiver<String>,
    #[allow(dead_code)] // not used by every test binary
    pub renews: Arc<Mutex<Vec<(NodeInfo, OnlineReport)>>>,
    #[allow(dead_code)] // not used by every test binary
    pub sends: Arc<Mutex<Vec<SendMsgRequest>>>,
    sinces: Arc<Mutex<std::collections::HashMap<String, u64>>>,
    #[allow(dead_code)] // not used by every test binary
    pub slow_gate: Arc<watch::Sender<bool>>,
    /// One permit answers one held `room_changed` (keys starting `gated`).
    #[allow(dead_code)] // not used by every test binary
    pub changed_gate: Arc<Semaphore>,
    job: CometRpcClient,
    next_push: u64,
}

pub async fn start(tweak: impl FnOnce(&mut Config)) -> Harness {
    start_with(30, tweak).await
}

pub async fn start_with(heartbeat_secs: u32, tweak: impl FnOnce(&mut Config)) -> Harness {
    let (tx, events) = mpsc::unbounded_channel();
    let renews = Arc::new(Mutex::new(Vec::new()));
    let sends = Arc::new(Mutex::new(Vec::new()));
    let sinces = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let slow_gate = Arc::new(watch::Sender::new(false));
    let changed_gate = Arc::new(Semaphore::new(0));
    let fake = FakeLogic {
        slow_gate: slow_gate.clone(),
        changed_gate: changed_gate.clone(),
        hung: Arc::default(),
        sinces: sinces.clone(),
        events: tx,
        next: Arc::new(AtomicU64::new(1)),
        heartbeat_secs,
        renews: renews.clone(),
        sends: sends.clone(),
    };
    let logic_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let logic_addr = logic_l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = logic_l.accept().await {
            let f = fake.clone();
            tokio::spawn(
                tarpc::server::BaseChannel::with_defaults(rim_proto::rpc::transport(s))
                    .execute(f.serve())
                    .for_each(|fut| async {
                        tokio::spawn(fut);
                    }),
            );
        }
    });
    let mut cfg = Config {
        server_id: "comet-test".into(),
        ..Config::default()
    };
    cfg.logic.addrs = vec![logic_addr.to_string()];
    cfg.shutdown_grace_ms = 2000;
    tweak(&mut cfg);
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_a, tcp_a, rpc_a) = (
        http.local_addr().unwrap(),
        tcp.local_addr().unwrap(),
        rpc.local_addr().unwrap(),
    );
    let shutdown = CancellationToken::new();
    let done = tokio::spawn(rim_comet::run(
        Listeners {
            http,
            tcp: Some(tcp),
            wss: None,
            tls: None,
            ops: None,
            rpc,
        },
        cfg,
        shutdown.clone(),
    ));
    let stream = TcpStream::connect(rpc_a).await.unwrap();
    let job = CometRpcClient::new(
        tarpc::client::Config::default(),
        rim_proto::rpc::transport(stream),
    )
    .spawn();
    let mut h = Harness {
        http: http_a,
        tcp: tcp_a,
        shutdown,
        done,
        events,
        renews,
        sends,
        sinces,
        slow_gate,
        changed_gate,
        job,
        next_push: 1,
    };
    h.expect_event("renew").await;
    h
}

impl Harness {
    pub async fn expect_event(&mut self, want: &str) {
        let r = tokio::time::timeout(WAIT, async {
            while let Some(e) = self.events.recv().await {
                if e == want {
                    return;
                }
            }
        })
        .await;
        assert!(r.is_ok(), "no logic event {want:?}");
    }

    /// Logic events recorded so far, without waiting.
    #[allow(dead_code)] // not used by every test binary
    pub fn events_now(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            v.push(e);
        }
        v
    }

    /// The `since_ms` logic gave the latest connect with `key`.
    #[allow(dead_code)] // not used by every test binary
    pub fn since(&self, key: &str) -> u64 {
        self.sinces.lock()[key]
    }

    #[allow(dead_code)] // not used by every test binary
    pub fn kick(&self, key: &str, since_ms: u64) -> DeliverTarget {
        DeliverTarget::Kick {
            key: key.into(),
            since_ms,
        }
    }

    pub fn push_id(&mut self) -> PushId {
        self.next_push += 1;
        PushId {
            partition: 1,
            ms: 1000,
            seq: self.next_push,
        }
    }

    pub async fn deliver(&self, items: Vec<Delivery>) -> DeliverReport {
        let mut ctx = tarpc::context::current();
        ctx.deadline = std::time::Instant::now() + WAIT;
        self.job.deliver(ctx, items).await.unwrap()
    }

    pub async fn push(&mut self, op: i32, body: &str, target: DeliverTarget) -> DeliverReport {
        let id = self.push_id();
        self.deliver(vec![Delivery {
            id,
            op,
            body: Bytes::from(body.to_string()),
            target,
            exclude: None,
            recorded: false,
        }])
        .await
    }

    /// The current value of `series` on `/metrics` (see [`metric_value`]).
    #[allow(dead_code)] // not used by every test binary
    pub async fn metric(&self, series: &str) -> Option<u64> {
        metric_value(&self.http_get("/metrics").await, series)
    }

    /// Every series of `rim_comet_frames_rejected_total` and `rim_comet_auth_failures_total`
    /// that is not 0, as rendered (`name{reason="..."}`, value), in the order rendered.
    #[allow(dead_code)] // not used by every test binary
    pub async fn rejections(&self) -> Vec<(String, u64)> {
        let text = self.http_get("/metrics").await;
        text.lines()
            .filter(|l| {
                l.starts_with("rim_comet_frames_rejected_total{")
                    || l.starts_with("rim_comet_auth_failures_total{")
            })
            .filter_map(|l| {
                let (series, v) = l.rsplit_once(' ')?;
                let v: u64 = v.parse().ok()?;
                (v != 0).then(|| (series.to_string(), v))
            })
            .collect()
    }

    /// Polls `/metrics` until `series` reads `want`, for at most [`WAIT`].
    #[allow(dead_code)] // not used by every test binary
    pub async fn wait_metric(&self, series: &str, want: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.metric(series).await;
            if got == Some(want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {got:?}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn http_get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(self.http).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }
}

// ---------- clients (rim-client's Conn) ----------

pub fn auth(mid: i64, key: &str, room: &str, accepts: &[i32]) -> AuthBody {
    AuthBody {
        mid,
        key: key.into(),
        room_id: room.into(),
        platform: "test".into(),
        accepts: accepts.to_vec(),
        token: String::new(),
        rooms: Vec::new(),
        recover: None,
    }
}

impl Harness {
    /// The TCP listener for TCP, the HTTP one (`/sub`) for WebSocket.
    pub fn addr(&self, t: Transport) -> SocketAddr {
        if t == Transport::Tcp {
            self.tcp
        } else {
            self.http
        }
    }

    /// A connection that has not authenticated.
    #[allow(dead_code)] // not used by every test binary
    pub async fn open(&self, t: Transport) -> Conn {
        Conn::open(t, self.addr(t)).await.unwrap()
    }

    /// An authenticated session (Conn checks that op 8 answers the Auth's seq).
    pub async fn session(
        &self,
        t: Transport,
        mid: i64,
        key: &str,
        room: &str,
        accepts: &[i32],
    ) -> Conn {
        Conn::connect(t, self.addr(t), &auth(mid, key, room, accepts))
            .await
            .unwrap()
    }

    /// An authenticated TCP session of mid 7.
    pub async fn tcp_session(&self, key: &str, room: &str, accepts: &[i32]) -> Conn {
        self.session(Transport::Tcp, 7, key, room, accepts).await
    }
}

/// Sends `op` with an explicit `seq`; returns the next frame `c` reads.
pub async fn request(c: &mut Conn, op: i32, seq: i32, body: impl Into<Bytes>) -> Received {
    c.send_frame(Frame::new(op, seq, body)).await.unwrap();
    c.recv_any().await.unwrap()
}

/// The next frame `c` reads is op 6, then the server closes the connection. Returns how: op 6's
/// reason is `why()`, the WebSocket close code `code`.
#[allow(dead_code)] // not used by every test binary
pub async fn disconnected(c: &mut Conn) -> Closed {
    let r = c.recv_any().await.unwrap();
    assert_eq!(r.frame.op, op::DISCONNECT_REPLY, "{r:?}");
    c.expect_closed().await.unwrap()
}

/// The frame `c` reads within `d`, or `None` when nothing came (without waiting longer).
#[allow(dead_code)] // not used by every test binary
pub async fn quiet_for(c: &mut Conn, d: Duration) -> Option<Received> {
    match c.recv_matching(|_| true, d).await {
        Ok(r) => Some(r),
        Err(rim_client::ClientError::Timeout { .. }) => None,
        Err(e) => panic!("the connection failed while it should stay open: {e}"),
    }
}

/// The value of `series` (a metric name with its labels, as rendered) in a `/metrics` response.
pub fn metric_value(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub fn body_text(r: &Received) -> String {
    String::from_utf8(r.frame.body.to_vec()).unwrap()
}
