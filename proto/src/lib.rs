//! The contract between rim's tiers and its clients, and nothing else.
//!
//! * [`frame`]: the goim binary frame and its codec (WebSocket messages and TCP streams).
//! * [`op`]: operation codes.
//! * [`json`]: the JSON text-mode envelope (rim extension for browsers and tools).
//! * [`msg`]: JSON bodies carried inside frames (auth, replies, close reasons).
//! * [`room`]: room id syntax (`type://id`).
//! * [`rpc`]: tarpc services between tiers, their message types and the transport codec.
//! * [`job`]: the push job as stored in the Redis push streams, and partitioning.
//! * [`keys`]: every Redis key and stream name rim uses.
//! * [`history`]: room and user histories: sources, ids, catch-up pages, Auth's `recover`.
//!
//! No business logic lives here: the crate only says what goes over a wire or into Redis.
#![forbid(unsafe_code)]

pub mod frame;
pub mod history;
pub mod job;
pub mod json;
pub mod keys;
pub mod msg;
pub mod op;
pub mod room;
pub mod rpc;

pub use frame::{Frame, FrameCodec, FrameError};
