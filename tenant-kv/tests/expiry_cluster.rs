//! The expiry watcher on a real Redis Cluster (3 masters): items of
//! tenants on every shard get their `key_expiration` records, although
//! each master publishes, and scans, only its own keys.

use std::time::{Duration, Instant};

use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::{Cluster, slot_of};
use serde_json::json;
use tenant_kv::{Actor, NewItem, TenantKv};

mod common;

use common::{audit_through, tenant};

const DEADLINE: Duration = Duration::from_secs(15);
const ITEMS: usize = 3;

/// Two tenants on each shard: their keys' hash tag is the tenant's id.
async fn tenants_on_every_shard(cluster: &Cluster) -> Vec<String> {
    let shards = cluster.shards().await.unwrap();
    let mut per_shard = vec![0; shards.len()];
    let mut chosen = Vec::new();
    for n in 0.. {
        let id = format!("t{n}");
        let slot = slot_of(&id);
        let shard = shards
            .iter()
            .position(|s| s.slots.iter().any(|r| r.contains(&slot)))
            .unwrap();
        if per_shard[shard] < 2 {
            per_shard[shard] += 1;
            chosen.push(id);
        }
        if per_shard.iter().all(|&n| n == 2) {
            return chosen;
        }
    }
    unreachable!("the loop returns")
}

/// How many `key_expiration` audit records `tenant` has (read from the
/// master of its slot).
async fn expiry_records(client: &FailoverClient, tenant: &str) -> usize {
    audit_through(client, tenant)
        .await
        .iter()
        .filter(|record| record["action"] == "key_expiration")
        .count()
}

/// Polls `done` every 20 ms until it holds, failing at the deadline.
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_expiring_on_every_shard_are_recorded() {
    let cluster = Cluster::builder()
        .shards(3)
        .replicas_per_shard(0)
        .start()
        .await
        .unwrap();
    let seeds = cluster.nodes().into_iter().map(|n| cluster.addr(n).into());
    let client = FailoverClient::cluster(seeds).build().unwrap();
    let store = TenantKv::builder(client.clone()).build().unwrap();
    let watcher = store.watch_expirations();
    // Once every master publishes expiries, the watcher is subscribed.
    eventually("notifications on every master", async || {
        let masters: Vec<NodeAddr> = client.masters();
        let mut on = masters.len() == 3;
        for master in &masters {
            let get = redis::cmd("CONFIG")
                .arg("GET")
                .arg("notify-keyspace-events")
                .clone();
            let (_, flags): (String, String) = client.query_on(master, &get).await.unwrap();
            on &= flags.contains('x');
        }
        on
    })
    .await;

    let tenants = tenants_on_every_shard(&cluster).await;
    for id in &tenants {
        let items = store.tenant(tenant(id), Actor::user("alice"));
        for i in 0..ITEMS {
            let item = NewItem::new(json!(i)).ttl(Duration::from_millis(200));
            items.create(&format!("short/{i}"), item).await.unwrap();
        }
    }
    for id in &tenants {
        eventually(&format!("{id}'s expiry records"), async || {
            expiry_records(&client, id).await >= ITEMS
        })
        .await;
        assert_eq!(expiry_records(&client, id).await, ITEMS);
    }
    watcher.shutdown().await;
}
