//! Test support for unit tests of session rules: an in-memory logic ([`MemLogic`]) that records
//! every call and can hold or fail chosen ones, an in-memory connection ([`MemConn`]) with the
//! client's end ([`Client`]), and a comet built on them ([`comet`]). No sockets and no tarpc, so
//! tests run under a paused clock and drive timers by advancing it.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rim_proto::frame::Frame;
use rim_proto::msg::AuthBody;
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::{
    ConnectReply, ConnectRequest, LogicError, NodeInfo, OnlineCounts, OnlineReport, PushAccepted,
    SendMsgRequest, SessionRef, TokenGrant,
};
use rim_runtime::rpc::LinkError;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::connection::{Connection, ReadError, Transport};
use crate::ctx::Ctx;
use crate::logic::{Logic, LogicCallError};
use crate::outbound::CloseSpec;
use crate::session::Session;
use crate::writer::Out;

/// How long a test waits for something that must happen (virtual time under a paused clock).
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// The grant of a test token: `ttl=<secs>` expires that long from now (wall clock, as logic's),
/// `rooms=<a>,<b>` limits rooms (both may be joined with `;`); `deny` is refused; anything else
/// grants everything forever.
fn mem_grant(token: &str) -> Result<TokenGrant, LogicCallError> {
    if token == "deny" {
        return Err(LogicError::Unauthorized("token invalid".into()).into());
    }
    let mut g = TokenGrant::default();
    for part in token.split(';') {
        if let Some(ttl) = part.strip_prefix("ttl=") {
            let secs: u64 = ttl.parse().unwrap();
            g.expires_ms = rim_runtime::unix_ms() + secs * 1000;
        } else if let Some(rooms) = part.strip_prefix("rooms=") {
            g.rooms = Some(rooms.split(',').map(str::to_string).collect());
        }
    }
    Ok(g)
}

/// An in-memory logic. Every call is recorded as a line (`connect k`, `room_joined live://1`,
/// `room_changed k live://1 -`, ...) before it is answered; calls whose line starts with a held
/// prefix wait for [`MemLogic::release`]; calls can be made to fail as unreachable.
pub(crate) struct MemLogic {
    calls: watch::Sender<Vec<String>>,
    held: Mutex<Vec<String>>,
    released: watch::Sender<bool>,
    /// Call-line prefixes and how many more such calls fail as unreachable.
    failing: Mutex<Vec<(String, u32)>>,
    sends: Mutex<Vec<SendMsgRequest>>,
    /// The user's history served to catch-ups; while non-empty, connects say messages wait.
    offline: Mutex<Vec<rim_proto::history::HistoryEntry>>,
    next: AtomicU64,
    heartbeat_secs: u32,
}

fn room_name(r: &Option<RoomId>) -> String {
    r.as_ref().map_or_else(|| "-".into(), |r| r.to_string())
}

impl MemLogic {
    /// A logic giving sessions `heartbeat_secs`.
    pub(crate) fn new(heartbeat_secs: u32) -> Arc<Self> {
        Arc::new(MemLogic {
            calls: watch::Sender::new(Vec::new()),
            held: Mutex::new(Vec::new()),
            released: watch::Sender::new(false),
            failing: Mutex::new(Vec::new()),
            sends: Mutex::new(Vec::new()),
            offline: Mutex::new(Vec::new()),
            next: AtomicU64::new(1),
            heartbeat_secs,
        })
    }

    /// Messages in the user's history (ids `1-seq`, op 1000, body `m<seq>`) that connects find
    /// waiting.
    pub(crate) fn set_offline(&self, seqs: &[u64]) {
        *self.offline.lock() = seqs
            .iter()
            .map(|&seq| rim_proto::history::HistoryEntry {
                id: rim_proto::history::HistoryId { ms: 1, seq },
                op: 1000,
                body: bytes::Bytes::from(format!("m{seq}")),
                ts_ms: 0,
            })
            .collect();
    }

    /// Calls whose line starts with `prefix` wait (after being recorded) until released.
    pub(crate) fn hold(&self, prefix: &str) {
        self.held.lock().push(prefix.into());
    }

    /// Lets held calls (and later ones) answer.
    pub(crate) fn release(&self) {
        self.released.send_replace(true);
    }

    /// The next `n` calls whose line starts with `prefix` fail as unreachable.
    pub(crate) fn fail(&self, prefix: &str, n: u32) {
        self.failing.lock().push((prefix.into(), n));
    }

    /// Every call so far.
    pub(crate) fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }

    /// The calls so far whose line starts with `prefix`.
    pub(crate) fn calls_of(&self, prefix: &str) -> Vec<String> {
        let calls = self.calls.borrow();
        calls
            .iter()
            .filter(|c| c.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Waits (at most [`WAIT`]) until `line` was called.
    pub(crate) async fn called(&self, line: &str) {
        self.wait_calls(line, |c| c.iter().any(|l| l == line)).await;
    }

    /// Waits (at most [`WAIT`]) until `n` calls starting with `prefix` were made.
    pub(crate) async fn called_n(&self, prefix: &str, n: usize) {
        let what = format!("{n} calls {prefix}..");
        self.wait_calls(&what, |c| {
            c.iter().filter(|l| l.starts_with(prefix)).count() >= n
        })
        .await;
    }

    async fn wait_calls(&self, what: &str, done: impl FnMut(&Vec<String>) -> bool) {
        let mut rx = self.calls.subscribe();
        let seen = tokio::time::timeout(WAIT, rx.wait_for(done)).await;
        assert!(
            matches!(seen, Ok(Ok(_))),
            "logic never got {what}; got {:?}",
            self.calls()
        );
    }

    /// The upstream messages logic accepted.
    pub(crate) fn sends(&self) -> Vec<SendMsgRequest> {
        self.sends.lock().clone()
    }

    /// Records `line`, then fails it or holds it as configured.
    async fn call(&self, line: String) -> Result<(), LogicCallError> {
        self.calls.send_modify(|c| c.push(line.clone()));
        let fail = self
            .failing
            .lock()
            .iter_mut()
            .find(|(p, n)| *n > 0 && line.starts_with(p.as_str()))
            .map(|(_, n)| *n -= 1)
            .is_some();
        if fail {
            return Err(LogicCallError::Unreachable(LinkError::Connect {
                name: "logic".into(),
                addrs: vec!["mem".into()],
                last: "mem: down".into(),
            }));
        }
        let held = self
            .held
            .lock()
            .iter()
            .any(|p| line.starts_with(p.as_str()));
        if held {
            let _ = self.released.subscribe().wait_for(|r| *r).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Logic for MemLogic {
    async fn connect(&self, req: ConnectRequest) -> Result<ConnectReply, LogicCallError> {
        let key = if req.auth.key.is_empty() {
            format!("k{}", self.next.fetch_add(1, Ordering::Relaxed))
        } else {
            req.auth.key.clone()
        };
        self.call(format!("connect {key}")).await?;
        if req.auth.token == "deny" {
            return Err(LogicError::Unauthorized("bad token".into()).into());
        }
        let grant = mem_grant(&req.auth.token)?;
        let room = match req.auth.room_id.as_str() {
            "" => None,
            r => Some(RoomId::parse(r).map_err(|e| LogicError::BadRequest(e.to_string()))?),
        };
        let mut rooms: Vec<RoomId> = room.iter().cloned().collect();
        for r in &req.auth.rooms {
            let r = RoomId::parse(r).map_err(|e| LogicError::BadRequest(e.to_string()))?;
            if !rooms.contains(&r) {
                rooms.push(r);
            }
        }
        Ok(ConnectReply {
            rooms,
            since_ms: 1_000_000 + self.next.fetch_add(1, Ordering::Relaxed),
            mid: req.auth.mid,
            key,
            room,
            accepts: req.auth.accepts,
            heartbeat_secs: self.heartbeat_secs,
            replaced_elsewhere: false,
            grant,
            guarded_room_types: vec!["guarded".into()],
            offline_after: (!self.offline.lock().is_empty())
                .then_some(rim_proto::history::HistoryId::default()),
            partitions: 16,
        })
    }

    async fn history(
        &self,
        s: SessionRef,
        wants: Vec<rim_proto::history::HistoryWant>,
    ) -> Result<Vec<rim_proto::history::HistoryPage>, LogicCallError> {
        self.call(format!("history {}", s.key)).await?;
        let kept = self.offline.lock().clone();
        Ok(wants
            .iter()
            .map(|w| rim_proto::history::HistoryPage {
                entries: kept
                    .iter()
                    .filter(|e| w.after.is_none_or(|a| e.id > a))
                    .cloned()
                    .collect(),
                complete: true,
            })
            .collect())
    }

    async fn check_join(
        &self,
        s: SessionRef,
        room: RoomId,
        grant: TokenGrant,
    ) -> Result<(), LogicCallError> {
        self.call(format!("check_join {} {room}", s.key)).await?;
        if grant.names_room(room.as_str()) {
            Ok(())
        } else {
            Err(LogicError::Forbidden("room requires a token that names it".into()).into())
        }
    }

    async fn refresh_token(
        &self,
        s: SessionRef,
        token: String,
    ) -> Result<TokenGrant, LogicCallError> {
        self.call(format!("refresh_token {} {token}", s.key))
            .await?;
        mem_grant(&token)
    }

    async fn disconnect(
        &self,
        s: SessionRef,
        seen: Option<rim_proto::history::HistoryId>,
    ) -> Result<(), LogicCallError> {
        match seen {
            None => self.call(format!("disconnect {}", s.key)).await,
            Some(id) => self.call(format!("disconnect {} seen {id}", s.key)).await,
        }
    }

    async fn heartbeat(&self, s: SessionRef) -> Result<(), LogicCallError> {
        self.call(format!("heartbeat {}", s.key)).await
    }

    async fn room_joined(&self, _server: String, room: RoomId) -> Result<(), LogicCallError> {
        self.call(format!("room_joined {room}")).await
    }

    async fn room_changed(
        &self,
        s: SessionRef,
        from: Option<RoomId>,
        to: Option<RoomId>,
    ) -> Result<(), LogicCallError> {
        let line = format!(
            "room_changed {} {} {}",
            s.key,
            room_name(&from),
            room_name(&to)
        );
        self.call(line).await
    }

    async fn join_room(&self, s: SessionRef, room: RoomId) -> Result<(), LogicCallError> {
        self.call(format!("join_room {} {room}", s.key)).await
    }

    async fn leave_room(&self, s: SessionRef, room: RoomId) -> Result<(), LogicCallError> {
        self.call(format!("leave_room {} {room}", s.key)).await
    }

    async fn renew_node(
        &self,
        _node: NodeInfo,
        online: OnlineReport,
    ) -> Result<OnlineCounts, LogicCallError> {
        let mut rooms: Vec<String> = online
            .rooms
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        rooms.sort();
        self.call(format!("renew {}", rooms.join(","))).await?;
        Ok(OnlineCounts {
            rooms: online
                .rooms
                .into_iter()
                .map(|(r, n)| (r, u64::from(n)))
                .collect(),
        })
    }

    async fn unregister_node(&self, server: String) -> Result<(), LogicCallError> {
        self.call(format!("unregister {server}")).await
    }

    async fn send_msg(&self, req: SendMsgRequest) -> Result<PushAccepted, LogicCallError> {
        self.call("send_msg".into()).await?;
        self.sends.lock().push(req);
        Ok(PushAccepted {
            id: format!("msg-{}", self.next.fetch_add(1, Ordering::Relaxed)),
            sessions: 1,
            stored: false,
        })
    }
}

/// A comet (its shared state only: no listeners, no renew task) on `logic`, configured by
/// `Config::default()` with server id `comet-test`, then `tweak`.
pub(crate) fn comet(logic: Arc<MemLogic>, tweak: impl FnOnce(&mut Config)) -> Arc<Ctx> {
    let mut cfg = Config {
        server_id: "comet-test".into(),
        ..Config::default()
    };
    tweak(&mut cfg);
    let node = NodeInfo {
        server: cfg.server_id.clone(),
        rpc_addr: String::new(),
        domain: String::new(),
        tcp_addr: String::new(),
        ws_addr: String::new(),
        wss_addr: String::new(),
        tls_addr: String::new(),
        connections: 0,
        ips: 0,
        weight: 1,
        started_ms: 0,
        renewed_ms: 0,
    };
    // The paced worker is not running: nothing in these tests broadcasts paced.
    let (paced, _) = mpsc::channel(1);
    Arc::new(Ctx::new(
        cfg,
        logic,
        node,
        paced,
        CancellationToken::new(),
        TaskTracker::new(),
    ))
}

/// A session handle of mid 7 (not registered anywhere), with a queue of 16.
pub(crate) fn session(id: u64, key: &str, accepts: &[i32]) -> Arc<Session> {
    let out = crate::outbound::Outbound::new(16);
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    Arc::new(Session::new(id, 7, key.into(), peer, out, accepts))
}

/// What the comet did to a [`MemConn`].
#[derive(Debug)]
pub(crate) enum Wire {
    /// One write of queued items.
    Write(Vec<Out>),
    /// The close.
    Finish(CloseSpec),
}

/// An in-memory [`Connection`]: frames from the [`Client`], writes and the close to it.
pub(crate) struct MemConn {
    frames: mpsc::UnboundedReceiver<Frame>,
    wire: mpsc::UnboundedSender<Wire>,
}

impl Connection for MemConn {
    async fn next(&mut self) -> Option<Result<Frame, ReadError>> {
        self.frames.recv().await.map(Ok)
    }

    async fn write(&mut self, batch: &[Out]) -> Result<(), String> {
        self.wire
            .send(Wire::Write(batch.to_vec()))
            .map_err(|_| "client gone".to_string())
    }

    async fn finish(&mut self, spec: &CloseSpec) -> Result<(), String> {
        self.wire
            .send(Wire::Finish(spec.clone()))
            .map_err(|_| "client gone".to_string())
    }
}

/// The client's end of a [`MemConn`] whose session runs in its own task.
pub(crate) struct Client {
    frames: Option<mpsc::UnboundedSender<Frame>>,
    wire: mpsc::UnboundedReceiver<Wire>,
    /// Items written but not read yet.
    pending: std::collections::VecDeque<Out>,
    /// The session's task (ends after the close).
    pub task: tokio::task::JoinHandle<()>,
}

/// Connects a client to `ctx` (the session's driver runs in a task of its own).
pub(crate) fn connect(ctx: &Arc<Ctx>) -> Client {
    let (ftx, frx) = mpsc::unbounded_channel();
    let (wtx, wrx) = mpsc::unbounded_channel();
    let conn = MemConn {
        frames: frx,
        wire: wtx,
    };
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let task = tokio::spawn(crate::driver::drive(
        ctx.clone(),
        conn,
        peer,
        Transport::Tcp,
    ));
    Client {
        frames: Some(ftx),
        wire: wrx,
        pending: Default::default(),
        task,
    }
}

/// A comet on a fresh [`MemLogic`] giving `heartbeat_secs`, configured by `tweak`, with one
/// client authenticated as `key` in `room` ("" = none).
pub(crate) async fn authed(
    heartbeat_secs: u32,
    tweak: impl FnOnce(&mut Config),
    key: &str,
    room: &str,
) -> (Arc<MemLogic>, Arc<Ctx>, Client) {
    let logic = MemLogic::new(heartbeat_secs);
    let ctx = comet(logic.clone(), tweak);
    let mut c = connect(&ctx);
    c.auth(&auth_body(key, room)).await;
    (logic, ctx, c)
}

/// An Auth body for `key` (mid 7) in `room` ("" = none), accepting op 1000.
pub(crate) fn auth_body(key: &str, room: &str) -> AuthBody {
    AuthBody {
        mid: 7,
        key: key.into(),
        room_id: room.into(),
        platform: "test".into(),
        accepts: vec![1000],
        token: String::new(),
        recover: None,
        rooms: Vec::new(),
    }
}

impl Client {
    /// Sends a frame.
    pub(crate) fn send(&self, op: i32, seq: i32, body: impl Into<Bytes>) {
        if let Some(tx) = &self.frames {
            let _ = tx.send(Frame::new(op, seq, body));
        }
    }

    /// The client goes away (the comet reads the end of the stream).
    pub(crate) fn hang_up(&mut self) {
        self.frames = None;
    }

    /// Authenticates with `auth` and returns the AuthReply.
    pub(crate) async fn auth(&mut self, auth: &AuthBody) -> Frame {
        self.send(op::AUTH, 1, serde_json::to_vec(auth).unwrap());
        let r = self.reply().await;
        assert_eq!((r.op, r.seq), (op::AUTH_REPLY, 1), "{r:?}");
        r
    }

    /// The next item the comet wrote, if one comes within `wait`; `None` also after the close.
    pub(crate) async fn next_item(&mut self, wait: Duration) -> Option<Out> {
        loop {
            if let Some(o) = self.pending.pop_front() {
                return Some(o);
            }
            match tokio::time::timeout(wait, self.wire.recv()).await {
                Ok(Some(Wire::Write(batch))) => self.pending.extend(batch),
                Ok(Some(Wire::Finish(spec))) => {
                    panic!("closed while waiting for an item: {spec:?}")
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next reply frame (within [`WAIT`]).
    pub(crate) async fn reply(&mut self) -> Frame {
        match self.next_item(WAIT).await {
            Some(Out::Reply(f)) => f,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// Sends `op` and returns its reply.
    pub(crate) async fn request(&mut self, op: i32, seq: i32, body: impl Into<Bytes>) -> Frame {
        self.send(op, seq, body);
        let r = self.reply().await;
        assert_eq!(r.seq, seq, "{r:?}");
        r
    }

    /// The seqs of the replies written and not read yet (e.g. before a close).
    pub(crate) fn pending_reply_seqs(&self) -> Vec<i32> {
        self.pending
            .iter()
            .filter_map(|o| match o {
                Out::Reply(f) => Some(f.seq),
                _ => None,
            })
            .collect()
    }

    /// How the comet closed the connection (within `wait`); items written before are skipped.
    pub(crate) async fn closed(&mut self, wait: Duration) -> Option<CloseSpec> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.wire.recv()).await {
                Ok(Some(Wire::Write(batch))) => self.pending.extend(batch),
                Ok(Some(Wire::Finish(spec))) => return Some(spec),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}
