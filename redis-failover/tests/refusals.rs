//! A master that refuses writes until an operator acts (`maxmemory`
//! reached, persistence failing) answers with a typed error at once: the
//! write is not retried for the retry budget, and reads go on.

use std::time::{Duration, Instant};

use redis_failover::{ErrorKind, FailoverClient};
use redis_topology::{NodeId, Topology};

/// How many times `node` refused `command` before running it
/// (`rejected_calls` of `INFO commandstats`).
async fn rejected_calls(topology: &Topology, node: NodeId, command: &str) -> u64 {
    let info: String = topology
        .query(node, redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("rejected_calls="))?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

async fn config_set(topology: &Topology, node: NodeId, name: &str, value: &str) {
    let () = topology
        .query(node, redis::cmd("CONFIG").arg("SET").arg(name).arg(value))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_and_failing_persistence_are_typed_and_never_retried() {
    let topology = Topology::builder()
        .replicas(0)
        .sentinels(0)
        // The snapshot's file name is changed at run time below.
        .extra_config("enable-protected-configs local")
        .start()
        .await
        .unwrap();
    let master = topology.initial_master();
    // A budget far longer than the test: a retried refusal would hang it.
    let client = FailoverClient::candidates([topology.addr(master).into()])
        .retry_budget(Duration::from_secs(600))
        .build()
        .unwrap();
    client.set("before", 1).await.unwrap();

    // Over maxmemory, with the default policy that evicts nothing.
    config_set(&topology, master, "maxmemory", "1").await;
    let error = client.set("refused", 1).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::OutOfMemory, "{error}");
    assert_eq!(error.code(), Some("OOM"));
    assert_eq!(rejected_calls(&topology, master, "set").await, 1);
    let read: Option<i64> = client.get("before").await.unwrap();
    assert_eq!(read, Some(1), "reads go on");
    config_set(&topology, master, "maxmemory", "0").await;

    // A failed snapshot stops writes, as a full disk does: the snapshot's
    // file name is a directory that is not empty, so it cannot be written.
    let (_, dir): (String, String) = topology
        .query(master, redis::cmd("CONFIG").arg("GET").arg("dir"))
        .await
        .unwrap();
    std::fs::create_dir_all(std::path::Path::new(&dir).join("blocked/inside")).unwrap();
    config_set(&topology, master, "dbfilename", "blocked").await;
    config_set(&topology, master, "save", "3600 1").await;
    let _: String = topology.query(master, &redis::cmd("BGSAVE")).await.unwrap();
    let started = Instant::now();
    loop {
        let info: String = topology
            .query(master, redis::cmd("INFO").arg("persistence"))
            .await
            .unwrap();
        if info.contains("rdb_last_bgsave_status:err") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = client.set("refused", 2).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PersistenceFailing, "{error}");
    assert_eq!(rejected_calls(&topology, master, "set").await, 2);
    let read: Option<i64> = client.get("before").await.unwrap();
    assert_eq!(read, Some(1), "reads go on");

    // Lifted: writes go through again, on the same connection.
    config_set(&topology, master, "save", "").await;
    client.set("after", 3).await.unwrap();
    let refused: Option<i64> = client.get("refused").await.unwrap();
    assert_eq!(refused, None, "a refused write did not run");
}

/// A transaction that ran with one command failing reports that
/// command's error kind, also for a code redis-rs does not know itself.
#[tokio::test]
async fn a_command_failing_inside_a_transaction_gives_its_kind() {
    let topology = Topology::builder()
        .replicas(0)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let master = topology.initial_master();
    let client = FailoverClient::candidates([topology.addr(master).into()])
        .build()
        .unwrap();
    let mut transaction = redis::pipe();
    transaction
        .atomic()
        .cmd("SET")
        .arg("before")
        .arg(1)
        .ignore()
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg("missing")
        .arg("reader")
        .arg("STREAMS")
        .arg("no-stream")
        .arg(">");
    let error = client
        .query_pipeline::<(redis::Value,)>(&transaction)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoGroup, "{error}");
    // The transaction ran: the command before the failing one took effect.
    assert_eq!(client.get::<Option<u64>>("before").await.unwrap(), Some(1));

    // Refused when queued (over `maxmemory`): discarded, with the refusal's kind.
    config_set(&topology, master, "maxmemory", "1").await;
    let mut refused = redis::pipe();
    refused.atomic().cmd("SET").arg("refused").arg(1);
    let error = client.query_pipeline::<()>(&refused).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::OutOfMemory, "{error}");
}
