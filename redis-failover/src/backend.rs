//! Where a client's requests go: the one master of a Sentinel or
//! candidates deployment, or the master of each request's slot in a Redis
//! Cluster. Every handle ([`FailoverClient`] and its connections) sends
//! through here, so the two modes share one public API.

use std::sync::Arc;

use crate::addr::NodeAddr;
use crate::client::FailoverClient;
use crate::cluster_exec::{Destination, Via};
use crate::cluster_state::ClusterShared;
use crate::durable::Ack;
use crate::error::{Error, Result};
use crate::events::Telemetry;
use crate::request::{Reply, Request};
use crate::routing::{Durability, ReadPolicy};
use crate::shared::Shared;
use crate::slots::{slot_of_command, slot_of_pipeline};

/// The deployment behind a client.
#[derive(Debug)]
pub(crate) enum Backend {
    /// One master at a time, found among candidates or by sentinels.
    Replicated(Arc<Shared>),
    /// A Redis Cluster: a master per slot.
    Cluster(Arc<ClusterShared>),
}

impl Backend {
    pub(crate) fn telemetry(&self) -> &Telemetry {
        match self {
            Self::Replicated(shared) => &shared.telemetry,
            Self::Cluster(cluster) => &cluster.telemetry,
        }
    }
}

impl FailoverClient {
    /// The one-master machinery, for what a cluster client does not
    /// support yet (`what` names it in the error).
    pub(crate) fn replicated(&self, what: &'static str) -> Result<&Arc<Shared>> {
        match self.backend() {
            Backend::Replicated(shared) => Ok(shared),
            Backend::Cluster(_) => Err(Error::NotInCluster { what }),
        }
    }

    /// Sends `request` to the master (of its slot, in a cluster) with this
    /// handle's durability, and says which node answered. `idempotent`
    /// when running it twice is harmless.
    pub(crate) async fn send(
        &self,
        request: Request<'_>,
        idempotent: bool,
    ) -> Result<(NodeAddr, Reply)> {
        match self.backend() {
            Backend::Replicated(shared) => {
                // Boxed: the retry loop's state machine is deep, and callers'
                // futures that hold it inline can exceed the type-depth limit.
                let sent = Box::pin(shared.execute(request, idempotent, self.durability()));
                let (master, reply) = sent.await?;
                Ok((master.node.clone(), reply))
            }
            Backend::Cluster(cluster) => {
                let slot = Destination::Slot(cluster_slot(request)?);
                let via = cluster_via(request, self.durability())?;
                Box::pin(cluster.execute(request, slot, idempotent, via)).await
            }
        }
    }

    /// Sends `request` to the master `node` (one of
    /// [`masters`](Self::masters)), without following redirects.
    pub(crate) async fn send_to(
        &self,
        node: &NodeAddr,
        request: Request<'_>,
        idempotent: bool,
    ) -> Result<(NodeAddr, Reply)> {
        match self.backend() {
            Backend::Replicated(_) => self.send(request, idempotent).await,
            Backend::Cluster(cluster) => {
                cluster_slot(request)?;
                let destination = Destination::Node(node.clone());
                let via = cluster_via(request, Durability::Master)?;
                Box::pin(cluster.execute(request, destination, idempotent, via)).await
            }
        }
    }

    /// Sends the read `request` where this handle's read policy says (in
    /// a cluster, among the master and replicas of its slot), within a
    /// session whose writes reached replication offset `session`.
    pub(crate) async fn send_read(
        &self,
        request: Request<'_>,
        session: Option<u64>,
    ) -> Result<(NodeAddr, Reply)> {
        match self.backend() {
            Backend::Replicated(shared) => {
                Box::pin(shared.read(request, self.read_policy(), session)).await
            }
            Backend::Cluster(cluster) => {
                if self.read_policy() != ReadPolicy::Master && !request.is_read_only() {
                    return Err(Error::NotReadOnly {
                        command: request.describe(),
                    });
                }
                let slot = cluster_slot(request)?;
                Box::pin(cluster.read(request, slot, self.read_policy(), session)).await
            }
        }
    }
}

/// The slot a cluster request goes to (`None`: it has no key, any master
/// will do), or why it cannot be sent as one request.
fn cluster_slot(request: Request<'_>) -> Result<Option<u16>> {
    match request {
        Request::Command(cmd) => Ok(slot_of_command(cmd)),
        Request::Pipeline { pipeline, .. } => slot_of_pipeline(pipeline, || request.describe()),
    }
}

/// The connection a cluster request goes over on its master, as with one
/// master: a blocking command gets one of its own; a write made durable
/// goes over the master's lane and waits for a `WAIT` there.
pub(crate) fn cluster_via(request: Request<'_>, durability: Durability) -> Result<Via> {
    let ack = match request.is_read_only() {
        true => None,
        false => cluster_ack(durability)?,
    };
    Ok(match (request.blocking(), ack) {
        (Some(block), ack) => Via::Dedicated { block, ack },
        (None, Some(ack)) => Via::Durable(ack),
        (None, None) => Via::Shared,
    })
}

/// What a cluster write made durable as `durability` says waits for once
/// it ran. Unlike with one master, it is never held back by a count of
/// the master's replicas: it runs, and a shortfall is `NotReplicated`.
pub(crate) fn cluster_ack(durability: Durability) -> Result<Option<Ack>> {
    durability.validate()?;
    match durability {
        Durability::Replicated { replicas, timeout } => Ok(Some(Ack {
            aof: None,
            replicas,
            timeout,
        })),
        Durability::Persisted {
            local,
            replicas,
            timeout,
        } => Ok(Some(Ack {
            aof: Some(local),
            replicas,
            timeout,
        })),
        _ => Ok(None),
    }
}
