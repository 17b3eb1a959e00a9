//! A TCP proxy a test controls, to put a fault between two real parts that cannot be made by
//! killing a process: a peer that hangs (connections open, nothing answered), one whose replies
//! are lost, one that refuses connections. Tiers dial the proxy's loopback address; the proxy
//! dials the real upstream (a TCP address, or a unix socket such as the test Redis's).
//!
//! Modes apply at once to every connection, new and held:
//! * [`Mode::Forward`]: bytes flow both ways.
//! * [`Mode::Blackhole`]: connections are accepted and kept, nothing is relayed either way (a
//!   hung peer: writes succeed, no answer ever comes). Bytes that arrive meanwhile are held and
//!   relayed if the mode goes back to `Forward`, as a hung process resuming would.
//! * [`Mode::DropReplies`]: requests reach the upstream, its replies are read and thrown away.
//! * [`Mode::Refuse`]: held connections are closed; new ones are accepted and closed at once.
//!
//! Counters ([`FaultProxy::stats`]) are the evidence a test asserts that its fault took effect.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where the proxy forwards to.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

/// What the proxy does with the traffic (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Relay both ways.
    Forward,
    /// Hold connections, relay nothing.
    Blackhole,
    /// Relay requests, discard replies.
    DropReplies,
    /// Close held connections and every new one.
    Refuse,
}

/// What went through, for a test's evidence.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Bytes relayed client → upstream.
    pub up: AtomicU64,
    /// Bytes relayed upstream → client.
    pub down: AtomicU64,
    /// Reply bytes read and discarded ([`Mode::DropReplies`]).
    pub dropped: AtomicU64,
    /// Reads that raced a switch to [`Mode::Blackhole`] and were held until it ended.
    pub held: AtomicU64,
    /// Connections closed by [`Mode::Refuse`].
    pub refused: AtomicU64,
}

impl Stats {
    /// A counter's current value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A running proxy; stops (closing every connection) on drop.
pub struct FaultProxy {
    addr: std::net::SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped by every switch to [`Mode::Refuse`]: a connection held when it changes is cut even
    /// if the mode has already moved on (a watch only shows its latest value, so `Refuse` then
    /// `Forward` at once would otherwise leave held connections open).
    cuts: watch::Sender<u64>,
    stats: Arc<Stats>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Starts forwarding on a loopback port to `upstream`.
    pub async fn start(upstream: Upstream) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, _) = watch::channel(Mode::Forward);
        let (cuts, _) = watch::channel(0u64);
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        let (m, s, st, cu) = (mode.clone(), stats.clone(), stop.clone(), cuts.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = st.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((c, _)) => c,
                        Err(_) => continue,
                    },
                };
                s.accepted.fetch_add(1, Ordering::Relaxed);
                if *m.borrow() == Mode::Refuse {
                    s.refused.fetch_add(1, Ordering::Relaxed);
                    drop(client);
                    continue;
                }
                let (up, m, s, st) = (upstream.clone(), m.subscribe(), s.clone(), st.clone());
                let cut = cu.subscribe();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    match up {
                        Upstream::Tcp(a) => {
                            let Ok(u) = tokio::net::TcpStream::connect(a).await else {
                                return;
                            };
                            let _ = u.set_nodelay(true);
                            let (ur, uw) = u.into_split();
                            relay(cr, cw, ur, uw, m, cut, s, st).await;
                        }
                        Upstream::Unix(p) => {
                            let Ok(u) = tokio::net::UnixStream::connect(p).await else {
                                return;
                            };
                            let (ur, uw) = u.into_split();
                            relay(cr, cw, ur, uw, m, cut, s, st).await;
                        }
                    }
                });
            }
        });
        FaultProxy {
            addr,
            mode,
            cuts,
            stats,
            stop,
        }
    }

    /// The address tiers dial.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Switches every connection to `mode`; `Refuse` cuts every connection held at that moment.
    pub fn set(&self, mode: Mode) {
        if mode == Mode::Refuse {
            self.cuts.send_modify(|n| *n += 1);
        }
        self.mode.send_replace(mode);
    }

    /// What went through so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Runs both directions of one connection until either side closes, the proxy cuts it, or it
/// stops.
#[allow(clippy::too_many_arguments)]
async fn relay(
    cr: impl AsyncRead + Unpin,
    cw: impl AsyncWrite + Unpin,
    ur: impl AsyncRead + Unpin,
    uw: impl AsyncWrite + Unpin,
    mode: watch::Receiver<Mode>,
    mut cut: watch::Receiver<u64>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    cut.borrow_and_update();
    tokio::select! {
        _ = stop.cancelled() => {}
        // Any cut after this connection was accepted ends it, whatever the mode is now.
        _ = cut.changed() => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        _ = pump(cr, uw, mode.clone(), &stats, Direction::Up) => {}
        _ = pump(ur, cw, mode, &stats, Direction::Down) => {}
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

/// Copies `from` → `to` as the mode allows; returns when either side closes or on `Refuse`.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut mode: watch::Receiver<Mode>,
    stats: &Stats,
    dir: Direction,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While blackholed, read nothing (the kernel buffers, then the peer's writes block, as
        // with a hung process); wait for another mode.
        let current = *mode.borrow_and_update();
        match current {
            Mode::Refuse => return,
            Mode::Blackhole => {
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Mode::Forward | Mode::DropReplies => {}
        }
        let n = tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        // A read that raced with a switch to Blackhole is held until the mode allows it.
        let mut now = *mode.borrow();
        while now == Mode::Blackhole {
            stats.held.fetch_add(1, Ordering::Relaxed);
            if mode.changed().await.is_err() {
                return;
            }
            now = *mode.borrow_and_update();
        }
        match (now, dir) {
            (Mode::Refuse, _) => return,
            (Mode::DropReplies, Direction::Down) => {
                stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
            }
            _ => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                let counter = match dir {
                    Direction::Up => &stats.up,
                    Direction::Down => &stats.down,
                };
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An upstream that echoes what it reads.
    async fn echo() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        a
    }

    async fn roundtrip(
        c: &mut tokio::net::TcpStream,
        msg: &[u8],
        wait: Duration,
    ) -> Option<Vec<u8>> {
        c.write_all(msg).await.ok()?;
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(wait, c.read_exact(&mut got))
            .await
            .ok()?
            .ok()?;
        Some(got)
    }

    #[tokio::test]
    async fn forwards_hangs_resumes_drops_replies_and_refuses() {
        let p = FaultProxy::start(Upstream::Tcp(echo().await)).await;
        let mut c = tokio::net::TcpStream::connect(p.addr())
            .await
            .expect("connect");
        let long = Duration::from_secs(5);
        assert_eq!(
            roundtrip(&mut c, b"one", long).await.as_deref(),
            Some(&b"one"[..])
        );

        // Hung: no answer (within a short wait; the answer must not come at all, and comes
        // once the mode is Forward again).
        p.set(Mode::Blackhole);
        assert_eq!(
            roundtrip(&mut c, b"two", Duration::from_millis(200)).await,
            None
        );
        p.set(Mode::Forward);
        let mut got = vec![0u8; 3];
        tokio::time::timeout(long, c.read_exact(&mut got))
            .await
            .expect("the held request is answered after the hang")
            .expect("read");
        assert_eq!(&got, b"two");

        // Replies lost: the request reaches the upstream (its echo is counted as dropped).
        p.set(Mode::DropReplies);
        assert_eq!(
            roundtrip(&mut c, b"three", Duration::from_millis(200)).await,
            None
        );
        let dropped = || Stats::get(&p.stats().dropped);
        tokio::time::timeout(long, async {
            while dropped() < 5 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the reply was read and dropped");

        // Refused: the held connection closes, a new one is closed at once.
        p.set(Mode::Refuse);
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(long, c.read(&mut buf))
            .await
            .expect("closed");
        assert!(matches!(closed, Ok(0) | Err(_)));
        let mut fresh = tokio::net::TcpStream::connect(p.addr())
            .await
            .expect("connect");
        let closed = tokio::time::timeout(long, fresh.read(&mut buf))
            .await
            .expect("closed");
        assert!(matches!(closed, Ok(0) | Err(_)));
        assert!(Stats::get(&p.stats().refused) >= 1);
    }

    #[tokio::test]
    async fn a_refuse_followed_at_once_by_forward_still_cuts_held_connections() {
        let p = FaultProxy::start(Upstream::Tcp(echo().await)).await;
        let mut held = tokio::net::TcpStream::connect(p.addr())
            .await
            .expect("connect");
        let long = Duration::from_secs(5);
        assert!(roundtrip(&mut held, b"x", long).await.is_some());
        p.set(Mode::Blackhole);
        p.set(Mode::Refuse);
        p.set(Mode::Forward);
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(long, held.read(&mut buf))
            .await
            .expect("cut");
        assert!(matches!(closed, Ok(0) | Err(_)));
        // New connections are relayed again.
        let mut fresh = tokio::net::TcpStream::connect(p.addr())
            .await
            .expect("connect");
        assert_eq!(
            roundtrip(&mut fresh, b"y", long).await.as_deref(),
            Some(&b"y"[..])
        );
    }
}
