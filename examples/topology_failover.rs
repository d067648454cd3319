//! Kills the master of a real local topology and watches Sentinel recover.
//!
//! Starts a master, 2 replicas and 3 sentinels, writes a key, SIGKILLs the
//! master, and reports how long the sentinels took to agree on a new master,
//! when the remaining replica followed it, and when the old master, started
//! again on its old port, rejoined as a replica. Every process is gone when
//! it ends.
//!
//! ```text
//! cargo run -p examples --bin topology-failover
//! ```

use std::error::Error;
use std::time::{Duration, Instant};

use redis_topology::Topology;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let topology = Topology::builder().replicas(2).sentinels(3).start().await?;
    let old = topology.initial_master();
    println!("{old} is master at {}", topology.addr(old));

    // Acknowledged by both replicas, so the key survives the kill below.
    let acked = topology.set_and_wait(old, "greeting", "hello", 2).await?;
    println!("greeting written, acknowledged by {acked} replicas");

    let killed_at = Instant::now();
    topology.kill(old)?;
    println!("killed {old}");

    let new = topology.wait_for_new_master(old, DEADLINE).await?;
    println!(
        "{:>6} ms  every sentinel names {new} ({}) as master",
        killed_at.elapsed().as_millis(),
        topology.addr(new)
    );

    for replica in topology.data_nodes() {
        if replica != old && replica != new {
            topology.wait_for_replica_of(replica, new, DEADLINE).await?;
            println!(
                "{:>6} ms  {replica} replicates from {new}",
                killed_at.elapsed().as_millis()
            );
        }
    }

    let greeting: Option<String> = topology
        .query(new, redis::cmd("GET").arg("greeting"))
        .await?;
    println!("greeting on {new}: {greeting:?}");

    topology.restart(old).await?;
    println!(
        "{:>6} ms  {old} restarted on its old port, still claiming to be master",
        killed_at.elapsed().as_millis()
    );
    topology.wait_for_replica_of(old, new, DEADLINE).await?;
    println!(
        "{:>6} ms  Sentinel turned {old} into a replica of {new}",
        killed_at.elapsed().as_millis()
    );
    Ok(())
}
