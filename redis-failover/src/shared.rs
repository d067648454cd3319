//! State shared by a client's handles and background tasks: the current
//! master, single-flight rediscovery, and the retry loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use redis::RedisError;
use redis::aio::MultiplexedConnection;
use tokio::sync::{broadcast, watch};
use tracing::Instrument;

use crate::addr::NodeAddr;
use crate::builder::{FailoverClientBuilder, Mode};
use crate::discovery::Newest;
use crate::durable::{Outcome, Replicas};
use crate::error::{Error, NodeFailure, Result};
use crate::events::{Counter, Event, Metrics, Trigger};
use crate::node::{Connector, DedicatedManager, MasterCheck, MasterManager};
use crate::read::Durability;
use crate::replicas::{ReadSet, replica_loop};
use crate::request::{Reply, Request};
use crate::retry::{Failure, refusal_means_not_master, refusal_of};

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

/// How often a request is resent after timing out on a master that is
/// still master.
const MAX_RESENDS_AFTER_TIMEOUT: u32 = 2;

/// What became of one attempt to send a request to the master.
enum Sent {
    /// The master answered; the reply is the caller's.
    Done(Reply),
    /// A durable write ran, but its `WAIT` fell short or failed.
    Unreplicated(Error),
    /// Sent, and failed with this error (or a refusal in the reply).
    Failed(RedisError),
    /// Not sent: the master could not be reached (this is why).
    Unreachable(String),
    /// Not sent: the master is fine but cannot take it yet (this is why);
    /// wait and try again, without looking for another master.
    Held(String),
}

/// Whether the reply holds an error reply (of a command or in a pipeline).
fn has_error(reply: &Reply) -> bool {
    let is_error = |value: &redis::Value| matches!(value, redis::Value::ServerError(_));
    match reply {
        Reply::Value(value) => is_error(value),
        Reply::Values(values) => values.iter().any(is_error),
    }
}

/// The state of a request that failed at least once.
struct Retrying {
    started: Instant,
    attempt: u32,
    timeouts: u32,
    failures: Vec<NodeFailure>,
    installed: watch::Receiver<u64>,
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

    /// Sends `request` to the master, finding it again and resending as
    /// failures allow, until the retry budget (counted from the first
    /// failure) is spent. Returns the master that answered with the reply.
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
        let mut retrying: Option<Retrying> = None;
        loop {
            if let Some(state) = &mut retrying {
                self.wait_before_retry(state).await?;
            }
            let (master, epoch) = match self.current().await {
                Ok(found) => found,
                Err(found) => {
                    self.failed(&mut retrying, found);
                    continue;
                }
            };
            let sent = match self.hold_back(&master, write).await {
                Some(held) => held,
                None => match durability {
                    Durability::Replicated { replicas, timeout } if write => {
                        match self.await_replicas(&master, replicas).await {
                            Err(held) => held,
                            Ok(waits_for) => {
                                self.send_durable(&master, request, idempotent, waits_for, timeout)
                                    .await
                            }
                        }
                    }
                    _ => self.send_shared(&master, request, idempotent).await,
                },
            };
            let error = match sent {
                Sent::Done(reply) => return Ok((master, reply)),
                // Running an idempotent write again is harmless: it waits
                // for the replicas once more, within the budget.
                Sent::Unreplicated(error) if idempotent => {
                    let failure = NodeFailure {
                        node: master.node.clone(),
                        reason: error.to_string(),
                    };
                    self.failed(&mut retrying, vec![failure]);
                    continue;
                }
                Sent::Unreplicated(error) => return Err(error),
                Sent::Held(reason) => {
                    let failure = NodeFailure {
                        node: master.node.clone(),
                        reason,
                    };
                    self.failed(&mut retrying, vec![failure]);
                    continue;
                }
                Sent::Unreachable(reason) => Err(reason),
                Sent::Failed(error) => Ok(error),
            };
            let (failure, trigger) = match &error {
                Err(_) => (Failure::NotExecuted, Trigger::ConnectionLost),
                Ok(error) => match Failure::of(error) {
                    Failure::Final => {
                        return Err(Error::Command {
                            node: master.node.clone(),
                            source: error.clone(),
                        });
                    }
                    Failure::NotExecuted => match refusal_of(error) {
                        Some("READONLY") => {
                            self.metrics.add(Counter::ReadonlyReplies);
                            (Failure::NotExecuted, Trigger::ReadOnly)
                        }
                        Some(code) if !refusal_means_not_master(code) => {
                            // Busy, or waiting for replicas: the master is
                            // fine; wait and resend to it.
                            self.failed(
                                &mut retrying,
                                vec![NodeFailure {
                                    node: master.node.clone(),
                                    reason: error.to_string(),
                                }],
                            );
                            continue;
                        }
                        _ => (Failure::NotExecuted, Trigger::Unavailable),
                    },
                    Failure::OutcomeUnknown if error.is_timeout() => {
                        (Failure::OutcomeUnknown, Trigger::Timeout)
                    }
                    Failure::OutcomeUnknown => (Failure::OutcomeUnknown, Trigger::ConnectionLost),
                },
            };
            tracing::debug!(node = %master.node, ?error, ?trigger, "request to the master failed");
            if failure == Failure::OutcomeUnknown && !(idempotent || request.is_read_only()) {
                self.metrics.add(Counter::OutcomeUnknown);
                self.rediscover_in_background(epoch, trigger, Arc::clone(&master));
                return Err(Error::OutcomeUnknown {
                    node: master.node.clone(),
                    source: error.expect("an outcome-unknown failure has an error"),
                });
            }
            let reason = match &error {
                Ok(error) => error.to_string(),
                Err(reason) => reason.clone(),
            };
            self.failed(
                &mut retrying,
                vec![NodeFailure {
                    node: master.node.clone(),
                    reason,
                }],
            );
            let found = self.rediscover(epoch, trigger, Some(&master)).await;
            // Timeouts on a master that is still master: a stall, or a slow
            // request. Resend a few times, not until the budget runs out:
            // each resend of a slow request runs it again.
            let still_master = found
                .as_ref()
                .is_ok_and(|(again, _)| Arc::ptr_eq(again, &master));
            if trigger == Trigger::Timeout && still_master {
                let state = retrying.as_mut().expect("recorded above");
                state.timeouts += 1;
                if state.timeouts > MAX_RESENDS_AFTER_TIMEOUT {
                    self.metrics.add(Counter::OutcomeUnknown);
                    return Err(Error::OutcomeUnknown {
                        node: master.node.clone(),
                        source: error.expect("a timeout has an error"),
                    });
                }
            }
        }
    }

    /// With `min_replicas`, holds a write back while the master has too
    /// few healthy replicas; `None` lets it go.
    async fn hold_back(&self, master: &Master, write: bool) -> Option<Sent> {
        let min = self.settings.min_replicas.filter(|_| write)?;
        match self.healthy_replicas(master, min.max_lag).await {
            Ok(healthy) if healthy >= min.count => None,
            Ok(healthy) => {
                self.metrics.add(Counter::MinReplicasRefusals);
                Some(Sent::Held(format!(
                    "{healthy} healthy replicas, min_replicas asks for {}",
                    min.count
                )))
            }
            Err(error) => Some(self.info_failed(master, &error)),
        }
    }

    /// How many replicas a durable write asking for `asked` waits for on
    /// `master` (see [`crate::durable`]), or why it is held back: run now,
    /// it would only fail its `WAIT` (say, right after a failover, until
    /// the old master rejoins as a replica). Replicas are counted (`INFO
    /// replication`) when not counted since the master was installed or a
    /// `WAIT` fell short, and every second while short.
    async fn await_replicas(&self, master: &Master, asked: u32) -> Result<u32, Sent> {
        let grace = self.settings.lost_replica_grace;
        let outcome = match master.replicas.cached(asked, grace, Instant::now()) {
            Some(outcome) => outcome,
            None => {
                let info = match self.replication_info(master).await {
                    Ok(info) => info,
                    Err(error) => return Err(self.info_failed(master, &error)),
                };
                if !info.is_master {
                    // Demoted: look for the new master, as a READONLY reply would.
                    return Err(Sent::Failed(redis::make_extension_error(
                        "READONLY".to_owned(),
                        Some("INFO replication says replica".to_owned()),
                    )));
                }
                let online =
                    u32::try_from(info.healthy_replicas(Duration::MAX)).unwrap_or(u32::MAX);
                master
                    .replicas
                    .counted(online, asked, grace, Instant::now())
            }
        };
        match outcome {
            Outcome::Wait(waits_for) if waits_for < asked && !self.still_named(master).await => {
                self.metrics.add(Counter::DurableWritesHeld);
                Err(Sent::Held(format!(
                    "{waits_for} of {asked} replicas online, and the sentinels do not confirm {} as master",
                    master.node
                )))
            }
            Outcome::Wait(waits_for) => Ok(waits_for),
            Outcome::Hold { online, waits_for } => {
                self.metrics.add(Counter::DurableWritesHeld);
                Err(Sent::Held(format!(
                    "{online} replicas online, the write waits for {waits_for}"
                )))
            }
        }
    }

    /// Whether a majority of sentinels name `master` (asked at most once a
    /// second); always, without Sentinel, which has no one to ask.
    async fn still_named(&self, master: &Master) -> bool {
        if !matches!(self.settings.mode, Mode::Sentinel { .. }) {
            return true;
        }
        let now = Instant::now();
        if master.replicas.confirmed(now) {
            return true;
        }
        let named = self
            .ask_sentinels_current()
            .await
            .is_ok_and(|named| named.node == master.node);
        if named {
            master.replicas.confirm(now);
        }
        named
    }

    /// The master did not answer `INFO`: its connection is suspect.
    fn info_failed(&self, master: &Master, error: &RedisError) -> Sent {
        if Failure::of(error) == Failure::OutcomeUnknown {
            master
                .connection
                .load()
                .failed
                .store(true, Ordering::Release);
        }
        Sent::Unreachable(format!("could not read INFO replication: {error}"))
    }

    /// Sends on the master's shared connection.
    async fn send_shared(&self, master: &Master, request: Request<'_>, idempotent: bool) -> Sent {
        let connection = master.connection.load_full();
        if connection.failed.load(Ordering::Acquire) {
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
                    connection.failed.store(true, Ordering::Release);
                }
                Sent::Failed(error)
            }
        }
    }

    /// Sends a write on a connection of its own, then `WAIT`s there for
    /// `replicas` acknowledgements: `WAIT` blocks the connection it runs on.
    async fn send_durable(
        &self,
        master: &Master,
        request: Request<'_>,
        idempotent: bool,
        replicas: u32,
        timeout: Duration,
    ) -> Sent {
        let mut pooled = match master.dedicated.get().await {
            Ok(pooled) => pooled,
            // A refusal (the node is no master any more) stays a refusal.
            Err(bb8::RunError::User(error)) if refusal_of(&error).is_some() => {
                return Sent::Failed(error);
            }
            Err(bb8::RunError::User(error)) => {
                return Sent::Unreachable(format!("could not open a connection: {error}"));
            }
            Err(bb8::RunError::TimedOut) => {
                return Sent::Held(format!(
                    "all {} durable connections stayed busy",
                    self.settings.durable_connections
                ));
            }
        };
        let connection = &mut *pooled;
        // Until the exchange ends cleanly (the caller may drop this future
        // halfway), the connection is not fit to hand out again.
        connection.broken = true;
        let reply = match request.send(&mut connection.multiplexed).await {
            Ok(reply) => reply,
            Err(error) => return Sent::Failed(error),
        };
        if let Some((refusal, _)) = request.refusal(&reply, idempotent) {
            connection.broken = false;
            return Sent::Failed(refusal);
        }
        if has_error(&reply) {
            // The write failed: there is nothing to wait for.
            connection.broken = false;
            return Sent::Done(reply);
        }
        let timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        connection
            .multiplexed
            .set_response_timeout(timeout.saturating_add(self.settings.command_timeout));
        let acked = redis::cmd("WAIT")
            .arg(replicas)
            .arg(timeout_ms)
            .query_async::<u32>(&mut connection.multiplexed)
            .await;
        connection
            .multiplexed
            .set_response_timeout(self.settings.command_timeout);
        if !acked.as_ref().is_ok_and(|acked| *acked >= replicas) {
            master.replicas.forget_count();
        }
        let error = match acked {
            Ok(acked) => {
                connection.broken = false;
                if acked >= replicas {
                    return Sent::Done(reply);
                }
                Error::NotReplicated {
                    node: master.node.clone(),
                    acked,
                    required: replicas,
                    timeout,
                }
            }
            Err(source) => {
                connection.broken = Failure::of(&source) == Failure::OutcomeUnknown;
                Error::ReplicationUnknown {
                    node: master.node.clone(),
                    source,
                }
            }
        };
        self.metrics.add(Counter::UnreplicatedWrites);
        Sent::Unreplicated(error)
    }

    /// Records a failure, starting the retry state on the first one.
    fn failed(&self, retrying: &mut Option<Retrying>, failures: Vec<NodeFailure>) {
        let state = retrying.get_or_insert_with(|| Retrying {
            started: Instant::now(),
            attempt: 0,
            timeouts: 0,
            failures: Vec::new(),
            installed: self.installed.subscribe(),
        });
        for failure in failures {
            match state.failures.iter_mut().find(|f| f.node == failure.node) {
                Some(known) => known.reason = failure.reason,
                None => state.failures.push(failure),
            }
        }
    }

    /// Waits out one backoff step (cut short when a master is installed),
    /// or fails once the budget is spent.
    async fn wait_before_retry(&self, state: &mut Retrying) -> Result<()> {
        let budget = self.settings.retry_budget;
        let spent = state.started.elapsed();
        if spent >= budget {
            self.metrics.add(Counter::BudgetExhausted);
            self.emit(Event::RetryBudgetExhausted {
                attempts: state.attempt + 1,
            });
            return Err(Error::RetryBudgetExhausted {
                budget,
                spent,
                attempts: state.attempt + 1,
                failures: std::mem::take(&mut state.failures),
            });
        }
        let wait = self
            .settings
            .backoff
            .delay(state.attempt)
            .min(budget - spent);
        state.attempt += 1;
        self.metrics.add(Counter::Retries);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.installed.changed() => {}
        }
        Ok(())
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
