//! Subscriptions that follow the master: subscribed again on every new
//! master and after every lost connection, with a gap marker wherever
//! messages may have been missed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::addr::NodeAddr;
use crate::backend::Backend;
use crate::client::FailoverClient;
use crate::error::{Error, Result};
use crate::policy::{Decision, Tried, Tries};
use crate::pubsub_source::{Opened, Source};

/// How many deliveries a subscriber may fall behind before messages are
/// dropped (and a [`Gap`] says so).
pub const SUBSCRIPTION_BUFFER: usize = 1024;

/// What a [`Subscription`] yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum Delivery {
    /// A message published on a subscribed channel, or a channel matching
    /// a subscribed pattern.
    Message(redis::Msg),
    /// Messages may have been missed just before this point.
    Gap(Gap),
}

/// Messages may have been missed: the subscription moved to another
/// master or connection, a node's subscription started after the others
/// ([`FailoverClient::subscribe_each_master`]: a node that became a
/// master may have published before it), or the subscriber fell
/// [`SUBSCRIPTION_BUFFER`] deliveries behind. Redis keeps nothing for
/// absent subscribers, so what was published meanwhile is lost to this
/// subscriber; read the state it tracks again if it matters.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Gap {
    /// Where the subscription is now.
    pub node: NodeAddr,
    /// What happened.
    pub reason: String,
}

/// A subscription to channels and patterns, from
/// [`FailoverClient::subscribe`] (on the master, or one master of a
/// cluster) or [`FailoverClient::subscribe_each_master`] (on every master
/// of a cluster, merged): a [`Stream`] of [`Delivery`]s that ends only
/// when the client is dropped. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) deliveries: mpsc::Receiver<Delivery>,
    pub(crate) node: NodeAddr,
}

impl Subscription {
    /// The master the subscription was first made on (with
    /// [`FailoverClient::subscribe_each_master`], the first of them).
    pub fn first_node(&self) -> &NodeAddr {
        &self.node
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.deliveries.poll_recv(cx)
    }
}

/// The channels and patterns of one subscription.
#[derive(Clone, Debug)]
pub(crate) struct Topics {
    pub(crate) channels: Vec<String>,
    pub(crate) patterns: Vec<String>,
}

impl Topics {
    /// The topics of a subscription made by `what`, refused when empty.
    pub(crate) fn new(
        what: &'static str,
        channels: impl IntoIterator<Item = impl Into<String>>,
        patterns: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Self> {
        let topics = Self {
            channels: channels.into_iter().map(Into::into).collect(),
            patterns: patterns.into_iter().map(Into::into).collect(),
        };
        if topics.channels.is_empty() && topics.patterns.is_empty() {
            return Err(Error::InvalidConfig {
                setting: what,
                reason: "needs a channel or a pattern".to_owned(),
            });
        }
        Ok(topics)
    }
}

impl FailoverClient {
    /// Subscribes to `channels` and `patterns` on the master (found first,
    /// within the retry budget) and keeps the subscription on the master:
    /// after another master is installed, or the connection is lost, it
    /// subscribes again and yields a [`Gap`], since Redis pub/sub delivers
    /// at most once and keeps nothing for a subscriber that is away.
    ///
    /// On a cluster client ([`is_cluster`](Self::is_cluster)), the
    /// subscription is made on one master of the slot map, any one: a
    /// cluster propagates `PUBLISH` to every node. It moves, with a
    /// [`Gap`], when its connection is lost or that node is no master of
    /// the map any more. For what a node publishes only to its own
    /// subscribers (keyspace notifications), see
    /// [`subscribe_each_master`](Self::subscribe_each_master).
    ///
    /// ```no_run
    /// # async fn example(client: redis_failover::FailoverClient) -> redis_failover::Result<()> {
    /// use futures_util::StreamExt;
    /// use redis_failover::Delivery;
    ///
    /// let mut subscription = client.subscribe(["news"], Vec::<String>::new()).await?;
    /// while let Some(delivery) = subscription.next().await {
    ///     match delivery {
    ///         Delivery::Message(message) => println!("{:?}", message.get_payload::<String>()),
    ///         Delivery::Gap(gap) => println!("may have missed messages: {}", gap.reason),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(
        &self,
        channels: impl IntoIterator<Item = impl Into<String>>,
        patterns: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Subscription> {
        let topics = Topics::new("subscribe", channels, patterns)?;
        self.subscribe_to(topics).await
    }

    /// [`subscribe`](Self::subscribe) to `topics`.
    pub(crate) async fn subscribe_to(&self, topics: Topics) -> Result<Subscription> {
        let source = match self.backend() {
            Backend::Replicated(shared) => Source::Master(Arc::clone(shared)),
            Backend::Cluster(cluster) => Source::AnyMaster(Arc::clone(cluster)),
        };
        let opened = open_within(&source, &topics, &mut Tries::new()).await?;
        let (sender, deliveries) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let node = opened.node.clone();
        let follower = Follower {
            stop: source.stopped(),
            source,
            topics,
            forwarder: Forwarder::new(sender),
        };
        tokio::spawn(follower.run(Start::Opened(opened)));
        Ok(Subscription { deliveries, node })
    }
}

/// Subscribes on `source`, trying again as the retry policy says until
/// its budget is spent (counting the `tries` made before).
pub(crate) async fn open_within(
    source: &Source,
    topics: &Topics,
    tries: &mut Tries,
) -> Result<Opened> {
    let policy = source.policy();
    loop {
        let failures = match source.open(topics).await {
            Ok(opened) => return Ok(opened),
            Err(failures) => failures,
        };
        if let Decision::Retry(wait) = policy.decide(tries, Tried::NotSent) {
            tokio::time::sleep(wait).await;
            continue;
        }
        return Err(Error::RetryBudgetExhausted {
            budget: policy.budget,
            spent: tries.spent(),
            attempts: tries.count(),
            failures,
        });
    }
}

/// How a [`Follower`] starts.
pub(crate) enum Start {
    /// On a subscription made already.
    Opened(Opened),
    /// By subscribing, then delivering a gap for this reason.
    Gap(String),
}

/// Keeps one subscription of `source` going, into `forwarder`, until the
/// subscriber leaves or `stop` is cancelled.
pub(crate) struct Follower {
    pub(crate) source: Source,
    pub(crate) topics: Topics,
    pub(crate) forwarder: Forwarder,
    pub(crate) stop: CancellationToken,
}

impl Follower {
    /// Delivers messages, subscribing again (with backoff) whenever the
    /// current subscription ends.
    pub(crate) async fn run(mut self, start: Start) {
        let mut opened = match start {
            Start::Opened(opened) => opened,
            Start::Gap(reason) => match self.reopen(reason).await {
                Some(opened) => opened,
                None => return,
            },
        };
        let mut installed = self.source.installed();
        // Waits for room and for the subscriber to leave, beside the forwarder.
        let subscriber = self.forwarder.sender.clone();
        loop {
            let forwarder = &mut self.forwarder;
            let reason = tokio::select! {
                () = self.stop.cancelled() => return,
                () = subscriber.closed() => return,
                Ok(permit) = subscriber.reserve(), if forwarder.pending.is_some() => {
                    forwarder.deliver_gap(permit);
                    continue;
                }
                message = opened.messages.next() => match message {
                    Some(message) => {
                        forwarder.offer(&opened.node, Delivery::Message(message));
                        continue;
                    }
                    None => "the connection was lost".to_owned(),
                },
                reason = self.source.left(&mut installed, &opened.node, opened.generation) => reason,
            };
            tracing::debug!(node = %opened.node, %reason, "subscription lost; subscribing again");
            opened = match self.reopen(reason).await {
                Some(opened) => opened,
                None => return,
            };
        }
    }

    /// Subscribes again, waiting as the backoff says between tries, for
    /// as long as it takes, then records a gap for `reason`; `None` once
    /// the subscriber or the client is gone.
    async fn reopen(&mut self, reason: String) -> Option<Opened> {
        let subscriber = self.forwarder.sender.clone();
        let opened = tokio::select! {
            () = self.stop.cancelled() => return None,
            () = subscriber.closed() => return None,
            opened = reopen(&self.source, &self.topics) => opened,
        };
        self.forwarder.missed(&opened.node, reason);
        Some(opened)
    }
}

/// Subscribes on `source`, waiting as the backoff says between tries, for
/// as long as it takes.
async fn reopen(source: &Source, topics: &Topics) -> Opened {
    let backoff = source.backoff();
    for attempt in 0.. {
        match source.open(topics).await {
            Ok(opened) => return opened,
            Err(failures) => {
                tracing::debug!(?failures, "could not subscribe");
                tokio::time::sleep(backoff.delay(attempt)).await;
            }
        }
    }
    unreachable!("the loop returns")
}

/// Hands deliveries over without ever waiting for the subscriber: what
/// does not fit is dropped, and a gap is delivered as soon as there is
/// room, before anything else.
pub(crate) struct Forwarder {
    sender: mpsc::Sender<Delivery>,
    pending: Option<Gap>,
}

impl Forwarder {
    pub(crate) fn new(sender: mpsc::Sender<Delivery>) -> Self {
        Self {
            sender,
            pending: None,
        }
    }

    /// Records a gap on `node` for `reason`, joined to one not yet delivered.
    fn missed(&mut self, node: &NodeAddr, reason: String) {
        let reason = match self.pending.take() {
            Some(earlier) if earlier.reason.contains(&reason) => earlier.reason,
            Some(earlier) => format!("{}; {reason}", earlier.reason),
            None => reason,
        };
        self.pending = Some(Gap {
            node: node.clone(),
            reason,
        });
        self.try_gap();
    }

    /// Delivers the gap not yet delivered, if there is room; whether none
    /// is left waiting.
    fn try_gap(&mut self) -> bool {
        let Some(gap) = self.pending.take() else {
            return true;
        };
        match self.sender.try_send(Delivery::Gap(gap)) {
            Err(mpsc::error::TrySendError::Full(Delivery::Gap(gap))) => {
                self.pending = Some(gap);
                false
            }
            _ => true,
        }
    }

    fn deliver_gap(&mut self, permit: mpsc::Permit<'_, Delivery>) {
        if let Some(gap) = self.pending.take() {
            permit.send(Delivery::Gap(gap));
        }
    }

    /// Delivers `delivery` if the subscriber has room (and no gap waits
    /// before it); drops it otherwise.
    fn offer(&mut self, node: &NodeAddr, delivery: Delivery) {
        if !self.try_gap() {
            return;
        }
        if self.sender.try_send(delivery).is_err() {
            self.missed(
                node,
                format!("the subscriber fell {SUBSCRIPTION_BUFFER} deliveries behind"),
            );
        }
    }
}
