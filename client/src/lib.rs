//! rim-client: the one Rust client of rim's protocol (goim's frames over TCP or WebSocket, and
//! rim's JSON mode over WebSocket), used by rim's tests, its load tool and users' Rust services.
//!
//! * [`Conn`]: one connection. Send frames, wait for replies and pushes (op 9 batches unpacked),
//!   see exactly how the server closed it. Never reconnects; every wait is bounded.
//! * [`Client`]: a session that keeps itself connected: auth, heartbeats at the server's
//!   interval, requests answered by seq (SendMsg, ChangeRoom, Sub, Unsub), pushes as
//!   [`Event`]s, and reconnects with jittered backoff ([`Reconnect`]) under the same key.
//! * [`TlsOptions`]: TLS under either transport (a comet's `listen.tls` / `listen.wss`).
//! * [`ClientError`]: every failure, each refusal with the server's own reason.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rim_client::ClientError> {
//! use rim_client::{Client, ClientConfig, ConnectOptions, Event, Transport};
//! use rim_proto::msg::AuthBody;
//! let auth = AuthBody { mid: 7, room_id: "live://1000".into(), accepts: vec![1000], ..Default::default() };
//! let addr = "127.0.0.1:3102".parse().unwrap();
//! let mut client = Client::start(ClientConfig::new(ConnectOptions::new(Transport::WsBinary, addr), auth));
//! client.connected().await?;
//! while let Some(ev) = client.next_event().await {
//!     if let Event::Push(p) = ev {
//!         println!("op {} body {:?}", p.frame.op, p.frame.body);
//!     }
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod client;
mod conn;
mod error;
mod io;
mod received;
mod reconnect;

pub use client::{Client, ClientConfig, Event};
pub use conn::{Conn, ConnectOptions, DEFAULT_WAIT, Transport};
pub use error::{ClientError, Closed};
pub use io::TlsOptions;
pub use received::{MAX_SERVER_BODY, Received, online_of};
pub use reconnect::Reconnect;
