//! The failover client's figures: its counters (`client.metrics()`), whether
//! it knows a master, and where durable writes stand.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use redis_failover::{FailoverClient, MetricsSnapshot, NodeMetrics};

use super::family::Family;

/// Reads one counter out of a snapshot.
type Field = fn(&MetricsSnapshot) -> u64;

/// The client's counters: the name after `redis_failover_` and before
/// `_total`, the help text, and the field.
const COUNTERS: [(&str, &str, Field); 12] = [
    (
        "master_changes",
        "Times the client switched to another master.",
        |m| m.master_changes,
    ),
    (
        "readonly_replies",
        "READONLY replies (a write reached a replica).",
        |m| m.readonly_replies,
    ),
    ("retries", "Requests sent again after a failure.", |m| {
        m.retries
    }),
    (
        "outcome_unknown",
        "Writes whose outcome is unknown (connection lost after sending).",
        |m| m.outcome_unknown,
    ),
    (
        "budget_exhausted",
        "Requests that failed after the retry budget.",
        |m| m.budget_exhausted,
    ),
    ("discoveries", "Master discoveries run.", |m| m.discoveries),
    ("fenced", "Writes refused by fencing.", |m| m.fenced),
    ("replica_reads", "Reads served by replicas.", |m| {
        m.replica_reads
    }),
    ("master_reads", "Reads served by the master.", |m| {
        m.master_reads
    }),
    (
        "unreplicated_writes",
        "Durable writes not acknowledged by enough replicas.",
        |m| m.unreplicated_writes,
    ),
    (
        "durable_writes_held",
        "Durable writes that waited for replicas before running.",
        |m| m.durable_writes_held,
    ),
    (
        "stale_masters_demoted",
        "Replaced masters made replicas by this client.",
        |m| m.stale_masters_demoted,
    ),
];

/// Reads the client at each scrape.
pub(crate) struct FailoverCollector {
    client: FailoverClient,
    counters: Vec<(Family, Field)>,
    master_known: Family,
    replicas_asked: Family,
    replicas_online: Family,
    replicas_waited_for: Family,
    durable_writes_blocked: Family,
    /// A cluster client's figures per node ([`NODE_COUNTERS`]).
    per_node: Vec<(Family, NodeField)>,
}

/// Reads one figure of a node.
type NodeField = fn(&NodeMetrics) -> u64;

/// A cluster client's figures per node: the name after
/// `redis_failover_node_` and before `_total`, the help text, and the field.
const NODE_COUNTERS: [(&str, &str, NodeField); 3] = [
    (
        "requests",
        "Tries sent to a cluster node (each retry counts).",
        |m| m.requests,
    ),
    (
        "failures",
        "Tries that failed on a cluster node: error replies other than redirects, and lost or refused connections.",
        |m| m.failures,
    ),
    (
        "redirects",
        "MOVED and ASK replies of a cluster node.",
        |m| m.redirects,
    ),
];

impl FailoverCollector {
    pub(crate) fn new(client: FailoverClient) -> Self {
        let counters = COUNTERS
            .iter()
            .map(|(name, help, field)| {
                let name = format!("redis_failover_{name}_total");
                (Family::counter(&name, help, &[]), *field)
            })
            .collect();
        Self {
            client,
            counters,
            master_known: Family::gauge(
                "redis_failover_master_known",
                "1 when the client knows a master.",
                &[],
            ),
            replicas_asked: Family::gauge(
                "redis_failover_replicas_asked",
                "Replicas durable writes ask for.",
                &[],
            ),
            replicas_online: Family::gauge(
                "redis_failover_replicas_online",
                "Replicas online at the master's last count (NaN: not counted yet).",
                &[],
            ),
            replicas_waited_for: Family::gauge(
                "redis_failover_replicas_waited_for",
                "Replicas durable writes wait for now: fewer than asked once one has been gone for redis_replica_lost_after.",
                &[],
            ),
            durable_writes_blocked: Family::gauge(
                "redis_failover_durable_writes_blocked",
                "1 while durable writes are held back: fewer replicas online than they wait for.",
                &[],
            ),
            per_node: NODE_COUNTERS
                .iter()
                .map(|(name, help, field)| {
                    let name = format!("redis_failover_node_{name}_total");
                    (Family::counter(&name, help, &["node"]), *field)
                })
                .collect(),
        }
    }
}

impl Collector for FailoverCollector {
    fn desc(&self) -> Vec<&Desc> {
        let gauges = [
            &self.master_known,
            &self.replicas_asked,
            &self.replicas_online,
            &self.replicas_waited_for,
            &self.durable_writes_blocked,
        ];
        self.counters
            .iter()
            .map(|(family, _)| family)
            .chain(gauges)
            .chain(self.per_node.iter().map(|(family, _)| family))
            .map(Family::desc)
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = self.client.metrics();
        let mut families: Vec<MetricFamily> = self
            .counters
            .iter()
            .map(|(family, field)| family.single(field(&snapshot)))
            .collect();
        // A cluster client knows "a master" once it has a slot map.
        let known = u8::from(self.client.masters_epoch().is_some());
        families.push(self.master_known.single(f64::from(known)));
        // Only a client whose writes wait for replicas has a replication
        // status; the others export none of these gauges.
        if let Some(status) = self.client.replication_status() {
            let online = status.online.map_or(f64::NAN, f64::from);
            let blocked = f64::from(u8::from(!status.writable()));
            families.extend([
                self.replicas_asked.single(f64::from(status.asked)),
                self.replicas_online.single(online),
                self.replicas_waited_for.single(f64::from(status.waits_for)),
                self.durable_writes_blocked.single(blocked),
            ]);
        }
        let nodes = self.client.node_metrics();
        // An empty family is not valid exposition: a one-master client has none.
        if !nodes.is_empty() {
            let names: Vec<String> = nodes.iter().map(|m| m.node.to_string()).collect();
            for (family, field) in &self.per_node {
                let samples = nodes.iter().zip(&names);
                families
                    .push(family.samples(samples.map(|(m, name)| (vec![name.as_str()], field(m)))));
            }
        }
        families
    }
}
