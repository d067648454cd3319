//! What the client tells the world: events as they happen, counters at any time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;

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
    /// The master, demoted, answered `-REDIRECT` with the new master's
    /// address (Valkey 8 and later): in candidates mode that node is
    /// checked and installed without asking the other candidates; Sentinel
    /// mode still asks the sentinels.
    Redirect,
    /// The master refused a request as a node that cannot serve as master
    /// now (`LOADING`, `MASTERDOWN`, `UNBLOCKED`), or a transaction was
    /// discarded for such a refusal.
    Unavailable,
    /// A request to the master timed out (a hung master).
    Timeout,
    /// The connection to the master failed.
    ConnectionLost,
    /// A sentinel named another master in a newer config epoch: the old
    /// one is fenced, even if it still accepts writes.
    Superseded,
    /// A Redis Cluster's slot map, loaded again (on its timer, or after
    /// `MOVED`, `READONLY` or a lost master), gave a shard's slots to
    /// another master.
    SlotMap,
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
    /// A replica may serve reads again: it follows the current master and
    /// is within the staleness bound.
    ReplicaUsable {
        /// The replica.
        node: NodeAddr,
    },
    /// A replica no longer serves reads.
    ReplicaUnusable {
        /// The replica.
        node: NodeAddr,
        /// Why: its link to the master is down, it lags more than the
        /// bound, it does not answer, ...
        reason: String,
    },
    /// The master left behind by a switch still claimed to be master and
    /// was made a replica of the new one
    /// ([`demote_stale_masters`](crate::FailoverClientBuilder::demote_stale_masters)).
    StaleMasterDemoted {
        /// The old master.
        node: NodeAddr,
        /// The master it now replicates.
        master: NodeAddr,
    },
    /// The master restarted (its run id changed) between two connections,
    /// without a failover: it is installed again as a new master. With
    /// `replication_id_changed`, it came back without its replication
    /// history, which without persistence means empty, and its replicas
    /// empty themselves to follow it.
    MasterRestarted {
        /// The master.
        node: NodeAddr,
        /// Whether it started a new replication history.
        replication_id_changed: bool,
    },
    /// A request gave up after its retry budget.
    RetryBudgetExhausted {
        /// How many attempts it made.
        attempts: u32,
    },
}

/// Where the client's events and counters go: the master state, the
/// request paths and the background tasks share one.
#[derive(Debug)]
pub(crate) struct Telemetry {
    events: broadcast::Sender<Event>,
    pub(crate) metrics: Metrics,
}

impl Telemetry {
    /// Keeping up to `capacity` events for a subscriber that lags.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            events: broadcast::channel(capacity).0,
            metrics: Metrics::default(),
        }
    }

    pub(crate) fn emit(&self, event: Event) {
        // No subscriber is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }

    pub(crate) fn add(&self, counter: Counter) {
        self.metrics.add(counter);
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// Counters of the client's life, readable at any time.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    counters: [AtomicU64; Counter::COUNT],
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
    /// How many discoveries of the master ran (for a cluster client, loads
    /// of the slot map).
    pub discoveries: u64,
    /// For the latest switch that followed a failure, the time from that
    /// failure to the switch, in milliseconds (0 if none yet).
    pub last_switch_after_failure_ms: u64,
    /// How many masters were fenced because the sentinels named another
    /// in a newer config epoch.
    pub fenced: u64,
    /// How many reads a replica answered.
    pub replica_reads: u64,
    /// How many reads went to the master through a read policy (by
    /// choice, or because no replica qualified or answered).
    pub master_reads: u64,
    /// How many session reads a replica could not serve because it had not
    /// yet replicated the session's writes (they went to the master).
    pub session_fallbacks: u64,
    /// How many durable writes fewer replicas acknowledged than asked.
    pub unreplicated_writes: u64,
    /// How many times a write waited because the master had fewer healthy
    /// replicas than `min_replicas` asks.
    pub min_replicas_refusals: u64,
    /// How many times a durable write waited, without running, because
    /// the master had fewer replicas online than it waits for.
    pub durable_writes_held: u64,
    /// How many stale masters this client demoted to replicas.
    pub stale_masters_demoted: u64,
    /// How many `REDIRECT` replies requests met (Valkey's answer, instead
    /// of `READONLY`, from a demoted master); for a cluster client, how
    /// many `MOVED` and `ASK` replies.
    pub redirect_replies: u64,
    /// How many times the node a `REDIRECT` named was checked directly
    /// (candidates mode), instead of a discovery: kept or installed as
    /// master, or given up when it did not prove itself; not counted in
    /// `discoveries`.
    pub redirects_followed: u64,
    /// How many times a master was found restarted (a new run id) when its
    /// connection was opened again.
    pub master_restarts: u64,
}

#[derive(Clone, Copy)]
pub(crate) enum Counter {
    MasterChanges,
    ReadonlyReplies,
    Retries,
    OutcomeUnknown,
    BudgetExhausted,
    Discoveries,
    Fenced,
    ReplicaReads,
    MasterReads,
    SessionFallbacks,
    UnreplicatedWrites,
    MinReplicasRefusals,
    DurableWritesHeld,
    StaleMastersDemoted,
    RedirectReplies,
    RedirectsFollowed,
    MasterRestarts,
}

impl Counter {
    const COUNT: usize = Self::MasterRestarts as usize + 1;
}

impl Metrics {
    pub(crate) fn add(&self, counter: Counter) {
        self.counters[counter as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_switch_after_failure(&self, after: Duration) {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.last_switch_after_failure_ms
            .store(ms, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let read = |counter: Counter| self.counters[counter as usize].load(Ordering::Relaxed);
        MetricsSnapshot {
            master_changes: read(Counter::MasterChanges),
            readonly_replies: read(Counter::ReadonlyReplies),
            retries: read(Counter::Retries),
            outcome_unknown: read(Counter::OutcomeUnknown),
            budget_exhausted: read(Counter::BudgetExhausted),
            discoveries: read(Counter::Discoveries),
            last_switch_after_failure_ms: self.last_switch_after_failure_ms.load(Ordering::Relaxed),
            fenced: read(Counter::Fenced),
            replica_reads: read(Counter::ReplicaReads),
            master_reads: read(Counter::MasterReads),
            session_fallbacks: read(Counter::SessionFallbacks),
            unreplicated_writes: read(Counter::UnreplicatedWrites),
            min_replicas_refusals: read(Counter::MinReplicasRefusals),
            durable_writes_held: read(Counter::DurableWritesHeld),
            stale_masters_demoted: read(Counter::StaleMastersDemoted),
            redirect_replies: read(Counter::RedirectReplies),
            redirects_followed: read(Counter::RedirectsFollowed),
            master_restarts: read(Counter::MasterRestarts),
        }
    }
}
