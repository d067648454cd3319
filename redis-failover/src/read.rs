//! Reads routed by policy over the master and its replicas, with a
//! session's position when it has one.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use redis::{RedisError, Value};

use crate::addr::NodeAddr;
use crate::error::{Error, NodeFailure, Result};
use crate::events::{Counter, Telemetry};
use crate::node::Connection;
use crate::policy::{Decision, Tried, Tries};
use crate::replica_set::{ReadReplica, ReadSet};
use crate::request::{Reply, Request};
use crate::retry::{Failure, refusal_of};
use crate::routing::Durability;
use crate::routing::{ReadPolicy, ReplicaPreference};
use crate::shared::Shared;
use crate::state::Observed;

/// Where one read will be tried, in order.
pub(crate) struct Plan<'a> {
    /// Try the master once before any replica (`MasterPreferred`).
    pub(crate) master_first: bool,
    replicas: Vec<&'a ReadReplica>,
    /// The replicas left out.
    unusable: Vec<&'a ReadReplica>,
    /// Send to the master (with the full retry handling) when no replica served.
    pub(crate) master_last: bool,
}

/// Keeps the latest failure of each node.
fn record(failures: &mut Vec<NodeFailure>, node: &NodeAddr, reason: String) {
    match failures.iter_mut().find(|f| f.node == *node) {
        Some(known) => known.reason = reason,
        None => failures.push(NodeFailure {
            node: node.clone(),
            reason,
        }),
    }
}

/// The outcome of a read sent to one replica.
enum Attempt {
    Served(Reply),
    /// The replica has not replicated the session's writes yet.
    Behind,
    Failed(String),
    /// A cluster replica whose shard no longer serves the key's slot.
    Redirected(RedisError),
    /// The replica answered with an error that is the caller's.
    Final(RedisError),
}

/// What decides where a read goes besides its policy.
pub(crate) struct ReadRules<'a> {
    pub(crate) max_staleness: Duration,
    pub(crate) preference: Option<&'a ReplicaPreference>,
    /// Where `ReadPolicy::RoundRobin` goes next.
    pub(crate) round_robin: &'a AtomicUsize,
}

/// Where a read by `policy` goes, given what the probes found of one
/// master's replicas.
pub(crate) fn plan<'a>(set: &'a ReadSet, policy: ReadPolicy, rules: &ReadRules<'_>) -> Plan<'a> {
    let now = Instant::now();
    let (mut replicas, unusable): (Vec<&ReadReplica>, Vec<&ReadReplica>) = set
        .replicas
        .iter()
        .partition(|r| r.unusable(now, rules.max_staleness).is_none());
    match policy {
        ReadPolicy::RoundRobin if !replicas.is_empty() => {
            let next = rules.round_robin.fetch_add(1, Ordering::Relaxed) % replicas.len();
            replicas.rotate_left(next);
        }
        ReadPolicy::Nearest => replicas.sort_by_key(|r| r.latency.unwrap_or(Duration::MAX)),
        _ => replicas.shuffle(&mut rand::rng()),
    }
    if let Some(prefer) = rules.preference {
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

/// The error of a read that no replica of `plan` served, with why each
/// left out was.
pub(crate) fn no_replica(
    plan: Plan<'_>,
    mut failures: Vec<NodeFailure>,
    max_staleness: Duration,
) -> Error {
    let now = Instant::now();
    for replica in plan.unusable {
        if let Some(reason) = replica.unusable(now, max_staleness) {
            record(&mut failures, &replica.node, reason.to_string());
        }
    }
    Error::NoReplicaAvailable { failures }
}

/// Why the replicas of a plan served no read.
pub(crate) struct Unserved {
    /// One had not replicated the session's writes yet.
    pub(crate) behind: bool,
    /// One answered `MOVED` or `ASK` (a cluster's slot moved), from this node.
    pub(crate) redirected: Option<(NodeAddr, RedisError)>,
}

impl Shared {
    fn rules(&self) -> ReadRules<'_> {
        ReadRules {
            max_staleness: self.settings.max_staleness,
            preference: self.settings.replica_preference.as_ref(),
            round_robin: &self.round_robin,
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
                .state
                .read_set()
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
        // Boxed: its future would size the master reads' too.
        Box::pin(self.read_by_plan(request, policy, session)).await
    }

    /// Reads as the latest read set and `policy` plan it; with replicas
    /// only, a session waits (within the budget) for one to catch up.
    async fn read_by_plan(
        self: &Arc<Self>,
        request: Request<'_>,
        policy: ReadPolicy,
        session: Option<u64>,
    ) -> Result<(NodeAddr, Reply)> {
        let retries = self.settings.retry_policy();
        let mut tries = Tries::new();
        let mut failures: Vec<NodeFailure> = Vec::new();
        loop {
            let set = self.state.read_set();
            let plan = plan(&set, policy, &self.rules());
            if plan.master_first
                && let Some(served) = self.try_master_once(request).await
            {
                return served;
            }
            let telemetry = &self.telemetry;
            let unserved =
                match try_replicas(&plan, request, session, &mut failures, telemetry).await {
                    ControlFlow::Break(served) => return served,
                    ControlFlow::Continue(unserved) => unserved,
                };
            if plan.master_last {
                return self.read_from_master(request).await;
            }
            if unserved.behind
                && let Decision::Retry(wait) = retries.decide(&mut tries, Tried::Held)
            {
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(no_replica(plan, failures, self.settings.max_staleness));
        }
    }

    /// A read on the master with the full retry handling. Not declared
    /// idempotent: with `ReadPolicy::Master` any command may come here, and
    /// read-only ones are resent anyway.
    async fn read_from_master(self: &Arc<Self>, request: Request<'_>) -> Result<(NodeAddr, Reply)> {
        self.telemetry.add(Counter::MasterReads);
        let (master, reply) = self.execute(request, false, Durability::Master).await?;
        Ok((master.node.clone(), reply))
    }

    /// One try on the current master, without waiting for a new one: `None`
    /// when it is unknown or failed (a failed connection starts a discovery).
    async fn try_master_once(
        self: &Arc<Self>,
        request: Request<'_>,
    ) -> Option<Result<(NodeAddr, Reply)>> {
        let Observed { master, epoch } = self.state.observe();
        let master = master?;
        let connection = master.connection.load_full();
        if connection.has_failed() {
            return None;
        }
        match request.send(&mut connection.multiplexed.clone()).await {
            Ok(reply) if request.refusal(&reply, true).is_none() => {
                self.telemetry.add(Counter::MasterReads);
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
                    connection.fail();
                    let trigger = crate::events::Trigger::ConnectionLost;
                    self.rediscover_in_background(epoch, trigger, Arc::clone(&master));
                    None
                }
            },
        }
    }
}

/// Tries the plan's replicas in turn: the answer for the caller, or why
/// none served.
pub(crate) async fn try_replicas(
    plan: &Plan<'_>,
    request: Request<'_>,
    session: Option<u64>,
    failures: &mut Vec<NodeFailure>,
    telemetry: &Telemetry,
) -> ControlFlow<Result<(NodeAddr, Reply)>, Unserved> {
    let mut unserved = Unserved {
        behind: false,
        redirected: None,
    };
    for replica in &plan.replicas {
        match read_from_replica(replica, request, session).await {
            Attempt::Served(reply) => {
                telemetry.add(Counter::ReplicaReads);
                return ControlFlow::Break(Ok((replica.node.clone(), reply)));
            }
            Attempt::Behind => {
                telemetry.add(Counter::SessionFallbacks);
                unserved.behind = true;
                if plan.master_last {
                    break;
                }
            }
            Attempt::Failed(reason) => record(failures, &replica.node, reason),
            Attempt::Redirected(error) => {
                // The map that named this replica is out of date: the
                // shard's other replicas would answer the same.
                record(failures, &replica.node, error.to_string());
                unserved.redirected = Some((replica.node.clone(), error));
                break;
            }
            Attempt::Final(source) => {
                return ControlFlow::Break(Err(Error::Command {
                    node: replica.node.clone(),
                    source,
                }));
            }
        }
    }
    ControlFlow::Continue(unserved)
}

async fn read_from_replica(
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
            Some((refusal, "MOVED" | "ASK")) => Attempt::Redirected(refusal),
            Some((refusal, _)) => Attempt::Failed(refusal.to_string()),
        },
        Err(error) => replica_failed(connection, &error),
    }
}

fn replica_failed(connection: &Connection, error: &RedisError) -> Attempt {
    if matches!(refusal_of(error), Some("MOVED" | "ASK")) {
        return Attempt::Redirected(error.clone());
    }
    match Failure::of(error) {
        Failure::Final => Attempt::Final(error.clone()),
        Failure::NotExecuted => Attempt::Failed(error.to_string()),
        Failure::OutcomeUnknown => {
            // The probes replace it.
            connection.fail();
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
}
