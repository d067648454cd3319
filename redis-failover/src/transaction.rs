//! Optimistic transactions: `WATCH`, reads, then `MULTI` … `EXEC` on a
//! connection of their own, tried again when a watched key changed or the
//! master moved before `EXEC`, never run twice after it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, ServerError, ToRedisArgs, Value,
};

use crate::addr::NodeAddr;
use crate::backend::{Backend, cluster_ack};
use crate::client::FailoverClient;
use crate::cluster_transaction::{Watching, watched_slot};
use crate::dedicated::send_marked;
use crate::durable::Ack;
use crate::error::{Error, Result};
use crate::execute::Retrying;
use crate::node::Dedicated;
use crate::policy::{GaveUp, Tried};
use crate::request::{Request, Sent};
use crate::retry::{Failure, refusal_code};
use crate::routing::Durability;
use crate::shared::Shared;
use crate::slots::slot_of_pipeline;
use crate::state::{Master, lock};

/// The connection a transaction's body reads on, between `WATCH` and
/// `EXEC`: the master's, held by this transaction alone. See
/// [`FailoverClient::transaction`](crate::FailoverClient::transaction).
#[derive(Clone)]
pub struct Watched {
    connection: MultiplexedConnection,
    node: NodeAddr,
    /// Why the connection failed while the body used it: the try is cut
    /// short and made again, whatever the body made of the error.
    interrupted: Arc<Mutex<Option<RedisError>>>,
    /// Set once the body returned: the connection goes on to `EXEC` and
    /// back to the pool, so a clone kept past the body must not use it.
    returned: Arc<AtomicBool>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Watched {
    /// The master this try runs on.
    pub fn node(&self) -> &NodeAddr {
        &self.node
    }

    /// Sends `cmd` (a read, typically of the watched keys) and converts
    /// the reply.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T> {
        if self.returned.load(Ordering::Acquire) {
            return Err(Error::Command {
                node: self.node.clone(),
                source: RedisError::from((
                    redis::ErrorKind::Client,
                    "the transaction's body has returned: its connection is no longer watched",
                )),
            });
        }
        let reply = match self.connection.send_packed_command(cmd).await {
            Ok(reply) => reply.extract_error(),
            Err(error) => Err(error),
        };
        let error = match reply {
            Ok(value) => match T::from_redis_value(value) {
                Ok(converted) => return Ok(converted),
                Err(error) => error.into(),
            },
            Err(error) => error,
        };
        if Failure::of(&error) != Failure::Final {
            *lock(&self.interrupted) = Some(error.clone());
        }
        Err(Error::Command {
            node: self.node.clone(),
            source: error,
        })
    }

    /// `GET key`.
    pub async fn get<T: FromRedisValue>(&mut self, key: &str) -> Result<T> {
        self.query(redis::cmd("GET").arg(key)).await
    }
}

impl FailoverClient {
    /// Runs an optimistic transaction on the master: `WATCH keys`, then
    /// `body`, which reads what it needs through [`Watched`] and returns
    /// the commands to run (or `None` to run nothing), then those commands
    /// in `MULTI` … `EXEC`. Returns `EXEC`'s replies as `T`, or `None`
    /// when the body ran nothing.
    ///
    /// `body` gets a handle of its own on every try; what it needs from
    /// around it, it clones (see the example).
    ///
    /// When a watched key changed before `EXEC` (a conflict), or the
    /// master failed or moved before `EXEC` was sent, the whole
    /// transaction is tried again, `body` included, within the retry
    /// budget; past it, conflicts end in [`Error::TransactionConflict`].
    /// Once `EXEC` is sent it is never sent again: a failover that cuts it
    /// off gives [`Error::OutcomeUnknown`] (see
    /// [`idempotent_transaction`](Self::idempotent_transaction)).
    ///
    /// The transaction holds a connection of its own from `WATCH` to
    /// `EXEC` (see
    /// [`dedicated_connections`](crate::FailoverClientBuilder::dedicated_connections)).
    /// With [`Durability::Replicated`] it is `WAIT`ed for there after `EXEC`.
    ///
    /// In cluster mode the watched keys and those of the returned
    /// pipeline must share one slot ([`Error::CrossSlot`] otherwise, the
    /// watched keys checked before anything is sent, the pipeline's before
    /// `EXEC`), and at least one key is watched; it runs on the slot's
    /// master, and a `MOVED` before `EXEC` runs it again on the new owner.
    ///
    /// ```no_run
    /// # async fn example(client: redis_failover::FailoverClient) -> redis_failover::Result<()> {
    /// // Doubles a number kept as a decimal string.
    /// let key = "balance".to_owned();
    /// let doubled: Option<(i64,)> = client
    ///     .transaction(&[&key], |mut watched| {
    ///         let key = key.clone();
    ///         async move {
    ///             let now: i64 = watched.get::<Option<i64>>(&key).await?.unwrap_or(0);
    ///             let mut pipeline = redis::pipe();
    ///             pipeline.set(&key, now * 2).ignore().get(&key);
    ///             Ok(Some(pipeline))
    ///         }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn transaction<K, T, F, B>(&self, keys: &[K], mut body: F) -> Result<Option<T>>
    where
        K: ToRedisArgs,
        T: FromRedisValue,
        F: FnMut(Watched) -> B,
        B: Future<Output = Result<Option<Pipeline>>>,
    {
        self.run_transaction(keys, &mut body, false).await
    }

    /// Like [`transaction`](Self::transaction), for a transaction that is
    /// harmless to run twice: when a failover cuts off its `EXEC`, it is
    /// tried again instead of failing with [`Error::OutcomeUnknown`].
    pub async fn idempotent_transaction<K, T, F, B>(
        &self,
        keys: &[K],
        mut body: F,
    ) -> Result<Option<T>>
    where
        K: ToRedisArgs,
        T: FromRedisValue,
        F: FnMut(Watched) -> B,
        B: Future<Output = Result<Option<Pipeline>>>,
    {
        self.run_transaction(keys, &mut body, true).await
    }

    async fn run_transaction<K, T, F, B>(
        &self,
        keys: &[K],
        body: &mut F,
        idempotent: bool,
    ) -> Result<Option<T>>
    where
        K: ToRedisArgs,
        T: FromRedisValue,
        F: FnMut(Watched) -> B,
        B: Future<Output = Result<Option<Pipeline>>>,
    {
        let watch = (!keys.is_empty()).then(|| redis::cmd("WATCH").arg(keys).to_owned());
        // Boxed, as in `query`: the retry loops are deep.
        match self.backend() {
            Backend::Replicated(shared) => {
                let running =
                    shared.transaction(watch.as_ref(), body, idempotent, self.durability());
                Box::pin(running).await
            }
            Backend::Cluster(cluster) => {
                let slot = watched_slot(keys)?;
                let watching = Watching {
                    slot,
                    watch: watch.as_ref().expect("a slot means keys to watch"),
                    ack: cluster_ack(self.durability())?,
                };
                Box::pin(cluster.transaction(watching, body, idempotent)).await
            }
        }
    }
}

/// What one try of a transaction came to.
pub(crate) enum Try {
    /// `EXEC` ran it: its replies.
    Committed(Value),
    /// The body chose not to run it.
    Aborted,
    /// A watched key changed: `EXEC` ran nothing.
    Conflict,
    /// The body failed: its error is the caller's.
    Body(Error),
    /// The try failed as a request can.
    Failed(Sent),
}

impl Shared {
    /// Runs a transaction: `watch` (a `WATCH` of its keys, if any), the
    /// body's reads, then the body's pipeline in `MULTI` … `EXEC`; again
    /// after a conflict or a failure before `EXEC`, within the retry
    /// budget. `None` when the body aborted it; otherwise the master that
    /// ran it and `EXEC`'s replies.
    pub(crate) async fn transaction<F, B, T>(
        self: &Arc<Self>,
        watch: Option<&Cmd>,
        body: &mut F,
        idempotent: bool,
        durability: Durability,
    ) -> Result<Option<T>>
    where
        F: FnMut(Watched) -> B,
        B: Future<Output = Result<Option<Pipeline>>>,
        T: FromRedisValue,
    {
        durability.validate()?;
        let mut retrying: Option<Retrying> = None;
        loop {
            let (master, epoch) = match self.current().await {
                Ok(found) => found,
                Err(failures) => {
                    self.no_master(&mut retrying, failures).await?;
                    continue;
                }
            };
            let tried = match self.admit(&master, durability, true).await {
                Err(held) => Try::Failed(held),
                Ok(replicated) => self.try_once(&master, watch, body, replicated).await,
            };
            match tried {
                Try::Committed(replies) => return converted(&master.node, replies).map(Some),
                Try::Aborted => return Ok(None),
                Try::Body(error) => return Err(error),
                Try::Conflict => {
                    let failure = master.failure("a watched key changed".to_owned());
                    match self
                        .retry_after(&mut retrying, Tried::Conflict, vec![failure])
                        .await
                    {
                        Ok(()) => {}
                        Err(GaveUp::Budget) => {
                            let attempts = retrying.as_ref().map_or(1, |r| r.tries().count());
                            return Err(Error::TransactionConflict { attempts });
                        }
                        Err(_) => unreachable!("a conflict is retried until the budget ends"),
                    }
                }
                Try::Failed(failed) => {
                    self.recover(&mut retrying, &master, epoch, failed, idempotent)
                        .await?;
                }
            }
        }
    }

    /// One try on `master`, on a connection of its own.
    async fn try_once<F, B>(
        &self,
        master: &Master,
        watch: Option<&Cmd>,
        body: &mut F,
        replicated: Option<Ack>,
    ) -> Try
    where
        F: FnMut(Watched) -> B,
        B: Future<Output = Result<Option<Pipeline>>>,
    {
        let mut pooled = match self.checkout(master).await {
            Ok(pooled) => pooled,
            Err(held) => return Try::Failed(held),
        };
        let connection = &mut *pooled;
        match watch_and_exec(connection, &master.node, watch, body, None).await {
            Try::Committed(exec) if replicated.is_some() => {
                let ack = replicated.expect("checked");
                match self.wait_replicated(master, connection, ack).await {
                    Ok(()) => Try::Committed(exec),
                    Err(error) => Try::Failed(Sent::Unreplicated(error)),
                }
            }
            tried => tried,
        }
    }
}

/// One try of a transaction on `connection`, to `node`: `watch`, the
/// body's reads, then its pipeline in `MULTI` … `EXEC`. With `slot` (a
/// cluster's), the pipeline's keys must be in that slot too.
pub(crate) async fn watch_and_exec<F, B>(
    connection: &mut Dedicated,
    node: &NodeAddr,
    watch: Option<&Cmd>,
    body: &mut F,
    slot: Option<u16>,
) -> Try
where
    F: FnMut(Watched) -> B,
    B: Future<Output = Result<Option<Pipeline>>>,
{
    if let Some(watch) = watch {
        let watched = send_marked(connection, Request::Command(watch)).await;
        if let Some(error) = watched.map_or_else(Some, |reply| reply.error()) {
            return Try::Failed(not_run(error));
        }
    }
    let interrupted = Arc::default();
    let returned = Arc::new(AtomicBool::new(false));
    let watched = Watched {
        connection: connection.multiplexed.clone(),
        node: node.clone(),
        interrupted: Arc::clone(&interrupted),
        returned: Arc::clone(&returned),
    };
    // Watching until EXEC or UNWATCH: not fit for another user before.
    connection.broken = true;
    let pipeline = body(watched).await;
    returned.store(true, Ordering::Release);
    if let Some(error) = lock(&interrupted).take() {
        return Try::Failed(not_run(error));
    }
    let pipeline = pipeline.and_then(|pipeline| match (pipeline, slot) {
        (Some(pipeline), Some(slot)) => in_slot(pipeline, slot).map(Some),
        (pipeline, _) => Ok(pipeline),
    });
    let mut pipeline = match pipeline {
        Ok(Some(pipeline)) if !pipeline.is_empty() => pipeline,
        outcome => {
            let unwatch = redis::cmd("UNWATCH");
            let _ = send_marked(connection, Request::Command(&unwatch)).await;
            return match outcome {
                Ok(Some(_)) => Try::Committed(Value::Array(Vec::new())),
                Ok(None) => Try::Aborted,
                Err(error) => Try::Body(error),
            };
        }
    };
    pipeline.atomic();
    let queued = pipeline.len() + 2;
    let request = Request::Pipeline {
        pipeline: &pipeline,
        offset: 0,
        count: queued,
    };
    let replies = match send_marked(connection, request).await {
        Ok(reply) => reply.into_values(),
        Err(error) => return Try::Failed(Sent::Failed(error)),
    };
    match exec_outcome(replies) {
        Ok(Some(exec)) => Try::Committed(replay(&pipeline, exec)),
        Ok(None) => Try::Conflict,
        Err(error) => Try::Failed(Sent::Failed(error)),
    }
}

/// `pipeline`, if its keys are in `slot` (that of the watched keys).
fn in_slot(pipeline: Pipeline, slot: u16) -> Result<Pipeline> {
    let describe = || {
        let request = Request::Pipeline {
            pipeline: &pipeline,
            offset: 0,
            count: pipeline.len(),
        };
        request.describe()
    };
    match slot_of_pipeline(&pipeline, describe)? {
        Some(other) if other != slot => Err(Error::CrossSlot {
            command: describe(),
            slots: vec![slot.min(other), slot.max(other)],
        }),
        _ => Ok(pipeline),
    }
}

/// A failure before `EXEC`: nothing ran, whatever happened to the
/// connection.
fn not_run(error: RedisError) -> Sent {
    match Failure::of(&error) {
        Failure::OutcomeUnknown => Sent::Unreachable(error.to_string()),
        _ => Sent::Failed(error),
    }
}

/// Reads the replies to `MULTI`, the queued commands and `EXEC`: `EXEC`'s
/// reply, `None` after a conflict, or the error the transaction failed
/// with. A command refused while queued (`READONLY` on a demoted master)
/// is that refusal, not the `EXECABORT` that follows it.
fn exec_outcome(mut replies: Vec<Value>) -> Result<Option<Value>, RedisError> {
    let exec = replies.pop().unwrap_or(Value::Nil);
    let queued: Vec<&ServerError> = replies
        .iter()
        .filter_map(|value| match value {
            Value::ServerError(error) => Some(error),
            _ => None,
        })
        .collect();
    let cause = queued
        .iter()
        .find(|error| refusal_code(error).is_some())
        .or(queued.first());
    if let Some(cause) = cause {
        return Err(RedisError::from((*cause).clone()));
    }
    match exec {
        Value::Nil => Ok(None),
        Value::ServerError(error) => Err(error.into()),
        exec => Ok(Some(exec)),
    }
}

/// `EXEC`'s replies to `pipeline`, with its ignored commands left out, as
/// redis-rs reads them.
fn replay(pipeline: &Pipeline, exec: Value) -> Value {
    /// A connection whose only reply is `EXEC`'s.
    struct Replay(Option<Value>);

    impl ConnectionLike for Replay {
        fn req_packed_command<'a>(&'a mut self, _: &'a Cmd) -> RedisFuture<'a, Value> {
            unreachable!("only a transaction is replayed")
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a Pipeline,
            _: usize,
            _: usize,
        ) -> RedisFuture<'a, Vec<Value>> {
            let exec = self.0.take().unwrap_or(Value::Nil);
            Box::pin(async move { Ok(vec![exec]) })
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    let mut replay = Replay(Some(exec.clone()));
    // The replay answers at once: the future is ready on its first poll.
    futures_util::FutureExt::now_or_never(pipeline.query_async::<Value>(&mut replay))
        .and_then(Result::ok)
        .unwrap_or(exec)
}

/// `EXEC`'s replies from `node` as `T`.
pub(crate) fn converted<T: FromRedisValue>(node: &NodeAddr, replies: Value) -> Result<T> {
    replies
        .extract_error()
        .and_then(|value| T::from_redis_value(value).map_err(Into::into))
        .map_err(|source| Error::Command {
            node: node.clone(),
            source,
        })
}
