//! Subscriptions on every master of a cluster, for what a node publishes
//! only to its own subscribers (keyspace notifications): one per master of
//! the slot map, merged into one stream, following the map as it changes.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::DropGuard;

use crate::addr::NodeAddr;
use crate::backend::Backend;
use crate::client::FailoverClient;
use crate::cluster_state::ClusterShared;
use crate::error::Result;
use crate::policy::Tries;
use crate::pubsub::{
    Delivery, Follower, Forwarder, SUBSCRIPTION_BUFFER, Start, Subscription, Topics, open_within,
};
use crate::pubsub_source::{Opened, Source};

impl FailoverClient {
    /// Subscribes to `channels` and `patterns` on every master of a
    /// cluster's slot map, and merges what they deliver into one
    /// [`Subscription`]: for events a node publishes only to its own
    /// subscribers, such as keyspace notifications
    /// (`__keyevent@0__:expired`), which [`subscribe`](Self::subscribe)
    /// on one master would miss for the other masters' keys.
    ///
    /// Every master of the map is subscribed before this returns (within
    /// the retry budget). Then the subscriptions follow the map: a node
    /// that becomes a master (a replica promoted by a failover, a shard
    /// added) is subscribed, and one that is no master any more is
    /// dropped. Each node's subscription is made again (with backoff)
    /// after its connection is lost. Whenever a node's subscription
    /// starts after the first ones, or again, a [`Gap`](crate::Gap)
    /// naming that node is delivered: it may have published meanwhile.
    /// (Keyspace notifications must be enabled on each node, with
    /// `CONFIG SET notify-keyspace-events` through
    /// [`query_on`](Self::query_on), or in its configuration: a replica
    /// promoted does not inherit a `CONFIG SET` of its old master.)
    ///
    /// On a client of one master, this is [`subscribe`](Self::subscribe).
    ///
    /// ```no_run
    /// # async fn example(client: redis_failover::FailoverClient) -> redis_failover::Result<()> {
    /// use futures_util::StreamExt;
    /// use redis_failover::Delivery;
    ///
    /// let expired = ["__keyevent@0__:expired"];
    /// let mut subscription = client.subscribe_each_master(expired, Vec::<String>::new()).await?;
    /// while let Some(delivery) = subscription.next().await {
    ///     match delivery {
    ///         Delivery::Message(message) => println!("expired: {:?}", message.get_payload::<String>()),
    ///         Delivery::Gap(gap) => println!("expiries on {} may have been missed", gap.node),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe_each_master(
        &self,
        channels: impl IntoIterator<Item = impl Into<String>>,
        patterns: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Subscription> {
        let topics = Topics::new("subscribe_each_master", channels, patterns)?;
        let cluster = match self.backend() {
            Backend::Replicated(_) => return self.subscribe_to(topics).await,
            Backend::Cluster(cluster) => Arc::clone(cluster),
        };
        cluster.wait_for_map(cluster.settings.policy.budget).await?;
        // One budget for them all, as for one request.
        let mut tries = Tries::new();
        let mut opened = Vec::new();
        for node in cluster.masters() {
            let source = Source::Node(Arc::clone(&cluster), node);
            opened.push(open_within(&source, &topics, &mut tries).await?);
        }
        let node = opened[0].node.clone();
        let (sender, deliveries) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let each = EachMaster {
            cluster,
            topics,
            sender,
            followed: HashMap::new(),
        };
        tokio::spawn(each.run(opened));
        Ok(Subscription { deliveries, node })
    }
}

/// Keeps one [`Follower`] per master of the slot map, all delivering to
/// the same subscriber.
struct EachMaster {
    cluster: Arc<ClusterShared>,
    topics: Topics,
    sender: mpsc::Sender<Delivery>,
    /// The nodes followed; dropping a guard ends its follower.
    followed: HashMap<NodeAddr, DropGuard>,
}

impl EachMaster {
    /// Follows the first subscriptions, then the map, until the subscriber
    /// or the client is gone (dropping every guard ends the followers).
    async fn run(mut self, first: Vec<Opened>) {
        let stop = self.cluster.stopped();
        let mut generations = self.cluster.generations();
        for opened in first {
            let node = opened.node.clone();
            self.follow(node, Start::Opened(opened));
        }
        loop {
            // Also when the map changed between the first subscriptions
            // and here: the check runs before the first wait.
            self.follow_map();
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.sender.closed() => return,
                changed = generations.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Drops the nodes that are no masters any more, and subscribes to
    /// those that became masters.
    fn follow_map(&mut self) {
        let masters = self.cluster.masters();
        self.followed.retain(|node, _| {
            let kept = masters.contains(node);
            if !kept {
                tracing::debug!(%node, "no master any more; its subscription ends");
            }
            kept
        });
        for node in masters {
            if !self.followed.contains_key(&node) {
                let reason = format!("{node} became a master of the slot map");
                self.follow(node, Start::Gap(reason));
            }
        }
    }

    fn follow(&mut self, node: NodeAddr, start: Start) {
        let stop = self.cluster.stopped().child_token();
        let follower = Follower {
            source: Source::Node(Arc::clone(&self.cluster), node.clone()),
            topics: self.topics.clone(),
            forwarder: Forwarder::new(self.sender.clone()),
            stop: stop.clone(),
        };
        tokio::spawn(follower.run(start));
        self.followed.insert(node, stop.drop_guard());
    }
}
