//! TLS under internal RPC, set in `[cluster]`: a tier with `tls_cert_file` + `tls_key_file`
//! accepts RPC only over TLS presenting that certificate (reloaded on SIGHUP with the others); a
//! tier with `tls_ca_file` dials RPC over TLS and verifies the peer's certificate against that CA
//! and the host of the address it dials. The cluster secret handshake
//! ([`crate::handshake`]) still runs, inside TLS: TLS encrypts, the secret authenticates.
//!
//! [`RpcStream`] is what the RPC code holds either way: a plain or a TLS connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsStream;
use tokio_util::either::Either;

use crate::settings::SettingsError;
use crate::tls::{Acceptor, TlsError, TlsMetrics, TlsServer, check_pair, client_config};

/// One RPC connection, plain (`Left`) or TLS, either side (`Right`).
pub type RpcStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// The peer's address of an RPC connection.
pub fn peer_addr(s: &RpcStream) -> io::Result<SocketAddr> {
    match s {
        Either::Left(s) => s.peer_addr(),
        Either::Right(s) => s.get_ref().0.peer_addr(),
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
            None => Some(Either::Left(stream)),
            Some(a) => a
                .accept(stream, peer)
                .await
                .map(|s| Either::Right(Box::new(TlsStream::Server(s)))),
        }
    }

    /// The dialing side: TLS first when configured, verifying the certificate against the host
    /// of `addr` (`host:port`).
    pub(crate) async fn dial(&self, stream: TcpStream, addr: &str) -> io::Result<RpcStream> {
        let _ = stream.set_nodelay(true);
        let Some(connector) = &self.connector else {
            return Ok(Either::Left(stream));
        };
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let s = connector.connect(name, stream).await?;
        Ok(Either::Right(Box::new(TlsStream::Client(s))))
    }
}
