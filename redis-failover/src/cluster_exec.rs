//! The retry loop of cluster requests: route by slot, send, and make of
//! each failure what the shared retry policy says (`MOVED`, `ASK`,
//! `TRYAGAIN`, `CLUSTERDOWN`, `READONLY`, lost connections).

use std::sync::Arc;

use redis::RedisError;

use crate::addr::NodeAddr;
use crate::cluster_state::ClusterShared;
use crate::durable::Ack;
use crate::error::{Error, NodeFailure, Result};
use crate::events::{Counter, Event};
use crate::group_commit::send_durable;
use crate::policy::{Decision, GaveUp, Tried, Tries};
use crate::request::{Reply, Request, Sent};
use crate::retry::{Block, Failure, cluster_redirect, refusal_of};

/// Where a request goes.
#[derive(Clone, Debug)]
pub(crate) enum Destination {
    /// To the master of this slot, following redirects (any master for
    /// `None`: the request has no key).
    Slot(Option<u16>),
    /// To this node only: a redirect is the caller's answer.
    Node(NodeAddr),
}

/// The connection a request goes over on its node.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Via {
    /// The node's multiplexed connection, shared by every request.
    Shared,
    /// The node's lane of durable writes, then a `WAIT` there
    /// ([`crate::group_commit`]).
    Durable(Ack),
    /// A connection of its own from the node's pool, for a command that
    /// blocks this long (then `WAIT`ed for there, when `ack` says).
    Dedicated { block: Block, ack: Option<Ack> },
}

/// Where one try goes.
struct Target {
    node: NodeAddr,
    /// Sent after `ASKING`: an `ASK` redirect, good for one try.
    asking: bool,
}

/// A failed request's tries and the latest failure on each node.
#[derive(Default)]
pub(crate) struct Retrying {
    tries: Option<Tries>,
    failures: Vec<NodeFailure>,
}

impl Retrying {
    /// How many tries were made so far.
    pub(crate) fn attempts(&self) -> u32 {
        self.tries.as_ref().map_or(1, Tries::count)
    }

    pub(crate) fn note(&mut self, node: &NodeAddr, reason: String) {
        match self.failures.iter_mut().find(|f| f.node == *node) {
            Some(known) => known.reason = reason,
            None => self.failures.push(NodeFailure {
                node: node.clone(),
                reason,
            }),
        }
    }
}

/// How a failed try is judged.
#[derive(Clone, Copy)]
pub(crate) struct Judging {
    /// Running the request twice is harmless.
    pub(crate) resendable: bool,
    /// Redirects are followed (the request goes to a slot's master).
    pub(crate) follow: bool,
    /// The map generation the try was routed by.
    pub(crate) generation: u64,
}

/// What a failed try leaves to the caller once the retry policy gives up.
pub(crate) enum Lost {
    /// Nothing that ran: the caller learns that the budget ran out.
    Nothing,
    /// Sent, and failed with this error: it may have run.
    Sent(RedisError),
    /// A durable write that ran, its `WAIT` short or failed.
    Unreplicated(Error),
}

impl ClusterShared {
    /// Sends `request` to `destination` as `via` says, following redirects
    /// (to a slot's master) and retrying as the retry policy allows.
    /// `idempotent` when running it twice is harmless.
    pub(crate) async fn execute(
        self: &Arc<Self>,
        request: Request<'_>,
        destination: Destination,
        idempotent: bool,
        via: Via,
    ) -> Result<(NodeAddr, Reply)> {
        let resendable = idempotent || request.is_read_only();
        let follow = matches!(destination, Destination::Slot(_));
        let mut retrying = Retrying::default();
        let mut ask: Option<NodeAddr> = None;
        loop {
            let generation = self.generation();
            let Some(target) = self.target(&destination, ask.take()) else {
                // No map yet, or none that names this slot's master.
                self.refresh(generation).await;
                if self.wait(&mut retrying, Tried::NotSent).await.is_err() {
                    return Err(self.exhausted(retrying));
                }
                continue;
            };
            let sent = self.send(&target, request, idempotent, via).await;
            self.per_node.record(&target.node, &sent);
            let failed = match sent {
                Sent::Done(reply) => return Ok((target.node, reply)),
                failed => failed,
            };
            let judging = Judging {
                resendable,
                follow,
                generation,
            };
            let (tried, lost) = self
                .judge_sent(&target.node, failed, judging, &mut ask, &mut retrying)
                .await?;
            self.retry(&mut retrying, tried, lost, &target.node).await?;
        }
    }

    /// Waits before the next try as the retry policy decides on `tried`,
    /// or fails with what the caller gets: `lost`'s error, the unknown
    /// outcome of a request sent to `node`, or the budget run out.
    pub(crate) async fn retry(
        &self,
        retrying: &mut Retrying,
        tried: Tried,
        lost: Lost,
        node: &NodeAddr,
    ) -> Result<()> {
        match (self.wait(retrying, tried).await, lost) {
            (Ok(()), _) => Ok(()),
            (Err(_), Lost::Unreplicated(error)) => Err(error),
            (Err(GaveUp::OutcomeUnknown), Lost::Sent(source)) => {
                self.telemetry.add(Counter::OutcomeUnknown);
                Err(Error::OutcomeUnknown {
                    node: node.clone(),
                    source,
                })
            }
            (Err(_), _) => Err(self.exhausted(std::mem::take(retrying))),
        }
    }

    /// Where the next try goes: an `ASK` redirect's node for one try, else
    /// `destination` (`None`: the map names no master for the slot).
    fn target(&self, destination: &Destination, ask: Option<NodeAddr>) -> Option<Target> {
        if let Some(node) = ask {
            return Some(Target { node, asking: true });
        }
        let node = match destination {
            Destination::Slot(slot) => self.route(*slot)?,
            Destination::Node(node) => node.clone(),
        };
        Some(Target {
            node,
            asking: false,
        })
    }

    /// What a failed try on `node` means: what to tell the retry policy,
    /// and what the caller gets if it gives up; `Err`, an answer for the
    /// caller now.
    pub(crate) async fn judge_sent(
        &self,
        node: &NodeAddr,
        failed: Sent,
        judging: Judging,
        ask: &mut Option<NodeAddr>,
        retrying: &mut Retrying,
    ) -> Result<(Tried, Lost)> {
        let resendable = judging.resendable;
        match failed {
            Sent::Done(_) => unreachable!("a reply is not a failure"),
            Sent::Refused(error) => Err(error),
            Sent::Unreplicated(error) => {
                retrying.note(node, error.to_string());
                Ok((
                    Tried::Unreplicated { resendable },
                    Lost::Unreplicated(error),
                ))
            }
            Sent::Held(reason) => {
                retrying.note(node, reason);
                Ok((Tried::Held, Lost::Nothing))
            }
            Sent::Unreachable(reason) => {
                // A dead master: the map will name its successor.
                retrying.note(node, reason);
                self.refresh(judging.generation).await;
                Ok((Tried::NotRun, Lost::Nothing))
            }
            Sent::Failed(error) => {
                retrying.note(node, error.to_string());
                let tried = self
                    .judge(node, &error, resendable, judging.follow, ask)
                    .map_err(|source| Error::Command {
                        node: node.clone(),
                        source,
                    })?;
                if refusal_of(&error) == Some("READONLY") {
                    // A demoted master: scripts get READONLY, not MOVED.
                    self.telemetry.add(Counter::ReadonlyReplies);
                    self.refresh(judging.generation).await;
                }
                Ok((tried, Lost::Sent(error)))
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

    /// One try on `target` (after `ASKING` for an `ASK` redirect), on the
    /// connection `via` says.
    async fn send(
        self: &Arc<Self>,
        target: &Target,
        request: Request<'_>,
        idempotent: bool,
        via: Via,
    ) -> Sent {
        if let Via::Durable(ack) | Via::Dedicated { ack: Some(ack), .. } = via
            && let Err(sent) = self.check_ack(&target.node, Some(ack)).await
        {
            return sent;
        }
        match via {
            Via::Shared => {}
            Via::Durable(ack) => {
                let host = self.lane_host(&target.node);
                return send_durable(&host, request, idempotent, ack, target.asking).await;
            }
            Via::Dedicated { block, ack } => {
                let (node, asking) = (&target.node, target.asking);
                return self
                    .send_dedicated(node, request, idempotent, asking, (block, ack))
                    .await;
            }
        }
        let mut connection = match self.connection(&target.node).await {
            Ok(connection) => connection,
            Err(error) => {
                self.forget(&target.node);
                return Sent::Unreachable(error.to_string());
            }
        };
        match request.send_on(&mut connection, target.asking).await {
            Ok(reply) => match request.refusal(&reply, idempotent) {
                None => Sent::Done(reply),
                Some((refusal, _)) => Sent::Failed(refusal),
            },
            Err(error) => Sent::Failed(error),
        }
    }

    /// Records a failed try and waits as the retry policy decides, or says
    /// why it gave up.
    pub(crate) async fn wait(&self, retrying: &mut Retrying, tried: Tried) -> Result<(), GaveUp> {
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
    pub(crate) fn exhausted(&self, retrying: Retrying) -> Error {
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
