//! Read-your-writes sessions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::{Cmd, FromRedisValue, Role};

use crate::backend::Backend;
use crate::client::{FailoverClient, convert};
use crate::error::{Error, Result};
use crate::request::{Reply, Request};
use crate::routing::Durability;

/// A sequence of requests whose reads see the session's own writes, even
/// when they are routed to replicas.
///
/// After each write the session records the master's replication offset
/// (a `ROLE` pipelined behind the write). A read on a replica is
/// sent behind a `ROLE` on the same connection (pipelined with a single
/// command; a round trip ahead of a pipeline): the reply counts only if the
/// replica had applied the recorded offset, else the read goes to the
/// master (or, with [`ReadPolicy::Replica`](crate::ReadPolicy::Replica) and
/// [`RoundRobin`](crate::ReadPolicy::RoundRobin), is retried on replicas
/// within the retry budget). Reads on the master need no check.
///
/// The guarantee holds while the master lives. A failover keeps offsets
/// comparable (replicas continue the master's replication history), but a
/// write that was lost with the old master cannot be read back anywhere.
/// If the offset cannot be read after a write, the session reads from the
/// master from then on. A write whose outcome is unknown
/// ([`Error::OutcomeUnknown`]) is not tracked.
///
/// On a cluster client ([`FailoverClient::cluster`]) a session's writes
/// record no offset and its reads go to the masters of their slots, which
/// are never stale, whatever the read policy.
///
/// Cheap to clone; clones share the position. The position can travel
/// (say, in a cookie) and resume the session elsewhere with
/// [`FailoverClient::session_after`].
#[derive(Clone, Debug)]
pub struct Session {
    client: FailoverClient,
    position: Arc<AtomicU64>,
}

impl Session {
    pub(crate) fn new(client: FailoverClient, position: u64) -> Self {
        Self {
            client,
            position: Arc::new(AtomicU64::new(position)),
        }
    }

    /// The master replication offset the session's reads must reach.
    #[must_use]
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }

    /// Sends the write `cmd` like [`FailoverClient::query`] and records the
    /// master's offset after it, from a `ROLE` pipelined behind it.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let Backend::Replicated(shared) = self.client.backend() else {
            // A cluster client reads from masters: its reads see its writes.
            return self.client.query(cmd).await;
        };
        let mut pipeline = redis::pipe();
        pipeline.add_command(cmd.clone()).cmd("ROLE");
        let request = Request::Pipeline {
            pipeline: &pipeline,
            offset: 0,
            count: 2,
        };
        // Boxed, as in `FailoverClient::query`: the retry loop is deep.
        let executed = Box::pin(shared.execute(request, false, self.client.durability())).await;
        let (master, reply) = match executed {
            Ok(done) => done,
            Err(error @ (Error::NotReplicated { .. } | Error::ReplicationUnknown { .. })) => {
                // The write ran, though not durably: later reads must see it.
                let role = redis::cmd("ROLE");
                let offset = match shared
                    .execute(Request::Command(&role), false, Durability::Master)
                    .await
                {
                    Ok((_, Reply::Value(value))) => master_offset(value),
                    _ => u64::MAX,
                };
                self.position.fetch_max(offset, Ordering::AcqRel);
                return Err(error);
            }
            Err(other) => return Err(other),
        };
        let Reply::Values(mut values) = reply else {
            unreachable!("a pipeline gets a list of replies")
        };
        let offset = values.pop().map_or(u64::MAX, master_offset);
        self.position.fetch_max(offset, Ordering::AcqRel);
        let reply = values.pop().unwrap_or(redis::Value::Nil);
        convert(&master.node, Reply::Value(reply))
    }

    /// Sends the read-only `cmd` by the client's read policy, to a node that
    /// has the session's writes.
    pub async fn read<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let reading = self
            .client
            .send_read(Request::Command(cmd), Some(self.position()));
        let (node, reply) = reading.await?;
        convert(&node, reply)
    }

    /// `GET key` within the session.
    pub async fn get<T: FromRedisValue>(&self, key: &str) -> Result<T> {
        self.read(redis::cmd("GET").arg(key)).await
    }

    /// `SET key value` within the session.
    pub async fn set(&self, key: &str, value: impl redis::ToRedisArgs + Send + Sync) -> Result<()> {
        self.query(redis::cmd("SET").arg(key).arg(value)).await
    }
}

impl FailoverClient {
    /// A session whose reads see its own writes (see [`Session`]).
    #[must_use]
    pub fn session(&self) -> Session {
        Session::new(self.clone(), 0)
    }

    /// Resumes a session from its [`Session::position`], for example one
    /// carried by another process in a request header.
    #[must_use]
    pub fn session_after(&self, position: u64) -> Session {
        Session::new(self.clone(), position)
    }
}

/// The replication offset in a master's `ROLE` reply; when unknown,
/// `u64::MAX`, which only the master is sure to have.
fn master_offset(role: redis::Value) -> u64 {
    match Role::from_redis_value(role) {
        Ok(Role::Primary {
            replication_offset, ..
        }) => replication_offset,
        _ => u64::MAX,
    }
}
