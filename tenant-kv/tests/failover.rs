//! Writes through a kill -9 failover: no acknowledged write lost, and
//! exactly one audit record for each write that took place.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis_failover::{Durability, FailoverClient, NodeAddr};
use redis_topology::Topology;
use serde_json::json;
use tenant_kv::{Actor, Error, NewItem, TenantId, TenantKv};

mod common;

use common::audit_on;

const DEADLINE: Duration = Duration::from_secs(30);

async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_killed_master_lose_nothing_acknowledged_and_audit_each_once() {
    let topology = Topology::builder().start().await.unwrap();
    let sentinels = topology.sentinel_addrs().into_iter().map(NodeAddr::from);
    // Acknowledged by both replicas: sure to be on whichever is promoted.
    let client = FailoverClient::sentinel(topology.master_name(), sentinels)
        .durability(Durability::Replicated {
            replicas: 2,
            timeout: Duration::from_secs(1),
        })
        .build()
        .unwrap();
    let store = TenantKv::builder(client).build().unwrap();
    let acme = store.tenant(TenantId::new("acme").unwrap(), Actor::system());

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..8)
        .map(|task| {
            let (acme, stop, acknowledged) = (acme.clone(), stop.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let (mut acked, mut uncertain, mut failed) = (Vec::new(), Vec::new(), Vec::new());
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("w{task}/{i:05}");
                    match acme.create(&key, NewItem::new(json!(i))).await {
                        Ok(_) => {
                            acked.push(key);
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                        // It ran (or may have): it may or may not be there.
                        Err(Error::Redis(
                            redis_failover::Error::OutcomeUnknown { .. }
                            | redis_failover::Error::NotReplicated { .. }
                            | redis_failover::Error::ReplicationUnknown { .. },
                        )) => uncertain.push(key),
                        Err(error) => failed.push(error.to_string()),
                    }
                }
                (acked, uncertain, failed)
            })
        })
        .collect();
    let count = || acknowledged.load(Ordering::Relaxed);
    wait_for("writes before the kill", || count() >= 200).await;
    let old = topology.initial_master();
    topology.kill(old).unwrap();
    let new = topology.wait_for_new_master(old, DEADLINE).await.unwrap();
    // The killed master returns as a replica, so `WAIT 2` can succeed again.
    topology.restart(old).await.unwrap();
    topology.replicate(old, new, DEADLINE).await.unwrap();
    let after = count();
    wait_for("writes on the new master", || count() >= after + 200).await;
    stop.store(true, Ordering::Relaxed);

    let (mut acked, mut uncertain) = (Vec::new(), Vec::new());
    for writer in writers {
        let (a, u, failed) = writer.await.unwrap();
        assert!(failed.is_empty(), "callers saw errors: {failed:?}");
        acked.extend(a);
        uncertain.extend(u);
    }
    let records = audit_on(&topology, new, "acme").await;
    let mut audited: HashMap<String, usize> = HashMap::new();
    for fields in &records {
        assert_eq!(fields["action"], "create_key");
        *audited.entry(fields["key"].clone()).or_default() += 1;
    }
    for key in &acked {
        assert!(acme.get(key).await.is_ok(), "acknowledged {key} was lost");
        assert_eq!(
            audited.get(key),
            Some(&1),
            "{key} audited {:?} times",
            audited.get(key)
        );
    }
    for key in &uncertain {
        let present = acme.get(key).await.is_ok();
        let records = audited.get(key).copied().unwrap_or(0);
        assert_eq!(
            records,
            usize::from(present),
            "{key}: present {present}, {records} records"
        );
    }
    assert_eq!(records.len(), audited.len(), "a key audited twice");
    println!(
        "{} acknowledged, {} uncertain, {} audit records",
        acked.len(),
        uncertain.len(),
        records.len()
    );
}
