//! Baseline throughput of the Redis client stack on this machine.
//!
//! Starts a lone local master and runs `SET` from 64 and 256 concurrent
//! tasks through (1) one redis-rs multiplexed connection shared by every
//! task, the baseline, and (2) a bb8-redis pool handing each command an
//! exclusive connection. Every later client of this workspace is measured
//! against (1) the same way.
//!
//! ```text
//! cargo bench -p benches --bench baseline
//! BENCH_SECONDS=5 BENCH_ROUNDS=5 cargo bench -p benches --bench baseline
//! ```

use benches::{Settings, Variant, compare, report};
use redis_topology::Topology;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings::from_env();
    let topology = Topology::builder().replicas(0).sentinels(0).start().await?;
    let master = topology.initial_master();
    let client = redis::Client::open(topology.connection_info(master))?;

    let shared = client.get_multiplexed_async_connection().await?;
    let pool = bb8::Pool::builder()
        .max_size(32)
        .build(bb8_redis::RedisConnectionManager::new(
            topology.connection_info(master),
        )?)
        .await?;

    let variants = [
        Variant::new("multiplexed connection, shared", move |task| {
            let mut connection = shared.clone();
            async move {
                redis::cmd("SET")
                    .arg(format!("bench:{task}"))
                    .arg("value")
                    .query_async::<()>(&mut connection)
                    .await
                    .map_err(|e| e.to_string())
            }
        }),
        Variant::new("bb8-redis, exclusive checkout (32)", move |task| {
            let pool = pool.clone();
            async move {
                let mut connection = pool.get().await.map_err(|e| e.to_string())?;
                redis::cmd("SET")
                    .arg(format!("bench:{task}"))
                    .arg("value")
                    .query_async::<()>(&mut *connection)
                    .await
                    .map_err(|e| e.to_string())
            }
        }),
    ];
    println!(
        "SET against a lone local master; {} rounds of {:?} per variant",
        settings.rounds, settings.duration
    );
    for tasks in [64, 256] {
        let measurements = compare(&variants, tasks, settings).await;
        print!("{}", report(&variants, tasks, &measurements));
    }
    Ok(())
}
