//! Reads routed by policy over the master and its replicas, sessions that
//! read their own writes, and how many replicas a write needs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use redis::{RedisError, Value};

use crate::addr::NodeAddr;
use crate::error::{Error, NodeFailure, Result};
use crate::events::Counter;
use crate::policy::{Decision, GaveUp, Tried, Tries};
use crate::replicas::{ReadReplica, ReadSet};
use crate::request::{Reply, Request};
use crate::retry::Failure;
use crate::shared::{Connection, Shared};

/// Where a read goes.
///
/// A replica qualifies when it replicates the current master, its link to
/// the master is up, it answers, and it is within
/// [`max_staleness`](crate::FailoverClientBuilder::max_staleness). Replicas
/// chosen by [`prefer_replicas`](crate::FailoverClientBuilder::prefer_replicas)
/// are tried before the others. A read that fails on a replica (connection
/// lost, `LOADING`, ...) is tried on the next one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReadPolicy {
    /// Only the master, with the full failover handling of writes. This is
    /// the default.
    #[default]
    Master,
    /// The master; a replica when no master is known or the master fails
    /// this read.
    MasterPreferred,
    /// A random qualifying replica; [`Error::NoReplicaAvailable`] when none
    /// qualifies.
    Replica,
    /// A random qualifying replica; the master when none qualifies.
    ReplicaPreferred,
    /// The node (master or qualifying replica) with the lowest round-trip
    /// time, as measured by the replica probes (a moving average, updated
    /// every probe interval).
    Nearest,
    /// The qualifying replicas in turn; [`Error::NoReplicaAvailable`] when
    /// none qualifies.
    RoundRobin,
}

impl ReadPolicy {
    fn may_use_master(self) -> bool {
        !matches!(self, Self::Replica | Self::RoundRobin)
    }
}

/// How many nodes must have a write before it counts as done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Durability {
    /// The master's reply is enough. A failover may lose the write if no
    /// replica had it yet. This is the default.
    #[default]
    Master,
    /// After the write, `WAIT replicas timeout` on the same connection. Fewer
    /// acknowledgements than asked give [`Error::NotReplicated`]: the write
    /// ran on the master and is not undone, but may not survive a failover.
    /// On a master that is new, or whose last `WAIT` fell short, the
    /// replicas online are counted first (`INFO replication`): while fewer
    /// than `replicas`, the write waits without running, within the retry
    /// budget. Each durable write holds a connection of its own until its
    /// `WAIT` returns (see
    /// [`dedicated_connections`](crate::FailoverClientBuilder::dedicated_connections)).
    Replicated {
        /// How many replicas must acknowledge the write (at least 1).
        replicas: u32,
        /// How long to wait for them (more than zero).
        timeout: Duration,
    },
}

impl Durability {
    pub(crate) fn validate(self) -> Result<()> {
        match self {
            Self::Replicated { replicas, timeout } if replicas == 0 || timeout.is_zero() => {
                Err(Error::InvalidConfig {
                    setting: "durability",
                    reason: "Replicated needs at least one replica and a timeout above zero"
                        .to_owned(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// The user's choice of replicas to try first.
#[derive(Clone)]
pub(crate) struct ReplicaPreference(pub(crate) Arc<dyn Fn(&NodeAddr) -> bool + Send + Sync>);

impl std::fmt::Debug for ReplicaPreference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaPreference(..)")
    }
}

/// Where one read will be tried, in order.
struct Plan<'a> {
    /// Try the master once before any replica (`MasterPreferred`).
    master_first: bool,
    replicas: Vec<&'a ReadReplica>,
    /// The replicas left out.
    unusable: Vec<&'a ReadReplica>,
    /// Send to the master (with the full retry handling) when no replica served.
    master_last: bool,
}

/// The outcome of a read sent to one replica.
enum Attempt {
    Served(Reply),
    /// The replica has not replicated the session's writes yet.
    Behind,
    Failed(String),
    /// The replica answered with an error that is the caller's.
    Final(RedisError),
}

impl Shared {
    fn plan<'a>(&self, set: &'a ReadSet, policy: ReadPolicy) -> Plan<'a> {
        let now = Instant::now();
        let max_staleness = self.settings.max_staleness;
        let (mut replicas, unusable): (Vec<&ReadReplica>, Vec<&ReadReplica>) = set
            .replicas
            .iter()
            .partition(|r| r.unusable(now, max_staleness).is_none());
        match policy {
            ReadPolicy::RoundRobin if !replicas.is_empty() => {
                let next = self.round_robin.fetch_add(1, Ordering::Relaxed) % replicas.len();
                replicas.rotate_left(next);
            }
            ReadPolicy::Nearest => replicas.sort_by_key(|r| r.latency.unwrap_or(Duration::MAX)),
            _ => replicas.shuffle(&mut rand::rng()),
        }
        if let Some(prefer) = &self.settings.replica_preference {
            // A stable sort keeps the policy's order within each group.
            replicas.sort_by_key(|r| !(prefer.0)(&r.node));
        }
        let master_is_nearest = policy == ReadPolicy::Nearest
            && set.master_latency.is_some_and(|master| {
                replicas
                    .first()
                    .and_then(|r| r.latency)
                    .is_none_or(|replica| master <= replica)
            });
        if master_is_nearest {
            replicas.clear();
        }
        Plan {
            master_first: policy == ReadPolicy::MasterPreferred,
            replicas,
            unusable,
            master_last: policy.may_use_master(),
        }
    }

    /// Sends a read-only `request` where `policy` says; with `session`, only
    /// to a node that has replicated up to that master offset. Returns the
    /// node that answered with its reply.
    pub(crate) async fn read(
        self: &Arc<Self>,
        request: Request<'_>,
        policy: ReadPolicy,
        session: Option<u64>,
    ) -> Result<(NodeAddr, Reply)> {
        if policy == ReadPolicy::Master {
            return self.read_from_master(request).await;
        }
        if !request.is_read_only() {
            return Err(Error::NotReadOnly {
                command: request.describe(),
            });
        }
        if request.blocking().is_some() {
            // Replicas share one connection each: a blocking read
            // (`XREAD BLOCK`) waits on a master connection of its own.
            return self.read_from_master(request).await;
        }
        if session == Some(u64::MAX) && !policy.may_use_master() {
            // A write of the session left no offset (`ROLE` failed): no
            // replica can prove it has it.
            let failures = self
                .read_set
                .load()
                .replicas
                .iter()
                .map(|replica| NodeFailure {
                    node: replica.node.clone(),
                    reason: "the session's position is unknown".to_owned(),
                })
                .collect();
            return Err(Error::NoReplicaAvailable { failures });
        }
        self.track_replicas();
        if *self.probe_rounds.borrow() == 0 {
            // Just started: the first round tells which replicas qualify.
            let first_round = self.settings.connect_timeout + self.settings.command_timeout;
            let mut rounds = self.probe_rounds.subscribe();
            let _ = tokio::time::timeout(first_round, rounds.wait_for(|n| *n > 0)).await;
        }
        let policy_of_retries = self.settings.retry_policy();
        let mut tries = Tries::new();
        let mut failures: Vec<NodeFailure> = Vec::new();
        let mut failed =
            |node: &NodeAddr, reason: String| match failures.iter_mut().find(|f| f.node == *node) {
                Some(known) => known.reason = reason,
                None => failures.push(NodeFailure {
                    node: node.clone(),
                    reason,
                }),
            };
        loop {
            let set = self.read_set.load_full();
            let plan = self.plan(&set, policy);
            if plan.master_first
                && let Some(served) = self.try_master_once(request).await
            {
                return served;
            }
            let mut behind = false;
            for replica in &plan.replicas {
                match self.read_from_replica(replica, request, session).await {
                    Attempt::Served(reply) => {
                        self.metrics.add(Counter::ReplicaReads);
                        return Ok((replica.node.clone(), reply));
                    }
                    Attempt::Behind => {
                        self.metrics.add(Counter::SessionFallbacks);
                        behind = true;
                        if plan.master_last {
                            break;
                        }
                    }
                    Attempt::Failed(reason) => failed(&replica.node, reason),
                    Attempt::Final(source) => {
                        return Err(Error::Command {
                            node: replica.node.clone(),
                            source,
                        });
                    }
                }
            }
            if plan.master_last {
                return self.read_from_master(request).await;
            }
            // Replicas only: a session waits (within the budget) for one to
            // catch up; anything else is final.
            let decision = if behind {
                policy_of_retries.decide(&mut tries, Tried::Held)
            } else {
                Decision::GiveUp(GaveUp::Budget)
            };
            if let Decision::Retry(wait) = decision {
                tokio::time::sleep(wait).await;
            } else {
                let now = Instant::now();
                for replica in plan.unusable {
                    if let Some(reason) = replica.unusable(now, self.settings.max_staleness) {
                        failed(&replica.node, reason.to_string());
                    }
                }
                return Err(Error::NoReplicaAvailable { failures });
            }
        }
    }

    /// A read on the master with the full retry handling. Not declared
    /// idempotent: with `ReadPolicy::Master` any command may come here, and
    /// read-only ones are resent anyway.
    async fn read_from_master(self: &Arc<Self>, request: Request<'_>) -> Result<(NodeAddr, Reply)> {
        self.metrics.add(Counter::MasterReads);
        let (master, reply) = self.execute(request, false, Durability::Master).await?;
        Ok((master.node.clone(), reply))
    }

    /// One try on the current master, without waiting for a new one: `None`
    /// when it is unknown or failed (a failed connection starts a discovery).
    async fn try_master_once(
        self: &Arc<Self>,
        request: Request<'_>,
    ) -> Option<Result<(NodeAddr, Reply)>> {
        let master = self.master.load_full()?;
        let connection = master.connection.load_full();
        if connection.failed.load(Ordering::Acquire) {
            return None;
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        match request.send(&mut connection.multiplexed.clone()).await {
            Ok(reply) if request.refusal(&reply, true).is_none() => {
                self.metrics.add(Counter::MasterReads);
                Some(Ok((master.node.clone(), reply)))
            }
            Ok(_) => None,
            Err(error) => match Failure::of(&error) {
                Failure::Final => Some(Err(Error::Command {
                    node: master.node.clone(),
                    source: error,
                })),
                Failure::NotExecuted => None,
                Failure::OutcomeUnknown => {
                    connection.failed.store(true, Ordering::Release);
                    let trigger = crate::events::Trigger::ConnectionLost;
                    self.rediscover_in_background(epoch, trigger, Arc::clone(&master));
                    None
                }
            },
        }
    }

    async fn read_from_replica(
        &self,
        replica: &ReadReplica,
        request: Request<'_>,
        session: Option<u64>,
    ) -> Attempt {
        let Some(connection) = &replica.connection else {
            return Attempt::Failed("no connection".to_owned());
        };
        let mut multiplexed = connection.multiplexed.clone();
        // With a session, ROLE goes first on the same connection: the
        // replica applies the replication stream in order, so a read that
        // follows ROLE sees at least the offset ROLE reported.
        let sent = match (session, request) {
            (None, request) => request.send(&mut multiplexed).await,
            (Some(offset), Request::Command(cmd)) => {
                let mut pipeline = redis::pipe();
                pipeline.cmd("ROLE").add_command(cmd.clone());
                match multiplexed.send_packed_commands(&pipeline, 0, 2).await {
                    Ok(mut values) if values.len() == 2 => {
                        let reply = values.pop().expect("two replies");
                        if let Value::ServerError(error) = &values[0] {
                            return Attempt::Failed(format!("ROLE failed: {error:?}"));
                        }
                        if applied_offset(&values[0]).is_none_or(|applied| applied < offset) {
                            return Attempt::Behind;
                        }
                        Ok(Reply::Value(reply))
                    }
                    Ok(_) => {
                        return Attempt::Failed("ROLE and the read got no two replies".to_owned());
                    }
                    Err(error) => Err(error),
                }
            }
            (Some(offset), request) => {
                match redis::cmd("ROLE")
                    .query_async::<Value>(&mut multiplexed)
                    .await
                {
                    Ok(role) if applied_offset(&role).is_some_and(|a| a >= offset) => {
                        request.send(&mut multiplexed).await
                    }
                    Ok(_) => return Attempt::Behind,
                    Err(error) => Err(error),
                }
            }
        };
        match sent {
            Ok(reply) => match request.refusal(&reply, true) {
                None => Attempt::Served(reply),
                Some((refusal, _)) => Attempt::Failed(refusal.to_string()),
            },
            Err(error) => replica_failed(connection, &error),
        }
    }
}

fn replica_failed(connection: &Connection, error: &RedisError) -> Attempt {
    match Failure::of(error) {
        Failure::Final => Attempt::Final(error.clone()),
        Failure::NotExecuted => Attempt::Failed(error.to_string()),
        Failure::OutcomeUnknown => {
            // The probes replace it.
            connection.failed.store(true, Ordering::Release);
            Attempt::Failed(error.to_string())
        }
    }
}

/// The replication offset a replica has applied, from its `ROLE` reply
/// (`["slave", host, port, state, offset]`); `None` if it is no connected
/// replica.
fn applied_offset(role: &Value) -> Option<u64> {
    let Value::Array(fields) = role else {
        return None;
    };
    match fields.as_slice() {
        [Value::BulkString(kind), _, _, _, Value::Int(offset)] if kind == b"slave" => {
            u64::try_from(*offset).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_role_gives_its_applied_offset() {
        let role = |kind: &str, offset: i64| {
            Value::Array(vec![
                Value::BulkString(kind.as_bytes().to_vec()),
                Value::BulkString(b"10.0.0.1".to_vec()),
                Value::Int(6379),
                Value::BulkString(b"connected".to_vec()),
                Value::Int(offset),
            ])
        };
        assert_eq!(applied_offset(&role("slave", 1234)), Some(1234));
        assert_eq!(applied_offset(&role("slave", -1)), None, "link down");
        assert_eq!(applied_offset(&role("master", 1234)), None);
        assert_eq!(applied_offset(&Value::Nil), None);
    }

    #[test]
    fn replicated_durability_needs_a_replica_and_a_timeout() {
        assert!(Durability::Master.validate().is_ok());
        let replicated = |replicas, ms| Durability::Replicated {
            replicas,
            timeout: Duration::from_millis(ms),
        };
        assert!(replicated(1, 100).validate().is_ok());
        assert!(replicated(0, 100).validate().is_err());
        assert!(replicated(1, 0).validate().is_err());
    }
}
