//! rim's comet tier: client connections (goim frames over TCP and WebSocket, or JSON over
//! WebSocket), sessions sharded in buckets, rooms, and the `CometRpc` that job delivers pushes
//! through. Holds no Redis connection: it authenticates, registers and renews through logic.
//!
//! Modules, from the bottom of the import graph up:
//! * [`config`], [`metrics`]: configuration and validation; the comet's counters.
//! * [`writer`], [`outbound`]: encode-once push shapes per transport; a session's queue and
//!   close request; [`tagged`]: push ids for sessions that asked for them.
//! * [`session`]: a session's shared state (what buckets, rooms and delivery hold);
//!   [`catch_up`]: merging a history's messages with live pushes while a session catches up.
//! * [`bucket`]: the sharded session registry; [`room`]: joins, leaves and room changes, and how
//!   logic is told of them.
//! * `logic`: every call to logic, behind a trait; `push`: one push offered to sessions;
//!   `recovery`: reading what a session missed from logic and queueing it.
//! * `cidr`: address ranges; `rate`: the token bucket; `limits`: per-address connection and attempt limits.
//! * `ctx`: the state shared by every task (it imports none of the modules above it).
//! * `connection`: what the driver needs of a transport; `io`: writing the queue and closing;
//!   `admission`: the connection cap, Auth and registration; `client_op`: op dispatch (a frame
//!   parsed into a request that applies itself); [`upstream`]: op 4 SendMsg; `driver`: one
//!   connection from accept to close.
//! * `ws`, `tcp`: transports, each a `Connection` driven by one task per session (both also
//!   over TLS: `listen.wss`, `listen.tls`).
//! * `deliver`: `CometRpc` (room runs batched per member) and the paced worker; `renew`: node
//!   registration; `node`: what this comet publishes and its readiness; `server`: wiring and
//!   drain.
#![forbid(unsafe_code)]

mod admission;
pub mod bucket;
pub mod catch_up;
mod cidr;
mod client_op;
pub mod config;
mod connection;
mod ctx;
mod deliver;
mod driver;
mod io;
mod limits;
mod logic;
pub mod metrics;
mod node;
pub mod outbound;
mod push;
mod recovery;
mod renew;
pub mod room;
mod server;
pub mod session;
pub mod tagged;
mod tcp;
#[cfg(test)]
mod testing;
pub mod upstream;
pub mod writer;
mod ws;

pub use config::Config;
use rim_runtime::settings::SettingsError;
use tokio_util::sync::CancellationToken;

/// Listeners `main.rs` (or a test) binds before calling [`run`].
#[derive(Debug)]
pub struct Listeners {
    /// WebSocket at `/sub`, plus `/healthz`, `/readyz` (and `/metrics` when `ops` is `None`).
    pub http: tokio::net::TcpListener,
    /// Raw TCP frames (`None` = disabled).
    pub tcp: Option<tokio::net::TcpListener>,
    /// WebSocket over TLS at `/sub`, plus the ops routes (`None` = disabled; needs `[tls]`).
    pub wss: Option<tokio::net::TcpListener>,
    /// Raw TCP frames over TLS (`None` = disabled; needs `[tls]`).
    pub tls: Option<tokio::net::TcpListener>,
    /// `CometRpc` for job.
    pub rpc: tokio::net::TcpListener,
    /// `/metrics`, `/healthz`, `/readyz` for the scraper (`listen.ops`); `None` = `/metrics` is
    /// served on `http` too.
    pub ops: Option<tokio::net::TcpListener>,
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
    /// The `[tls]` certificate could not be loaded.
    #[error(transparent)]
    Tls(#[from] rim_runtime::tls::TlsError),
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
