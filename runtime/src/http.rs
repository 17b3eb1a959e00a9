//! Serving an axum router, written once for the three tiers: every request's headers must arrive
//! within a deadline (a slow-loris socket trickling an upgrade request or a push is closed
//! then, while other clients are served), handlers see each client's address as [`PeerAddr`],
//! WebSocket upgrades work, optionally over TLS ([`serve_tls`], the handshake under its own
//! deadline), and on `shutdown` the server stops accepting and open requests get
//! at most `grace` to finish.
//!
//! axum's own `serve` cannot do the first: it sets no timer on hyper, so hyper's header-read
//! timeout never runs. This drives hyper's HTTP/1 connection directly, as `axum::serve` does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::listener::{GuardedListener, PeerAddr};
use crate::tls::Acceptor;

/// How one HTTP listener treats slow clients and shutdown.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Longest a request's headers may take to arrive, from its first byte (or, for the first
    /// request, from the connection); past it the connection is closed.
    pub header_timeout: Duration,
    /// Longest open requests may run on after shutdown began.
    pub grace: Duration,
}

/// Serves `router` on `listener` until `shutdown` and the open requests finished, or `grace`
/// after `shutdown`, whichever is first.
pub async fn serve(
    listener: GuardedListener,
    router: Router,
    shutdown: CancellationToken,
    opts: ServeOptions,
) -> std::io::Result<()> {
    serve_with(listener, router, shutdown, opts, None).await
}

/// [`serve`] over TLS (HTTPS, WSS): each connection's handshake runs first, under the
/// acceptor's deadline, then the same HTTP/1 serving with the header deadline.
pub async fn serve_tls(
    listener: GuardedListener,
    router: Router,
    shutdown: CancellationToken,
    opts: ServeOptions,
    tls: Acceptor,
) -> std::io::Result<()> {
    serve_with(listener, router, shutdown, opts, Some(tls)).await
}

async fn serve_with(
    mut listener: GuardedListener,
    router: Router,
    shutdown: CancellationToken,
    opts: ServeOptions,
    tls: Option<Acceptor>,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    // Cancelled when the grace is over: what is still open then is closed.
    let hard_stop = CancellationToken::new();
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let conn = Conn {
            router: router.clone(),
            peer: addr,
            stop: shutdown.clone(),
            hard: hard_stop.clone(),
            opts,
        };
        match &tls {
            None => connections.spawn(conn.serve(io)),
            Some(tls) => {
                let tls = tls.clone();
                connections.spawn(async move {
                    let handshake = tokio::select! {
                        s = tls.accept(io, addr) => s,
                        () = conn.stop.cancelled() => None,
                    };
                    if let Some(io) = handshake {
                        conn.serve(io).await;
                    }
                })
            }
        };
    }
    connections.close();
    // Graceful shutdown waits for every open request, and a client trickling a body (or never
    // reading its answer) would hold SIGTERM forever: bound it by the grace.
    if tokio::time::timeout(opts.grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?opts.grace, "http requests still open after the grace period; closing them");
        hard_stop.cancel();
    }
    Ok(())
}

/// One accepted connection and what serving it needs.
struct Conn {
    router: Router,
    peer: SocketAddr,
    stop: CancellationToken,
    hard: CancellationToken,
    opts: ServeOptions,
}

impl Conn {
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            router,
            peer,
            stop,
            hard,
            opts,
        } = self;
        let peer = ConnectInfo(PeerAddr(peer));
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(peer);
            let mut router = router.clone();
            async move {
                Ok::<_, Infallible>(match router.call(req.map(axum::body::Body::new)).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                })
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(opts.header_timeout);
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::trace!(error = %e, "http connection ended with an error");
                }
                return;
            }
            () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
        }
        tokio::select! {
            r = conn => {
                if let Err(e) = r {
                    tracing::trace!(error = %e, "http connection ended with an error");
                }
            }
            () = hard.cancelled() => {}
        }
    }
}
