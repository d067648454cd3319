//! The public handles: [`FailoverClient`] and its [`ConnectionLike`] view.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Value};
use tokio::sync::{broadcast, watch};

use crate::addr::NodeAddr;
use crate::builder::{FailoverClientBuilder, Mode};
use crate::error::{Error, Result};
use crate::events::{Event, MetricsSnapshot};
use crate::request::{Reply, Request};
use crate::retry::backoff;
use crate::shared::Shared;
use crate::tasks::{recheck_loop, watch_sentinel};

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
        let (stop, stopped) = watch::channel(());
        let shared = Arc::new(Shared::new(settings));
        runtime.spawn(recheck_loop(Arc::clone(&shared), stopped.clone()));
        if let Mode::Sentinel { sentinels, .. } = &shared.settings.mode {
            for sentinel in sentinels {
                let watcher =
                    watch_sentinel(Arc::clone(&shared), sentinel.clone(), stopped.clone());
                runtime.spawn(watcher);
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
    ///
    /// Requests share one multiplexed connection per master, so commands
    /// that change connection state (`WATCH`, `SELECT`, `CLIENT`...) and
    /// `MULTI`/`EXEC` sent as separate requests are not supported; send a
    /// transaction as one atomic pipeline. A blocking command (`WAIT`,
    /// `BLPOP`, `XREAD BLOCK`) holds up every request behind it on that
    /// connection: give it a client of its own.
    pub fn connection(&self) -> MasterConnection {
        MasterConnection {
            client: self.clone(),
            idempotent: false,
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
        let (master, reply) = self
            .shared()
            .execute(Request::Command(cmd), idempotent)
            .await?;
        let Reply::Value(value) = reply else {
            unreachable!("a command gets one reply")
        };
        let converted = value
            .extract_error()
            .and_then(|value| T::from_redis_value(value).map_err(Into::into));
        converted.map_err(|source| Error::Command {
            node: master.node.clone(),
            source,
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
        let started = Instant::now();
        for attempt in 0.. {
            let failures = match self.shared().current().await {
                Ok((master, _)) => {
                    return Ok(MasterInfo {
                        node: master.node.clone(),
                        generation: master.generation,
                    });
                }
                Err(failures) => failures,
            };
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(Error::RetryBudgetExhausted {
                    budget: timeout,
                    spent: started.elapsed(),
                    attempts: attempt + 1,
                    failures,
                });
            }
            let settings = &self.shared().settings;
            let wait = backoff(
                attempt,
                settings.backoff_base,
                settings.backoff_cap,
                &mut rand::rng(),
            );
            tokio::time::sleep(wait.min(left)).await;
        }
        unreachable!("the loop returns")
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

impl MasterConnection {
    async fn execute(&self, request: Request<'_>) -> redis::RedisResult<Reply> {
        match self.client.shared().execute(request, self.idempotent).await {
            Ok((_, reply)) => Ok(reply),
            Err(error) => Err(error.into_redis_error()),
        }
    }
}

impl ConnectionLike for MasterConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self.execute(Request::Command(cmd)).await? {
                Reply::Value(value) => Ok(value),
                Reply::Values(_) => unreachable!("a command gets one reply"),
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
            match self.execute(request).await? {
                Reply::Values(values) => Ok(values),
                Reply::Value(_) => unreachable!("a pipeline gets a list of replies"),
            }
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}
