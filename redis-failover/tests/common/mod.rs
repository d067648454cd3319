//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use redis_failover::{FailoverClient, FailoverClientBuilder, NodeAddr, StaticResolver};
use redis_topology::{Cluster, NodeId, Role, Shard, Topology, slot_of};

pub const DEADLINE: Duration = Duration::from_secs(30);
/// Sentinel demotes a returning old master after it looked sane for 8 s.
pub const REJOIN_DEADLINE: Duration = Duration::from_secs(60);

/// Polls `done` every 20 ms until it holds, failing the test at `deadline`.
pub async fn eventually(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Sentinel-mode client builder for `topology`'s sentinels.
pub fn sentinel_builder(topology: &Topology) -> FailoverClientBuilder {
    let sentinels = topology.sentinel_addrs().into_iter().map(NodeAddr::from);
    FailoverClient::sentinel(topology.master_name(), sentinels)
}

pub fn sentinel_client(topology: &Topology) -> FailoverClient {
    sentinel_builder(topology).build().unwrap()
}

/// A Sentinel-mode client that never re-checks on its own: only the
/// sentinel watchers can tell it of a switch.
pub fn watcher_only_client(topology: &Topology) -> FailoverClient {
    sentinel_builder(topology)
        .recheck_interval(Duration::from_secs(3600))
        .build()
        .unwrap()
}

/// `redis-N.redis-headless:6379` names for the data nodes, resolved to
/// their loopback ports as a headless Service resolves pod names.
pub fn pod_names(topology: &Topology) -> (StaticResolver, Vec<NodeAddr>) {
    let resolver = StaticResolver::new();
    let names = topology
        .data_nodes()
        .into_iter()
        .map(|node| {
            let name = pod_name(node);
            resolver.insert(name.clone(), topology.addr(node));
            name
        })
        .collect();
    (resolver, names)
}

pub fn pod_name(node: NodeId) -> NodeAddr {
    NodeAddr::new(format!("{node}.redis-headless"), 6379).unwrap()
}

/// How many times `node` ran `command` (lower case), from `INFO commandstats`.
pub async fn command_calls(topology: &Topology, node: NodeId, command: &str) -> u64 {
    let started = Instant::now();
    let info: String = loop {
        match topology
            .query(node, redis::cmd("INFO").arg("commandstats"))
            .await
        {
            Ok(info) => break info,
            // Closed by Sentinel reconfiguring the node: ask again.
            Err(error) => assert!(started.elapsed() < DEADLINE, "{node}: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Watches `old`, resumed after it was replaced, until Sentinel demotes it
/// (some seconds later): while it still claims master, its count of SETs
/// must stay at `expected`. Once it replicates, replicated SETs count too,
/// so each sample reads the count before the role. Fails unless it was
/// seen claiming master at least once.
pub async fn assert_no_sets_while_master(topology: &Topology, old: NodeId, expected: u64) {
    let (started, mut samples_while_master) = (Instant::now(), 0);
    loop {
        assert!(
            started.elapsed() < REJOIN_DEADLINE,
            "the old master was never demoted"
        );
        let calls = command_calls(topology, old, "set").await;
        match topology.role(old).await {
            Ok(Role::Primary { .. }) => {
                assert_eq!(calls, expected, "a write reached the replaced master");
                samples_while_master += 1;
            }
            Ok(_) => break,
            // Sentinel closes every client's connection as it demotes a
            // node: the sample is taken again.
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        samples_while_master > 0,
        "the old master was never seen claiming master"
    );
}

/// The keys among `keys` that `node` does not hold.
pub async fn missing_keys(topology: &Topology, node: NodeId, keys: &[String]) -> Vec<String> {
    let mut missing = Vec::new();
    for key in keys {
        let exists: bool = topology
            .query(node, redis::cmd("EXISTS").arg(key))
            .await
            .unwrap();
        if !exists {
            missing.push(key.clone());
        }
    }
    missing
}

/// Whether `binary` is on `PATH`.
pub fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
}

/// A topology builder running Valkey, or `None` (the test says it is
/// skipped) when `valkey-server` is not installed: Valkey-only tests run
/// in both CI passes, on Valkey whatever `REDIS_SERVER_BIN` says.
pub fn valkey() -> Option<redis_topology::TopologyBuilder> {
    if !on_path("valkey-server") {
        println!("skipped: valkey-server not installed");
        return None;
    }
    let builder = Topology::builder().redis_server("valkey-server");
    Some(if on_path("valkey-cli") {
        builder.redis_cli("valkey-cli")
    } else {
        builder
    })
}

/// A local Redis Cluster of 3 shards of a master and a replica.
pub async fn cluster() -> Cluster {
    Cluster::builder()
        .shards(3)
        .replicas_per_shard(1)
        .start()
        .await
        .unwrap()
}

/// Every node of `cluster`, as seeds of a cluster client.
pub fn cluster_seeds(cluster: &Cluster) -> Vec<NodeAddr> {
    cluster
        .nodes()
        .into_iter()
        .map(|n| addr_of(cluster, n))
        .collect()
}

/// The address of a cluster node, as the client names it.
pub fn addr_of(cluster: &Cluster, node: NodeId) -> NodeAddr {
    NodeAddr::from(cluster.addr(node))
}

/// A key whose slot `shard` serves.
pub fn key_in(shard: &Shard, stem: &str) -> String {
    (0..)
        .map(|n| format!("{stem}-{n}"))
        .find(|key| shard.slots.iter().any(|r| r.contains(&slot_of(key))))
        .unwrap()
}
