//! Serving an axum router with graceful shutdown, written once for the three tiers: on
//! `shutdown` the server stops accepting, open requests get at most `grace` to finish, and the
//! handlers see each client's address as [`PeerAddr`].

use std::future::IntoFuture;
use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::listener::{GuardedListener, PeerAddr};

/// Serves `router` on `listener` until `shutdown` and the open requests finished, or `grace`
/// after `shutdown`, whichever is first. `Err` only when the server itself failed.
pub async fn serve(
    listener: GuardedListener,
    router: Router,
    shutdown: CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    let serve = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<PeerAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
    .into_future();
    let mut serve = std::pin::pin!(serve);
    tokio::select! {
        r = &mut serve => r,
        () = shutdown.cancelled() => {
            // Graceful shutdown waits for every open request, and a client trickling a body (or
            // never reading its answer) would hold SIGTERM forever: bound it by the grace.
            match tokio::time::timeout(grace, &mut serve).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(?grace, "http requests still open after the grace period; closing them");
                    Ok(())
                }
            }
        }
    }
}
