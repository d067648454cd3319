//! Reads from replicas with a staleness bound, a read-your-writes session
//! and durable writes, while you pause a replica by hand.
//!
//! Starts a local master, 2 replicas and 3 sentinels, prints the
//! `kill -STOP` / `kill -CONT` commands for each replica, and then every
//! 500 ms writes a counter through a session (durably: one replica must
//! acknowledge it) and reads it back, printing which replicas may serve
//! reads and why the others may not. Pause a replica and watch it leave
//! the read set within the 1 s staleness bound, then resume it and watch
//! it come back once it has caught up. Ctrl-C stops everything.
//!
//! ```text
//! cargo run -p examples --bin replica-reads
//! ```

use std::error::Error;
use std::time::Duration;

use redis_failover::{Durability, Event, FailoverClient, NodeAddr, ReadPolicy};
use redis_topology::Topology;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let topology = Topology::builder().start().await?;
    let sentinels = topology.sentinel_addrs().into_iter().map(NodeAddr::from);
    let client = FailoverClient::sentinel(topology.master_name(), sentinels)
        .read_policy(ReadPolicy::ReplicaPreferred)
        .max_staleness(Duration::from_secs(1))
        .replica_probe_interval(Duration::from_millis(200))
        .durability(Durability::Replicated {
            replicas: 1,
            timeout: Duration::from_millis(500),
        })
        .build()?;
    let master = client.wait_for_master(Duration::from_secs(10)).await?;
    println!("master is {}", master.node);
    for node in topology.data_nodes().into_iter().skip(1) {
        if let Some(pid) = topology.pid(node) {
            let addr = topology.addr(node);
            println!("  replica {node} at {addr}: kill -STOP {pid}, then kill -CONT {pid}");
        }
    }
    println!("writing and reading back every 500 ms (Ctrl-C stops)");

    let session = client.session();
    let mut events = client.events();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for counter in 0u64.. {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            event = events.recv() => match event {
                Ok(event @ (Event::ReplicaUsable { .. } | Event::ReplicaUnusable { .. })) => {
                    println!("event: {event:?}");
                }
                Ok(_) => {}
                Err(error) => println!("events: {error}"),
            },
            _ = tick.tick() => {
                if let Err(error) = session.set("counter", counter).await {
                    println!("write failed: {error}");
                    continue;
                }
                let read: u64 = session.get("counter").await?;
                let replicas: Vec<String> = client
                    .replicas()
                    .into_iter()
                    .map(|r| match r.unusable {
                        None => format!("{} usable", r.node),
                        Some(why) => format!("{} unusable: {why}", r.node),
                    })
                    .collect();
                let metrics = client.metrics();
                println!(
                    "wrote {counter}, read {read}; {} replica reads, {} master reads so far; {}",
                    metrics.replica_reads,
                    metrics.master_reads + metrics.session_fallbacks,
                    replicas.join("; ")
                );
            }
        }
    }
    Ok(())
}
