//! What the session driver needs of a transport: one client connection as frames in, queued
//! items out, then the close ([`Connection`], implemented by `tcp` and `ws`), and how a read can
//! fail.

use std::future::Future;

use rim_proto::frame::{Frame, FrameError};

use crate::outbound::CloseSpec;
use crate::writer::Out;

/// Why reading the next client frame failed.
#[derive(Debug)]
pub enum ReadError {
    /// A malformed frame.
    Frame(FrameError),
    /// A JSON-mode message that is not a frame.
    Json(String),
    /// The socket failed.
    Io(String),
}

/// One client connection as the session driver sees it: frames in, queued items out, then the
/// close. A single task owns it, so reads and writes need neither split halves nor a second task.
pub trait Connection: Send {
    /// The next client frame; `None` when the client closed. Cancel-safe: the driver polls it
    /// in `select!` against the outbound queue and the deadlines.
    fn next(&mut self) -> impl Future<Output = Option<Result<Frame, ReadError>>> + Send;
    /// Writes a batch of queued items in the transport's shape.
    fn write(&mut self, batch: &[Out]) -> impl Future<Output = Result<(), String>> + Send;
    /// Sends what `spec` asks for (op 6, close frame) and shuts the connection.
    fn finish(&mut self, spec: &CloseSpec) -> impl Future<Output = Result<(), String>> + Send;
}

/// Which transport a connection came in on (metrics, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Raw TCP frames.
    Tcp,
    /// WebSocket.
    Ws,
}

impl Transport {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
    }
}
