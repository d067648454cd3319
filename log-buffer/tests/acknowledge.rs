//! How the offloader keeps what it read until it is delivered: one range
//! per read in the group's in-flight hash (no pending list), claimed when
//! its consumer stops, and a trim of the stream's head bounded by every
//! group's ranges, pending entries and undelivered entries on the node.

use std::collections::BTreeMap;
use std::time::Duration;

use redis_failover::FailoverClient;

mod common;

use common::*;

const STREAM: &str = "tenant:{acme}:audit";
const IN_FLIGHT: &str = "tenant:{acme}:audit:in-flight:log-offloader";
const GROUP: &str = "log-offloader";
const RANGES: &str = include_str!("../src/offloader/ranges.lua");
const STAGED: &str = include_str!("../src/offloader/staged.lua");

/// The stream's ids, in order.
async fn ids(client: &FailoverClient) -> Vec<String> {
    let left: redis::streams::StreamRangeReply = client
        .query(redis::cmd("XRANGE").arg(STREAM).arg("-").arg("+"))
        .await
        .unwrap();
    left.ids.into_iter().map(|e| e.id).collect()
}

/// The offloader's ranges in flight: first id, then the rest of each.
async fn in_flight(client: &FailoverClient) -> BTreeMap<String, String> {
    client
        .query(redis::cmd("HGETALL").arg(IN_FLIGHT))
        .await
        .unwrap()
}

/// Appends acme's audit entries stamped `base + i` for each `i` of
/// `stamps`.
async fn append(client: &FailoverClient, base: u64, stamps: std::ops::Range<u64>) {
    append_for(client, "acme", base, stamps).await;
}

/// Stages acme's audit records stamped `base + i` for each `i` of
/// `stamps` on the stream's staging list.
async fn stage(client: &FailoverClient, base: u64, stamps: std::ops::Range<u64>) {
    for i in stamps {
        staged_audit_entry(client, "acme", base + i, "update_key").await;
    }
}

/// Appends `tenant`'s audit entries stamped `base + i` for each `i` of
/// `stamps`.
async fn append_for(
    client: &FailoverClient,
    tenant: &str,
    base: u64,
    stamps: std::ops::Range<u64>,
) {
    for i in stamps {
        audit_entry(client, tenant, base + i, "update_key").await;
    }
}

/// Waits until every entry is trimmed, then checks no range is left in
/// flight.
async fn drained(client: &FailoverClient) {
    eventually("the stream emptied", || async {
        ids(client).await.is_empty()
    })
    .await;
    assert!(in_flight(client).await.is_empty());
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

/// The ids of the next `count` entries `consumer` of `group` reads with a
/// pending list, as a user's own reader (or an older offloader) does.
async fn read_pending(
    client: &FailoverClient,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<String> {
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

/// The ids of the next `count` entries `consumer` reads as the offloader
/// reads them: one range in flight, recorded in the read's transaction.
async fn read_range(client: &FailoverClient, consumer: &str, count: usize) -> Vec<String> {
    let script = |source: String| {
        let mut command = redis::cmd("EVAL");
        command
            .arg(source)
            .arg(3)
            .arg(STREAM)
            .arg(IN_FLIGHT)
            .arg(log_buffer::staging_list(STREAM))
            .arg(GROUP)
            .arg(consumer);
        command
    };
    let mark = include_str!("../src/offloader/mark.lua");
    let record = include_str!("../src/offloader/record.lua");
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("NOACK")
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">");
    let mut transaction = redis::pipe();
    transaction
        .atomic()
        .add_command(script(format!("{RANGES}{STAGED}{mark}")))
        .ignore()
        .add_command(read)
        .add_command(script(format!("{RANGES}{record}")))
        .ignore();
    let (read,): (redis::streams::StreamReadReply,) =
        client.query_pipeline(&transaction).await.unwrap();
    read.keys[0].ids.iter().map(|e| e.id.clone()).collect()
}

/// The offloader's acknowledgement of the range `first`..=`last` that
/// `consumer` read.
async fn acknowledge(client: &FailoverClient, first: &str, last: &str, consumer: &str) {
    let script = format!("{RANGES}{}", include_str!("../src/offloader/ack.lua"));
    let _: () = client
        .query(
            redis::cmd("EVAL")
                .arg(script)
                .arg(2)
                .arg(STREAM)
                .arg(IN_FLIGHT)
                .arg(GROUP)
                .arg(first)
                .arg(last)
                .arg(consumer),
        )
        .await
        .unwrap();
}

/// A range held by a stopped consumer keeps the stream's head, and what
/// was delivered after it, until it is claimed; then the trim takes all.
#[tokio::test]
async fn a_range_in_flight_holds_the_head_until_it_is_claimed() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let base = now_ns();
    append(&client, base, 0..10).await;
    create_group(&client, GROUP).await;
    // Another instance reads the first 3 entries and stops.
    let held = read_range(&client, "stopped", 3).await;
    let all = ids(&client).await;

    let first = offloader(&client, &receiver)
        .claim_idle(Duration::from_secs(3600))
        .start()
        .unwrap();
    receiver.wait_for_lines("acme", 7).await;
    eventually("the 7 delivered entries' range acknowledged", || async {
        in_flight(&client).await.len() == 1
    })
    .await;
    let ranges = in_flight(&client).await;
    assert!(ranges[&held[0]].starts_with(&format!("{} 1 ", held[2])));
    assert!(ranges[&held[0]].ends_with(" stopped"));
    assert_eq!(ids(&client).await, all);
    first.shutdown(Duration::from_secs(5)).await;

    let claimer = offloader(&client, &receiver)
        .claim_idle(Duration::from_millis(1))
        .start()
        .unwrap();
    eventually("the claimed entries delivered", || async {
        let stamps: Vec<u64> = receiver.lines("acme").iter().map(|l| l.0).collect();
        (0..3).all(|i| stamps.contains(&(base + i)))
    })
    .await;
    drained(&client).await;
    claimer.shutdown(Duration::from_secs(5)).await;
}

/// A consumer restarted under its name reads its own ranges again first,
/// without waiting for them to go idle.
#[tokio::test]
async fn a_restarted_consumer_reads_its_own_range_first() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let base = now_ns();
    append(&client, base, 0..5).await;
    create_group(&client, GROUP).await;
    read_range(&client, "pod-1", 3).await;
    let restarted = offloader(&client, &receiver)
        .consumer("pod-1")
        .claim_idle(Duration::from_secs(3600))
        .start()
        .unwrap();
    receiver.wait_for_lines("acme", 5).await;
    drained(&client).await;
    restarted.shutdown(Duration::from_secs(5)).await;
}

/// A node whose group saw fewer reads than were acknowledged (a replica
/// promoted before the master's last reads reached it) keeps the entries
/// it never saw delivered; a node without the group keeps everything.
#[tokio::test]
async fn the_trim_stops_at_what_the_node_saw_delivered() {
    let (_topology, client) = start(0).await;
    append(&client, now_ns(), 0..6).await;
    let all = ids(&client).await;
    acknowledge(&client, &all[0], &all[3], "offloader").await;
    assert_eq!(ids(&client).await, all, "no group");

    create_group(&client, GROUP).await;
    acknowledge(&client, &all[0], &all[3], "offloader").await;
    assert_eq!(ids(&client).await, all, "nothing read");

    let read = read_range(&client, "offloader", 4).await;
    assert_eq!(read, all[..4]);
    // Not the range as this consumer read it: it stays.
    acknowledge(&client, &read[0], &read[2], "offloader").await;
    acknowledge(&client, &read[0], &read[3], "another").await;
    assert_eq!(ids(&client).await, all);
    acknowledge(&client, &read[0], &read[3], "offloader").await;
    assert_eq!(ids(&client).await, all[4..]);
    assert!(in_flight(&client).await.is_empty());
}

/// Another group reading the stream with a pending list keeps what it
/// has not acknowledged, then what it has not read.
#[tokio::test]
async fn entries_another_group_still_needs_stay() {
    let (_topology, client) = start(0).await;
    append(&client, now_ns(), 0..5).await;
    create_group(&client, GROUP).await;
    create_group(&client, "billing").await;
    let all = read_range(&client, "offloader", 5).await;
    let billed = read_pending(&client, "billing", "job", 2).await;
    acknowledge(&client, &all[0], &all[4], "offloader").await;
    assert_eq!(ids(&client).await, all);

    let _: u64 = client
        .query(redis::cmd("XACK").arg(STREAM).arg("billing").arg(&billed))
        .await
        .unwrap();
    acknowledge(&client, &all[0], &all[4], "offloader").await;
    assert_eq!(ids(&client).await, all[2..]);
}

/// Entries an older offloader left in the group's pending list become a
/// range that is claimed, delivered and trimmed like any other.
#[tokio::test]
async fn entries_pending_from_an_older_offloader_are_claimed() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let base = now_ns();
    append(&client, base, 0..6).await;
    create_group(&client, GROUP).await;
    read_pending(&client, GROUP, "older", 4).await;
    let offloader = offloader(&client, &receiver)
        .claim_idle(Duration::from_millis(1))
        .start()
        .unwrap();
    receiver.wait_for_lines("acme", 6).await;
    drained(&client).await;
    let pending: (u64, redis::Value, redis::Value, redis::Value) = client
        .query(redis::cmd("XPENDING").arg(STREAM).arg(GROUP))
        .await
        .unwrap();
    assert_eq!(pending.0, 0);
    offloader.shutdown(Duration::from_secs(5)).await;
}

/// A node without the group (a replica promoted before the group's
/// creation reached it): the read fails with `NOGROUP` and records no
/// range, the offloader creates the group again, and nothing is lost.
#[tokio::test]
async fn a_group_missing_on_the_node_is_created_again() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let base = now_ns();
    audit_entry(&client, "acme", base, "update_key").await;
    let offloader = offloader(&client, &receiver).start().unwrap();
    receiver.wait_for_lines("acme", 1).await;

    let _: u64 = client
        .query(redis::cmd("XGROUP").arg("DESTROY").arg(STREAM).arg(GROUP))
        .await
        .unwrap();
    append(&client, base, 1..4).await;
    receiver.wait_for_lines("acme", 4).await;
    drained(&client).await;
    offloader.shutdown(Duration::from_secs(5)).await;
}

/// The lines on the stream's staging list.
async fn staged(client: &FailoverClient) -> u64 {
    client
        .query(redis::cmd("LLEN").arg(log_buffer::staging_list(STREAM)))
        .await
        .unwrap()
}

/// The read's transaction moves the staged lines into entries of up to
/// 64, oldest first, before it reads: the read takes them, and the list
/// is gone.
#[tokio::test]
async fn a_read_folds_staged_lines_into_entries_of_up_to_64() {
    let (_topology, client) = start(0).await;
    let base = now_ns();
    append(&client, base, 0..1).await;
    stage(&client, base, 1..71).await;
    create_group(&client, GROUP).await;
    let read = read_range(&client, "c1", 100).await;
    assert_eq!(read, ids(&client).await, "the read took every entry");
    let entries: Vec<(String, BTreeMap<String, String>)> = client
        .query(redis::cmd("XRANGE").arg(STREAM).arg("-").arg("+"))
        .await
        .unwrap();
    let lines: Vec<Vec<u64>> = entries
        .iter()
        .map(|(_, fields)| {
            fields["records"]
                .lines()
                .map(|line| json_ts(line) - base)
                .collect()
        })
        .collect();
    assert_eq!(
        lines,
        [vec![0], (1..65).collect(), (65..71).collect::<Vec<_>>()]
    );
    assert_eq!(staged(&client).await, 0);
}

/// A record line's `ts`.
fn json_ts(line: &str) -> u64 {
    let fields: BTreeMap<String, String> = serde_json::from_str(line).unwrap();
    fields["ts"].parse().unwrap()
}

/// Staged lines become entries of up to 64 records in the read's
/// transaction: each is shipped once, in order, and trimmed with the rest.
#[tokio::test]
async fn staged_lines_are_folded_into_entries_and_shipped() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let base = now_ns();
    append(&client, base, 0..1).await;
    stage(&client, base, 1..71).await;
    assert_eq!(staged(&client).await, 70);
    let offloader = offloader(&client, &receiver).start().unwrap();
    receiver.wait_for_lines("acme", 71).await;
    let stamps: Vec<u64> = receiver.lines("acme").iter().map(|(ts, ..)| *ts).collect();
    assert_eq!(stamps, (0..71).map(|i| base + i).collect::<Vec<_>>());
    drained(&client).await;
    assert_eq!(staged(&client).await, 0);
    // Staged later, while the stream is read: folded by a later read.
    staged_audit_entry(&client, "acme", base + 71, "delete_key").await;
    receiver.wait_for_lines("acme", 72).await;
    drained(&client).await;
    assert_eq!(staged(&client).await, 0);
    assert_eq!(receiver.lines("acme").len(), 72, "each line shipped once");
    offloader.shutdown(Duration::from_secs(5)).await;
}

/// Over `maxmemory`, where Redis refuses writes that add data, the
/// offloader still reads (staged lines too), ships and trims: nothing
/// read is left outside a range, and the stream frees its memory.
#[tokio::test]
async fn a_full_redis_is_still_drained() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let base = now_ns();
    append(&client, base, 0..20).await;
    stage(&client, base, 20..23).await;
    create_group(&client, GROUP).await;
    let () = client
        .query(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1"))
        .await
        .unwrap();
    let offloader = offloader(&client, &receiver).batch_size(5).start().unwrap();
    receiver.wait_for_lines("acme", 23).await;
    drained(&client).await;
    assert_eq!(staged(&client).await, 0);
    offloader.shutdown(Duration::from_secs(5)).await;
}

/// A consumer whose pushes are retried keeps its range from going idle:
/// another consumer claims nothing while the sink is down, so nothing is
/// counted as delivered again, up to poison.
#[tokio::test]
async fn a_range_whose_pushes_are_retried_is_not_claimed() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    receiver.set_mode(None, Mode::Status(500));
    let base = now_ns();
    append(&client, base, 0..10).await;
    // Claims after 1 s of no retry; the backoff retries every 200 ms at
    // most; a second claim of the range would make it poison.
    let builder = || {
        offloader(&client, &receiver)
            .claim_idle(Duration::from_secs(1))
            .max_deliveries(1)
    };
    let (first, second) = (builder().start().unwrap(), builder().start().unwrap());
    eventually("pushes retried for 3 claim intervals", || async {
        let retried =
            |o: &log_buffer::Offloader| o.metrics().get("acme").map_or(0, |m| m.retried_pushes);
        retried(&first) + retried(&second) >= 30
    })
    .await;
    receiver.set_mode(None, Mode::Accept);
    receiver.wait_for_lines("acme", 10).await;
    drained(&client).await;
    let dead: u64 = client
        .query(redis::cmd("XLEN").arg(format!("{STREAM}:dead-letter")))
        .await
        .unwrap();
    assert_eq!(dead, 0);
    first.shutdown(Duration::from_secs(5)).await;
    second.shutdown(Duration::from_secs(5)).await;
}

/// One stream that cannot be read (here its in-flight hash is a string,
/// so each claim of it fails) holds up no other tenant's, and loses
/// nothing of its own: once the key is fixed, its entries go out too.
#[tokio::test]
async fn a_stream_that_fails_to_read_holds_up_no_other() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let () = client
        .query(redis::cmd("SET").arg(IN_FLIGHT).arg("not a hash"))
        .await
        .unwrap();
    let base = now_ns();
    append(&client, base, 0..3).await;
    append_for(&client, "beta", base, 0..3).await;
    let offloader = offloader(&client, &receiver).start().unwrap();
    receiver.wait_for_lines("beta", 3).await;
    assert_eq!(ids(&client).await.len(), 3, "acme's entries wait");
    assert!(receiver.lines("acme").is_empty());

    let _: u64 = client
        .query(redis::cmd("DEL").arg(IN_FLIGHT))
        .await
        .unwrap();
    receiver.wait_for_lines("acme", 3).await;
    drained(&client).await;
    offloader.shutdown(Duration::from_secs(5)).await;
}

/// An audit stream, one record per entry, is read 1000 entries at a time
/// by default (a log stream 100, as each entry packs many records): 250
/// entries go out in one read and one push.
#[tokio::test]
async fn audit_entries_are_read_a_thousand_at_a_time() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    append(&client, now_ns(), 0..250).await;
    let offloader = offloader(&client, &receiver).start().unwrap();
    receiver.wait_for_lines("acme", 250).await;
    assert_eq!(receiver.requests("acme"), 1);
    drained(&client).await;
    offloader.shutdown(Duration::from_secs(5)).await;
}

/// A stream replaced by a key of another type fails its own claims and
/// reads, not those of the streams read with it.
#[tokio::test]
async fn a_stream_replaced_by_another_type_holds_up_no_other() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let base = now_ns();
    append(&client, base, 0..2).await;
    audit_entry(&client, "beta", base, "update_key").await;
    let offloader = offloader(&client, &receiver).start().unwrap();
    receiver.wait_for_lines("acme", 2).await;
    receiver.wait_for_lines("beta", 1).await;

    let () = client
        .query(redis::cmd("SET").arg(STREAM).arg("not a stream"))
        .await
        .unwrap();
    append_for(&client, "beta", base, 1..4).await;
    receiver.wait_for_lines("beta", 4).await;
    offloader.shutdown(Duration::from_secs(5)).await;
}
