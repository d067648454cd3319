//! Faults and changes of a cluster: killed and hung nodes, manual
//! failovers, new shards. Slot moves are in `migration`.

use std::time::{Duration, Instant};

use super::view::Entry;
use super::{Cluster, SlotMap};
use crate::error::{Error, Result};
use crate::node::NodeId;
use crate::waits::pending;

/// How long [`Cluster::failover`] waits before asking again: a replica
/// drops a manual failover it could not finish within 5 s (on a loaded
/// machine, say), and an election takes up to twice the node timeout.
const MANUAL_FAILOVER_RETRY: Duration = Duration::from_secs(10);

/// How a replica takes over its master in [`Cluster::failover`]
/// (`CLUSTER FAILOVER [FORCE|TAKEOVER]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverMode {
    /// The replica and its master agree: the master stops clients, the
    /// replica catches up with its stream, then takes over, with the votes
    /// of a majority of masters. Needs the master to be reachable.
    Default,
    /// Without the master's agreement (it may be down), but with the votes
    /// of a majority of masters.
    Force,
    /// Without anyone's agreement: the replica takes a new epoch itself.
    /// Works even without a majority of masters.
    Takeover,
}

impl Cluster {
    /// Kills a node with SIGKILL (it gets no chance to react) and reaps it.
    /// The cluster flags it failed after the node timeout; for a master,
    /// [`wait_for_failover`](Self::wait_for_failover) waits for its replica
    /// to take over.
    pub fn kill(&self, node: NodeId) -> Result<()> {
        self.topology.kill(node)
    }

    /// Freezes a node with SIGSTOP: its ports still accept connections, but
    /// nothing is answered, neither clients nor the cluster bus.
    pub fn pause(&self, node: NodeId) -> Result<()> {
        self.topology.pause(node)
    }

    /// Lets a paused node go on with SIGCONT. A master that was failed over
    /// meanwhile learns of the newer epoch and turns into a replica of its
    /// successor; [`wait_stable`](Self::wait_stable) waits for that.
    pub fn resume(&self, node: NodeId) -> Result<()> {
        self.topology.resume(node)
    }

    /// Starts a killed node again on its old ports, from its `nodes.conf`,
    /// and waits until it answers PING; it rejoins the cluster by itself.
    pub async fn restart(&self, node: NodeId) -> Result<()> {
        self.topology.restart(node).await
    }

    /// After `old` (a master when the cluster was last stable) was killed
    /// or paused, waits until the cluster is stable again with another node
    /// serving `old`'s slots, which it returns: the replica the cluster
    /// promoted, about twice the node timeout later.
    pub async fn wait_for_failover(&self, old: NodeId, timeout: Duration) -> Result<NodeId> {
        let slot = first_slot_of(&self.stable_map(), old).ok_or(Error::WrongKind {
            node: old,
            reason: "served no slots when the cluster was last stable",
        })?;
        let what = format!("a node other than {old} to serve slot {slot}, and a stable cluster");
        let map = self
            .topology
            .poll(&what, old, timeout, || async move {
                let map = self.agreed_map().await?;
                match owner_in(&map, slot) {
                    Some(owner) if owner != old => Ok(map),
                    _ => Err(pending(old, format!("still serves slot {slot}"))),
                }
            })
            .await?;
        let new = owner_in(&map, slot).expect("checked by the wait");
        self.remember(map);
        Ok(new)
    }

    /// Makes `replica` take over its master with `CLUSTER FAILOVER` in the
    /// given mode, and waits until the cluster is stable with `replica`
    /// serving the slots (the old master, if reachable, then replicates from
    /// it). The command is sent again if the replica gave the failover up.
    pub async fn failover(&self, replica: NodeId, mode: FailoverMode) -> Result<()> {
        let slot = self.slot_of_master_of(replica).await?;
        let mut command = redis::cmd("CLUSTER");
        command.arg("FAILOVER");
        match mode {
            FailoverMode::Default => {}
            FailoverMode::Force => {
                command.arg("FORCE");
            }
            FailoverMode::Takeover => {
                command.arg("TAKEOVER");
            }
        }
        let deadline = Instant::now() + self.settings.wait_timeout;
        loop {
            // Not again once it is master: it would refuse the command.
            let view = self.view(replica).await?;
            if view.myself().is_some_and(Entry::is_replica) {
                let _: String = self.query(replica, &command).await?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let serving = self
                .wait_until_serving(replica, slot, left.min(MANUAL_FAILOVER_RETRY))
                .await;
            match serving {
                // A manual failover that could not complete in time is
                // dropped by the replica: ask again.
                Err(Error::Timeout { .. }) if Instant::now() < deadline => {}
                serving => return serving,
            }
        }
    }

    /// The first slot of `replica`'s master, as `replica` sees it.
    async fn slot_of_master_of(&self, replica: NodeId) -> Result<u16> {
        let view = self.view(replica).await?;
        let master_id = view
            .myself()
            .filter(|me| me.is_replica())
            .and_then(|me| me.master_id.clone())
            .ok_or(Error::WrongKind {
                node: replica,
                reason: "only a replica can take over its master",
            })?;
        let master = view.entry(&master_id).ok_or_else(|| Error::ClusterState {
            node: replica,
            reason: format!("its master {master_id} is unknown"),
        })?;
        let slot = master.slots.first().map(|&(first, _)| first);
        slot.ok_or_else(|| Error::ClusterState {
            node: replica,
            reason: format!("its master {master_id} serves no slot"),
        })
    }

    /// Waits until the cluster is stable with `node` serving `slot`.
    async fn wait_until_serving(&self, node: NodeId, slot: u16, timeout: Duration) -> Result<()> {
        let what = format!("{node} to serve slot {slot}, and a stable cluster");
        let map = self
            .topology
            .poll(&what, node, timeout, || async move {
                let map = self.agreed_map().await?;
                match owner_in(&map, slot) {
                    Some(owner) if owner == node => Ok(map),
                    owner => Err(pending(node, format!("slot {slot} is {owner:?}'s"))),
                }
            })
            .await?;
        self.remember(map);
        Ok(())
    }

    /// Adds a shard: starts a master and as many replicas as every shard
    /// had at start, has each meet the cluster (`CLUSTER MEET`), the
    /// replicas follow the master (`CLUSTER REPLICATE`), and waits until
    /// the cluster is stable. The new master serves no slots until
    /// [`move_slot`](Self::move_slot) or [`rebalance`](Self::rebalance)
    /// gives it some. Returns the new master.
    pub async fn add_shard(&self) -> Result<NodeId> {
        let (seen_by, view) = self.any_view().await?;
        let me = view.myself().ok_or_else(|| Error::ClusterState {
            node: seen_by,
            reason: "CLUSTER NODES has no `myself` line".to_owned(),
        })?;
        let (addr, bus_port) = (self.addr(seen_by), me.bus_port);
        let bus_port = bus_port.ok_or_else(|| Error::ClusterState {
            node: seen_by,
            reason: "its own bus port is not listed".to_owned(),
        })?;
        let first = self.nodes().len();
        let new: Vec<NodeId> = (first..=first + self.settings.replicas_per_shard)
            .map(NodeId::data)
            .collect();
        for &node in &new {
            self.spawn_node(node).await?;
            let mut meet = redis::cmd("CLUSTER");
            meet.arg("MEET")
                .arg(addr.ip().to_string())
                .arg(addr.port())
                .arg(bus_port);
            self.query::<()>(node, &meet).await?;
        }
        // CLUSTER REPLICATE needs the replica to know the master: wait
        // until everyone knows everyone.
        self.wait_stable(self.settings.wait_timeout).await?;
        let master = new[0];
        let master_id: String = self
            .query(master, redis::cmd("CLUSTER").arg("MYID"))
            .await?;
        for &replica in &new[1..] {
            let mut replicate = redis::cmd("CLUSTER");
            replicate.arg("REPLICATE").arg(&master_id);
            self.query::<()>(replica, &replicate).await?;
        }
        self.wait_stable(self.settings.wait_timeout).await?;
        Ok(master)
    }
}

/// The node serving `slot` in `map`.
fn owner_in(map: &SlotMap, slot: u16) -> Option<NodeId> {
    map.iter()
        .find(|(range, _)| range.contains(&slot))
        .map(|&(_, node)| node)
}

/// The first slot `node` serves in `map`.
fn first_slot_of(map: &SlotMap, node: NodeId) -> Option<u16> {
    map.iter()
        .find(|&&(_, owner)| owner == node)
        .map(|(range, _)| *range.start())
}
