//! The store rules the partition relies on, checked on the in-memory stores (the Redis ones are
//! checked by `redis_tests.rs` and used end to end by `job/tests/delivery.rs`).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::memory::{MemoryLeases, MemoryStreams};
use super::{Leases, PartitionStreams};

fn job(id: u8) -> Result<Vec<u8>, String> {
    Ok(vec![id])
}

#[tokio::test(start_paused = true)]
async fn reads_come_in_id_order_and_entries_stay_pending_until_acked() {
    let streams = MemoryStreams::new();
    let ids: Vec<String> = (0..3).map(|i| streams.append_raw(7, job(i))).collect();
    let mut s = streams.open(7, "me");
    s.ensure_group().await.unwrap();
    let read = s.read_new(2, Duration::from_millis(10)).await.unwrap();
    assert_eq!(
        read.iter().map(|e| &e.id).collect::<Vec<_>>(),
        [&ids[0], &ids[1]]
    );
    assert_eq!(read[1].job, job(1));
    let next = s.read_new(10, Duration::from_millis(10)).await.unwrap();
    assert_eq!(
        next.len(),
        1,
        "a read never returns what the group already got"
    );
    assert_eq!(streams.pending(7).len(), 3);
    // Nothing new: the read waits out its block and returns empty.
    assert!(
        s.read_new(10, Duration::from_millis(10))
            .await
            .unwrap()
            .is_empty()
    );

    let left = s.ack_trim(&ids[..1], Some(&ids[2])).await.unwrap();
    // The trim stops at the oldest entry still pending (ids[1]), not at ids[2].
    assert_eq!(left.pending, 2);
    assert_eq!(left.oldest_pending.as_deref(), Some(ids[1].as_str()));
    assert_eq!(left.len, 2);
    assert_eq!(streams.ids(7), ids[1..].to_vec());
}

#[tokio::test(start_paused = true)]
async fn claims_take_over_pending_entries_in_id_order_page_by_page() {
    let streams = MemoryStreams::new();
    let ids: Vec<String> = (0..3).map(|i| streams.append_raw(1, job(i))).collect();
    assert_eq!(streams.read_as(1, "dead", 3), ids);
    let mut s = streams.open(1, "me");
    s.ensure_group().await.unwrap();
    let page = s.claim_pending("0-0", 2).await.unwrap();
    assert_eq!(page.claimed.len(), 2);
    assert_eq!(page.next.as_deref(), Some(ids[2].as_str()));
    let last = s.claim_pending(&ids[2], 2).await.unwrap();
    assert_eq!(last.claimed[0].id, ids[2]);
    assert_eq!(last.next, None);
    assert!(streams.pending(1).iter().all(|(_, c)| c == "me"));
    assert!(!s.has_stale_pending(Duration::from_secs(1)).await.unwrap());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(s.has_stale_pending(Duration::from_secs(1)).await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn only_the_holder_renews_or_releases_and_leases_expire_on_tokios_clock() {
    let leases = MemoryLeases::new();
    assert!(leases.acquire(3, "a", 1000).await.unwrap());
    assert!(!leases.acquire(3, "b", 1000).await.unwrap());
    assert!(!leases.renew(3, "b", 1000).await.unwrap());
    assert!(!leases.release(3, "b").await.unwrap());
    tokio::time::advance(Duration::from_millis(900)).await;
    assert!(leases.renew(3, "a", 1000).await.unwrap());
    tokio::time::advance(Duration::from_millis(900)).await;
    assert_eq!(
        leases.holder(3).as_deref(),
        Some("a"),
        "renewed from 900 ms"
    );
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(leases.holder(3), None, "expired");
    assert!(!leases.renew(3, "a", 1000).await.unwrap());
    assert!(leases.acquire(3, "b", 1000).await.unwrap());
    assert!(leases.release(3, "b").await.unwrap());

    assert_eq!(leases.heartbeat("a", 1_000, 500).await.unwrap(), 1);
    assert_eq!(leases.heartbeat("b", 1_400, 500).await.unwrap(), 2);
    assert_eq!(
        leases.heartbeat("b", 1_600, 500).await.unwrap(),
        1,
        "a expired at 1500"
    );
    leases.leave("b").await.unwrap();
    assert!(leases.workers().is_empty());
}
