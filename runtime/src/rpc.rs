//! Serving tarpc services on an already-bound listener, and reconnecting client links.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tarpc::client::RpcError;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts RPC connections until `shutdown`, running `handle(stream)` for each on `tracker`.
///
/// `handle` builds the tarpc channel for the tier's concrete service (tarpc's `Serve` futures are
/// not nameable as `Send` generically, so each tier writes that one expression itself). Each
/// connection's task ends when the peer closes or at `shutdown`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                tracing::debug!(%peer, name, "rpc connection");
                let conn = handle(stream);
                let stop = shutdown.clone();
                tracker.spawn(async move {
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, name, "rpc accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a link could not carry a call.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No address of the peer accepted a connection.
    #[error("cannot connect to {name} at {addrs:?}: {last}")]
    Connect {
        /// Link name.
        name: String,
        /// Addresses tried.
        addrs: Vec<String>,
        /// Last connection error.
        last: String,
    },
    /// The call failed (the link is reset when the failure was the connection's).
    #[error("{name} rpc failed: {source}")]
    Call {
        /// Link name.
        name: String,
        /// tarpc's error.
        #[source]
        source: RpcError,
    },
}

type Connector<C> = Arc<dyn Fn(TcpStream) -> C + Send + Sync>;

/// A tarpc client to one logical peer (one or several addresses), connected lazily and
/// re-connected after a transport failure. Cheap to share behind an `Arc`.
pub struct Link<C> {
    name: String,
    addrs: Vec<String>,
    connect_timeout: Duration,
    connector: Connector<C>,
    current: Mutex<Option<(C, usize)>>,
    /// Index of the address to try first on the next connect (after the one that failed).
    next_start: AtomicUsize,
}

impl<C: Clone + Send + 'static> Link<C> {
    /// A link that wraps each new connection with `connector` (e.g. `|s| FooClient::new(cfg, transport(s)).spawn()`).
    pub fn new(
        name: impl Into<String>,
        addrs: Vec<String>,
        connect_timeout: Duration,
        connector: impl Fn(TcpStream) -> C + Send + Sync + 'static,
    ) -> Self {
        Link {
            name: name.into(),
            addrs,
            connect_timeout,
            connector: Arc::new(connector),
            current: Mutex::new(None),
            next_start: AtomicUsize::new(0),
        }
    }

    /// The addresses this link tries, in order.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The connected client, connecting first if needed (trying each address, starting after the last one used).
    pub async fn client(&self) -> Result<C, LinkError> {
        let mut current = self.current.lock().await;
        if let Some((client, _)) = current.as_ref() {
            return Ok(client.clone());
        }
        let start = self.next_start.load(Ordering::Relaxed);
        let mut last = String::from("no address configured");
        for i in 0..self.addrs.len() {
            let idx = (start + i) % self.addrs.len();
            let addr = &self.addrs[idx];
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr.as_str()))
                .await
            {
                Ok(Ok(stream)) => {
                    let client = (self.connector)(stream);
                    *current = Some((client.clone(), idx));
                    tracing::info!(link = %self.name, %addr, "rpc link connected");
                    return Ok(client);
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => {
                    last = format!("{addr}: connect timed out after {:?}", self.connect_timeout)
                }
            }
        }
        Err(LinkError::Connect {
            name: self.name.clone(),
            addrs: self.addrs.clone(),
            last,
        })
    }

    /// Drops the current connection so the next call reconnects (rotating to the next address).
    pub async fn reset(&self) {
        let mut current = self.current.lock().await;
        if let Some((_, idx)) = current.take() {
            self.next_start.store(idx + 1, Ordering::Relaxed);
        }
    }

    /// Runs one call; a connection-level failure resets the link so the next call reconnects.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, LinkError>
    where
        F: FnOnce(C) -> Fut,
        Fut: Future<Output = Result<T, RpcError>>,
    {
        let client = self.client().await?;
        match f(client).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if matches!(
                    e,
                    RpcError::Shutdown | RpcError::Send(_) | RpcError::Channel(_)
                ) {
                    tracing::warn!(link = %self.name, error = %e, "rpc link broken, will reconnect");
                    self.reset().await;
                }
                Err(LinkError::Call {
                    name: self.name.clone(),
                    source: e,
                })
            }
        }
    }
}

/// A tarpc context whose deadline is `timeout` from now.
pub fn context(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + timeout;
    ctx
}
