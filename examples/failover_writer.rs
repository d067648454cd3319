//! Writes in a loop through a redis-failover client and prints its events,
//! while you kill the master by hand.
//!
//! Starts a local master, 2 replicas and 3 sentinels, prints the `kill`
//! command for the master, and then writes a counter every 10 ms: each
//! second it prints how many writes succeeded and failed, and every event
//! of the client (master changes with their trigger and delay, sentinel
//! disagreements) as it happens. Kill the master in another terminal and
//! watch the writes carry on. Ctrl-C stops everything.
//!
//! ```text
//! cargo run -p examples --bin failover-writer
//! ```

use std::error::Error;
use std::time::Duration;

use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let topology = Topology::builder().start().await?;
    let sentinels = topology.sentinel_addrs().into_iter().map(NodeAddr::from);
    let client = FailoverClient::sentinel(topology.master_name(), sentinels).build()?;
    let master = client.wait_for_master(Duration::from_secs(10)).await?;
    println!("master is {}", master.node);
    for node in topology.data_nodes() {
        if let Some(pid) = topology.pid(node) {
            println!("  {node} at {}: kill -9 {pid}", topology.addr(node));
        }
    }
    println!("writing every 10 ms; kill the master and watch (Ctrl-C stops)");

    let mut events = client.events();
    let mut connection = client.idempotent_connection();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let (mut written, mut failed) = (0u64, 0u64);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            event = events.recv() => match event {
                Ok(event) => println!("event: {event:?}"),
                Err(error) => println!("events: {error}"),
            },
            _ = report.tick() => println!("{written} writes succeeded, {failed} failed"),
            _ = tick.tick() => {
                let result: redis::RedisResult<()> = redis::cmd("SET")
                    .arg("counter")
                    .arg(written)
                    .query_async(&mut connection)
                    .await;
                match result {
                    Ok(()) => written += 1,
                    Err(error) => {
                        failed += 1;
                        println!("write failed: {error}");
                    }
                }
            }
        }
    }
    println!("stopped after {written} writes, {failed} failures");
    Ok(())
}
