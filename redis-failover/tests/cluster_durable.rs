//! Durable writes, transactions with `WATCH` and blocking commands in
//! cluster mode, against one real local Redis Cluster per test (3 masters,
//! 1 replica each).

mod common;

use common::{cluster, cluster_seeds, key_in};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use redis_failover::{Durability, Error, ErrorKind, FailoverClient, NodeAddr};
use redis_topology::{Cluster, NodeId, slot_of};

/// Room for a loaded 2-core machine; nothing here fails over.
const BUDGET: Duration = Duration::from_secs(10);

fn client(cluster: &Cluster) -> FailoverClient {
    FailoverClient::cluster(cluster_seeds(cluster))
        .retry_budget(BUDGET)
        .build()
        .unwrap()
}

fn replicated(replicas: u32, timeout: Duration) -> Durability {
    Durability::Replicated { replicas, timeout }
}

/// `GET key` on a replica, which serves reads of its shard's slots once
/// told `READONLY` (on the same connection).
async fn get_on_replica(cluster: &Cluster, replica: NodeId, key: &str) -> Option<String> {
    let mut connection = cluster.connection(replica).await.unwrap();
    let ((), value): ((), Option<String>) = redis::pipe()
        .cmd("READONLY")
        .get(key)
        .query_async(&mut connection)
        .await
        .unwrap();
    value
}

/// How many times `node` ran `command` (`INFO commandstats`).
async fn command_calls(cluster: &Cluster, node: NodeId, command: &str) -> u64 {
    let info: String = cluster
        .query(node, redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Each shard's durable write is acknowledged once its own replica has
/// it; asking for more replicas than the shard has runs the write and
/// says it fell short, without resending it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_writes_wait_for_the_replica_of_their_own_shard() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let durable = client.with_durability(replicated(1, Duration::from_secs(5)));
    let shards = cluster.shards().await.unwrap();
    for (i, shard) in shards.iter().enumerate() {
        let key = key_in(shard, &format!("durable-{i}"));
        durable.set(&key, format!("v{i}")).await.unwrap();
        let on_replica = get_on_replica(&cluster, shard.replicas[0], &key).await;
        assert_eq!(
            on_replica.as_deref(),
            Some(format!("v{i}").as_str()),
            "{key}"
        );
    }

    let key = key_in(&shards[1], "short");
    let short = client.with_durability(replicated(2, Duration::from_millis(200)));
    let error = short.set(&key, "ran").await.unwrap_err();
    let master = NodeAddr::from(cluster.addr(shards[1].master));
    assert!(
        matches!(&error, Error::NotReplicated { node, acked: 1, required: 2, .. } if *node == master),
        "{error:?}"
    );
    assert_eq!(client.get::<String>(&key).await.unwrap(), "ran");
    let sets = command_calls(&cluster, shards[1].master, "set").await;
    assert_eq!(sets, 2, "one SET per write on that master: never resent");
    assert!(client.replication_status().is_none());

    // A master that cannot fsync (Redis 7.0 has no WAITAOF; here
    // appendonly is off) says so before the write runs.
    let persisted = client.with_durability(Durability::Persisted {
        local: true,
        replicas: 0,
        timeout: Duration::from_secs(1),
    });
    let key = key_in(&shards[0], "persisted");
    let error = persisted.set(&key, "no").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
    let exists: u32 = client.query(redis::cmd("EXISTS").arg(&key)).await.unwrap();
    assert_eq!(exists, 0, "refused before it ran");
}

/// On Valkey with `appendonly yes`, a persisted write is acknowledged once
/// its master and its shard's replica fsynced it (`WAITAOF`). Skipped
/// where `valkey-server` is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_writes_wait_for_waitaof_on_their_master() {
    let on_path = |binary: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
    };
    if !on_path("valkey-server") {
        println!("skipped: valkey-server not installed");
        return;
    }
    let mut builder = Cluster::builder()
        .shards(3)
        .replicas_per_shard(1)
        .redis_server("valkey-server")
        .extra_config("appendonly yes");
    if on_path("valkey-cli") {
        builder = builder.redis_cli("valkey-cli");
    }
    let cluster = builder.start().await.unwrap();
    let persisted = client(&cluster).with_durability(Durability::Persisted {
        local: true,
        replicas: 1,
        timeout: Duration::from_secs(5),
    });
    let shards = cluster.shards().await.unwrap();
    for (i, shard) in shards.iter().enumerate() {
        let key = key_in(shard, &format!("aof-{i}"));
        persisted.set(&key, i).await.unwrap();
        assert_eq!(
            command_calls(&cluster, shard.master, "waitaof").await,
            2,
            "probe, then the write's"
        );
    }
    let key = key_in(&shards[0], "aof-tx");
    let reply: Option<(i64,)> = persisted
        .transaction(&[&key], |_| {
            let key = key.clone();
            async move {
                let mut pipeline = redis::pipe();
                pipeline.incr(&key, 5);
                Ok(Some(pipeline))
            }
        })
        .await
        .unwrap();
    assert_eq!(reply, Some((5,)));
}

/// Concurrent durable writes to one shard share their `WAIT`s there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_durable_writes_to_one_shard_share_waits() {
    const WRITES: usize = 64;
    let cluster = cluster().await;
    let durable = client(&cluster).with_durability(replicated(1, Duration::from_secs(5)));
    let shards = cluster.shards().await.unwrap();
    let tag = key_in(&shards[2], "tag");
    let writes = (0..WRITES).map(|n| {
        let (durable, key) = (durable.clone(), format!("{{{tag}}}:{n}"));
        async move { durable.set(&key, n).await.unwrap() }
    });
    join_all(writes).await;
    let waits = command_calls(&cluster, shards[2].master, "wait").await;
    assert!(
        (1..WRITES as u64).contains(&waits),
        "{WRITES} concurrent durable writes sent {waits} WAITs"
    );
    for other in &shards[..2] {
        assert_eq!(command_calls(&cluster, other.master, "wait").await, 0);
    }
}

/// A transaction whose watched key changed runs again, as with one
/// master, and past the budget ends in a conflict; keys of two slots are
/// refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_watch_keys_of_one_slot() {
    let cluster = cluster().await;
    let (client, other) = (client(&cluster), client(&cluster));
    let key = "{acct}:balance";
    client.set(key, 10).await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let reply: Option<(i64,)> = client
        .transaction(&[key], |mut watched| {
            let (runs, other) = (Arc::clone(&runs), other.clone());
            async move {
                let now: i64 = watched.get(key).await?;
                if runs.fetch_add(1, Ordering::Relaxed) == 0 {
                    // Another client changes the watched key before EXEC.
                    other.set(key, 100).await?;
                }
                let mut pipeline = redis::pipe();
                pipeline.set(key, now + 1).ignore().get(key);
                Ok(Some(pipeline))
            }
        })
        .await
        .unwrap();
    assert_eq!((runs.load(Ordering::Relaxed), reply), (2, Some((101,))));

    // Every try conflicts: the budget ends it, with nothing applied.
    let hurried = FailoverClient::cluster([NodeAddr::from(cluster.addr(cluster.nodes()[0]))])
        .retry_budget(Duration::from_millis(300))
        .build()
        .unwrap();
    let conflict = hurried
        .transaction::<_, (), _, _>(&[key], |mut watched| {
            let other = other.clone();
            async move {
                let now: i64 = watched.get(key).await?;
                other.query::<i64>(redis::cmd("INCR").arg(key)).await?;
                let mut pipeline = redis::pipe();
                pipeline.set(key, -now);
                Ok(Some(pipeline))
            }
        })
        .await
        .unwrap_err();
    assert_eq!(
        conflict.kind(),
        ErrorKind::TransactionConflict,
        "{conflict}"
    );
    assert!(client.get::<i64>(key).await.unwrap() > 101);

    let shards = cluster.shards().await.unwrap();
    let (a, b) = (key_in(&shards[0], "a"), key_in(&shards[1], "b"));
    let ran = AtomicU32::new(0);
    let crossed = client
        .transaction::<_, (), _, _>(&[&a, &b], |_| {
            ran.fetch_add(1, Ordering::Relaxed);
            async { Ok(None) }
        })
        .await
        .unwrap_err();
    assert_eq!(crossed.kind(), ErrorKind::CrossSlot, "{crossed}");
    assert_eq!(ran.into_inner(), 0, "refused before the body ran");
    let crossed_body = client
        .transaction::<_, (), _, _>(&[&a], |_| {
            let b = b.clone();
            async move {
                let mut pipeline = redis::pipe();
                pipeline.set(&b, 1);
                Ok(Some(pipeline))
            }
        })
        .await
        .unwrap_err();
    assert_eq!(crossed_body.kind(), ErrorKind::CrossSlot, "{crossed_body}");
    let exists: u32 = client.query(redis::cmd("EXISTS").arg(&b)).await.unwrap();
    assert_eq!(exists, 0, "nothing of the refused transaction ran");
}

/// A transaction on a slot moved since the client loaded its map gets
/// `MOVED` and runs on the new owner; a durable one waits for its replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_follows_a_moved_slot() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let shards = cluster.shards().await.unwrap();
    let key = key_in(&shards[0], "moving");
    client.set(&key, 1).await.unwrap();
    cluster
        .move_slot(slot_of(&key), shards[1].master)
        .await
        .unwrap();
    let new_owner = NodeAddr::from(cluster.addr(shards[1].master));
    let durable = client.with_durability(replicated(1, Duration::from_secs(5)));
    let ran_on = Arc::new(Mutex::new(Vec::new()));
    let reply: Option<(i64,)> = durable
        .transaction(&[&key], |mut watched| {
            let (key, ran_on) = (key.clone(), Arc::clone(&ran_on));
            async move {
                ran_on.lock().unwrap().push(watched.node().clone());
                let now: i64 = watched.get(&key).await?;
                let mut pipeline = redis::pipe();
                pipeline.incr(&key, now);
                Ok(Some(pipeline))
            }
        })
        .await
        .unwrap();
    assert_eq!(reply, Some((2,)));
    assert_eq!(*ran_on.lock().unwrap(), [new_owner]);
    assert!(client.metrics().redirect_replies >= 1, "WATCH got MOVED");
    let on_replica = get_on_replica(&cluster, shards[1].replicas[0], &key).await;
    assert_eq!(on_replica.as_deref(), Some("2"));

    // A durable atomic pipeline goes in a batch on the old owner's lane:
    // its commands are refused with MOVED as they are queued, EXEC with
    // EXECABORT; nothing ran, so it is sent again to the new owner.
    let other = key_in(&shards[0], "moving-too");
    durable.set(&other, 1).await.unwrap();
    cluster
        .move_slot(slot_of(&other), shards[1].master)
        .await
        .unwrap();
    let mut transaction = redis::pipe();
    transaction.atomic().incr(&other, 1).get(&other);
    let (incremented, read): (i64, i64) = durable.query_pipeline(&transaction).await.unwrap();
    assert_eq!((incremented, read), (2, 2));
    let on_replica = get_on_replica(&cluster, shards[1].replicas[0], &other).await;
    assert_eq!(
        on_replica.as_deref(),
        Some("2"),
        "acknowledged once replicated"
    );
}

/// A blocking pop on a cluster key waits on its own connection to the
/// slot's master, and is answered by a push from another task, while the
/// client's other requests go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_pop_is_answered_by_a_push() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let shards = cluster.shards().await.unwrap();
    let queue = key_in(&shards[2], "jobs");
    let popper = {
        let (client, queue) = (client.clone(), queue.clone());
        tokio::spawn(async move {
            client
                .query::<Option<(String, String)>>(redis::cmd("BLPOP").arg(&queue).arg(10))
                .await
        })
    };
    // Pushed once the pop blocks there, so that it is the pop that gets it.
    let master = shards[2].master;
    let started = std::time::Instant::now();
    while blocked_clients(&cluster, master).await == 0 {
        assert!(started.elapsed() < BUDGET, "the BLPOP never blocked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pushed: u32 = client
        .query(redis::cmd("LPUSH").arg(&queue).arg("job-1"))
        .await
        .unwrap();
    assert_eq!(pushed, 1);
    let popped = popper.await.unwrap().unwrap();
    assert_eq!(popped, Some((queue, "job-1".to_owned())));
}

/// `INFO clients`' count of blocked clients on `node`.
async fn blocked_clients(cluster: &Cluster, node: NodeId) -> u64 {
    let info: String = cluster
        .query(node, redis::cmd("INFO").arg("clients"))
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("blocked_clients:"))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}
