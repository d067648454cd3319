//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;
use tenant_kv::{TenantId, TenantKv};

/// A master with `replicas` replicas and no sentinel, and a client that
/// finds the master among them.
pub async fn start(replicas: usize) -> (Topology, FailoverClient) {
    let topology = Topology::builder()
        .replicas(replicas)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let client = client(&topology);
    (topology, client)
}

/// Another client of `topology`'s data nodes.
pub fn client(topology: &Topology) -> FailoverClient {
    let nodes = topology
        .data_nodes()
        .into_iter()
        .map(|n| NodeAddr::from(topology.addr(n)));
    FailoverClient::candidates(nodes).build().unwrap()
}

pub fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

/// `XRANGE` of the tenant's whole audit stream, then the lines staged
/// on its staging list, in one transaction.
fn audit_range(tenant: &str) -> redis::Pipeline {
    let stream = format!("tenant:{{{tenant}}}:audit");
    let mut read = redis::pipe();
    read.atomic()
        .cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .cmd("LRANGE")
        .arg(format!("{stream}:staged"))
        .arg(0)
        .arg(-1);
    read
}

/// What an audit stream's entries and staged lines (see [`audit_range`])
/// hold: its records, oldest first (the staged ones last), as field maps.
type AuditRange = (Vec<(String, HashMap<String, String>)>, Vec<String>);

fn audit_records((entries, staged): AuditRange) -> Vec<HashMap<String, String>> {
    let staged = staged
        .into_iter()
        .map(|line| HashMap::from([("records".to_owned(), line)]));
    entries
        .into_iter()
        .map(|(_, fields)| fields)
        .chain(staged)
        .flat_map(|entry| tenant_kv::audit_records(entry).unwrap())
        .collect()
}

/// The tenant's audit records, oldest first, as field maps, from `node`.
pub async fn audit_on(
    topology: &Topology,
    node: redis_topology::NodeId,
    tenant: &str,
) -> Vec<HashMap<String, String>> {
    let mut connection = topology.connection(node).await.unwrap();
    audit_records(
        audit_range(tenant)
            .query_async(&mut connection)
            .await
            .unwrap(),
    )
}

/// The tenant's audit records, oldest first, as field maps, read through
/// `client` (from the master of the tenant's slot, on a cluster).
pub async fn audit_through(client: &FailoverClient, tenant: &str) -> Vec<HashMap<String, String>> {
    audit_records(client.query_pipeline(&audit_range(tenant)).await.unwrap())
}

/// The tenant's audit records on the initial master.
pub async fn audit(topology: &Topology, tenant: &str) -> Vec<HashMap<String, String>> {
    audit_on(topology, topology.initial_master(), tenant).await
}

/// The actions of audit records, in order.
pub fn actions(records: &[HashMap<String, String>]) -> Vec<&str> {
    records.iter().map(|r| r["action"].as_str()).collect()
}

/// Waits (up to 20 s) until the tenant's audit stream on the initial
/// master holds `count` records: records some operations write off their
/// caller's path (failed logins).
pub async fn until_audited(topology: &Topology, tenant: &str, count: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while audit(topology, tenant).await.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "{tenant} never had {count} audit records"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// How long the waiting helpers wait for what they wait for.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `done` (without sleeping: a check is what is timed) until it
/// holds; returns how long that took. Panics after [`DEADLINE`].
pub async fn time_until<F: Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) -> Duration {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
    started.elapsed()
}

/// Reads `name` until a lookup is answered from the cache.
pub async fn until_cached(store: &TenantKv, name: &str) {
    let users = store.users();
    let hits = store.auth_cache_stats().hits;
    time_until("a cache hit", || {
        let users = users.clone();
        async move {
            users.get(name).await.unwrap();
            store.auth_cache_stats().hits > hits
        }
    })
    .await;
}
