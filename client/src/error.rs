//! What can go wrong talking to a comet, and how the server ended a connection.

use std::net::SocketAddr;
use std::time::Duration;

/// How the server ended a connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Closed {
    /// WebSocket close code (None for TCP, or a close without a close frame).
    pub code: Option<u16>,
    /// WebSocket close reason.
    pub reason: String,
    /// The reason of the op 6 DisconnectReply the server sent before closing, if any.
    pub disconnect_reason: Option<String>,
}

impl Closed {
    /// Whether the op 6 reason received before the close mentions `what`.
    pub fn said(&self, what: &str) -> bool {
        self.disconnect_reason
            .as_deref()
            .is_some_and(|r| r.contains(what))
    }

    /// The most specific reason known: op 6's, else the close frame's, else "closed".
    pub fn why(&self) -> &str {
        match (&self.disconnect_reason, self.reason.as_str()) {
            (Some(r), _) => r,
            (None, "") => "closed",
            (None, r) => r,
        }
    }
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection closed by the server")?;
        if let Some(code) = self.code {
            write!(f, ": code {code}")?;
            if !self.reason.is_empty() {
                write!(f, " {:?}", self.reason)?;
            }
        }
        if let Some(r) = &self.disconnect_reason {
            write!(f, " (disconnect reason: {r:?})")?;
        }
        Ok(())
    }
}

/// Why a client call failed. Every refusal by the server is its own variant carrying the
/// server's words, so callers can tell "try again later" from "you may not".
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The WebSocket upgrade failed.
    #[error("websocket handshake with {addr}: {message}")]
    Handshake {
        /// Where.
        addr: SocketAddr,
        /// What the WebSocket layer said.
        message: String,
    },
    /// The server refused the Auth frame (op 6 reason, e.g. `auth timeout`, `logic unavailable`,
    /// `too many connections`, or logic's refusal such as a bad token).
    #[error("auth refused: {}", .0.why())]
    AuthRefused(Closed),
    /// The server closed the connection.
    #[error("{0}")]
    Closed(Closed),
    /// The server answered a request with a refusal (`{"error": ...}` in op 13/15/17, or a
    /// negative code in op 5).
    #[error("{op} refused: {message}")]
    Refused {
        /// Name of the request's op (`ChangeRoom`, `Sub`, `SendMsg`, ...).
        op: &'static str,
        /// Negative code from op 5, or 0.
        code: i32,
        /// The server's reason.
        message: String,
    },
    /// Nothing came within the wait.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// How long was waited.
        waited: Duration,
        /// What was waited for.
        what: &'static str,
    },
    /// The socket failed.
    #[error("{0}")]
    Io(String),
    /// The server sent something that is not rim's protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The call does not apply to this transport or state (e.g. text messages over TCP).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The session's driver stopped (the [`crate::Client`] was closed or gave up).
    #[error("client stopped")]
    Stopped,
}

impl ClientError {
    /// Whether reconnecting may help: network failures, server-side closes and transient
    /// refusals (`logic unavailable`, `too many connections`, `server shutting down`), but not
    /// a refused credential or a protocol mismatch.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Handshake { .. }
            | ClientError::Io(_)
            | ClientError::Timeout { .. }
            | ClientError::Closed(_) => true,
            ClientError::AuthRefused(c) => {
                c.said("logic unavailable")
                    || c.said("too many connections")
                    || c.said("server shutting down")
                    || c.said("auth timeout")
            }
            ClientError::Refused { .. }
            | ClientError::Protocol(_)
            | ClientError::Unsupported(_)
            | ClientError::Stopped => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_the_servers_words_and_know_what_is_worth_retrying() {
        let refused = ClientError::AuthRefused(Closed {
            code: Some(1008),
            reason: "bad token".into(),
            disconnect_reason: Some("unauthorized: bad token".into()),
        });
        assert_eq!(refused.to_string(), "auth refused: unauthorized: bad token");
        assert!(!refused.is_transient());
        let busy = ClientError::AuthRefused(Closed {
            disconnect_reason: Some("logic unavailable".into()),
            ..Closed::default()
        });
        assert!(busy.is_transient());
        let closed = Closed {
            code: Some(1000),
            reason: "heartbeat timeout".into(),
            disconnect_reason: None,
        };
        assert_eq!(closed.why(), "heartbeat timeout");
        assert_eq!(
            ClientError::Closed(closed).to_string(),
            "connection closed by the server: code 1000 \"heartbeat timeout\""
        );
    }
}
