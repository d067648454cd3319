//! The client: master tracking, single-flight discovery, the retry loop,
//! the `ConnectionLike` handle, and the background tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::StreamExt;
use futures_util::future::join_all;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::{broadcast, watch};

use crate::addr::NodeAddr;
use crate::builder::{FailoverClientBuilder, Mode};
use crate::error::{Error, NodeFailure, Result};
use crate::events::{Counter, Event, Metrics, MetricsSnapshot, Trigger};
use crate::node::{Connector, MasterCheck, MasterManager, verify_master};
use crate::retry::{Failure, backoff, is_read_only, refused_without_running};

/// How many connections through the last-resort address are tried per discovery.
const LAST_RESORT_TRIES: usize = 3;
/// Connections bb8 may keep to one master. Requests share one multiplexed
/// connection; the second lets a replacement open while the first is checked.
const CONNECTIONS_PER_MASTER: u32 = 2;

/// A Redis client that keeps finding the master and sends every request to
/// it, retrying through failovers within a time budget.
///
/// Cheap to clone; all clones share the master, connections and background
/// tasks, which stop when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct FailoverClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    // Dropping the sender wakes every background task to stop.
    _stop: watch::Sender<()>,
}

/// The master the client currently writes to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MasterInfo {
    /// Its address, as configured or as the sentinels named it.
    pub node: NodeAddr,
    /// The generation, bumped on every change of master.
    pub generation: u64,
}

struct Master {
    generation: u64,
    node: NodeAddr,
    pool: bb8::Pool<MasterManager>,
    /// The multiplexed connection every request clones; replaced through
    /// `pool` when it breaks.
    connection: ArcSwap<MultiplexedConnection>,
}

impl Master {
    fn connection(&self) -> MultiplexedConnection {
        MultiplexedConnection::clone(&self.connection.load())
    }
}

/// A master that passed its check, not yet installed.
enum Opened {
    /// The current master, still master, its connection revalidated.
    Same(Arc<Master>),
    /// Another node.
    New {
        node: NodeAddr,
        pool: bb8::Pool<MasterManager>,
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

struct Shared {
    settings: FailoverClientBuilder,
    data: Connector,
    sentinel_connector: Connector,
    /// The sentinels to ask, grown from `SENTINEL SENTINELS`.
    sentinels: Mutex<Vec<NodeAddr>>,
    /// Open connections to sentinels, dropped when they fail.
    sentinel_connections: Mutex<HashMap<NodeAddr, MultiplexedConnection>>,
    master: ArcSwapOption<Master>,
    generation: AtomicU64,
    /// Completed discoveries: a caller that saw a failure at epoch `e` and
    /// finds the epoch moved on knows someone already looked again.
    epoch: AtomicU64,
    discovery: tokio::sync::Mutex<DiscoveryState>,
    /// The generation of the installed master; wakes requests waiting for one.
    installed: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    metrics: Metrics,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("mode", &self.settings.mode)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// What a request sends.
#[derive(Clone, Copy)]
enum Request<'a> {
    Command(&'a Cmd),
    Pipeline {
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    },
}

enum Reply {
    Value(Value),
    Values(Vec<Value>),
}

impl Reply {
    /// The error replies in it, as a [`RedisError`], when they show the node
    /// refused the request without running it (`READONLY` and the like):
    /// Redis answers those in-band, not as a failed request.
    fn refusal(&self) -> Option<RedisError> {
        let errors: Vec<&redis::ServerError> = match self {
            Self::Value(value) => server_error(value).into_iter().collect(),
            Self::Values(values) => values.iter().filter_map(server_error).collect(),
        };
        let codes: Vec<&str> = errors.iter().map(|e| e.code()).collect();
        refused_without_running(&codes).then(|| RedisError::from(errors[0].clone()))
    }
}

fn server_error(value: &Value) -> Option<&redis::ServerError> {
    match value {
        Value::ServerError(error) => Some(error),
        _ => None,
    }
}

impl Request<'_> {
    async fn send(self, connection: &mut MultiplexedConnection) -> Result<Reply, RedisError> {
        match self {
            Self::Command(cmd) => connection.req_packed_command(cmd).await.map(Reply::Value),
            Self::Pipeline {
                pipeline,
                offset,
                count,
            } => connection
                .req_packed_commands(pipeline, offset, count)
                .await
                .map(Reply::Values),
        }
    }

    fn is_read_only(self) -> bool {
        match self {
            Self::Command(cmd) => is_read_only(cmd),
            Self::Pipeline { pipeline, .. } => {
                !pipeline.is_transaction() && pipeline.cmd_iter().all(is_read_only)
            }
        }
    }
}

impl FailoverClient {
    /// A client that finds the master among `nodes`, in order: the first
    /// whose `ROLE` says master (or that passes the configured
    /// [`MasterCheck`]). Names are resolved afresh on every connect.
    pub fn candidates(nodes: impl IntoIterator<Item = NodeAddr>) -> FailoverClientBuilder {
        FailoverClientBuilder::new(Mode::Candidates {
            nodes: nodes.into_iter().collect(),
            last_resort: None,
        })
    }

    /// A client that asks `sentinels` where the master named `master_name`
    /// is, switches only when enough of them agree, and confirms with `ROLE`.
    pub fn sentinel(
        master_name: impl Into<String>,
        sentinels: impl IntoIterator<Item = NodeAddr>,
    ) -> FailoverClientBuilder {
        FailoverClientBuilder::new(Mode::Sentinel {
            master_name: master_name.into(),
            sentinels: sentinels.into_iter().collect(),
            min_agreement: None,
        })
    }

    pub(crate) fn start(settings: FailoverClientBuilder, runtime: &tokio::runtime::Handle) -> Self {
        let (stop, stopped) = watch::channel(());
        let shared = Arc::new(Shared::new(settings));
        runtime.spawn(recheck_loop(Arc::clone(&shared), stopped.clone()));
        if let Mode::Sentinel { sentinels, .. } = &shared.settings.mode {
            for sentinel in sentinels {
                runtime.spawn(watch_sentinel(
                    Arc::clone(&shared),
                    sentinel.clone(),
                    stopped.clone(),
                ));
            }
        }
        Self {
            inner: Arc::new(Inner {
                shared,
                _stop: stop,
            }),
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// A handle for redis-rs's API (`cmd.query_async(&mut connection)`,
    /// pipelines, transactions). Requests are resent after failovers; one
    /// whose outcome is unknown is resent only if it is read-only.
    pub fn connection(&self) -> MasterConnection {
        MasterConnection {
            client: self.clone(),
            idempotent: false,
        }
    }

    /// Like [`connection`](Self::connection), but every request through it
    /// is declared idempotent: resent even when its first outcome is
    /// unknown (a timeout, a connection lost after sending). Use it only for
    /// requests that are harmless to run twice.
    pub fn idempotent_connection(&self) -> MasterConnection {
        MasterConnection {
            client: self.clone(),
            idempotent: true,
        }
    }

    /// Sends `cmd` to the master and converts the reply. Resent after
    /// failovers within the retry budget; resent after an unknown outcome
    /// only if the command is read-only.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.query_as(cmd, false).await
    }

    /// Like [`query`](Self::query), for a command that is harmless to run
    /// twice: it is resent even when its first outcome is unknown.
    pub async fn query_idempotent<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.query_as(cmd, true).await
    }

    async fn query_as<T: FromRedisValue>(&self, cmd: &Cmd, idempotent: bool) -> Result<T> {
        let (node, reply) = self
            .shared()
            .execute(Request::Command(cmd), idempotent)
            .await?;
        let Reply::Value(value) = reply else {
            unreachable!("a command gets one reply")
        };
        T::from_redis_value(value).map_err(|error| Error::Command {
            node,
            source: error.into(),
        })
    }

    /// `GET key`.
    pub async fn get<T: FromRedisValue>(&self, key: &str) -> Result<T> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    /// `SET key value`. Not resent after an unknown outcome: a resend could
    /// overwrite another client's later write.
    pub async fn set(&self, key: &str, value: impl redis::ToRedisArgs + Send + Sync) -> Result<()> {
        self.query(redis::cmd("SET").arg(key).arg(value)).await
    }

    /// `DEL key`; returns how many keys were removed.
    pub async fn del(&self, key: &str) -> Result<u64> {
        self.query(redis::cmd("DEL").arg(key)).await
    }

    /// The master requests go to now, if one is known.
    pub fn master(&self) -> Option<MasterInfo> {
        self.shared().master.load().as_ref().map(|m| MasterInfo {
            node: m.node.clone(),
            generation: m.generation,
        })
    }

    /// Finds the master if none is known yet and returns it, trying until
    /// `timeout`. Useful for readiness checks.
    pub async fn wait_for_master(&self, timeout: Duration) -> Result<MasterInfo> {
        let shared = self.shared();
        let started = Instant::now();
        let mut installed = shared.installed.subscribe();
        let mut attempt = 0;
        loop {
            if let Some(master) = self.master() {
                return Ok(master);
            }
            let failures = match shared.current().await {
                Ok(_) => continue,
                Err(failures) => failures,
            };
            if started.elapsed() >= timeout {
                return Err(Error::RetryBudgetExhausted {
                    budget: timeout,
                    spent: started.elapsed(),
                    attempts: attempt + 1,
                    failures,
                });
            }
            shared
                .pause(attempt, started, timeout, &mut installed)
                .await;
            attempt += 1;
        }
    }

    /// Events as they happen: master changes, lost masters, sentinel
    /// disagreements, exhausted budgets. A subscriber that lags more than
    /// the event capacity behind misses the oldest.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.shared().events.subscribe()
    }

    /// The client's counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared().metrics.snapshot()
    }
}

/// A [`ConnectionLike`] handle on the current master, from
/// [`FailoverClient::connection`] or [`FailoverClient::idempotent_connection`].
#[derive(Clone, Debug)]
pub struct MasterConnection {
    client: FailoverClient,
    idempotent: bool,
}

impl ConnectionLike for MasterConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self
                .client
                .shared()
                .execute(Request::Command(cmd), self.idempotent)
                .await
            {
                Ok((_, Reply::Value(value))) => Ok(value),
                Ok((_, Reply::Values(_))) => unreachable!("a command gets one reply"),
                Err(error) => Err(error.into_redis_error()),
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let request = Request::Pipeline {
                pipeline,
                offset,
                count,
            };
            match self.client.shared().execute(request, self.idempotent).await {
                Ok((_, Reply::Values(values))) => Ok(values),
                Ok((_, Reply::Value(_))) => unreachable!("a pipeline gets a list of replies"),
                Err(error) => Err(error.into_redis_error()),
            }
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

impl Shared {
    fn new(settings: FailoverClientBuilder) -> Self {
        let data = Connector::new(
            Arc::clone(&settings.resolver),
            settings.credentials.clone(),
            settings.connect_timeout,
            settings.command_timeout,
        );
        let sentinel_connector = Connector::new(
            Arc::clone(&settings.resolver),
            settings.sentinel_credentials.clone(),
            settings.connect_timeout,
            settings.command_timeout,
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
            generation: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            discovery: tokio::sync::Mutex::default(),
            installed: watch::channel(0).0,
            metrics: Metrics::default(),
        }
    }

    fn emit(&self, event: Event) {
        // No subscriber is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }

    /// Sends `request` to the master, finding it again and resending as
    /// failures allow, until the retry budget is spent.
    async fn execute(
        self: &Arc<Self>,
        request: Request<'_>,
        idempotent: bool,
    ) -> Result<(NodeAddr, Reply)> {
        let idempotent = idempotent || request.is_read_only();
        let budget = self.settings.retry_budget;
        let started = Instant::now();
        let mut installed = self.installed.subscribe();
        let mut failures: Vec<NodeFailure> = Vec::new();
        let mut attempt = 0u32;
        loop {
            if attempt > 0 {
                if started.elapsed() >= budget {
                    self.metrics.add(Counter::BudgetExhausted);
                    self.emit(Event::RetryBudgetExhausted { attempts: attempt });
                    return Err(Error::RetryBudgetExhausted {
                        budget,
                        spent: started.elapsed(),
                        attempts: attempt,
                        failures,
                    });
                }
                self.metrics.add(Counter::Retries);
                self.pause(attempt - 1, started, budget, &mut installed)
                    .await;
            }
            attempt += 1;
            let (master, epoch) = match self.current().await {
                Ok(found) => found,
                Err(found) => {
                    remember(&mut failures, found);
                    continue;
                }
            };
            let error = match request.send(&mut master.connection()).await {
                Ok(reply) => match reply.refusal() {
                    None => return Ok((master.node.clone(), reply)),
                    Some(refusal) => refusal,
                },
                Err(error) => error,
            };
            let failure = Failure::of(&error);
            let trigger = match failure {
                Failure::Final => {
                    return Err(Error::Command {
                        node: master.node.clone(),
                        source: error,
                    });
                }
                Failure::NotExecuted if error.code() == Some("READONLY") => {
                    self.metrics.add(Counter::ReadonlyReplies);
                    Trigger::ReadOnly
                }
                Failure::NotExecuted => Trigger::Unavailable,
                Failure::OutcomeUnknown if error.is_timeout() => Trigger::Timeout,
                Failure::OutcomeUnknown => Trigger::ConnectionLost,
            };
            tracing::debug!(node = %master.node, %error, ?trigger, "request to the master failed");
            if failure == Failure::OutcomeUnknown && !idempotent {
                self.metrics.add(Counter::OutcomeUnknown);
                self.rediscover_in_background(epoch, trigger);
                return Err(Error::OutcomeUnknown {
                    node: master.node.clone(),
                    source: error,
                });
            }
            remember(
                &mut failures,
                vec![NodeFailure {
                    node: master.node.clone(),
                    reason: error.to_string(),
                }],
            );
            // Whatever this finds, the next attempt uses it.
            let _ = self.rediscover(epoch, trigger).await;
        }
    }

    /// Waits out one backoff step, cut short when a master is installed,
    /// and never past the end of the budget.
    async fn pause(
        &self,
        attempt: u32,
        started: Instant,
        budget: Duration,
        installed: &mut watch::Receiver<u64>,
    ) {
        let wait = backoff(
            attempt,
            self.settings.backoff_base,
            self.settings.backoff_cap,
            &mut rand::rng(),
        )
        .min(budget.saturating_sub(started.elapsed()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = installed.changed() => {}
        }
    }

    /// The master to use now (finding one if none is known) and the
    /// discovery epoch it was observed at.
    async fn current(&self) -> Result<(Arc<Master>, u64), Vec<NodeFailure>> {
        let epoch = self.epoch.load(Ordering::Acquire);
        match self.master.load_full() {
            Some(master) => Ok((master, epoch)),
            None => self
                .rediscover(epoch, Trigger::NoMaster)
                .await
                .map(|master| (master, self.epoch.load(Ordering::Acquire))),
        }
    }

    /// Starts a rediscovery without making the caller wait for it.
    fn rediscover_in_background(self: &Arc<Self>, epoch: u64, trigger: Trigger) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let _ = shared.rediscover(epoch, trigger).await;
        });
    }

    /// Looks for the master again, unless a discovery finished since the
    /// caller observed `epoch`: then its outcome is the answer. One
    /// discovery runs at a time, so a burst of failures causes one.
    async fn rediscover(
        &self,
        epoch: u64,
        trigger: Trigger,
    ) -> Result<Arc<Master>, Vec<NodeFailure>> {
        let mut state = self.discovery.lock().await;
        if self.epoch.load(Ordering::Acquire) != epoch {
            return self
                .master
                .load_full()
                .ok_or_else(|| state.last_failures.clone());
        }
        let current = self.master.load_full();
        let is_failure = !matches!(
            trigger,
            Trigger::NoMaster | Trigger::PubSub | Trigger::Poll | Trigger::SentinelReconnect
        );
        if is_failure && state.first_failure.is_none() {
            state.first_failure = Some(Instant::now());
        }
        if let (Some(master), Trigger::ReadOnly) = (&current, trigger) {
            // A demoted master: no request may use it while we look.
            self.master.store(None);
            self.emit(Event::MasterLost {
                node: master.node.clone(),
                trigger,
            });
        }
        self.metrics.add(Counter::Discoveries);
        let found = self.find_master(current.as_ref()).await;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        match found {
            Ok(Opened::Same(master)) => {
                self.master.store(Some(Arc::clone(&master)));
                state.last_failures.clear();
                Ok(master)
            }
            Ok(Opened::New {
                node,
                pool,
                connection,
            }) => {
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                let master = Arc::new(Master {
                    generation,
                    node: node.clone(),
                    pool,
                    connection: ArcSwap::from_pointee(connection),
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
                let _ = self.installed.send(generation);
                state.last_failures.clear();
                Ok(master)
            }
            Err(failures) => {
                tracing::warn!(?trigger, ?failures, "no master found");
                if let Some(master) = self.master.swap(None) {
                    self.emit(Event::MasterLost {
                        node: master.node.clone(),
                        trigger,
                    });
                }
                state.last_failures = failures.clone();
                Err(failures)
            }
        }
    }

    async fn find_master(&self, current: Option<&Arc<Master>>) -> Result<Opened, Vec<NodeFailure>> {
        let mut failures = Vec::new();
        match &self.settings.mode {
            Mode::Candidates { nodes, last_resort } => {
                for node in nodes {
                    match self.open_master(node, current).await {
                        Ok(opened) => return Ok(opened),
                        Err(reason) => failures.push(NodeFailure {
                            node: node.clone(),
                            reason,
                        }),
                    }
                }
                // Each connection through a load-balanced address may reach
                // another node, so it gets a few tries.
                for node in last_resort.iter().cycle().take(LAST_RESORT_TRIES) {
                    match self.open_master(node, None).await {
                        Ok(opened) => return Ok(opened),
                        Err(reason) => failures.push(NodeFailure {
                            node: node.clone(),
                            reason,
                        }),
                    }
                }
                Err(failures)
            }
            Mode::Sentinel { .. } => {
                let node = self.ask_sentinels().await?;
                self.open_master(&node, current).await.map_err(|reason| {
                    vec![NodeFailure {
                        node: node.clone(),
                        reason,
                    }]
                })
            }
        }
    }

    /// Proves `node` is the master and opens its connection through bb8
    /// (reusing the current master's pool if it is the same node).
    async fn open_master(
        &self,
        node: &NodeAddr,
        current: Option<&Arc<Master>>,
    ) -> Result<Opened, String> {
        let check = match &self.settings.mode {
            Mode::Candidates { .. } => self.settings.master_check,
            // Sentinel's answer is always confirmed by the node itself.
            Mode::Sentinel { .. } => MasterCheck::Role,
        };
        if let Some(master) = current.filter(|m| m.node == *node) {
            // bb8 checks the pooled connection with a PING token on checkout
            // and replaces it if it broke.
            let mut connection = checkout(&master.pool).await?;
            verify_master(&mut connection, check)
                .await
                .map_err(|e| e.to_string())?;
            master.connection.store(Arc::new(connection));
            return Ok(Opened::Same(Arc::clone(master)));
        }
        let manager = MasterManager {
            connector: self.data.clone(),
            node: node.clone(),
            check,
        };
        let pool = bb8::Pool::builder()
            .max_size(CONNECTIONS_PER_MASTER)
            .test_on_check_out(true)
            .retry_connection(false)
            .connection_timeout(self.settings.connect_timeout + self.settings.command_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .build_unchecked(manager);
        let connection = checkout(&pool).await?;
        Ok(Opened::New {
            node: node.clone(),
            pool,
            connection,
        })
    }

    /// Asks every known sentinel where the master is; succeeds when enough
    /// of them name the same node.
    async fn ask_sentinels(&self) -> Result<NodeAddr, Vec<NodeFailure>> {
        let Mode::Sentinel { master_name, .. } = &self.settings.mode else {
            unreachable!("only asked in Sentinel mode")
        };
        let sentinels = self
            .sentinels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let command = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(master_name)
            .to_owned();
        let replies = join_all(sentinels.iter().map(|sentinel| async {
            let reply = self
                .ask_sentinel::<Option<(String, u16)>>(sentinel, &command)
                .await;
            (sentinel.clone(), reply)
        }))
        .await;
        let mut failures = Vec::new();
        let mut answers = Vec::new();
        for (sentinel, reply) in replies {
            match reply {
                Ok(Some((host, port))) => match NodeAddr::new(host, port) {
                    Ok(master) => answers.push((sentinel, master)),
                    Err(error) => failures.push(NodeFailure {
                        node: sentinel,
                        reason: error.to_string(),
                    }),
                },
                Ok(None) => failures.push(NodeFailure {
                    node: sentinel,
                    reason: format!("does not know the master {master_name:?}"),
                }),
                Err(error) => failures.push(NodeFailure {
                    node: sentinel,
                    reason: error.to_string(),
                }),
            }
        }
        let required = self.settings.required_agreement();
        let mut votes: HashMap<&NodeAddr, usize> = HashMap::new();
        for (_, master) in &answers {
            *votes.entry(master).or_default() += 1;
        }
        let best = votes
            .iter()
            .max_by_key(|(_, count)| **count)
            .map(|(m, c)| ((*m).clone(), *c));
        if votes.len() > 1 || best.as_ref().is_some_and(|(_, count)| *count < required) {
            self.emit(Event::SentinelDisagreement {
                answers: answers.clone(),
                required,
            });
        }
        match best {
            Some((master, count)) if count >= required => Ok(master),
            best => {
                if let Some((master, count)) = best {
                    failures.push(NodeFailure {
                        node: master,
                        reason: format!("named by {count} sentinels, {required} must agree"),
                    });
                }
                Err(failures)
            }
        }
    }

    /// One command to a sentinel over its cached connection.
    async fn ask_sentinel<T: FromRedisValue>(
        &self,
        sentinel: &NodeAddr,
        command: &Cmd,
    ) -> Result<T, RedisError> {
        let cached = self
            .sentinel_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sentinel)
            .cloned();
        let mut connection = match cached {
            Some(connection) => connection,
            None => {
                let (_, connection) = self.sentinel_connector.connect(sentinel).await?;
                self.sentinel_connections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sentinel.clone(), connection.clone());
                connection
            }
        };
        let reply = command.query_async(&mut connection).await;
        if reply
            .as_ref()
            .is_err_and(|e| e.is_io_error() || e.is_timeout())
        {
            self.sentinel_connections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(sentinel);
        }
        reply
    }

    /// Adds sentinels that a known sentinel lists (`SENTINEL SENTINELS`);
    /// returns the new ones.
    async fn learn_sentinels(&self) -> Vec<NodeAddr> {
        let Mode::Sentinel { master_name, .. } = &self.settings.mode else {
            return Vec::new();
        };
        let known = self
            .sentinels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let command = redis::cmd("SENTINEL")
            .arg("SENTINELS")
            .arg(master_name)
            .to_owned();
        for sentinel in &known {
            let Ok(listed) = self
                .ask_sentinel::<Vec<HashMap<String, String>>>(sentinel, &command)
                .await
            else {
                continue;
            };
            let mut sentinels = self.sentinels.lock().unwrap_or_else(|p| p.into_inner());
            let new: Vec<NodeAddr> = listed
                .iter()
                .filter_map(|fields| {
                    let port = fields.get("port")?.parse().ok()?;
                    NodeAddr::new(fields.get("ip")?.clone(), port).ok()
                })
                .filter(|addr| !sentinels.contains(addr))
                .collect();
            sentinels.extend(new.iter().cloned());
            return new;
        }
        Vec::new()
    }

    /// The periodic check: is the master still the master (and, with
    /// Sentinel, still the one the sentinels name)?
    async fn recheck(&self) {
        let epoch = self.epoch.load(Ordering::Acquire);
        let Some(master) = self.master.load_full() else {
            let _ = self.rediscover(epoch, Trigger::NoMaster).await;
            return;
        };
        let check = match &self.settings.mode {
            Mode::Candidates { .. } => self.settings.master_check,
            Mode::Sentinel { .. } => MasterCheck::Role,
        };
        let still_master = verify_master(&mut master.connection(), check).await.is_ok();
        let sentinels_moved = match &self.settings.mode {
            Mode::Sentinel { .. } => self
                .ask_sentinels()
                .await
                .is_ok_and(|named| named != master.node),
            Mode::Candidates { .. } => false,
        };
        if !still_master || sentinels_moved {
            let _ = self.rediscover(epoch, Trigger::Poll).await;
        }
    }
}

/// Keeps the most recent failure per node, in order of first appearance.
fn remember(failures: &mut Vec<NodeFailure>, new: Vec<NodeFailure>) {
    for failure in new {
        match failures.iter_mut().find(|f| f.node == failure.node) {
            Some(known) => known.reason = failure.reason,
            None => failures.push(failure),
        }
    }
}

/// A clone of a pooled connection; the pool keeps the connection itself.
async fn checkout(pool: &bb8::Pool<MasterManager>) -> Result<MultiplexedConnection, String> {
    match pool.get().await {
        Ok(pooled) => Ok(MultiplexedConnection::clone(&pooled)),
        Err(bb8::RunError::User(error)) => Err(error.to_string()),
        Err(bb8::RunError::TimedOut) => Err("timed out connecting".to_owned()),
    }
}

/// Resolves when the client is dropped.
async fn stopped(stop: &mut watch::Receiver<()>) {
    while stop.changed().await.is_ok() {}
}

/// Re-checks the master every `recheck_interval` until the client is dropped.
async fn recheck_loop(shared: Arc<Shared>, mut stop: watch::Receiver<()>) {
    let watchers_stop = stop.clone();
    let mut interval = tokio::time::interval(shared.settings.recheck_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for tick in 0u64.. {
        let work = async {
            interval.tick().await;
            shared.recheck().await;
            // The sentinel list changes rarely: refresh it every tenth tick.
            if tick % 10 == 0 {
                for sentinel in shared.learn_sentinels().await {
                    let stop = watchers_stop.clone();
                    tokio::spawn(watch_sentinel(Arc::clone(&shared), sentinel, stop));
                }
            }
        };
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = work => {}
        }
    }
}

/// Follows one sentinel's `+switch-master` notices until the client is
/// dropped, reconnecting with backoff, and catches up after every
/// (re)connect since notices are not replayed.
async fn watch_sentinel(shared: Arc<Shared>, sentinel: NodeAddr, mut stop: watch::Receiver<()>) {
    let Mode::Sentinel { master_name, .. } = &shared.settings.mode else {
        return;
    };
    let notice_prefix = format!("{master_name} ");
    let mut attempt = 0;
    loop {
        let session = async {
            let mut pubsub = shared.sentinel_connector.pubsub(&sentinel).await?;
            pubsub.subscribe("+switch-master").await?;
            attempt = 0;
            let epoch = shared.epoch.load(Ordering::Acquire);
            let _ = shared
                .rediscover_if_moved(epoch, Trigger::SentinelReconnect)
                .await;
            let mut notices = pubsub.into_on_message();
            while let Some(notice) = notices.next().await {
                let payload: String = notice.get_payload().unwrap_or_default();
                if payload.starts_with(&notice_prefix) {
                    let epoch = shared.epoch.load(Ordering::Acquire);
                    let _ = shared.rediscover(epoch, Trigger::PubSub).await;
                }
            }
            Ok::<_, RedisError>(())
        };
        tokio::select! {
            _ = stopped(&mut stop) => return,
            result = session => {
                if let Err(error) = result {
                    tracing::debug!(%sentinel, %error, "sentinel subscription failed");
                }
            }
        }
        let wait = backoff(
            attempt,
            Duration::from_millis(100),
            Duration::from_secs(2),
            &mut rand::rng(),
        );
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

impl Shared {
    /// After a sentinel (re)connects: rediscover only if the sentinels now
    /// name another master than the current one, or none is known.
    async fn rediscover_if_moved(
        &self,
        epoch: u64,
        trigger: Trigger,
    ) -> Result<(), Vec<NodeFailure>> {
        let current = self.master.load_full();
        let moved = match &current {
            None => true,
            Some(master) => self
                .ask_sentinels()
                .await
                .is_ok_and(|named| named != master.node),
        };
        if moved {
            self.rediscover(epoch, trigger).await.map(drop)
        } else {
            Ok(())
        }
    }
}
