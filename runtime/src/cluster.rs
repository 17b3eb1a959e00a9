//! `[cluster]`, shared by the three tiers: the secret every internal RPC connection proves at
//! connect ([`crate::handshake`]), and the bounds of the RPC listeners (connections, frame size,
//! handshake deadline). [`Cluster`] applies them on both ends and counts refusals in
//! [`RpcMetrics`], which each tier appends to its `/metrics`.
//!
//! With an empty secret on both ends the handshake is skipped (local development); that is
//! allowed only when the tier's RPC addresses are loopback ones (see [`ClusterConfig::validate`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, Stream, StreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_util::codec::LengthDelimitedCodecError;

use crate::handshake::{self, HandshakeError, MAGIC_DIAL};
use crate::metrics::{Counter, Exposition, Gauge};
use crate::rpc_tls::{RpcStream, RpcTls, RpcTlsFiles};
use crate::settings::{SettingsError, positive};
use crate::tls::{TlsError, TlsMetrics};

/// Largest `cluster.max_frame_bytes` accepted (1 GiB; the handshake magic reads as a larger
/// frame length, so a handshake is never mistaken for a frame).
pub const MAX_FRAME_LIMIT: usize = 1 << 30;
/// Shortest secret accepted when one is set.
pub const MIN_SECRET_LEN: usize = 16;

/// `[cluster]`: the shared secret and the bounds of internal RPC.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Shared by every logic, comet and job of the cluster; each RPC connection proves it (HMAC
    /// challenge both ways) before any method runs. Empty = no authentication, allowed only when
    /// this tier's RPC addresses are loopback. Never logged.
    pub secret: String,
    /// Largest RPC frame, in bytes, either direction. Must hold the largest delivery batch:
    /// job `stream.batch_max` × (logic `push.body_limit` + a push's key list); the default 32 MiB
    /// holds 256 × (64 KiB + 1,000 keys of 48 bytes).
    pub max_frame_bytes: usize,
    /// Most RPC connections this tier's listener holds open; past it new ones are closed at once.
    pub max_connections: usize,
    /// Time a new RPC connection has to finish the handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// PEM certificate chain the RPC listener presents; with `tls_key_file`, RPC to this tier
    /// is accepted over TLS only. Reloaded on SIGHUP. Empty = plain.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// PEM CA the RPC peers this tier dials are verified against (and the host of the address
    /// dialled must be in their certificate); set = RPC is dialled over TLS. Empty = plain.
    pub tls_ca_file: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            secret: String::new(),
            max_frame_bytes: 32 * 1024 * 1024,
            max_connections: 1_024,
            handshake_timeout_ms: 3_000,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_ca_file: String::new(),
        }
    }
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("secret", &if self.secret.is_empty() { "" } else { "<set>" })
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_connections", &self.max_connections)
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// Whether `addr` (`ip:port` or `host:port`) names this machine's loopback interface.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(sa) = addr.trim().parse::<SocketAddr>() {
        return sa.ip().is_loopback();
    }
    addr.trim()
        .rsplit_once(':')
        .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

impl ClusterConfig {
    /// Checks the bounds, and that an empty secret only goes with loopback RPC addresses.
    /// `rpc_addrs` are `(field, address)` pairs: the tier's RPC listener and the RPC peers it is
    /// configured to dial.
    pub fn validate(&self, rpc_addrs: &[(&str, &str)]) -> Result<(), SettingsError> {
        if self.secret.is_empty() {
            if let Some((field, addr)) = rpc_addrs.iter().find(|(_, a)| !is_loopback(a)) {
                return Err(SettingsError::invalid(
                    "cluster.secret",
                    format!(
                        "must be set: {field} {addr:?} is not a loopback address, and internal \
                         RPC without the secret is unauthenticated"
                    ),
                ));
            }
        } else if self.secret.len() < MIN_SECRET_LEN {
            return Err(SettingsError::invalid(
                "cluster.secret",
                format!("must be at least {MIN_SECRET_LEN} bytes (a long random string)"),
            ));
        }
        if !(64 * 1024..=MAX_FRAME_LIMIT).contains(&self.max_frame_bytes) {
            return Err(SettingsError::invalid(
                "cluster.max_frame_bytes",
                format!("must be between 65536 and {MAX_FRAME_LIMIT}"),
            ));
        }
        positive("cluster.max_connections", self.max_connections as u64)?;
        positive("cluster.handshake_timeout_ms", self.handshake_timeout_ms)?;
        self.tls_files().validate()
    }

    /// The TLS files of `[cluster]`.
    pub fn tls_files(&self) -> RpcTlsFiles<'_> {
        RpcTlsFiles {
            cert: &self.tls_cert_file,
            key: &self.tls_key_file,
            ca: &self.tls_ca_file,
        }
    }

    /// The TLS sides these settings turn on, handshakes bounded by `handshake_timeout_ms`,
    /// counted in `metrics`.
    pub fn rpc_tls(&self, metrics: Arc<TlsMetrics>) -> Result<RpcTls, TlsError> {
        let deadline = Duration::from_millis(self.handshake_timeout_ms);
        RpcTls::load(self.tls_files(), deadline, metrics)
    }
}

/// RPC connection counters of one tier instance.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    /// Accepted connections refused by the handshake.
    pub auth_refused_accept: Counter,
    /// Outgoing connections whose peer failed (or refused) the handshake.
    pub auth_refused_dial: Counter,
    /// Connections closed at once because the listener was at `cluster.max_connections`.
    pub connections_refused: Counter,
    /// Connections closed because the peer sent a frame over `cluster.max_frame_bytes`.
    pub frames_too_large: Counter,
    /// Accepted RPC connections open now (handshaking or serving).
    pub connections: Gauge,
}

impl RpcMetrics {
    /// Prometheus text, appended to the tier's own.
    pub fn render(&self) -> String {
        Exposition::new()
            .labeled_counter(
                "rim_rpc_auth_refused_total",
                "RPC connections refused by the cluster handshake, by side.",
                "side",
                &[
                    ("accept", self.auth_refused_accept.get()),
                    ("dial", self.auth_refused_dial.get()),
                ],
            )
            .counter(
                "rim_rpc_connections_refused_total",
                "RPC connections closed at once because cluster.max_connections were open.",
                self.connections_refused.get(),
            )
            .counter(
                "rim_rpc_frames_too_large_total",
                "RPC connections closed for a frame over cluster.max_frame_bytes.",
                self.frames_too_large.get(),
            )
            .gauge(
                "rim_rpc_connections",
                "Accepted RPC connections open.",
                self.connections.get(),
            )
            .finish()
    }
}

struct Inner {
    /// `None` = no secret: handshake skipped.
    secret: Option<Vec<u8>>,
    max_frame: usize,
    max_connections: usize,
    handshake_timeout: Duration,
    metrics: Arc<RpcMetrics>,
    tls: RpcTls,
}

/// `[cluster]` in force for one tier: runs the handshake on both ends, frames RPC with the
/// configured limit, and counts refusals. Cheap to clone.
#[derive(Clone)]
pub struct Cluster(Arc<Inner>);

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("authenticated", &self.0.secret.is_some())
            .field("max_frame", &self.0.max_frame)
            .finish_non_exhaustive()
    }
}

/// Whether an RPC stream error is the codec refusing a frame over the limit.
fn is_frame_too_large(e: &io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
    // tarpc wraps the codec's io::Error in another io::Error: unwrap each layer.
    for _ in 0..8 {
        let Some(err) = cur else { return false };
        if err.is::<LengthDelimitedCodecError>() {
            return true;
        }
        cur = match err.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|e| e as _),
            None => err.source(),
        };
    }
    false
}

impl Cluster {
    /// The settings of `cfg` without TLS, counting into `metrics`. Warns once when the secret
    /// is empty.
    pub fn new(cfg: &ClusterConfig, tier: &str, metrics: Arc<RpcMetrics>) -> Self {
        Self::with_tls(cfg, tier, metrics, RpcTls::default())
    }

    /// [`Cluster::new`] with the TLS sides loaded from `cfg` ([`ClusterConfig::rpc_tls`]).
    pub fn with_tls(
        cfg: &ClusterConfig,
        tier: &str,
        metrics: Arc<RpcMetrics>,
        tls: RpcTls,
    ) -> Self {
        if cfg.secret.is_empty() {
            tracing::warn!(
                tier,
                "cluster.secret is empty: RPC unauthenticated, loopback only"
            );
        }
        Cluster(Arc::new(Inner {
            secret: (!cfg.secret.is_empty()).then(|| cfg.secret.as_bytes().to_vec()),
            max_frame: cfg.max_frame_bytes,
            max_connections: cfg.max_connections.max(1),
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
            metrics,
            tls,
        }))
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<RpcMetrics> {
        &self.0.metrics
    }

    /// Most connections the RPC listener holds.
    pub fn max_connections(&self) -> usize {
        self.0.max_connections
    }

    /// Runs the accepting side of the handshake on a new connection (inside TLS when
    /// `cluster.tls_cert_file` is set), within the deadline. On refusal the connection is
    /// dropped (closed), counted and logged with the peer.
    pub async fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Option<RpcStream> {
        let deadline = self.0.handshake_timeout;
        if self.0.secret.is_none() && !self.0.tls.accepts_tls() {
            // No secret: no handshake, but a dialer that has one must not silently pass.
            let mut first = [0u8; 4];
            let result = match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
                Ok(Ok(4)) if first == MAGIC_DIAL => Err(HandshakeError::Unexpected),
                _ => Ok(()),
            };
            return match result {
                Ok(()) => self.0.tls.accept(stream, peer).await,
                Err(e) => self.refused(peer, e),
            };
        }
        // TLS failures are counted by the acceptor (rim_tls_handshake_failures_total).
        let mut stream = self.0.tls.accept(stream, peer).await?;
        let Some(secret) = &self.0.secret else {
            return Some(stream);
        };
        let result =
            match tokio::time::timeout(deadline, handshake::serve(&mut stream, secret)).await {
                Ok(r) => r,
                Err(_) => Err(HandshakeError::Timeout(deadline)),
            };
        match result {
            Ok(()) => Some(stream),
            Err(e) => self.refused(peer, e),
        }
    }

    fn refused(&self, peer: SocketAddr, e: HandshakeError) -> Option<RpcStream> {
        self.0.metrics.auth_refused_accept.inc();
        tracing::warn!(%peer, error = %e, "rpc connection refused");
        None
    }

    /// Runs the dialing side on a fresh connection to `peer` (`host:port`): TLS first when
    /// `cluster.tls_ca_file` is set, then the secret handshake (nothing without a secret), all
    /// within the deadline. A refusal is counted and logged with the peer.
    pub async fn dial(&self, stream: TcpStream, peer: &str) -> Result<RpcStream, HandshakeError> {
        let deadline = self.0.handshake_timeout;
        let run = async {
            let mut s = self
                .0
                .tls
                .dial(stream, peer)
                .await
                .map_err(|e| HandshakeError::Tls(e.to_string()))?;
            if let Some(secret) = &self.0.secret {
                handshake::dial(&mut s, secret).await?;
            }
            Ok(s)
        };
        let result = match tokio::time::timeout(deadline, run).await {
            Ok(r) => r,
            Err(_) => Err(HandshakeError::Timeout(deadline)),
        };
        if let Err(e) = &result {
            self.0.metrics.auth_refused_dial.inc();
            tracing::warn!(%peer, error = %e, "rpc peer refused");
        }
        result
    }

    /// rim's RPC transport over a handshaken stream, with this cluster's frame limit; a peer's
    /// frame over the limit ends the connection and is counted.
    pub fn transport<In, Out>(
        &self,
        stream: RpcStream,
    ) -> impl Stream<Item = io::Result<In>> + Sink<Out, Error = io::Error> + Send + use<In, Out>
    where
        In: DeserializeOwned + Send + 'static,
        Out: serde::Serialize + Send + 'static,
    {
        let peer = crate::rpc_tls::peer_addr(&stream).ok();
        let metrics = self.0.metrics.clone();
        let max = self.0.max_frame;
        rim_proto::rpc::transport_with_limit(stream, max).inspect(move |item| {
            if let Err(e) = item
                && is_frame_too_large(e)
            {
                metrics.frames_too_large.inc();
                tracing::warn!(peer = ?peer, max, "rpc frame over cluster.max_frame_bytes; closing");
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(secret: &str) -> ClusterConfig {
        ClusterConfig {
            secret: secret.into(),
            ..ClusterConfig::default()
        }
    }

    fn field(r: Result<(), SettingsError>) -> Option<String> {
        match r {
            Err(SettingsError::Invalid { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn empty_secret_only_on_loopback() {
        let loopback = [
            ("listen.rpc", "127.0.0.1:3119"),
            ("logic.addrs", "localhost:1"),
        ];
        assert!(cfg("").validate(&loopback).is_ok());
        assert!(cfg("").validate(&[("listen.rpc", "[::1]:1")]).is_ok());
        let open = [("listen.rpc", "0.0.0.0:3119")];
        assert_eq!(
            field(cfg("").validate(&open)).as_deref(),
            Some("cluster.secret")
        );
        let remote = [("logic.addrs", "logic:3119")];
        assert_eq!(
            field(cfg("").validate(&remote)).as_deref(),
            Some("cluster.secret")
        );
        assert!(cfg("0123456789abcdef").validate(&open).is_ok());
        assert_eq!(
            field(cfg("short").validate(&open)).as_deref(),
            Some("cluster.secret")
        );
        let tiny = ClusterConfig {
            max_frame_bytes: 10,
            ..cfg("")
        };
        assert_eq!(
            field(tiny.validate(&[])).as_deref(),
            Some("cluster.max_frame_bytes")
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = cfg("very secret value 123");
        let text = format!("{c:?} {:?}", Cluster::new(&c, "t", Arc::default()));
        assert!(!text.contains("very secret"), "{text}");
    }

    const SECRET: &str = "a cluster secret for tests";

    fn side(secret: &str) -> Cluster {
        Cluster::new(&cfg(secret), "test", Arc::default())
    }

    /// Runs `server.accept` and `client.dial` on the two ends of one loopback connection.
    async fn connect(server: &Cluster, client: &Cluster) -> (bool, Result<(), HandshakeError>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dialer = client.clone();
        let dial = tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            match dialer.dial(s, "test").await {
                Ok(mut s) => {
                    // A secret-less dialer's first tarpc frame (a length prefix); then hang up.
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut s, &[0, 0, 0, 1, 0]).await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        });
        let (stream, peer) = listener.accept().await.unwrap();
        let accepted = server.accept(stream, peer).await.is_some();
        (accepted, dial.await.unwrap())
    }

    #[tokio::test]
    async fn right_secret_is_accepted_and_nothing_counted() {
        let (server, client) = (side(SECRET), side(SECRET));
        let (accepted, dialled) = connect(&server, &client).await;
        assert!(accepted && dialled.is_ok(), "{dialled:?}");
        assert_eq!(server.metrics().auth_refused_accept.get(), 0);
        assert_eq!(client.metrics().auth_refused_dial.get(), 0);
    }

    #[tokio::test]
    async fn no_secret_on_both_sides_skips_the_handshake() {
        let (accepted, dialled) = connect(&side(""), &side("")).await;
        assert!(accepted && dialled.is_ok(), "{dialled:?}");
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_and_counted_on_both_sides() {
        let (server, client) = (side(SECRET), side("another secret, not ours"));
        let (accepted, dialled) = connect(&server, &client).await;
        assert!(!accepted);
        assert!(
            matches!(dialled, Err(HandshakeError::WrongSecret)),
            "{dialled:?}"
        );
        assert_eq!(server.metrics().auth_refused_accept.get(), 1);
        assert_eq!(client.metrics().auth_refused_dial.get(), 1);
    }

    #[tokio::test]
    async fn missing_secret_on_the_dialer_is_refused() {
        let server = side(SECRET);
        let (accepted, dialled) = connect(&server, &side("")).await;
        assert!(!accepted && dialled.is_ok());
        assert_eq!(server.metrics().auth_refused_accept.get(), 1);
    }

    #[tokio::test]
    async fn missing_secret_on_the_server_is_refused_on_both_sides() {
        // One-sided configuration must not silently pass: the server sees a handshake it cannot
        // answer, and the dialer never gets the proof it requires.
        let (server, client) = (side(""), side(SECRET));
        let (accepted, dialled) = connect(&server, &client).await;
        assert!(!accepted);
        assert!(dialled.is_err());
        assert_eq!(server.metrics().auth_refused_accept.get(), 1);
        assert_eq!(client.metrics().auth_refused_dial.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dropped_at_the_deadline() {
        let server = side(SECRET);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        // The clock only moves while nothing else can: the deadline fires because the peer says
        // nothing, not because real time passed.
        assert!(server.accept(stream, peer).await.is_none());
        assert_eq!(server.metrics().auth_refused_accept.get(), 1);
        drop(silent);
    }

    #[tokio::test]
    async fn frame_limit_errors_are_recognised_through_tarpcs_wrapping() {
        let codec = tokio_util::codec::LengthDelimitedCodec::builder()
            .max_frame_length(4)
            .new_codec();
        let header: &[u8] = &[0, 0, 0, 10];
        let mut frames = tokio_util::codec::FramedRead::new(header, codec);
        let Some(Err(e)) = frames.next().await else {
            panic!("the codec must refuse a 10-byte frame over a 4-byte limit");
        };
        assert!(is_frame_too_large(&io::Error::other(e)));
        assert!(!is_frame_too_large(&io::Error::other("reset")));
    }
}
