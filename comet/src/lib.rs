//! rim's comet tier: client connections (goim frames over TCP and WebSocket, or JSON over
//! WebSocket), sessions sharded in buckets, rooms, and the `CometRpc` that job delivers pushes
//! through. Holds no Redis connection: it authenticates, registers and renews through logic.
//!
//! * [`config`]: configuration and validation.
//! * `session`: the per-connection protocol driver and the shared session handle.
//! * `bucket`, `room`: sharded session registry and room presence.
//! * `ws`, `tcp`: transports, each a `Connection` driven by one task per session; `outbound`:
//!   a session's queue and close request; `writer`: encode-once push shapes per transport.
//! * `deliver`: `CometRpc` (room runs batched per member); `renew`: node renewal; `server`:
//!   wiring and drain.
//! * `upstream`: op 4 SendMsg (rate limit, validation, forwarding to logic).
#![forbid(unsafe_code)]

pub mod bucket;
pub mod config;
mod deliver;
pub mod metrics;
pub mod outbound;
mod renew;
pub mod room;
mod server;
pub mod session;
mod tcp;
pub mod upstream;
pub mod writer;
mod ws;

pub use config::Config;
use rim_runtime::settings::SettingsError;
use tokio_util::sync::CancellationToken;

/// Listeners `main.rs` (or a test) binds before calling [`run`].
#[derive(Debug)]
pub struct Listeners {
    /// WebSocket at `/sub`, plus `/healthz`, `/readyz`, `/metrics`.
    pub http: tokio::net::TcpListener,
    /// Raw TCP frames (`None` = disabled).
    pub tcp: Option<tokio::net::TcpListener>,
    /// `CometRpc` for job.
    pub rpc: tokio::net::TcpListener,
}

/// Why the comet could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid.
    #[error("config error: {0}")]
    Config(#[from] SettingsError),
    /// A listener could not be used.
    #[error("listener error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the comet on already-bound listeners until `shutdown` is cancelled, then drains: every
/// session gets op 6 `server shutting down`, the node unregisters from logic, and tasks finish
/// within `shutdown_grace_ms`.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    server::run(listeners, config, shutdown).await
}
