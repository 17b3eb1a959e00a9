//! Serving tarpc services on an already-bound listener, and reconnecting client links; both
//! run the cluster handshake ([`Cluster`]) before tarpc sees the stream.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tarpc::client::RpcError;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::rpc_tls::RpcStream;

/// Accepts RPC connections until `shutdown`, running `handle(stream)` for each on `tracker`
/// once the stream passed `cluster`'s handshake.
///
/// At most `cluster.max_connections` connections are held (handshaking or serving); past it a
/// new connection is closed at once and counted, so a flood cannot hold every file descriptor.
/// `handle` builds the tarpc channel for the tier's concrete service, on
/// [`Cluster::transport`] (tarpc's `Serve` futures are not nameable as `Send` generically, so
/// each tier writes that one expression itself). Each connection's task ends when the peer
/// closes or at `shutdown`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    cluster: Cluster,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(RpcStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    let permits = Arc::new(Semaphore::new(cluster.max_connections()));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    let refused = &cluster.metrics().connections_refused;
                    refused.inc();
                    // Logged on the 1st, 2nd, 4th, 8th… refusal: a flood must not flood the log.
                    if refused.get().is_power_of_two() {
                        tracing::warn!(%peer, name, max = cluster.max_connections(), refused = refused.get(),
                            "rpc connection cap reached; closing new connections");
                    }
                    drop(stream);
                    continue;
                };
                tracing::debug!(%peer, name, "rpc connection");
                let (cluster, handle, stop) = (cluster.clone(), handle.clone(), shutdown.clone());
                tracker.spawn(async move {
                    let _permit = permit;
                    let metrics = cluster.metrics().clone();
                    metrics.connections.inc();
                    tokio::select! {
                        _ = serve_one(&cluster, stream, peer, &*handle) => {}
                        _ = stop.cancelled() => {}
                    }
                    metrics.connections.dec();
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

/// One accepted connection: the handshake, then the tier's channel.
async fn serve_one<F, Fut>(cluster: &Cluster, stream: TcpStream, peer: SocketAddr, handle: &F)
where
    F: Fn(RpcStream) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Some(stream) = cluster.accept(stream, peer).await {
        handle(stream).await;
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
    /// A peer answered but refused the cluster handshake (or was refused): the two sides do
    /// not share `cluster.secret`. Retrying helps only once the configuration is fixed.
    #[error("{name} at {addrs:?} refused the cluster handshake: {last}")]
    Refused {
        /// Link name.
        name: String,
        /// Addresses tried.
        addrs: Vec<String>,
        /// Last handshake error.
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

type Connector<C> = Arc<dyn Fn(RpcStream) -> C + Send + Sync>;

/// A tarpc client to one logical peer (one or several addresses), connected lazily and
/// re-connected after a transport failure. Cheap to share behind an `Arc`.
pub struct Link<C> {
    name: String,
    addrs: Vec<String>,
    connect_timeout: Duration,
    cluster: Cluster,
    connector: Connector<C>,
    current: Mutex<Option<(C, usize)>>,
    /// Index of the address to try first on the next connect (after the one that failed).
    next_start: AtomicUsize,
}

impl<C: Clone + Send + 'static> Link<C> {
    /// A link that proves `cluster`'s secret on each new connection, then wraps it with
    /// `connector` (e.g. `|s| FooClient::new(cfg, cluster.transport(s)).spawn()`).
    pub fn new(
        name: impl Into<String>,
        addrs: Vec<String>,
        connect_timeout: Duration,
        cluster: Cluster,
        connector: impl Fn(RpcStream) -> C + Send + Sync + 'static,
    ) -> Self {
        Link {
            name: name.into(),
            addrs,
            connect_timeout,
            cluster,
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
        let mut refused = false;
        for i in 0..self.addrs.len() {
            let idx = (start + i) % self.addrs.len();
            let addr = &self.addrs[idx];
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr.as_str()))
                .await
            {
                Ok(Ok(stream)) => {
                    let stream = match self.cluster.dial(stream, addr).await {
                        Ok(s) => s,
                        Err(e) => {
                            refused |= e.is_refusal();
                            last = format!("{addr}: {e}");
                            continue;
                        }
                    };
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
        let (name, addrs) = (self.name.clone(), self.addrs.clone());
        Err(if refused {
            LinkError::Refused { name, addrs, last }
        } else {
            LinkError::Connect { name, addrs, last }
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
