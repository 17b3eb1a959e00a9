//! How the partition reads, under a paused clock: when it replays pending entries and checks for
//! stale ones (counted through [`Faults`](super::tests_faults::Faults)), what it does with pending
//! entries trimmed before delivery, and how long it lingers to batch room pushes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use super::tests::{Call, P, WAIT, World, config, room_push, seqs, world};
use super::tests_faults::Cmd;

/// The stale-entry check (an `XPENDING`) is what finds a read whose reply was lost without an
/// error; `stream.pending_check_ms` bounds what it costs an idle partition.
#[tokio::test(start_paused = true)]
async fn an_idle_partition_checks_for_stale_entries_once_per_pending_check_ms() {
    let mut cfg = config();
    cfg.stream.pending_check_ms = 1000;
    let w = world(cfg).await;
    let started = Instant::now();
    let running = w.start_partition();

    // Sampled half-way between checks, clear of the reads' millisecond rounding. None right
    // after the start-up replay (it left nothing pending), none on every read.
    for (periods, checks) in [(0.5, 0), (1.5, 1), (3.5, 3)] {
        sleep_until(started + Duration::from_secs_f64(periods)).await;
        assert_eq!(
            w.faults.calls(Cmd::Stale),
            checks,
            "after {periods} periods"
        );
    }
    running.stop().await;
}

/// Only an acknowledgement that leaves entries pending (read without our seeing the reply) sends
/// the partition back to replaying; after a clean one, a replay would be a wasted `XAUTOCLAIM`
/// sweep per batch.
#[tokio::test(start_paused = true)]
async fn a_batch_that_leaves_nothing_pending_is_not_followed_by_a_replay() {
    let mut w = world(config()).await;
    let running = w.start_partition();
    for msg in ["a", "b"] {
        let id = w.append(msg);
        w.confirm_next(&[id], msg).await;
        w.all_acked().await;
    }
    running.stop().await;
    assert_eq!(w.faults.calls(Cmd::Claim), 1, "the start-up replay only");
}

/// `dropped_total{reason="trimmed"}` is how an operator learns pushes were lost this way.
#[tokio::test(start_paused = true)]
async fn pending_entries_trimmed_before_delivery_are_counted_lost_and_the_rest_delivered() {
    let mut w = world(config()).await;
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|m| w.append(m)).collect();
    // A dead owner read a and b; a was then trimmed away before anyone delivered it.
    assert_eq!(w.streams.read_as(P, "dead", 2), ids[..2]);
    w.streams.trim_below(P, &ids[1]);
    let running = w.start_partition();

    w.confirm_next(&ids[1..2], "the surviving pending entry")
        .await;
    w.confirm_next(&ids[2..], "then the newer one").await;
    w.all_acked().await;
    assert_eq!(w.ctx.metrics.dropped_trimmed.get(), 1);
    running.stop().await;
}

/// A world whose room batches may linger for up to 100 ms, of up to `room_max` messages per
/// room and `batch_max` entries; the index of room `r` lists `c1`.
async fn lingering(batch_max: usize, room_max: usize) -> World {
    let mut cfg = config();
    cfg.room_batch.linger_ms = 100;
    cfg.room_batch.max = room_max;
    cfg.stream.batch_max = batch_max;
    let w = world(cfg).await;
    w.directory.join_room("live://r", "c1");
    w
}

/// Waits until `n` entries were read (and are pending).
async fn read(w: &World, n: usize) {
    let read = w.streams.wait_until(|s| s.pending(P).len() == n);
    tokio::time::timeout(WAIT, read).await.expect("read");
}

/// The first call, which must carry `expected` and go out without lingering.
async fn first_call_at_once(w: &mut World, expected: &[String]) -> Call {
    let started = Instant::now();
    let call = w.next_call().await;
    assert_eq!(call.seqs(), seqs(expected));
    assert_eq!(call.at, started, "sent without waiting for the linger");
    call
}

/// Lingering only helps room pushes (one RPC per comet, one frame per member); session pushes
/// would just be delayed.
#[tokio::test(start_paused = true)]
async fn a_batch_without_room_pushes_does_not_linger() {
    let mut w = lingering(8, 64).await;
    let id = w.append("a");
    let running = w.start_partition();
    first_call_at_once(&mut w, &[id]).await.confirm();
    w.all_acked().await;
    running.stop().await;
}

/// Nothing more could join a batch of `stream.batch_max` entries, so waiting would only delay it.
#[tokio::test(start_paused = true)]
async fn a_full_batch_of_room_pushes_does_not_linger() {
    let mut w = lingering(2, 64).await;
    let ids: Vec<String> = ["a", "b"]
        .iter()
        .map(|m| w.streams.append(P, &room_push(m, "r")))
        .collect();
    let running = w.start_partition();
    first_call_at_once(&mut w, &ids).await.confirm();
    w.all_acked().await;
    running.stop().await;
}

/// A room with `room_batch.max` messages is a full room batch: it goes out at once, and later
/// messages start the next batch.
#[tokio::test(start_paused = true)]
async fn lingering_ends_once_a_room_has_room_batch_max_messages() {
    let mut w = lingering(8, 2).await;
    let first = w.streams.append(P, &room_push("a", "r"));
    let running = w.start_partition();
    // Each appended only once the previous one was read, so each is a read of its own.
    read(&w, 1).await;
    let second = w.streams.append(P, &room_push("b", "r"));
    read(&w, 2).await;
    let third = w.streams.append(P, &room_push("c", "r"));

    let call = first_call_at_once(&mut w, &[first, second]).await;
    call.confirm();
    w.confirm_next(&[third], "the next batch").await;
    w.all_acked().await;
    running.stop().await;
}

/// Redis blocks a read for whole milliseconds (at least one), so a read begun with less than a
/// millisecond of linger left can come back after the deadline. Lingering ends there, with what
/// that read brought: it does not read again.
#[tokio::test(start_paused = true)]
async fn lingering_reads_nothing_more_once_its_deadline_passed() {
    let mut w = lingering(8, 64).await;
    let started = Instant::now();
    let mut ids = vec![w.streams.append(P, &room_push("a", "r"))];
    let running = w.start_partition();
    read(&w, 1).await;
    // Half a millisecond before the deadline: the read after this one blocks for a whole one.
    // (Moved by hand: no timer fires before a whole millisecond is reached.)
    let linger = w.ctx.cfg.room_linger();
    tokio::time::advance(linger - Duration::from_micros(500)).await;
    ids.push(w.streams.append(P, &room_push("b", "r")));
    read(&w, 2).await;
    // At the deadline, that read brings c.
    tokio::time::advance(Duration::from_micros(500)).await;
    assert_eq!(Instant::now(), started + linger);
    ids.push(w.streams.append(P, &room_push("c", "r")));
    read(&w, 3).await;
    let later = w.streams.append(P, &room_push("d", "r"));

    let call = w.next_call().await;
    assert_eq!(call.seqs(), seqs(&ids), "d was appended after the deadline");
    call.confirm();
    w.confirm_next(&[later], "the next batch").await;
    w.all_acked().await;
    running.stop().await;
}
