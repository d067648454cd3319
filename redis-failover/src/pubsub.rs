//! Subscriptions that follow the master: subscribed again on every new
//! master and after every lost connection, with a gap marker wherever
//! messages may have been missed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use redis::aio::PubSubStream;
use tokio::sync::mpsc;

use crate::addr::NodeAddr;
use crate::client::FailoverClient;
use crate::error::{Error, NodeFailure, Result};
use crate::policy::{Decision, Tried, Tries};
use crate::shared::Shared;
use crate::state::Master;
use crate::tasks::replaced;

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
/// master or connection, or the subscriber fell
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

/// A subscription to channels and patterns on the master, from
/// [`FailoverClient::subscribe`]: a [`Stream`] of [`Delivery`]s that ends
/// only when the client is dropped. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    deliveries: mpsc::Receiver<Delivery>,
    node: NodeAddr,
}

impl Subscription {
    /// The master the subscription was first made on.
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
struct Topics {
    channels: Vec<String>,
    patterns: Vec<String>,
}

impl FailoverClient {
    /// Subscribes to `channels` and `patterns` on the master (found first,
    /// within the retry budget) and keeps the subscription on the master:
    /// after another master is installed, or the connection is lost, it
    /// subscribes again and yields a [`Gap`], since Redis pub/sub delivers
    /// at most once and keeps nothing for a subscriber that is away.
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
        let topics = Topics {
            channels: channels.into_iter().map(Into::into).collect(),
            patterns: patterns.into_iter().map(Into::into).collect(),
        };
        if topics.channels.is_empty() && topics.patterns.is_empty() {
            return Err(Error::InvalidConfig {
                setting: "subscribe",
                reason: "needs a channel or a pattern".to_owned(),
            });
        }
        let shared = Arc::clone(self.replicated("a subscription (SUBSCRIBE, PSUBSCRIBE)")?);
        let policy = shared.settings.retry_policy();
        let mut tries = Tries::new();
        let (master, messages) = loop {
            let failures = match open(&shared, &topics).await {
                Ok(opened) => break opened,
                Err(failures) => failures,
            };
            if let Decision::Retry(wait) = policy.decide(&mut tries, Tried::NotSent) {
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(Error::RetryBudgetExhausted {
                budget: policy.budget,
                spent: tries.spent(),
                attempts: tries.count(),
                failures,
            });
        };
        let (sender, deliveries) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let node = master.node.clone();
        tokio::spawn(follow(
            shared,
            topics,
            Forwarder::new(sender),
            master,
            messages,
        ));
        Ok(Subscription { deliveries, node })
    }
}

/// Subscribes on the current master, or says why it could not.
async fn open(
    shared: &Shared,
    topics: &Topics,
) -> Result<(Arc<Master>, PubSubStream), Vec<NodeFailure>> {
    let (master, _) = shared.current().await?;
    let subscribed = async {
        let mut pubsub = shared.data.pubsub(&master.node).await?;
        if !topics.channels.is_empty() {
            pubsub.subscribe(&topics.channels).await?;
        }
        if !topics.patterns.is_empty() {
            pubsub.psubscribe(&topics.patterns).await?;
        }
        Ok::<_, redis::RedisError>(pubsub.into_on_message())
    };
    // Subscribing has no reply timeout of its own: a node that accepts the
    // connection and never answers must not hold the subscriber.
    let limit = shared.settings.connect_timeout + shared.settings.command_timeout;
    match tokio::time::timeout(limit, subscribed).await {
        Ok(Ok(messages)) => Ok((master, messages)),
        Ok(Err(error)) => Err(vec![master.failure(error.to_string())]),
        Err(_) => {
            Err(vec![master.failure(format!(
                "no answer to SUBSCRIBE within {limit:?}"
            ))])
        }
    }
}

/// Delivers messages until the subscription is dropped or the client is,
/// subscribing again (with backoff) whenever the current one ends.
async fn follow(
    shared: Arc<Shared>,
    topics: Topics,
    mut forwarder: Forwarder,
    mut master: Arc<Master>,
    mut messages: PubSubStream,
) {
    let stop = shared.stopped();
    let mut installed = shared.subscribe_installed();
    // Waits for room and for the subscriber to leave, beside the forwarder.
    let subscriber = forwarder.sender.clone();
    loop {
        let reason = tokio::select! {
            () = stop.cancelled() => return,
            () = subscriber.closed() => return,
            Ok(permit) = subscriber.reserve(), if forwarder.pending.is_some() => {
                forwarder.deliver_gap(permit);
                continue;
            }
            message = messages.next() => match message {
                Some(message) => {
                    forwarder.offer(&master.node, Delivery::Message(message));
                    continue;
                }
                None => "the connection was lost".to_owned(),
            },
            () = replaced(&mut installed, master.generation) => {
                "another master was installed".to_owned()
            }
        };
        tracing::debug!(node = %master.node, %reason, "subscription lost; subscribing again");
        let again = tokio::select! {
            () = stop.cancelled() => return,
            () = subscriber.closed() => return,
            again = reopen(&shared, &topics) => again,
        };
        (master, messages) = again;
        forwarder.missed(&master.node, reason);
    }
}

/// Subscribes again, waiting as the backoff says between tries, for as
/// long as it takes.
async fn reopen(shared: &Shared, topics: &Topics) -> (Arc<Master>, PubSubStream) {
    for attempt in 0.. {
        match open(shared, topics).await {
            Ok(opened) => return opened,
            Err(failures) => {
                tracing::debug!(?failures, "could not subscribe");
                tokio::time::sleep(shared.settings.backoff.delay(attempt)).await;
            }
        }
    }
    unreachable!("the loop returns")
}

/// Hands deliveries over without ever waiting for the subscriber: what
/// does not fit is dropped, and a gap is delivered as soon as there is
/// room, before anything else.
struct Forwarder {
    sender: mpsc::Sender<Delivery>,
    pending: Option<Gap>,
}

impl Forwarder {
    fn new(sender: mpsc::Sender<Delivery>) -> Self {
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
