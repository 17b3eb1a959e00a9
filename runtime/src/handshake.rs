//! The cluster handshake: before any tarpc frame, both ends of an RPC connection prove they hold
//! `[cluster] secret`, without sending it.
//!
//! ```text
//! dialer  → server   "RIMC" v1 dial_nonce(32)
//! server  → dialer   "RIMS" v1 serve_nonce(32) HMAC(secret, dial_nonce ‖ serve_nonce ‖ SERVER_LABEL)
//! dialer  → server   HMAC(secret, dial_nonce ‖ serve_nonce ‖ DIAL_LABEL)
//! ```
//!
//! Each side checks the other's proof in constant time (`Mac::verify_slice`), so a comet or job
//! is not fooled by a fake logic or comet either. The labels differ, so a server's proof cannot
//! be replayed as a dialer's. Fresh random nonces on both sides make every proof single-use.
//! The caller bounds the whole exchange with a deadline. A peer that sends tarpc frames instead
//! (no secret) fails at the magic: a frame's 4-byte length prefix never reads "RIMC" under any
//! permitted frame limit (see [`MAGIC_DIAL`]).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes a dialer sends. Read as a big-endian frame length this is 1 380 535 619, above
/// the largest `cluster.max_frame_bytes` allowed, so it is never the start of a valid frame.
pub const MAGIC_DIAL: [u8; 4] = *b"RIMC";
/// First bytes of the server's answer.
const MAGIC_SERVE: [u8; 4] = *b"RIMS";
const VERSION: u8 = 1;
const NONCE: usize = 32;
const PROOF: usize = crate::hmac::TAG_LEN;
const SERVER_LABEL: &[u8] = b"rim cluster handshake v1: server";
const DIAL_LABEL: &[u8] = b"rim cluster handshake v1: dialer";

/// Why a handshake failed. Never carries the secret or a proof.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer did not start with the handshake (it has no `cluster.secret`, or is not rim).
    #[error("peer did not start the cluster handshake (no cluster.secret on its side?)")]
    NotAPeer,
    /// The peer started a handshake, but this side has no secret.
    #[error("peer sent a cluster handshake but cluster.secret is empty here")]
    Unexpected,
    /// The peer speaks another handshake version.
    #[error("cluster handshake version {0} is not supported (this side speaks {VERSION})")]
    Version(u8),
    /// The peer's proof does not match: it holds another secret.
    #[error("cluster secret mismatch")]
    WrongSecret,
    /// The peer closed the connection during the handshake (it refused ours).
    #[error("peer closed the connection during the cluster handshake")]
    Closed,
    /// The handshake did not finish within its deadline.
    #[error("cluster handshake not finished within {0:?}")]
    Timeout(std::time::Duration),
    /// The socket failed.
    #[error("cluster handshake: {0}")]
    Io(std::io::Error),
    /// The TLS handshake under the cluster handshake failed (untrusted or misnamed
    /// certificate, or the peer does not speak TLS).
    #[error("rpc tls: {0}")]
    Tls(String),
}

impl HandshakeError {
    /// Whether the peer is up and answered, but the two sides do not share a cluster secret (a
    /// configuration to fix, not a fault that passes).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            HandshakeError::NotAPeer
                | HandshakeError::Unexpected
                | HandshakeError::Version(_)
                | HandshakeError::WrongSecret
                | HandshakeError::Closed
                | HandshakeError::Tls(_)
        )
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HandshakeError::Closed
        } else {
            HandshakeError::Io(e)
        }
    }
}

fn proof(secret: &[u8], dial: &[u8; NONCE], serve: &[u8; NONCE], label: &[u8]) -> [u8; PROOF] {
    crate::hmac::sign(secret, &[dial, serve, label])
}

/// Constant-time check of a peer's proof.
fn verify(
    secret: &[u8],
    dial: &[u8; NONCE],
    serve: &[u8; NONCE],
    label: &[u8],
    claimed: &[u8],
) -> bool {
    crate::hmac::verify(secret, &[dial, serve, label], claimed)
}

/// The dialing side: proves `secret` to the server and checks the server's proof.
pub async fn dial<S>(io: &mut S, secret: &[u8]) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let dial_nonce: [u8; NONCE] = rand::random();
    let mut hello = [0u8; 4 + 1 + NONCE];
    hello[..4].copy_from_slice(&MAGIC_DIAL);
    hello[4] = VERSION;
    hello[5..].copy_from_slice(&dial_nonce);
    io.write_all(&hello).await?;
    io.flush().await?;

    let mut magic = [0u8; 4];
    io.read_exact(&mut magic).await?;
    if magic != MAGIC_SERVE {
        return Err(HandshakeError::NotAPeer);
    }
    let mut rest = [0u8; 1 + NONCE + PROOF];
    io.read_exact(&mut rest).await?;
    if rest[0] != VERSION {
        return Err(HandshakeError::Version(rest[0]));
    }
    let mut serve_nonce = [0u8; NONCE];
    serve_nonce.copy_from_slice(&rest[1..1 + NONCE]);
    let server_proof = &rest[1 + NONCE..];
    if !verify(
        secret,
        &dial_nonce,
        &serve_nonce,
        SERVER_LABEL,
        server_proof,
    ) {
        return Err(HandshakeError::WrongSecret);
    }
    io.write_all(&proof(secret, &dial_nonce, &serve_nonce, DIAL_LABEL))
        .await?;
    io.flush().await?;
    Ok(())
}

/// The accepting side: checks the dialer's proof of `secret` and proves it back.
pub async fn serve<S>(io: &mut S, secret: &[u8]) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut magic = [0u8; 4];
    io.read_exact(&mut magic).await?;
    if magic != MAGIC_DIAL {
        return Err(HandshakeError::NotAPeer);
    }
    let mut rest = [0u8; 1 + NONCE];
    io.read_exact(&mut rest).await?;
    if rest[0] != VERSION {
        return Err(HandshakeError::Version(rest[0]));
    }
    let mut dial_nonce = [0u8; NONCE];
    dial_nonce.copy_from_slice(&rest[1..]);
    let serve_nonce: [u8; NONCE] = rand::random();
    let mut answer = [0u8; 4 + 1 + NONCE + PROOF];
    answer[..4].copy_from_slice(&MAGIC_SERVE);
    answer[4] = VERSION;
    answer[5..5 + NONCE].copy_from_slice(&serve_nonce);
    answer[5 + NONCE..].copy_from_slice(&proof(secret, &dial_nonce, &serve_nonce, SERVER_LABEL));
    io.write_all(&answer).await?;
    io.flush().await?;

    let mut claimed = [0u8; PROOF];
    io.read_exact(&mut claimed).await?;
    if !verify(secret, &dial_nonce, &serve_nonce, DIAL_LABEL, &claimed) {
        return Err(HandshakeError::WrongSecret);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    async fn pair(
        dial_secret: &'static [u8],
        serve_secret: &'static [u8],
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (mut a, mut b) = duplex(1024);
        let d = tokio::spawn(async move {
            let r = dial(&mut a, dial_secret).await;
            drop(a);
            r
        });
        let s = serve(&mut b, serve_secret).await;
        drop(b);
        (d.await.unwrap(), s)
    }

    #[tokio::test]
    async fn same_secret_passes_both_ways() {
        let (d, s) = pair(b"correct horse battery", b"correct horse battery").await;
        assert!(d.is_ok() && s.is_ok(), "{d:?} {s:?}");
    }

    #[tokio::test]
    async fn wrong_secret_fails_on_both_sides() {
        let (d, s) = pair(b"correct horse battery", b"another secret here!").await;
        // The dialer catches the server's bad proof first and closes; the server sees it go.
        assert!(matches!(d, Err(HandshakeError::WrongSecret)), "{d:?}");
        assert!(matches!(s, Err(HandshakeError::Closed)), "{s:?}");
    }

    #[tokio::test]
    async fn a_fake_server_cannot_pass_a_dialers_check() {
        // The server answers with a well-formed hello but a proof made without the secret.
        let (mut a, mut b) = duplex(1024);
        let fake = tokio::spawn(async move {
            let mut hello = [0u8; 37];
            b.read_exact(&mut hello).await.unwrap();
            let mut answer = vec![];
            answer.extend_from_slice(&MAGIC_SERVE);
            answer.push(VERSION);
            answer.extend_from_slice(&[7u8; NONCE + PROOF]);
            b.write_all(&answer).await.unwrap();
            b
        });
        let d = dial(&mut a, b"correct horse battery").await;
        assert!(matches!(d, Err(HandshakeError::WrongSecret)), "{d:?}");
        drop(fake.await.unwrap());
    }

    #[tokio::test]
    async fn a_dialer_without_the_handshake_is_not_a_peer() {
        // What a secret-less tarpc client sends first: a frame length prefix.
        let (mut a, mut b) = duplex(1024);
        a.write_all(&[0, 0, 0, 42, 1, 2, 3]).await.unwrap();
        let s = serve(&mut b, b"correct horse battery").await;
        assert!(matches!(s, Err(HandshakeError::NotAPeer)), "{s:?}");
    }

    #[tokio::test]
    async fn replayed_server_proof_is_not_a_dialer_proof() {
        // Labels differ: the server's own proof sent back as the dialer's is refused.
        let secret: &[u8] = b"correct horse battery";
        let dn = [1u8; NONCE];
        let sn = [2u8; NONCE];
        let server_proof = proof(secret, &dn, &sn, SERVER_LABEL);
        assert!(!verify(secret, &dn, &sn, DIAL_LABEL, &server_proof));
        assert!(verify(secret, &dn, &sn, SERVER_LABEL, &server_proof));
        assert!(!verify(secret, &dn, &sn, SERVER_LABEL, &server_proof[..31]));
    }

    #[tokio::test]
    async fn other_versions_are_refused() {
        let (mut a, mut b) = duplex(1024);
        let mut hello = MAGIC_DIAL.to_vec();
        hello.push(9);
        hello.extend_from_slice(&[0u8; NONCE]);
        a.write_all(&hello).await.unwrap();
        let s = serve(&mut b, b"correct horse battery").await;
        assert!(matches!(s, Err(HandshakeError::Version(9))), "{s:?}");
    }

    #[test]
    fn the_magic_is_never_a_permitted_frame_length() {
        assert!(u32::from_be_bytes(MAGIC_DIAL) as usize > crate::cluster::MAX_FRAME_LIMIT);
    }
}
