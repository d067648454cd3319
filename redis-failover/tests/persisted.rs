//! Persisted writes (`WAITAOF`): on Valkey with `appendonly yes`, and the
//! typed refusal of servers that cannot acknowledge them. The Valkey tests
//! are skipped (with a message) where `valkey-server` is not installed.

use std::time::Duration;

use futures_util::future::join_all;
use redis_failover::{Durability, Error, ErrorKind, FailoverClient};
use redis_topology::Topology;

mod common;
use common::{on_path, valkey};

fn persisted(local: bool, replicas: u32, timeout_ms: u64) -> Durability {
    Durability::Persisted {
        local,
        replicas,
        timeout: Duration::from_millis(timeout_ms),
    }
}

/// Persisted writes, concurrent with replicated ones (a batch sends a
/// `WAIT` and a `WAITAOF`) and in a transaction, are acknowledged once
/// fsynced on the master and the replica; with the replica's append-only
/// file turned off, they run but are reported not persisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_writes_are_acknowledged_once_fsynced_and_reported_when_not() {
    let Some(builder) = valkey() else { return };
    let topology = builder
        .replicas(1)
        .sentinels(0)
        .extra_config("appendonly yes")
        .start()
        .await
        .unwrap();
    let (master, replica) = (topology.initial_master(), topology.data_nodes()[1]);
    let client = FailoverClient::candidates([topology.addr(master).into()])
        .build()
        .unwrap();
    let durable = client.with_durability(persisted(true, 1, 5_000));
    let replicated = client.with_durability(Durability::Replicated {
        replicas: 1,
        timeout: Duration::from_secs(5),
    });
    let writes = (0..16).map(|i| {
        let (durable, replicated) = (durable.clone(), replicated.clone());
        async move {
            durable.set(&format!("persisted:{i}"), i).await.unwrap();
            replicated.set(&format!("replicated:{i}"), i).await.unwrap();
        }
    });
    join_all(writes).await;
    let counted: Option<(i64,)> = durable
        .transaction(&["counter"], |_watched| async {
            let mut pipeline = redis::pipe();
            pipeline.incr("counter", 1);
            Ok(Some(pipeline))
        })
        .await
        .unwrap();
    assert_eq!(counted, Some((1,)));
    let on_replica: Option<i64> = topology
        .query(replica, redis::cmd("GET").arg("persisted:15"))
        .await
        .unwrap();
    assert_eq!(on_replica, Some(15));
    assert_eq!(client.metrics().unreplicated_writes, 0);

    // The replica still replicates, but fsyncs nothing: it never counts.
    let _: String = topology
        .query(
            replica,
            redis::cmd("CONFIG").arg("SET").arg("appendonly").arg("no"),
        )
        .await
        .unwrap();
    let short = client.with_durability(persisted(true, 1, 300));
    match short.set("short", "ran").await {
        Err(
            // The master's own fsync may or may not fall within the 300 ms
            // (`appendfsync everysec`); the replica's never comes.
            error @ Error::NotPersisted {
                acked: 0,
                required: 1,
                ..
            },
        ) => assert_eq!(error.kind(), ErrorKind::NotReplicated),
        other => panic!("{other:?}"),
    }
    let ran: Option<String> = client.get("short").await.unwrap();
    assert_eq!(ran.as_deref(), Some("ran"), "not persisted, but it ran");
}

/// A persisted write asking for the master's own fsync, on a Valkey
/// master with `appendonly` off: refused before it runs, not retried.
#[tokio::test]
async fn a_local_fsync_without_an_append_only_file_is_refused_before_the_write() {
    let Some(builder) = valkey() else { return };
    let topology = builder.replicas(0).sentinels(0).start().await.unwrap();
    let client = FailoverClient::candidates([topology.addr(topology.initial_master()).into()])
        .build()
        .unwrap();
    let durable = client.with_durability(persisted(true, 0, 1_000));
    let error = durable.set("k", "v").await.unwrap_err();
    assert!(matches!(error, Error::Unsupported { .. }), "{error:?}");
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(error.to_string().contains("appendonly"), "{error}");
    let written: Option<String> = client.get("k").await.unwrap();
    assert_eq!(written, None, "refused before it ran");
    assert_eq!(client.metrics().retries, 0);
}

/// On a server without `WAITAOF` (Redis before 7.2, Debian 12's 7.0), a
/// persisted write is refused with a typed error before it runs. Runs on
/// `redis-server` when it is such a Redis, else says it is skipped.
#[tokio::test]
async fn a_server_without_waitaof_refuses_persisted_writes_before_they_run() {
    if !on_path("redis-server") {
        println!("skipped: redis-server not installed");
        return;
    }
    let topology = Topology::builder()
        .redis_server("redis-server")
        .replicas(0)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    if topology.server().has_waitaof() {
        println!("skipped: this redis-server has WAITAOF");
        return;
    }
    let client = FailoverClient::candidates([topology.addr(topology.initial_master()).into()])
        .durability(persisted(false, 1, 1_000))
        .build()
        .unwrap();
    let error = client.set("k", "v").await.unwrap_err();
    assert!(matches!(error, Error::Unsupported { .. }), "{error:?}");
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(error.to_string().contains("WAITAOF"), "{error}");
    let written: Option<String> = client
        .with_durability(Durability::Master)
        .get("k")
        .await
        .unwrap();
    assert_eq!(written, None, "refused before it ran");
}
