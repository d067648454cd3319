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
//! enough replicas, as when each write sent its own.
//!
//! The `WAIT`s are sent by a task spawned when a write finds none running,
//! which ends when no write waits: nothing runs while no durable write is
//! under way; if it stops before its time (a panic, a runtime shutting
//! down), the writes it leaves learn that their replication is unknown. A
//! lane that fails is replaced; the writes that were sent on it learn that
//! their replication is unknown (the `WAIT` of another connection would
//! not count their writes).

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;

use crate::dedicated::all_failed;
use crate::durable::{acked_replicas, replication_outcome, wait_command};
use crate::error::Error;
use crate::events::Counter;
use crate::lane::Lane;
use crate::node::Connection;
use crate::request::{Request, Sent};
use crate::retry::{Failure, refusal_of};
use crate::shared::Shared;
use crate::state::Master;

/// A lane idle for this long answers a `PING` before it takes a write.
const IDLE_CHECK: Duration = Duration::from_secs(10);

impl Shared {
    /// `master`'s lane, opened if it has none or it failed (opening proves
    /// the node is still the master), or why there is none (as the retry
    /// loop takes it). One idle for long is checked first: a connection
    /// closed meanwhile would fail a write that was never sent as one that
    /// may have run.
    pub(crate) async fn lane(&self, master: &Master) -> Result<Arc<Lane>, Sent> {
        if let Some(lane) = master.lane.load_full().filter(|lane| !lane.has_failed())
            && (lane.idle_then_used() < IDLE_CHECK || self.answers(&lane).await)
        {
            return Ok(lane);
        }
        let _opening = master.lane_opening.lock().await;
        if let Some(lane) = master.lane.load_full().filter(|lane| !lane.has_failed()) {
            return Ok(lane);
        }
        let connection = master.opener.connect().await.map_err(|error| {
            match refusal_of(&error) {
                // A refusal (the node is no master any more) stays a refusal.
                Some(_) => Sent::Failed(error),
                None => Sent::Unreachable(format!(
                    "could not open the connection of durable writes: {error}"
                )),
            }
        })?;
        let lane = Lane::new(Connection::new(connection));
        master.lane.store(Some(Arc::clone(&lane)));
        Ok(lane)
    }

    /// Whether `lane` answers a `PING`; marked failed if not.
    async fn answers(&self, lane: &Lane) -> bool {
        let mut connection = lane.connection.multiplexed.clone();
        connection.set_response_timeout(self.settings.command_timeout);
        let pong: redis::RedisResult<String> =
            redis::cmd("PING").query_async(&mut connection).await;
        if pong.is_err() {
            lane.connection.fail();
        }
        pong.is_ok()
    }

    /// Sends a durable write on `master`'s lane, and once it ran, waits
    /// for a `WAIT` to count `replicas` of it.
    pub(crate) async fn send_durable(
        self: &Arc<Self>,
        master: &Arc<Master>,
        request: Request<'_>,
        idempotent: bool,
        (replicas, timeout): (u32, Duration),
    ) -> Sent {
        let lane = match self.lane(master).await {
            Ok(lane) => lane,
            Err(sent) => return sent,
        };
        let mut connection = lane.connection.multiplexed.clone();
        // A write may wait behind the lane's `WAIT` before it runs.
        let patience = lane.patience(timeout);
        connection.set_response_timeout(patience.saturating_add(self.settings.command_timeout));
        let reply = match request.send(&mut connection).await {
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
        match self.next_wait(master, &lane, replicas, timeout).await {
            Ok(()) => Sent::Done(reply),
            Err(error) => Sent::Unreplicated(error),
        }
    }

    /// Waits for the next `WAIT` on `lane` (starting the task that sends
    /// them if none runs), and says whether it counted `replicas`.
    async fn next_wait(
        self: &Arc<Self>,
        master: &Arc<Master>,
        lane: &Arc<Lane>,
        replicas: u32,
        timeout: Duration,
    ) -> Result<(), Error> {
        let (replicated, start) = lane.join(replicas, timeout);
        if start {
            let (shared, master, lane) = (Arc::clone(self), Arc::clone(master), Arc::clone(lane));
            tokio::spawn(async move { shared.send_waits(&master, &lane).await });
        }
        replicated.await.unwrap_or_else(|_| {
            // The task stopped with this write's batch in hand (a panic, a
            // runtime shutting down).
            Err(Error::ReplicationUnknown {
                node: master.node.clone(),
                source: RedisError::from(std::io::Error::other("the WAIT task ended")),
            })
        })
    }

    /// Sends a `WAIT` for the writes waiting on `lane`, answers them, and
    /// again while writes wait.
    async fn send_waits(&self, master: &Master, lane: &Lane) {
        let mut stopping = Abandoned {
            master,
            lane,
            ended: false,
        };
        while let Some(batch) = lane.waiting() {
            let replicas = batch.iter().map(|w| w.replicas).max().unwrap_or(0);
            let timeout = batch.iter().map(|w| w.timeout).max().unwrap_or_default();
            let acked = self.send_wait(lane, replicas, timeout).await;
            if !acked.as_ref().is_ok_and(|acked| *acked >= replicas) {
                master.replicas.forget_count();
            }
            for waiter in batch {
                let result =
                    replication_outcome(&master.node, &acked, waiter.replicas, waiter.timeout);
                if result.is_err() {
                    self.telemetry.add(Counter::UnreplicatedWrites);
                }
                waiter.answer(result);
            }
        }
        // Ended as it should: nothing waits, and the next write starts again.
        stopping.ended = true;
    }

    /// `WAIT replicas timeout` on the lane: the replicas that have every
    /// write sent on it so far.
    async fn send_wait(
        &self,
        lane: &Lane,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32, RedisError> {
        if lane.has_failed() {
            return Err(RedisError::from(std::io::Error::other(
                "the connection of durable writes failed",
            )));
        }
        let mut connection = lane.connection.multiplexed.clone();
        connection.set_response_timeout(timeout.saturating_add(self.settings.command_timeout));
        let acked = wait_command(replicas, timeout)
            .query_async::<redis::Value>(&mut connection)
            .await
            .and_then(acked_replicas);
        if acked
            .as_ref()
            .is_err_and(|error| Failure::of(error) == Failure::OutcomeUnknown)
        {
            lane.connection.fail();
        }
        acked
    }
}

/// Answers the writes still queued if the task sending `WAIT`s stops
/// before its time (a panic, a runtime shutting down): their replication
/// is unknown, and the next write starts another task.
struct Abandoned<'a> {
    master: &'a Master,
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
                node: self.master.node.clone(),
                source: RedisError::from(std::io::Error::other("the task sending WAITs stopped")),
            }));
        }
    }
}
