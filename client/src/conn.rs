//! One connection to a comet, as a goim client (or a browser in JSON mode) has it: raw TCP
//! frames, WebSocket binary frames (server pushes wrapped in op 9, unpacked here), or WebSocket
//! JSON text. It sends frames and hands back what arrives; it never reconnects (that is
//! [`crate::Client`]).
//!
//! Every wait is bounded by the connection's [`Conn::wait`], so a caller waits on events, never
//! on sleeps.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rim_proto::frame::{Frame, FrameCodec};
use rim_proto::json::encode_client;
use rim_proto::msg::{AuthBody, AuthReplyBody};
use rim_proto::op;
use tokio::net::TcpSocket;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::codec::Framed;

use crate::error::{ClientError, Closed};
use crate::io::{Io, TlsOptions, peer_certificates};
use crate::received::{
    MAX_SERVER_BODY, Received, decode_binary, decode_json, disconnect_reason, online_of,
};
use tokio_util::either::Either;

/// Default for [`Conn::wait`].
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// How a client talks to a comet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Raw frames on a TCP stream (the comet's TCP listener).
    Tcp,
    /// One binary frame per WebSocket message at `/sub`; pushes arrive wrapped in op 9.
    WsBinary,
    /// JSON text mode at `/sub`.
    WsJson,
}

impl Transport {
    /// `tcp`, `ws` or `json`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::WsBinary => "ws",
            Transport::WsJson => "json",
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "ws" | "ws-binary" => Ok(Transport::WsBinary),
            "json" | "ws-json" => Ok(Transport::WsJson),
            other => Err(format!("unknown transport {other:?} (tcp, ws, json)")),
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The comet's TCP listener for [`Transport::Tcp`], else its HTTP listener (`/sub`).
    pub addr: SocketAddr,
    /// The transport.
    pub transport: Transport,
    /// Source address to bind (load tools spread connections over 127.0.0.x), or any.
    pub local_ip: Option<IpAddr>,
    /// Bound on each wait (connect, auth, every `recv_*`).
    pub wait: Duration,
    /// TLS inside the TCP connection (a comet's `listen.tls`, or `listen.wss` for WebSocket);
    /// `None` = plain.
    pub tls: Option<TlsOptions>,
}

impl ConnectOptions {
    /// `transport` to `addr` from any source address, with [`DEFAULT_WAIT`].
    pub fn new(transport: Transport, addr: SocketAddr) -> Self {
        ConnectOptions {
            addr,
            transport,
            local_ip: None,
            wait: DEFAULT_WAIT,
            tls: None,
        }
    }
}

/// A WebSocket layer configured for a client that mostly receives small messages: the
/// tungstenite defaults reserve 128 KiB per connection up front, which a load tool holding tens of
/// thousands of sessions cannot afford.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_SERVER_BODY + 64))
        .max_frame_size(Some(MAX_SERVER_BODY + 64))
}

enum Stream {
    Tcp(Framed<Io, FrameCodec>),
    Ws(Box<WebSocketStream<Io>>),
}

/// A connected protocol client.
pub struct Conn {
    transport: Transport,
    stream: Stream,
    inbox: VecDeque<Received>,
    /// Bound on every wait of this connection.
    pub wait: Duration,
    /// Transport-level messages received (WebSocket messages, or TCP frames).
    pub messages_received: u64,
    /// Set after a successful [`Conn::auth`].
    pub session: Option<AuthReplyBody>,
    last_disconnect: Option<String>,
    seq: i32,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("transport", &self.transport)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Opens the transport without authenticating.
    pub async fn open(transport: Transport, addr: SocketAddr) -> Result<Conn, ClientError> {
        Conn::open_with(&ConnectOptions::new(transport, addr)).await
    }

    /// Opens the transport described by `o` without authenticating.
    pub async fn open_with(o: &ConnectOptions) -> Result<Conn, ClientError> {
        let addr = o.addr;
        let tcp = async {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|source| ClientError::Connect { addr, source })?;
            if let Some(ip) = o.local_ip {
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .map_err(|source| ClientError::Connect { addr, source })?;
            }
            let s = socket
                .connect(addr)
                .await
                .map_err(|source| ClientError::Connect { addr, source })?;
            let _ = s.set_nodelay(true);
            Ok::<_, ClientError>(s)
        };
        let open = async {
            let s = match &o.tls {
                None => Either::Left(tcp.await?),
                Some(tls) => tls
                    .connect(tcp.await?)
                    .await
                    .map_err(|message| ClientError::Handshake { addr, message })?,
            };
            let scheme = if o.tls.is_some() { "wss" } else { "ws" };
            Ok::<_, ClientError>(match o.transport {
                Transport::Tcp => Stream::Tcp(Framed::new(s, FrameCodec::new(MAX_SERVER_BODY))),
                Transport::WsBinary | Transport::WsJson => {
                    let (ws, _) = tokio_tungstenite::client_async_with_config(
                        format!("{scheme}://{addr}/sub"),
                        s,
                        Some(ws_config()),
                    )
                    .await
                    .map_err(|e| ClientError::Handshake {
                        addr,
                        message: e.to_string(),
                    })?;
                    Stream::Ws(Box::new(ws))
                }
            })
        };
        let stream =
            tokio::time::timeout(o.wait, open)
                .await
                .map_err(|_| ClientError::Timeout {
                    waited: o.wait,
                    what: "the connection to open",
                })??;
        Ok(Conn {
            transport: o.transport,
            stream,
            inbox: VecDeque::new(),
            wait: o.wait,
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
    ) -> Result<Conn, ClientError> {
        let mut c = Conn::open(transport, addr).await?;
        c.auth(auth).await?;
        Ok(c)
    }

    /// The certificates the server presented (DER, leaf first) on a TLS connection.
    pub fn peer_certificates(&self) -> Option<Vec<Vec<u8>>> {
        match &self.stream {
            Stream::Tcp(f) => peer_certificates(f.get_ref()),
            Stream::Ws(ws) => peer_certificates(ws.get_ref()),
        }
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Session key assigned at auth.
    pub fn key(&self) -> &str {
        self.session.as_ref().map(|s| s.key.as_str()).unwrap_or("")
    }

    /// Sends op 7 and waits for op 8. A close instead of op 8 is [`ClientError::AuthRefused`]
    /// with the server's reason.
    pub async fn auth(&mut self, auth: &AuthBody) -> Result<AuthReplyBody, ClientError> {
        let body = serde_json::to_vec(auth).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let seq = self.send_op(op::AUTH, body).await?;
        let reply = match self.recv_op(op::AUTH_REPLY).await {
            Ok(r) => r,
            Err(ClientError::Closed(c)) => return Err(ClientError::AuthRefused(c)),
            Err(e) => return Err(e),
        };
        if reply.frame.seq != seq {
            return Err(ClientError::Protocol(format!(
                "auth reply seq {} != {seq}",
                reply.frame.seq
            )));
        }
        let parsed: AuthReplyBody = serde_json::from_slice(&reply.frame.body)
            .map_err(|e| ClientError::Protocol(format!("auth reply body: {e}")))?;
        self.session = Some(parsed.clone());
        Ok(parsed)
    }

    /// Sends a frame with the next seq; returns the seq used.
    pub async fn send_op(&mut self, op: i32, body: impl Into<Bytes>) -> Result<i32, ClientError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.send_frame(Frame::new(op, seq, body)).await?;
        Ok(seq)
    }

    /// Sends a frame as is (JSON mode: converted to the JSON envelope).
    pub async fn send_frame(&mut self, f: Frame) -> Result<(), ClientError> {
        let io = |e: &dyn std::fmt::Display| ClientError::Io(format!("send: {e}"));
        match (&mut self.stream, self.transport) {
            (Stream::Tcp(framed), _) => framed.send(f).await.map_err(|e| io(&e)),
            (Stream::Ws(ws), Transport::WsJson) => ws
                .send(Message::text(encode_client(&f)))
                .await
                .map_err(|e| io(&e)),
            (Stream::Ws(ws), _) => ws
                .send(Message::binary(f.to_bytes()))
                .await
                .map_err(|e| io(&e)),
        }
    }

    /// Sends raw bytes: a TCP write, or one binary WebSocket message (for malformed-input tests).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        match &mut self.stream {
            Stream::Tcp(framed) => {
                use tokio::io::AsyncWriteExt;
                let stream = framed.get_mut();
                stream
                    .write_all(&bytes)
                    .await
                    .map_err(|e| ClientError::Io(format!("send: {e}")))?;
                stream
                    .flush()
                    .await
                    .map_err(|e| ClientError::Io(format!("send: {e}")))
            }
            Stream::Ws(ws) => ws
                .send(Message::binary(bytes))
                .await
                .map_err(|e| ClientError::Io(format!("send: {e}"))),
        }
    }

    /// Sends a text WebSocket message as is.
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        match &mut self.stream {
            Stream::Ws(ws) => ws
                .send(Message::text(text))
                .await
                .map_err(|e| ClientError::Io(format!("send: {e}"))),
            Stream::Tcp(_) => Err(ClientError::Unsupported("text messages need a WebSocket")),
        }
    }

    /// Sends a heartbeat and returns the online count of the reply.
    pub async fn heartbeat(&mut self) -> Result<i32, ClientError> {
        let seq = self.send_op(op::HEARTBEAT, Bytes::new()).await?;
        let r = self
            .recv_matching(
                |r| r.frame.op == op::HEARTBEAT_REPLY && r.frame.seq == seq,
                self.wait,
            )
            .await?;
        online_of(&r)
    }

    /// Sends a heartbeat and returns every push that arrived before its reply. Since a session's
    /// replies and pushes share one ordered queue, an empty result proves nothing was queued for
    /// this session before the heartbeat was answered.
    pub async fn pushes_before_heartbeat(&mut self) -> Result<Vec<Received>, ClientError> {
        let seq = self.send_op(op::HEARTBEAT, Bytes::new()).await?;
        let mut pushes: Vec<Received> = self.inbox.drain(..).filter(Received::is_push).collect();
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let r = self.read_until(deadline, "a heartbeat reply").await?;
            if r.frame.op == op::HEARTBEAT_REPLY && r.frame.seq == seq {
                return Ok(pushes);
            }
            if r.is_push() {
                pushes.push(r);
            }
        }
    }

    /// Next frame of the given op; frames of other ops are kept for later reads.
    pub async fn recv_op(&mut self, want: i32) -> Result<Received, ClientError> {
        self.recv_matching(|r| r.frame.op == want, self.wait).await
    }

    /// Next push (op ≥ 1000); other frames are kept.
    pub async fn recv_push(&mut self) -> Result<Received, ClientError> {
        self.recv_matching(Received::is_push, self.wait).await
    }

    /// Next push within `wait`: `Ok(None)` when none came, `Err` when the connection ended.
    pub async fn next_push(&mut self, wait: Duration) -> Result<Option<Received>, ClientError> {
        if let Some(pos) = self.inbox.iter().position(Received::is_push) {
            return Ok(self.inbox.remove(pos));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.read_one()).await {
                Err(_) => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(r)) if r.is_push() => return Ok(Some(r)),
                Ok(Ok(_)) => continue,
            }
        }
    }

    /// Next frame satisfying `pred` within `wait`; others stay queued in order.
    pub async fn recv_matching(
        &mut self,
        pred: impl Fn(&Received) -> bool,
        wait: Duration,
    ) -> Result<Received, ClientError> {
        if let Some(r) = self
            .inbox
            .iter()
            .position(&pred)
            .and_then(|pos| self.inbox.remove(pos))
        {
            return Ok(r);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut skipped = Vec::new();
        let found = loop {
            match tokio::time::timeout_at(deadline, self.read_one()).await {
                Err(_) => {
                    self.inbox.extend(skipped);
                    return Err(ClientError::Timeout {
                        waited: wait,
                        what: "a frame",
                    });
                }
                Ok(Err(e)) => {
                    self.inbox.extend(skipped);
                    return Err(e);
                }
                Ok(Ok(r)) if pred(&r) => break r,
                Ok(Ok(r)) => skipped.push(r),
            }
        };
        self.inbox.extend(skipped);
        Ok(found)
    }

    /// Next frame of any op.
    pub async fn recv_any(&mut self) -> Result<Received, ClientError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        self.read_until(deadline, "a frame").await
    }

    /// Next frame of any op, with no time bound (for long-lived readers that time themselves).
    pub async fn read(&mut self) -> Result<Received, ClientError> {
        self.read_one().await
    }

    /// Every frame of the next transport message (an op 9 batch unpacked, a JSON array split),
    /// with no time bound; frames already waiting come first, one call each. For readers that
    /// want a whole batch at a time (load tools).
    pub async fn read_message(&mut self) -> Result<Vec<Received>, ClientError> {
        if !self.inbox.is_empty() {
            return Ok(self.inbox.drain(..).collect());
        }
        loop {
            if let Some(frames) = self.read_transport().await? {
                return Ok(frames);
            }
        }
    }

    /// Reads until the server closes the connection; returns how (and the op 6 reason, if any).
    pub async fn expect_closed(&mut self) -> Result<Closed, ClientError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            match tokio::time::timeout_at(deadline, self.read_transport()).await {
                Err(_) => {
                    return Err(ClientError::Timeout {
                        waited: self.wait,
                        what: "the server to close the connection",
                    });
                }
                Ok(Ok(_)) => continue,
                Ok(Err(ClientError::Closed(c))) => return Ok(c),
                Ok(Err(ClientError::Io(_))) => return Ok(self.closed(None, String::new())),
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Closes the connection from the client side.
    pub async fn close(mut self) {
        match &mut self.stream {
            Stream::Tcp(framed) => {
                use tokio::io::AsyncWriteExt;
                let _ = framed.get_mut().shutdown().await;
            }
            Stream::Ws(ws) => {
                let _ = ws.close().await;
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

    async fn read_until(
        &mut self,
        deadline: tokio::time::Instant,
        what: &'static str,
    ) -> Result<Received, ClientError> {
        let waited = self.wait;
        tokio::time::timeout_at(deadline, self.read_one())
            .await
            .map_err(|_| ClientError::Timeout { waited, what })?
    }

    async fn read_one(&mut self) -> Result<Received, ClientError> {
        loop {
            if let Some(r) = self.inbox.pop_front() {
                return Ok(r);
            }
            if let Some(frames) = self.read_transport().await? {
                self.inbox.extend(frames);
            }
        }
    }

    /// One transport message as frames; `Ok(None)` for a message that carries no frame (ping).
    /// A close (clean EOF, a close frame, or a reset after op 6) is [`ClientError::Closed`].
    async fn read_transport(&mut self) -> Result<Option<Vec<Received>>, ClientError> {
        let frames = match &mut self.stream {
            Stream::Tcp(framed) => match framed.next().await {
                None => return Err(ClientError::Closed(self.closed(None, String::new()))),
                Some(Ok(frame)) => vec![Received {
                    frame,
                    in_raw: false,
                    json_body: None,
                }],
                Some(Err(e)) => return Err(self.read_failed(e.to_string())),
            },
            Stream::Ws(ws) => {
                let msg = match ws.next().await {
                    None => return Err(ClientError::Closed(self.closed(None, String::new()))),
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(self.read_failed(e.to_string())),
                };
                match msg {
                    Message::Binary(b) => decode_binary(b)?,
                    Message::Text(t) => decode_json(t.as_str())?,
                    Message::Close(frame) => {
                        let (code, reason) = match frame {
                            Some(CloseFrame { code, reason }) => {
                                (Some(u16::from(code)), reason.to_string())
                            }
                            None => (None, String::new()),
                        };
                        return Err(ClientError::Closed(self.closed(code, reason)));
                    }
                    _ => return Ok(None),
                }
            }
        };
        self.messages_received += 1;
        for r in &frames {
            if r.frame.op == op::DISCONNECT_REPLY {
                self.last_disconnect = Some(disconnect_reason(r));
            }
        }
        Ok(Some(frames))
    }

    /// A read error after op 6 is the server's close racing our read (a reset); before it, an
    /// I/O failure.
    fn read_failed(&self, e: String) -> ClientError {
        if self.last_disconnect.is_some() {
            ClientError::Closed(self.closed(None, String::new()))
        } else {
            ClientError::Io(format!("read: {e}"))
        }
    }
}
