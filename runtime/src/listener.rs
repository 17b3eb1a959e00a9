//! A TCP listener for axum with the bounds hyper does not apply by itself: a cap on open
//! connections, a deadline for a new connection's first bytes (a socket that never sends a
//! request is closed), and an optional read-idle timeout (idle keep-alive connections).
//!
//! At the cap, `accept` waits for a connection to close, leaving newcomers in the kernel's
//! backlog: backpressure rather than a crash on file descriptors. Each wait is counted.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics::Counter;

/// Limits applied to every connection of a [`GuardedListener`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time a new connection has to send its first bytes.
    pub first_bytes: Duration,
    /// After the first bytes: close when nothing is read for this long (`None` = no limit, for
    /// long-lived connections that have their own liveness rules, such as WebSocket sessions).
    pub read_idle: Option<Duration>,
}

/// An axum [`axum::serve::Listener`] enforcing [`Limits`].
pub struct GuardedListener {
    inner: TcpListener,
    limits: Limits,
    permits: Arc<Semaphore>,
    /// Times `accept` had to wait because the cap was reached.
    pub saturated: Arc<Counter>,
}

impl GuardedListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener, limits: Limits) -> Self {
        let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        GuardedListener {
            inner,
            limits,
            permits,
            saturated: Arc::new(Counter::default()),
        }
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.limits.max_connections.max(1) - self.permits.available_permits()
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedStream, SocketAddr) {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.saturated.inc();
                tracing::warn!(
                    max = self.limits.max_connections,
                    "connection cap reached; new connections wait"
                );
                // The semaphore is never closed, so this only waits.
                loop {
                    if let Ok(p) = self.permits.clone().acquire_owned().await {
                        break p;
                    }
                }
            }
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (GuardedStream::new(stream, permit, self.limits), addr);
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The peer address of a connection accepted by a [`GuardedListener`], for axum's
/// `ConnectInfo` (axum implements it for `SocketAddr` only with its own listeners).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GuardedListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, GuardedListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// A connection holding its slot under the cap until dropped, with read deadlines.
pub struct GuardedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    read_idle: Option<Duration>,
    got_bytes: bool,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl GuardedStream {
    fn new(inner: TcpStream, permit: OwnedSemaphorePermit, limits: Limits) -> Self {
        GuardedStream {
            inner,
            _permit: permit,
            read_idle: limits.read_idle,
            got_bytes: false,
            deadline: Some(Box::pin(tokio::time::sleep(limits.first_bytes))),
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.got_bytes = true;
                    match (this.read_idle, this.deadline.as_mut()) {
                        (Some(idle), Some(d)) => d.as_mut().reset(Instant::now() + idle),
                        (Some(idle), None) => {
                            this.deadline = Some(Box::pin(tokio::time::sleep(idle)))
                        }
                        (None, _) => this.deadline = None,
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    let why = if this.got_bytes {
                        "connection idle too long"
                    } else {
                        "no request in time"
                    };
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn guarded(limits: Limits) -> (GuardedListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (GuardedListener::new(l, limits), addr)
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_at_the_first_bytes_deadline() {
        let limits = Limits {
            max_connections: 4,
            first_bytes: Duration::from_millis(50),
            read_idle: None,
        };
        let (mut l, addr) = guarded(limits).await;
        let _client = TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = l.accept().await;
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn after_the_first_bytes_only_the_idle_rule_applies() {
        let limits = Limits {
            max_connections: 4,
            first_bytes: Duration::from_millis(50),
            read_idle: None,
        };
        let (mut l, addr) = guarded(limits).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = l.accept().await;
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 3];
        io.read_exact(&mut buf).await.unwrap();
        // Virtual time from here: a still-armed 50 ms deadline would fire during the second.
        tokio::time::pause();
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 1];
            io.read_exact(&mut b).await.map(|_| b[0])
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), b'x');
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_read_idle() {
        let limits = Limits {
            max_connections: 4,
            first_bytes: Duration::from_secs(10),
            read_idle: Some(Duration::from_secs(30)),
        };
        let (mut l, addr) = guarded(limits).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = l.accept().await;
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 3];
        io.read_exact(&mut buf).await.unwrap();
        tokio::time::pause();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(
            (err.kind(), err.to_string()),
            (io::ErrorKind::TimedOut, "connection idle too long".into())
        );
    }

    #[tokio::test]
    async fn at_the_cap_accept_waits_for_a_connection_to_close() {
        let limits = Limits {
            max_connections: 1,
            first_bytes: Duration::from_secs(10),
            read_idle: None,
        };
        let (mut l, addr) = guarded(limits).await;
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (first, _) = l.accept().await;
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let saturated = l.saturated.clone();
        let second = tokio::spawn(async move { l.accept().await });
        // The second accept is parked on the cap until the first connection goes away.
        while saturated.get() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished());
        drop(first);
        let accepted = tokio::time::timeout(Duration::from_secs(5), second).await;
        assert!(accepted.is_ok(), "accepted once a slot freed");
    }
}
