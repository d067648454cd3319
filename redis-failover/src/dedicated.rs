//! Connections of their own to the master, for what must not share the
//! multiplexed connection: blocking commands, durable writes' `WAIT`, and
//! transactions. Each master has its pool of them, dropped with it once
//! another master is installed.

use std::time::Duration;

use bb8::PooledConnection;
use redis::RedisError;

use crate::durable::{Ack, Acked};
use crate::error::Error;
use crate::events::Counter;
use crate::node::{Dedicated, DedicatedManager};
use crate::request::{Reply, Request, Sent};
use crate::retry::{Block, Failure, refusal_of};
use crate::shared::Shared;
use crate::state::Master;
use crate::tasks::replaced;

/// A master's pool of up to `max` dedicated connections, opened on
/// demand; a checkout waits at most `timeout` for one.
pub(crate) fn dedicated_pool(
    manager: DedicatedManager,
    max: u32,
    timeout: Duration,
) -> bb8::Pool<DedicatedManager> {
    bb8::Pool::builder()
        .max_size(max)
        .min_idle(None)
        // A PING on checkout: an idle connection may have died unseen.
        .test_on_check_out(true)
        .retry_connection(false)
        .connection_timeout(timeout)
        .build_unchecked(manager)
}

/// A dedicated connection checked out of a master's pool.
pub(crate) type Checkout<'a> = PooledConnection<'a, DedicatedManager>;

/// How a request on a dedicated connection goes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Exclusive {
    /// It blocks this long: the reply may take that much longer.
    pub(crate) block: Option<Block>,
    /// A durable write: what to wait for once it ran.
    pub(crate) replicated: Option<Ack>,
}

impl Shared {
    /// A dedicated connection to `master`, or why there is none (as the
    /// retry loop takes it).
    pub(crate) async fn checkout<'a>(&self, master: &'a Master) -> Result<Checkout<'a>, Sent> {
        checkout(&master.dedicated, self.settings.dedicated_connections).await
    }

    /// Sends `request` on a dedicated connection, as `how` says.
    pub(crate) async fn send_dedicated(
        &self,
        master: &Master,
        request: Request<'_>,
        idempotent: bool,
        how: Exclusive,
    ) -> Sent {
        let mut pooled = match self.checkout(master).await {
            Ok(pooled) => pooled,
            Err(sent) => return sent,
        };
        let connection = &mut *pooled;
        let reply = match how.block {
            Some(block) => self.send_blocking(master, connection, request, block).await,
            None => send_marked(connection, request).await,
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => return Sent::Failed(error),
        };
        if let Some((refusal, _)) = request.refusal(&reply, idempotent) {
            return Sent::Failed(refusal);
        }
        let Some(ack) = how.replicated.filter(|_| !all_failed(&reply)) else {
            // Not durable, or every command failed: nothing to wait for.
            return Sent::Done(reply);
        };
        match self.wait_replicated(master, connection, ack).await {
            Ok(()) => Sent::Done(reply),
            Err(error) => Sent::Unreplicated(error),
        }
    }

    /// Sends a blocking request, giving it `block` more than the command
    /// timeout to answer. If another master is installed meanwhile, a
    /// request that [may be unblocked](Request::may_unblock) is unblocked
    /// on the old one (`CLIENT UNBLOCK … ERROR`): still blocked, it is
    /// refused (`UNBLOCKED`), which says it did not run; if it ran
    /// meanwhile, its reply comes. Any other request keeps its own
    /// timeout; one that would block forever, or cannot be unblocked, is
    /// given up with an error whose outcome is unknown.
    async fn send_blocking(
        &self,
        master: &Master,
        connection: &mut Dedicated,
        request: Request<'_>,
        block: Block,
    ) -> Result<Reply, RedisError> {
        let patience = match block {
            Block::For(block) => block.saturating_add(self.settings.command_timeout),
            Block::Forever => Duration::MAX,
        };
        let (id, mut installed) = (connection.id, self.subscribe_installed());
        connection.multiplexed.set_response_timeout(patience);
        let reply = {
            let mut sent = std::pin::pin!(send_marked(connection, request));
            tokio::select! {
                reply = &mut sent => reply,
                () = replaced(&mut installed, master.generation) => {
                    let unblocked = request.may_unblock() && unblock(master, id).await;
                    match (unblocked, block) {
                        (true, _) => tokio::time::timeout(self.settings.command_timeout, sent)
                            .await
                            .unwrap_or_else(|_| Err(abandoned())),
                        (false, Block::For(_)) => sent.await,
                        (false, Block::Forever) => Err(abandoned()),
                    }
                }
            }
        };
        connection
            .multiplexed
            .set_response_timeout(self.settings.command_timeout);
        reply
    }

    /// `WAIT` (or `WAITAOF`) on `connection`, after a write on it: the
    /// error says how it fell short.
    pub(crate) async fn wait_replicated(
        &self,
        master: &Master,
        connection: &mut Dedicated,
        ack: Ack,
    ) -> Result<(), Error> {
        let acked = wait_on(connection, ack, self.settings.command_timeout).await;
        self.wait_answered(master, ack, &acked);
        let outcome = ack.outcome(&master.node, &acked);
        if outcome.is_err() {
            self.telemetry.add(Counter::UnreplicatedWrites);
        }
        outcome
    }

    /// Records what a wait for `ack` answered: counts the replicas again
    /// before the next durable write if it fell short, checks `WAITAOF`
    /// again if it failed.
    pub(crate) fn wait_answered(
        &self,
        master: &Master,
        ack: Ack,
        acked: &Result<Acked, RedisError>,
    ) {
        if acked.is_err() && ack.aof.is_some() {
            master.aof.forget();
        }
        if !acked.as_ref().is_ok_and(|acked| ack.met_by(*acked)) {
            master.replicas.forget_count();
        }
    }
}

/// A dedicated connection from `pool` (of at most `limit`), or why there
/// is none (as the retry loops take it).
pub(crate) async fn checkout(
    pool: &bb8::Pool<DedicatedManager>,
    limit: u32,
) -> Result<Checkout<'_>, Sent> {
    let state = pool.state();
    if state.idle_connections == 0 && state.connections < limit {
        // bb8 opens connections in the background and only times out a
        // checkout whose connection failed: open it here instead, so that
        // a master gone or demoted says so at once.
        let opened = pool.dedicated_connection().await.map_err(|error| {
            match refusal_of(&error) {
                // A refusal (the node is no master any more) stays a refusal.
                Some(_) => Sent::Failed(error),
                None => Sent::Unreachable(format!("could not open a connection: {error}")),
            }
        })?;
        // At capacity meanwhile: the connection is dropped.
        let _ = pool.add(opened);
    }
    pool.get()
        .await
        .map_err(|_timed_out| Sent::Held(format!("all {limit} dedicated connections stayed busy")))
}

/// Sends `request`, the connection marked broken until its reply is in:
/// the caller may drop the future halfway, and a connection with a reply
/// still to come is not fit to hand out again.
pub(crate) async fn send_marked(
    connection: &mut Dedicated,
    request: Request<'_>,
) -> Result<Reply, RedisError> {
    send_marked_on(connection, request, false).await
}

/// [`send_marked`], right after `ASKING` when `asking` (a cluster's `ASK`
/// redirect).
pub(crate) async fn send_marked_on(
    connection: &mut Dedicated,
    request: Request<'_>,
    asking: bool,
) -> Result<Reply, RedisError> {
    connection.broken = true;
    let reply = request.send_on(&mut connection.multiplexed, asking).await;
    connection.broken = reply
        .as_ref()
        .is_err_and(|error| Failure::of(error) == Failure::OutcomeUnknown);
    reply
}

/// `WAIT` (or `WAITAOF`) on `connection`, after a write on it, given the
/// command timeout besides its own: what it counted.
pub(crate) async fn wait_on(
    connection: &mut Dedicated,
    ack: Ack,
    command_timeout: Duration,
) -> Result<Acked, RedisError> {
    let wait = ack.command();
    connection
        .multiplexed
        .set_response_timeout(ack.timeout.saturating_add(command_timeout));
    let acked = send_marked(connection, Request::Command(&wait)).await;
    connection.multiplexed.set_response_timeout(command_timeout);
    acked.and_then(|reply| match reply {
        Reply::Value(value) => ack.acked(value),
        Reply::Values(_) => unreachable!("a command gets one reply"),
    })
}

/// Unblocks the dedicated connection `id` on `master`, over its shared
/// connection; whether that was done (or it was not blocked any more).
async fn unblock(master: &Master, id: Option<u64>) -> bool {
    let Some(id) = id else {
        return false;
    };
    let mut shared = master.connection.load().multiplexed.clone();
    let unblocked: redis::RedisResult<u64> = redis::cmd("CLIENT")
        .arg("UNBLOCK")
        .arg(id)
        .arg("ERROR")
        .query_async(&mut shared)
        .await;
    // 0: not blocked any more, its reply is on its way.
    unblocked.is_ok()
}

/// The error of a blocking command given up on: it may have run.
fn abandoned() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "another master was installed while the command blocked",
    ))
}

/// Whether every reply is an error (so no write ran).
pub(crate) fn all_failed(reply: &Reply) -> bool {
    let is_error = |value: &redis::Value| matches!(value, redis::Value::ServerError(_));
    match reply {
        Reply::Value(value) => is_error(value),
        Reply::Values(values) => values.iter().all(is_error),
    }
}
