//! The master state, with one owner: the installed master and its
//! generation, the discovery epoch, the newest Sentinel epoch and the read
//! set change only through the transitions here, each with its event.
//!
//! Requests read the state without locking ([`MasterState::observe`]);
//! a discovery holds [`Discovery`], which only one task has at a time, and
//! ends it with [`Discovery::keep`], [`Discovery::install`] or
//! [`Discovery::not_found`]. [`MasterState::fence`] gives a superseded
//! master up from anywhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use redis::aio::MultiplexedConnection;
use tokio::sync::watch;

use crate::addr::NodeAddr;
use crate::durable::Replicas;
use crate::epochs::{Named, Newest};
use crate::error::NodeFailure;
use crate::events::{Counter, Event, Telemetry, Trigger};
use crate::lane::LaneSlot;
use crate::node::{Connection, DedicatedManager, MasterManager};
use crate::persisted::AofSupport;
use crate::replica_set::ReadSet;

/// The master requests go to.
pub(crate) struct Master {
    pub(crate) generation: u64,
    pub(crate) node: NodeAddr,
    /// The latest Sentinel config epoch it was named in (0 without Sentinel).
    config_epoch: AtomicU64,
    /// Opens a new shared connection once the current one failed.
    pub(crate) opener: MasterManager,
    /// The multiplexed connection every request shares, replaced once it
    /// fails.
    pub(crate) connection: ArcSwap<Connection>,
    /// Connections a request holds alone (blocking commands, transactions,
    /// `WAIT`), opened on demand.
    pub(crate) dedicated: bb8::Pool<DedicatedManager>,
    /// Its replicas as durable writes last counted them.
    pub(crate) replicas: Replicas,
    /// Whether it was seen to acknowledge persisted writes (`WAITAOF`).
    pub(crate) aof: AofSupport,
    /// The connection of durable writes, opened on the first
    /// ([`crate::group_commit`]).
    pub(crate) lane: LaneSlot,
}

impl Master {
    pub(crate) fn config_epoch(&self) -> u64 {
        self.config_epoch.load(Ordering::Acquire)
    }

    /// A sentinel named it in `config_epoch`.
    pub(crate) fn named_in(&self, config_epoch: u64) {
        self.config_epoch.fetch_max(config_epoch, Ordering::AcqRel);
    }

    /// A failure of this master, for the errors that list them.
    pub(crate) fn failure(&self, reason: String) -> NodeFailure {
        NodeFailure {
            node: self.node.clone(),
            reason,
        }
    }

    /// Its shared connection failed: requests wait for a new one.
    pub(crate) fn connection_failed(&self) {
        self.connection.load().fail();
    }
}

/// A master that passed its check, not yet installed.
pub(crate) enum Opened {
    /// The current master, still master, with a working connection.
    Same(Arc<Master>),
    /// Another node.
    New(Box<NewMaster>),
}

/// A node that proved it is master, with its connections, not installed.
pub(crate) struct NewMaster {
    pub(crate) node: NodeAddr,
    pub(crate) config_epoch: u64,
    pub(crate) opener: MasterManager,
    pub(crate) dedicated: bb8::Pool<DedicatedManager>,
    pub(crate) connection: MultiplexedConnection,
}

/// The master as a request saw it: the pair a later rediscovery is judged
/// against (see [`MasterState::begin`]).
pub(crate) struct Observed {
    pub(crate) master: Option<Arc<Master>>,
    pub(crate) epoch: u64,
}

/// What a discovery that finished since an observation found.
pub(crate) type Found = Result<(Arc<Master>, u64), Vec<NodeFailure>>;

#[derive(Default)]
struct DiscoveryState {
    /// Why the latest discovery found no master, for callers that waited on it.
    last_failures: Vec<NodeFailure>,
    /// When the current master was first seen failing.
    first_failure: Option<Instant>,
    /// The master installed last, kept after it is given up, so the next
    /// switch says where it came from.
    last_master: Option<NodeAddr>,
}

/// See the module's documentation.
pub(crate) struct MasterState {
    current: ArcSwapOption<Master>,
    /// Discoveries started: a caller that saw a failure at epoch `e` and
    /// finds the epoch moved on knows someone looked again since.
    epoch: AtomicU64,
    discovery: tokio::sync::Mutex<DiscoveryState>,
    /// The generation of the installed master; wakes whoever waits for one.
    installed: watch::Sender<u64>,
    /// The newest config epoch any sentinel reported.
    newest: Mutex<Newest>,
    /// The replicas reads may use, refreshed by the replica probes.
    read_set: ArcSwap<ReadSet>,
    telemetry: Arc<Telemetry>,
}

/// Locks a std mutex, going on after a panic elsewhere (the data stays valid).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MasterState {
    pub(crate) fn new(telemetry: Arc<Telemetry>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            epoch: AtomicU64::new(0),
            discovery: tokio::sync::Mutex::default(),
            installed: watch::channel(0).0,
            newest: Mutex::default(),
            read_set: ArcSwap::default(),
            telemetry,
        }
    }

    /// The installed master, if any.
    pub(crate) fn master(&self) -> Option<Arc<Master>> {
        self.current.load_full()
    }

    /// The installed master and the discovery epoch it was seen at: the
    /// epoch is read first, so a discovery that installs another master
    /// meanwhile has a newer epoch than the pair shows.
    pub(crate) fn observe(&self) -> Observed {
        let epoch = self.epoch.load(Ordering::Acquire);
        Observed {
            master: self.current.load_full(),
            epoch,
        }
    }

    /// Wakes on every master installed, with its generation.
    pub(crate) fn installed(&self) -> watch::Receiver<u64> {
        self.installed.subscribe()
    }

    /// The replicas reads may use now.
    pub(crate) fn read_set(&self) -> Arc<ReadSet> {
        self.read_set.load_full()
    }

    /// A new round of replica probes, unless its master was replaced or
    /// fenced while it ran: replicas judged against a fenced master must
    /// not serve reads.
    pub(crate) fn publish_read_set(&self, set: ReadSet) {
        // Generation 0: probed with no master installed.
        let generation = set.master_generation;
        let current = || self.current.load().as_ref().map_or(0, |m| m.generation);
        if current() != generation {
            return;
        }
        self.read_set.store(Arc::new(set));
        // A fence between the check and the store cleared the set first.
        if current() != generation {
            self.read_set.store(Arc::default());
        }
    }

    /// A sentinel named `named`.
    pub(crate) fn record_named(&self, named: &Named) {
        lock(&self.newest).record(named);
    }

    /// Whether a node other than `master` was named in a newer epoch.
    pub(crate) fn superseded(&self, master: &Master) -> bool {
        lock(&self.newest)
            .supersedes(&master.node, master.config_epoch())
            .is_some()
    }

    /// `named`, unless a newer epoch named another node.
    pub(crate) fn current_named(&self, named: Named) -> Result<Named, Vec<NodeFailure>> {
        lock(&self.newest).current(named)
    }

    /// Gives up `master`, which the sentinels replaced in a newer epoch:
    /// even if it still accepts writes (partitioned from the sentinels but
    /// not from this client), they would be lost. Its replicas may miss the
    /// new master's writes: no reads there until the probes vouch for
    /// replicas again.
    pub(crate) fn fence(&self, master: &Arc<Master>) {
        if self.give_up(master) {
            self.read_set.store(Arc::default());
            self.telemetry.add(Counter::Fenced);
            tracing::warn!(node = %master.node, "master fenced: the sentinels elected another in a newer epoch");
            self.telemetry.emit(Event::MasterLost {
                node: master.node.clone(),
                trigger: Trigger::Superseded,
            });
        }
    }

    /// Uninstalls `master` if it is installed; whether it was.
    fn give_up(&self, master: &Arc<Master>) -> bool {
        let previous = self.current.compare_and_swap(master, None);
        previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, master))
    }

    /// Starts a discovery for a caller that observed the state at `epoch`,
    /// once no other runs; or, if one finished since that observation,
    /// what it found.
    pub(crate) async fn begin(&self, epoch: u64) -> Result<Discovery<'_>, Found> {
        self.begin_counted(epoch, Counter::Discoveries).await
    }

    /// [`begin`](Self::begin) for a check of the one node a `REDIRECT`
    /// named: the same single flight and epochs, counted apart from
    /// discoveries.
    pub(crate) async fn begin_redirect(&self, epoch: u64) -> Result<Discovery<'_>, Found> {
        self.begin_counted(epoch, Counter::RedirectsFollowed).await
    }

    async fn begin_counted(&self, epoch: u64, counter: Counter) -> Result<Discovery<'_>, Found> {
        let guard = self.discovery.lock().await;
        let now = self.epoch.load(Ordering::Acquire);
        if now != epoch {
            return Err(match self.current.load_full() {
                Some(master) => Ok((master, now)),
                None => Err(guard.last_failures.clone()),
            });
        }
        // Bumped as the discovery starts: only a discovery that started
        // after a caller's observation answers for that caller.
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.telemetry.add(counter);
        Ok(Discovery {
            state: self,
            guard,
            epoch,
            current: self.current.load_full(),
            failed_is_current: false,
        })
    }
}

/// A discovery under way; see [`MasterState::begin`].
pub(crate) struct Discovery<'a> {
    state: &'a MasterState,
    guard: tokio::sync::MutexGuard<'a, DiscoveryState>,
    epoch: u64,
    current: Option<Arc<Master>>,
    /// The caller saw the installed master fail.
    failed_is_current: bool,
}

impl Discovery<'_> {
    /// The master installed when the discovery began.
    pub(crate) fn current(&self) -> Option<&Arc<Master>> {
        self.current.as_ref()
    }

    /// The caller saw `failed` fail (`trigger` says how). A demoted master
    /// (`READONLY`, `REDIRECT`) is given up at once: no request may use it
    /// meanwhile.
    pub(crate) fn saw_failure(&mut self, failed: Option<&Arc<Master>>, trigger: Trigger) {
        self.failed_is_current = matches!((failed, &self.current),
            (Some(f), Some(c)) if Arc::ptr_eq(f, c));
        if !self.failed_is_current {
            return;
        }
        self.guard.first_failure.get_or_insert_with(Instant::now);
        let master = failed.expect("checked above");
        let demoted = matches!(trigger, Trigger::ReadOnly | Trigger::Redirect);
        if demoted && self.state.give_up(master) {
            self.state.telemetry.emit(Event::MasterLost {
                node: master.node.clone(),
                trigger,
            });
            // Demoted: if it is master again, that is a new master, with a
            // generation of its own.
            self.current = None;
        }
    }

    /// The installed master proved itself again.
    pub(crate) fn keep(mut self, master: Arc<Master>) -> (Arc<Master>, u64) {
        self.state.current.store(Some(Arc::clone(&master)));
        self.guard.first_failure = None;
        self.guard.last_failures.clear();
        (master, self.epoch)
    }

    /// Installs `new`, with a generation of its own.
    pub(crate) fn install(mut self, new: Box<NewMaster>, trigger: Trigger) -> (Arc<Master>, u64) {
        let state = self.state;
        let generation = *state.installed.borrow() + 1;
        let node = new.node.clone();
        let master = Arc::new(Master {
            generation,
            node: new.node,
            config_epoch: AtomicU64::new(new.config_epoch),
            opener: new.opener,
            dedicated: new.dedicated,
            connection: ArcSwap::new(Connection::new(new.connection)),
            // The replica it lacks is most likely the master that failed.
            replicas: Replicas::short_since(self.guard.first_failure),
            aof: AofSupport::default(),
            lane: LaneSlot::default(),
        });
        state.current.store(Some(Arc::clone(&master)));
        let after_failure = self.guard.first_failure.take().map(|at| at.elapsed());
        let from = self.guard.last_master.replace(node.clone());
        if from.as_ref() != Some(&node) {
            if let Some(after) = after_failure {
                state.telemetry.metrics.set_switch_after_failure(after);
            }
            state.telemetry.add(Counter::MasterChanges);
        }
        tracing::info!(?from, to = %node, generation, ?trigger, "master installed");
        state.telemetry.emit(Event::MasterChanged {
            from,
            to: node,
            generation,
            trigger,
            after_failure,
        });
        state.installed.send_replace(generation);
        self.guard.last_failures.clear();
        (master, self.epoch)
    }

    /// No master was found. Only a failure of the master itself, not an
    /// inconclusive look (sentinels still disagreeing), gives it up.
    pub(crate) fn not_found(
        mut self,
        failures: Vec<NodeFailure>,
        trigger: Trigger,
    ) -> Vec<NodeFailure> {
        tracing::warn!(?trigger, ?failures, "no master found");
        if self.failed_is_current
            && let Some(master) = &self.current
            && self.state.give_up(master)
        {
            self.state.telemetry.emit(Event::MasterLost {
                node: master.node.clone(),
                trigger,
            });
        }
        self.guard.last_failures = failures.clone();
        failures
    }
}
