//! How the offloader takes delivered entries out of a stream: a trim of
//! its head, bounded by every group's pending and undelivered entries on
//! the node, else `XDEL`.

use std::time::Duration;

use redis_failover::FailoverClient;

mod common;

use common::*;

const STREAM: &str = "tenant:{acme}:audit";
const GROUP: &str = "log-offloader";

/// The stream's ids, in order.
async fn ids(client: &FailoverClient) -> Vec<String> {
    let left: redis::streams::StreamRangeReply = client
        .query(redis::cmd("XRANGE").arg(STREAM).arg("-").arg("+"))
        .await
        .unwrap();
    left.ids.into_iter().map(|e| e.id).collect()
}

/// `group` created on the stream from its start.
async fn create_group(client: &FailoverClient, group: &str) {
    let _: () = client
        .query(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(STREAM)
                .arg(group)
                .arg("0"),
        )
        .await
        .unwrap();
}

/// The ids of the next `count` entries `consumer` of `group` reads.
async fn read(client: &FailoverClient, group: &str, consumer: &str, count: usize) -> Vec<String> {
    let read: redis::streams::StreamReadReply = client
        .query(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(group)
                .arg(consumer)
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(STREAM)
                .arg(">"),
        )
        .await
        .unwrap();
    read.keys[0].ids.iter().map(|e| e.id.clone()).collect()
}

/// `XACK` of `ids` by `group`, nothing else.
async fn ack(client: &FailoverClient, group: &str, ids: &[String]) {
    let _: u64 = client
        .query(redis::cmd("XACK").arg(STREAM).arg(group).arg(ids))
        .await
        .unwrap();
}

/// The offloader's acknowledgement script, run as it runs it: `ids`
/// acknowledged, the stream trimmed below the id after `newest` at most.
async fn acknowledge(client: &FailoverClient, newest: &str, ids: &[String]) {
    const ACK: &str = include_str!("../src/offloader/ack.lua");
    let (ms, seq) = newest.split_once('-').unwrap();
    let trim_below = format!("{ms}-{}", seq.parse::<u64>().unwrap() + 1);
    let _: () = client
        .query(
            redis::cmd("EVAL")
                .arg(ACK)
                .arg(1)
                .arg(STREAM)
                .arg(GROUP)
                .arg(trim_below)
                .arg(ids),
        )
        .await
        .unwrap();
}

/// Entries acknowledged after an older one still pending under another
/// consumer leave the stream (`XDEL`), the older stays until it is
/// claimed, and then the trim of the head takes every entry up to the
/// claimed ones, also one acknowledged without being deleted.
#[tokio::test]
async fn entries_pending_under_another_consumer_stay_while_later_ones_leave() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let base = now_ns();
    for i in 0..10 {
        audit_entry(&client, "acme", base + i, "update_key").await;
    }
    create_group(&client, GROUP).await;
    // Another instance reads the first 3 entries and stops.
    let held = read(&client, GROUP, "stopped", 3).await;

    let first = offloader(&client, &receiver)
        .claim_idle(Duration::from_secs(3600))
        .start()
        .unwrap();
    receiver.wait_for_lines("acme", 7).await;
    eventually("the 7 delivered entries deleted", || async {
        ids(&client).await.len() == 3
    })
    .await;
    assert_eq!(ids(&client).await, held);
    first.shutdown(Duration::from_secs(5)).await;

    // The middle one is acknowledged by hand and stays in the stream; the
    // other two are claimed, delivered, and the trim takes all three.
    ack(&client, GROUP, &held[1..2]).await;
    let claimer = offloader(&client, &receiver)
        .claim_idle(Duration::from_millis(1))
        .start()
        .unwrap();
    eventually("the claimed entries delivered", || async {
        let stamps: Vec<u64> = receiver.lines("acme").iter().map(|l| l.0).collect();
        stamps.contains(&base) && stamps.contains(&(base + 2))
    })
    .await;
    eventually("the stream emptied", || async {
        ids(&client).await.is_empty()
    })
    .await;
    claimer.shutdown(Duration::from_secs(5)).await;
}

/// A node whose group saw fewer deliveries than were acknowledged (a
/// replica promoted before the master's last deliveries reached it) keeps
/// the entries it never saw delivered, to be read again: only the
/// acknowledged ones leave.
#[tokio::test]
async fn the_trim_stops_at_what_the_node_saw_delivered() {
    let (_topology, client) = start(0).await;
    for i in 0..6 {
        audit_entry(&client, "acme", now_ns() + i, "update_key").await;
    }
    create_group(&client, GROUP).await;
    let all = ids(&client).await;
    acknowledge(&client, &all[5], &all[4..]).await;
    assert_eq!(ids(&client).await, all[..4]);
}

/// Another group reading the stream keeps what it has not acknowledged.
#[tokio::test]
async fn entries_another_group_still_needs_stay() {
    let (_topology, client) = start(0).await;
    for i in 0..5 {
        audit_entry(&client, "acme", now_ns() + i, "update_key").await;
    }
    create_group(&client, GROUP).await;
    create_group(&client, "billing").await;
    let all = read(&client, GROUP, "offloader", 5).await;
    let billed = read(&client, "billing", "job", 2).await;
    acknowledge(&client, &all[4], &all).await;
    assert_eq!(ids(&client).await, all);

    ack(&client, "billing", &billed).await;
    acknowledge(&client, &all[4], &[]).await;
    assert_eq!(ids(&client).await, all[2..]);
}
