//! State shared by a client's handles and background tasks: the current
//! master, single-flight rediscovery, and the retry loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use redis::aio::MultiplexedConnection;
use tokio::sync::{broadcast, watch};
use tracing::Instrument;

use crate::addr::NodeAddr;
use crate::builder::{FailoverClientBuilder, Mode};
use crate::discovery::Newest;
use crate::durable::Replicas;
use crate::error::NodeFailure;
use crate::events::{Counter, Event, Metrics, Trigger};
use crate::node::{Connector, DedicatedManager, MasterCheck, MasterManager};
use crate::replicas::{ReadSet, replica_loop};

/// The master requests go to.
pub(crate) struct Master {
    pub(crate) generation: u64,
    pub(crate) node: NodeAddr,
    /// The latest Sentinel config epoch it was named in (0 without Sentinel).
    pub(crate) config_epoch: AtomicU64,
    /// Holds the connections to this master; replaces a failed one.
    pub(crate) pool: bb8::Pool<MasterManager>,
    /// The multiplexed connection every request shares, replaced through
    /// `pool` once it fails.
    pub(crate) connection: ArcSwap<Connection>,
    /// Connections durable writes hold one at a time, opened on demand.
    pub(crate) dedicated: bb8::Pool<DedicatedManager>,
    /// Its replicas as durable writes last counted them.
    pub(crate) replicas: Replicas,
}

impl Master {
    pub(crate) fn config_epoch(&self) -> u64 {
        self.config_epoch.load(Ordering::Acquire)
    }
}

/// A shared multiplexed connection, and whether it is known to have failed.
pub(crate) struct Connection {
    pub(crate) multiplexed: MultiplexedConnection,
    /// Set on the first timeout or connection error: later requests do not
    /// send on it (it would fail without sending) but wait for a new one.
    pub(crate) failed: AtomicBool,
}

impl Connection {
    pub(crate) fn new(multiplexed: MultiplexedConnection) -> Arc<Self> {
        Arc::new(Self {
            multiplexed,
            failed: AtomicBool::new(false),
        })
    }
}

/// A master that passed its check, not yet installed.
pub(crate) enum Opened {
    /// The current master, still master, with a working connection.
    Same(Arc<Master>),
    /// Another node.
    New {
        node: NodeAddr,
        config_epoch: u64,
        pool: bb8::Pool<MasterManager>,
        dedicated: bb8::Pool<DedicatedManager>,
        connection: MultiplexedConnection,
    },
}

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

pub(crate) struct Shared {
    pub(crate) settings: FailoverClientBuilder,
    pub(crate) data: Connector,
    pub(crate) sentinel_connector: Connector,
    /// The sentinels to ask, grown from `SENTINEL SENTINELS`.
    pub(crate) sentinels: Mutex<Vec<NodeAddr>>,
    /// Open connections to sentinels, dropped when they fail.
    pub(crate) sentinel_connections: Mutex<HashMap<NodeAddr, MultiplexedConnection>>,
    pub(crate) master: ArcSwapOption<Master>,
    /// Discoveries started: a caller that saw a failure at epoch `e` and
    /// finds the epoch moved on knows someone looked again since.
    pub(crate) epoch: AtomicU64,
    discovery: tokio::sync::Mutex<DiscoveryState>,
    /// The generation of the installed master; wakes requests waiting for one.
    installed: watch::Sender<u64>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) metrics: Metrics,
    /// The replicas reads may use, refreshed by the replica probes.
    pub(crate) read_set: ArcSwap<ReadSet>,
    /// Where `ReadPolicy::RoundRobin` goes next.
    pub(crate) round_robin: AtomicUsize,
    /// The newest config epoch any sentinel reported: no master named in
    /// an older one is used again.
    pub(crate) newest: Mutex<Newest>,
    stopped: watch::Receiver<()>,
    /// Whether the replica probes run (they start on first need).
    tracking: AtomicBool,
    /// How many rounds of replica probes have completed.
    pub(crate) probe_rounds: watch::Sender<u64>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("mode", &self.settings.mode)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Locks a std mutex, going on after a panic elsewhere (the data stays valid).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// `stopped` closes when the client is dropped; background tasks
    /// started later watch it.
    pub(crate) fn new(settings: FailoverClientBuilder, stopped: watch::Receiver<()>) -> Self {
        let connector = |credentials, tls| {
            Connector::new(
                Arc::clone(&settings.resolver),
                credentials,
                tls,
                settings.connect_timeout,
                settings.command_timeout,
            )
        };
        let data = connector(settings.credentials.clone(), settings.tls.clone());
        let sentinel_connector = connector(
            settings.sentinel_credentials.clone(),
            settings.sentinel_tls.clone(),
        );
        let sentinels = match &settings.mode {
            Mode::Sentinel { sentinels, .. } => sentinels.clone(),
            Mode::Candidates { .. } => Vec::new(),
        };
        Self {
            events: broadcast::channel(settings.event_capacity).0,
            settings,
            data,
            sentinel_connector,
            sentinels: Mutex::new(sentinels),
            sentinel_connections: Mutex::default(),
            master: ArcSwapOption::empty(),
            epoch: AtomicU64::new(0),
            discovery: tokio::sync::Mutex::default(),
            installed: watch::channel(0).0,
            metrics: Metrics::default(),
            read_set: ArcSwap::default(),
            round_robin: AtomicUsize::new(0),
            newest: Mutex::default(),
            stopped,
            tracking: AtomicBool::new(false),
            probe_rounds: watch::channel(0).0,
        }
    }

    /// Starts the replica probes unless they run: on the first read that
    /// may use replicas, or at build time when the settings need them.
    pub(crate) fn track_replicas(self: &Arc<Self>) {
        if !self.tracking.swap(true, Ordering::AcqRel) {
            tokio::spawn(replica_loop(Arc::clone(self), self.stopped.clone()));
        }
    }

    /// Closes when the client is dropped (see [`crate::tasks::stopped`]).
    pub(crate) fn stopped(&self) -> watch::Receiver<()> {
        self.stopped.clone()
    }

    /// Wakes on every master installed, with its generation.
    pub(crate) fn subscribe_installed(&self) -> watch::Receiver<u64> {
        self.installed.subscribe()
    }

    pub(crate) fn emit(&self, event: Event) {
        // No subscriber is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }

    /// How a node proves it is master: Sentinel's answers are always
    /// confirmed with `ROLE`; candidates use the configured check.
    pub(crate) fn master_check(&self) -> MasterCheck {
        match &self.settings.mode {
            Mode::Candidates { .. } => self.settings.master_check,
            Mode::Sentinel { .. } => MasterCheck::Role,
        }
    }

    /// The master to use now (finding one if none is known) and the
    /// discovery epoch it was observed at.
    pub(crate) async fn current(&self) -> Result<(Arc<Master>, u64), Vec<NodeFailure>> {
        // The epoch is read before the master, so a discovery that installs
        // a newer master meanwhile has a newer epoch than the pair shows.
        let epoch = self.epoch.load(Ordering::Acquire);
        match self.master.load_full() {
            Some(master) => Ok((master, epoch)),
            None => self.rediscover(epoch, Trigger::NoMaster, None).await,
        }
    }

    /// Starts a rediscovery without making the caller wait for it.
    pub(crate) fn rediscover_in_background(
        self: &Arc<Self>,
        epoch: u64,
        trigger: Trigger,
        failed: Arc<Master>,
    ) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let _ = shared.rediscover(epoch, trigger, Some(&failed)).await;
        });
    }

    /// Looks for the master again, unless a discovery finished since the
    /// caller observed `epoch`: then its outcome is the answer. One
    /// discovery runs at a time, so a burst of failures causes one.
    /// `failed` is the master the caller saw fail, if any.
    pub(crate) async fn rediscover(
        &self,
        epoch: u64,
        trigger: Trigger,
        failed: Option<&Arc<Master>>,
    ) -> Result<(Arc<Master>, u64), Vec<NodeFailure>> {
        let mut state = self.discovery.lock().await;
        let now = self.epoch.load(Ordering::Acquire);
        if now != epoch {
            return match self.master.load_full() {
                Some(master) => Ok((master, now)),
                None => Err(state.last_failures.clone()),
            };
        }
        // Bumped as the discovery starts: only a discovery that started
        // after a caller's observation answers for that caller.
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let current = self.master.load_full();
        let failed_is_current =
            matches!((failed, &current), (Some(f), Some(c)) if Arc::ptr_eq(f, c));
        if failed_is_current && state.first_failure.is_none() {
            state.first_failure = Some(Instant::now());
        }
        if failed_is_current && trigger == Trigger::ReadOnly {
            // A demoted master: no request may use it while we look.
            self.master.store(None);
            self.emit(Event::MasterLost {
                node: failed.expect("checked above").node.clone(),
                trigger,
            });
        }
        self.metrics.add(Counter::Discoveries);
        let found = self
            .find_master(current.as_ref())
            .instrument(tracing::debug_span!("discover", ?trigger, epoch))
            .await;
        let result = match found {
            Ok(Opened::Same(master)) => {
                self.master.store(Some(Arc::clone(&master)));
                state.first_failure = None;
                state.last_failures.clear();
                Ok(master)
            }
            Ok(Opened::New {
                node,
                config_epoch,
                pool,
                dedicated,
                connection,
            }) => {
                let generation = *self.installed.borrow() + 1;
                let master = Arc::new(Master {
                    generation,
                    node: node.clone(),
                    config_epoch: AtomicU64::new(config_epoch),
                    pool,
                    dedicated,
                    connection: ArcSwap::new(Connection::new(connection)),
                    // The replica it lacks is most likely the master that failed.
                    replicas: Replicas::short_since(state.first_failure),
                });
                self.master.store(Some(Arc::clone(&master)));
                let after_failure = state.first_failure.take().map(|at| at.elapsed());
                let from = state.last_master.replace(node.clone());
                if from.as_ref() != Some(&node) {
                    if let Some(after) = after_failure {
                        self.metrics.set_switch_after_failure(after);
                    }
                    self.metrics.add(Counter::MasterChanges);
                }
                tracing::info!(?from, to = %node, generation, ?trigger, "master installed");
                self.emit(Event::MasterChanged {
                    from,
                    to: node,
                    generation,
                    trigger,
                    after_failure,
                });
                self.installed.send_replace(generation);
                state.last_failures.clear();
                Ok(master)
            }
            Err(failures) => {
                tracing::warn!(?trigger, ?failures, "no master found");
                // Only a failure of the master itself, not an inconclusive
                // look (sentinels still disagreeing), gives the master up.
                if failed_is_current && let Some(master) = self.master.swap(None) {
                    self.emit(Event::MasterLost {
                        node: master.node.clone(),
                        trigger,
                    });
                }
                state.last_failures = failures.clone();
                Err(failures)
            }
        };
        result.map(|master| (master, epoch))
    }
}
