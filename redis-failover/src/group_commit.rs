//! Durable writes that share their `WAIT`s (group commit).
//!
//! `WAIT` counts the replicas that have every write its own connection
//! sent before it. So durable writes go to the master over one multiplexed
//! connection of their own, its *lane*, in batches: a task takes the
//! writes waiting and sends them, then one `WAIT`, as one pipeline; the
//! writes handed over meanwhile make the next batch. One `WAIT` answers for
//! every write of its batch, and a write is acknowledged only when the
//! `WAIT` sent after it counted enough replicas, as when each write sent
//! its own. Persisted writes ([`Durability::Persisted`](crate::Durability::Persisted))
//! share a `WAITAOF` the same way: a batch holding both kinds ends with
//! one `WAIT` for the replicated ones and one `WAITAOF` for the persisted
//! ones, each asking for the most any of its writes asks.
//!
//! Why the task sends the writes too: a write sent by its caller is known
//! to be ahead of a `WAIT` only once its reply is in, so it waited for the
//! `WAIT` after that, two to three `WAIT`s in all where a batch waits for
//! one to two (the batch in flight, then its own). Redis holds the lane
//! while a `WAIT` waits, so one batch at a time loses nothing.
//!
//! The task is spawned when a write finds none running, and ends when no
//! write waits: nothing runs while no durable write is under way. A write
//! whose caller gave up before its batch is not sent. If the task stops
//! before its time (a panic, a runtime shutting down), the writes it had
//! not sent learn so, and those of the batch in flight that they may have
//! run. A lane that fails is replaced; the writes of a batch that failed
//! learn that they may have run, and those queued behind it that they were
//! not sent (their callers try again).
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
use crate::events::{Counter, Telemetry};
use crate::lane::{Lane, LaneSlot, Outcome, Waiter};
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
    /// Sends a durable write in the next batch on `master`'s lane, and
    /// says whether the batch's `WAIT` (or `WAITAOF`) counted what `ack`
    /// asks.
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

/// Sends a durable write in the next batch on `host`'s lane (after
/// `ASKING` when `asking`: a cluster's `ASK` redirect), and says whether
/// the batch's `WAIT` (or `WAITAOF`) counted what `ack` asks.
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
    let (outcome, start) = lane.join(request.commands(asking), ack);
    if start {
        // The guard goes with the task, even one dropped unpolled.
        let stopping = Abandoned {
            lane: Arc::clone(&lane),
            ended: false,
        };
        tokio::spawn(send_batches(Arc::clone(host), stopping));
    }
    let (reply, replicated) = match outcome.await {
        Ok(Outcome::Ran(reply, replicated)) => (reply, replicated),
        Ok(Outcome::Failed(error)) => return Sent::Failed(error),
        Ok(Outcome::NotSent(why)) => return Sent::Unreachable(why.to_owned()),
        // The task stopped with this write's batch in hand (a panic, a
        // runtime shutting down): it may have run.
        Err(_) => return Sent::Failed(outcome_unknown("the task sending durable writes ended")),
    };
    if let Some((refusal, _)) = request.refusal(&reply, idempotent) {
        return Sent::Failed(refusal);
    }
    match replicated {
        Ok(()) => Sent::Done(reply),
        // No write ran: the wait's shortfall does not concern it.
        Err(_) if all_failed(&reply) => Sent::Done(reply),
        Err(error) => {
            host.telemetry().add(Counter::UnreplicatedWrites);
            Sent::Unreplicated(error)
        }
    }
}

/// An error that leaves a write's outcome unknown, as a lost connection.
fn outcome_unknown(what: &str) -> RedisError {
    RedisError::from(std::io::Error::other(what.to_owned()))
}

/// Sends the writes waiting on `stopping`'s lane and their wait as one
/// batch, answers them, and again while writes wait.
async fn send_batches<H: LaneHost>(host: Arc<H>, mut stopping: Abandoned) {
    let lane = Arc::clone(&stopping.lane);
    while let Some(batch) = lane.waiting() {
        let batch: Vec<Waiter> = batch.into_iter().filter(|w| !w.given_up()).collect();
        if !batch.is_empty() {
            send_batch(host.as_ref(), &lane, batch).await;
        }
    }
    // Ended as it should: nothing waits, and the next write starts again.
    stopping.ended = true;
}

/// Sends `batch`'s writes, in order, then a `WAIT` for the replicated
/// ones and a `WAITAOF` for the persisted ones (each asking for the most
/// any of its writes asks), in one pipeline; answers each write with its
/// reply and what the wait of its kind counted, by its own ask.
async fn send_batch<H: LaneHost>(host: &H, lane: &Lane, mut batch: Vec<Waiter>) {
    if lane.has_failed() {
        // A batch before failed: these were never sent (their callers try
        // again, on a new lane).
        for waiter in batch {
            waiter.answer(Outcome::NotSent("the connection of durable writes failed"));
        }
        return;
    }
    // A wait of each kind the batch holds writes of: `WAIT`, `WAITAOF`.
    let waits = [false, true].map(|persisted| {
        batch
            .iter()
            .map(|w| w.ack)
            .filter(|ack| ack.aof.is_some() == persisted)
            .reduce(Ack::merge)
    });
    let sent: Vec<Ack> = waits.iter().flatten().copied().collect();
    let mut pipeline = redis::pipe();
    for waiter in &mut batch {
        for cmd in std::mem::take(&mut waiter.commands.cmds) {
            pipeline.add_command(cmd);
        }
    }
    for ack in &sent {
        pipeline.add_command(ack.command());
    }
    // The waits run one after the other.
    let waiting = sent
        .iter()
        .map(|ack| ack.timeout)
        .fold(Duration::ZERO, Duration::saturating_add);
    let mut values = match send_pipeline(host, lane, &pipeline, waiting).await {
        Ok(values) => values,
        Err(error) => {
            for waiter in batch {
                waiter.answer(Outcome::Failed(error.clone()));
            }
            return;
        }
    };
    let mut wait_replies = values.split_off(values.len() - sent.len()).into_iter();
    let counted = waits.map(|ack| {
        let ack = ack?;
        let acked = ack.acked(wait_replies.next()?);
        host.wait_answered(ack, &acked);
        Some(acked)
    });
    let mut values = values.into_iter();
    for waiter in batch {
        let (shape, ack) = (waiter.commands.shape, waiter.ack);
        let own: Vec<_> = values.by_ref().take(shape.replies).collect();
        // The batch holds a wait of each kind it holds writes of.
        let acked = &counted[usize::from(ack.aof.is_some())];
        let outcome = match (shape.reply(own), acked) {
            (Ok(reply), Some(acked)) => Outcome::Ran(reply, ack.outcome(host.node(), acked)),
            (Err(error), _) => Outcome::Failed(error),
            (Ok(_), None) => Outcome::Failed(outcome_unknown("no wait in the batch")),
        };
        waiter.answer(outcome);
    }
}

/// Sends `pipeline` on the lane, waits included, and returns a reply for
/// each of its commands; a lane that fails with the outcome unknown sends
/// nothing more.
async fn send_pipeline<H: LaneHost>(
    host: &H,
    lane: &Lane,
    pipeline: &redis::Pipeline,
    waiting: Duration,
) -> Result<Vec<redis::Value>, RedisError> {
    let mut connection = lane.connection.multiplexed.clone();
    connection.set_response_timeout(waiting.saturating_add(host.command_timeout()));
    let sent = connection
        .send_packed_commands(pipeline, 0, pipeline.len())
        .await
        .and_then(|values| {
            if values.len() == pipeline.len() {
                Ok(values)
            } else {
                Err(outcome_unknown(
                    "a reply count other than the commands sent",
                ))
            }
        });
    if sent
        .as_ref()
        .is_err_and(|error| Failure::of(error) == Failure::OutcomeUnknown)
    {
        lane.connection.fail();
    }
    sent
}

/// Answers the writes still queued if the task sending batches stops
/// before its time (a panic, a runtime shutting down, even before it first
/// ran): they were not sent, and the next write starts another task.
struct Abandoned {
    lane: Arc<Lane>,
    ended: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        for waiter in self.lane.abandon() {
            waiter.answer(Outcome::NotSent("the task sending durable writes stopped"));
        }
    }
}
