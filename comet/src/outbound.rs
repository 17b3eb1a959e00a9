//! A session's outbound queue and its close request: what delivery, kicks and the read loop hand
//! to the connection's single task, which writes them in order and then performs the close.
//!
//! Built for a million idle sessions: an empty queue owns no heap memory (a `VecDeque` allocates
//! on first push and the writer takes the whole buffer when it drains it), and one `Notify` wakes
//! the connection task for new items and for a close alike. A bounded channel would reserve a
//! block of 32 slots per session up front, and a cancellation token a tree node.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::writer::Out;

/// Most queue items written in one batch, so one busy session cannot hog its task forever.
pub const MAX_BATCH: usize = 256;

/// How a session is closed: the op 6 reason, the WebSocket close code, what still goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseSpec {
    /// Reason text (op 6 body and WebSocket close reason).
    pub reason: String,
    /// WebSocket close code.
    pub ws_code: u16,
    /// Send op 6 before closing (TCP always does when set).
    pub op6: bool,
    /// Send op 6 on WebSocket too (frame errors use the close code alone).
    pub op6_on_ws: bool,
    /// Write what is already queued before closing.
    pub drain: bool,
}

impl CloseSpec {
    /// Op 6 with `reason`, queued items first, then close with `ws_code`.
    pub fn reason(reason: &str, ws_code: u16) -> Self {
        CloseSpec {
            reason: reason.to_string(),
            ws_code,
            op6: true,
            op6_on_ws: true,
            drain: true,
        }
    }

    /// Policy refusal (auth problems): op 6 then WebSocket 1008.
    pub fn policy(reason: &str) -> Self {
        Self::reason(reason, 1008)
    }

    /// A malformed client frame: TCP gets op 6, WebSocket the close code (1002/1009) and reason.
    pub fn protocol(reason: &str, ws_code: u16) -> Self {
        CloseSpec {
            op6_on_ws: false,
            ..Self::reason(reason, ws_code)
        }
    }

    /// Queue overflow: nothing queued is written, op 6 `slow consumer`.
    pub fn slow() -> Self {
        CloseSpec {
            drain: false,
            ..Self::reason("slow consumer", 1008)
        }
    }

    /// Graceful drain of the node: op 6, WebSocket 1001 going away.
    pub fn shutdown() -> Self {
        Self::reason("server shutting down", 1001)
    }

    /// No op 6 (the client went away or the socket failed).
    pub fn silent(reason: &str) -> Self {
        CloseSpec {
            op6: false,
            op6_on_ws: false,
            drain: false,
            ..Self::reason(reason, 1000)
        }
    }
}

/// Result of offering an item to a session's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued.
    Queued,
    /// The queue was full: the session is now closing as a slow consumer.
    Slow,
    /// The session is already closing.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Out>,
    close: Option<CloseSpec>,
}

/// Producer side of a connection's outbound queue plus its close signal; the connection task
/// consumes it with [`Outbound::changed`] and [`Outbound::take_batch`].
#[derive(Debug)]
pub struct Outbound {
    capacity: usize,
    state: Mutex<State>,
    wake: Notify,
}

impl Outbound {
    /// A queue of at most `capacity` items.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Outbound {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        })
    }

    /// Queues without waiting; a full queue closes the session as a slow consumer (counted once).
    pub fn offer(&self, item: Out, metrics: &Metrics) -> Offer {
        let mut st = self.state.lock();
        if st.close.is_some() {
            return Offer::Closed;
        }
        if st.queue.len() >= self.capacity {
            st.close = Some(CloseSpec::slow());
            drop(st);
            self.wake.notify_one();
            metrics.slow_consumer_closed.inc();
            tracing::warn!("outbound queue full, closing slow consumer");
            return Offer::Slow;
        }
        st.queue.push_back(item);
        drop(st);
        self.wake.notify_one();
        Offer::Queued
    }

    /// Queues `item` ahead of everything queued (an AuthReply written after the session could
    /// already receive pushes); not bounded by the capacity, since it is one reply.
    pub fn offer_front(&self, item: Out) -> Offer {
        let mut st = self.state.lock();
        if st.close.is_some() {
            return Offer::Closed;
        }
        st.queue.push_front(item);
        drop(st);
        self.wake.notify_one();
        Offer::Queued
    }

    /// Asks the connection task to close the session; the first close wins. Returns whether
    /// this one did.
    pub fn close(&self, spec: CloseSpec) -> bool {
        let mut st = self.state.lock();
        if st.close.is_some() {
            return false;
        }
        st.close = Some(spec);
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        self.state.lock().close.is_some()
    }

    /// The close that was requested, if any.
    pub fn spec(&self) -> Option<CloseSpec> {
        self.state.lock().close.clone()
    }

    /// Resolves after an item was queued or a close requested since the last wait (a wake-up
    /// that found nobody waiting is kept, so none is lost). Cancel-safe.
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    /// Takes up to [`MAX_BATCH`] queued items, oldest first. An emptied queue gives its buffer
    /// away, so an idle session holds none.
    pub fn take_batch(&self) -> Vec<Out> {
        let mut st = self.state.lock();
        if st.queue.len() <= MAX_BATCH {
            // Moves the buffer out (no copy when it has not wrapped around).
            Vec::from(std::mem::take(&mut st.queue))
        } else {
            st.queue.drain(..MAX_BATCH).collect()
        }
    }

    /// Items queued now.
    pub fn len(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::writer::EncodedPush;

    #[test]
    fn full_queue_marks_slow_consumer_once() {
        let out = Outbound::new(1);
        let m = Metrics::default();
        let p = Arc::new(EncodedPush::new(1000, b"x"));
        assert_eq!(out.offer(Out::Push(p.clone()), &m), Offer::Queued);
        assert_eq!(out.offer(Out::Push(p.clone()), &m), Offer::Slow);
        assert_eq!(out.offer(Out::Push(p), &m), Offer::Closed);
        assert_eq!(m.slow_consumer_closed.get(), 1);
        assert!(out.is_closing());
        assert_eq!(out.spec(), Some(CloseSpec::slow()));
        assert!(!out.close(CloseSpec::shutdown()), "first close wins");
    }

    #[test]
    fn batches_are_bounded_ordered_and_leave_no_buffer_behind() {
        let out = Outbound::new(1000);
        let m = Metrics::default();
        for i in 0..(MAX_BATCH + 3) {
            let p = Arc::new(EncodedPush::new(1000, i.to_string().as_bytes()));
            assert_eq!(out.offer(Out::Push(p), &m), Offer::Queued);
        }
        let first = out.take_batch();
        assert_eq!(first.len(), MAX_BATCH);
        assert!(matches!(&first[0], Out::Push(p) if p.body() == b"0"));
        let rest = out.take_batch();
        assert_eq!(rest.len(), 3);
        assert!(matches!(&rest[0], Out::Push(p) if p.body() == MAX_BATCH.to_string().as_bytes()));
        assert!(out.is_empty());
        assert_eq!(
            out.state.lock().queue.capacity(),
            0,
            "an idle queue owns no buffer"
        );
    }

    #[tokio::test]
    async fn a_wake_up_before_the_wait_is_not_lost() {
        let out = Outbound::new(4);
        let m = Metrics::default();
        out.offer(Out::Push(Arc::new(EncodedPush::new(1000, b"x"))), &m);
        tokio::time::timeout(std::time::Duration::from_secs(5), out.changed())
            .await
            .expect("the stored wake-up resolves at once");
        out.close(CloseSpec::shutdown());
        tokio::time::timeout(std::time::Duration::from_secs(5), out.changed())
            .await
            .expect("a close wakes the task");
    }
}
