//! The retry policy: after a failed try, whether to try again and after
//! how long, or to give up. Pure: it sees what happened, never Redis, so
//! every path of the retry loops is decided (and tested) here.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;

/// How often a request is resent after timing out on a master that is
/// still master: each resend of a slow request runs it again.
const MAX_RESENDS_AFTER_STALL: u32 = 2;

/// How many redirects in a row (`MOVED`, `ASK`) are followed at once;
/// past them the backoff applies, so that nodes that disagree on a slot's
/// owner are not asked in a tight loop.
const IMMEDIATE_REDIRECTS: u32 = 5;

/// What one failed try came to, as the policy needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tried {
    /// No master was found, or the one found was refused before sending.
    NotSent,
    /// The master is fine but cannot take the request yet (too few
    /// replicas, `BUSY`, `NOREPLICAS`): try it again there.
    Held,
    /// A cluster node named the node that owns the slot (`MOVED`, `ASK`)
    /// without running the request: resend there, at once.
    Redirected,
    /// The node refused without running the request (`READONLY`,
    /// `LOADING`, ...), or could not be reached: it surely did not run.
    NotRun,
    /// The connection failed or timed out after sending: it may have run.
    /// `resendable` when running it twice is harmless; `stalled` when the
    /// master it went to is still master (a slow request, not a failover).
    MaybeRun { resendable: bool, stalled: bool },
    /// A durable write ran but too few replicas confirmed it; `resendable`
    /// when running it again is harmless.
    Unreplicated { resendable: bool },
    /// A transaction's watched keys changed before it committed.
    Conflict,
}

/// What to do after a failed try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Wait this long (less if a new master is installed meanwhile) and
    /// try again.
    Retry(Duration),
    /// Stop here: the failure stands.
    GiveUp(GaveUp),
}

/// Why the policy stopped retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GaveUp {
    /// The retry budget is spent.
    Budget,
    /// The request may have run and must not run twice, or kept stalling
    /// a master that is still master.
    OutcomeUnknown,
    /// The write ran, unreplicated, and must not run twice.
    Unreplicated,
}

/// The budget and backoff every retry loop of a client shares.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RetryPolicy {
    pub(crate) budget: Duration,
    pub(crate) backoff: Backoff,
}

/// The tries of one request since its first failure.
#[derive(Clone, Debug)]
pub(crate) struct Tries {
    started: Instant,
    retries: u32,
    stalls: u32,
    redirects: u32,
}

impl Tries {
    /// Counting from the first failure, now.
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            retries: 0,
            stalls: 0,
            redirects: 0,
        }
    }

    /// How many times the request was sent or looked for a master: the
    /// first try and every retry.
    pub(crate) fn count(&self) -> u32 {
        self.retries + 1
    }

    /// Time since the first failure.
    pub(crate) fn spent(&self) -> Duration {
        self.started.elapsed()
    }
}

impl RetryPolicy {
    /// Decides on the failure `tried`, counting it in `tries`.
    pub(crate) fn decide(&self, tries: &mut Tries, tried: Tried) -> Decision {
        match tried {
            Tried::MaybeRun {
                resendable: false, ..
            } => return Decision::GiveUp(GaveUp::OutcomeUnknown),
            Tried::MaybeRun { stalled: true, .. } => {
                tries.stalls += 1;
                if tries.stalls > MAX_RESENDS_AFTER_STALL {
                    return Decision::GiveUp(GaveUp::OutcomeUnknown);
                }
            }
            Tried::Unreplicated { resendable: false } => {
                return Decision::GiveUp(GaveUp::Unreplicated);
            }
            _ => {}
        }
        let spent = tries.spent();
        if spent >= self.budget {
            return Decision::GiveUp(GaveUp::Budget);
        }
        if tried == Tried::Redirected && tries.redirects < IMMEDIATE_REDIRECTS {
            tries.redirects += 1;
            tries.retries += 1;
            return Decision::Retry(Duration::ZERO);
        }
        let wait = self.backoff.delay(tries.retries).min(self.budget - spent);
        tries.retries += 1;
        Decision::Retry(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(budget_ms: u64) -> RetryPolicy {
        RetryPolicy {
            budget: Duration::from_millis(budget_ms),
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(80)).unwrap(),
        }
    }

    /// Follows the policy's waits on paused time until it gives up.
    async fn until_given_up(policy: &RetryPolicy, tried: Tried) -> (GaveUp, Tries) {
        let mut tries = Tries::new();
        loop {
            match policy.decide(&mut tries, tried) {
                Decision::Retry(wait) => tokio::time::sleep(wait).await,
                Decision::GiveUp(why) => return (why, tries),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_that_did_not_run_retry_until_the_budget_and_never_past_it() {
        for tried in [Tried::NotSent, Tried::Held, Tried::NotRun, Tried::Conflict] {
            let started = Instant::now();
            let (why, tries) = until_given_up(&policy(1_000), tried).await;
            assert_eq!(why, GaveUp::Budget, "{tried:?}");
            // The last wait is cut to what is left: it ends at the budget.
            assert_eq!(started.elapsed(), Duration::from_millis(1_000), "{tried:?}");
            // 10, 20, 40 ms ceilings then 80 ms: at least 1000 / 80 waits.
            assert!(tries.count() > 12, "{tried:?}: {}", tries.count());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_grow_from_the_base_to_the_cap() {
        let policy = policy(60_000);
        let mut tries = Tries::new();
        let ceilings = [10, 20, 40, 80, 80, 80];
        for ceiling in ceilings {
            let Decision::Retry(wait) = policy.decide(&mut tries, Tried::NotRun) else {
                panic!("gave up within the budget");
            };
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                wait <= ceiling && wait >= ceiling / 2,
                "{wait:?} vs {ceiling:?}"
            );
        }
        assert_eq!(tries.count(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_counts_from_the_first_failure_to_the_edge() {
        let policy = policy(100);
        let mut tries = Tries::new();
        tokio::time::advance(Duration::from_millis(99)).await;
        match policy.decide(&mut tries, Tried::NotRun) {
            Decision::Retry(wait) => assert!(wait <= Duration::from_millis(1), "{wait:?}"),
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            policy.decide(&mut tries, Tried::NotRun),
            Decision::GiveUp(GaveUp::Budget)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_may_have_run_is_resent_only_if_resendable() {
        let policy = policy(1_000);
        let maybe = |resendable| Tried::MaybeRun {
            resendable,
            stalled: false,
        };
        assert_eq!(
            policy.decide(&mut Tries::new(), maybe(false)),
            Decision::GiveUp(GaveUp::OutcomeUnknown)
        );
        let (why, _) = until_given_up(&policy, maybe(true)).await;
        assert_eq!(why, GaveUp::Budget);
        assert_eq!(
            policy.decide(&mut Tries::new(), Tried::Unreplicated { resendable: false }),
            Decision::GiveUp(GaveUp::Unreplicated)
        );
        let (why, _) = until_given_up(&policy, Tried::Unreplicated { resendable: true }).await;
        assert_eq!(why, GaveUp::Budget);
    }

    #[tokio::test(start_paused = true)]
    async fn redirects_are_followed_at_once_then_backed_off_within_the_budget() {
        let policy = policy(1_000);
        let mut tries = Tries::new();
        for _ in 0..IMMEDIATE_REDIRECTS {
            assert_eq!(
                policy.decide(&mut tries, Tried::Redirected),
                Decision::Retry(Duration::ZERO)
            );
        }
        let Decision::Retry(wait) = policy.decide(&mut tries, Tried::Redirected) else {
            panic!("gave up within the budget");
        };
        assert!(wait > Duration::ZERO);
        let started = Instant::now();
        let (why, _) = until_given_up(&policy, Tried::Redirected).await;
        assert_eq!(why, GaveUp::Budget);
        assert!(started.elapsed() <= Duration::from_millis(1_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalling_master_gets_a_few_resends_not_the_whole_budget() {
        let stalled = Tried::MaybeRun {
            resendable: true,
            stalled: true,
        };
        let started = Instant::now();
        let (why, tries) = until_given_up(&policy(60_000), stalled).await;
        assert_eq!(why, GaveUp::OutcomeUnknown);
        assert_eq!(tries.count(), MAX_RESENDS_AFTER_STALL + 1);
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
