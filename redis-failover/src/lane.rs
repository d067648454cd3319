//! A master's connection for durable writes and the writes waiting for its
//! next `WAIT` ([`crate::group_commit`] sends them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::oneshot;

use crate::durable::Ack;
use crate::error::Error;
use crate::node::Connection;

/// Where a node's lane is kept: none before its first durable write, and
/// a new one once it failed.
#[derive(Default)]
pub(crate) struct LaneSlot {
    pub(crate) current: ArcSwapOption<Lane>,
    /// Held while a lane is opened, so that it is opened once.
    pub(crate) opening: tokio::sync::Mutex<()>,
}

/// The connection durable writes go over, and those waiting for a `WAIT`.
pub(crate) struct Lane {
    pub(crate) connection: Arc<Connection>,
    queue: Mutex<Queue>,
    opened: Instant,
    /// Ms after `opened` that the lane was last used.
    used: AtomicU64,
    /// The longest `WAIT` asked for on it, in ms.
    longest_wait: AtomicU64,
}

#[derive(Default)]
struct Queue {
    /// Whether a task is sending `WAIT`s.
    running: bool,
    waiting: Vec<Waiter>,
}

/// A write whose reply is in, waiting for a `WAIT` (or `WAITAOF`) sent
/// after it.
pub(crate) struct Waiter {
    pub(crate) ack: Ack,
    done: oneshot::Sender<Result<(), Error>>,
}

impl Waiter {
    /// Tells the write how its `WAIT` went (unheard if its caller gave up).
    pub(crate) fn answer(self, result: Result<(), Error>) {
        let _ = self.done.send(result);
    }
}

impl Lane {
    pub(crate) fn new(connection: Arc<Connection>) -> Arc<Self> {
        Arc::new(Self {
            connection,
            queue: Mutex::default(),
            opened: Instant::now(),
            used: AtomicU64::new(0),
            longest_wait: AtomicU64::new(0),
        })
    }

    /// How long a write on the lane may take to answer, besides the
    /// command timeout: it may run only once the `WAIT` ahead of it is
    /// answered, and a `WAIT` asks for the longest timeout of its writes.
    pub(crate) fn patience(&self, timeout: Duration) -> Duration {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let longest = self.longest_wait.fetch_max(ms, Ordering::Relaxed).max(ms);
        Duration::from_millis(longest)
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

    /// Queues a write for the next `WAIT`: where its outcome comes, and
    /// whether the caller must start the task sending them (none runs).
    pub(crate) fn join(&self, ack: Ack) -> (oneshot::Receiver<Result<(), Error>>, bool) {
        let (done, outcome) = oneshot::channel();
        let mut queue = self.queue();
        queue.waiting.push(Waiter { ack, done });
        let start = !std::mem::replace(&mut queue.running, true);
        (outcome, start)
    }

    /// The writes waiting, taken from the queue, as the task sending the
    /// `WAIT`s stops before its time (a panic, a runtime shutting down):
    /// the next write starts another.
    pub(crate) fn abandon(&self) -> Vec<Waiter> {
        let mut queue = self.queue();
        queue.running = false;
        std::mem::take(&mut queue.waiting)
    }

    /// The writes waiting for a `WAIT`; none when there are none, and the
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
