//! The buffer and the offloader against real Redis and a Loki-compatible
//! receiver: per-tenant delivery with labels and header, crashes, outages,
//! throttling, rejections, oversize batches, drops and shutdown.

use std::collections::BTreeMap;
use std::time::Duration;

use log_buffer::{Encoding, LogBuffer, Offloader, dead_letter_stream};
use tracing_subscriber::layer::SubscriberExt;

mod common;

use common::*;

fn json(line: &str) -> BTreeMap<String, String> {
    serde_json::from_str(line).unwrap()
}

#[tokio::test]
async fn lines_arrive_per_tenant_with_their_labels_in_every_encoding() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let buffer = LogBuffer::builder(client.clone()).start().unwrap();
    {
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(buffer.layer()));
        tracing::info!(
            tenant_id = "acme",
            user = "alice",
            count = 3,
            delta = -7,
            big = u64::MAX,
            fresh = true,
            "logged in"
        );
        tracing::warn!(tenant_id = "globex", "disk almost full");
        let span = tracing::info_span!(
            "request",
            tenant_id = "acme",
            request_id = "r-1",
            user = tracing::field::Empty
        );
        // Recorded later: the new value replaces the old, the empty one is filled.
        span.record("request_id", "r-2");
        span.record("user", "bob");
        span.in_scope(|| tracing::error!(status = 500, "handler failed"));
        tracing::info!("no tenant here");
        tracing::info!(tenant_id = "not a valid id!", "bad tenant");
    }
    let metrics = buffer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(metrics.queued, 5);
    assert_eq!(metrics.appended, 5);
    audit_entry(&client, "acme", now_ns(), "create_key").await;
    legacy_audit_entry(&client, "acme", now_ns(), "delete_key").await;

    let offloader = offloader(&client, &receiver).start().unwrap();
    receiver.wait_for_lines("acme", 4).await;
    receiver.wait_for_lines("globex", 1).await;
    receiver.wait_for_lines("system", 2).await;

    let acme = receiver.lines("acme");
    let by_message: BTreeMap<String, _> = acme
        .iter()
        .map(|(_, line, labels)| {
            let fields = json(line);
            let key = fields
                .get("message")
                .or(fields.get("action"))
                .unwrap()
                .clone();
            (key, (fields, labels.clone()))
        })
        .collect();
    let (login, labels) = &by_message["logged in"];
    assert_eq!(login["user"], "alice");
    assert_eq!(login["count"], "3");
    assert_eq!(login["delta"], "-7");
    assert_eq!(login["big"], u64::MAX.to_string());
    assert_eq!(login["fresh"], "true");
    assert_eq!(login["tenant_id"], "acme");
    assert_eq!(labels["job"], "log-buffer");
    assert_eq!(labels["tenant_id"], "acme");
    assert_eq!(labels["level"], "info");
    let (failed, labels) = &by_message["handler failed"];
    assert_eq!(failed["request_id"], "r-2", "span fields are in the line");
    assert_eq!(failed["user"], "bob");
    assert_eq!(failed["status"], "500");
    assert_eq!(labels["level"], "error");
    let (audit, labels) = &by_message["create_key"];
    assert_eq!(audit["actor"], "user:alice");
    assert_eq!(labels["job"], "audit_logs", "audit records keep their job");
    assert_eq!(labels["action"], "create_key");
    assert!(!labels.contains_key("level"));
    // A record of a field per name (written before they were packed)
    // ships as the same line would packed.
    let (legacy, labels) = &by_message["delete_key"];
    assert_eq!(labels["action"], "delete_key");
    let line = |action: &str| {
        acme.iter()
            .map(|(_, line, _)| line.clone())
            .find(|line| line.contains(action))
            .unwrap()
    };
    assert_eq!(
        line("delete_key").replace("delete_key", "create_key"),
        line("create_key")
    );
    assert_eq!(legacy["tenant"], "acme");
    for received in receiver.accepted() {
        assert_eq!(received.content_type, "application/x-protobuf");
    }
    let system = receiver.lines("system");
    let claimed: Vec<Option<String>> = system
        .iter()
        .map(|(_, line, _)| json(line).get("tenant_id").cloned())
        .collect();
    assert!(
        claimed.contains(&Some("not a valid id!".to_owned())),
        "{claimed:?}"
    );
    assert!(claimed.contains(&None));
    offloader.shutdown(Duration::from_secs(5)).await;

    // The JSON encodings deliver the same way.
    for encoding in [Encoding::Json, Encoding::JsonGzip] {
        let tenant = format!("{encoding:?}").to_lowercase();
        let receiver = Receiver::start().await;
        audit_entry(&client, &tenant, now_ns(), "delete_key").await;
        let offloader = Offloader::builder(client.clone(), sink(&receiver, encoding))
            .group(format!("group-{tenant}"))
            .poll_interval(Duration::from_millis(20))
            .discovery_interval(Duration::from_millis(200))
            .start()
            .unwrap();
        receiver.wait_for_lines(&tenant, 1).await;
        assert_eq!(receiver.accepted()[0].content_type, "application/json");
        offloader.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn each_source_ships_under_the_job_it_is_given() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let buffer = LogBuffer::builder(client.clone()).start().unwrap();
    {
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(buffer.layer()));
        tracing::info!(tenant_id = "acme", "an application line");
    }
    buffer.shutdown(Duration::from_secs(5)).await;
    audit_entry(&client, "acme", now_ns(), "create_key").await;

    let offloader = offloader(&client, &receiver)
        .job("kv-server")
        .source_job("audit", "kv-audit")
        .start()
        .unwrap();
    receiver.wait_for_lines("acme", 2).await;
    let jobs: BTreeMap<String, String> = receiver
        .lines("acme")
        .iter()
        .map(|(_, line, labels)| {
            let fields = json(line);
            let what = fields.get("message").or(fields.get("action")).unwrap();
            (what.clone(), labels["job"].clone())
        })
        .collect();
    assert_eq!(jobs["an application line"], "kv-server");
    assert_eq!(jobs["create_key"], "kv-audit");
    offloader.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_killed_offloader_loses_nothing() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let base = now_ns();
    for i in 0..50 {
        audit_entry(&client, "acme", base + i, "update_key").await;
    }
    // The first offloader reads everything, then hangs in its push and dies.
    receiver.set_mode(None, Mode::Hang);
    let first = offloader(&client, &receiver).start().unwrap();
    eventually("the first offloader's push", || async {
        receiver.requests("acme") > 0
    })
    .await;
    drop(first);

    receiver.set_mode(None, Mode::Accept);
    let second = offloader(&client, &receiver)
        .claim_idle(Duration::from_millis(300))
        .start()
        .unwrap();
    receiver.wait_for_lines("acme", 50).await;
    let stamps: Vec<u64> = receiver
        .lines("acme")
        .iter()
        .map(|(ts, _, _)| *ts)
        .collect();
    assert_eq!(stamps, (0..50).map(|i| base + i).collect::<Vec<_>>());
    eventually("the stream emptied", || async {
        client
            .query::<u64>(redis::cmd("XLEN").arg("tenant:{acme}:audit"))
            .await
            .unwrap()
            == 0
    })
    .await;
    second.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_throttled_tenant_does_not_hold_back_others_and_catches_up_in_order() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    receiver.set_mode(Some("acme"), Mode::Status(429));
    receiver.set_mode(Some("initech"), Mode::Refuse);
    let offloader = offloader(&client, &receiver)
        .batch_size(10)
        .start()
        .unwrap();
    let base = now_ns();
    for i in 0..30 {
        audit_entry(&client, "acme", base + i, "create_key").await;
        audit_entry(&client, "globex", base + i, "create_key").await;
        audit_entry(&client, "initech", base + i, "create_key").await;
    }
    receiver.wait_for_lines("globex", 30).await;
    assert!(receiver.lines("acme").is_empty());
    assert!(receiver.lines("initech").is_empty());
    eventually("acme retried", || async {
        offloader
            .metrics()
            .get("acme")
            .is_some_and(|m| m.retried_pushes >= 2)
    })
    .await;

    // Back: everything arrives, oldest first.
    receiver.set_mode(Some("acme"), Mode::Accept);
    receiver.set_mode(Some("initech"), Mode::Accept);
    for tenant in ["acme", "initech"] {
        receiver.wait_for_lines(tenant, 30).await;
        let stamps: Vec<u64> = receiver
            .lines(tenant)
            .iter()
            .map(|(ts, _, _)| *ts)
            .collect();
        assert_eq!(
            stamps,
            (0..30).map(|i| base + i).collect::<Vec<_>>(),
            "{tenant}"
        );
    }
    offloader.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_packed_entry_is_delivered_record_by_record_and_acknowledged_once_settled() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    let now = now_ns();
    let week = 7 * 24 * 3600 * 1_000_000_000u64;
    let lines = format!(
        "{{\"ts\":\"{now}\",\"level\":\"info\",\"message\":\"kept\"}}\n\
         not json\n\
         {{\"ts\":\"{}\",\"message\":\"stale\"}}\n\
         {{\"ts\":\"{}\",\"message\":\"kept too\"}}\n",
        now - week - 1_000_000_000,
        now + 1
    );
    let _: String = client
        .query(
            redis::cmd("XADD")
                .arg("tenant:{acme}:logs")
                .arg("*")
                .arg("records")
                .arg(lines),
        )
        .await
        .unwrap();
    let offloader = offloader(&client, &receiver).start().unwrap();
    receiver.wait_for_lines("acme", 2).await;
    let messages: Vec<String> = receiver
        .lines("acme")
        .into_iter()
        .map(|(_, line, _)| json(&line)["message"].clone())
        .collect();
    assert_eq!(messages, ["kept", "kept too"]);
    eventually("the entry acknowledged and deleted", || async {
        let len: u64 = client
            .query(redis::cmd("XLEN").arg("tenant:{acme}:logs"))
            .await
            .unwrap();
        len == 0
    })
    .await;
    let dead: Vec<(String, BTreeMap<String, String>)> = client
        .query(
            redis::cmd("XRANGE")
                .arg(dead_letter_stream("tenant:{acme}:logs"))
                .arg("-")
                .arg("+"),
        )
        .await
        .unwrap();
    let mut reasons: Vec<(&str, &str)> = dead
        .iter()
        .map(|(_, f)| {
            let what = f.get("line").or(f.get("message")).unwrap();
            (f["dead_letter_reason"].as_str(), what.as_str())
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons, [("bad_record", "not json"), ("too_old", "stale")]);
    offloader.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn only_refused_and_invalid_entries_are_dead_lettered() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    // Like Loki, the receiver stores the valid entries of a batch it answers 400.
    receiver.set_mode(Some("acme"), Mode::RejectLines("refused-doc"));
    let now = now_ns();
    for i in 0..7 {
        if i == 3 {
            let _: String = client
                .query(
                    redis::cmd("XADD")
                        .arg("tenant:{acme}:audit")
                        .arg("*")
                        .arg("ts")
                        .arg((now + i).to_string())
                        .arg("actor")
                        .arg("user:alice")
                        .arg("key")
                        .arg("refused-doc"),
                )
                .await
                .unwrap();
        } else {
            audit_entry(&client, "acme", now + i, "create_key").await;
        }
    }
    // Entries Loki would refuse: checked before sending.
    let week = 7 * 24 * 3600 * 1_000_000_000u64;
    audit_entry(&client, "globex", now - week - 1_000_000_000, "create_key").await;
    audit_entry(&client, "globex", now + 3600 * 1_000_000_000, "create_key").await;
    let _: String = client
        .query(
            redis::cmd("XADD")
                .arg("tenant:{globex}:audit")
                .arg("*")
                .arg("ts")
                .arg(now.to_string())
                .arg("key")
                .arg("x".repeat(300 * 1024)),
        )
        .await
        .unwrap();
    audit_entry(&client, "globex", now, "delete_key").await;
    let offloader = offloader(&client, &receiver).start().unwrap();

    let dead = |tenant: &'static str| {
        let client = client.clone();
        async move {
            let entries: Vec<(String, BTreeMap<String, String>)> = client
                .query(
                    redis::cmd("XRANGE")
                        .arg(dead_letter_stream(&format!("tenant:{{{tenant}}}:audit")))
                        .arg("-")
                        .arg("+"),
                )
                .await
                .unwrap();
            entries
                .into_iter()
                .map(|(_, fields)| fields)
                .collect::<Vec<_>>()
        }
    };
    eventually("acme's refused entry dead-lettered", || async {
        dead("acme").await.len() == 1
    })
    .await;
    let acme_dead = dead("acme").await;
    assert_eq!(acme_dead[0]["key"], "refused-doc", "only the refused entry");
    assert!(
        acme_dead
            .iter()
            .all(|e| e["dead_letter_reason"] == "rejected")
    );
    assert!(acme_dead[0]["dead_letter_detail"].contains("400"));
    assert_eq!(
        acme_dead[0]["actor"], "user:alice",
        "the entry is kept whole"
    );

    receiver.wait_for_lines("globex", 1).await;
    eventually("globex's invalid entries dead-lettered", || async {
        dead("globex").await.len() == 3
    })
    .await;
    let mut reasons: Vec<String> = dead("globex")
        .await
        .into_iter()
        .map(|e| e["dead_letter_reason"].clone())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["line_too_long", "too_far_in_future", "too_old"]);
    let metrics = offloader.metrics();
    assert_eq!(metrics["globex"].dead_lettered.values().sum::<u64>(), 3);
    assert_eq!(metrics["acme"].dead_lettered["rejected"], 1);
    eventually("the dead-letter depth gauge", || async {
        offloader.metrics()["globex"].dead_letter_depth == 3
    })
    .await;
    // The six valid entries were stored (some twice, as Loki's duplicates);
    // the refused one never.
    let stored: std::collections::BTreeSet<u64> = receiver
        .lines("acme")
        .iter()
        .map(|(ts, _, _)| *ts)
        .collect();
    let valid: std::collections::BTreeSet<u64> =
        (0..7).filter(|i| *i != 3).map(|i| now + i).collect();
    assert_eq!(stored, valid);

    // Halving took at most 2n - 1 pushes, and nothing is sent after the
    // dead letter: the stream is empty.
    let requests = receiver.requests("acme");
    assert!((2..=13).contains(&requests), "{requests} pushes");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests("acme"), requests);
    let left: u64 = client
        .query(redis::cmd("XLEN").arg("tenant:{acme}:audit"))
        .await
        .unwrap();
    assert_eq!(left, 0);
    offloader.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_oversize_batch_is_split() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    receiver.set_mode(None, Mode::MaxEntries(7));
    let base = now_ns();
    for i in 0..40 {
        audit_entry(&client, "acme", base + i, "create_key").await;
    }
    let offloader = offloader(&client, &receiver).start().unwrap();
    receiver.wait_for_lines("acme", 40).await;
    let stamps: Vec<u64> = receiver
        .lines("acme")
        .iter()
        .map(|(ts, _, _)| *ts)
        .collect();
    assert_eq!(stamps, (0..40).map(|i| base + i).collect::<Vec<_>>());
    assert!(
        receiver
            .accepted()
            .iter()
            .all(|r| r.streams[0].entries.len() <= 7)
    );
    offloader.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_and_shutdown_flushes_the_rest() {
    let (_topology, client) = start(0).await;
    let buffer = LogBuffer::builder(client.clone())
        .queue_capacity(100)
        .start()
        .unwrap();
    {
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(buffer.layer()));
        // Nothing else runs on this thread meanwhile: the queue fills.
        for i in 0..1000 {
            tracing::info!(tenant_id = "acme", i, "event");
        }
    }
    let metrics = buffer.metrics();
    assert_eq!(metrics.queued, 100);
    assert_eq!(metrics.dropped_queue_full, 900);
    let metrics = buffer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(metrics.appended, 100);
    assert_eq!(metrics.dropped_shutdown, 0);
    let records = buffered(&client, "tenant:{acme}:logs").await;
    let numbers: Vec<&str> = records.iter().map(|r| r["i"].as_str()).collect();
    let expected: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(numbers, expected);
    // Packed: 64 records to an entry at most, so at least 2 entries.
    let len: u64 = client
        .query(redis::cmd("XLEN").arg("tenant:{acme}:logs"))
        .await
        .unwrap();
    assert!((2..100).contains(&len), "{len} entries");
}

#[tokio::test]
async fn dead_letter_streams_are_capped() {
    let (_topology, client) = start(0).await;
    let receiver = Receiver::start().await;
    // 300 entries too old for Loki, dead-lettered unsent, into a stream
    // capped near 10 (`MAXLEN ~` trims whole nodes of 100 entries).
    let old = now_ns() - 8 * 24 * 3600 * 1_000_000_000;
    let mut pipeline = redis::pipe();
    for i in 0..300 {
        pipeline
            .cmd("XADD")
            .arg("tenant:{acme}:audit")
            .arg("*")
            .arg("ts")
            .arg((old + i).to_string())
            .arg("action")
            .arg("create_key")
            .ignore();
    }
    let _: () = client.query_pipeline(&pipeline).await.unwrap();
    let offloader = offloader(&client, &receiver)
        .batch_size(50)
        .dead_letter_max_len(10)
        .start()
        .unwrap();
    eventually("every entry dead-lettered", || async {
        offloader
            .metrics()
            .get("acme")
            .is_some_and(|m| m.dead_lettered.get("too_old") == Some(&300))
    })
    .await;
    let kept: u64 = client
        .query(redis::cmd("XLEN").arg(dead_letter_stream("tenant:{acme}:audit")))
        .await
        .unwrap();
    assert!((10..=110).contains(&kept), "{kept} dead letters kept");
    offloader.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn oversized_fields_are_cut_when_emitted() {
    let (_topology, client) = start(0).await;
    let buffer = LogBuffer::builder(client.clone())
        .max_field_bytes(100)
        .max_record_bytes(1000)
        .start()
        .unwrap();
    {
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(buffer.layer()));
        let huge = "u".repeat(300_000);
        tracing::info!(tenant_id = "acme", username = huge.as_str(), "login failed");
    }
    buffer.shutdown(Duration::from_secs(5)).await;
    let records = buffered(&client, "tenant:{acme}:logs").await;
    let fields = &records[0];
    let username = &fields["username"];
    assert!(username.len() <= 100, "{username}");
    let (kept, cut) = username.split_once("…[cut ").expect("a marker");
    let cut: usize = cut.trim_end_matches(" bytes]").parse().unwrap();
    assert_eq!(kept.len() + cut, 300_000);
    assert_eq!(fields["message"], "login failed");
}
