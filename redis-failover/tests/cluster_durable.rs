//! Durable writes, transactions with `WATCH` and blocking commands in
//! cluster mode, against one real local Redis Cluster per test (3 masters,
//! 1 replica each).

use std::time::Duration;

use futures_util::future::join_all;
use redis_failover::{Durability, Error, FailoverClient, NodeAddr};
use redis_topology::{Cluster, NodeId, Shard, slot_of};

/// Room for a loaded 2-core machine; nothing here fails over.
const BUDGET: Duration = Duration::from_secs(10);

async fn cluster() -> Cluster {
    Cluster::builder()
        .shards(3)
        .replicas_per_shard(1)
        .start()
        .await
        .unwrap()
}

fn client(cluster: &Cluster) -> FailoverClient {
    let seeds = cluster
        .nodes()
        .into_iter()
        .map(|n| NodeAddr::from(cluster.addr(n)));
    FailoverClient::cluster(seeds)
        .retry_budget(BUDGET)
        .build()
        .unwrap()
}

fn replicated(replicas: u32, timeout: Duration) -> Durability {
    Durability::Replicated { replicas, timeout }
}

/// A key whose slot `shard` serves.
fn key_in(shard: &Shard, stem: &str) -> String {
    (0..)
        .map(|n| format!("{stem}-{n}"))
        .find(|key| shard.slots.iter().any(|r| r.contains(&slot_of(key))))
        .unwrap()
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
