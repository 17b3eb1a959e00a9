//! TLS for rim's own listeners and RPC links, with rustls (ring provider): loads a PEM
//! certificate chain and private key, serves them through a reloadable [`TlsServer`] (a
//! `ResolvesServerCert` over an atomically swapped key, so a reload never touches a live
//! connection: each handshake picks up whatever key is current), reloads every [`TlsServer`]
//! of the process on SIGHUP ([`reload_on_sighup`], one task per process; a failed reload keeps
//! the old certificate, is logged and counted), and hands out [`Acceptor`]s that run the
//! handshake under a deadline (a client that stalls it is closed and counted).
//!
//! Each tier appends [`TlsMetrics::render`] to its `/metrics`. The client side of internal RPC
//! (verify the peer against a CA file) is [`client_config`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Counter, Exposition};
use crate::settings::SettingsError;

/// `[tls]` of a tier: the certificate its client-facing TLS listeners present. Both empty = off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_file: String,
}

impl TlsConfig {
    /// Whether a certificate is configured.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty() || !self.key_file.is_empty()
    }

    /// When enabled, checks both files are set, readable and a matching pair (fields named
    /// `tls.cert_file` / `tls.key_file`).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !self.enabled() {
            return Ok(());
        }
        check_pair(
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
        )
    }
}

/// Why a certificate, key or CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate chain file.
    #[error("certificate {path}: {reason}")]
    Cert {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The private key file (or the key does not match the certificate).
    #[error("private key {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The CA file peers are verified against.
    #[error("CA file {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the settings.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider rim uses (ring: no C toolchain beyond `cc`, no cmake).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// Loads a PEM chain and key as a matching pair.
pub fn load_key(cert_file: &str, key_file: &str) -> Result<CertifiedKey, TlsError> {
    let certs = read_certs(cert_file).map_err(|reason| TlsError::Cert {
        path: cert_file.into(),
        reason,
    })?;
    let key_err = |reason: String| TlsError::Key {
        path: key_file.into(),
        reason,
    };
    let pem = std::fs::read(key_file).map_err(|e| key_err(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| key_err(format!("no PEM private key ({e})")))?;
    CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| key_err(format!("unusable or not the certificate's key ({e})")))
}

/// Checks a certificate/key pair given as `(field, path)`, naming the field at fault.
pub fn check_pair(cert: (&str, &str), key: (&str, &str)) -> Result<(), SettingsError> {
    for (field, path) in [cert, key] {
        if path.is_empty() {
            return Err(SettingsError::invalid(
                field,
                "must be set (TLS needs both the certificate and its key)",
            ));
        }
    }
    match load_key(cert.1, key.1) {
        Ok(_) => Ok(()),
        Err(TlsError::Cert { reason, .. }) => Err(SettingsError::invalid(
            cert.0,
            format!("{:?}: {reason}", cert.1),
        )),
        Err(e) => Err(SettingsError::invalid(key.0, e.to_string())),
    }
}

/// TLS counters of one tier instance.
#[derive(Debug, Default)]
pub struct TlsMetrics {
    /// Handshakes that failed (bad client, wrong protocol, closed).
    pub handshake_errors: Counter,
    /// Handshakes not finished within the deadline.
    pub handshake_timeouts: Counter,
    /// Certificate reloads that took effect.
    pub reloads_ok: Counter,
    /// Certificate reloads that failed (the old certificate stays).
    pub reloads_failed: Counter,
}

impl TlsMetrics {
    /// Prometheus text, appended to the tier's own.
    pub fn render(&self) -> String {
        Exposition::new()
            .labeled_counter(
                "rim_tls_handshake_failures_total",
                "TLS handshakes on rim's listeners that failed, by reason.",
                "reason",
                &[
                    ("error", self.handshake_errors.get()),
                    ("timeout", self.handshake_timeouts.get()),
                ],
            )
            .labeled_counter(
                "rim_tls_reloads_total",
                "Certificate reloads (SIGHUP), by result; a failed one keeps the old certificate.",
                "result",
                &[
                    ("ok", self.reloads_ok.get()),
                    ("failed", self.reloads_failed.get()),
                ],
            )
            .finish()
    }
}

/// Serves whatever key is current; swapped by [`TlsServer::reload`].
struct Resolver(ArcSwap<CertifiedKey>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

struct ServerInner {
    /// Config section, for logs (`tls`, `cluster`).
    name: &'static str,
    cert_file: PathBuf,
    key_file: PathBuf,
    resolver: Arc<Resolver>,
    metrics: Arc<TlsMetrics>,
}

/// A reloadable certificate and key, shared by every acceptor built from it. Cheap to clone.
#[derive(Clone)]
pub struct TlsServer(Arc<ServerInner>);

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("name", &self.0.name)
            .field("cert_file", &self.0.cert_file)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Loads the pair (config section `name`, for logs), counting into `metrics`.
    pub fn load(
        name: &'static str,
        cert_file: &str,
        key_file: &str,
        metrics: Arc<TlsMetrics>,
    ) -> Result<Self, TlsError> {
        let key = load_key(cert_file, key_file)?;
        Ok(TlsServer(Arc::new(ServerInner {
            name,
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            resolver: Arc::new(Resolver(ArcSwap::from_pointee(key))),
            metrics,
        })))
    }

    /// Reads the files again and, when they hold a valid pair, serves it to new handshakes
    /// (open connections keep theirs). A failure keeps the current pair; both are logged and
    /// counted.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (cert, key) = (path_str(&self.0.cert_file), path_str(&self.0.key_file));
        match load_key(&cert, &key) {
            Ok(k) => {
                self.0.resolver.0.store(Arc::new(k));
                self.0.metrics.reloads_ok.inc();
                tracing::info!(section = self.0.name, cert = %cert, "tls certificate reloaded");
                Ok(())
            }
            Err(e) => {
                self.0.metrics.reloads_failed.inc();
                tracing::error!(section = self.0.name, error = %e,
                    "tls certificate reload failed; still serving the previous one");
                Err(e)
            }
        }
    }

    /// The certificate chain served now (leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.0.resolver.0.load().cert.clone()
    }

    /// An acceptor presenting this certificate, offering `alpn` (e.g. `http/1.1`; empty for
    /// raw protocols), finishing handshakes within `deadline`.
    pub fn acceptor(&self, alpn: &[&[u8]], deadline: Duration) -> Result<Acceptor, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.0.resolver.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Acceptor {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            deadline,
            metrics: self.0.metrics.clone(),
        })
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs server handshakes under a deadline, counting failures. Cheap to clone.
#[derive(Clone)]
pub struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
    deadline: Duration,
    metrics: Arc<TlsMetrics>,
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Acceptor {
    /// The TLS stream once the handshake finished in time; `None` (counted, logged at debug:
    /// scanners and bad clients are routine) otherwise.
    pub async fn accept<S>(
        &self,
        stream: S,
        peer: SocketAddr,
    ) -> Option<tokio_rustls::server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.deadline, self.inner.accept(stream)).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                self.metrics.handshake_errors.inc();
                tracing::debug!(%peer, error = %e, "tls handshake failed");
                None
            }
            Err(_) => {
                self.metrics.handshake_timeouts.inc();
                tracing::debug!(%peer, deadline = ?self.deadline, "tls handshake timed out");
                None
            }
        }
    }
}

/// Starts listening for SIGHUP now (so a signal sent once this returned is not lost) and
/// returns the task that reloads every one of `servers` on each SIGHUP until `shutdown`. With
/// no servers a SIGHUP is only logged (it no longer ends the process, so `systemctl reload` is
/// harmless). `None` when the handler could not be installed (logged).
pub fn reload_on_sighup(
    servers: Vec<TlsServer>,
    shutdown: CancellationToken,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: certificates will not reload");
                return None;
            }
        };
        Some(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    got = hup.recv() => if got.is_none() { return },
                }
                if servers.is_empty() {
                    tracing::info!("SIGHUP: no tls certificate configured, nothing to reload");
                }
                for s in &servers {
                    // Logged and counted inside; the old pair stays on failure.
                    let _ = s.reload();
                }
            }
        })
    }
    #[cfg(not(unix))]
    {
        let _ = shutdown;
        None::<std::future::Ready<()>>
    }
}

/// A client config trusting only the CA certificates in `ca_file` (PEM), for RPC dialers.
pub fn client_config(ca_file: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let ca_err = |reason: String| TlsError::Ca {
        path: ca_file.into(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_file).map_err(ca_err)? {
        roots
            .add(cert)
            .map_err(|e| ca_err(format!("not a CA certificate ({e})")))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        dir: std::path::PathBuf,
        ca: rcgen::Issuer<'static, rcgen::KeyPair>,
        ca_pem: String,
    }

    impl Pki {
        fn new(tag: &str) -> Pki {
            let dir = std::env::temp_dir().join(format!("rim-tls-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Pki {
                dir,
                ca_pem: cert.pem(),
                ca: rcgen::Issuer::new(params, key),
            }
        }

        /// Writes a leaf for `localhost` as `cert.pem` / `key.pem`; returns its DER.
        fn leaf(&self, cn: &str) -> Vec<u8> {
            let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            std::fs::write(self.dir.join("cert.pem"), cert.pem()).unwrap();
            std::fs::write(self.dir.join("key.pem"), key.serialize_pem()).unwrap();
            cert.der().to_vec()
        }

        fn path(&self, f: &str) -> String {
            self.dir.join(f).to_string_lossy().into_owned()
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let pki = Pki::new("cfg");
        pki.leaf("a");
        let field = |c: TlsConfig| match c.validate() {
            Err(SettingsError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let ok = TlsConfig {
            cert_file: pki.path("cert.pem"),
            key_file: pki.path("key.pem"),
        };
        ok.validate().unwrap();
        assert!(TlsConfig::default().validate().is_ok(), "off");
        let missing = TlsConfig {
            cert_file: pki.path("nope.pem"),
            ..ok.clone()
        };
        assert_eq!(field(missing), "tls.cert_file");
        let no_key = TlsConfig {
            key_file: String::new(),
            ..ok.clone()
        };
        assert_eq!(field(no_key), "tls.key_file");
        let swapped = TlsConfig {
            key_file: pki.path("cert.pem"),
            ..ok.clone()
        };
        assert_eq!(field(swapped), "tls.key_file");
        // A key that is not the certificate's.
        std::fs::write(
            pki.dir.join("other.pem"),
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let other = TlsConfig {
            key_file: pki.path("other.pem"),
            ..ok
        };
        assert_eq!(field(other), "tls.key_file");
        std::fs::remove_dir_all(&pki.dir).unwrap();
    }

    /// Handshakes with `acceptor` and returns the leaf the client saw.
    async fn leaf_seen(acceptor: &Acceptor, ca: &str) -> Vec<u8> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_config(ca).unwrap());
        let client = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut s = connector.connect(name, tcp).await.unwrap();
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        });
        let (tcp, peer) = listener.accept().await.unwrap();
        let mut s = acceptor.accept(tcp, peer).await.unwrap();
        s.write_all(b"ok").await.unwrap();
        client.await.unwrap()
    }

    #[tokio::test]
    async fn reload_swaps_the_certificate_for_new_handshakes_and_a_bad_one_is_kept_out() {
        let pki = Pki::new("reload");
        let first = pki.leaf("first");
        let ca = pki.path("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let metrics = Arc::new(TlsMetrics::default());
        let server = TlsServer::load(
            "tls",
            &pki.path("cert.pem"),
            &pki.path("key.pem"),
            metrics.clone(),
        )
        .unwrap();
        let acceptor = server.acceptor(&[], Duration::from_secs(5)).unwrap();
        assert_eq!(leaf_seen(&acceptor, &ca).await, first);

        let second = pki.leaf("second");
        server.reload().unwrap();
        assert_eq!(leaf_seen(&acceptor, &ca).await, second);

        std::fs::write(pki.dir.join("key.pem"), "garbage").unwrap();
        assert!(server.reload().is_err());
        assert_eq!(leaf_seen(&acceptor, &ca).await, second, "old pair kept");
        assert_eq!(
            (metrics.reloads_ok.get(), metrics.reloads_failed.get()),
            (1, 1)
        );
        std::fs::remove_dir_all(&pki.dir).unwrap();
    }

    #[tokio::test]
    async fn a_stalled_handshake_is_closed_at_the_deadline_and_counted() {
        let pki = Pki::new("stall");
        pki.leaf("x");
        let metrics = Arc::new(TlsMetrics::default());
        let server = TlsServer::load(
            "tls",
            &pki.path("cert.pem"),
            &pki.path("key.pem"),
            metrics.clone(),
        )
        .unwrap();
        let acceptor = server.acceptor(&[], Duration::from_millis(100)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (tcp, peer) = listener.accept().await.unwrap();
        assert!(acceptor.accept(tcp, peer).await.is_none());
        assert_eq!(metrics.handshake_timeouts.get(), 1);
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (tcp, peer) = listener.accept().await.unwrap();
        assert!(acceptor.accept(tcp, peer).await.is_none());
        assert_eq!(metrics.handshake_errors.get(), 1);
        assert!(
            metrics
                .render()
                .contains("rim_tls_handshake_failures_total{reason=\"timeout\"} 1")
        );
        std::fs::remove_dir_all(&pki.dir).unwrap();
    }
}
