//! The retry loop of requests to the master: one try, what its failure
//! means, and what the policy makes of it.

use std::sync::Arc;

use redis::RedisError;
use tokio::sync::watch;

use crate::dedicated::Exclusive;
use crate::durable::Ack;
use crate::error::{Error, NodeFailure, Result};
use crate::events::{Counter, Event, Trigger};
use crate::policy::{Decision, GaveUp, Tried, Tries};
use crate::request::{Reply, Request, Sent};
use crate::retry::{Failure, redirect_target, refusal_means_not_master, refusal_of};
use crate::routing::Durability;
use crate::shared::Shared;
use crate::state::Master;

/// What a failed send means for the retry loop.
pub(crate) enum Verdict {
    /// An answer for the caller.
    Final(RedisError),
    /// The master is fine but cannot take it yet: try it again there.
    Held,
    /// Look for the master again (`trigger` says why), then decide on
    /// `tried`.
    Rediscover(Tried, Trigger),
}

/// A request that failed at least once: its tries, the latest failure on
/// each node, and the installs that cut a wait short.
pub(crate) struct Retrying {
    tries: Tries,
    failures: Vec<NodeFailure>,
    installed: watch::Receiver<u64>,
}

impl Retrying {
    /// The tries since the first failure.
    pub(crate) fn tries(&self) -> &Tries {
        &self.tries
    }
}

impl Shared {
    /// Sends `request` to the master, finding it again and resending as
    /// the retry policy allows. Returns the master that answered with the
    /// reply.
    pub(crate) async fn execute(
        self: &Arc<Self>,
        request: Request<'_>,
        idempotent: bool,
        durability: Durability,
    ) -> Result<(Arc<Master>, Reply)> {
        let write = !request.is_read_only();
        if write {
            durability.validate()?;
        }
        let resendable = idempotent || !write;
        let mut retrying: Option<Retrying> = None;
        // What is awaited only without a master or after a failed try is
        // boxed (in `current` too), as are durable and blocking sends:
        // their futures would otherwise size every request's (4.2 KiB,
        // against 1.8), which is moved into a box per request.
        loop {
            let (master, epoch) = match self.current().await {
                Ok(found) => found,
                Err(failures) => {
                    Box::pin(self.no_master(&mut retrying, failures)).await?;
                    continue;
                }
            };
            match self
                .send_once(&master, request, idempotent, durability, write)
                .await
            {
                Sent::Done(reply) => return Ok((master, reply)),
                failed => {
                    Box::pin(self.recover(&mut retrying, &master, epoch, failed, resendable))
                        .await?;
                }
            }
        }
    }

    /// No master was found: waits to look again, within the budget.
    pub(crate) async fn no_master(
        &self,
        retrying: &mut Option<Retrying>,
        failures: Vec<NodeFailure>,
    ) -> Result<()> {
        match self.retry_after(retrying, Tried::NotSent, failures).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.exhausted(retrying)),
        }
    }

    /// After a failed try on `master` (observed at discovery `epoch`):
    /// looks for the master again if the failure says so, then waits
    /// before the next try as the retry policy decides, or fails with the
    /// error the caller gets. `resendable` when running the request twice
    /// is harmless.
    pub(crate) async fn recover(
        self: &Arc<Self>,
        retrying: &mut Option<Retrying>,
        master: &Arc<Master>,
        epoch: u64,
        failed: Sent,
        resendable: bool,
    ) -> Result<()> {
        let (verdict, failure) = match failed {
            Sent::Done(_) => unreachable!("a reply is not a failure"),
            Sent::Unreplicated(error) => {
                let tried = Tried::Unreplicated { resendable };
                let failure = master.failure(error.to_string());
                return match self.retry_after(retrying, tried, vec![failure]).await {
                    Ok(()) => Ok(()),
                    // The write ran: the caller learns that, not only
                    // that the budget ran out.
                    Err(GaveUp::Budget) => {
                        let _ = self.exhausted(retrying);
                        Err(error)
                    }
                    Err(_) => Err(error),
                };
            }
            Sent::Refused(error) => return Err(error),
            Sent::Held(reason) => (Verdict::Held, Err(reason)),
            Sent::Unreachable(reason) => (
                Verdict::Rediscover(Tried::NotRun, Trigger::ConnectionLost),
                Err(reason),
            ),
            Sent::Failed(error) => (self.verdict(&error, resendable), Ok(error)),
        };
        let reason = match &failure {
            Ok(error) => error.to_string(),
            Err(reason) => reason.clone(),
        };
        let tried = match verdict {
            Verdict::Final(source) => {
                return Err(Error::Command {
                    node: master.node.clone(),
                    source,
                });
            }
            Verdict::Held => Tried::Held,
            Verdict::Rediscover(tried, trigger) => {
                tracing::debug!(node = %master.node, %reason, ?trigger, "request to the master failed");
                let redirect = failure.as_ref().ok().and_then(redirect_target);
                match redirect.filter(|_| trigger == Trigger::Redirect) {
                    Some(target) => {
                        self.follow_redirect(master, epoch, &target).await;
                        tried
                    }
                    None => {
                        self.after_master_failed(master, epoch, tried, trigger)
                            .await
                    }
                }
            }
        };
        match self
            .retry_after(retrying, tried, vec![master.failure(reason)])
            .await
        {
            Ok(()) => Ok(()),
            Err(GaveUp::Budget) => Err(self.exhausted(retrying)),
            Err(_) => {
                self.telemetry.add(Counter::OutcomeUnknown);
                Err(Error::OutcomeUnknown {
                    node: master.node.clone(),
                    source: failure.expect("a request that may have run has an error"),
                })
            }
        }
    }

    /// One try on `master`: held back, or sent on the shared connection,
    /// or on a dedicated one when it blocks or must be waited for
    /// (durable writes).
    async fn send_once(
        self: &Arc<Self>,
        master: &Arc<Master>,
        request: Request<'_>,
        idempotent: bool,
        durability: Durability,
        write: bool,
    ) -> Sent {
        let replicated = match self.admit(master, durability, write).await {
            Ok(replicated) => replicated,
            Err(held) => return held,
        };
        let block = request.blocking();
        match (block, replicated) {
            (None, None) => return self.send_shared(master, request, idempotent).await,
            (None, Some(replicated)) => {
                return Box::pin(self.send_durable(master, request, idempotent, replicated)).await;
            }
            _ => {}
        }
        let how = Exclusive { block, replicated };
        Box::pin(self.send_dedicated(master, request, idempotent, how)).await
    }

    /// Whether a write may go to `master` now (`Err`: held back, or why
    /// not), and for a durable one, what to wait for once it ran.
    pub(crate) async fn admit(
        &self,
        master: &Master,
        durability: Durability,
        write: bool,
    ) -> Result<Option<Ack>, Sent> {
        if let Some(held) = self.hold_back(master, write).await {
            return Err(held);
        }
        match durability {
            Durability::Replicated { replicas, timeout } if write => {
                let replicas = self.await_replicas(master, replicas).await?;
                Ok(Some(Ack {
                    aof: None,
                    replicas,
                    timeout,
                }))
            }
            Durability::Persisted {
                local,
                replicas,
                timeout,
            } if write => {
                self.check_waitaof(master, local).await?;
                let replicas = match replicas {
                    0 => 0,
                    asked => self.await_replicas(master, asked).await?,
                };
                Ok(Some(Ack {
                    aof: Some(local),
                    replicas,
                    timeout,
                }))
            }
            _ => Ok(None),
        }
    }

    /// What the error of a request sent to the master means.
    pub(crate) fn verdict(&self, error: &RedisError, resendable: bool) -> Verdict {
        let maybe_run = |trigger| {
            Verdict::Rediscover(
                Tried::MaybeRun {
                    resendable,
                    stalled: false,
                },
                trigger,
            )
        };
        match Failure::of(error) {
            Failure::Final => Verdict::Final(error.clone()),
            Failure::NotExecuted => match refusal_of(error) {
                Some("READONLY") => {
                    self.telemetry.add(Counter::ReadonlyReplies);
                    Verdict::Rediscover(Tried::NotRun, Trigger::ReadOnly)
                }
                Some("REDIRECT") => {
                    self.telemetry.add(Counter::RedirectReplies);
                    Verdict::Rediscover(Tried::NotRun, Trigger::Redirect)
                }
                // Busy, or waiting for replicas: the master is fine.
                Some(code) if !refusal_means_not_master(code) => Verdict::Held,
                _ => Verdict::Rediscover(Tried::NotRun, Trigger::Unavailable),
            },
            Failure::OutcomeUnknown if error.is_timeout() => maybe_run(Trigger::Timeout),
            Failure::OutcomeUnknown => maybe_run(Trigger::ConnectionLost),
        }
    }

    /// Looks for the master again after `master` failed a try (in the
    /// background when the request will not be resent anyway), and tells
    /// whether a timeout was a stall of a master that is still master.
    pub(crate) async fn after_master_failed(
        self: &Arc<Self>,
        master: &Arc<Master>,
        epoch: u64,
        tried: Tried,
        trigger: Trigger,
    ) -> Tried {
        if let Tried::MaybeRun {
            resendable: false, ..
        } = tried
        {
            self.rediscover_in_background(epoch, trigger, Arc::clone(master));
            return tried;
        }
        let found = self.rediscover(epoch, trigger, Some(master)).await;
        match tried {
            Tried::MaybeRun { resendable, .. } if trigger == Trigger::Timeout => {
                let still_master = found
                    .as_ref()
                    .is_ok_and(|(again, _)| Arc::ptr_eq(again, master));
                Tried::MaybeRun {
                    resendable,
                    stalled: still_master,
                }
            }
            other => other,
        }
    }

    /// Records the failures of one try (starting the retry state on the
    /// first) and waits as the retry policy decides, cut short when a
    /// master is installed; or says why the policy gave up.
    pub(crate) async fn retry_after(
        &self,
        retrying: &mut Option<Retrying>,
        tried: Tried,
        failures: Vec<NodeFailure>,
    ) -> Result<(), GaveUp> {
        let state = retrying.get_or_insert_with(|| Retrying {
            tries: Tries::new(),
            failures: Vec::new(),
            installed: self.subscribe_installed(),
        });
        for failure in failures {
            match state.failures.iter_mut().find(|f| f.node == failure.node) {
                Some(known) => known.reason = failure.reason,
                None => state.failures.push(failure),
            }
        }
        match self.settings.retry_policy().decide(&mut state.tries, tried) {
            Decision::GiveUp(why) => Err(why),
            Decision::Retry(wait) => {
                self.telemetry.add(Counter::Retries);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = state.installed.changed() => {}
                }
                Ok(())
            }
        }
    }

    /// The error of a request whose retry budget ran out.
    pub(crate) fn exhausted(&self, retrying: &mut Option<Retrying>) -> Error {
        let state = retrying
            .as_mut()
            .expect("a request out of budget has failed");
        let attempts = state.tries.count();
        self.telemetry.add(Counter::BudgetExhausted);
        self.emit(Event::RetryBudgetExhausted { attempts });
        Error::RetryBudgetExhausted {
            budget: self.settings.retry_budget,
            spent: state.tries.spent(),
            attempts,
            failures: std::mem::take(&mut state.failures),
        }
    }

    /// Sends on the master's shared connection.
    async fn send_shared(&self, master: &Master, request: Request<'_>, idempotent: bool) -> Sent {
        let connection = master.connection.load_full();
        if connection.has_failed() {
            // Known dead: sending would fail without reaching Redis.
            return Sent::Unreachable("the connection had failed".to_owned());
        }
        match request.send(&mut connection.multiplexed.clone()).await {
            Ok(reply) => match request.refusal(&reply, idempotent) {
                None => Sent::Done(reply),
                Some((refusal, _)) => Sent::Failed(refusal),
            },
            Err(error) => {
                if Failure::of(&error) == Failure::OutcomeUnknown {
                    connection.fail();
                }
                Sent::Failed(error)
            }
        }
    }
}
