//! End-to-end tests of the comet against a fake logic (a tarpc `LogicRpc` server recording calls),
//! driven by raw TCP frame clients, WebSocket clients and a `CometRpc` client playing job.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rim_comet::{Config, Listeners};
use rim_proto::FrameCodec;
use rim_proto::frame::Frame;
use rim_proto::msg::AuthBody;
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::{
    CometRpcClient, ConnectReply, ConnectRequest, DeliverReport, DeliverTarget, Delivery,
    LogicError, LogicRpc, NodeInfo, OnlineCounts, OnlineReport, PushAccepted, PushId,
    SendMsgRequest, SendTarget, SessionRef,
};
use tarpc::context::Context;
use tarpc::server::Channel;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::codec::Framed;
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
        })
    }
    async fn disconnect(self, _: Context, s: SessionRef) -> Result<(), LogicError> {
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
            // A slow announcement: joins of other rooms must not wait for it.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let _ = self.events.send(format!("room_joined {room}"));
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
            SendTarget::Mid(503) => {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            _ => {}
        }
        self.sends.lock().push(req);
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send("send_msg".into());
        Ok(PushAccepted {
            id: format!("msg-{n}"),
            sessions: 1,
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
}

struct Harness {
    http: SocketAddr,
    tcp: SocketAddr,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<Result<(), rim_comet::CometError>>,
    events: mpsc::UnboundedReceiver<String>,
    renews: Arc<Mutex<Vec<(NodeInfo, OnlineReport)>>>,
    sends: Arc<Mutex<Vec<SendMsgRequest>>>,
    sinces: Arc<Mutex<std::collections::HashMap<String, u64>>>,
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
    let fake = FakeLogic {
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

fn auth_frame(mid: i64, key: &str, room: &str, accepts: &[i32]) -> Frame {
    let body = AuthBody {
        mid,
        key: key.into(),
        room_id: room.into(),
        platform: "test".into(),
        accepts: accepts.to_vec(),
        token: String::new(),
    };
    Frame::new(op::AUTH, 1, serde_json::to_vec(&body).unwrap())
}

// ---------- TCP client ----------

struct Tcp(Framed<TcpStream, FrameCodec>);

impl Tcp {
    async fn connect(h: &Harness) -> Tcp {
        Tcp(Framed::new(
            TcpStream::connect(h.tcp).await.unwrap(),
            FrameCodec::new(1 << 20),
        ))
    }
    async fn send(&mut self, f: Frame) {
        self.0.send(f).await.unwrap();
    }
    async fn recv(&mut self) -> Option<Frame> {
        tokio::time::timeout(WAIT, self.0.next())
            .await
            .expect("tcp recv timed out")
            .map(|r| r.unwrap())
    }
    async fn auth(h: &Harness, key: &str, room: &str, accepts: &[i32]) -> Tcp {
        let mut c = Tcp::connect(h).await;
        c.send(auth_frame(7, key, room, accepts)).await;
        let r = c.recv().await.unwrap();
        assert_eq!((r.op, r.seq), (op::AUTH_REPLY, 1), "{r:?}");
        c
    }
}

fn reason(f: &Frame) -> String {
    assert_eq!(f.op, op::DISCONNECT_REPLY, "{f:?}");
    let v: serde_json::Value = serde_json::from_slice(&f.body).unwrap();
    v["reason"].as_str().unwrap().to_string()
}

// ---------- WebSocket client ----------

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(h: &Harness) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/sub", h.http))
        .await
        .unwrap();
    ws
}

async fn ws_recv(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("ws recv timed out")
            .unwrap()
            .unwrap();
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

async fn ws_frame(ws: &mut Ws) -> Frame {
    match ws_recv(ws).await {
        Message::Binary(b) => Frame::decode_message(b, 1 << 20).unwrap(),
        other => panic!("expected binary, got {other:?}"),
    }
}

async fn ws_close_code(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws_recv(ws).await {
            Message::Close(Some(c)) => return (u16::from(c.code), c.reason.to_string()),
            Message::Close(None) => return (1005, String::new()),
            _ => continue,
        }
    }
}

// ---------- tests ----------

#[tokio::test]
async fn tcp_auth_heartbeat_filter_dedupe_and_room() {
    let mut h = start(|_| {}).await;
    let mut c = Tcp::auth(&h, "a", "live://1", &[1000]).await;
    // room_joined reached logic before the AuthReply.
    h.expect_event("room_joined live://1").await;

    c.send(Frame {
        ver: 0,
        ..Frame::new(op::HEARTBEAT, 5, Bytes::new())
    })
    .await;
    let hb = c.recv().await.unwrap();
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
    };
    let r = h.deliver(vec![item.clone()]).await;
    assert_eq!((r.queued, r.missing, r.duplicates), (1, 1, 0));
    let p = c.recv().await.unwrap();
    assert_eq!((p.op, &p.body[..]), (1000, &b"hello"[..]));

    // Same push id again: suppressed.
    let r = h.deliver(vec![item]).await;
    assert_eq!((r.queued, r.duplicates), (0, 1));

    // Op not accepted: skipped; after Sub it is delivered.
    let r = h
        .push(1001, "x", DeliverTarget::Keys(vec!["a".into()]))
        .await;
    assert_eq!(r.queued, 0);
    c.send(Frame::new(op::SUB, 9, Bytes::from_static(b"1001")))
        .await;
    let s = c.recv().await.unwrap();
    assert_eq!((s.op, s.seq, &s.body[..]), (op::SUB_REPLY, 9, &b"1001"[..]));
    let r = h
        .push(
            1001,
            "y",
            DeliverTarget::Room(RoomId::parse("live://1").unwrap()),
        )
        .await;
    assert_eq!(r.queued, 1);
    let p = c.recv().await.unwrap();
    assert_eq!((p.op, &p.body[..]), (1001, &b"y"[..]));

    // Unsub; All reaches only accepting sessions.
    c.send(Frame::new(op::UNSUB, 10, Bytes::from_static(b"1001")))
        .await;
    assert_eq!(c.recv().await.unwrap().op, op::UNSUB_REPLY);
    let r = h.push(1001, "z", DeliverTarget::All { speed: 0 }).await;
    assert_eq!(r.queued, 0);
    let r = h.push(1000, "all", DeliverTarget::All { speed: 0 }).await;
    assert_eq!(r.queued, 1);
    assert_eq!(&c.recv().await.unwrap().body[..], b"all");

    // A bad SendMsg is answered, not fatal.
    c.send(Frame::new(op::SEND_MSG, 11, Bytes::from_static(b"{}")))
        .await;
    let m = c.recv().await.unwrap();
    assert_eq!((m.op, m.seq), (op::SEND_MSG_REPLY, 11));
    assert!(String::from_utf8_lossy(&m.body).contains("-400"));

    // Client leaves: logic hears about it.
    drop(c);
    h.expect_event("disconnect a").await;
}

#[tokio::test]
async fn change_room_success_and_refusal_keep_session() {
    let mut h = start(|_| {}).await;
    let mut c = Tcp::auth(&h, "cr", "", &[1000]).await;
    c.send(Frame::new(
        op::CHANGE_ROOM,
        3,
        Bytes::from_static(b"bad room"),
    ))
    .await;
    let r = c.recv().await.unwrap();
    assert_eq!((r.op, r.seq), (op::CHANGE_ROOM_REPLY, 3));
    assert!(
        String::from_utf8_lossy(&r.body).contains("bad room id"),
        "{r:?}"
    );
    c.send(Frame::new(op::SUB, 4, Bytes::from_static(b"1000,x")))
        .await;
    let r = c.recv().await.unwrap();
    assert_eq!(r.op, op::SUB_REPLY);
    assert!(String::from_utf8_lossy(&r.body).contains("error"));

    c.send(Frame::new(
        op::CHANGE_ROOM,
        4,
        Bytes::from_static(b"chat://9"),
    ))
    .await;
    let r = c.recv().await.unwrap();
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
    assert_eq!(&c.recv().await.unwrap().body[..], b"in room");

    // Leave with an empty body.
    c.send(Frame::new(op::CHANGE_ROOM, 5, Bytes::new())).await;
    assert_eq!(c.recv().await.unwrap().op, op::CHANGE_ROOM_REPLY);
    let rep = h.push(1000, "gone", DeliverTarget::Room(room)).await;
    assert_eq!(rep.queued, 0);
}

#[tokio::test]
async fn ws_binary_auth_heartbeat_and_op9_pushes() {
    let mut h = start(|_| {}).await;
    let mut ws = ws_connect(&h).await;
    ws.send(Message::binary(
        auth_frame(3, "w", "live://2", &[1000]).to_bytes(),
    ))
    .await
    .unwrap();
    let a = ws_frame(&mut ws).await;
    assert_eq!(a.op, op::AUTH_REPLY);
    let body: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(body["key"], "w");
    assert_eq!(body["room_id"], "live://2");
    ws.send(Message::binary(
        Frame::new(op::HEARTBEAT, 2, Bytes::new()).to_bytes(),
    ))
    .await
    .unwrap();
    let hb = ws_frame(&mut ws).await;
    assert_eq!((hb.op, hb.seq), (op::HEARTBEAT_REPLY, 2));

    let room = RoomId::parse("live://2").unwrap();
    let items = (0..3)
        .map(|i| Delivery {
            id: h.push_id(),
            op: 1000,
            body: Bytes::from(format!("m{i}")),
            target: DeliverTarget::Room(room.clone()),
            exclude: None,
        })
        .collect::<Vec<_>>();
    let r = h.deliver(items).await;
    assert_eq!(r.queued, 3);
    let mut got = Vec::new();
    while got.len() < 3 {
        let raw = ws_frame(&mut ws).await;
        assert_eq!(raw.op, op::RAW);
        for f in Frame::split_batch(raw.body, 1 << 20).unwrap() {
            got.push(String::from_utf8(f.body.to_vec()).unwrap());
        }
    }
    assert_eq!(got, vec!["m0", "m1", "m2"], "order kept");

    // A binary frame inside a text message is accepted too.
    let text = String::from_utf8(
        Frame::new(op::HEARTBEAT, 3, Bytes::new())
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(ws_frame(&mut ws).await.op, op::HEARTBEAT_REPLY);
}

#[tokio::test]
async fn ws_json_mode() {
    let mut h = start(|_| {}).await;
    let mut ws = ws_connect(&h).await;
    ws.send(Message::text(r#"{"ver":1,"op":7,"seq":1,"body":{"mid":5,"key":"j","room_id":"live://3","accepts":[1000]}}"#))
        .await
        .unwrap();
    let text = |m: Message| -> serde_json::Value {
        match m {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("expected text, got {other:?}"),
        }
    };
    let a = text(ws_recv(&mut ws).await);
    assert_eq!((a["op"].as_i64(), a["seq"].as_i64()), (Some(8), Some(1)));
    assert_eq!(a["body"]["key"], "j");
    ws.send(Message::text(r#"{"op":2,"seq":2}"#)).await.unwrap();
    let hb = text(ws_recv(&mut ws).await);
    assert_eq!(hb, serde_json::json!({"op":3,"seq":2,"body":{"online":1}}));
    h.push(
        1000,
        r#"{"hello":"json"}"#,
        DeliverTarget::Keys(vec!["j".into()]),
    )
    .await;
    let p = text(ws_recv(&mut ws).await);
    assert_eq!(
        p,
        serde_json::json!({"op":1000,"seq":0,"body":{"hello":"json"}})
    );
    ws.send(Message::text(r#"{"op":12,"seq":3,"body":"live://4"}"#))
        .await
        .unwrap();
    let cr = text(ws_recv(&mut ws).await);
    assert_eq!(cr, serde_json::json!({"op":13,"seq":3,"body":"live://4"}));
    // Not a JSON frame: protocol error.
    ws.send(Message::text(r#"{"op":"x"}"#)).await.unwrap();
    assert_eq!(ws_close_code(&mut ws).await.0, 1002);
}

#[tokio::test]
async fn first_frame_must_be_auth() {
    let h = start(|_| {}).await;
    let mut c = Tcp::connect(&h).await;
    c.send(Frame::new(op::HEARTBEAT, 1, Bytes::new())).await;
    assert!(reason(&c.recv().await.unwrap()).contains("op 7"));
    assert!(c.recv().await.is_none(), "closed after op 6");

    let mut ws = ws_connect(&h).await;
    ws.send(Message::binary(
        Frame::new(op::HEARTBEAT, 1, Bytes::new()).to_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_frame(&mut ws).await.op, op::DISCONNECT_REPLY);
    assert_eq!(ws_close_code(&mut ws).await.0, 1008);
}

#[tokio::test]
async fn bad_auth_body_and_refusal() {
    let h = start(|_| {}).await;
    let mut c = Tcp::connect(&h).await;
    c.send(Frame::new(op::AUTH, 1, Bytes::from_static(b"{not json")))
        .await;
    assert!(reason(&c.recv().await.unwrap()).starts_with("bad auth body: "));
    assert!(c.recv().await.is_none());

    let mut c = Tcp::connect(&h).await;
    c.send(Frame::new(
        op::AUTH,
        1,
        Bytes::from_static(br#"{"mid":1,"token":"deny"}"#),
    ))
    .await;
    assert!(reason(&c.recv().await.unwrap()).contains("unauthorized"));
    assert!(c.recv().await.is_none());
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
    let mut ws = ws_connect(&h).await;
    let mut bad = Frame::new(op::AUTH, 1, Bytes::from_static(b"{}"))
        .to_bytes()
        .to_vec();
    bad[4..6].copy_from_slice(&12i16.to_be_bytes());
    ws.send(Message::binary(bad)).await.unwrap();
    let (code, why) = ws_close_code(&mut ws).await;
    assert_eq!(code, 1002);
    assert!(why.contains("headerLen"), "{why}");

    let mut ws = ws_connect(&h).await;
    ws.send(Message::binary(
        Frame::new(op::AUTH, 1, vec![b' '; 129]).to_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_close_code(&mut ws).await.0, 1009);

    // TCP: op 6 with the reason, then the close.
    let mut c = Tcp::connect(&h).await;
    c.send(Frame::new(op::AUTH, 1, vec![b' '; 129])).await;
    assert!(reason(&c.recv().await.unwrap()).contains("exceeds"));
    assert!(c.recv().await.is_none());

    // Other clients are still served.
    let _ok = Tcp::auth(&h, "still", "", &[]).await;
}

#[tokio::test]
async fn auth_timeout_closes() {
    let h = start(|c| c.session.handshake_timeout_ms = 150).await;
    let mut c = Tcp::connect(&h).await;
    assert_eq!(reason(&c.recv().await.unwrap()), "auth timeout");
    let mut ws = ws_connect(&h).await;
    assert_eq!(
        ws_close_code(&mut ws).await,
        (1008, "auth timeout".to_string())
    );
}

#[tokio::test]
async fn heartbeat_silence_closes_and_unregisters() {
    let mut h = start_with(1, |c| c.session.heartbeat_misses = 1).await;
    let mut c = Tcp::auth(&h, "quiet", "", &[]).await;
    assert_eq!(reason(&c.recv().await.unwrap()), "heartbeat timeout");
    h.expect_event("disconnect quiet").await;
}

#[tokio::test]
async fn same_key_replaces_and_kick_closes() {
    let mut h = start(|_| {}).await;
    let mut old = Tcp::auth(&h, "dup", "", &[1000]).await;
    let old_since = h.since("dup");
    let mut new = Tcp::auth(&h, "dup", "", &[1000]).await;
    let new_since = h.since("dup");
    assert_ne!(old_since, new_since);
    assert_eq!(reason(&old.recv().await.unwrap()), "replaced");
    let r = h
        .push(1000, "to new", DeliverTarget::Keys(vec!["dup".into()]))
        .await;
    assert_eq!(r.queued, 1);
    assert_eq!(&new.recv().await.unwrap().body[..], b"to new");

    // A kick naming the replaced session leaves its successor alone.
    let r = h.push(1000, "", h.kick("dup", old_since)).await;
    assert_eq!(r.missing, 1);
    heartbeat_ok(&mut new, 3).await;

    let r = h.push(1000, "", h.kick("dup", new_since)).await;
    assert_eq!(r.missing, 0);
    assert_eq!(reason(&new.recv().await.unwrap()), "replaced");
    h.expect_event("disconnect dup").await;
}

#[tokio::test]
async fn a_late_kick_spares_a_session_that_reconnected_here() {
    let mut h = start(|_| {}).await;
    // A (since X) is replaced by a session on another comet: the kick {K, X} closes it.
    let mut a = Tcp::auth(&h, "k", "", &[1000]).await;
    let x = h.since("k");
    let r = h.push(1000, "", h.kick("k", x)).await;
    assert_eq!(r.missing, 0);
    assert_eq!(reason(&a.recv().await.unwrap()), "replaced");
    h.expect_event("disconnect k").await;

    // The client comes back here (since Y); the same kick, replayed late, is ignored.
    let mut b = Tcp::auth(&h, "k", "", &[1000]).await;
    let y = h.since("k");
    assert_ne!(x, y);
    let r = h.push(1000, "", h.kick("k", x)).await;
    assert_eq!(r.missing, 1);
    let r = h
        .push(1000, "still here", DeliverTarget::Keys(vec!["k".into()]))
        .await;
    assert_eq!(r.queued, 1);
    assert_eq!(&b.recv().await.unwrap().body[..], b"still here");
    heartbeat_ok(&mut b, 2).await;
}

#[tokio::test]
async fn a_paced_broadcast_and_a_later_unpaced_one_both_reach_everyone() {
    let h = start(|c| c.bucket.count = 4).await;
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(Tcp::auth(&h, &format!("p{i}"), "", &[1000]).await);
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
        let mut got = vec![c.recv().await.unwrap().body, c.recv().await.unwrap().body];
        got.sort();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"now"), Bytes::from_static(b"paced")]
        );
    }
    // A replay of the paced broadcast is suppressed by its own marks.
    h.deliver(vec![paced]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    for c in &mut clients {
        heartbeat_ok(c, 7).await;
    }
    let m = h.http_get("/metrics").await;
    assert!(m.contains("rim_comet_push_duplicates_total 4"), "{m}");
}

#[tokio::test]
async fn any_frame_renews_the_session_within_the_heartbeat_interval() {
    // heartbeat 1 s, renew_session_ms 60 s: the renewal cadence is capped at the heartbeat.
    let mut h = start_with(1, |c| c.session.heartbeat_misses = 5).await;
    let mut c = Tcp::auth(&h, "busy", "", &[1000]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Not a heartbeat: a Sub renews too.
    c.send(Frame::new(op::SUB, 2, Bytes::from_static(b"1001")))
        .await;
    assert_eq!(c.recv().await.unwrap().op, op::SUB_REPLY);
    h.expect_event("heartbeat busy").await;
}

#[tokio::test]
async fn room_changes_and_subs_are_rate_limited_and_op_lists_capped() {
    let mut h = start(|c| {
        c.session.send_rate_per_sec = 1;
        c.session.send_burst = 3;
    })
    .await;
    let mut c = Tcp::auth(&h, "rl", "", &[1000]).await;
    let many: Vec<String> = (2000..2300).map(|o| o.to_string()).collect();
    c.send(Frame::new(op::SUB, 1, Bytes::from(many.join(","))))
        .await;
    let f = c.recv().await.unwrap();
    assert_eq!((f.op, f.seq), (op::SUB_REPLY, 1));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&f.body).unwrap()["error"],
        "too many ops: at most 256"
    );
    c.send(Frame::new(
        op::CHANGE_ROOM,
        2,
        Bytes::from_static(b"live://9"),
    ))
    .await;
    assert_eq!(c.recv().await.unwrap().op, op::CHANGE_ROOM_REPLY);
    h.expect_event("room_changed rl - live://9").await;
    c.send(Frame::new(op::UNSUB, 3, Bytes::from_static(b"1000")))
        .await;
    let f = c.recv().await.unwrap();
    assert_eq!((f.op, &f.body[..]), (op::UNSUB_REPLY, &b"1000"[..]));
    // Burst of 3 used up: the next ChangeRoom and Sub are refused, the session stays.
    for (o, reply_op) in [
        (op::CHANGE_ROOM, op::CHANGE_ROOM_REPLY),
        (op::SUB, op::SUB_REPLY),
    ] {
        c.send(Frame::new(o, 4, Bytes::from_static(b"live://8")))
            .await;
        let f = c.recv().await.unwrap();
        assert_eq!((f.op, f.seq), (reply_op, 4));
        assert_eq!(&f.body[..], br#"{"error":"rate limited"}"#);
    }
    heartbeat_ok(&mut c, 5).await;
    let m = h.http_get("/metrics").await;
    assert!(m.contains("rim_comet_requests_rate_limited_total 2"), "{m}");
}

#[tokio::test]
async fn first_joins_of_different_rooms_do_not_wait_for_each_other() {
    let mut h = start(|_| {}).await;
    let addr = h.tcp;
    // The announcement of slow://1 takes 1.5 s at logic.
    let slow = tokio::spawn(async move {
        let mut c = Tcp(Framed::new(
            TcpStream::connect(addr).await.unwrap(),
            FrameCodec::new(1 << 20),
        ));
        c.send(auth_frame(7, "s1", "slow://1", &[1000])).await;
        let reply = c.recv().await.unwrap();
        (c, reply)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = std::time::Instant::now();
    let _fast = Tcp::auth(&h, "f1", "live://5", &[1000]).await;
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "a join of another room waited {:?}",
        t0.elapsed()
    );
    // Another joiner of the slow room waits for its announcement: both are members afterwards.
    let mut second = Tcp::auth(&h, "s2", "slow://1", &[1000]).await;
    let (mut first, reply) = slow.await.unwrap();
    assert_eq!(reply.op, op::AUTH_REPLY);
    h.expect_event("room_joined slow://1").await;
    let r = h
        .push(
            1000,
            "r",
            DeliverTarget::Room(RoomId::parse("slow://1").unwrap()),
        )
        .await;
    assert_eq!(r.queued, 2);
    assert_eq!(&first.recv().await.unwrap().body[..], b"r");
    assert_eq!(&second.recv().await.unwrap().body[..], b"r");
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_counted() {
    let mut h = start(|c| c.session.outbound_queue = 2).await;
    let mut c = Tcp::auth(&h, "slow", "", &[1000]).await;
    // One batch of many pushes: the queue of 2 overflows before the writer can drain it.
    let body = "x".repeat(1000);
    let items = (0..50)
        .map(|_| Delivery {
            id: h.push_id(),
            op: 1000,
            body: Bytes::from(body.clone()),
            target: DeliverTarget::Keys(vec!["slow".into()]),
            exclude: None,
        })
        .collect();
    let r = h.deliver(items).await;
    assert_eq!(r.slow_closed, 1, "{r:?}");
    // The client, reading now, sees op 6 "slow consumer" (queued pushes are not flushed first).
    let mut saw = false;
    while let Some(f) = c.recv().await {
        if f.op == op::DISCONNECT_REPLY {
            assert_eq!(reason(&f), "slow consumer");
            saw = true;
        }
    }
    assert!(saw);
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
    let mut c = Tcp::auth(&h, "bye", "", &[]).await;
    let mut ws = ws_connect(&h).await;
    ws.send(Message::binary(auth_frame(1, "bye-ws", "", &[]).to_bytes()))
        .await
        .unwrap();
    assert_eq!(ws_frame(&mut ws).await.op, op::AUTH_REPLY);
    h.shutdown.cancel();
    assert_eq!(reason(&c.recv().await.unwrap()), "server shutting down");
    assert_eq!(ws_frame(&mut ws).await.op, op::DISCONNECT_REPLY);
    assert_eq!(ws_close_code(&mut ws).await.0, 1001);
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
        }
    }
}

fn send_frame(seq: i32, body: &str) -> Frame {
    Frame::new(op::SEND_MSG, seq, Bytes::from(body.to_string()))
}

/// The op 5 body, checking the op and the echoed seq.
fn send_reply(f: &Frame, seq: i32) -> serde_json::Value {
    assert_eq!((f.op, f.seq), (op::SEND_MSG_REPLY, seq), "{f:?}");
    serde_json::from_slice(&f.body).unwrap()
}

async fn heartbeat_ok(c: &mut Tcp, seq: i32) {
    c.send(Frame::new(op::HEARTBEAT, seq, Bytes::new())).await;
    let f = c.recv().await.unwrap();
    assert_eq!((f.op, f.seq), (op::HEARTBEAT_REPLY, seq), "{f:?}");
}

fn text_json(m: Message) -> serde_json::Value {
    match m {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test]
async fn send_msg_is_forwarded_with_the_session_identity_not_the_body_claims() {
    let h = start(|_| {}).await;
    let mut c = Tcp::auth(&h, "snd", "live://5", &[1000]).await;
    c.send(send_frame(
        21,
        r#"{"room":"live://5","op":1000,"data":{"t":"hi"},"from":999,"mid_from":1234,"key":"evil"}"#,
    ))
    .await;
    let r = send_reply(&c.recv().await.unwrap(), 21);
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
    let mut ws = ws_connect(&h).await;
    ws.send(Message::text(
        r#"{"ver":1,"op":7,"seq":1,"body":{"mid":42,"key":"jsnd","accepts":[1000]}}"#,
    ))
    .await
    .unwrap();
    assert_eq!(text_json(ws_recv(&mut ws).await)["op"], 8);
    ws.send(Message::text(
        r#"{"op":4,"seq":3,"body":{"mid":2,"op":1001,"data":"x","from":1}}"#,
    ))
    .await
    .unwrap();
    let r = text_json(ws_recv(&mut ws).await);
    assert_eq!((r["op"].as_i64(), r["seq"].as_i64()), (Some(5), Some(3)));
    assert_eq!(r["body"]["code"], 0, "{r}");
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
    let mut c = Tcp::auth(&h, "val", "live://5", &[1000]).await;
    let cases = [
        ("not json", "not JSON"),
        (r#"{"op":1000,"data":1}"#, "exactly one of room and mid"),
        (r#"{"room":"live://5","mid":3,"op":1000}"#, "not both"),
        (r#"{"room":"live:/5","op":1000}"#, "bad room id"),
        (r#"{"mid":3,"op":999}"#, "op must be >= 1000"),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let seq = 30 + i as i32;
        c.send(send_frame(seq, body)).await;
        let r = send_reply(&c.recv().await.unwrap(), seq);
        assert_eq!(r["code"], -400, "{body}: {r}");
        let msg = r["message"].as_str().unwrap();
        assert!(msg.contains(want), "{body}: {msg}");
        heartbeat_ok(&mut c, 100 + seq).await;
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
    let mut c = Tcp::auth(&h, "err", "", &[1000]).await;
    for (seq, mid, code, want) in [
        (1, 403, -403, "forbidden: not allowed"),
        (2, 404, -404, "offline: mid 404"),
        (3, 503, -503, "logic unavailable"),
    ] {
        c.send(send_frame(seq, &format!(r#"{{"mid":{mid},"op":1000}}"#)))
            .await;
        let r = send_reply(&c.recv().await.unwrap(), seq);
        assert_eq!(r["code"], code, "{r}");
        assert_eq!(r["message"], want, "{r}");
    }
    heartbeat_ok(&mut c, 9).await;
    c.send(send_frame(10, r#"{"mid":5,"op":1000}"#)).await;
    assert_eq!(send_reply(&c.recv().await.unwrap(), 10)["code"], 0);
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
    let mut c = Tcp::auth(&h, "fast", "", &[1000]).await;
    let mut codes = Vec::new();
    for seq in 1..=3 {
        c.send(send_frame(seq, r#"{"mid":5,"op":1000}"#)).await;
        let r = send_reply(&c.recv().await.unwrap(), seq);
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
    heartbeat_ok(&mut c, 4).await;
    let m = h.http_get("/metrics").await;
    assert!(
        m.contains(r#"rim_comet_upstream_refused_total{code="-429"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn exclude_skips_the_sender_without_counting_it() {
    let mut h = start(|_| {}).await;
    let mut s1 = Tcp::auth(&h, "s1", "live://7", &[1000]).await;
    let mut s2 = Tcp::auth(&h, "s2", "live://7", &[1000]).await;
    let room = RoomId::parse("live://7").unwrap();
    let mut item = h.room_item(&room, 1000, "from s1");
    item.exclude = Some("s1".into());
    let r = h.deliver(vec![item]).await;
    assert_eq!((r.queued, r.missing, r.duplicates), (1, 0, 0), "{r:?}");
    assert_eq!(&s2.recv().await.unwrap().body[..], b"from s1");

    // Keys target too (a mid push to the sender's own sessions).
    let id = h.push_id();
    let r = h
        .deliver(vec![Delivery {
            id,
            op: 1000,
            body: Bytes::from_static(b"direct"),
            target: DeliverTarget::Keys(vec!["s1".into(), "s2".into()]),
            exclude: Some("s1".into()),
        }])
        .await;
    assert_eq!((r.queued, r.missing, r.duplicates), (1, 0, 0), "{r:?}");
    assert_eq!(&s2.recv().await.unwrap().body[..], b"direct");
    // s1 got nothing: the next thing it reads is its heartbeat reply.
    heartbeat_ok(&mut s1, 5).await;
}

#[tokio::test]
async fn system_pushes_bypass_the_op_filter_but_not_dedupe() {
    let mut h = start(|_| {}).await;
    let mut c = Tcp::auth(&h, "sys", "live://8", &[1000]).await;
    let room = RoomId::parse("live://8").unwrap();
    let ev = h.room_item(
        &room,
        op::ROOM_EVENT,
        r#"{"event":"join","mid":9,"room":"live://8"}"#,
    );
    let r = h.deliver(vec![ev.clone()]).await;
    assert_eq!(r.queued, 1, "{r:?}");
    let f = c.recv().await.unwrap();
    assert_eq!(f.op, op::ROOM_EVENT);
    let r = h.deliver(vec![ev]).await;
    assert_eq!((r.queued, r.duplicates), (0, 1), "{r:?}");
    let r = h.push(1001, "app", DeliverTarget::Room(room)).await;
    assert_eq!(r.queued, 0, "ordinary ops still filtered");
    heartbeat_ok(&mut c, 2).await;
}

#[tokio::test]
async fn a_room_run_reaches_each_member_as_one_message() {
    let mut h = start(|_| {}).await;
    let room_s = "live://run";
    let room = RoomId::parse(room_s).unwrap();

    let mut wb = ws_connect(&h).await;
    wb.send(Message::binary(
        auth_frame(1, "wb", room_s, &[1000, 1001]).to_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_frame(&mut wb).await.op, op::AUTH_REPLY);
    // Accepts only 1000: gets its subset.
    let mut wp = ws_connect(&h).await;
    wp.send(Message::binary(
        auth_frame(2, "wp", room_s, &[1000]).to_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_frame(&mut wp).await.op, op::AUTH_REPLY);
    let mut wj = ws_connect(&h).await;
    wj.send(Message::text(format!(
        r#"{{"op":7,"seq":1,"body":{{"mid":3,"key":"wj","room_id":"{room_s}","accepts":[1000,1001]}}}}"#
    )))
    .await
    .unwrap();
    assert_eq!(text_json(ws_recv(&mut wj).await)["op"], 8);
    let mut tc = Tcp::auth(&h, "wt", room_s, &[1000, 1001]).await;

    let ops = [1000, 1001, 1000, 1001, 1000];
    let items: Vec<Delivery> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| h.room_item(&room, *op, &format!("m{i}")))
        .collect();
    let r = h.deliver(items).await;
    assert_eq!(r.queued, 5 * 3 + 3, "{r:?}");

    let bodies = |raw: Frame| -> Vec<(i32, String)> {
        assert_eq!(raw.op, op::RAW);
        Frame::split_batch(raw.body, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|f| (f.op, String::from_utf8(f.body.to_vec()).unwrap()))
            .collect()
    };
    let all: Vec<(i32, String)> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| (*op, format!("m{i}")))
        .collect();
    // WebSocket binary: exactly one message holding all five, in order...
    assert_eq!(bodies(ws_frame(&mut wb).await), all);
    // ...and nothing else before the heartbeat reply.
    wb.send(Message::binary(
        Frame::new(op::HEARTBEAT, 2, Bytes::new()).to_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_frame(&mut wb).await.op, op::HEARTBEAT_REPLY);

    // Partial member: one message with just its ops, in order.
    assert_eq!(
        bodies(ws_frame(&mut wp).await),
        vec![
            (1000, "m0".to_string()),
            (1000, "m2".to_string()),
            (1000, "m4".to_string())
        ]
    );
    wp.send(Message::binary(
        Frame::new(op::HEARTBEAT, 2, Bytes::new()).to_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_frame(&mut wp).await.op, op::HEARTBEAT_REPLY);

    // JSON: one array of five.
    let v = text_json(ws_recv(&mut wj).await);
    let arr = v.as_array().expect("an array");
    let got: Vec<(i64, &str)> = arr
        .iter()
        .map(|o| (o["op"].as_i64().unwrap(), o["body"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1000, "m0"),
            (1001, "m1"),
            (1000, "m2"),
            (1001, "m3"),
            (1000, "m4")
        ]
    );
    wj.send(Message::text(r#"{"op":2,"seq":2}"#)).await.unwrap();
    assert_eq!(text_json(ws_recv(&mut wj).await)["op"], 3);

    // TCP: five plain frames.
    let mut tcp_got = Vec::new();
    for _ in 0..5 {
        let f = tc.recv().await.unwrap();
        tcp_got.push((f.op, String::from_utf8(f.body.to_vec()).unwrap()));
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
    });
    items.push(h.room_item(&room, 1000, "n3"));
    h.deliver(items).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(String::from_utf8(tc.recv().await.unwrap().body.to_vec()).unwrap());
    }
    assert_eq!(got, vec!["n0", "n1", "n2", "n3"]);
}

#[tokio::test]
async fn change_room_reports_the_move_to_logic_before_replying() {
    let mut h = start(|_| {}).await;
    // Auth with a room: logic learns it through connect, not room_changed.
    let mut c = Tcp::auth(&h, "mv", "chat://1", &[1000]).await;
    h.expect_event("room_joined chat://1").await;

    let mut change = async |h: &mut Harness, seq: i32, body: &'static [u8]| {
        c.send(Frame::new(op::CHANGE_ROOM, seq, Bytes::from_static(body)))
            .await;
        let r = c.recv().await.unwrap();
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
    // Nothing late shows up either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !h.events_now().iter().any(|e| e.starts_with("room_changed")),
        "no extra room_changed"
    );
}

#[tokio::test]
async fn a_disconnect_lost_to_a_logic_blip_is_retried() {
    let mut h = start(|c| c.logic.rpc_timeout_ms = 200).await;
    let c = Tcp::auth(&h, "hang-once-k", "", &[1000]).await;
    drop(c);
    // The first disconnect call hangs past its deadline; the retry lands.
    h.expect_event("disconnect hang-once-k").await;
}
