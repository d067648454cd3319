//! The faults a test injects into a topology: processes killed, paused
//! and restarted, Sentinel failovers, and promotions by hand.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::node::{NodeId, NodeKind};
use crate::topology::Topology;

impl Topology {
    /// Kills a node with SIGKILL (it gets no chance to react) and reaps it.
    pub fn kill(&self, node: NodeId) -> Result<()> {
        let mut nodes = self.lock();
        let process = nodes.get(node);
        if !process.is_running() {
            return Err(Error::NotRunning { node });
        }
        process.kill();
        Ok(())
    }

    /// Freezes a node with SIGSTOP: its port still accepts connections, but
    /// nothing is answered. This is how a hung master looks to clients and
    /// sentinels.
    pub fn pause(&self, node: NodeId) -> Result<()> {
        self.set_paused(node, true)
    }

    /// Lets a paused node go on with SIGCONT.
    pub fn resume(&self, node: NodeId) -> Result<()> {
        self.set_paused(node, false)
    }

    fn set_paused(&self, node: NodeId, pause: bool) -> Result<()> {
        let mut nodes = self.lock();
        let process = nodes.get(node);
        if !process.is_running() {
            return Err(Error::NotRunning { node });
        }
        process.set_paused(pause)
    }

    /// Starts a killed node again on its old port and waits until it
    /// answers PING.
    ///
    /// It starts from its config file as the node last left it: a data node
    /// that Sentinel reconfigured (Sentinel runs `CONFIG REWRITE`) comes back
    /// as that replica, while a master killed before any failover comes back
    /// as a master, as a restarted pod does. Returns [`Error::Exited`] if the
    /// port was taken in the meantime.
    pub async fn restart(&self, node: NodeId) -> Result<()> {
        {
            let mut nodes = self.lock();
            let process = nodes.get(node);
            if process.is_running() {
                return Err(Error::AlreadyRunning { node });
            }
            process.start()?;
        }
        if self.wait_until_answering(node).await? {
            Ok(())
        } else {
            Err(Error::PortTaken {
                node,
                port: self.addr(node).port(),
            })
        }
    }

    /// Asks a running sentinel to fail over now (`SENTINEL FAILOVER`), as an
    /// operator does before maintenance. Sentinel promotes a replica without
    /// waiting for agreement from the others.
    pub async fn sentinel_failover(&self) -> Result<()> {
        let sentinel = *self
            .reachable(self.sentinels())
            .first()
            .ok_or(Error::NoRunningSentinel)?;
        let _: String = self
            .query(
                sentinel,
                redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(self.master_name()),
            )
            .await?;
        Ok(())
    }

    /// Promotes a replica by hand, as a Kubernetes operator does without
    /// Sentinel: `REPLICAOF NO ONE` on `node`, then `REPLICAOF` it on every
    /// other running, unpaused data node. Returns once the commands are
    /// accepted and written to each node's config (`CONFIG REWRITE`), so a
    /// node restarted later keeps its new role;
    /// [`wait_for_replica_of`](Self::wait_for_replica_of) waits for the
    /// others to sync.
    ///
    /// With sentinels running, they may undo this: they follow their own view.
    pub async fn promote(&self, node: NodeId) -> Result<()> {
        Self::require_kind(node, NodeKind::Data, "only a data node can become master")?;
        let _: String = self
            .query(node, redis::cmd("REPLICAOF").arg("NO").arg("ONE"))
            .await?;
        let (ip, port) = (self.addr(node).ip().to_string(), self.addr(node).port());
        for other in self.reachable(self.data_nodes()) {
            if other != node {
                let _: String = self
                    .query(other, redis::cmd("REPLICAOF").arg(&ip).arg(port))
                    .await?;
            }
        }
        // Persist the new roles, as an operator does, so restarted nodes keep them.
        for member in self.reachable(self.data_nodes()) {
            let _: String = self
                .query(member, redis::cmd("CONFIG").arg("REWRITE"))
                .await?;
        }
        Ok(())
    }

    /// Points `replica` at `master` (`REPLICAOF`), as a pod that asks
    /// Sentinel for the master on start does, and waits until it
    /// replicates from it ([`wait_for_replica_of`](Self::wait_for_replica_of)).
    pub async fn replicate(
        &self,
        replica: NodeId,
        master: NodeId,
        timeout: Duration,
    ) -> Result<()> {
        Self::require_kind(replica, NodeKind::Data, "only a data node replicates")?;
        let addr = self.addr(master);
        let _: String = self
            .query(
                replica,
                redis::cmd("REPLICAOF")
                    .arg(addr.ip().to_string())
                    .arg(addr.port()),
            )
            .await?;
        self.wait_for_replica_of(replica, master, timeout).await
    }
}
