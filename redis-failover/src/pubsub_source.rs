//! Where a subscription is made and when it must move: the one master, any
//! master of a cluster, or one given master of a cluster.

use std::sync::Arc;

use redis::aio::PubSubStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::addr::NodeAddr;
use crate::backoff::Backoff;
use crate::cluster_state::ClusterShared;
use crate::error::NodeFailure;
use crate::node::Connector;
use crate::policy::RetryPolicy;
use crate::pubsub::Topics;
use crate::shared::Shared;
use crate::tasks::replaced;

/// The deployment a subscription follows, and the node choice it makes.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// The one master, whichever it is now.
    Master(Arc<Shared>),
    /// Any master of a cluster's slot map: a cluster propagates `PUBLISH`
    /// to every node, so one subscription anywhere hears every message.
    AnyMaster(Arc<ClusterShared>),
    /// This master of a cluster, for what a node publishes only to its own
    /// subscribers (keyspace notifications). Whoever follows the map ends
    /// it when the node is no master any more.
    Node(Arc<ClusterShared>, NodeAddr),
}

/// A subscription made: where, at which generation of the master (or the
/// slot map), and its messages.
pub(crate) struct Opened {
    pub(crate) node: NodeAddr,
    pub(crate) generation: u64,
    pub(crate) messages: PubSubStream,
}

impl Source {
    fn connector(&self) -> &Connector {
        match self {
            Self::Master(shared) => &shared.data,
            Self::AnyMaster(cluster) | Self::Node(cluster, _) => cluster.connector(),
        }
    }

    pub(crate) fn policy(&self) -> RetryPolicy {
        match self {
            Self::Master(shared) => shared.settings.retry_policy(),
            Self::AnyMaster(cluster) | Self::Node(cluster, _) => cluster.settings.policy,
        }
    }

    pub(crate) fn backoff(&self) -> Backoff {
        self.policy().backoff
    }

    /// Cancelled when the client is dropped.
    pub(crate) fn stopped(&self) -> CancellationToken {
        match self {
            Self::Master(shared) => shared.stopped(),
            Self::AnyMaster(cluster) | Self::Node(cluster, _) => cluster.stopped(),
        }
    }

    /// Wakes on every master installed (or slot map loaded).
    pub(crate) fn installed(&self) -> watch::Receiver<u64> {
        match self {
            Self::Master(shared) => shared.subscribe_installed(),
            Self::AnyMaster(cluster) | Self::Node(cluster, _) => cluster.generations(),
        }
    }

    /// Subscribes to `topics` on the first of the nodes to try that
    /// accepts, or says why none did.
    pub(crate) async fn open(&self, topics: &Topics) -> Result<Opened, Vec<NodeFailure>> {
        let mut failures = Vec::new();
        for (node, generation) in self.nodes().await? {
            match subscribe_on(self.connector(), &node, topics).await {
                Ok(messages) => {
                    return Ok(Opened {
                        node,
                        generation,
                        messages,
                    });
                }
                Err(reason) => failures.push(NodeFailure { node, reason }),
            }
        }
        if let Self::AnyMaster(cluster) | Self::Node(cluster, _) = self {
            // A master that cannot be reached may have been failed over:
            // the map will name its successor, as it does for requests.
            cluster.refresh_soon();
        }
        Err(failures)
    }

    /// The nodes to try, in order, each with the generation it was known at.
    async fn nodes(&self) -> Result<Vec<(NodeAddr, u64)>, Vec<NodeFailure>> {
        match self {
            Self::Master(shared) => {
                let (master, _) = shared.current().await?;
                Ok(vec![(master.node.clone(), master.generation)])
            }
            Self::AnyMaster(cluster) => {
                let mut generation = cluster.generation();
                if cluster.masters().is_empty() {
                    cluster.refresh(generation).await;
                    generation = cluster.generation();
                }
                let masters = cluster.masters().into_iter();
                Ok(masters.map(|node| (node, generation)).collect())
            }
            Self::Node(cluster, node) => Ok(vec![(node.clone(), cluster.generation())]),
        }
    }

    /// Resolves once a subscription on `node`, made at `generation`, is
    /// on a node this source no longer subscribes on, saying why;
    /// `installed` is from [`installed`](Self::installed).
    pub(crate) async fn left(
        &self,
        installed: &mut watch::Receiver<u64>,
        node: &NodeAddr,
        generation: u64,
    ) -> String {
        match self {
            Self::Master(_) => {
                replaced(installed, generation).await;
                "another master was installed".to_owned()
            }
            Self::AnyMaster(cluster) => {
                let gone = |_: &u64| !cluster.masters().contains(node);
                if installed.wait_for(gone).await.is_err() {
                    // The client is going away: no map will change.
                    std::future::pending::<()>().await;
                }
                format!("{node} is no master of the slot map any more")
            }
            // Ended by whoever follows the map, not here.
            Self::Node(..) => std::future::pending().await,
        }
    }
}

/// Subscribes to `topics` on `node`, or says why it could not.
async fn subscribe_on(
    connector: &Connector,
    node: &NodeAddr,
    topics: &Topics,
) -> Result<PubSubStream, String> {
    let subscribed = async {
        let mut pubsub = connector.pubsub(node).await?;
        if !topics.channels.is_empty() {
            pubsub.subscribe(&topics.channels).await?;
        }
        if !topics.patterns.is_empty() {
            pubsub.psubscribe(&topics.patterns).await?;
        }
        Ok::<_, redis::RedisError>(pubsub.into_on_message())
    };
    // A node that accepts the connection and never answers must not hold
    // the subscriber.
    let limit = connector.subscribe_limit();
    match tokio::time::timeout(limit, subscribed).await {
        Ok(Ok(messages)) => Ok(messages),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer to SUBSCRIBE within {limit:?}")),
    }
}
