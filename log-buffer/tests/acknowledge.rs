//! How the offloader takes delivered entries out of a stream: a trim of
//! its head, bounded by what is still pending and by what the node's
//! group saw delivered.

use std::time::Duration;

mod common;

use common::*;

/// Delivered entries leave the stream by a trim of its head, unless an
/// older one is still pending under another consumer: that one stays,
/// with nothing else, until it is claimed.
#[tokio::test]
async fn entries_pending_under_another_consumer_stay_while_later_ones_leave() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let stream = "tenant:{acme}:audit";
    let base = now_ns();
    for i in 0..10 {
        audit_entry(&client, "acme", base + i, "update_key").await;
    }
    let _: () = client
        .query(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg("log-offloader")
                .arg("0"),
        )
        .await
        .unwrap();
    // Another instance reads the first 3 entries and stops.
    let held: redis::streams::StreamReadReply = client
        .query(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("log-offloader")
                .arg("stopped")
                .arg("COUNT")
                .arg(3)
                .arg("STREAMS")
                .arg(stream)
                .arg(">"),
        )
        .await
        .unwrap();
    let held: Vec<String> = held.keys[0].ids.iter().map(|e| e.id.clone()).collect();
    let ids = || async {
        let left: redis::streams::StreamRangeReply = client
            .query(redis::cmd("XRANGE").arg(stream).arg("-").arg("+"))
            .await
            .unwrap();
        left.ids.into_iter().map(|e| e.id).collect::<Vec<_>>()
    };

    let first = offloader(&client, &receiver)
        .claim_idle(Duration::from_secs(3600))
        .start()
        .unwrap();
    receiver.wait_for_lines("acme", 7).await;
    eventually("the 7 delivered entries deleted", || async {
        ids().await.len() == 3
    })
    .await;
    assert_eq!(ids().await, held);
    first.shutdown(Duration::from_secs(5)).await;

    // Claimed and delivered, they leave too, by the trim of the head.
    let claimer = offloader(&client, &receiver)
        .claim_idle(Duration::from_millis(1))
        .start()
        .unwrap();
    receiver.wait_for_lines("acme", 10).await;
    eventually("the stream emptied", || async { ids().await.is_empty() }).await;
    claimer.shutdown(Duration::from_secs(5)).await;
}

/// The offloader's acknowledgement script, run as it runs it.
const ACK: &str = include_str!("../src/offloader/ack.lua");

/// A node whose group saw fewer deliveries than were acknowledged (a
/// replica promoted before the master's last deliveries reached it) keeps
/// the entries it never saw delivered: they are read again, not lost.
#[tokio::test]
async fn the_trim_stops_at_what_the_node_saw_delivered() {
    let (_topology, client) = start(0).await;
    let stream = "tenant:{acme}:audit";
    for i in 0..5 {
        audit_entry(&client, "acme", now_ns() + i, "update_key").await;
    }
    let group = |args: &[&str]| {
        let mut command = redis::cmd("XGROUP");
        command
            .arg(args[0])
            .arg(stream)
            .arg("log-offloader")
            .arg(&args[1..]);
        command
    };
    let _: () = client.query(&group(&["CREATE", "0"])).await.unwrap();
    let read: redis::streams::StreamReadReply = client
        .query(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("log-offloader")
                .arg("a")
                .arg("STREAMS")
                .arg(stream)
                .arg(">"),
        )
        .await
        .unwrap();
    let ids: Vec<String> = read.keys[0].ids.iter().map(|e| e.id.clone()).collect();
    // This node's group knows of the first two deliveries only.
    let _: () = client.query(&group(&["SETID", &ids[1]])).await.unwrap();
    let (ms, seq) = ids[4].split_once('-').unwrap();
    let trim_below = format!("{ms}-{}", seq.parse::<u64>().unwrap() + 1);
    let _: () = client
        .query(
            redis::cmd("EVAL")
                .arg(ACK)
                .arg(1)
                .arg(stream)
                .arg("log-offloader")
                .arg(trim_below)
                .arg(&ids),
        )
        .await
        .unwrap();
    let left: redis::streams::StreamRangeReply = client
        .query(redis::cmd("XRANGE").arg(stream).arg("-").arg("+"))
        .await
        .unwrap();
    let left: Vec<String> = left.ids.into_iter().map(|e| e.id).collect();
    assert_eq!(left, ids[2..]);
}
