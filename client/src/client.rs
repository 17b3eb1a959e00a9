//! A session that keeps itself connected: it authenticates, sends heartbeats at the interval the
//! server asked for, answers requests (SendMsg, ChangeRoom, Sub, Unsub, RefreshToken) by seq, hands pushes to
//! the application as [`Event`]s, and after a transient failure reconnects with jittered
//! exponential backoff under the key the server assigned, so the server sees the same session
//! come back. A refusal that reconnecting cannot fix (a bad credential) stops it with the reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rim_proto::msg::{AuthBody, AuthReplyBody, SendMsgBody, SendMsgReplyBody};
use rim_proto::op;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::conn::{Conn, ConnectOptions};
use crate::error::ClientError;
use crate::received::Received;
use crate::reconnect::Reconnect;

/// What a [`Client`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where and how to connect.
    pub connect: ConnectOptions,
    /// The Auth body (its `key` is replaced by the server-assigned key after the first connect).
    pub auth: AuthBody,
    /// Heartbeat interval; `None` uses the interval the server sent in op 8.
    pub heartbeat: Option<Duration>,
    /// Reconnect policy.
    pub reconnect: Reconnect,
    /// Events buffered for the application before the client stops reading the socket.
    pub event_queue: usize,
}

impl ClientConfig {
    /// Defaults for everything but where to connect and who to be.
    pub fn new(connect: ConnectOptions, auth: AuthBody) -> Self {
        ClientConfig {
            connect,
            auth,
            heartbeat: None,
            reconnect: Reconnect::default(),
            event_queue: 1024,
        }
    }
}

/// What happened to the session.
#[derive(Debug)]
pub enum Event {
    /// Authenticated (again, after a reconnect).
    Connected(AuthReplyBody),
    /// A push (op ≥ 1000), op 9 batches already unpacked, in arrival order.
    Push(Received),
    /// A server notice that is no reply to a request (op 24 room events).
    Notice(Received),
    /// The connection was lost; the client reconnects after `retry_in`.
    Disconnected {
        /// Why.
        error: ClientError,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// The client gave up (a refusal reconnecting cannot fix, or out of attempts); no more events.
    Stopped(ClientError),
}

enum Cmd {
    Request {
        op: i32,
        reply_op: i32,
        body: Bytes,
        done: oneshot::Sender<Result<Received, ClientError>>,
    },
}

/// A self-reconnecting session. Dropping it (or [`Client::close`]) ends the session.
#[derive(Debug)]
pub struct Client {
    cmds: mpsc::Sender<Cmd>,
    /// The last token accepted by op 22, used by every reconnect from then on.
    fresh_token: Arc<Mutex<Option<String>>>,
    events: mpsc::Receiver<Event>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Client {
    /// Starts connecting in the background; watch [`Client::next_event`] for `Connected`.
    pub fn start(config: ClientConfig) -> Client {
        let (cmds, cmd_rx) = mpsc::channel(64);
        let (ev_tx, events) = mpsc::channel(config.event_queue.max(1));
        let stop = tokio_util::sync::CancellationToken::new();
        let fresh_token = Arc::new(Mutex::new(None));
        let task = tokio::spawn(run(
            config,
            cmd_rx,
            ev_tx,
            stop.clone(),
            fresh_token.clone(),
        ));
        Client {
            cmds,
            fresh_token,
            events,
            stop,
            task,
        }
    }

    /// The next event; `None` once the client stopped and every event was read.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Waits for `Connected`, skipping other events; fails with the reason the client stopped.
    pub async fn connected(&mut self) -> Result<AuthReplyBody, ClientError> {
        loop {
            match self.next_event().await {
                Some(Event::Connected(a)) => return Ok(a),
                Some(Event::Stopped(e)) => return Err(e),
                Some(_) => continue,
                None => return Err(ClientError::Stopped),
            }
        }
    }

    async fn request(&self, op: i32, reply_op: i32, body: Bytes) -> Result<Received, ClientError> {
        let (done, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Request {
                op,
                reply_op,
                body,
                done,
            })
            .await
            .map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// Sends op 4 and returns the message id from op 5, or the refusal (`-403`, `-404`, ...).
    pub async fn send_msg(&self, msg: &SendMsgBody) -> Result<String, ClientError> {
        let body = serde_json::to_vec(msg).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let r = self
            .request(op::SEND_MSG, op::SEND_MSG_REPLY, body.into())
            .await?;
        let reply: SendMsgReplyBody = match &r.json_body {
            Some(v) => serde_json::from_value(v.clone()),
            None => serde_json::from_slice(&r.frame.body),
        }
        .map_err(|e| ClientError::Protocol(format!("SendMsg reply: {e}")))?;
        if reply.code != 0 {
            return Err(ClientError::Refused {
                op: "SendMsg",
                code: reply.code,
                message: reply.message.unwrap_or_default(),
            });
        }
        Ok(reply.id.unwrap_or_default())
    }

    /// ChangeRoom (op 12) to `room` (`type://id`), or out of any room with `""`.
    pub async fn change_room(&self, room: &str) -> Result<(), ClientError> {
        let body = Bytes::copy_from_slice(room.as_bytes());
        let r = self
            .request(op::CHANGE_ROOM, op::CHANGE_ROOM_REPLY, body)
            .await?;
        refusal("ChangeRoom", &r)
    }

    /// RefreshToken (op 22): puts a fresh token in force before the session's one expires (the
    /// server closes the session with op 6 `token expired` otherwise); reconnects use it from
    /// then on. Returns when the session now ends (unix ms, 0 = never).
    pub async fn refresh_token(&self, token: &str) -> Result<u64, ClientError> {
        let body = Bytes::copy_from_slice(token.as_bytes());
        let r = self
            .request(op::REFRESH_TOKEN, op::REFRESH_TOKEN_REPLY, body)
            .await?;
        refusal("RefreshToken", &r)?;
        let v = match &r.json_body {
            Some(v) => v.clone(),
            None => serde_json::from_slice::<Value>(&r.frame.body)
                .map_err(|e| ClientError::Protocol(format!("RefreshToken reply: {e}")))?,
        };
        if let Ok(mut t) = self.fresh_token.lock() {
            *t = Some(token.to_string());
        }
        Ok(v.get("expires_ms").and_then(Value::as_u64).unwrap_or(0))
    }

    /// Sub (op 14): also accept pushes of `ops`.
    pub async fn sub(&self, ops: &[i32]) -> Result<(), ClientError> {
        let r = self.request(op::SUB, op::SUB_REPLY, op_list(ops)).await?;
        refusal("Sub", &r)
    }

    /// Unsub (op 16): stop accepting pushes of `ops`.
    pub async fn unsub(&self, ops: &[i32]) -> Result<(), ClientError> {
        let r = self
            .request(op::UNSUB, op::UNSUB_REPLY, op_list(ops))
            .await?;
        refusal("Unsub", &r)
    }

    /// Closes the connection and waits for the driver to finish.
    pub async fn close(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

fn op_list(ops: &[i32]) -> Bytes {
    ops.iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",")
        .into()
}

/// Replies to ChangeRoom/Sub/Unsub echo the request on success and carry `{"error":...}` on
/// refusal.
fn refusal(what: &'static str, r: &Received) -> Result<(), ClientError> {
    let v = match &r.json_body {
        Some(v) => Some(v.clone()),
        None => serde_json::from_slice::<Value>(&r.frame.body).ok(),
    };
    match v
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
    {
        Some(e) => Err(ClientError::Refused {
            op: what,
            code: 0,
            message: e.to_string(),
        }),
        None => Ok(()),
    }
}

async fn run(
    mut config: ClientConfig,
    mut cmds: mpsc::Receiver<Cmd>,
    events: mpsc::Sender<Event>,
    stop: tokio_util::sync::CancellationToken,
    fresh_token: Arc<Mutex<Option<String>>>,
) {
    let mut attempt = 0u32;
    loop {
        if let Some(t) = fresh_token.lock().ok().and_then(|mut t| t.take()) {
            config.auth.token = t;
        }
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect(&config) => r,
        };
        let error = match outcome {
            Ok((conn, reply)) => {
                attempt = 0;
                if !reply.key.is_empty() {
                    // Come back as the same session: the server replaces it instead of adding one.
                    config.auth.key = reply.key.clone();
                }
                let hb = config
                    .heartbeat
                    .unwrap_or(Duration::from_secs(u64::from(reply.heartbeat.max(1))));
                if events.send(Event::Connected(reply)).await.is_err() {
                    return;
                }
                match serve(conn, hb, &mut cmds, &events, &stop).await {
                    Served::Stop => return,
                    Served::Lost(e) => e,
                }
            }
            Err(e) => e,
        };
        if !error.is_transient() {
            let _ = events.send(Event::Stopped(error)).await;
            return;
        }
        let Some(retry_in) = config.reconnect.delay(attempt) else {
            let _ = events.send(Event::Stopped(error)).await;
            return;
        };
        attempt = attempt.saturating_add(1);
        tracing::debug!(error = %error, ?retry_in, "rim client disconnected");
        if events
            .send(Event::Disconnected { error, retry_in })
            .await
            .is_err()
        {
            return;
        }
        // Requests made while disconnected fail at once rather than wait an unknown time.
        let sleep = tokio::time::sleep(retry_in);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut sleep => break,
                c = cmds.recv() => match c {
                    Some(Cmd::Request { done, .. }) => {
                        let _ = done.send(Err(ClientError::Io("not connected".into())));
                    }
                    None => return,
                },
            }
        }
    }
}

async fn connect(config: &ClientConfig) -> Result<(Conn, AuthReplyBody), ClientError> {
    let mut conn = Conn::open_with(&config.connect).await?;
    let reply = conn.auth(&config.auth).await?;
    Ok((conn, reply))
}

enum Served {
    Stop,
    Lost(ClientError),
}

async fn serve(
    mut conn: Conn,
    heartbeat: Duration,
    cmds: &mut mpsc::Receiver<Cmd>,
    events: &mpsc::Sender<Event>,
    stop: &tokio_util::sync::CancellationToken,
) -> Served {
    let mut pending: HashMap<i32, (i32, oneshot::Sender<Result<Received, ClientError>>)> =
        HashMap::new();
    let mut tick = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Heartbeat sent and not yet answered: a server silent for a whole interval after it is gone.
    let mut unanswered: Option<i32> = None;
    let fail = |pending: &mut HashMap<_, (i32, oneshot::Sender<_>)>, e: &ClientError| {
        for (_, (_, done)) in pending.drain() {
            let _ = done.send(Err(match e {
                ClientError::Closed(c) => ClientError::Closed(c.clone()),
                other => ClientError::Io(other.to_string()),
            }));
        }
    };
    loop {
        let error = tokio::select! {
            _ = stop.cancelled() => {
                conn.close().await;
                return Served::Stop;
            }
            _ = tick.tick() => {
                if unanswered.is_some() {
                    ClientError::Timeout { waited: heartbeat, what: "a heartbeat reply" }
                } else {
                    match conn.send_op(op::HEARTBEAT, Bytes::new()).await {
                        Ok(seq) => {
                            unanswered = Some(seq);
                            continue;
                        }
                        Err(e) => e,
                    }
                }
            }
            c = cmds.recv() => match c {
                None => {
                    conn.close().await;
                    return Served::Stop;
                }
                Some(Cmd::Request { op, reply_op, body, done }) => match conn.send_op(op, body).await {
                    Ok(seq) => {
                        pending.insert(seq, (reply_op, done));
                        continue;
                    }
                    Err(e) => {
                        let _ = done.send(Err(ClientError::Io(e.to_string())));
                        e
                    }
                },
            },
            r = conn.read() => match r {
                Ok(r) => {
                    let f = &r.frame;
                    if f.op == op::HEARTBEAT_REPLY {
                        if unanswered == Some(f.seq) {
                            unanswered = None;
                        }
                        continue;
                    }
                    if pending.get(&f.seq).is_some_and(|(reply_op, _)| *reply_op == f.op) {
                        if let Some((_, done)) = pending.remove(&f.seq) {
                            let _ = done.send(Ok(r));
                        }
                        continue;
                    }
                    let ev = match f.op {
                        o if o >= op::APP_MIN => Event::Push(r),
                        op::DISCONNECT_REPLY => continue,
                        _ => Event::Notice(r),
                    };
                    if events.send(ev).await.is_err() {
                        conn.close().await;
                        return Served::Stop;
                    }
                    continue;
                }
                Err(e) => e,
            },
        };
        fail(&mut pending, &error);
        return Served::Lost(error);
    }
}
