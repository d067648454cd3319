//! Logging and offloading through a kill -9 of the Redis master under
//! Sentinel: the producer drops nothing and the offloader keeps shipping.

use std::collections::BTreeSet;
use std::time::Duration;

use log_buffer::{LogBuffer, LokiSink, Offloader};
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;
use tracing_subscriber::layer::SubscriberExt;

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_offloader_carry_on_through_a_master_kill() {
    const EVENTS: u64 = 300;
    const KILL_AT: u64 = 100;
    let topology = Topology::builder().start().await.unwrap();
    let sentinels = topology.sentinel_addrs().into_iter().map(NodeAddr::from);
    let client = FailoverClient::sentinel(topology.master_name(), sentinels)
        .build()
        .unwrap();
    let receiver = Receiver::start().await;
    let buffer = LogBuffer::builder(client.clone()).start().unwrap();
    let offloader = Offloader::builder(
        client.clone(),
        LokiSink::builder(&receiver.url).build().unwrap(),
    )
    .poll_interval(Duration::from_millis(20))
    .discovery_interval(Duration::from_millis(200))
    .start()
    .unwrap();

    let guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(buffer.layer()));
    for i in 0..EVENTS {
        if i == KILL_AT {
            topology.kill(topology.initial_master()).unwrap();
        }
        tracing::info!(tenant_id = "acme", i, "tick");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(guard);
    let metrics = buffer.shutdown(Duration::from_secs(30)).await;
    assert_eq!(metrics.queued, EVENTS);
    assert_eq!(metrics.appended, EVENTS, "{metrics:?}");
    assert_eq!(metrics.dropped_redis_failed, 0);

    // Everything emitted after the kill was appended to the new master and
    // must arrive; before it, an append the old master had not replicated
    // yet may be lost with it (asynchronous replication).
    let delivered = || -> BTreeSet<u64> {
        receiver
            .lines("acme")
            .iter()
            .map(|(_, line, _)| {
                let fields: std::collections::BTreeMap<String, String> =
                    serde_json::from_str(line).unwrap();
                fields["i"].parse().unwrap()
            })
            .collect()
    };
    eventually("every event since the kill delivered", || async {
        (KILL_AT..EVENTS).all(|i| delivered().contains(&i))
    })
    .await;
    let lost = EVENTS - delivered().len() as u64;
    assert!(lost <= 5, "{lost} events lost");
    offloader.shutdown(Duration::from_secs(5)).await;
}
