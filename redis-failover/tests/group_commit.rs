//! Durable writes sharing their `WAIT`s, against a real master and replica.

use std::time::Duration;

use futures_util::future::join_all;
use redis_failover::{Durability, FailoverClient};
use redis_topology::{NodeId, Topology};

mod common;

const TASKS: usize = 32;
const WRITES_PER_TASK: usize = 10;

/// A master and its replica, and a client of the master whose writes wait
/// (up to 5 s) for the replica.
async fn master_and_replica() -> (Topology, NodeId, NodeId, FailoverClient) {
    let topology = Topology::builder()
        .replicas(1)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let master = topology.initial_master();
    let replica = topology
        .data_nodes()
        .into_iter()
        .find(|node| *node != master)
        .unwrap();
    let client = FailoverClient::candidates([topology.addr(master).into()])
        .durability(Durability::Replicated {
            replicas: 1,
            timeout: Duration::from_secs(5),
        })
        .build()
        .unwrap();
    (topology, master, replica, client)
}

/// Each write is on the replica once acknowledged (the `WAIT` that counted
/// it was sent after it), and the writes of concurrent callers share
/// their `WAIT`s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_durable_writes_share_waits_and_are_on_the_replica_once_acknowledged() {
    let (topology, master, replica, client) = master_and_replica().await;
    let on_replica = redis::Client::open(topology.connection_info(replica))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let tasks = (0..TASKS).map(|task| {
        let (client, mut on_replica) = (client.clone(), on_replica.clone());
        async move {
            for write in 0..WRITES_PER_TASK {
                let key = format!("durable:{task}:{write}");
                client.set(&key, write).await.unwrap();
                let replicated: Option<usize> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut on_replica)
                    .await
                    .unwrap();
                assert_eq!(
                    replicated,
                    Some(write),
                    "{key} acknowledged, not on the replica"
                );
            }
        }
    });
    join_all(tasks).await;
    let writes = (TASKS * WRITES_PER_TASK) as u64;
    let waits = common::command_calls(&topology, master, "wait").await;
    assert!(
        waits < writes,
        "{writes} concurrent durable writes sent {waits} WAITs"
    );
}

/// A durable write whose caller gave up while it waited for its batch is
/// never sent, and the lane goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_write_given_up_before_its_batch_is_never_sent() {
    let (topology, master, replica, client) = master_and_replica().await;
    client.set("before", 0).await.unwrap();
    // With the replica stopped, the `WAIT` ending the next batch holds the
    // lane for its whole timeout.
    topology.pause(replica).unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.set("first", 1).await }
    });
    let started = std::time::Instant::now();
    loop {
        let ran: Option<u32> = topology
            .query(master, redis::cmd("GET").arg("first"))
            .await
            .unwrap();
        if ran.is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "first never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let given_up =
        tokio::time::timeout(Duration::from_millis(100), client.set("given-up", 2)).await;
    assert!(
        given_up.is_err(),
        "answered while the first batch's WAIT waited"
    );

    let first = first.await.unwrap();
    topology.resume(replica).unwrap();
    assert!(
        matches!(
            first,
            Err(redis_failover::Error::NotReplicated {
                acked: 0,
                required: 1,
                ..
            })
        ),
        "{first:?}"
    );
    client.set("after", 3).await.unwrap();
    let given_up: Option<u32> = topology
        .query(master, redis::cmd("GET").arg("given-up"))
        .await
        .unwrap();
    assert_eq!(given_up, None, "sent though its caller gave up");
}
