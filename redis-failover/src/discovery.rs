//! Finding the master: ordered candidates, a last-resort address, or
//! agreeing sentinels, each answer proven by the node itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::aio::MultiplexedConnection;
use redis::{Cmd, FromRedisValue, RedisError};

use crate::addr::NodeAddr;
use crate::builder::Mode;
use crate::dedicated::dedicated_pool;
use crate::epochs::{Named, Votes};
use crate::error::NodeFailure;
use crate::events::{Event, Trigger};
use crate::node::{Connection, DedicatedManager, MasterManager, verify_master};
use crate::shared::Shared;
use crate::state::{Master, NewMaster, Opened, lock};

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
                if let Some(master) = current
                    && self.state.superseded(master)
                {
                    // A failover with a newer epoch was decided: however
                    // healthy the current master looks, it is stale now.
                    self.state.fence(master);
                }
                let installed = self.state.master();
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

    /// After `master` (observed at discovery `epoch`) answered a request
    /// with `-REDIRECT target`: in candidates mode, checks `target` alone
    /// (as configured, `ROLE` by default) and installs it, with no round
    /// over the candidates; if it does not prove itself, the master is
    /// given up and the next try looks for one as usual. In Sentinel mode
    /// the redirect is only a hint: the sentinels must name the new master
    /// before the client switches, so it is a discovery like any other.
    pub(crate) async fn follow_redirect(
        &self,
        master: &Arc<Master>,
        epoch: u64,
        target: &NodeAddr,
    ) {
        if matches!(self.settings.mode, Mode::Sentinel { .. }) {
            let _ = self
                .rediscover(epoch, Trigger::Redirect, Some(master))
                .await;
            return;
        }
        let Ok(mut discovery) = self.state.begin_redirect(epoch).await else {
            // Someone looked for the master since: their answer stands.
            return;
        };
        discovery.saw_failure(Some(master), Trigger::Redirect);
        let target = self.as_candidate(target).await;
        tracing::debug!(from = %master.node, to = %target, "following a redirect");
        match self.open_master(&target, 0, discovery.current()).await {
            Ok(Opened::Same(master)) => {
                discovery.keep(master);
            }
            Ok(Opened::New(new)) => {
                discovery.install(new, Trigger::Redirect);
            }
            Err(reason) => {
                let failure = NodeFailure {
                    node: target,
                    reason: format!("named by a REDIRECT, but {reason}"),
                };
                discovery.not_found(vec![failure], Trigger::Redirect);
            }
        }
    }

    /// The candidate whose name resolves to `target`'s address (a redirect
    /// names the master as its replicas reach it, usually by IP), so that
    /// the master installed keeps its configured name and a later
    /// discovery through the candidates finds the same master, not one by
    /// another name; `target` itself when no candidate does.
    async fn as_candidate(&self, target: &NodeAddr) -> NodeAddr {
        let Mode::Candidates { nodes } = &self.settings.mode else {
            return target.clone();
        };
        if nodes.contains(target) {
            return target.clone();
        }
        let wanted = match target.host().parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, target.port())],
            Err(_) => self.data.resolve(target).await.unwrap_or_default(),
        };
        for node in nodes {
            let addrs = self.data.resolve(node).await.unwrap_or_default();
            if addrs.iter().any(|addr| wanted.contains(addr)) {
                return node.clone();
            }
        }
        target.clone()
    }

    /// Proves `node` is the master and opens its shared connection,
    /// keeping the current master's if it is the same node and its
    /// connection has not failed.
    async fn open_master(
        &self,
        node: &NodeAddr,
        config_epoch: u64,
        current: Option<&Arc<Master>>,
    ) -> Result<Opened, String> {
        let check = self.master_check();
        let opener = MasterManager {
            connector: self.data.clone(),
            node: node.clone(),
            check,
        };
        if let Some(master) = current.filter(|m| m.node == *node) {
            let shared = master.connection.load_full();
            if !shared.has_failed() {
                verify_master(&mut shared.multiplexed.clone(), check)
                    .await
                    .map_err(|e| e.to_string())?;
                master.named_in(config_epoch);
                return Ok(Opened::Same(Arc::clone(master)));
            }
            // Opening checks the role.
            let mut connection = master.opener.connect().await.map_err(|e| e.to_string())?;
            if !self
                .restarts
                .check(node, &mut connection, &self.telemetry)
                .await
            {
                master.connection.store(Connection::new(connection));
                master.named_in(config_epoch);
                return Ok(Opened::Same(Arc::clone(master)));
            }
            // Restarted: installed as a new master below.
            return Ok(self.new_master(opener, config_epoch, connection));
        }
        let mut connection = opener.connect().await.map_err(|e| e.to_string())?;
        self.restarts
            .check(node, &mut connection, &self.telemetry)
            .await;
        Ok(self.new_master(opener, config_epoch, connection))
    }

    /// A master not installed yet, with its pool of dedicated connections.
    fn new_master(
        &self,
        opener: MasterManager,
        config_epoch: u64,
        connection: MultiplexedConnection,
    ) -> Opened {
        let dedicated = dedicated_pool(
            DedicatedManager(opener.clone()),
            self.settings.dedicated_connections,
            self.settings.connect_timeout + self.settings.command_timeout,
        );
        Opened::New(Box::new(NewMaster {
            node: opener.node.clone(),
            config_epoch,
            dedicated,
            opener,
            connection,
        }))
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
        let sentinels = lock(&self.sentinels.known).clone();
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
        let mut votes = Votes::default();
        while let Some((sentinel, reply)) = replies.next().await {
            match reply
                .map_err(|e| e.to_string())
                .and_then(|fields| named_master(&fields))
            {
                Ok(named) => {
                    votes.add(&named);
                    answers.push((sentinel, named.node.clone()));
                    self.state.record_named(&named);
                }
                Err(reason) => failures.push(NodeFailure {
                    node: sentinel,
                    reason,
                }),
            }
            if let Some(agreed) = votes.decided(required, replies.len()) {
                if votes.split() {
                    self.emit(Event::SentinelDisagreement { answers, required });
                }
                return Ok(agreed);
            }
        }
        if !answers.is_empty() {
            self.emit(Event::SentinelDisagreement { answers, required });
        }
        failures.extend(votes.undecided(required));
        Err(failures)
    }

    /// [`ask_sentinels`](Self::ask_sentinels), except that an agreement on
    /// a master an older epoch replaced does not count: those sentinels have
    /// not caught up yet.
    pub(crate) async fn ask_sentinels_current(&self) -> Result<Named, Vec<NodeFailure>> {
        let agreed = self.ask_sentinels().await?;
        self.state.current_named(agreed)
    }

    /// One command to a sentinel over its cached connection.
    pub(crate) async fn ask_sentinel<T: FromRedisValue>(
        &self,
        sentinel: &NodeAddr,
        command: &Cmd,
    ) -> Result<T, RedisError> {
        let cached = lock(&self.sentinels.connections).get(sentinel).cloned();
        let mut connection = match cached {
            Some(connection) => connection,
            None => {
                let connection = self.sentinels.connector.connect(sentinel).await?;
                lock(&self.sentinels.connections).insert(sentinel.clone(), connection.clone());
                connection
            }
        };
        let reply = command.query_async(&mut connection).await;
        if reply
            .as_ref()
            .is_err_and(|e| e.is_io_error() || e.is_timeout())
        {
            lock(&self.sentinels.connections).remove(sentinel);
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
        let known = lock(&self.sentinels.known).clone();
        let mut known_addrs: Vec<SocketAddr> = Vec::new();
        for sentinel in &known {
            known_addrs.extend(
                self.sentinels
                    .connector
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
            lock(&self.sentinels.known).extend(new.iter().cloned());
            return new;
        }
        Vec::new()
    }
}
