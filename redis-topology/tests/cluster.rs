//! Local Redis Clusters against real `redis-server` processes: creation,
//! failover after a kill, a hang and `CLUSTER FAILOVER`, a slot moving under
//! load, a new shard and rebalancing, and cleanup when a test panics.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis_topology::{Cluster, Error, FailoverMode, NodeId, SLOT_COUNT, Shard, slot_of};

/// A failover after a kill or a hang takes about twice the 2 s node
/// timeout; this leaves room for a loaded 2-core machine.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// How many times a command follows MOVED and ASK before giving up.
const MAX_REDIRECTS: usize = 5;

/// A key whose slot `shard` serves.
fn key_in(shard: &Shard, stem: &str) -> String {
    (0..)
        .map(|n| format!("{stem}-{n}"))
        .find(|key| shard.slots.iter().any(|r| r.contains(&slot_of(key))))
        .unwrap()
}

/// Checks the slot ranges of the shards cover every slot exactly once.
fn assert_every_slot_served_once(shards: &[Shard]) {
    let mut served = vec![0u8; usize::from(SLOT_COUNT)];
    for range in shards.iter().flat_map(|s| s.slots.iter()) {
        for slot in range.clone() {
            served[usize::from(slot)] += 1;
        }
    }
    assert!(served.iter().all(|&n| n == 1), "{shards:?}");
}

/// A minimal cluster client: it knows one node per slot and follows
/// `MOVED` (learning the new node) and `ASK` (`ASKING`, once, without
/// learning), as cluster clients do, counting each.
struct Client<'a> {
    cluster: &'a Cluster,
    owners: HashMap<u16, NodeId>,
    connections: HashMap<NodeId, MultiplexedConnection>,
    moved: usize,
    asked: usize,
}

impl<'a> Client<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        Self {
            cluster,
            owners: HashMap::new(),
            connections: HashMap::new(),
            moved: 0,
            asked: 0,
        }
    }

    async fn connection(&mut self, node: NodeId) -> &mut MultiplexedConnection {
        if !self.connections.contains_key(&node) {
            let connection = self.cluster.connection(node).await.unwrap();
            self.connections.insert(node, connection);
        }
        self.connections.get_mut(&node).unwrap()
    }

    async fn run<T: redis::FromRedisValue>(&mut self, key: &str, command: &redis::Cmd) -> T {
        let slot = slot_of(key);
        let mut node = match self.owners.get(&slot) {
            Some(&node) => node,
            None => self.cluster.master_of_slot(slot).await.unwrap().unwrap(),
        };
        let mut asking = false;
        for _ in 0..=MAX_REDIRECTS {
            let connection = self.connection(node).await;
            let reply = if asking {
                let mut pipe = redis::pipe();
                pipe.cmd("ASKING").ignore().add_command(command.clone());
                pipe.query_async::<(T,)>(connection).await.map(|(t,)| t)
            } else {
                command.query_async::<T>(connection).await
            };
            let error = match reply {
                Ok(value) => {
                    if !asking {
                        self.owners.insert(slot, node);
                    }
                    return value;
                }
                Err(error) => error,
            };
            let (addr, _) = error
                .redirect_node()
                .unwrap_or_else(|| panic!("{key} on {node}: {error}"));
            node = self.cluster.node_at(addr.parse().unwrap()).unwrap();
            asking = error.code() == Some("ASK");
            if asking {
                self.asked += 1;
            } else {
                self.moved += 1;
                self.owners.insert(slot, node);
            }
        }
        panic!("{key}: more than {MAX_REDIRECTS} redirects");
    }

    async fn set(&mut self, key: &str, value: &str) {
        self.run::<()>(key, redis::cmd("SET").arg(key).arg(value))
            .await;
    }

    async fn get(&mut self, key: &str) -> Option<String> {
        self.run(key, redis::cmd("GET").arg(key)).await
    }
}

#[tokio::test]
async fn a_new_cluster_serves_every_slot_and_takes_writes_at_once() {
    let cluster = Cluster::builder().start().await.unwrap();
    assert_eq!(cluster.nodes().len(), 6);
    let shards = cluster.shards().await.unwrap();
    assert_eq!(shards.len(), 3, "{shards:?}");
    assert!(shards.iter().all(|s| s.replicas.len() == 1), "{shards:?}");
    assert_every_slot_served_once(&shards);

    // Every node, replicas included, answers for the whole slot map: a
    // write to each shard's master is taken right away, no CLUSTERDOWN.
    for (n, shard) in shards.iter().enumerate() {
        let key = key_in(shard, "first-write");
        let _: () = cluster
            .query(shard.master, redis::cmd("SET").arg(&key).arg(n))
            .await
            .unwrap();
        let replica = shard.replicas[0];
        let slots: Vec<redis::Value> = cluster
            .query(replica, redis::cmd("CLUSTER").arg("SLOTS"))
            .await
            .unwrap();
        assert_eq!(slots.len(), 3, "CLUSTER SLOTS on {replica}");
    }

    // The slot computation matches the server's, hash tags included.
    for key in [
        "foo",
        "{user1000}.following",
        "{user1000}.followers",
        "a{b}c",
        "{}x",
        "",
    ] {
        let server: u16 = cluster
            .query(
                shards[0].master,
                redis::cmd("CLUSTER").arg("KEYSLOT").arg(key),
            )
            .await
            .unwrap();
        assert_eq!(slot_of(key), server, "{key:?}");
    }
    assert_eq!(slot_of("foo"), 12182);
}

#[tokio::test]
async fn a_killed_master_is_replaced_by_its_replica() {
    let cluster = Cluster::builder().start().await.unwrap();
    let shard = cluster.shards().await.unwrap().remove(1);
    let key = key_in(&shard, "before-kill");
    let acked: usize = {
        let mut connection = cluster.connection(shard.master).await.unwrap();
        redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg("kept")
            .ignore()
            .cmd("WAIT")
            .arg(1)
            .arg(1500)
            .query_async::<(usize,)>(&mut connection)
            .await
            .unwrap()
            .0
    };
    assert_eq!(acked, 1);

    cluster.kill(shard.master).unwrap();
    let new = cluster
        .wait_for_failover(shard.master, FAILOVER_DEADLINE)
        .await
        .unwrap();
    assert_eq!(new, shard.replicas[0]);
    let slot = slot_of(&key);
    assert_eq!(cluster.master_of_slot(slot).await.unwrap(), Some(new));
    let shards = cluster.shards().await.unwrap();
    assert_every_slot_served_once(&shards);
    assert!(
        shards.iter().all(|s| s.master != shard.master),
        "{shards:?}"
    );
    let value: Option<String> = cluster
        .query(new, redis::cmd("GET").arg(&key))
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("kept"));
    let _: () = cluster
        .query(new, redis::cmd("SET").arg(&key).arg("after"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_hung_master_is_failed_over_and_rejoins_as_a_replica() {
    let cluster = Cluster::builder().start().await.unwrap();
    let shard = cluster.shards().await.unwrap().remove(0);

    cluster.pause(shard.master).unwrap();
    let new = cluster
        .wait_for_failover(shard.master, FAILOVER_DEADLINE)
        .await
        .unwrap();
    assert_eq!(new, shard.replicas[0]);

    cluster.resume(shard.master).unwrap();
    cluster.wait_stable(FAILOVER_DEADLINE).await.unwrap();
    let now = cluster.shards().await.unwrap();
    let rejoined = now.iter().find(|s| s.master == new).unwrap();
    assert_eq!(rejoined.replicas, vec![shard.master], "{now:?}");
    assert_eq!(rejoined.slots, shard.slots);
}

#[tokio::test]
async fn cluster_failover_in_every_mode_moves_mastership() {
    let cluster = Cluster::builder().start().await.unwrap();
    let shards = cluster.shards().await.unwrap();
    let modes = [
        FailoverMode::Default,
        FailoverMode::Force,
        FailoverMode::Takeover,
    ];
    for (shard, mode) in shards.iter().zip(modes) {
        let replica = shard.replicas[0];
        cluster.failover(replica, mode).await.unwrap();
        let slot = *shard.slots[0].start();
        assert_eq!(
            cluster.master_of_slot(slot).await.unwrap(),
            Some(replica),
            "{mode:?}"
        );
    }
    // Every old master now follows its former replica.
    let now = cluster.shards().await.unwrap();
    for (before, after) in shards.iter().zip(&now) {
        assert_eq!(after.master, before.replicas[0]);
        assert_eq!(after.replicas, vec![before.master]);
        assert_eq!(after.slots, before.slots);
    }
    // A master cannot take over anything.
    let error = cluster
        .failover(now[0].master, FailoverMode::Default)
        .await
        .unwrap_err();
    assert!(
        matches!(error, redis_topology::Error::WrongKind { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_slot_moves_with_its_keys_while_a_client_keeps_using_it() {
    let cluster = Arc::new(Cluster::builder().start().await.unwrap());
    let shards = cluster.shards().await.unwrap();
    // One tenant: every key shares the hash tag, so the slot.
    let key = |n: usize| format!("{{tenant-7}}:{n}");
    let slot = slot_of(key(0));
    let from = cluster.master_of_slot(slot).await.unwrap().unwrap();
    let to = shards
        .iter()
        .map(|s| s.master)
        .find(|&m| m != from)
        .unwrap();

    let mut client = Client::new(&cluster);
    for n in 0..1000 {
        client.set(&key(n), "before").await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (cluster, stop) = (Arc::clone(&cluster), Arc::clone(&stop));
        async move {
            let mut client = Client::new(&cluster);
            let mut written = 0;
            while !stop.load(Ordering::Relaxed) {
                let n = 1000 + written;
                client.set(&key(n), "during").await;
                let old = written % 1000;
                assert_eq!(
                    client.get(&key(old)).await.as_deref(),
                    Some("before"),
                    "{old}"
                );
                written += 1;
            }
            (written, client.moved, client.asked)
        }
    });

    cluster.move_slot(slot, to).await.unwrap();
    assert_eq!(cluster.master_of_slot(slot).await.unwrap(), Some(to));
    // A few more rounds against the new owner, then stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (written, moved, asked) = load.await.unwrap();
    eprintln!("{written} keys written during the move; {moved} MOVED, {asked} ASK");
    // New keys are sent on (ASK) while the slot migrates, then the old
    // owner redirects for good (MOVED).
    assert!(
        asked >= 1,
        "the client was never sent to the importing node"
    );
    assert!(moved >= 1, "the client never learnt the new owner");

    let count: usize = cluster
        .query(to, redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot))
        .await
        .unwrap();
    assert_eq!(count, 1000 + written);
    let left: usize = cluster
        .query(from, redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot))
        .await
        .unwrap();
    assert_eq!(left, 0);
    let mut client = Client::new(&cluster);
    for n in 0..1000 {
        assert_eq!(client.get(&key(n)).await.as_deref(), Some("before"), "{n}");
    }
    for n in 1000..1000 + written {
        assert_eq!(client.get(&key(n)).await.as_deref(), Some("during"), "{n}");
    }
}

#[tokio::test]
async fn a_new_shard_gets_slots_after_rebalance_and_keys_are_kept() {
    let cluster = Cluster::builder().start().await.unwrap();
    let mut client = Client::new(&cluster);
    let keys: Vec<String> = (0..300).map(|n| format!("key-{n}")).collect();
    for key in &keys {
        client.set(key, key).await;
    }

    let new = cluster.add_shard().await.unwrap();
    assert_eq!(cluster.nodes().len(), 8);
    let shards = cluster.shards().await.unwrap();
    assert_eq!(shards.len(), 4);
    let added = shards.iter().find(|s| s.master == new).unwrap();
    assert_eq!(added.slot_count(), 0);
    assert_eq!(added.replicas.len(), 1);

    cluster.rebalance().await.unwrap();
    let shards = cluster.shards().await.unwrap();
    assert_every_slot_served_once(&shards);
    let added = shards.iter().find(|s| s.master == new).unwrap();
    assert!(added.slot_count() > 3000, "{shards:?}");
    for key in &keys {
        assert_eq!(client.get(key).await.as_ref(), Some(key));
    }
    assert!(client.moved > 0, "some keys moved to the new shard");
}

#[tokio::test]
async fn a_shard_without_replicas_stays_down_and_the_wait_says_why() {
    let cluster = Cluster::builder()
        .replicas_per_shard(0)
        .start()
        .await
        .unwrap();
    assert_eq!(cluster.nodes().len(), 3);
    let master = cluster.shards().await.unwrap()[2].master;
    cluster.kill(master).unwrap();
    let error = cluster
        .wait_for_failover(master, Duration::from_millis(500))
        .await
        .unwrap_err();
    let Error::Timeout {
        node, reason, log, ..
    } = &error
    else {
        panic!("expected a timeout, got {error:?}")
    };
    assert!(log.starts_with(cluster.dir()), "{}", log.display());
    // Blamed on the dead master until the others flag it failed, then on them.
    if *node == master {
        assert!(reason.contains("down or paused"), "{reason}");
    } else {
        assert!(reason.contains("cluster_state is fail"), "{reason}");
    }
    assert!(error.to_string().contains("stable cluster"), "{error}");
    // A replica's failover needs a replica.
    let error = cluster
        .failover(cluster.nodes()[0], FailoverMode::Takeover)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::WrongKind { .. }), "{error:?}");
}

#[tokio::test]
async fn every_process_is_killed_when_a_test_panics() {
    let (pids_tx, pids_rx) = std::sync::mpsc::channel();
    let panicked = tokio::spawn(async move {
        let cluster = Cluster::builder().keep_dir(false).start().await.unwrap();
        let pids: Vec<u32> = cluster
            .nodes()
            .into_iter()
            .map(|n| cluster.pid(n).unwrap())
            .collect();
        // A paused node is killed too.
        cluster.pause(cluster.nodes()[0]).unwrap();
        pids_tx.send((pids, cluster.dir().to_owned())).unwrap();
        panic!("deliberate panic while the cluster runs");
    })
    .await
    .unwrap_err();
    assert!(panicked.is_panic());

    let (pids, dir) = pids_rx.recv().unwrap();
    assert_eq!(pids.len(), 6);
    for pid in pids {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        // Signal 0 checks a process exists; killed nodes are reaped, so no zombie is left.
        assert!(
            nix::sys::signal::kill(pid, None).is_err(),
            "{pid} outlived its cluster"
        );
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
