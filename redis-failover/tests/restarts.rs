//! A master killed and started again at once, before anything fails over:
//! the client reports the restart and installs the node as a new master.
//! Without persistence the restarted master is empty and its replica
//! empties itself to follow it (Redis's documented hazard); with AOF it
//! keeps what it acknowledged.

use std::time::Duration;

use redis_failover::{Event, FailoverClient};
use redis_topology::Topology;

mod common;

/// A master and its replica, with persistence (AOF, an fsync per write)
/// or without; a client that writes `before`, sees the master killed and
/// started again at once, reads and writes again. Returns the topology,
/// the client, the restart events seen (each with whether the replication
/// history is new) and whether writes moved to a new generation of the
/// same node.
async fn write_through_a_restart(persistent: bool) -> (Topology, FailoverClient, Vec<bool>, bool) {
    let mut builder = Topology::builder().replicas(1).sentinels(0);
    if persistent {
        builder = builder
            .extra_config("appendonly yes")
            .extra_config("appendfsync always");
    }
    let topology = builder.start().await.unwrap();
    let (master, replica) = (topology.initial_master(), topology.data_nodes()[1]);
    let client = FailoverClient::candidates([topology.addr(master).into()])
        .retry_budget(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut events = client.events();
    client.set("before", 1).await.unwrap();
    topology.kill(master).unwrap();
    topology.restart(master).await.unwrap();
    // Its replica follows it again (after a full resynchronisation if it
    // is new).
    topology
        .wait_for_replica_of(replica, master, common::DEADLINE)
        .await
        .unwrap();
    // A read first: it is resent over a new connection, whereas a write
    // sent on the dead one has an unknown outcome.
    let _: Option<i64> = client.get("before").await.unwrap();
    client.set("after", 2).await.unwrap();

    let (mut restarted, mut reinstalled) = (Vec::new(), false);
    while let Ok(event) = events.try_recv() {
        match event {
            Event::MasterRestarted {
                replication_id_changed,
                ..
            } => restarted.push(replication_id_changed),
            Event::MasterChanged {
                from: Some(from),
                to,
                ..
            } if from == to => reinstalled = true,
            _ => {}
        }
    }
    (topology, client, restarted, reinstalled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_empty_is_reported_and_its_data_is_gone_everywhere() {
    let (topology, client, restarted, reinstalled) = write_through_a_restart(false).await;
    assert_eq!(
        restarted,
        vec![true],
        "one restart, with a new replication history"
    );
    assert!(reinstalled, "installed again as a new master");
    assert_eq!(client.metrics().master_restarts, 1);
    // The hazard: the acknowledged write is gone from the master and from
    // the replica that had it.
    for node in topology.data_nodes() {
        let before: Option<i64> = topology
            .query(node, redis::cmd("GET").arg("before"))
            .await
            .unwrap();
        assert_eq!(
            before, None,
            "{node} kept a write the empty master never had"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_with_aof_is_reported_and_keeps_what_it_acknowledged() {
    let (_topology, client, restarted, reinstalled) = write_through_a_restart(true).await;
    assert_eq!(restarted.len(), 1, "one restart");
    assert!(reinstalled, "installed again as a new master");
    let before: Option<i64> = client.get("before").await.unwrap();
    assert_eq!(before, Some(1));
}
