//! The byte stream under a [`crate::Conn`]: a plain TCP socket, or TLS over it (a comet's
//! `listen.tls` / `listen.wss`) when [`crate::ConnectOptions::tls`] is set. The frames on it are
//! the same either way.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_util::either::Either;

/// TLS settings of a connection: whom to trust and the name the certificate must carry.
#[derive(Clone)]
pub struct TlsOptions {
    /// rustls client settings (root certificates, protocol versions).
    pub config: Arc<rustls::ClientConfig>,
    /// Name checked against the server's certificate (`localhost`, `push.example.com`).
    pub server_name: String,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsOptions {
    /// Wraps `tcp` in TLS.
    pub(crate) async fn connect(&self, tcp: TcpStream) -> Result<Io, String> {
        let name = rustls::pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|e| format!("server name {:?}: {e}", self.server_name))?;
        let s = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls handshake: {e}"))?;
        Ok(Either::Right(Box::new(s)))
    }
}

/// A plain (`Left`) or TLS (`Right`) stream.
pub(crate) type Io = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// The certificates the server presented (leaf first), on TLS.
pub(crate) fn peer_certificates(io: &Io) -> Option<Vec<Vec<u8>>> {
    match io {
        Either::Left(_) => None,
        Either::Right(s) => s
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.to_vec()).collect()),
    }
}
