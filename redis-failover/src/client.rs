//! The public handles: [`FailoverClient`] and its [`ConnectionLike`] view.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Cmd, FromRedisValue, Pipeline};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::addr::NodeAddr;
use crate::backend::Backend;
use crate::builder::{FailoverClientBuilder, Mode};
use crate::connections::{MasterConnection, ReadConnection, Typed};
use crate::durable::ReplicationStatus;
use crate::error::{Error, NodeFailure, Result};
use crate::events::{Event, MetricsSnapshot};
use crate::policy::{Decision, RetryPolicy, Tried, Tries};
use crate::replica_set::ReadReplica;
use crate::request::{Reply, Request};
use crate::routing::{Durability, ReadPolicy};
use crate::shared::Shared;
use crate::tasks::{demote_loop, recheck_loop, watch_sentinel};

/// A Redis client that keeps finding the master and sends every request to
/// it, retrying through failovers within a time budget.
///
/// Cheap to clone; all clones share the master, connections and background
/// tasks, which stop when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct FailoverClient {
    inner: Arc<Inner>,
    read_policy: ReadPolicy,
    durability: Durability,
}

#[derive(Debug)]
struct Inner {
    backend: Backend,
    // Dropping the guard cancels the token every background task watches.
    _stop: DropGuard,
}

/// The master the client currently writes to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MasterInfo {
    /// Its address, as configured or as the sentinels named it.
    pub node: NodeAddr,
    /// The generation, bumped every time a master is installed.
    pub generation: u64,
}

impl FailoverClient {
    /// A client that finds the master among `nodes`, in order: the first
    /// whose `ROLE` says master (or that passes the configured
    /// [`MasterCheck`](crate::MasterCheck)). Names are resolved afresh on
    /// every connect.
    pub fn candidates(nodes: impl IntoIterator<Item = NodeAddr>) -> FailoverClientBuilder {
        FailoverClientBuilder::new(Mode::Candidates {
            nodes: nodes.into_iter().collect(),
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
        })
    }

    pub(crate) fn start(settings: FailoverClientBuilder, runtime: &tokio::runtime::Handle) -> Self {
        let stopped = CancellationToken::new();
        let (read_policy, durability) = (settings.read_policy, settings.durability);
        let shared = Arc::new(Shared::new(settings, stopped.clone()));
        runtime.spawn(recheck_loop(Arc::clone(&shared), stopped.clone()));
        if read_policy != ReadPolicy::Master || shared.settings.min_replicas.is_some() {
            let _entered = runtime.enter();
            shared.track_replicas();
        }
        if shared.settings.demote_stale_masters {
            let installed = shared.subscribe_installed();
            runtime.spawn(demote_loop(Arc::clone(&shared), installed, stopped.clone()));
        }
        if let Mode::Sentinel { sentinels, .. } = &shared.settings.mode {
            for sentinel in sentinels {
                let watcher =
                    watch_sentinel(Arc::clone(&shared), sentinel.clone(), stopped.clone());
                runtime.spawn(watcher);
            }
        }
        Self::with_backend(
            Backend::Replicated(shared),
            stopped,
            read_policy,
            durability,
        )
    }

    /// A client of `backend`, whose background tasks watch `stopped`.
    pub(crate) fn with_backend(
        backend: Backend,
        stopped: CancellationToken,
        read_policy: ReadPolicy,
        durability: Durability,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                _stop: stopped.drop_guard(),
            }),
            read_policy,
            durability,
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// This client (sharing everything with it) with reads routed by
    /// `policy` instead of the configured
    /// [`read_policy`](crate::FailoverClientBuilder::read_policy).
    #[must_use]
    pub fn with_read_policy(&self, policy: ReadPolicy) -> Self {
        Self {
            read_policy: policy,
            ..self.clone()
        }
    }

    /// This client (sharing everything with it) with writes made durable
    /// as `durability` says instead of the configured
    /// [`durability`](crate::FailoverClientBuilder::durability). An invalid
    /// setting fails every write with [`Error::InvalidConfig`].
    #[must_use]
    pub fn with_durability(&self, durability: Durability) -> Self {
        Self {
            durability,
            ..self.clone()
        }
    }

    /// The read policy this handle routes reads by.
    pub fn read_policy(&self) -> ReadPolicy {
        self.read_policy
    }

    /// The durability this handle's writes get.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// How long a request may take through failovers before it fails
    /// ([`FailoverClientBuilder::retry_budget`](crate::FailoverClientBuilder::retry_budget)).
    pub fn retry_budget(&self) -> Duration {
        match self.backend() {
            Backend::Replicated(shared) => shared.settings.retry_budget,
            Backend::Cluster(cluster) => cluster.settings.policy.budget,
        }
    }

    /// A handle for redis-rs's API (`cmd.query_async(&mut connection)`,
    /// pipelines, transactions). Requests are resent after failovers; one
    /// whose outcome is unknown is resent only if it is read-only.
    ///
    /// Requests share one multiplexed connection per master, so commands
    /// that change connection state (`WATCH`, `SELECT`, `CLIENT`...) and
    /// `MULTI`/`EXEC` sent as separate requests are not supported: send a
    /// transaction as one atomic pipeline, or use
    /// [`transaction`](Self::transaction) for `WATCH`. Blocking commands
    /// (`BLPOP`, `BRPOP`, `BLMOVE`, `BRPOPLPUSH`, `BLMPOP`, `BZPOPMIN`,
    /// `BZPOPMAX`, `BZMPOP`, `XREAD`/`XREADGROUP` with `BLOCK`, `WAIT`,
    /// `WAITAOF`), alone or in a pipeline, are recognised and sent on a
    /// connection of their own, given their own timeout on top of the
    /// command timeout.
    pub fn connection(&self) -> MasterConnection {
        MasterConnection {
            client: self.clone(),
            idempotent: false,
        }
    }

    /// A [`ConnectionLike`] handle for reads, routed by this handle's read
    /// policy. Only commands known to be read-only are accepted (others
    /// fail with `NOTREADONLY`) unless the policy is [`ReadPolicy::Master`].
    #[must_use]
    pub fn read_connection(&self) -> ReadConnection {
        ReadConnection {
            client: self.clone(),
        }
    }

    /// Like [`connection`](Self::connection), but every request through it
    /// is declared idempotent: resent even when its first outcome is
    /// unknown (the connection failed after sending). Use it only for
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
        let (node, reply) = self.send(Request::Command(cmd), idempotent).await?;
        convert(&node, reply)
    }

    /// Sends the read-only `cmd` where this handle's read policy says and
    /// converts the reply. Commands not known to be read-only fail with
    /// [`Error::NotReadOnly`] unless the policy is [`ReadPolicy::Master`].
    pub async fn read<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let (node, reply) = self.send_read(Request::Command(cmd), None).await?;
        convert(&node, reply)
    }

    /// Sends `pipeline` (plain or atomic, `MULTI`/`EXEC`) to the master as
    /// one request and converts the replies, like [`query`](Self::query):
    /// resent after failovers when it surely did not run, never after an
    /// unknown outcome unless every command in it is read-only.
    pub async fn query_pipeline<T: FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T> {
        self.pipeline_as(pipeline, false).await
    }

    /// Sends a pipeline of read-only commands where this handle's read
    /// policy says, like [`read`](Self::read).
    pub async fn read_pipeline<T: FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T> {
        self.pipeline_as(pipeline, true).await
    }

    async fn pipeline_as<T: FromRedisValue>(&self, pipeline: &Pipeline, read: bool) -> Result<T> {
        let mut typed = Typed {
            client: self.clone(),
            read,
            failure: None,
            node: None,
        };
        match pipeline.query_async(&mut typed).await {
            Ok(value) => Ok(value),
            Err(source) => Err(typed.failure.take().unwrap_or_else(|| Error::Command {
                // Sent, answered, but the answer is an error or does not convert.
                node: typed.node.take().expect("a reply came from a node"),
                source,
            })),
        }
    }

    /// `GET key`, routed by this handle's read policy.
    pub async fn get<T: FromRedisValue>(&self, key: &str) -> Result<T> {
        self.read(redis::cmd("GET").arg(key)).await
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

    /// Where this handle's durable writes stand on the current master: the
    /// replicas they ask for, those online at the last count, and those
    /// they wait for (fewer than asked past the
    /// [`lost_replica_grace`](crate::FailoverClientBuilder::lost_replica_grace)).
    /// `None` without a durability that asks for replicas
    /// ([`Durability::Replicated`], [`Durability::Persisted`] with
    /// replicas) or without a master, and in cluster mode, where writes
    /// are not held back by a count of replicas (each runs and waits).
    pub fn replication_status(&self) -> Option<ReplicationStatus> {
        let replicas = self.durability.replicas();
        if replicas == 0 {
            return None;
        }
        let Backend::Replicated(shared) = self.backend() else {
            return None;
        };
        let master = shared.state.master()?;
        Some(
            master
                .replicas
                .status(replicas, shared.settings.lost_replica_grace, Instant::now()),
        )
    }

    /// The master requests go to now, if one is known. `None` for a
    /// cluster client: see [`masters`](Self::masters) and
    /// [`master_of`](Self::master_of).
    pub fn master(&self) -> Option<MasterInfo> {
        let Backend::Replicated(shared) = self.backend() else {
            return None;
        };
        shared.state.master().as_ref().map(|m| MasterInfo {
            node: m.node.clone(),
            generation: m.generation,
        })
    }

    /// Finds the master if none is known yet and returns it, trying until
    /// `timeout`. Useful for readiness checks. A cluster client waits for
    /// a slot map that covers every slot, and returns the first master in
    /// it, with the map's generation.
    pub async fn wait_for_master(&self, timeout: Duration) -> Result<MasterInfo> {
        let shared = match self.backend() {
            Backend::Replicated(shared) => shared,
            Backend::Cluster(cluster) => return cluster.wait_for_map(timeout).await,
        };
        let policy = RetryPolicy {
            budget: timeout,
            ..shared.settings.retry_policy()
        };
        wait_for(policy, || async {
            let (master, _) = shared.current().await?;
            Ok(MasterInfo {
                node: master.node.clone(),
                generation: master.generation,
            })
        })
        .await
    }

    /// The replicas known now and whether each may serve reads; in a
    /// cluster, those of every master. (The replica probes start on first
    /// need: the first call may find none.)
    #[must_use]
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        let now = Instant::now();
        let status = |replica: &ReadReplica, max_staleness| ReplicaStatus {
            node: replica.node.clone(),
            unusable: replica
                .unusable(now, max_staleness)
                .map(|why| why.to_string()),
            staleness: replica
                .caught_up_at
                .map(|at| now.saturating_duration_since(at)),
            latency: replica.latency,
        };
        match self.backend() {
            Backend::Replicated(shared) => {
                shared.track_replicas();
                let max_staleness = shared.settings.max_staleness;
                let set = shared.state.read_set();
                set.replicas
                    .iter()
                    .map(|r| status(r, max_staleness))
                    .collect()
            }
            Backend::Cluster(cluster) => {
                cluster.track_replicas();
                let max_staleness = cluster.reads.settings.max_staleness;
                let sets = cluster.reads.sets();
                let replicas = sets.values().flat_map(|set| set.replicas.iter());
                replicas.map(|r| status(r, max_staleness)).collect()
            }
        }
    }

    /// Events as they happen: master changes, lost masters, sentinel
    /// disagreements, exhausted budgets. A subscriber that lags more than
    /// the event capacity behind misses the oldest.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.backend().telemetry().subscribe()
    }

    /// The client's counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.backend().telemetry().metrics.snapshot()
    }
}

impl FailoverClientBuilder {
    /// Validates the settings and starts the client's background tasks.
    /// Must be called within a Tokio runtime. The master is found in the
    /// background and by the first request; nothing here waits for Redis.
    pub fn build(self) -> Result<FailoverClient> {
        self.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::InvalidConfig {
            setting: "runtime",
            reason: "build() must be called within a Tokio runtime".to_owned(),
        })?;
        Ok(FailoverClient::start(self, &runtime))
    }
}

/// Calls `find` until it finds what it looks for (a master, a connection
/// to one), waiting as `policy` says between tries; when its budget runs
/// out, the last failures `find` gave.
pub(crate) async fn wait_for<T, F>(policy: RetryPolicy, mut find: impl FnMut() -> F) -> Result<T>
where
    F: Future<Output = std::result::Result<T, Vec<NodeFailure>>>,
{
    let mut tries = Tries::new();
    loop {
        let failures = match find().await {
            Ok(found) => return Ok(found),
            Err(failures) => failures,
        };
        match policy.decide(&mut tries, Tried::NotSent) {
            Decision::Retry(wait) => tokio::time::sleep(wait).await,
            Decision::GiveUp(_) => {
                return Err(Error::RetryBudgetExhausted {
                    budget: policy.budget,
                    spent: tries.spent(),
                    attempts: tries.count(),
                    failures,
                });
            }
        }
    }
}

/// Converts a command's reply from `node`.
pub(crate) fn convert<T: FromRedisValue>(node: &NodeAddr, reply: Reply) -> Result<T> {
    let Reply::Value(value) = reply else {
        unreachable!("a command gets one reply")
    };
    let converted = value
        .extract_error()
        .and_then(|value| T::from_redis_value(value).map_err(Into::into));
    converted.map_err(|source| Error::Command {
        node: node.clone(),
        source,
    })
}

/// A replica as the latest probe saw it, from [`FailoverClient::replicas`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaStatus {
    /// Its address, as the sentinels or the master listed it (or as a
    /// configured candidate).
    pub node: NodeAddr,
    /// Why it may not serve reads now; `None` if it may.
    pub unusable: Option<String>,
    /// How far behind the master it may be (an upper bound), if it follows it.
    pub staleness: Option<Duration>,
    /// Its round-trip time, averaged over the probes.
    pub latency: Option<Duration>,
}
