//! The retry loop of cluster requests: route by slot, send, and make of
//! each failure what the shared retry policy says (`MOVED`, `ASK`,
//! `TRYAGAIN`, `CLUSTERDOWN`, `READONLY`, lost connections).

use redis::RedisError;
use redis::aio::MultiplexedConnection;

use crate::addr::NodeAddr;
use crate::cluster_state::ClusterShared;
use crate::error::{Error, NodeFailure, Result};
use crate::events::{Counter, Event};
use crate::policy::{Decision, GaveUp, Tried, Tries};
use crate::request::{Reply, Request};
use crate::retry::{Failure, cluster_redirect, refusal_of};

/// Where a request goes.
#[derive(Clone, Debug)]
pub(crate) enum Destination {
    /// To the master of this slot, following redirects (any master for
    /// `None`: the request has no key).
    Slot(Option<u16>),
    /// To this node only: a redirect is the caller's answer.
    Node(NodeAddr),
}

/// Where one try goes.
struct Target {
    node: NodeAddr,
    /// Sent after `ASKING`: an `ASK` redirect, good for one try.
    asking: bool,
}

/// A failed request's tries and the latest failure on each node.
#[derive(Default)]
struct Retrying {
    tries: Option<Tries>,
    failures: Vec<NodeFailure>,
}

impl Retrying {
    fn note(&mut self, node: &NodeAddr, reason: String) {
        match self.failures.iter_mut().find(|f| f.node == *node) {
            Some(known) => known.reason = reason,
            None => self.failures.push(NodeFailure {
                node: node.clone(),
                reason,
            }),
        }
    }
}

/// What one try came to.
enum Attempt {
    Done(Reply),
    /// The node could not be reached: nothing was sent.
    Unreachable(String),
    /// Sent, and failed with this error (or a refusal in the reply).
    Failed(RedisError),
}

impl ClusterShared {
    /// Sends `request` to `destination`, following redirects (to a slot's
    /// master) and retrying as the retry policy allows. `idempotent` when
    /// running it twice is harmless.
    pub(crate) async fn execute(
        &self,
        request: Request<'_>,
        destination: Destination,
        idempotent: bool,
    ) -> Result<(NodeAddr, Reply)> {
        let resendable = idempotent || request.is_read_only();
        let mut retrying = Retrying::default();
        let mut ask: Option<NodeAddr> = None;
        loop {
            let generation = self.generation();
            let routed = ask.take().map(|node| Target { node, asking: true });
            let routed = routed.or_else(|| {
                let node = match &destination {
                    Destination::Slot(slot) => self.route(*slot)?,
                    Destination::Node(node) => node.clone(),
                };
                Some(Target {
                    node,
                    asking: false,
                })
            });
            let Some(target) = routed else {
                // No map yet, or none that names this slot's master.
                self.refresh(generation).await;
                if self.wait(&mut retrying, Tried::NotSent).await.is_err() {
                    return Err(self.exhausted(retrying));
                }
                continue;
            };
            let (tried, error) = match self.send(&target, request, idempotent).await {
                Attempt::Done(reply) => return Ok((target.node, reply)),
                Attempt::Unreachable(reason) => {
                    // A dead master: the map will name its successor.
                    retrying.note(&target.node, reason);
                    self.refresh(generation).await;
                    (Tried::NotRun, None)
                }
                Attempt::Failed(error) => {
                    retrying.note(&target.node, error.to_string());
                    let follow = matches!(destination, Destination::Slot(_));
                    let tried = self
                        .judge(&target.node, &error, resendable, follow, &mut ask)
                        .map_err(|source| Error::Command {
                            node: target.node.clone(),
                            source,
                        })?;
                    if refusal_of(&error) == Some("READONLY") {
                        // A demoted master: scripts get READONLY, not MOVED.
                        self.telemetry.add(Counter::ReadonlyReplies);
                        self.refresh(generation).await;
                    }
                    (tried, Some(error))
                }
            };
            match (self.wait(&mut retrying, tried).await, error) {
                (Ok(()), _) => {}
                (Err(GaveUp::OutcomeUnknown), Some(source)) => {
                    self.telemetry.add(Counter::OutcomeUnknown);
                    return Err(Error::OutcomeUnknown {
                        node: target.node,
                        source,
                    });
                }
                (Err(_), _) => return Err(self.exhausted(retrying)),
            }
        }
    }

    /// What a failed send means: `Err` an answer for the caller, else what
    /// to tell the retry policy. Follows `MOVED` in the map and `ASK` in
    /// `ask` when it may `follow` redirects.
    fn judge(
        &self,
        node: &NodeAddr,
        error: &RedisError,
        resendable: bool,
        follow: bool,
        ask: &mut Option<NodeAddr>,
    ) -> Result<Tried, RedisError> {
        let redirect = matches!(refusal_of(error), Some("MOVED" | "ASK" | "READONLY"));
        match Failure::of(error) {
            Failure::Final => Err(error.clone()),
            Failure::NotExecuted if redirect && !follow => Err(error.clone()),
            Failure::NotExecuted => Ok(match (refusal_of(error), cluster_redirect(error, node)) {
                (Some("MOVED"), Some((slot, owner))) => {
                    self.telemetry.add(Counter::RedirectReplies);
                    self.moved(slot, owner);
                    Tried::Redirected
                }
                (Some("ASK"), Some((_, owner))) => {
                    self.telemetry.add(Counter::RedirectReplies);
                    *ask = Some(owner);
                    Tried::Redirected
                }
                // A multi-key command in a migrating slot, or a busy node:
                // the map is right, wait.
                (Some("TRYAGAIN" | "BUSY"), _) => Tried::Held,
                // CLUSTERDOWN, LOADING, MASTERDOWN...: a failover may be
                // under way, and the map change with it.
                _ => {
                    self.refresh_soon();
                    Tried::NotRun
                }
            }),
            Failure::OutcomeUnknown => {
                self.forget(node);
                self.refresh_soon();
                // A timeout on a node still up would only run it again:
                // counted as a stall, resent a few times at most.
                Ok(Tried::MaybeRun {
                    resendable,
                    stalled: error.is_timeout(),
                })
            }
        }
    }

    /// One try on `target`, after `ASKING` when it is an `ASK` redirect.
    async fn send(&self, target: &Target, request: Request<'_>, idempotent: bool) -> Attempt {
        let mut connection = match self.connection(&target.node).await {
            Ok(connection) => connection,
            Err(error) => {
                self.forget(&target.node);
                return Attempt::Unreachable(error.to_string());
            }
        };
        let sent = if target.asking {
            send_asking(&mut connection, request).await
        } else {
            request.send(&mut connection).await
        };
        match sent {
            Ok(reply) => match request.refusal(&reply, idempotent) {
                None => Attempt::Done(reply),
                Some((refusal, _)) => Attempt::Failed(refusal),
            },
            Err(error) => Attempt::Failed(error),
        }
    }

    /// Records a failed try and waits as the retry policy decides, or says
    /// why it gave up.
    async fn wait(&self, retrying: &mut Retrying, tried: Tried) -> Result<(), GaveUp> {
        let tries = retrying.tries.get_or_insert_with(Tries::new);
        match self.settings.policy.decide(tries, tried) {
            Decision::GiveUp(why) => Err(why),
            Decision::Retry(wait) => {
                self.telemetry.add(Counter::Retries);
                tokio::time::sleep(wait).await;
                Ok(())
            }
        }
    }

    /// The error of a request whose retry budget ran out.
    fn exhausted(&self, retrying: Retrying) -> Error {
        let tries = retrying.tries.unwrap_or_else(Tries::new);
        self.telemetry.add(Counter::BudgetExhausted);
        self.telemetry.emit(Event::RetryBudgetExhausted {
            attempts: tries.count(),
        });
        Error::RetryBudgetExhausted {
            budget: self.settings.policy.budget,
            spent: tries.spent(),
            attempts: tries.count(),
            failures: retrying.failures,
        }
    }
}

/// Sends `request` right after `ASKING`, in one write so that nothing
/// else on the multiplexed connection comes between them (`ASKING` holds
/// for the next command only), and returns the request's replies alone.
async fn send_asking(
    connection: &mut MultiplexedConnection,
    request: Request<'_>,
) -> Result<Reply, RedisError> {
    let mut pipeline = redis::pipe();
    pipeline.cmd("ASKING");
    let single = match request {
        Request::Command(cmd) => {
            pipeline.add_command(cmd.clone());
            true
        }
        Request::Pipeline { pipeline: sent, .. } => {
            for cmd in sent.cmd_iter() {
                pipeline.add_command(cmd.clone());
            }
            false
        }
    };
    let count = pipeline.len() - 1;
    let mut values = connection.send_packed_commands(&pipeline, 1, count).await?;
    if !single {
        return Ok(Reply::Values(values));
    }
    values.pop().map(Reply::Value).ok_or_else(|| {
        RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "no reply after ASKING",
        ))
    })
}
