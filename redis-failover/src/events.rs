//! What the client tells the world: events as they happen, counters at any time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::addr::NodeAddr;

/// What made the client look for the master.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Trigger {
    /// No master was known yet (start-up, or the last one was dropped).
    NoMaster,
    /// A sentinel published `+switch-master`.
    PubSub,
    /// A sentinel connection was (re-)established: notices missed while it
    /// was down are caught up.
    SentinelReconnect,
    /// The periodic re-check found the master changed or demoted.
    Poll,
    /// The master refused a write with `READONLY` (it was demoted).
    ReadOnly,
    /// The master refused a request as a node that cannot serve as master
    /// now (`LOADING`, `MASTERDOWN`, `UNBLOCKED`), or a transaction was
    /// discarded for such a refusal.
    Unavailable,
    /// A request to the master timed out (a hung master).
    Timeout,
    /// The connection to the master failed.
    ConnectionLost,
}

/// Something that happened to the client's view of the deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Writes now go to `to`, over connections of a new generation. `from`
    /// equals `to` when a master that was given up (hung, unreachable) is
    /// found again.
    MasterChanged {
        /// The previous master, if one was known.
        from: Option<NodeAddr>,
        /// The new master.
        to: NodeAddr,
        /// Bumped on every change; connections of older generations are not used again.
        generation: u64,
        /// What led to the discovery that found `to`.
        trigger: Trigger,
        /// Time from the first failure seen on the previous master to this
        /// switch, when a failure preceded it.
        after_failure: Option<Duration>,
    },
    /// The master stopped being usable; requests wait for a new one.
    MasterLost {
        /// The master given up.
        node: NodeAddr,
        /// Why.
        trigger: Trigger,
    },
    /// A sentinel's connection was lost (its `+switch-master` notices with it).
    NodeDown {
        /// The sentinel.
        node: NodeAddr,
        /// Why the connection failed or ended.
        reason: String,
    },
    /// A sentinel that was down is connected and subscribed again.
    NodeUp {
        /// The sentinel.
        node: NodeAddr,
    },
    /// Sentinels that answered named different masters, or too few agreed.
    SentinelDisagreement {
        /// Each answering sentinel and the master it named.
        answers: Vec<(NodeAddr, NodeAddr)>,
        /// How many had to agree.
        required: usize,
    },
    /// A request gave up after its retry budget.
    RetryBudgetExhausted {
        /// How many attempts it made.
        attempts: u32,
    },
}

/// Counters of the client's life, readable at any time.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    master_changes: AtomicU64,
    readonly_replies: AtomicU64,
    retries: AtomicU64,
    outcome_unknown: AtomicU64,
    budget_exhausted: AtomicU64,
    discoveries: AtomicU64,
    last_switch_after_failure_ms: AtomicU64,
}

/// A copy of the client's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// How many times writes moved to another node (the first master found counts).
    pub master_changes: u64,
    /// How many `READONLY` replies requests met.
    pub readonly_replies: u64,
    /// How many times a request waited out a backoff step before trying
    /// again (to send, or to find the master first).
    pub retries: u64,
    /// How many requests failed with an unknown outcome and were not resent.
    pub outcome_unknown: u64,
    /// How many requests gave up after their retry budget.
    pub budget_exhausted: u64,
    /// How many discoveries of the master ran.
    pub discoveries: u64,
    /// For the latest switch that followed a failure, the time from that
    /// failure to the switch, in milliseconds (0 if none yet).
    pub last_switch_after_failure_ms: u64,
}

pub(crate) enum Counter {
    MasterChanges,
    ReadonlyReplies,
    Retries,
    OutcomeUnknown,
    BudgetExhausted,
    Discoveries,
}

impl Metrics {
    pub(crate) fn add(&self, counter: Counter) {
        let cell = match counter {
            Counter::MasterChanges => &self.master_changes,
            Counter::ReadonlyReplies => &self.readonly_replies,
            Counter::Retries => &self.retries,
            Counter::OutcomeUnknown => &self.outcome_unknown,
            Counter::BudgetExhausted => &self.budget_exhausted,
            Counter::Discoveries => &self.discoveries,
        };
        cell.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_switch_after_failure(&self, after: Duration) {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.last_switch_after_failure_ms
            .store(ms, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let read = |cell: &AtomicU64| cell.load(Ordering::Relaxed);
        MetricsSnapshot {
            master_changes: read(&self.master_changes),
            readonly_replies: read(&self.readonly_replies),
            retries: read(&self.retries),
            outcome_unknown: read(&self.outcome_unknown),
            budget_exhausted: read(&self.budget_exhausted),
            discoveries: read(&self.discoveries),
            last_switch_after_failure_ms: read(&self.last_switch_after_failure_ms),
        }
    }
}
