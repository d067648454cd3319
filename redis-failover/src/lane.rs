//! A master's connection for durable writes and the writes waiting for its
//! next `WAIT` ([`crate::group_commit`] sends them).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::Error;
use crate::node::Connection;

/// The connection durable writes go over, and those waiting for a `WAIT`.
pub(crate) struct Lane {
    pub(crate) connection: Arc<Connection>,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Whether a task is sending `WAIT`s.
    running: bool,
    waiting: Vec<Waiter>,
}

/// A write whose reply is in, waiting for a `WAIT` sent after it.
pub(crate) struct Waiter {
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
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
        })
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
    pub(crate) fn join(
        &self,
        replicas: u32,
        timeout: Duration,
    ) -> (oneshot::Receiver<Result<(), Error>>, bool) {
        let (done, outcome) = oneshot::channel();
        let mut queue = self.queue();
        queue.waiting.push(Waiter {
            replicas,
            timeout,
            done,
        });
        let start = !std::mem::replace(&mut queue.running, true);
        (outcome, start)
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
