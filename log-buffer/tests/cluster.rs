//! Buffering and offloading on a real Redis Cluster (3 masters, 1 replica
//! each), with tenants' streams on every shard: every record reaches Loki,
//! also after one tenant's slot moved to another master.

use std::collections::BTreeSet;
use std::time::Duration;

use log_buffer::{LogBuffer, LokiSink, Offloader, log_stream};
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::{Cluster, slot_of};
use tracing_subscriber::layer::SubscriberExt;

mod common;

use common::*;

const PER_PHASE: u64 = 20;

/// One tenant per shard, and a second on the first shard.
async fn spread_tenants(cluster: &Cluster) -> Vec<String> {
    let shards = cluster.shards().await.unwrap();
    let mut tenants = Vec::new();
    for (index, shard) in shards.iter().enumerate() {
        let wanted = if index == 0 { 2 } else { 1 };
        tenants.extend(
            (0..)
                .map(|n| format!("t{n}"))
                .filter(|id| {
                    let slot = slot_of(log_stream(id));
                    shard.slots.iter().any(|range| range.contains(&slot))
                })
                .take(wanted),
        );
    }
    tenants
}

/// Every `i` delivered for `tenant`.
fn delivered(receiver: &Receiver, tenant: &str) -> BTreeSet<u64> {
    receiver
        .lines(tenant)
        .iter()
        .map(|(_, line, _)| {
            let fields: std::collections::BTreeMap<String, String> =
                serde_json::from_str(line).unwrap();
            fields["i"].parse().unwrap()
        })
        .collect()
}

async fn all_delivered(receiver: &Receiver, tenants: &[String], upto: u64) {
    eventually("every record delivered", || async {
        tenants
            .iter()
            .all(|tenant| delivered(receiver, tenant) == (0..upto).collect())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_tenants_on_every_shard_reach_loki_through_a_slot_move() {
    let cluster = Cluster::builder()
        .shards(3)
        .replicas_per_shard(1)
        .start()
        .await
        .unwrap();
    let seeds = cluster
        .nodes()
        .into_iter()
        .map(|n| NodeAddr::from(cluster.addr(n)));
    let client = FailoverClient::cluster(seeds).build().unwrap();
    let tenants = spread_tenants(&cluster).await;
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
    let emit = |phase: u64| {
        for i in phase * PER_PHASE..(phase + 1) * PER_PHASE {
            for tenant in &tenants {
                tracing::info!(tenant_id = tenant.as_str(), i, "tick");
            }
        }
    };

    emit(0);
    all_delivered(&receiver, &tenants, PER_PHASE).await;

    // The first tenant's slot, stream and consumer group included, to the
    // last shard's master: appends and reads follow it there.
    let moved = &tenants[0];
    let slot = slot_of(log_stream(moved));
    let shards = cluster.shards().await.unwrap();
    let target = shards.last().unwrap().master;
    cluster.move_slot(slot, target).await.unwrap();
    emit(1);
    all_delivered(&receiver, &tenants, 2 * PER_PHASE).await;
    assert_eq!(
        client.master_of(&log_stream(moved)),
        Some(NodeAddr::from(cluster.addr(target)))
    );
    // Acknowledged and deleted on the new master, once Loki took them.
    eventually("delivered entries deleted", || async {
        let depth: u64 = client
            .query(redis::cmd("XLEN").arg(log_stream(moved)))
            .await
            .unwrap();
        depth == 0
    })
    .await;

    drop(guard);
    let metrics = buffer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        metrics.appended,
        2 * PER_PHASE * tenants.len() as u64,
        "{metrics:?}"
    );
    offloader.shutdown(Duration::from_secs(5)).await;
}
