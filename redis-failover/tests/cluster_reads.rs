//! Reads on replicas in cluster mode, against one real local Redis
//! Cluster per test (3 masters, 1 replica each): reads of every shard are
//! served by its replica, and a replica paused beyond the staleness bound
//! stops serving until it is resumed.

mod common;

use common::{cluster, cluster_seeds, key_in};
use std::future::Future;
use std::time::{Duration, Instant};

use redis_failover::{ClusterClientBuilder, Durability, FailoverClient, NodeAddr, ReadPolicy};
use redis_topology::{Cluster, NodeId, Shard, slot_of};

/// Room for a loaded 2-core machine; nothing here fails over.
const BUDGET: Duration = Duration::from_secs(10);

/// How long a condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(8);

/// A client reading by `policy`, whose writes are on a replica before
/// they are acknowledged (so that a read of them on a replica sees them).
fn builder(cluster: &Cluster, policy: ReadPolicy) -> ClusterClientBuilder {
    FailoverClient::cluster(cluster_seeds(cluster))
        .retry_budget(BUDGET)
        .read_policy(policy)
        .replica_probe_interval(Duration::from_millis(100))
        .max_staleness(Duration::from_secs(1))
        .durability(Durability::Replicated {
            replicas: 1,
            timeout: Duration::from_secs(2),
        })
}

/// How many `GET`s `node` has run.
async fn gets_on(cluster: &Cluster, node: NodeId) -> u64 {
    let stats: String = cluster
        .query(node, redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap();
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until `condition` holds, failing the test after [`DEADLINE`].
async fn wait_until<F: Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let started = Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting until {what}"
        );
        // A poll interval, not a synchronisation: the condition decides.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the client may read from `node` now.
fn usable(client: &FailoverClient, node: &NodeAddr) -> bool {
    let replicas = client.replicas();
    replicas
        .iter()
        .any(|r| r.node == *node && r.unusable.is_none())
}

/// Writes a key on every shard (so that each replica has replicated
/// something: `CLUSTER SLOTS` lists it only then), and waits until every
/// node lists every shard's replica, so that a client built next knows
/// them all from its first map.
async fn write_on_every_shard(cluster: &Cluster, shards: &[Shard], stem: &str) -> Vec<String> {
    let writer = builder(cluster, ReadPolicy::Master).build().unwrap();
    let keys: Vec<String> = (0..shards.len())
        .map(|i| key_in(&shards[i], &format!("{stem}-{i}")))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        writer.set(key, i).await.unwrap();
    }
    wait_until("every node lists every replica", || async {
        for node in cluster.nodes() {
            let slots = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
            let Ok(redis::Value::Array(ranges)) = cluster.query(node, &slots).await else {
                return false;
            };
            // A range is [first, last, master, replicas...].
            if ranges
                .iter()
                .any(|r| matches!(r, redis::Value::Array(f) if f.len() < 4))
            {
                return false;
            }
        }
        true
    })
    .await;
    keys
}

/// Waits until the client may read from every replica (`Replica` fails
/// while none qualifies).
async fn wait_usable(client: &FailoverClient, count: usize) {
    wait_until("every replica is usable", || async {
        let replicas = client.replicas();
        replicas.iter().filter(|r| r.unusable.is_none()).count() == count
    })
    .await;
}

#[tokio::test]
async fn reads_of_every_shard_are_served_by_its_replica() {
    let cluster = cluster().await;
    let shards = cluster.shards().await.unwrap();
    let keys = write_on_every_shard(&cluster, &shards, "read").await;
    let client = builder(&cluster, ReadPolicy::Replica).build().unwrap();
    wait_usable(&client, shards.len()).await;
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(client.get::<usize>(key).await.unwrap(), i);
        let tagged = format!("{{{key}}}");
        let pipeline = redis::pipe().get(key).get(&tagged).to_owned();
        let (value, missing): (usize, Option<usize>) =
            client.read_pipeline(&pipeline).await.unwrap();
        assert_eq!((value, missing), (i, None));
    }
    let metrics = client.metrics();
    assert_eq!((metrics.replica_reads, metrics.master_reads), (6, 0));
    for shard in &shards {
        assert_eq!(
            gets_on(&cluster, shard.master).await,
            0,
            "no GET on a master"
        );
        assert_eq!(
            gets_on(&cluster, shard.replicas[0]).await,
            3,
            "GET, then 2 in a pipeline"
        );
    }
    // A write refused by a read: only read-only commands go to replicas.
    let write = client.read::<()>(redis::cmd("SET").arg("k").arg(1)).await;
    assert!(write.is_err());
    // The master policy of a handle still reads from masters.
    let on_master = client.with_read_policy(ReadPolicy::Master);
    let key = key_in(&shards[0], "master");
    assert_eq!(on_master.get::<Option<String>>(&key).await.unwrap(), None);
    assert_eq!(gets_on(&cluster, shards[0].master).await, 1);
}

#[tokio::test]
async fn a_paused_replica_serves_no_reads_until_resumed() {
    let cluster = cluster().await;
    let client = builder(&cluster, ReadPolicy::ReplicaPreferred)
        // A resumed replica is listed again by the next map.
        .slot_refresh_interval(Duration::from_millis(300))
        .build()
        .unwrap();
    let shards = cluster.shards().await.unwrap();
    let (shard, other) = (&shards[0], &shards[1]);
    let (key, other_key) = (key_in(shard, "paused"), key_in(other, "other"));
    client.set(&key, "v").await.unwrap();
    client.set(&other_key, "w").await.unwrap();
    let replica = NodeAddr::from(cluster.addr(shard.replicas[0]));
    wait_until("the replica serves reads", || async {
        let before = client.metrics().replica_reads;
        client.get::<String>(&key).await.unwrap() == "v" && client.metrics().replica_reads > before
    })
    .await;

    cluster.pause(shard.replicas[0]).unwrap();
    wait_until("the paused replica is unusable", || async {
        !usable(&client, &replica)
    })
    .await;
    let (master_gets, before) = (gets_on(&cluster, shard.master).await, client.metrics());
    assert_eq!(client.get::<String>(&key).await.unwrap(), "v");
    let after = client.metrics();
    assert_eq!(
        after.master_reads - before.master_reads,
        1,
        "the master served"
    );
    assert_eq!(after.replica_reads, before.replica_reads);
    assert_eq!(gets_on(&cluster, shard.master).await, master_gets + 1);
    // The other shards' replicas go on serving.
    wait_until("another shard's replica serves reads", || async {
        let before = client.metrics().replica_reads;
        client.get::<String>(&other_key).await.unwrap() == "w"
            && client.metrics().replica_reads > before
    })
    .await;

    cluster.resume(shard.replicas[0]).unwrap();
    wait_until("the resumed replica serves reads again", || async {
        let before = client.metrics().replica_reads;
        usable(&client, &replica)
            && client.get::<String>(&key).await.unwrap() == "v"
            && client.metrics().replica_reads > before
    })
    .await;
}

#[tokio::test]
async fn a_replica_of_a_moved_slot_sends_the_read_to_the_new_shard() {
    let cluster = cluster().await;
    // The map is not loaded again by itself during the test: the replica's
    // MOVED tells of the move.
    let shards = cluster.shards().await.unwrap();
    let keys = write_on_every_shard(&cluster, &shards, "moving").await;
    let client = builder(&cluster, ReadPolicy::Replica).build().unwrap();
    wait_usable(&client, shards.len()).await;
    assert_eq!(client.get::<usize>(&keys[0]).await.unwrap(), 0);
    cluster
        .move_slot(slot_of(&keys[0]), shards[1].master)
        .await
        .unwrap();
    // The migrated key on the new shard's replica before it is read there.
    let waited: i64 = cluster
        .query(shards[1].master, redis::cmd("WAIT").arg(1).arg(2000))
        .await
        .unwrap();
    assert_eq!(waited, 1);
    let (gets, redirects) = (
        gets_on(&cluster, shards[1].replicas[0]).await,
        client.metrics().redirect_replies,
    );
    assert_eq!(client.get::<usize>(&keys[0]).await.unwrap(), 0);
    assert!(client.metrics().redirect_replies > redirects, "a MOVED");
    assert_eq!(gets_on(&cluster, shards[1].replicas[0]).await, gets + 1);
    assert_eq!(
        client.master_of(&keys[0]),
        Some(NodeAddr::from(cluster.addr(shards[1].master)))
    );
}

#[tokio::test]
async fn the_staleness_bound_is_checked_as_with_one_master() {
    let seed = NodeAddr::new("127.0.0.1", 1).unwrap();
    let too_tight = FailoverClient::cluster([seed])
        .replica_probe_interval(Duration::from_millis(100))
        .max_staleness(Duration::from_millis(150))
        .build();
    let error = too_tight.unwrap_err();
    assert_eq!(error.kind(), redis_failover::ErrorKind::InvalidConfig);
    assert!(error.to_string().contains("max_staleness"), "{error}");
}
