//! Finding the master: ordered candidates, a last-resort address, or
//! agreeing sentinels, each answer proven by the node itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::aio::MultiplexedConnection;
use redis::{Cmd, FromRedisValue, RedisError};

use crate::addr::NodeAddr;
use crate::builder::Mode;
use crate::error::NodeFailure;
use crate::events::{Counter, Event, Trigger};
use crate::node::{DedicatedManager, MasterManager, verify_master};
use crate::shared::{Connection, Master, Opened, Shared, lock};

/// A master as one sentinel, or enough of them, named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Named {
    pub(crate) node: NodeAddr,
    /// The epoch of the failover that made it master (0 if none yet).
    pub(crate) config_epoch: u64,
}

/// The newest config epoch any sentinel reported, and every node named in
/// it. (While the leader finishes a failover, it reports the new epoch with
/// the old address; the others soon report it with the new one.)
#[derive(Clone, Debug, Default)]
pub(crate) struct Newest {
    config_epoch: u64,
    nodes: Vec<NodeAddr>,
}

impl Newest {
    fn record(&mut self, named: &Named) {
        if named.config_epoch > self.config_epoch {
            self.config_epoch = named.config_epoch;
            self.nodes.clear();
        }
        if named.config_epoch == self.config_epoch && !self.nodes.contains(&named.node) {
            self.nodes.push(named.node.clone());
        }
    }

    /// `named`, unless a node other than it was named in a newer epoch:
    /// sentinels still naming it have not caught up.
    fn current(&self, named: Named) -> Result<Named, Vec<NodeFailure>> {
        match self.supersedes(&named.node, named.config_epoch) {
            Some(newer) => Err(vec![NodeFailure {
                node: named.node.clone(),
                reason: format!(
                    "named in epoch {}, but {newer} was named in epoch {}",
                    named.config_epoch, self.config_epoch
                ),
            }]),
            None => Ok(named),
        }
    }

    /// A node other than `node` named in a newer epoch than `config_epoch`:
    /// a failover decided since `node` was named.
    pub(crate) fn supersedes(&self, node: &NodeAddr, config_epoch: u64) -> Option<&NodeAddr> {
        if self.config_epoch <= config_epoch {
            return None;
        }
        self.nodes.iter().find(|n| *n != node)
    }
}

/// Reads a `SENTINEL MASTER` reply.
fn named_master(fields: &HashMap<String, String>) -> Result<Named, String> {
    let field = |name: &str| {
        fields
            .get(name)
            .ok_or_else(|| format!("SENTINEL MASTER reply has no `{name}`"))
    };
    let port = field("port")?
        .parse()
        .map_err(|e| format!("SENTINEL MASTER port: {e}"))?;
    let node = NodeAddr::new(field("ip")?.clone(), port).map_err(|e| e.to_string())?;
    let config_epoch = field("config-epoch")?
        .parse()
        .map_err(|e| format!("SENTINEL MASTER config-epoch: {e}"))?;
    Ok(Named { node, config_epoch })
}

/// How many connections through the last-resort address are tried per discovery.
const LAST_RESORT_TRIES: usize = 3;
/// Connections bb8 may hold to one master: the shared one and a replacement.
const CONNECTIONS_PER_MASTER: u32 = 2;

impl Shared {
    pub(crate) async fn find_master(
        &self,
        current: Option<&Arc<Master>>,
    ) -> Result<Opened, Vec<NodeFailure>> {
        let mut failures = Vec::new();
        match &self.settings.mode {
            Mode::Candidates { nodes } => {
                // Each connection through a load-balanced address may reach
                // another node, so it gets a few tries, after every candidate.
                let last_resort = self
                    .settings
                    .last_resort
                    .iter()
                    .cycle()
                    .take(LAST_RESORT_TRIES);
                for node in nodes.iter().chain(last_resort) {
                    match self.open_master(node, 0, current).await {
                        Ok(opened) => return Ok(opened),
                        Err(reason) => failures.push(NodeFailure {
                            node: node.clone(),
                            reason,
                        }),
                    }
                }
                Err(failures)
            }
            Mode::Sentinel { .. } => {
                let agreed = self.ask_sentinels_current().await;
                let newest = lock(&self.newest).clone();
                if let Some(master) = current
                    && newest
                        .supersedes(&master.node, master.config_epoch())
                        .is_some()
                {
                    // A failover with a newer epoch was decided: however
                    // healthy the current master looks, it is stale now.
                    self.fence(master);
                }
                let installed = self.master.load_full();
                let named = match (agreed, &installed) {
                    (Ok(named), _) => named,
                    // Sentinels undecided (some down, or still disagreeing):
                    // the current master stays if it still proves itself.
                    (Err(sentinel_failures), Some(master)) => {
                        failures = sentinel_failures;
                        Named {
                            node: master.node.clone(),
                            config_epoch: master.config_epoch(),
                        }
                    }
                    (Err(sentinel_failures), None) => return Err(sentinel_failures),
                };
                self.open_master(&named.node, named.config_epoch, installed.as_ref())
                    .await
                    .map_err(|reason| {
                        failures.push(NodeFailure {
                            node: named.node.clone(),
                            reason,
                        });
                        failures
                    })
            }
        }
    }

    /// Stops requests from using `master`, which the sentinels replaced in
    /// a newer epoch: even if it still accepts writes (partitioned from the
    /// sentinels but not from this client), they would be lost.
    fn fence(&self, master: &Arc<Master>) {
        let installed = self.master.load_full();
        if installed.as_ref().is_some_and(|m| Arc::ptr_eq(m, master)) {
            self.master.store(None);
            // Its replicas may miss the new master's writes: no reads there
            // until the probes vouch for replicas again.
            self.read_set.store(Arc::default());
            self.metrics.add(Counter::Fenced);
            tracing::warn!(node = %master.node, "master fenced: the sentinels elected another in a newer epoch");
            self.emit(Event::MasterLost {
                node: master.node.clone(),
                trigger: Trigger::Superseded,
            });
        }
    }

    /// Proves `node` is the master and opens its shared connection through
    /// bb8, keeping the current master's if it is the same node and its
    /// connection still works.
    async fn open_master(
        &self,
        node: &NodeAddr,
        config_epoch: u64,
        current: Option<&Arc<Master>>,
    ) -> Result<Opened, String> {
        let check = self.master_check();
        if let Some(master) = current.filter(|m| m.node == *node) {
            let shared = master.connection.load_full();
            let mut connection = if shared.failed.load(Ordering::Acquire) {
                // bb8 checks the pooled connection with a unique PING token,
                // and replaces it (checking the role on the new one) if it broke.
                match master.pool.get().await {
                    Ok(pooled) => MultiplexedConnection::clone(&pooled),
                    Err(bb8::RunError::User(error)) => return Err(error.to_string()),
                    Err(bb8::RunError::TimedOut) => {
                        return Err("timed out opening a connection".to_owned());
                    }
                }
            } else {
                shared.multiplexed.clone()
            };
            verify_master(&mut connection, check)
                .await
                .map_err(|e| e.to_string())?;
            if shared.failed.load(Ordering::Acquire) {
                master.connection.store(Connection::new(connection));
            }
            master
                .config_epoch
                .fetch_max(config_epoch, Ordering::AcqRel);
            return Ok(Opened::Same(Arc::clone(master)));
        }
        let manager = MasterManager {
            connector: self.data.clone(),
            node: node.clone(),
            check,
        };
        let pool = bb8::Pool::builder()
            .max_size(CONNECTIONS_PER_MASTER)
            .test_on_check_out(true)
            .retry_connection(false)
            .connection_timeout(self.settings.connect_timeout + self.settings.command_timeout)
            // bb8 reaps idle pooled copies with its defaults; the shared
            // connection lives on in its clones.
            .build_unchecked(manager.clone());
        // Opened directly so that a failure says why (`Pool::get` only
        // times out), then handed to the pool to hold and check later.
        let connection = pool
            .dedicated_connection()
            .await
            .map_err(|e| e.to_string())?;
        let _ = pool.add(connection.clone());
        let dedicated = bb8::Pool::builder()
            .max_size(self.settings.dedicated_connections)
            .min_idle(None)
            // A PING on checkout: an idle connection may have died unseen.
            .test_on_check_out(true)
            .retry_connection(false)
            .connection_timeout(self.settings.connect_timeout + self.settings.command_timeout)
            .build_unchecked(DedicatedManager(manager));
        Ok(Opened::New {
            node: node.clone(),
            config_epoch,
            dedicated,
            pool,
            connection,
        })
    }

    /// Asks the sentinels where the master is (`SENTINEL MASTER`): the
    /// master as soon as enough of them name the same node (and no other
    /// node is named as often). Every answer is recorded in `newest`, for
    /// fencing.
    pub(crate) async fn ask_sentinels(&self) -> Result<Named, Vec<NodeFailure>> {
        let Mode::Sentinel { master_name, .. } = &self.settings.mode else {
            unreachable!("only asked in Sentinel mode")
        };
        let required = self.settings.required_agreement();
        let command = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(master_name)
            .to_owned();
        let sentinels = lock(&self.sentinels).clone();
        let mut replies: FuturesUnordered<_> = sentinels
            .into_iter()
            .map(|sentinel| {
                let command = &command;
                async move {
                    let reply = self
                        .ask_sentinel::<HashMap<String, String>>(&sentinel, command)
                        .await;
                    (sentinel, reply)
                }
            })
            .collect();
        let (mut failures, mut answers) = (Vec::new(), Vec::new());
        let mut votes: HashMap<NodeAddr, (usize, u64)> = HashMap::new();
        while let Some((sentinel, reply)) = replies.next().await {
            match reply
                .map_err(|e| e.to_string())
                .and_then(|fields| named_master(&fields))
            {
                Ok(named) => {
                    // The lowest epoch among those naming a node is the one
                    // it became master in: a leader finishing a failover
                    // names the old master with the new epoch.
                    let vote = votes.entry(named.node.clone()).or_insert((0, u64::MAX));
                    vote.0 += 1;
                    vote.1 = vote.1.min(named.config_epoch);
                    answers.push((sentinel, named.node.clone()));
                    lock(&self.newest).record(&named);
                }
                Err(reason) => failures.push(NodeFailure {
                    node: sentinel,
                    reason,
                }),
            }
            // Enough agree, and the rest could not outvote them: done.
            let undecided = replies.len();
            let mut ranked: Vec<(&NodeAddr, usize, u64)> =
                votes.iter().map(|(m, (c, e))| (m, *c, *e)).collect();
            ranked.sort_by_key(|(_, count, _)| std::cmp::Reverse(*count));
            if let [(leader, count, config_epoch), rest @ ..] = ranked.as_slice() {
                let runner_up = rest.first().map_or(0, |(_, c, _)| *c);
                if *count >= required && *count > runner_up + undecided {
                    if votes.len() > 1 {
                        self.emit(Event::SentinelDisagreement {
                            answers: answers.clone(),
                            required,
                        });
                    }
                    let agreed = Named {
                        node: (*leader).clone(),
                        config_epoch: *config_epoch,
                    };
                    return Ok(agreed);
                }
            }
        }
        if !answers.is_empty() {
            self.emit(Event::SentinelDisagreement {
                answers: answers.clone(),
                required,
            });
        }
        for (master, (count, _)) in votes {
            failures.push(NodeFailure {
                node: master,
                reason: format!(
                    "named by {count} sentinels, {required} must agree and outvote the rest"
                ),
            });
        }
        Err(failures)
    }

    /// [`ask_sentinels`](Self::ask_sentinels), except that an agreement on
    /// a master an older epoch replaced does not count: those sentinels have
    /// not caught up yet.
    pub(crate) async fn ask_sentinels_current(&self) -> Result<Named, Vec<NodeFailure>> {
        let agreed = self.ask_sentinels().await?;
        lock(&self.newest).current(agreed)
    }

    /// One command to a sentinel over its cached connection.
    pub(crate) async fn ask_sentinel<T: FromRedisValue>(
        &self,
        sentinel: &NodeAddr,
        command: &Cmd,
    ) -> Result<T, RedisError> {
        let cached = lock(&self.sentinel_connections).get(sentinel).cloned();
        let mut connection = match cached {
            Some(connection) => connection,
            None => {
                let connection = self.sentinel_connector.connect(sentinel).await?;
                lock(&self.sentinel_connections).insert(sentinel.clone(), connection.clone());
                connection
            }
        };
        let reply = command.query_async(&mut connection).await;
        if reply
            .as_ref()
            .is_err_and(|e| e.is_io_error() || e.is_timeout())
        {
            lock(&self.sentinel_connections).remove(sentinel);
        }
        reply
    }

    /// Adds the sentinels a known sentinel lists (`SENTINEL SENTINELS`) and
    /// returns the new ones. A listed sentinel already known by name (its
    /// name resolving to the listed address) is not added again, so no
    /// sentinel votes twice.
    pub(crate) async fn learn_sentinels(&self) -> Vec<NodeAddr> {
        let Mode::Sentinel { master_name, .. } = &self.settings.mode else {
            return Vec::new();
        };
        let known = lock(&self.sentinels).clone();
        let mut known_addrs: Vec<SocketAddr> = Vec::new();
        for sentinel in &known {
            known_addrs.extend(
                self.sentinel_connector
                    .resolve(sentinel)
                    .await
                    .unwrap_or_default(),
            );
        }
        let command = redis::cmd("SENTINEL")
            .arg("SENTINELS")
            .arg(master_name)
            .to_owned();
        for sentinel in &known {
            let Ok(listed) = self
                .ask_sentinel::<Vec<HashMap<String, String>>>(sentinel, &command)
                .await
            else {
                continue;
            };
            let new: Vec<NodeAddr> = listed
                .iter()
                .filter_map(|fields| {
                    let port = fields.get("port")?.parse().ok()?;
                    NodeAddr::new(fields.get("ip")?.clone(), port).ok()
                })
                .filter(|addr| {
                    let listed: Option<SocketAddr> = addr.to_string().parse().ok();
                    !known.contains(addr) && listed.is_none_or(|l| !known_addrs.contains(&l))
                })
                .collect();
            lock(&self.sentinels).extend(new.iter().cloned());
            return new;
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(port: u16, config_epoch: u64) -> Named {
        Named {
            node: NodeAddr::new("10.0.0.1", port).unwrap(),
            config_epoch,
        }
    }

    #[test]
    fn a_master_is_superseded_by_another_node_named_in_a_newer_epoch() {
        let (old, new) = (named(1, 0), named(2, 1));
        let mut newest = Newest::default();
        newest.record(&old);
        assert_eq!(newest.supersedes(&old.node, 0), None);
        // The leader finishing the failover: new epoch, old address.
        newest.record(&named(1, 1));
        newest.record(&new);
        assert_eq!(newest.supersedes(&old.node, 0), Some(&new.node));
        assert_eq!(newest.supersedes(&new.node, 1), None);
        // An answer from a sentinel that has not caught up changes nothing.
        newest.record(&old);
        assert_eq!(newest.supersedes(&old.node, 0), Some(&new.node));
    }
}
