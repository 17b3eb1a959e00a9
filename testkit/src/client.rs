//! Protocol clients as a goim client (or a browser in JSON mode) would be: raw TCP frames,
//! WebSocket binary frames (server pushes wrapped in op 9), and WebSocket JSON text.
//!
//! Every read has a timeout ([`crate::WAIT`] unless given), so a test waits on events, never on sleeps.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use rim_proto::frame::{Frame, FrameCodec};
use rim_proto::msg::{AuthBody, AuthReplyBody};
use rim_proto::op;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::codec::Framed;

/// Largest frame body the test clients accept from servers.
const CLIENT_MAX_BODY: usize = 16 * 1024 * 1024;

/// How a client talks to a comet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Raw frames on a TCP stream.
    Tcp,
    /// One binary frame per WebSocket message; pushes arrive wrapped in op 9.
    WsBinary,
    /// JSON text mode.
    WsJson,
}

/// One frame as the client received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The frame (in JSON mode: body is the JSON text of `body`, or the string's bytes).
    pub frame: Frame,
    /// Whether it came inside an op 9 wrapper.
    pub in_raw: bool,
    /// JSON mode: the `body` value as sent.
    pub json_body: Option<Value>,
}

/// How the server ended the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// WebSocket close code (None for TCP or a close without a frame).
    pub code: Option<u16>,
    /// WebSocket close reason.
    pub reason: String,
    /// Body of the op 6 DisconnectReply received before the close, if any.
    pub disconnect_reason: Option<String>,
}

impl Closed {
    /// Whether the op 6 reason received before the close mentions `what`.
    pub fn said(&self, what: &str) -> bool {
        self.disconnect_reason
            .as_deref()
            .is_some_and(|r| r.contains(what))
    }
}

enum Conn {
    Tcp(Framed<TcpStream, FrameCodec>),
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
}

/// A connected protocol client.
pub struct Client {
    transport: Transport,
    conn: Conn,
    inbox: VecDeque<Received>,
    /// Transport-level messages received (WebSocket messages, or TCP frames).
    pub messages_received: u64,
    /// Set after a successful [`Client::auth`].
    pub session: Option<AuthReplyBody>,
    last_disconnect: Option<String>,
    seq: i32,
}

impl Client {
    /// Opens the transport without authenticating. `addr` is the comet's TCP listener for
    /// [`Transport::Tcp`], else its HTTP listener (`/sub`).
    pub async fn open(transport: Transport, addr: SocketAddr) -> anyhow::Result<Client> {
        let conn = match transport {
            Transport::Tcp => {
                let stream = TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("tcp connect {addr}"))?;
                Conn::Tcp(Framed::new(stream, FrameCodec::new(CLIENT_MAX_BODY)))
            }
            Transport::WsBinary | Transport::WsJson => {
                let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/sub"))
                    .await
                    .with_context(|| format!("ws connect {addr}"))?;
                Conn::Ws(Box::new(ws))
            }
        };
        Ok(Client {
            transport,
            conn,
            inbox: VecDeque::new(),
            messages_received: 0,
            session: None,
            last_disconnect: None,
            seq: 0,
        })
    }

    /// Opens and authenticates; fails unless the server answers op 8.
    pub async fn connect(
        transport: Transport,
        addr: SocketAddr,
        auth: &AuthBody,
    ) -> anyhow::Result<Client> {
        let mut c = Client::open(transport, addr).await?;
        c.auth(auth).await?;
        Ok(c)
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Session key assigned at auth.
    pub fn key(&self) -> &str {
        self.session.as_ref().map(|s| s.key.as_str()).unwrap_or("")
    }

    /// Sends op 7 and waits for op 8.
    pub async fn auth(&mut self, auth: &AuthBody) -> anyhow::Result<AuthReplyBody> {
        let body = serde_json::to_vec(auth)?;
        let seq = self.send_op(op::AUTH, body).await?;
        let reply = self.recv_op(op::AUTH_REPLY).await?;
        if reply.frame.seq != seq {
            bail!("auth reply seq {} != {}", reply.frame.seq, seq);
        }
        let parsed: AuthReplyBody =
            serde_json::from_slice(&reply.frame.body).context("auth reply body")?;
        self.session = Some(parsed.clone());
        Ok(parsed)
    }

    /// Sends a frame with the next seq; returns the seq used.
    pub async fn send_op(&mut self, op: i32, body: impl Into<Bytes>) -> anyhow::Result<i32> {
        self.seq += 1;
        let seq = self.seq;
        self.send_frame(Frame::new(op, seq, body)).await?;
        Ok(seq)
    }

    /// Sends a frame as is (JSON mode: converted to the JSON envelope).
    pub async fn send_frame(&mut self, f: Frame) -> anyhow::Result<()> {
        match (&mut self.conn, self.transport) {
            (Conn::Tcp(framed), _) => framed.send(f).await.map_err(|e| anyhow!("tcp send: {e}")),
            (Conn::Ws(ws), Transport::WsJson) => {
                let body = match serde_json::from_slice::<Value>(&f.body) {
                    Ok(v) if v.is_object() || v.is_array() => v,
                    _ => Value::String(String::from_utf8_lossy(&f.body).into_owned()),
                };
                let text =
                    serde_json::json!({"ver": f.ver, "op": f.op, "seq": f.seq, "body": body})
                        .to_string();
                ws.send(Message::text(text))
                    .await
                    .map_err(|e| anyhow!("ws send: {e}"))
            }
            (Conn::Ws(ws), _) => ws
                .send(Message::binary(f.to_bytes()))
                .await
                .map_err(|e| anyhow!("ws send: {e}")),
        }
    }

    /// Sends raw bytes: a TCP write, or one binary WebSocket message (for malformed-input tests).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        match &mut self.conn {
            Conn::Tcp(framed) => {
                use tokio::io::AsyncWriteExt;
                let stream = framed.get_mut();
                stream.write_all(&bytes).await?;
                stream.flush().await?;
                Ok(())
            }
            Conn::Ws(ws) => ws
                .send(Message::binary(bytes))
                .await
                .map_err(|e| anyhow!("ws send: {e}")),
        }
    }

    /// Sends a text WebSocket message as is.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        match &mut self.conn {
            Conn::Ws(ws) => ws
                .send(Message::text(text))
                .await
                .map_err(|e| anyhow!("ws send: {e}")),
            Conn::Tcp(_) => bail!("text messages need a WebSocket"),
        }
    }

    /// Sends a heartbeat and returns the online count of the reply.
    pub async fn heartbeat(&mut self) -> anyhow::Result<i32> {
        let seq = self.send_op(op::HEARTBEAT, Bytes::new()).await?;
        let r = self.recv_op(op::HEARTBEAT_REPLY).await?;
        if r.frame.seq != seq {
            bail!("heartbeat reply seq {} != {seq}", r.frame.seq);
        }
        online_of(&r)
    }

    /// Sends a heartbeat and returns every push that arrived before its reply. Since a session's
    /// replies and pushes share one ordered queue, an empty result proves nothing was queued for
    /// this session before the heartbeat was answered.
    pub async fn pushes_before_heartbeat(&mut self) -> anyhow::Result<Vec<Received>> {
        let seq = self.send_op(op::HEARTBEAT, Bytes::new()).await?;
        let mut pushes: Vec<Received> = self
            .inbox
            .drain(..)
            .filter(|r| r.frame.op >= op::APP_MIN)
            .collect();
        loop {
            let r = self.recv_any().await?;
            if r.frame.op == op::HEARTBEAT_REPLY && r.frame.seq == seq {
                return Ok(pushes);
            }
            if r.frame.op >= op::APP_MIN {
                pushes.push(r);
            }
        }
    }

    /// Next frame of the given op; frames of other ops are kept for later reads.
    pub async fn recv_op(&mut self, want: i32) -> anyhow::Result<Received> {
        self.recv_matching(|r| r.frame.op == want, crate::WAIT)
            .await
    }

    /// Next push (op ≥ 1000); other frames are kept.
    pub async fn recv_push(&mut self) -> anyhow::Result<Received> {
        self.recv_matching(|r| r.frame.op >= op::APP_MIN, crate::WAIT)
            .await
    }

    /// Next push within `wait`: `Ok(None)` when none came, `Err` when the connection ended.
    pub async fn next_push(&mut self, wait: Duration) -> anyhow::Result<Option<Received>> {
        if let Some(pos) = self.inbox.iter().position(|r| r.frame.op >= op::APP_MIN) {
            return Ok(self.inbox.remove(pos));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.read_one()).await {
                Err(_) => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(r)) if r.frame.op >= op::APP_MIN => return Ok(Some(r)),
                Ok(Ok(_)) => continue,
            }
        }
    }

    /// Next frame satisfying `pred` within `wait`; others stay queued in order.
    pub async fn recv_matching(
        &mut self,
        pred: impl Fn(&Received) -> bool,
        wait: Duration,
    ) -> anyhow::Result<Received> {
        if let Some(pos) = self.inbox.iter().position(&pred) {
            return self.inbox.remove(pos).ok_or_else(|| anyhow!("inbox"));
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut skipped = Vec::new();
        let found = loop {
            let r = tokio::time::timeout_at(deadline, self.read_one())
                .await
                .map_err(|_| anyhow!("timed out after {wait:?} waiting for a frame"))??;
            if pred(&r) {
                break r;
            }
            skipped.push(r);
        };
        self.inbox.extend(skipped);
        Ok(found)
    }

    /// Next frame of any op.
    pub async fn recv_any(&mut self) -> anyhow::Result<Received> {
        if let Some(r) = self.inbox.pop_front() {
            return Ok(r);
        }
        tokio::time::timeout(crate::WAIT, self.read_one())
            .await
            .map_err(|_| anyhow!("timed out waiting for a frame"))?
    }

    /// Reads until the server closes the connection; returns how (and the op 6 reason, if any).
    pub async fn expect_closed(&mut self) -> anyhow::Result<Closed> {
        let deadline = tokio::time::Instant::now() + crate::WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.read_one_raw())
                .await
                .map_err(|_| anyhow!("server did not close the connection"))?;
            match next {
                Ok(Some(frames)) => {
                    for r in frames {
                        if r.frame.op == op::DISCONNECT_REPLY {
                            self.last_disconnect = Some(disconnect_reason(&r));
                        }
                    }
                }
                Ok(None) => return Ok(self.closed(None, String::new())),
                Err(ReadEnd::Close(code, reason)) => return Ok(self.closed(code, reason)),
                Err(ReadEnd::Error(_)) => return Ok(self.closed(None, String::new())),
            }
        }
    }

    fn closed(&self, code: Option<u16>, reason: String) -> Closed {
        Closed {
            code,
            reason,
            disconnect_reason: self.last_disconnect.clone(),
        }
    }

    /// Closes the connection from the client side.
    pub async fn close(mut self) {
        match &mut self.conn {
            Conn::Tcp(framed) => {
                use tokio::io::AsyncWriteExt;
                let _ = framed.get_mut().shutdown().await;
            }
            Conn::Ws(ws) => {
                let _ = ws.close().await;
            }
        }
    }

    async fn read_one(&mut self) -> anyhow::Result<Received> {
        loop {
            if let Some(r) = self.inbox.pop_front() {
                return Ok(r);
            }
            match self.read_one_raw().await {
                Ok(Some(frames)) => {
                    for r in &frames {
                        if r.frame.op == op::DISCONNECT_REPLY {
                            self.last_disconnect = Some(disconnect_reason(r));
                        }
                    }
                    self.inbox.extend(frames);
                }
                Ok(None) => bail!(
                    "connection closed (disconnect reason: {:?})",
                    self.last_disconnect
                ),
                Err(ReadEnd::Close(code, reason)) => {
                    bail!(
                        "connection closed: code {code:?} {reason:?} (disconnect reason: {:?})",
                        self.last_disconnect
                    )
                }
                Err(ReadEnd::Error(e)) => bail!("read failed: {e}"),
            }
        }
    }

    /// One transport message, as frames. `Ok(None)` = clean EOF.
    async fn read_one_raw(&mut self) -> Result<Option<Vec<Received>>, ReadEnd> {
        match &mut self.conn {
            Conn::Tcp(framed) => match framed.next().await {
                None => Ok(None),
                Some(Ok(frame)) => {
                    self.messages_received += 1;
                    Ok(Some(vec![Received {
                        frame,
                        in_raw: false,
                        json_body: None,
                    }]))
                }
                Some(Err(e)) => Err(ReadEnd::Error(e.to_string())),
            },
            Conn::Ws(ws) => loop {
                let msg = match ws.next().await {
                    None => return Ok(None),
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(ReadEnd::Error(e.to_string())),
                };
                match msg {
                    Message::Binary(b) => {
                        self.messages_received += 1;
                        return decode_binary(b)
                            .map(Some)
                            .map_err(|e| ReadEnd::Error(e.to_string()));
                    }
                    Message::Text(t) => {
                        self.messages_received += 1;
                        return decode_json(t.as_str())
                            .map(Some)
                            .map_err(|e| ReadEnd::Error(e.to_string()));
                    }
                    Message::Close(frame) => {
                        let (code, reason) = match frame {
                            Some(CloseFrame { code, reason }) => {
                                (Some(u16::from(code)), reason.to_string())
                            }
                            None => (None, String::new()),
                        };
                        return Err(ReadEnd::Close(code, reason));
                    }
                    _ => continue,
                }
            },
        }
    }
}

enum ReadEnd {
    Close(Option<u16>, String),
    Error(String),
}

fn decode_binary(b: Bytes) -> anyhow::Result<Vec<Received>> {
    let f = Frame::decode_message(b, CLIENT_MAX_BODY)?;
    if f.op == op::RAW {
        Ok(Frame::split_batch(f.body, CLIENT_MAX_BODY)?
            .into_iter()
            .map(|frame| Received {
                frame,
                in_raw: true,
                json_body: None,
            })
            .collect())
    } else {
        Ok(vec![Received {
            frame: f,
            in_raw: false,
            json_body: None,
        }])
    }
}

fn decode_json(text: &str) -> anyhow::Result<Vec<Received>> {
    let v: Value = serde_json::from_str(text).context("server sent invalid JSON")?;
    let items = match v {
        Value::Array(items) => items,
        obj => vec![obj],
    };
    items
        .into_iter()
        .map(|item| {
            let op = item
                .get("op")
                .and_then(Value::as_i64)
                .ok_or_else(|| anyhow!("no op in {item}"))? as i32;
            let seq = item.get("seq").and_then(Value::as_i64).unwrap_or(0) as i32;
            let body_v = item.get("body").cloned().unwrap_or(Value::Null);
            let body = match &body_v {
                Value::String(s) => Bytes::from(s.clone()),
                Value::Null => Bytes::new(),
                other => Bytes::from(other.to_string()),
            };
            Ok(Received {
                frame: Frame::new(op, seq, body),
                in_raw: false,
                json_body: Some(body_v),
            })
        })
        .collect()
}

fn disconnect_reason(r: &Received) -> String {
    serde_json::from_slice::<Value>(&r.frame.body)
        .ok()
        .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&r.frame.body).into_owned())
}

/// Online count of a heartbeat reply, in either mode.
pub fn online_of(r: &Received) -> anyhow::Result<i32> {
    if let Some(v) = &r.json_body {
        return v
            .get("online")
            .and_then(Value::as_i64)
            .map(|n| n as i32)
            .ok_or_else(|| anyhow!("no online in {v}"));
    }
    let b: [u8; 4] = r.frame.body[..]
        .try_into()
        .map_err(|_| anyhow!("heartbeat reply body is {} bytes", r.frame.body.len()))?;
    Ok(i32::from_be_bytes(b))
}

/// Encodes a frame header with arbitrary (possibly invalid) fields, for malformed-input tests.
pub fn raw_frame(pack_len: i32, header_len: i16, op: i32, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i32(pack_len);
    b.put_i16(header_len);
    b.put_i16(1);
    b.put_i32(op);
    b.put_i32(1);
    b.extend_from_slice(body);
    b.to_vec()
}
