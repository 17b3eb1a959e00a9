//! The PROXY protocol header (HAProxy's, v1 text and v2 binary) a TCP load balancer puts before
//! a client's bytes to say who the client is. Read only from peers the operator trusts: anyone
//! else could claim any address.
//!
//! [`read_header`] consumes exactly the header and nothing after it, so the connection's own
//! protocol starts at the next byte. A `LOCAL` (v2) or `UNKNOWN` (v1) header — a health check from
//! the balancer itself — yields `None`: the peer's own address stands.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature, the first 12 bytes of a binary header.
const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line, CRLF included (the spec's bound).
const V1_MAX: usize = 107;
/// Largest v2 address block read (TLVs included); longer headers are refused.
const V2_MAX_LEN: usize = 512;

/// Why a PROXY header was refused. The connection must be closed: its bytes cannot be trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// Neither a v1 nor a v2 header.
    #[error("no PROXY protocol header")]
    Missing,
    /// A header that does not parse.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// The connection ended or failed inside the header.
    #[error("connection ended in the PROXY protocol header")]
    Io,
}

/// Reads one PROXY header from `r`: `Some(client address)`, or `None` for a `LOCAL`/`UNKNOWN`
/// header. Reads byte-exact (never past the header). Bound it with a deadline: a peer that stops
/// sending would otherwise hold the caller.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut first = [0u8; 12];
    read_exact(r, &mut first[..5]).await?;
    if &first[..5] == b"PROXY" {
        return read_v1(r).await;
    }
    read_exact(r, &mut first[5..]).await?;
    if first != V2_SIG {
        return Err(ProxyHeaderError::Missing);
    }
    read_v2(r).await
}

async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), ProxyHeaderError> {
    r.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|_| ProxyHeaderError::Io)
}

/// The rest of `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` after `PROXY`, read a byte at a time
/// (the line has no length prefix, and nothing past its CRLF may be consumed).
async fn read_v1<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut line = Vec::with_capacity(V1_MAX);
    line.extend_from_slice(b"PROXY");
    loop {
        let mut b = [0u8; 1];
        read_exact(r, &mut b).await?;
        line.push(b[0]);
        if line.ends_with(b"\r\n") {
            break;
        }
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"));
        }
    }
    parse_v1(&line[..line.len() - 2])
}

/// Parses a v1 line without its CRLF.
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let text =
        std::str::from_utf8(line).map_err(|_| ProxyHeaderError::Malformed("v1 not ASCII"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyHeaderError::Malformed("v1 must start with PROXY"));
    }
    let family = parts.next();
    if family == Some("UNKNOWN") {
        return Ok(None);
    }
    let (Some(src), Some(_dst), Some(sport), Some(_dport), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(ProxyHeaderError::Malformed("v1 needs 6 fields"));
    };
    let ip: IpAddr = src
        .parse()
        .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
    match (family, ip) {
        (Some("TCP4"), IpAddr::V4(_)) | (Some("TCP6"), IpAddr::V6(_)) => {}
        _ => return Err(ProxyHeaderError::Malformed("v1 family")),
    }
    let port: u16 = sport
        .parse()
        .map_err(|_| ProxyHeaderError::Malformed("v1 source port"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// The rest of a v2 header after its signature: version/command, family, length, addresses.
async fn read_v2<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; 4];
    read_exact(r, &mut head).await?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    if len > V2_MAX_LEN {
        return Err(ProxyHeaderError::Malformed(
            "v2 header longer than 512 bytes",
        ));
    }
    let mut block = vec![0u8; len];
    read_exact(r, &mut block).await?;
    parse_v2(head[0], head[1], &block)
}

/// Parses a v2 header from its version/command byte, family byte and address block.
pub fn parse_v2(
    ver_cmd: u8,
    family: u8,
    block: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version"));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(None), // LOCAL: the balancer's own connection
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed("v2 command")),
    }
    match family {
        // TCP over IPv4: src(4) dst(4) sport(2) dport(2).
        0x11 if block.len() >= 12 => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            let port = u16::from_be_bytes([block[8], block[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        // TCP over IPv6: src(16) dst(16) sport(2) dport(2).
        0x21 if block.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&block[..16]);
            let port = u16::from_be_bytes([block[32], block[33]]);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port)))
        }
        // UNSPEC: no address to take.
        0x00 => Ok(None),
        0x11 | 0x21 => Err(ProxyHeaderError::Malformed("v2 address block too short")),
        _ => Err(ProxyHeaderError::Malformed(
            "v2 family (TCP over IPv4 or IPv6 only)",
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut r = bytes;
        let got = read_header(&mut r).await;
        (got, r.to_vec())
    }

    #[tokio::test]
    async fn v1_gives_the_client_and_consumes_only_the_header() {
        let (got, rest) =
            read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 3101\r\n\x00\x00\x00\x1fframe").await;
        assert_eq!(got, Ok(Some("203.0.113.7:51234".parse().unwrap())));
        assert_eq!(rest, b"\x00\x00\x00\x1fframe");
        let (got, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 443 3101\r\n").await;
        assert_eq!(got, Ok(Some("[2001:db8::1]:443".parse().unwrap())));
        let (got, rest) = read(b"PROXY UNKNOWN\r\nx").await;
        assert_eq!((got, rest), (Ok(None), b"x".to_vec()));
    }

    #[tokio::test]
    async fn v2_gives_the_client_and_local_gives_none() {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0xc3, 0x50, 0x0c, 0x1d,
        ]);
        h.extend_from_slice(b"after");
        let (got, rest) = read(&h).await;
        assert_eq!(got, Ok(Some("198.51.100.9:50000".parse().unwrap())));
        assert_eq!(rest, b"after");
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read(&local).await.0, Ok(None));
    }

    #[tokio::test]
    async fn anything_else_is_refused_without_panicking() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x00\x00\x00\x10\x00\x10\x00\x01",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 x 1\r\n",
            b"PROXY TCP4 ::1 ::1 1 1\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY",
            &[b'P'; 200][..],
        ] {
            assert!(
                read(bad).await.0.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long_v1 = b"PROXY TCP4 ".to_vec();
        long_v1.extend(std::iter::repeat_n(b'1', 200));
        assert_eq!(
            read(&long_v1).await.0,
            Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"))
        );
        let mut huge = V2_SIG.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(read(&huge).await.0.is_err());
        let mut short = V2_SIG.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(read(&short).await.0.is_err());
    }
}
