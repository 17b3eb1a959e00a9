//! Test certificates made with rcgen at test time (a CA and leaves for `localhost`), and one
//! HTTP/1.1 request over TLS trusting that CA: for the TLS tests and for proxies (nginx) put in
//! front of a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;

use rim_client::TlsOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and the leaf certificate files a tier is pointed at, in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// A new CA in a new temporary directory.
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("rim-pki-")
            .tempdir()
            .expect("tempdir");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "rim test CA");
        let key = rcgen::KeyPair::generate().expect("key pair");
        let cert = params.self_signed(&key).expect("self-signed CA");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca.pem");
        Pki {
            dir,
            ca: rcgen::Issuer::new(params, key),
        }
    }

    /// (Re)writes `<name>.crt` / `<name>.key`: a leaf for localhost and 127.0.0.1 with
    /// common name `cn`, signed by the CA. Returns the leaf's DER.
    pub fn leaf(&self, name: &str, cn: &str) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                .expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("key pair");
        let cert = params.signed_by(&key, &self.ca).expect("signed leaf");
        // Written whole then renamed, as an operator's tooling (or certbot) does.
        for (ext, text) in [("crt", cert.pem()), ("key", key.serialize_pem())] {
            let tmp = self.dir.path().join(format!("{name}.{ext}.tmp"));
            std::fs::write(&tmp, text).expect("write certificate");
            std::fs::rename(&tmp, self.path(&format!("{name}.{ext}"))).expect("rename certificate");
        }
        cert.der().to_vec()
    }

    /// A file in the PKI's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Path of the CA certificate (PEM).
    pub fn ca(&self) -> String {
        self.path("ca.pem").display().to_string()
    }

    /// Client TLS settings trusting this CA, checking the name `localhost`.
    pub fn client(&self) -> TlsOptions {
        TlsOptions {
            config: rim_runtime::tls::client_config(&self.ca()).expect("client TLS config"),
            server_name: "localhost".into(),
        }
    }
}

/// One HTTP/1.1 request over TLS to `addr` (trusting `pki`'s CA, as `localhost`); the whole
/// response, or why the connection failed.
pub async fn https(
    pki: &Pki,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<String, String> {
    request(pki, addr, method, path, &[], b"").await
}

/// [`https`] with extra `headers` and a `body`.
pub async fn request(
    pki: &Pki,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("a valid name");
    let connector = tokio_rustls::TlsConnector::from(pki.client().config);
    let mut s = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // Ends at the server's close (an error after the whole answer counts as the end too).
    let _ = s.read_to_end(&mut out).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
