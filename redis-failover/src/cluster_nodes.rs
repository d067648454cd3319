//! What a cluster client keeps per master besides its shared connection:
//! the lane of durable writes ([`crate::group_commit`]) and the pool of
//! dedicated connections (blocking commands, transactions), opened on
//! first use, like the one master's in the other modes.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::RedisError;
use redis::aio::MultiplexedConnection;

use crate::addr::NodeAddr;
use crate::cluster_state::ClusterShared;
use crate::dedicated::dedicated_pool;
use crate::durable::{Ack, Acked};
use crate::events::Telemetry;
use crate::group_commit::LaneHost;
use crate::lane::LaneSlot;
use crate::node::{Connector, DedicatedManager, MasterCheck, MasterManager};
use crate::persisted::AofSupport;
use crate::request::Sent;

/// One master's connections of its own.
pub(crate) struct ClusterNode {
    pub(crate) node: NodeAddr,
    pub(crate) lane: LaneSlot,
    pub(crate) dedicated: bb8::Pool<DedicatedManager>,
    /// Whether it was seen to acknowledge persisted writes (`WAITAOF`).
    pub(crate) aof: AofSupport,
}

/// Every master's [`ClusterNode`], by address.
pub(crate) struct ClusterNodes {
    nodes: Mutex<HashMap<NodeAddr, Arc<ClusterNode>>>,
    /// The most dedicated connections open to one master.
    pub(crate) dedicated_connections: u32,
}

impl ClusterNodes {
    pub(crate) fn new(dedicated_connections: u32) -> Self {
        Self {
            nodes: Mutex::default(),
            dedicated_connections,
        }
    }

    /// Forgets every node but `members`: the lanes and pools of nodes
    /// gone from the map close once their requests in flight are done.
    pub(crate) fn retain(&self, members: &HashSet<NodeAddr>) {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|node, _| members.contains(node));
    }

    /// `node`'s connections, kept while it is in the map.
    pub(crate) fn of(&self, node: &NodeAddr, connector: &Connector) -> Arc<ClusterNode> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = nodes.entry(node.clone()).or_insert_with(|| {
            // ROLE on every new connection: a demoted master refuses it.
            let manager = MasterManager {
                connector: connector.clone(),
                node: node.clone(),
                check: MasterCheck::Role,
            };
            let timeout = connector.connect_timeout() + connector.response_timeout();
            Arc::new(ClusterNode {
                node: node.clone(),
                lane: LaneSlot::default(),
                aof: AofSupport::default(),
                dedicated: dedicated_pool(
                    DedicatedManager(manager),
                    self.dedicated_connections,
                    timeout,
                ),
            })
        });
        Arc::clone(entry)
    }
}

/// A cluster master as a lane's host.
pub(crate) struct ClusterLane {
    cluster: Arc<ClusterShared>,
    node: Arc<ClusterNode>,
}

impl ClusterShared {
    /// Whether `node` can acknowledge what `ack` asks once a write ran
    /// (`WAITAOF`, asked on its shared connection before its first
    /// persisted write, as with one master), or why it cannot be sent there.
    pub(crate) async fn check_ack(&self, node: &NodeAddr, ack: Option<Ack>) -> Result<(), Sent> {
        let Some(local) = ack.and_then(|ack| ack.aof) else {
            return Ok(());
        };
        let mut connection = match self.connection(node).await {
            Ok(connection) => connection,
            Err(error) => {
                self.forget(node);
                return Err(Sent::Unreachable(error.to_string()));
            }
        };
        let exclusive = self.nodes.of(node, &self.connector);
        let checked = exclusive.aof.check(node, &mut connection, local).await;
        if let Err(Sent::Unreachable(_)) = &checked {
            self.forget(node);
        }
        checked
    }

    /// The lane host of the master `node`.
    pub(crate) fn lane_host(self: &Arc<Self>, node: &NodeAddr) -> Arc<ClusterLane> {
        Arc::new(ClusterLane {
            cluster: Arc::clone(self),
            node: self.nodes.of(node, &self.connector),
        })
    }
}

impl LaneHost for ClusterLane {
    fn node(&self) -> &NodeAddr {
        &self.node.node
    }

    fn lane_slot(&self) -> &LaneSlot {
        &self.node.lane
    }

    fn command_timeout(&self) -> Duration {
        self.cluster.connector.response_timeout()
    }

    fn telemetry(&self) -> &Telemetry {
        &self.cluster.telemetry
    }

    fn open(&self) -> impl Future<Output = redis::RedisResult<MultiplexedConnection>> + Send {
        // No role check: a write to a node that does not serve its slot
        // is refused with MOVED, and followed.
        self.cluster.connector.connect(&self.node.node)
    }

    fn wait_answered(&self, ack: Ack, acked: &Result<Acked, RedisError>) {
        // No count of replicas to forget (cluster writes are not held back
        // by one: they run and wait); a failed WAITAOF is checked again.
        if acked.is_err() && ack.aof.is_some() {
            self.node.aof.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::DnsResolver;
    use crate::node::Credentials;

    #[tokio::test]
    async fn a_node_gone_from_the_map_loses_its_connections_and_one_kept_keeps_them() {
        let second = Duration::from_secs(1);
        let connector = Connector::new(
            Arc::new(DnsResolver),
            Credentials::default(),
            None,
            second,
            second,
        );
        let nodes = ClusterNodes::new(2);
        let (kept, gone): (NodeAddr, NodeAddr) = (
            "127.0.0.1:7000".parse().unwrap(),
            "127.0.0.1:7001".parse().unwrap(),
        );
        let (kept_before, gone_before) = (nodes.of(&kept, &connector), nodes.of(&gone, &connector));
        nodes.retain(&HashSet::from([kept.clone()]));
        assert!(Arc::ptr_eq(&kept_before, &nodes.of(&kept, &connector)));
        assert!(!Arc::ptr_eq(&gone_before, &nodes.of(&gone, &connector)));
    }
}
