//! Durable writes that share their `WAIT`s (group commit).
//!
//! `WAIT` counts the replicas that have every write its own connection
//! sent before it. So durable writes go over one multiplexed connection of
//! their own to the master, its *lane*, and once a write's reply is in, it
//! waits for the next `WAIT` sent on that lane: one `WAIT` answers for
//! every write that finished before it was sent. At most one `WAIT` is in
//! flight; the writes that finish meanwhile share the next one. (Redis
//! holds the lane while a `WAIT` waits, so writes sent then run when it is
//! answered; a second lane taking writes meanwhile measured no faster.)
//! A write is acknowledged only when a `WAIT` sent after its reply counted
//! enough replicas, as when each write sent its own. Persisted writes
//! ([`Durability::Persisted`](crate::Durability::Persisted)) share a
//! `WAITAOF` the same way: a batch holding both kinds sends one `WAIT` for
//! the replicated ones, then one `WAITAOF` for the persisted ones (each
//! asking for the most any of its writes asks), both after every write of
//! the batch.
//!
//! The `WAIT`s are sent by a task spawned when a write finds none running,
//! which ends when no write waits: nothing runs while no durable write is
//! under way; if it stops before its time (a panic, a runtime shutting
//! down), the writes it leaves learn that their replication is unknown. A
//! lane that fails is replaced; the writes that were sent on it learn that
//! their replication is unknown (the `WAIT` of another connection would
//! not count their writes).
//!
//! The mechanism needs only a node to open connections to: it runs for the
//! one master ([`MasterLane`]) and for each master of a cluster
//! ([`crate::cluster_nodes`]), each a [`LaneHost`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use redis::aio::MultiplexedConnection;

use crate::addr::NodeAddr;
use crate::dedicated::all_failed;
use crate::durable::{Ack, Acked};
use crate::error::Error;
use crate::events::{Counter, Telemetry};
use crate::lane::{Lane, LaneSlot, Waiter};
use crate::node::Connection;
use crate::request::{Request, Sent};
use crate::retry::{Failure, refusal_of};
use crate::shared::Shared;
use crate::state::Master;

/// A lane idle for this long answers a `PING` before it takes a write.
const IDLE_CHECK: Duration = Duration::from_secs(10);

/// The node a lane goes to, and what its writes' waits report to.
pub(crate) trait LaneHost: Send + Sync + 'static {
    /// The node, named in the errors of its writes.
    fn node(&self) -> &NodeAddr;
    /// Where its lane is kept.
    fn lane_slot(&self) -> &LaneSlot;
    /// How long a reply may take, besides what a write waits for.
    fn command_timeout(&self) -> Duration;
    fn telemetry(&self) -> &Telemetry;
    /// A new connection to the node (a refusal: it is no master).
    fn open(&self) -> impl Future<Output = redis::RedisResult<MultiplexedConnection>> + Send;
    /// A wait for `ack` answered `acked` (what the host caches of the
    /// node's replicas may be stale).
    fn wait_answered(&self, ack: Ack, acked: &Result<Acked, RedisError>);
}

/// The one master of a Sentinel or candidates client, as a lane's host.
pub(crate) struct MasterLane {
    shared: Arc<Shared>,
    master: Arc<Master>,
}

impl LaneHost for MasterLane {
    fn node(&self) -> &NodeAddr {
        &self.master.node
    }

    fn lane_slot(&self) -> &LaneSlot {
        &self.master.lane
    }

    fn command_timeout(&self) -> Duration {
        self.shared.settings.command_timeout
    }

    fn telemetry(&self) -> &Telemetry {
        &self.shared.telemetry
    }

    fn open(&self) -> impl Future<Output = redis::RedisResult<MultiplexedConnection>> + Send {
        // Opening proves the node is still the master.
        self.master.opener.connect()
    }

    fn wait_answered(&self, ack: Ack, acked: &Result<Acked, RedisError>) {
        self.shared.wait_answered(&self.master, ack, acked);
    }
}

impl Shared {
    /// Sends a durable write on `master`'s lane, and once it ran, waits
    /// for a `WAIT` (or `WAITAOF`) to count what `ack` asks.
    pub(crate) async fn send_durable(
        self: &Arc<Self>,
        master: &Arc<Master>,
        request: Request<'_>,
        idempotent: bool,
        ack: Ack,
    ) -> Sent {
        let host = Arc::new(MasterLane {
            shared: Arc::clone(self),
            master: Arc::clone(master),
        });
        send_durable(&host, request, idempotent, ack, false).await
    }
}

/// `host`'s lane, opened if it has none or it failed, or why there is none
/// (as the retry loops take it). One idle for long is checked first: a
/// connection closed meanwhile would fail a write that was never sent as
/// one that may have run.
async fn lane<H: LaneHost>(host: &H) -> Result<Arc<Lane>, Sent> {
    let slot = host.lane_slot();
    if let Some(lane) = slot.current.load_full().filter(|lane| !lane.has_failed())
        && (lane.idle_then_used() < IDLE_CHECK || answers(host, &lane).await)
    {
        return Ok(lane);
    }
    let _opening = slot.opening.lock().await;
    if let Some(lane) = slot.current.load_full().filter(|lane| !lane.has_failed()) {
        return Ok(lane);
    }
    let connection = host.open().await.map_err(|error| {
        match refusal_of(&error) {
            // A refusal (the node is no master any more) stays a refusal.
            Some(_) => Sent::Failed(error),
            None => Sent::Unreachable(format!(
                "could not open the connection of durable writes: {error}"
            )),
        }
    })?;
    let lane = Lane::new(Connection::new(connection));
    slot.current.store(Some(Arc::clone(&lane)));
    Ok(lane)
}

/// Whether `lane` answers a `PING`; marked failed if not.
async fn answers<H: LaneHost>(host: &H, lane: &Lane) -> bool {
    let mut connection = lane.connection.multiplexed.clone();
    connection.set_response_timeout(host.command_timeout());
    let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut connection).await;
    if pong.is_err() {
        lane.connection.fail();
    }
    pong.is_ok()
}

/// Sends a durable write on `host`'s lane (after `ASKING` when `asking`:
/// a cluster's `ASK` redirect), and once it ran, waits for a `WAIT` (or
/// `WAITAOF`) to count what `ack` asks.
pub(crate) async fn send_durable<H: LaneHost>(
    host: &Arc<H>,
    request: Request<'_>,
    idempotent: bool,
    ack: Ack,
    asking: bool,
) -> Sent {
    let lane = match lane(host.as_ref()).await {
        Ok(lane) => lane,
        Err(sent) => return sent,
    };
    let mut connection = lane.connection.multiplexed.clone();
    // A write may wait behind the lane's `WAIT` before it runs.
    let patience = lane.patience(ack.timeout);
    connection.set_response_timeout(patience.saturating_add(host.command_timeout()));
    let reply = match request.send_on(&mut connection, asking).await {
        Ok(reply) => reply,
        Err(error) => {
            if Failure::of(&error) == Failure::OutcomeUnknown {
                lane.connection.fail();
            }
            return Sent::Failed(error);
        }
    };
    if let Some((refusal, _)) = request.refusal(&reply, idempotent) {
        return Sent::Failed(refusal);
    }
    if all_failed(&reply) {
        // No write ran: nothing to wait for.
        return Sent::Done(reply);
    }
    match next_wait(host, &lane, ack).await {
        Ok(()) => Sent::Done(reply),
        Err(error) => Sent::Unreplicated(error),
    }
}

/// Waits for the next `WAIT` on `lane` (starting the task that sends
/// them if none runs), and says whether it counted what `ack` asks.
async fn next_wait<H: LaneHost>(host: &Arc<H>, lane: &Arc<Lane>, ack: Ack) -> Result<(), Error> {
    let (replicated, start) = lane.join(ack);
    if start {
        let (host, lane) = (Arc::clone(host), Arc::clone(lane));
        tokio::spawn(async move { send_waits(host.as_ref(), &lane).await });
    }
    replicated.await.unwrap_or_else(|_| {
        // The task stopped with this write's batch in hand (a panic, a
        // runtime shutting down).
        Err(Error::ReplicationUnknown {
            node: host.node().clone(),
            source: RedisError::from(std::io::Error::other("the WAIT task ended")),
        })
    })
}

/// Sends a `WAIT` for the writes waiting on `lane`, answers them, and
/// again while writes wait.
async fn send_waits<H: LaneHost>(host: &H, lane: &Lane) {
    let mut stopping = Abandoned {
        node: host.node(),
        lane,
        ended: false,
    };
    while let Some(batch) = lane.waiting() {
        let (persisted, replicated): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|w| w.ack.aof.is_some());
        for group in [replicated, persisted] {
            answer_group(host, lane, group).await;
        }
    }
    // Ended as it should: nothing waits, and the next write starts again.
    stopping.ended = true;
}

/// Sends one wait for `group` (writes all waiting for `WAIT`, or all for
/// `WAITAOF`), asking for the most any of them asks, and answers each by
/// its own ask.
async fn answer_group<H: LaneHost>(host: &H, lane: &Lane, group: Vec<Waiter>) {
    let Some(ack) = group.iter().map(|w| w.ack).reduce(Ack::merge) else {
        return;
    };
    let acked = send_wait(host, lane, ack).await;
    host.wait_answered(ack, &acked);
    for waiter in group {
        let result = waiter.ack.outcome(host.node(), &acked);
        if result.is_err() {
            host.telemetry().add(Counter::UnreplicatedWrites);
        }
        waiter.answer(result);
    }
}

/// `WAIT` (or `WAITAOF`) on the lane: what has every write sent on it so
/// far.
async fn send_wait<H: LaneHost>(host: &H, lane: &Lane, ack: Ack) -> Result<Acked, RedisError> {
    if lane.has_failed() {
        return Err(RedisError::from(std::io::Error::other(
            "the connection of durable writes failed",
        )));
    }
    let mut connection = lane.connection.multiplexed.clone();
    connection.set_response_timeout(ack.timeout.saturating_add(host.command_timeout()));
    let acked = ack
        .command()
        .query_async::<redis::Value>(&mut connection)
        .await
        .and_then(|reply| ack.acked(reply));
    if acked
        .as_ref()
        .is_err_and(|error| Failure::of(error) == Failure::OutcomeUnknown)
    {
        lane.connection.fail();
    }
    acked
}

/// Answers the writes still queued if the task sending `WAIT`s stops
/// before its time (a panic, a runtime shutting down): their replication
/// is unknown, and the next write starts another task.
struct Abandoned<'a> {
    node: &'a NodeAddr,
    lane: &'a Lane,
    ended: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        for waiter in self.lane.abandon() {
            waiter.answer(Err(Error::ReplicationUnknown {
                node: self.node.clone(),
                source: RedisError::from(std::io::Error::other("the task sending WAITs stopped")),
            }));
        }
    }
}
