//! A master's connection for durable writes and the writes waiting for its
//! next batch ([`crate::group_commit`] sends them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::RedisError;
use tokio::sync::oneshot;

use crate::durable::Ack;
use crate::error::Error;
use crate::node::Connection;
use crate::request::{Commands, Reply};

/// Where a node's lane is kept: none before its first durable write, and
/// a new one once it failed.
#[derive(Default)]
pub(crate) struct LaneSlot {
    pub(crate) current: ArcSwapOption<Lane>,
    /// Held while a lane is opened, so that it is opened once.
    pub(crate) opening: tokio::sync::Mutex<()>,
}

/// The connection durable writes go over, and those waiting to be sent.
pub(crate) struct Lane {
    pub(crate) connection: Arc<Connection>,
    queue: Mutex<Queue>,
    opened: Instant,
    /// Ms after `opened` that the lane was last used.
    used: AtomicU64,
}

#[derive(Default)]
struct Queue {
    /// Whether a task is sending batches.
    running: bool,
    waiting: Vec<Waiter>,
}

/// A durable write waiting for the next batch, which sends it ahead of the
/// batch's `WAIT` (or `WAITAOF`).
pub(crate) struct Waiter {
    pub(crate) commands: Commands,
    pub(crate) ack: Ack,
    done: oneshot::Sender<Outcome>,
}

/// What became of a write handed to the lane.
pub(crate) enum Outcome {
    /// Sent in a batch: its reply, and whether the batch's wait counted
    /// what it asks.
    Ran(Reply, Result<(), Error>),
    /// Failed with this error: its batch's (the write may have run), or
    /// its own (a transaction refused as it was queued, which did not).
    Failed(RedisError),
    /// Never sent (why): the lane failed before its batch, or the task
    /// sending batches stopped before its time.
    NotSent(&'static str),
}

impl Waiter {
    /// Whether its caller gave up: it need not be sent.
    pub(crate) fn given_up(&self) -> bool {
        self.done.is_closed()
    }

    /// Tells the write what became of it (unheard if its caller gave up).
    pub(crate) fn answer(self, outcome: Outcome) {
        let _ = self.done.send(outcome);
    }
}

impl Lane {
    pub(crate) fn new(connection: Arc<Connection>) -> Arc<Self> {
        Arc::new(Self {
            connection,
            queue: Mutex::default(),
            opened: Instant::now(),
            used: AtomicU64::new(0),
        })
    }

    /// How long since the lane was last used; and it is used now.
    pub(crate) fn idle_then_used(&self) -> Duration {
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(now.saturating_sub(self.used.swap(now, Ordering::Relaxed)))
    }

    /// The queue, going on after a panic elsewhere (it stays valid).
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.connection.has_failed()
    }

    /// Queues a write for the next batch: where its outcome comes, and
    /// whether the caller must start the task sending them (none runs).
    pub(crate) fn join(&self, commands: Commands, ack: Ack) -> (oneshot::Receiver<Outcome>, bool) {
        let (done, outcome) = oneshot::channel();
        let mut queue = self.queue();
        queue.waiting.push(Waiter {
            commands,
            ack,
            done,
        });
        let start = !std::mem::replace(&mut queue.running, true);
        (outcome, start)
    }

    /// The writes waiting, taken from the queue, as the task sending the
    /// batches stops before its time (a panic, a runtime shutting down):
    /// the next write starts another.
    pub(crate) fn abandon(&self) -> Vec<Waiter> {
        let mut queue = self.queue();
        queue.running = false;
        std::mem::take(&mut queue.waiting)
    }

    /// The writes waiting to be sent; none when there are none, and the
    /// task sending them must end (the next write starts another).
    pub(crate) fn waiting(&self) -> Option<Vec<Waiter>> {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            queue.running = false;
            return None;
        }
        Some(std::mem::take(&mut queue.waiting))
    }
}
