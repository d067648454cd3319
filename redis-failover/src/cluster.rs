//! The Redis Cluster client: [`ClusterClient`] and its builder.

use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, FromRedisValue, Pipeline, Value};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::addr::{NodeAddr, Resolve};
use crate::backoff::Backoff;
use crate::builder::FailoverClientBuilder;
use crate::client::{FailoverClient, convert};
use crate::cluster_state::{ClusterSettings, ClusterShared, refresh_loop};
use crate::error::{Error, Result};
use crate::node::{Connector, Credentials, Tls};
use crate::request::{Reply, Request};
use crate::slots::{slot_of, slot_of_command, slot_of_pipeline};

/// How often the slot map is loaded again by default, besides on `MOVED`,
/// `READONLY` and lost masters.
const DEFAULT_SLOT_REFRESH: Duration = Duration::from_secs(15);

impl FailoverClient {
    /// A client of a Redis Cluster that learns the slot map from any of
    /// `seed_nodes` (`CLUSTER SLOTS`), and sends each request to the
    /// master of its key's slot, retrying through redirects and failovers
    /// within the retry budget. See the crate docs, "Redis Cluster".
    pub fn cluster(seed_nodes: impl IntoIterator<Item = NodeAddr>) -> ClusterClientBuilder {
        let seeds: Vec<NodeAddr> = seed_nodes.into_iter().collect();
        ClusterClientBuilder {
            // The settings shared with the other modes live in their builder.
            base: FailoverClient::candidates(seeds.clone()),
            seeds,
            slot_refresh_interval: DEFAULT_SLOT_REFRESH,
        }
    }
}

/// Settings of a [`ClusterClient`]; start from [`FailoverClient::cluster`].
/// The settings it shares with the other modes have the same defaults.
#[derive(Clone, Debug)]
#[must_use]
pub struct ClusterClientBuilder {
    base: FailoverClientBuilder,
    seeds: Vec<NodeAddr>,
    slot_refresh_interval: Duration,
}

impl ClusterClientBuilder {
    /// Credentials for the cluster's nodes. Defaults to none.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.base = self.base.credentials(credentials);
        self
    }

    /// TLS to the cluster's nodes. Defaults to plain TCP.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.base = self.base.tls(tls);
        self
    }

    /// How node names are resolved. Defaults to the system's resolver.
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.base = self.base.resolver(resolver);
        self
    }

    /// How long a connection may take to open. Defaults to 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.base = self.base.connect_timeout(timeout);
        self
    }

    /// How long one try of a request may wait for its reply. Defaults to
    /// 500 ms.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.base = self.base.command_timeout(timeout);
        self
    }

    /// How long a request may take through redirects and failovers
    /// before it fails. Defaults to 30 s.
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.base = self.base.retry_budget(budget);
        self
    }

    /// The waits between tries. Defaults to 10 ms doubling up to 500 ms.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.base = self.base.backoff(backoff);
        self
    }

    /// How often the slot map is loaded again even when nothing asked for
    /// it (`MOVED`, `READONLY` and unreachable masters ask at once).
    /// Defaults to 15 s.
    pub fn slot_refresh_interval(mut self, interval: Duration) -> Self {
        self.slot_refresh_interval = interval;
        self
    }

    /// Checks the settings and starts the client (its slot map refresh
    /// runs in the background until the last clone is dropped). Must be
    /// called within a Tokio runtime. No node is contacted before the
    /// first request.
    pub fn build(self) -> Result<ClusterClient> {
        if self.seeds.is_empty() {
            return Err(invalid("seed_nodes", "at least one node is needed"));
        }
        if self.slot_refresh_interval.is_zero() {
            return Err(invalid("slot_refresh_interval", "must be more than zero"));
        }
        self.base.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| invalid("runtime", "build() must be called within a Tokio runtime"))?;
        let base = &self.base;
        let connector = Connector::new(
            Arc::clone(&base.resolver),
            base.credentials.clone(),
            base.tls.clone(),
            base.connect_timeout,
            base.command_timeout,
        );
        let settings = ClusterSettings {
            seeds: self.seeds,
            policy: base.retry_policy(),
            refresh_interval: self.slot_refresh_interval,
        };
        let shared = Arc::new(ClusterShared::new(settings, connector));
        let stopped = CancellationToken::new();
        runtime.spawn(refresh_loop(Arc::clone(&shared), stopped.clone()));
        Ok(ClusterClient {
            inner: Arc::new(Inner {
                shared,
                _stop: stopped.drop_guard(),
            }),
        })
    }
}

/// Blocking commands would hold the one connection to their master that
/// every request shares, and time out: not sent until they get connections
/// of their own, as in the other modes.
fn refuse_blocking(request: Request<'_>) -> Result<()> {
    match request.blocking() {
        Some(_) => Err(Error::NotInCluster {
            what: "a blocking command (BLPOP, XREAD BLOCK, WAIT...)",
        }),
        None => Ok(()),
    }
}

fn invalid(setting: &'static str, reason: &str) -> Error {
    Error::InvalidConfig {
        setting,
        reason: reason.to_owned(),
    }
}

/// A Redis Cluster client: each request goes to the master of its key's
/// slot, and is resent after `MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`,
/// `READONLY` and lost masters within the retry budget; a write whose
/// outcome is unknown is never resent unless declared idempotent.
///
/// Cheap to clone; all clones share the slot map, the connections and the
/// background refresh, which stops when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<ClusterShared>,
    // Dropping the guard cancels the token the refresh task watches.
    _stop: DropGuard,
}

impl ClusterClient {
    /// Sends `cmd` to the master of its first key's slot (any master for
    /// a keyless command) and converts the reply. Resent after redirects
    /// and failovers within the retry budget; after an unknown outcome
    /// only if the command is read-only. Blocking commands fail with
    /// [`Error::NotInCluster`], unsent.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.query_as(cmd, false).await
    }

    /// Like [`query`](Self::query), for a command that is harmless to run
    /// twice: it is resent even when its first outcome is unknown.
    pub async fn query_idempotent<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.query_as(cmd, true).await
    }

    async fn query_as<T: FromRedisValue>(&self, cmd: &Cmd, idempotent: bool) -> Result<T> {
        let slot = slot_of_command(cmd);
        let request = Request::Command(cmd);
        refuse_blocking(request)?;
        let (node, reply) = Box::pin(self.inner.shared.execute(request, slot, idempotent)).await?;
        convert(&node, reply)
    }

    /// Sends a plain pipeline whose keys are all in one slot to that
    /// slot's master, as one request, and converts its replies (as a
    /// tuple or a `Vec`). Fails with [`Error::CrossSlot`] when its keys
    /// span slots and [`Error::NotInCluster`] for a transaction, before
    /// sending. Resent like [`query`](Self::query): after an unknown
    /// outcome only if every command in it is read-only.
    pub async fn query_pipeline<T: FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T> {
        self.pipeline_as(pipeline, false).await
    }

    /// Like [`query_pipeline`](Self::query_pipeline), for a pipeline that
    /// is harmless to run twice.
    pub async fn query_pipeline_idempotent<T: FromRedisValue>(
        &self,
        pipeline: &Pipeline,
    ) -> Result<T> {
        self.pipeline_as(pipeline, true).await
    }

    async fn pipeline_as<T: FromRedisValue>(
        &self,
        pipeline: &Pipeline,
        idempotent: bool,
    ) -> Result<T> {
        if pipeline.is_transaction() {
            return Err(Error::NotInCluster {
                what: "a transaction (MULTI/EXEC)",
            });
        }
        let request = Request::Pipeline {
            pipeline,
            offset: 0,
            count: pipeline.len(),
        };
        refuse_blocking(request)?;
        let slot = slot_of_pipeline(pipeline, || request.describe())?;
        let (node, reply) = Box::pin(self.inner.shared.execute(request, slot, idempotent)).await?;
        let values = match reply {
            Reply::Values(values) => values,
            Reply::Value(value) => vec![value],
        };
        let values: Vec<Value> = values
            .into_iter()
            .map(Value::extract_error)
            .collect::<redis::RedisResult<_>>()
            .map_err(|source| Error::Command {
                node: node.clone(),
                source,
            })?;
        convert(&node, Reply::Value(Value::Array(values)))
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

    /// The master the client sends `key`'s requests to now, if it knows.
    pub fn master_of(&self, key: &str) -> Option<NodeAddr> {
        self.inner.shared.route(Some(slot_of(key.as_bytes())))
    }

    /// How long a request may take through redirects and failovers before
    /// it fails.
    pub fn retry_budget(&self) -> Duration {
        self.inner.shared.settings.policy.budget
    }
}
