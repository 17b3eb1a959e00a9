//! End-to-end tests of the comet against a fake logic (a tarpc `LogicRpc` server recording calls),
//! driven by rim-client connections (TCP, WebSocket binary and JSON) and a `CometRpc` client
//! playing job.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use rim_client::{ClientError, Closed, Conn, Received, Transport};
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
use rim_testkit::client::raw_frame;
use tarpc::context::Context;
use tarpc::server::Channel;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

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
    /// Slow on purpose: the event is recorded only after a delay, so a comet that replied op 13
    /// without awaiting this would be caught.
    async fn room_changed(
        self,
        _: Context,
        s: SessionRef,
        from: Option<RoomId>,
        to: Option<RoomId>,
    ) -> Result<(), LogicError> {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let _ = self.events.send(format!(
            "room_changed {} {} {}",
            s.key,
            room_name(&from),
            room_name(&to)
        ));
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

struct Harness {
    http: SocketAddr,
    tcp: SocketAddr,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<Result<(), rim_comet::RunError>>,
    events: mpsc::UnboundedReceiver<String>,
    renews: Arc<Mutex<Vec<(NodeInfo, OnlineReport)>>>,
    sends: Arc<Mutex<Vec<SendMsgRequest>>>,
    sinces: Arc<Mutex<std::collections::HashMap<String, u64>>>,
    slow_gate: Arc<watch::Sender<bool>>,
    job: CometRpcClient,
    next_push: u64,
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Harness {
    start_with(30, tweak).await
}

async fn start_with(heartbeat_secs: u32, tweak: impl FnOnce(&mut Config)) -> Harness {
    let (tx, events) = mpsc::unbounded_channel();
    let renews = Arc::new(Mutex::new(Vec::new()));
    let sends = Arc::new(Mutex::new(Vec::new()));
    let sinces = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let slow_gate = Arc::new(watch::Sender::new(false));
    let fake = FakeLogic {
        slow_gate: slow_gate.clone(),
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
        job,
        next_push: 1,
    };
    h.expect_event("renew").await;
    h
}

impl Harness {
    async fn expect_event(&mut self, want: &str) {
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

    /// The `since_ms` logic gave the latest connect with `key`.
    fn since(&self, key: &str) -> u64 {
        self.sinces.lock()[key]
    }

    fn kick(&self, key: &str, since_ms: u64) -> DeliverTarget {
        DeliverTarget::Kick {
            key: key.into(),
            since_ms,
        }
    }

    fn push_id(&mut self) -> PushId {
        self.next_push += 1;
        PushId {
            partition: 1,
            ms: 1000,
            seq: self.next_push,
        }
    }

    async fn deliver(&self, items: Vec<Delivery>) -> DeliverReport {
        let mut ctx = tarpc::context::current();
        ctx.deadline = std::time::Instant::now() + WAIT;
        self.job.deliver(ctx, items).await.unwrap()
    }

    async fn push(&mut self, op: i32, body: &str, target: DeliverTarget) -> DeliverReport {
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

    async fn http_get(&self, path: &str) -> String {
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

fn auth(mid: i64, key: &str, room: &str, accepts: &[i32]) -> AuthBody {
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
    fn addr(&self, t: Transport) -> SocketAddr {
        if t == Transport::Tcp {
            self.tcp
        } else {
            self.http
        }
    }

    /// A connection that has not authenticated.
    async fn open(&self, t: Transport) -> Conn {
        Conn::open(t, self.addr(t)).await.unwrap()
    }

    /// An authenticated session (Conn checks that op 8 answers the Auth's seq).
    async fn session(
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
    async fn tcp_session(&self, key: &str, room: &str, accepts: &[i32]) -> Conn {
        self.session(Transport::Tcp, 7, key, room, accepts).await
    }
}

/// Sends `op` with an explicit `seq`; returns the next frame `c` reads.
async fn request(c: &mut Conn, op: i32, seq: i32, body: impl Into<Bytes>) -> Received {
    c.send_frame(Frame::new(op, seq, body)).await.unwrap();
    c.recv_any().await.unwrap()
}

/// Sends SendMsg (op 4); returns the body of the next frame, which must be its op 5.
async fn send_msg(c: &mut Conn, seq: i32, body: &str) -> serde_json::Value {
    let r = request(c, op::SEND_MSG, seq, body.to_string()).await;
    assert_eq!(
        (r.frame.op, r.frame.seq),
        (op::SEND_MSG_REPLY, seq),
        "{r:?}"
    );
    serde_json::from_slice(&r.frame.body).unwrap()
}

/// The next frame `c` reads is op 6, then the server closes the connection. Returns how: op 6's
/// reason is `why()`, the WebSocket close code `code`.
async fn disconnected(c: &mut Conn) -> Closed {
    let r = c.recv_any().await.unwrap();
    assert_eq!(r.frame.op, op::DISCONNECT_REPLY, "{r:?}");
    c.expect_closed().await.unwrap()
}

/// The frames of exactly one transport message (one WebSocket message: an op 9 batch unpacked,
/// or a JSON array split).
async fn one_message(c: &mut Conn) -> Vec<Received> {
    let before = c.messages_received;
    let frames = tokio::time::timeout(c.wait, c.read_message())
        .await
        .expect("no message")
        .unwrap();
    assert_eq!(c.messages_received, before + 1, "{frames:?}");
    frames
}

fn body_text(r: &Received) -> String {
    String::from_utf8(r.frame.body.to_vec()).unwrap()
}

// ---------- tests ----------

#[tokio::test]
async fn tcp_auth_heartbeat_filter_dedupe_and_room() {
    let mut h = start(|_| {}).await;
    let mut c = h.tcp_session("a", "live://1", &[1000]).await;
    // room_joined reached logic before the AuthReply.
    h.expect_event("room_joined live://1").await;

    c.send_frame(Frame {
        ver: 0,
        ..Frame::new(op::HEARTBEAT, 5, Bytes::new())
    })
    .await
    .unwrap();
    let hb = c.recv_any().await.unwrap().frame;
    assert_eq!(
        (hb.op, hb.seq, &hb.body[..]),
        (op::HEARTBEAT_REPLY, 5, &1i32.to_be_bytes()[..])
    );

    let id = h.push_id();
    let item = Delivery {
        id,
        op: 1000,
        body: Bytes::from_static(b"hello"),
        target: DeliverTarget::Keys(vec!["a".into(), "nobody".into()]),
        exclude: None,
        recorded: false,
    };
    let r = h.deliver(vec![item.clone()]).await;
    assert_eq!((r.queued, r.missing, r.duplicates), (1, 1, 0));
    let p = c.recv_any().await.unwrap().frame;
    assert_eq!((p.op, &p.body[..]), (1000, &b"hello"[..]));

    // Same push id again: suppressed.
    let r = h.deliver(vec![item]).await;
    assert_eq!((r.queued, r.duplicates), (0, 1));

    // Op not accepted: skipped; after Sub it is delivered.
    let r = h
        .push(1001, "x", DeliverTarget::Keys(vec!["a".into()]))
        .await;
    assert_eq!(r.queued, 0);
    let s = request(&mut c, op::SUB, 9, "1001").await.frame;
    assert_eq!((s.op, s.seq, &s.body[..]), (op::SUB_REPLY, 9, &b"1001"[..]));
    let r = h
        .push(
            1001,
            "y",
            DeliverTarget::Room(RoomId::parse("live://1").unwrap()),
        )
        .await;
    assert_eq!(r.queued, 1);
    let p = c.recv_any().await.unwrap().frame;
    assert_eq!((p.op, &p.body[..]), (1001, &b"y"[..]));

    // Unsub; All reaches only accepting sessions.
    let u = request(&mut c, op::UNSUB, 10, "1001").await.frame;
    assert_eq!(u.op, op::UNSUB_REPLY);
    let r = h.push(1001, "z", DeliverTarget::All { speed: 0 }).await;
    assert_eq!(r.queued, 0);
    let r = h.push(1000, "all", DeliverTarget::All { speed: 0 }).await;
    assert_eq!(r.queued, 1);
    assert_eq!(&c.recv_any().await.unwrap().frame.body[..], b"all");

    // A bad SendMsg is answered, not fatal.
    let m = request(&mut c, op::SEND_MSG, 11, "{}").await.frame;
    assert_eq!((m.op, m.seq), (op::SEND_MSG_REPLY, 11));
    assert!(String::from_utf8_lossy(&m.body).contains("-400"));

    // Client leaves: logic hears about it.
    drop(c);
    h.expect_event("disconnect a").await;
}

#[tokio::test]
async fn change_room_success_and_refusal_keep_session() {
    let mut h = start(|_| {}).await;
    let mut c = h.tcp_session("cr", "", &[1000]).await;
    let r = request(&mut c, op::CHANGE_ROOM, 3, "bad room").await.frame;
    assert_eq!((r.op, r.seq), (op::CHANGE_ROOM_REPLY, 3));
    assert!(
        String::from_utf8_lossy(&r.body).contains("bad room id"),
        "{r:?}"
    );
    let r = request(&mut c, op::SUB, 4, "1000,x").await.frame;
    assert_eq!(r.op, op::SUB_REPLY);
    assert!(String::from_utf8_lossy(&r.body).contains("error"));

    let r = request(&mut c, op::CHANGE_ROOM, 4, "chat://9").await.frame;
    assert_eq!(
        (r.op, &r.body[..]),
        (op::CHANGE_ROOM_REPLY, &b"chat://9"[..])
    );
    h.expect_event("room_joined chat://9").await;
    let room = RoomId::parse("chat://9").unwrap();
    let rep = h
        .push(1000, "in room", DeliverTarget::Room(room.clone()))
        .await;
    assert_eq!(rep.queued, 1);
    assert_eq!(&c.recv_any().await.unwrap().frame.body[..], b"in room");

    // Leave with an empty body.
    let r = request(&mut c, op::CHANGE_ROOM, 5, Bytes::new())
        .await
        .frame;
    assert_eq!(r.op, op::CHANGE_ROOM_REPLY);
    let rep = h.push(1000, "gone", DeliverTarget::Room(room)).await;
    assert_eq!(rep.queued, 0);
}

#[tokio::test]
async fn ws_binary_auth_heartbeat_and_op9_pushes() {
    let mut h = start(|_| {}).await;
    let mut ws = h.open(Transport::WsBinary).await;
    // Conn checks that op 8 answers the Auth's seq.
    let a = ws.auth(&auth(3, "w", "live://2", &[1000])).await.unwrap();
    assert_eq!((a.key.as_str(), a.room_id.as_str()), ("w", "live://2"));
    let hb = request(&mut ws, op::HEARTBEAT, 2, Bytes::new()).await;
    assert_eq!((hb.frame.op, hb.frame.seq), (op::HEARTBEAT_REPLY, 2));
    assert!(hb.json_body.is_none(), "a binary message: {hb:?}");

    let room = RoomId::parse("live://2").unwrap();
    let items = (0..3)
        .map(|i| Delivery {
            id: h.push_id(),
            op: 1000,
            body: Bytes::from(format!("m{i}")),
            target: DeliverTarget::Room(room.clone()),
            exclude: None,
            recorded: false,
        })
        .collect::<Vec<_>>();
    let r = h.deliver(items).await;
    assert_eq!(r.queued, 3);
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = ws.recv_any().await.unwrap();
        assert!(p.in_raw, "pushes come wrapped in op 9: {p:?}");
        got.push(body_text(&p));
    }
    assert_eq!(got, vec!["m0", "m1", "m2"], "order kept");

    // A binary frame inside a text message is accepted too. Hand-made: Conn sends frames as
    // binary messages, and the point is goim's binary-in-text compatibility.
    let in_text = Frame::new(op::HEARTBEAT, 3, Bytes::new())
        .to_bytes()
        .to_vec();
    ws.send_text(&String::from_utf8(in_text).unwrap())
        .await
        .unwrap();
    let hb = ws.recv_any().await.unwrap();
    assert_eq!(hb.frame.op, op::HEARTBEAT_REPLY);
    assert!(hb.json_body.is_none(), "a binary message: {hb:?}");
}

#[tokio::test]
async fn ws_json_mode() {
    let mut h = start(|_| {}).await;
    let mut ws = h.open(Transport::WsJson).await;
    // Conn checks that op 8 answers the Auth's seq.
    let a = ws.auth(&auth(5, "j", "live://3", &[1000])).await.unwrap();
    assert_eq!(a.key, "j");
    let hb = request(&mut ws, op::HEARTBEAT, 2, Bytes::new()).await;
    assert_eq!(
        (hb.frame.op, hb.frame.seq, hb.json_body),
        (
            op::HEARTBEAT_REPLY,
            2,
            Some(serde_json::json!({"online":1}))
        )
    );
    h.push(
        1000,
        r#"{"hello":"json"}"#,
        DeliverTarget::Keys(vec!["j".into()]),
    )
    .await;
    let p = ws.recv_any().await.unwrap();
    assert_eq!(
        (p.frame.op, p.frame.seq, p.json_body),
        (1000, 0, Some(serde_json::json!({"hello":"json"})))
    );
    let cr = request(&mut ws, op::CHANGE_ROOM, 3, "live://4").await;
    assert_eq!(
        (cr.frame.op, cr.frame.seq, cr.json_body),
        (
            op::CHANGE_ROOM_REPLY,
            3,
            Some(serde_json::json!("live://4"))
        )
    );
    // Not a JSON frame: protocol error.
    ws.send_text(r#"{"op":"x"}"#).await.unwrap();
    assert_eq!(ws.expect_closed().await.unwrap().code, Some(1002));
}

#[tokio::test]
async fn first_frame_must_be_auth() {
    let h = start(|_| {}).await;
    let mut c = h.open(Transport::Tcp).await;
    c.send_op(op::HEARTBEAT, Bytes::new()).await.unwrap();
    assert!(disconnected(&mut c).await.said("op 7"));

    let mut ws = h.open(Transport::WsBinary).await;
    ws.send_op(op::HEARTBEAT, Bytes::new()).await.unwrap();
    assert_eq!(disconnected(&mut ws).await.code, Some(1008));
}

#[tokio::test]
async fn bad_auth_body_and_refusal() {
    let h = start(|_| {}).await;
    let mut c = h.open(Transport::Tcp).await;
    c.send_op(op::AUTH, Bytes::from_static(b"{not json"))
        .await
        .unwrap();
    let closed = disconnected(&mut c).await;
    assert!(closed.why().starts_with("bad auth body: "), "{closed:?}");

    let deny = AuthBody {
        mid: 1,
        token: "deny".into(),
        ..AuthBody::default()
    };
    match Conn::connect(Transport::Tcp, h.tcp, &deny).await {
        Err(ClientError::AuthRefused(closed)) => {
            assert!(closed.said("unauthorized"), "{closed:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let m = h.http_get("/metrics").await;
    assert!(
        m.contains(r#"rim_comet_auth_failures_total{reason="bad_body"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"rim_comet_auth_failures_total{reason="refused"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn malformed_frames_close_with_1002_and_1009() {
    let h = start(|c| c.session.max_body = 128).await;
    let mut ws = h.open(Transport::WsBinary).await;
    // An Auth frame whose header claims a headerLen of 12 instead of 16.
    ws.send_raw(raw_frame(18, 12, op::AUTH, b"{}"))
        .await
        .unwrap();
    let closed = ws.expect_closed().await.unwrap();
    assert_eq!(closed.code, Some(1002));
    assert!(closed.reason.contains("headerLen"), "{closed:?}");

    let mut ws = h.open(Transport::WsBinary).await;
    ws.send_op(op::AUTH, vec![b' '; 129]).await.unwrap();
    assert_eq!(ws.expect_closed().await.unwrap().code, Some(1009));

    // TCP: op 6 with the reason, then the close.
    let mut c = h.open(Transport::Tcp).await;
    c.send_op(op::AUTH, vec![b' '; 129]).await.unwrap();
    assert!(disconnected(&mut c).await.said("exceeds"));

    // Other clients are still served.
    let _ok = h.tcp_session("still", "", &[]).await;
}

#[tokio::test]
async fn auth_timeout_closes() {
    let h = start(|c| c.session.handshake_timeout_ms = 150).await;
    let mut c = h.open(Transport::Tcp).await;
    assert_eq!(disconnected(&mut c).await.why(), "auth timeout");
    let mut ws = h.open(Transport::WsBinary).await;
    let closed = ws.expect_closed().await.unwrap();
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (Some(1008), "auth timeout")
    );
}

#[tokio::test]
async fn heartbeat_silence_closes_and_unregisters() {
    let mut h = start_with(1, |c| c.session.heartbeat_misses = 1).await;
    let mut c = h.tcp_session("quiet", "", &[]).await;
    assert_eq!(disconnected(&mut c).await.why(), "heartbeat timeout");
    h.expect_event("disconnect quiet").await;
}

#[tokio::test]
async fn same_key_replaces_and_kick_closes() {
    let mut h = start(|_| {}).await;
    let mut old = h.tcp_session("dup", "", &[1000]).await;
    let old_since = h.since("dup");
    let mut new = h.tcp_session("dup", "", &[1000]).await;
    let new_since = h.since("dup");
    assert_ne!(old_since, new_since);
    assert_eq!(disconnected(&mut old).await.why(), "replaced");
    let r = h
        .push(1000, "to new", DeliverTarget::Keys(vec!["dup".into()]))
        .await;
    assert_eq!(r.queued, 1);
    assert_eq!(&new.recv_any().await.unwrap().frame.body[..], b"to new");

    // A kick naming the replaced session leaves its successor alone.
    let r = h.push(1000, "", h.kick("dup", old_since)).await;
    assert_eq!(r.missing, 1);
    assert!(new.pushes_before_heartbeat().await.unwrap().is_empty());

    let r = h.push(1000, "", h.kick("dup", new_since)).await;
    assert_eq!(r.missing, 0);
    assert_eq!(disconnected(&mut new).await.why(), "replaced");
    h.expect_event("disconnect dup").await;
}

#[tokio::test]
async fn a_late_kick_spares_a_session_that_reconnected_here() {
    let mut h = start(|_| {}).await;
    // A (since X) is replaced by a session on another comet: the kick {K, X} closes it.
    let mut a = h.tcp_session("k", "", &[1000]).await;
    let x = h.since("k");
    let r = h.push(1000, "", h.kick("k", x)).await;
    assert_eq!(r.missing, 0);
    assert_eq!(disconnected(&mut a).await.why(), "replaced");
    h.expect_event("disconnect k").await;

    // The client comes back here (since Y); the same kick, replayed late, is ignored.
    let mut b = h.tcp_session("k", "", &[1000]).await;
    let y = h.since("k");
    assert_ne!(x, y);
    let r = h.push(1000, "", h.kick("k", x)).await;
    assert_eq!(r.missing, 1);
    let r = h
        .push(1000, "still here", DeliverTarget::Keys(vec!["k".into()]))
        .await;
    assert_eq!(r.queued, 1);
    assert_eq!(&b.recv_any().await.unwrap().frame.body[..], b"still here");
    assert!(b.pushes_before_heartbeat().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_paced_broadcast_and_a_later_unpaced_one_both_reach_everyone() {
    let h = start(|c| c.bucket.count = 4).await;
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(h.tcp_session(&format!("p{i}"), "", &[1000]).await);
    }
    // Same partition, the paced one first: 4 sessions at 20/s take ~200 ms to walk, and the
    // unpaced one is delivered at once meanwhile.
    let paced = Delivery {
        id: PushId {
            partition: 3,
            ms: 10,
            seq: 1,
        },
        op: 1000,
        body: Bytes::from_static(b"paced"),
        target: DeliverTarget::All { speed: 20 },
        exclude: None,
        recorded: false,
    };
    let now = Delivery {
        id: PushId {
            partition: 3,
            ms: 10,
            seq: 2,
        },
        body: Bytes::from_static(b"now"),
        target: DeliverTarget::All { speed: 0 },
        ..paced.clone()
    };
    h.deliver(vec![paced.clone()]).await;
    let r = h.deliver(vec![now]).await;
    assert_eq!(r.queued, 4);
    for c in &mut clients {
        let mut got = vec![
            c.recv_any().await.unwrap().frame.body,
            c.recv_any().await.unwrap().frame.body,
        ];
        got.sort();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"now"), Bytes::from_static(b"paced")]
        );
    }
    // A replay of the paced broadcast is suppressed by its own marks. Paced broadcasts are walked
    // one at a time in order, so once a later one (fast) has reached a client, the replay's walk
    // is over: nothing else may have come before it.
    h.deliver(vec![paced.clone()]).await;
    let marker = Delivery {
        id: PushId { seq: 3, ..paced.id },
        body: Bytes::from_static(b"marker"),
        target: DeliverTarget::All { speed: 10_000 },
        ..paced
    };
    h.deliver(vec![marker]).await;
    for c in &mut clients {
        assert_eq!(&c.recv_any().await.unwrap().frame.body[..], b"marker");
        assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    }
    let m = h.http_get("/metrics").await;
    assert!(m.contains("rim_comet_push_duplicates_total 4"), "{m}");
}

// That any client frame renews the session at logic, at most once per heartbeat interval, is
// a paused-clock unit test: driver::tests::any_frame_renews_the_session_at_most_once_per_heartbeat_interval.

#[tokio::test]
async fn room_changes_and_subs_are_rate_limited_and_op_lists_capped() {
    let mut h = start(|c| {
        c.session.send_rate_per_sec = 1;
        c.session.send_burst = 3;
    })
    .await;
    let mut c = h.tcp_session("rl", "", &[1000]).await;
    let many: Vec<String> = (2000..2300).map(|o| o.to_string()).collect();
    let f = request(&mut c, op::SUB, 1, many.join(",")).await.frame;
    assert_eq!((f.op, f.seq), (op::SUB_REPLY, 1));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&f.body).unwrap()["error"],
        "too many ops: at most 256"
    );
    let f = request(&mut c, op::CHANGE_ROOM, 2, "live://9").await.frame;
    assert_eq!(f.op, op::CHANGE_ROOM_REPLY);
    h.expect_event("room_changed rl - live://9").await;
    let f = request(&mut c, op::UNSUB, 3, "1000").await.frame;
    assert_eq!((f.op, &f.body[..]), (op::UNSUB_REPLY, &b"1000"[..]));
    // Burst of 3 used up: the next ChangeRoom and Sub are refused, the session stays.
    for (o, reply_op) in [
        (op::CHANGE_ROOM, op::CHANGE_ROOM_REPLY),
        (op::SUB, op::SUB_REPLY),
    ] {
        let f = request(&mut c, o, 4, "live://8").await.frame;
        assert_eq!((f.op, f.seq), (reply_op, 4));
        assert_eq!(&f.body[..], br#"{"error":"rate limited"}"#);
    }
    // The heartbeat is over the rate too: still answered, and counted.
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    let m = h.http_get("/metrics").await;
    assert!(m.contains("rim_comet_requests_rate_limited_total 3"), "{m}");
}

#[tokio::test]
async fn first_joins_of_different_rooms_do_not_wait_for_each_other() {
    let mut h = start(|_| {}).await;
    let addr = h.tcp;
    let join_slow = |key: &'static str| {
        tokio::spawn(async move {
            Conn::connect(Transport::Tcp, addr, &auth(7, key, "slow://1", &[1000])).await
        })
    };
    // The announcement of slow://1 is held at logic until the test opens the gate.
    let slow = join_slow("s1");
    h.expect_event("room_joining slow://1").await;
    // A first join of another room completes meanwhile (Conn::connect succeeds only on op 8).
    let _fast = h.tcp_session("f1", "live://5", &[1000]).await;
    h.expect_event("room_joined live://5").await;
    assert!(
        !slow.is_finished(),
        "no AuthReply before its room was announced"
    );
    // Another joiner of the slow room waits for its announcement: both are members afterwards.
    let second = join_slow("s2");
    h.expect_event("connect s2").await;
    h.slow_gate.send_replace(true);
    let mut first = slow.await.unwrap().unwrap();
    let mut second = second.await.unwrap().unwrap();
    h.expect_event("room_joined slow://1").await;
    let r = h
        .push(
            1000,
            "r",
            DeliverTarget::Room(RoomId::parse("slow://1").unwrap()),
        )
        .await;
    assert_eq!(r.queued, 2);
    assert_eq!(&first.recv_any().await.unwrap().frame.body[..], b"r");
    assert_eq!(&second.recv_any().await.unwrap().frame.body[..], b"r");
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_counted() {
    let mut h = start(|c| c.session.outbound_queue = 2).await;
    let mut c = h.tcp_session("slow", "", &[1000]).await;
    // One batch of many pushes: the queue of 2 overflows before the writer can drain it.
    let body = "x".repeat(1000);
    let items = (0..50)
        .map(|_| Delivery {
            id: h.push_id(),
            op: 1000,
            body: Bytes::from(body.clone()),
            target: DeliverTarget::Keys(vec!["slow".into()]),
            exclude: None,
            recorded: false,
        })
        .collect();
    let r = h.deliver(items).await;
    assert_eq!(r.slow_closed, 1, "{r:?}");
    // The client, reading now, sees op 6 "slow consumer" (queued pushes are not flushed first).
    let closed = c.expect_closed().await.unwrap();
    assert_eq!(
        closed.disconnect_reason.as_deref(),
        Some("slow consumer"),
        "{closed:?}"
    );
    let m = h.http_get("/metrics").await;
    assert!(m.contains("rim_comet_slow_consumer_closed_total 1"), "{m}");
}

#[tokio::test]
async fn readyz_advertises_and_shutdown_drains() {
    let mut h = start(|_| {}).await;
    assert!(h.http_get("/readyz").await.starts_with("HTTP/1.1 200"));
    {
        let renews = h.renews.lock();
        let node = &renews[0].0;
        assert_eq!(node.server, "comet-test");
        assert_eq!(node.tcp_addr, h.tcp.to_string());
        assert_eq!(node.ws_addr, h.http.to_string());
    }
    let mut c = h.tcp_session("bye", "", &[]).await;
    let mut ws = h.session(Transport::WsBinary, 1, "bye-ws", "", &[]).await;
    h.shutdown.cancel();
    assert_eq!(disconnected(&mut c).await.why(), "server shutting down");
    assert_eq!(disconnected(&mut ws).await.code, Some(1001));
    h.expect_event("unregister comet-test").await;
    tokio::time::timeout(WAIT, &mut h.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ---------- upstream messages, exclusion, system pushes, room runs, membership ----------

impl Harness {
    /// Logic events recorded so far, without waiting.
    fn events_now(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            v.push(e);
        }
        v
    }

    fn room_item(&mut self, room: &RoomId, op: i32, body: &str) -> Delivery {
        Delivery {
            id: self.push_id(),
            op,
            body: Bytes::from(body.to_string()),
            target: DeliverTarget::Room(room.clone()),
            exclude: None,
            recorded: false,
        }
    }
}

#[tokio::test]
async fn send_msg_is_forwarded_with_the_session_identity_not_the_body_claims() {
    let h = start(|_| {}).await;
    let mut c = h.tcp_session("snd", "live://5", &[1000]).await;
    let r = send_msg(
        &mut c,
        21,
        r#"{"room":"live://5","op":1000,"data":{"t":"hi"},"from":999,"mid_from":1234,"key":"evil"}"#,
    )
    .await;
    assert_eq!(r["code"], 0, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("msg-"), "{r}");
    assert!(r.get("message").is_none(), "{r}");
    {
        let sends = h.sends.lock();
        assert_eq!(sends.len(), 1);
        let req = &sends[0];
        assert_eq!(
            req.sender,
            SessionRef {
                server: "comet-test".into(),
                mid: 7,
                key: "snd".into()
            }
        );
        assert_eq!(req.sender_room, Some(RoomId::parse("live://5").unwrap()));
        assert_eq!(
            req.target,
            SendTarget::Room(RoomId::parse("live://5").unwrap())
        );
        assert_eq!(req.op, 1000);
        assert_eq!(req.data_json, r#"{"t":"hi"}"#);
    }

    // JSON mode, to a mid, from a session without a room.
    let mut ws = h.session(Transport::WsJson, 42, "jsnd", "", &[1000]).await;
    let r = send_msg(&mut ws, 3, r#"{"mid":2,"op":1001,"data":"x","from":1}"#).await;
    assert_eq!(r["code"], 0, "{r}");
    let sends = h.sends.lock();
    let req = &sends[1];
    assert_eq!((req.sender.mid, req.sender.key.as_str()), (42, "jsnd"));
    assert_eq!(req.sender_room, None);
    assert_eq!(req.target, SendTarget::Mid(2));
    assert_eq!((req.op, req.data_json.as_str()), (1001, r#""x""#));
}

#[tokio::test]
async fn send_msg_validation_errors_answer_400_and_keep_the_session() {
    let h = start(|_| {}).await;
    let mut c = h.tcp_session("val", "live://5", &[1000]).await;
    let cases = [
        ("not json", "not JSON"),
        (r#"{"op":1000,"data":1}"#, "exactly one of room and mid"),
        (r#"{"room":"live://5","mid":3,"op":1000}"#, "not both"),
        (r#"{"room":"live:/5","op":1000}"#, "bad room id"),
        (r#"{"mid":3,"op":999}"#, "op must be >= 1000"),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let r = send_msg(&mut c, 30 + i as i32, body).await;
        assert_eq!(r["code"], -400, "{body}: {r}");
        let msg = r["message"].as_str().unwrap();
        assert!(msg.contains(want), "{body}: {msg}");
        assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    }
    assert!(h.sends.lock().is_empty(), "nothing invalid reached logic");
    let m = h.http_get("/metrics").await;
    assert!(
        m.contains(r#"rim_comet_upstream_refused_total{code="-400"} 5"#),
        "{m}"
    );
}

#[tokio::test]
async fn send_msg_logic_errors_map_to_their_codes() {
    // A short deadline so the fake's never-answering case reads as logic unavailable.
    let h = start(|c| c.logic.rpc_timeout_ms = 500).await;
    let mut c = h.tcp_session("err", "", &[1000]).await;
    for (seq, mid, code, want) in [
        (1, 403, -403, "forbidden: not allowed"),
        (2, 404, -404, "offline: mid 404"),
        (3, 503, -503, "logic unavailable"),
    ] {
        let r = send_msg(&mut c, seq, &format!(r#"{{"mid":{mid},"op":1000}}"#)).await;
        assert_eq!(r["code"], code, "{r}");
        assert_eq!(r["message"], want, "{r}");
    }
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    assert_eq!(
        send_msg(&mut c, 10, r#"{"mid":5,"op":1000}"#).await["code"],
        0
    );
    let m = h.http_get("/metrics").await;
    for line in [
        r#"rim_comet_upstream_refused_total{code="-403"} 1"#,
        r#"rim_comet_upstream_refused_total{code="-404"} 1"#,
        r#"rim_comet_upstream_refused_total{code="-503"} 1"#,
        "rim_comet_upstream_sent_total 1",
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }
}

#[tokio::test]
async fn send_msg_over_the_rate_limit_gets_429() {
    let h = start(|c| {
        c.session.send_rate_per_sec = 1;
        c.session.send_burst = 2;
    })
    .await;
    let mut c = h.tcp_session("fast", "", &[1000]).await;
    let mut codes = Vec::new();
    for seq in 1..=3 {
        let r = send_msg(&mut c, seq, r#"{"mid":5,"op":1000}"#).await;
        if r["code"] == -429 {
            assert!(
                r["message"].as_str().unwrap().starts_with("rate limited: "),
                "{r}"
            );
        }
        codes.push(r["code"].as_i64().unwrap());
    }
    assert_eq!(codes, vec![0, 0, -429]);
    assert_eq!(
        h.sends.lock().len(),
        2,
        "the limited one never reached logic"
    );
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
    let m = h.http_get("/metrics").await;
    assert!(
        m.contains(r#"rim_comet_upstream_refused_total{code="-429"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn exclude_skips_the_sender_without_counting_it() {
    let mut h = start(|_| {}).await;
    let mut s1 = h.tcp_session("s1", "live://7", &[1000]).await;
    let mut s2 = h.tcp_session("s2", "live://7", &[1000]).await;
    let room = RoomId::parse("live://7").unwrap();
    let mut item = h.room_item(&room, 1000, "from s1");
    item.exclude = Some("s1".into());
    let r = h.deliver(vec![item]).await;
    assert_eq!((r.queued, r.missing, r.duplicates), (1, 0, 0), "{r:?}");
    assert_eq!(&s2.recv_any().await.unwrap().frame.body[..], b"from s1");

    // Keys target too (a mid push to the sender's own sessions).
    let id = h.push_id();
    let r = h
        .deliver(vec![Delivery {
            id,
            op: 1000,
            body: Bytes::from_static(b"direct"),
            target: DeliverTarget::Keys(vec!["s1".into(), "s2".into()]),
            exclude: Some("s1".into()),
            recorded: false,
        }])
        .await;
    assert_eq!((r.queued, r.missing, r.duplicates), (1, 0, 0), "{r:?}");
    assert_eq!(&s2.recv_any().await.unwrap().frame.body[..], b"direct");
    // s1 got nothing: the next thing it reads is its heartbeat reply.
    assert!(s1.pushes_before_heartbeat().await.unwrap().is_empty());
}

#[tokio::test]
async fn system_pushes_bypass_the_op_filter_but_not_dedupe() {
    let mut h = start(|_| {}).await;
    let mut c = h.tcp_session("sys", "live://8", &[1000]).await;
    let room = RoomId::parse("live://8").unwrap();
    let ev = h.room_item(
        &room,
        op::ROOM_EVENT,
        r#"{"event":"join","mid":9,"room":"live://8"}"#,
    );
    let r = h.deliver(vec![ev.clone()]).await;
    assert_eq!(r.queued, 1, "{r:?}");
    assert_eq!(c.recv_any().await.unwrap().frame.op, op::ROOM_EVENT);
    let r = h.deliver(vec![ev]).await;
    assert_eq!((r.queued, r.duplicates), (0, 1), "{r:?}");
    let r = h.push(1001, "app", DeliverTarget::Room(room)).await;
    assert_eq!(r.queued, 0, "ordinary ops still filtered");
    assert!(c.pushes_before_heartbeat().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_room_run_reaches_each_member_as_one_message() {
    let mut h = start(|_| {}).await;
    let room_s = "live://run";
    let room = RoomId::parse(room_s).unwrap();

    let mut wb = h
        .session(Transport::WsBinary, 1, "wb", room_s, &[1000, 1001])
        .await;
    // Accepts only 1000: gets its subset.
    let mut wp = h
        .session(Transport::WsBinary, 2, "wp", room_s, &[1000])
        .await;
    let mut wj = h
        .session(Transport::WsJson, 3, "wj", room_s, &[1000, 1001])
        .await;
    let mut tc = h.tcp_session("wt", room_s, &[1000, 1001]).await;

    let ops = [1000, 1001, 1000, 1001, 1000];
    let items: Vec<Delivery> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| h.room_item(&room, *op, &format!("m{i}")))
        .collect();
    let r = h.deliver(items).await;
    assert_eq!(r.queued, 5 * 3 + 3, "{r:?}");

    let unwrapped = |frames: Vec<Received>| -> Vec<(i32, String)> {
        frames
            .iter()
            .map(|r| {
                assert!(r.in_raw, "inside op 9: {r:?}");
                (r.frame.op, body_text(r))
            })
            .collect()
    };
    let all: Vec<(i32, String)> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| (*op, format!("m{i}")))
        .collect();
    // WebSocket binary: exactly one message holding all five, in order...
    assert_eq!(unwrapped(one_message(&mut wb).await), all);
    // ...and nothing else before the heartbeat reply.
    assert!(wb.pushes_before_heartbeat().await.unwrap().is_empty());

    // Partial member: one message with just its ops, in order.
    assert_eq!(
        unwrapped(one_message(&mut wp).await),
        vec![
            (1000, "m0".to_string()),
            (1000, "m2".to_string()),
            (1000, "m4".to_string())
        ]
    );
    assert!(wp.pushes_before_heartbeat().await.unwrap().is_empty());

    // JSON: one array of five.
    let got: Vec<(i32, String)> = one_message(&mut wj)
        .await
        .iter()
        .map(|r| {
            let body = r.json_body.as_ref().and_then(|b| b.as_str());
            (r.frame.op, body.unwrap().to_string())
        })
        .collect();
    assert_eq!(got, all);
    assert!(wj.pushes_before_heartbeat().await.unwrap().is_empty());

    // TCP: five plain frames.
    let mut tcp_got = Vec::new();
    for _ in 0..5 {
        let f = tc.recv_any().await.unwrap();
        tcp_got.push((f.frame.op, body_text(&f)));
    }
    assert_eq!(tcp_got, all);

    // Order across runs and other targets: room, room, key, room.
    let mut items = vec![
        h.room_item(&room, 1000, "n0"),
        h.room_item(&room, 1000, "n1"),
    ];
    let id = h.push_id();
    items.push(Delivery {
        id,
        op: 1000,
        body: Bytes::from_static(b"n2"),
        target: DeliverTarget::Keys(vec!["wt".into()]),
        exclude: None,
        recorded: false,
    });
    items.push(h.room_item(&room, 1000, "n3"));
    h.deliver(items).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(body_text(&tc.recv_any().await.unwrap()));
    }
    assert_eq!(got, vec!["n0", "n1", "n2", "n3"]);
}

#[tokio::test]
async fn change_room_reports_the_move_to_logic_before_replying() {
    let mut h = start(|_| {}).await;
    // Auth with a room: logic learns it through connect, not room_changed.
    let mut c = h.tcp_session("mv", "chat://1", &[1000]).await;
    h.expect_event("room_joined chat://1").await;

    let mut change = async |h: &mut Harness, seq: i32, body: &'static [u8]| {
        let r = request(&mut c, op::CHANGE_ROOM, seq, Bytes::from_static(body))
            .await
            .frame;
        assert_eq!(
            (r.op, r.seq, &r.body[..]),
            (op::CHANGE_ROOM_REPLY, seq, body)
        );
        h.events_now()
            .into_iter()
            .filter(|e| e.starts_with("room_changed"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        change(&mut h, 1, b"chat://2").await,
        vec!["room_changed mv chat://1 chat://2"]
    );
    assert!(
        change(&mut h, 2, b"chat://2").await.is_empty(),
        "same room: no call"
    );
    assert_eq!(
        change(&mut h, 3, b"").await,
        vec!["room_changed mv chat://2 -"]
    );
    assert!(change(&mut h, 4, b"").await.is_empty(), "no room to leave");
    assert_eq!(
        change(&mut h, 5, b"chat://3").await,
        vec!["room_changed mv - chat://3"]
    );
    // Nothing else shows up by the time the session is gone (logic's exact calls, late ones
    // included, are checked in client_op::tests::change_room_tells_logic_and_moves_the_membership).
    drop(c);
    h.expect_event("disconnect mv").await;
    assert!(
        !h.events_now().iter().any(|e| e.starts_with("room_changed")),
        "no extra room_changed"
    );
}

#[tokio::test]
async fn a_disconnect_lost_to_a_logic_blip_is_retried() {
    let mut h = start(|c| c.logic.rpc_timeout_ms = 200).await;
    let c = h.tcp_session("hang-once-k", "", &[1000]).await;
    drop(c);
    // The first disconnect call hangs past its deadline; the retry lands.
    h.expect_event("disconnect hang-once-k").await;
}
