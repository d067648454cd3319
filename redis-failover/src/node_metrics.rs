//! A cluster client's counters per node: where its requests went, and
//! which nodes failed or redirected them, so that a hot or failing shard
//! shows (the client's own counters add every node up).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::addr::NodeAddr;
use crate::request::Sent;
use crate::retry::refusal_of;

/// A cluster client's figures for one node, from
/// [`FailoverClient::node_metrics`](crate::FailoverClient::node_metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeMetrics {
    /// The node.
    pub node: NodeAddr,
    /// Tries of requests routed by slot or to the node itself (each retry
    /// counts, and so does a try whose connection could not be opened).
    /// Not counted here: `WATCH` transactions, the first try of a
    /// `MasterPreferred` read, and reads a replica served (see
    /// [`MetricsSnapshot::replica_reads`](crate::MetricsSnapshot::replica_reads)).
    pub requests: u64,
    /// Tries that failed there: an error reply other than a redirect, a
    /// lost or refused connection, a durable write's `WAIT` short.
    pub failures: u64,
    /// `MOVED` and `ASK` replies it gave.
    pub redirects: u64,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    failures: AtomicU64,
    redirects: AtomicU64,
}

/// Every node's counts, kept until a reload of the slot map finds the node
/// gone (a node reached outside the map, through `ASK` or `query_on`,
/// shows until the next reload).
#[derive(Default)]
pub(crate) struct PerNode(Mutex<HashMap<NodeAddr, Counts>>);

impl PerNode {
    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<NodeAddr, Counts>> {
        // Counters are valid whatever a holder did when it panicked.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one try on `node` and what became of it.
    pub(crate) fn record(&self, node: &NodeAddr, sent: &Sent) {
        let (requests, failures, redirects) = match sent {
            Sent::Done(_) => (1, 0, 0),
            Sent::Failed(error) if matches!(refusal_of(error), Some("MOVED" | "ASK")) => (1, 0, 1),
            Sent::Failed(_) | Sent::Unreplicated(_) | Sent::Unreachable(_) => (1, 1, 0),
            // Not sent: nothing the node did.
            Sent::Held(_) | Sent::Refused(_) => return,
        };
        let mut nodes = self.nodes();
        let counts = match nodes.get(node) {
            Some(counts) => counts,
            None => nodes.entry(node.clone()).or_default(),
        };
        counts.requests.fetch_add(requests, Ordering::Relaxed);
        counts.failures.fetch_add(failures, Ordering::Relaxed);
        counts.redirects.fetch_add(redirects, Ordering::Relaxed);
    }

    /// Forgets the nodes that left the map.
    pub(crate) fn retain(&self, members: &HashSet<NodeAddr>) {
        self.nodes().retain(|node, _| members.contains(node));
    }

    /// Every node's figures, ordered by address.
    pub(crate) fn snapshot(&self) -> Vec<NodeMetrics> {
        let mut all: Vec<NodeMetrics> = self
            .nodes()
            .iter()
            .map(|(node, counts)| NodeMetrics {
                node: node.clone(),
                requests: counts.requests.load(Ordering::Relaxed),
                failures: counts.failures.load(Ordering::Relaxed),
                redirects: counts.redirects.load(Ordering::Relaxed),
            })
            .collect();
        all.sort_by(|a, b| (a.node.host(), a.node.port()).cmp(&(b.node.host(), b.node.port())));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Reply;

    #[test]
    fn tries_are_counted_by_what_became_of_them() {
        let per_node = PerNode::default();
        let (a, b): (NodeAddr, NodeAddr) = (
            "10.0.0.1:6379".parse().unwrap(),
            "10.0.0.2:6379".parse().unwrap(),
        );
        let moved =
            redis::make_extension_error("MOVED".to_owned(), Some("3999 10.0.0.2:6379".to_owned()));
        per_node.record(&a, &Sent::Done(Reply::Values(Vec::new())));
        per_node.record(&a, &Sent::Failed(moved));
        per_node.record(&b, &Sent::Unreachable("refused".into()));
        per_node.record(&b, &Sent::Held("loading".into()));
        let figures = |node: &NodeAddr, requests, failures, redirects| NodeMetrics {
            node: node.clone(),
            requests,
            failures,
            redirects,
        };
        assert_eq!(
            per_node.snapshot(),
            vec![figures(&a, 2, 0, 1), figures(&b, 1, 1, 0)]
        );
        per_node.retain(&HashSet::from([b.clone()]));
        assert_eq!(per_node.snapshot(), vec![figures(&b, 1, 1, 0)]);
    }
}
