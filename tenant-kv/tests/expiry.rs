//! The expiry watcher against real Redis: `key_expiration` records written
//! once each, as soon as Redis expires the items, with no write to trigger
//! them; sweeps for the notifications missed; and a master change.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis_topology::Topology;
use serde_json::json;
use tenant_kv::{Actor, NewItem, Precondition, Quotas, TenantKv};

mod common;

use common::*;

const DEADLINE: Duration = Duration::from_secs(15);

fn expirations(records: &[HashMap<String, String>]) -> Vec<&HashMap<String, String>> {
    records
        .iter()
        .filter(|r| r["action"] == "key_expiration")
        .collect()
}

/// Waits until `node` holds `count` expiry records for `tenant`, and
/// returns them.
async fn expirations_on(
    topology: &Topology,
    node: redis_topology::NodeId,
    tenant: &str,
    count: usize,
) -> Vec<HashMap<String, String>> {
    let started = Instant::now();
    loop {
        let records = audit_on(topology, node, tenant).await;
        let found: Vec<_> = expirations(&records).into_iter().cloned().collect();
        if found.len() >= count {
            return found;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{} of {count} expiry records after {DEADLINE:?}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn notify_flags(topology: &Topology, node: redis_topology::NodeId) -> String {
    let (_, flags): (String, String) = topology
        .query(
            node,
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("notify-keyspace-events"),
        )
        .await
        .unwrap();
    flags
}

#[tokio::test]
async fn two_watchers_record_each_expiry_once_without_any_write() {
    let (topology, client) = start(1).await;
    let master = topology.initial_master();
    assert_eq!(notify_flags(&topology, master).await, "");
    // Two instances of a service, each with its own client and watcher.
    let store = TenantKv::builder(client).build().unwrap();
    let other = TenantKv::builder(common::client(&topology))
        .build()
        .unwrap();
    let watchers = [store.watch_expirations(), other.watch_expirations()];
    let started = Instant::now();
    while !notify_flags(&topology, master).await.contains('x') {
        assert!(started.elapsed() < DEADLINE, "notifications never enabled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let acme = store.tenant(tenant("acme"), Actor::user("alice"));
    acme.create("kept", NewItem::new(json!(0))).await.unwrap();
    for i in 0..20 {
        acme.create(
            &format!("short/{i}"),
            NewItem::new(json!(i)).ttl(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    }
    let records = expirations_on(&topology, master, "acme", 20).await;
    let mut keys: Vec<&str> = records.iter().map(|r| r["key"].as_str()).collect();
    keys.sort_unstable();
    let mut expected: Vec<String> = (0..20).map(|i| format!("short/{i}")).collect();
    expected.sort_unstable();
    assert_eq!(keys, expected);
    assert!(records.iter().all(|r| r["actor"] == "system"));

    // Nothing is left to purge, so no record can follow.
    assert_eq!(acme.purge_expired().await.unwrap(), 0);
    assert_eq!(expirations(&audit(&topology, "acme").await).len(), 20);
    assert_eq!(acme.list("", 100, None).await.unwrap().keys, ["kept"]);
    let usage = acme.usage().await.unwrap();
    assert_eq!(usage.keys, 1);
    for watcher in watchers {
        watcher.shutdown().await;
    }
}

#[tokio::test]
async fn expiries_missed_by_notifications_are_swept() {
    let (topology, client) = start(0).await;
    let master = topology.initial_master();
    let store = TenantKv::builder(client)
        .expiry_notifications(false)
        .expiry_sweep_interval(Duration::from_millis(300))
        .build()
        .unwrap();
    let acme = store.tenant(tenant("acme"), Actor::user("alice"));
    acme.create(
        "gone",
        NewItem::new(json!(1)).ttl(Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let started = Instant::now();
    while acme.get("gone").await.is_ok() {
        assert!(started.elapsed() < DEADLINE, "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Expired before any watcher ran: the first sweep finds it.
    let _watcher = store.watch_expirations();
    expirations_on(&topology, master, "acme", 1).await;
    // Notifications stay off: the periodic sweep finds the next one.
    acme.create(
        "later",
        NewItem::new(json!(2)).ttl(Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let records = expirations_on(&topology, master, "acme", 2).await;
    assert_eq!(records[1]["key"], "later");
    assert_eq!(notify_flags(&topology, master).await, "");
    assert_eq!(acme.usage().await.unwrap().keys, 0);
}

#[tokio::test]
async fn the_watcher_follows_a_new_master() {
    let (topology, client) = start(1).await;
    let store = TenantKv::builder(client).build().unwrap();
    let _watcher = store.watch_expirations();
    let acme = store.tenant(tenant("acme"), Actor::user("alice"));
    acme.create(
        "before",
        NewItem::new(json!(1)).ttl(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    let old = topology.initial_master();
    expirations_on(&topology, old, "acme", 1).await;

    let new = topology.data_nodes()[1];
    topology.promote(new).await.unwrap();
    // The write finds the new master; the watcher subscribes there and
    // turns its notifications on (each node keeps its own configuration).
    acme.create(
        "after",
        NewItem::new(json!(2)).ttl(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    let records = expirations_on(&topology, new, "acme", 2).await;
    assert_eq!(records[1]["key"], "after");
    assert!(notify_flags(&topology, new).await.contains('x'));
}

/// Polls `get` until the item is gone (Redis expired it).
async fn until_expired(acme: &tenant_kv::Tenant, key: &str) {
    let started = Instant::now();
    while acme.get(key).await.is_ok() {
        assert!(started.elapsed() < DEADLINE, "{key} never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn writes_purge_only_the_expired_items_they_need() {
    let (topology, client) = start(0).await;
    let store = TenantKv::builder(client)
        .quotas(Quotas::unlimited().max_keys(3))
        .build()
        .unwrap();
    let acme = store.tenant(tenant("acme"), Actor::user("alice"));
    let short = || NewItem::new(json!(1)).ttl(Duration::from_millis(50));
    for key in ["a", "b", "c"] {
        acme.create(key, short()).await.unwrap();
    }
    for key in ["a", "b", "c"] {
        until_expired(&acme, key).await;
    }
    // Writing over an expired item takes it out of the counters first, in
    // the same script, and leaves the others.
    acme.put("a", NewItem::new(json!(2)), Precondition::None)
        .await
        .unwrap();
    let records = audit(&topology, "acme").await;
    let tail: Vec<(&str, &str)> = records[3..]
        .iter()
        .map(|r| (r["action"].as_str(), r["key"].as_str()))
        .collect();
    assert_eq!(tail, [("key_expiration", "a"), ("create_key", "a")]);
    assert_eq!(acme.usage().await.unwrap().keys, 3, "b and c still counted");
    // A write the quota would refuse while expired items still count
    // purges them, then goes through.
    acme.create("d", NewItem::new(json!(3))).await.unwrap();
    let records = audit(&topology, "acme").await;
    let mut purged: Vec<&str> = expirations(&records)
        .iter()
        .map(|r| r["key"].as_str())
        .collect();
    purged.sort_unstable();
    assert_eq!(purged, ["a", "b", "c"]);
    assert_eq!(acme.usage().await.unwrap().keys, 2);
    assert_eq!(acme.list("", 10, None).await.unwrap().keys, ["a", "d"]);
}
