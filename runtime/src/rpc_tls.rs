//! TLS under internal RPC, set in `[cluster]`: a tier with `tls_cert_file` + `tls_key_file`
//! accepts RPC only over TLS presenting that certificate (reloaded on SIGHUP with the others); a
//! tier with `tls_ca_file` dials RPC over TLS and verifies the peer's certificate against that CA
//! and the host of the address it dials. The cluster secret handshake
//! ([`crate::handshake`]) still runs, inside TLS: TLS encrypts, the secret authenticates.
//!
//! [`RpcStream`] is what the RPC code holds either way: a plain or a TLS connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

use crate::settings::SettingsError;
use crate::tls::{Acceptor, TlsError, TlsMetrics, TlsServer, check_pair, client_config};

/// One RPC connection, plain or TLS.
pub enum RpcStream {
    /// No TLS.
    Plain(TcpStream),
    /// TLS, either side.
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for RpcStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            RpcStream::Plain(_) => "plain",
            RpcStream::Tls(_) => "tls",
        };
        f.debug_tuple("RpcStream").field(&kind).finish()
    }
}

impl RpcStream {
    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            RpcStream::Plain(s) => s.peer_addr(),
            RpcStream::Tls(s) => s.get_ref().0.peer_addr(),
        }
    }
}

impl AsyncRead for RpcStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RpcStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            RpcStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RpcStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RpcStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            RpcStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RpcStream::Plain(s) => Pin::new(s).poll_flush(cx),
            RpcStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RpcStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            RpcStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The `[cluster]` TLS files (`tls_cert_file`, `tls_key_file`, `tls_ca_file`); empty = unset.
#[derive(Debug, Clone, Copy)]
pub struct RpcTlsFiles<'a> {
    /// The RPC listener's certificate chain.
    pub cert: &'a str,
    /// Its private key.
    pub key: &'a str,
    /// The CA dialled peers are verified against.
    pub ca: &'a str,
}

impl RpcTlsFiles<'_> {
    /// Checks them: cert and key together and a matching pair, a readable CA (fields named
    /// `cluster.tls_*`).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !self.cert.is_empty() || !self.key.is_empty() {
            check_pair(
                ("cluster.tls_cert_file", self.cert),
                ("cluster.tls_key_file", self.key),
            )?;
        }
        if !self.ca.is_empty() {
            client_config(self.ca)
                .map_err(|e| SettingsError::invalid("cluster.tls_ca_file", e.to_string()))?;
        }
        Ok(())
    }
}

/// The TLS sides `[cluster]` turns on.
#[derive(Clone, Default)]
pub struct RpcTls {
    /// The RPC listener's certificate (reloadable), when set.
    pub server: Option<TlsServer>,
    acceptor: Option<Acceptor>,
    connector: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for RpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcTls")
            .field("accepts_tls", &self.acceptor.is_some())
            .field("dials_tls", &self.connector.is_some())
            .finish()
    }
}

impl RpcTls {
    /// Loads what `files` names; handshakes bounded by `deadline`, counted in `metrics`.
    pub fn load(
        files: RpcTlsFiles<'_>,
        deadline: Duration,
        metrics: Arc<TlsMetrics>,
    ) -> Result<RpcTls, TlsError> {
        let mut tls = RpcTls::default();
        if !files.cert.is_empty() {
            let server = TlsServer::load("cluster", files.cert, files.key, metrics)?;
            tls.acceptor = Some(server.acceptor(&[], deadline)?);
            tls.server = Some(server);
        }
        if !files.ca.is_empty() {
            tls.connector = Some(tokio_rustls::TlsConnector::from(client_config(files.ca)?));
        }
        Ok(tls)
    }

    /// Whether the RPC listener requires TLS.
    pub(crate) fn accepts_tls(&self) -> bool {
        self.acceptor.is_some()
    }

    /// The accepting side: TLS first when configured. `None` when the handshake failed
    /// (counted and logged by the acceptor).
    pub(crate) async fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Option<RpcStream> {
        let _ = stream.set_nodelay(true);
        match &self.acceptor {
            None => Some(RpcStream::Plain(stream)),
            Some(a) => a
                .accept(stream, peer)
                .await
                .map(|s| RpcStream::Tls(Box::new(TlsStream::Server(s)))),
        }
    }

    /// The dialing side: TLS first when configured, verifying the certificate against the host
    /// of `addr` (`host:port`).
    pub(crate) async fn dial(&self, stream: TcpStream, addr: &str) -> io::Result<RpcStream> {
        let _ = stream.set_nodelay(true);
        let Some(connector) = &self.connector else {
            return Ok(RpcStream::Plain(stream));
        };
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let s = connector.connect(name, stream).await?;
        Ok(RpcStream::Tls(Box::new(TlsStream::Client(s))))
    }
}
