//! The push payload, the same as the shared harness's: ASCII `seq|wm|t_us|target|` padded to the
//! payload size. `t_us` is the wall clock at send in µs (comparable across the tool's
//! processes); `wm` is the highest seq such that every push up to it had been answered 2xx when
//! this one was sent, which is what makes causal order checkable.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One decoded payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// Push number, from 0.
    pub seq: u64,
    /// Watermark at send (`u64::MAX`: nothing answered yet).
    pub wm: u64,
    /// Send time.
    pub t_us: u64,
    /// The target: a mid, or 0 for a room.
    pub target: i64,
}

impl Payload {
    /// `seq|wm|t_us|target|` padded with `.` to `size` bytes (or longer if it does not fit).
    pub fn encode(&self, size: usize) -> Vec<u8> {
        let wm = if self.wm == u64::MAX {
            "-".to_string()
        } else {
            self.wm.to_string()
        };
        let mut s = format!("{}|{}|{}|{}|", self.seq, wm, self.t_us, self.target).into_bytes();
        if s.len() < size {
            s.resize(size, b'.');
        }
        s
    }

    /// Parses what [`Payload::encode`] wrote; `None` for anything else.
    pub fn decode(b: &[u8]) -> Option<Payload> {
        let mut it = b.split(|c| *c == b'|');
        let mut num = || -> Option<&[u8]> { it.next() };
        let seq = parse(num()?)?;
        let wm_raw = num()?;
        let wm = if wm_raw == b"-" {
            u64::MAX
        } else {
            parse(wm_raw)?
        };
        let t_us = parse(num()?)?;
        let target = std::str::from_utf8(num()?).ok()?.parse().ok()?;
        Some(Payload {
            seq,
            wm,
            t_us,
            target,
        })
    }
}

fn parse(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads() {
        let p = Payload {
            seq: 12,
            wm: u64::MAX,
            t_us: 99,
            target: 7,
        };
        let b = p.encode(64);
        assert_eq!(b.len(), 64);
        assert!(b.starts_with(b"12|-|99|7|...."));
        assert_eq!(Payload::decode(&b), Some(p));
        let q = Payload { wm: 11, ..p };
        assert_eq!(Payload::decode(&q.encode(0)), Some(q));
        assert_eq!(Payload::decode(b"nope"), None);
    }
}
