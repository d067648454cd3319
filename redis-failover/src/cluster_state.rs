//! What a cluster client's handles and its refresh task share: the slot
//! map, one multiplexed connection per master, and single-flight refreshes
//! of the map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::RedisResult;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::addr::NodeAddr;
use crate::client::{MasterInfo, wait_for};
use crate::cluster_nodes::ClusterNodes;
use crate::cluster_reads::{ClusterReads, ReadSettings};
use crate::error::Result;
use crate::events::{Counter, Event, Telemetry, Trigger};
use crate::node::Connector;
use crate::node_metrics::PerNode;
use crate::policy::RetryPolicy;
use crate::slots::{SLOT_COUNT, SlotMap};

/// The least time between two refreshes of the background task, so that a
/// burst of `MOVED` replies asks for one refresh, not one each.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);

/// The settings a cluster client runs with.
#[derive(Clone, Debug)]
pub(crate) struct ClusterSettings {
    pub(crate) seeds: Vec<NodeAddr>,
    pub(crate) policy: RetryPolicy,
    pub(crate) refresh_interval: Duration,
    pub(crate) dedicated_connections: u32,
    pub(crate) reads: ReadSettings,
}

pub(crate) struct ClusterShared {
    pub(crate) settings: ClusterSettings,
    pub(crate) telemetry: Telemetry,
    pub(crate) connector: Connector,
    /// Each master's lane and dedicated connections.
    pub(crate) nodes: ClusterNodes,
    /// The replicas reads may use, once they do.
    pub(crate) reads: ClusterReads,
    /// Where requests went, per node.
    pub(crate) per_node: PerNode,
    map: Mutex<SlotMap>,
    connections: Mutex<HashMap<NodeAddr, MultiplexedConnection>>,
    /// Held while the map is being refreshed: one refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// Bumped after every refresh that loaded a map; a watch, so that
    /// subscriptions following the masters wake when the map changes.
    generation: watch::Sender<u64>,
    /// Bumped whenever the set of masters in the map changes.
    masters_epoch: AtomicU64,
    /// Asks the background task for a refresh soon.
    wake: Notify,
    /// Cancelled when the client is dropped; background tasks started
    /// later (subscriptions) watch it.
    stopped: CancellationToken,
}

impl std::fmt::Debug for ClusterShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterShared")
            .field("seeds", &self.settings.seeds)
            .finish_non_exhaustive()
    }
}

impl ClusterShared {
    pub(crate) fn new(
        settings: ClusterSettings,
        connector: Connector,
        telemetry: Telemetry,
        stopped: CancellationToken,
    ) -> Self {
        Self {
            nodes: ClusterNodes::new(settings.dedicated_connections),
            reads: ClusterReads::new(settings.reads.clone(), &connector),
            per_node: PerNode::default(),
            settings,
            telemetry,
            connector,
            map: Mutex::new(SlotMap::empty()),
            connections: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(()),
            generation: watch::channel(0).0,
            masters_epoch: AtomicU64::new(0),
            wake: Notify::new(),
            stopped,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, SlotMap> {
        // The map is valid after any panic of a holder: each change is one store.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many refreshes loaded a map so far.
    pub(crate) fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Wakes whenever a refresh loaded a map, with its generation.
    pub(crate) fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Cancelled when the client is dropped.
    pub(crate) fn stopped(&self) -> CancellationToken {
        self.stopped.clone()
    }

    /// How the client connects to the cluster's nodes.
    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The master of `slot`; for a keyless request (`None`), any master.
    pub(crate) fn route(&self, slot: Option<u16>) -> Option<NodeAddr> {
        let map = self.map();
        match slot {
            Some(slot) => map.owner(slot).cloned(),
            None => map.masters().first().cloned(),
        }
    }

    /// A number bumped whenever the set of masters in the map changes
    /// (`None` before the first map).
    pub(crate) fn masters_epoch(&self) -> Option<u64> {
        Some(self.masters_epoch.load(Ordering::Acquire)).filter(|epoch| *epoch > 0)
    }

    /// Every master of the map.
    pub(crate) fn masters(&self) -> Vec<NodeAddr> {
        self.map().masters().to_vec()
    }

    /// Every master of the map with its replicas.
    pub(crate) fn shards(&self) -> Vec<(NodeAddr, Vec<NodeAddr>)> {
        self.map().shards()
    }

    /// Records that `node` now serves `slot` (a `MOVED` reply said so), and
    /// asks for a full refresh: a moved slot rarely moves alone.
    pub(crate) fn moved(&self, slot: u16, node: NodeAddr) {
        let mut map = self.map();
        if !map.masters().contains(&node) {
            self.masters_epoch.fetch_add(1, Ordering::AcqRel);
        }
        map.set(slot, node);
        drop(map);
        self.wake.notify_one();
    }

    /// Asks the background task to refresh the map soon.
    pub(crate) fn refresh_soon(&self) {
        self.wake.notify_one();
    }

    /// The connection to `node`, opened if there is none.
    pub(crate) async fn connection(&self, node: &NodeAddr) -> RedisResult<MultiplexedConnection> {
        let known = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .cloned();
        if let Some(connection) = known {
            return Ok(connection);
        }
        let connection = self.connector.connect(node).await?;
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.clone(), connection.clone());
        Ok(connection)
    }

    /// Drops the connection to `node` after it failed, so that the next
    /// request opens a new one.
    pub(crate) fn forget(&self, node: &NodeAddr) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(node);
    }

    /// Loads the map again unless a refresh ended since `seen` (the
    /// generation the caller acted on): callers that fail together wait
    /// for one refresh. Tries the known masters, then the seeds; keeps the
    /// old map when none answers with a full one.
    pub(crate) async fn refresh(&self, seen: u64) -> bool {
        let _one_at_a_time = self.refreshing.lock().await;
        if self.generation() != seen {
            return true;
        }
        let mut nodes = self.map().masters().to_vec();
        for seed in &self.settings.seeds {
            if !nodes.contains(seed) {
                nodes.push(seed.clone());
            }
        }
        self.telemetry.add(Counter::Discoveries);
        for node in nodes {
            match self.load_from(&node).await {
                Ok(Some(map)) => {
                    self.install(map);
                    return true;
                }
                Ok(None) => tracing::debug!(%node, "CLUSTER SLOTS did not cover every slot"),
                Err(error) => {
                    tracing::debug!(%node, %error, "CLUSTER SLOTS failed");
                    self.forget(&node);
                }
            }
        }
        false
    }

    /// Makes `map` the one requests route by, and tells of each shard
    /// whose master changed: a master of the old map that serves no slot
    /// now, its slots gone to another node (a failover, or all its slots
    /// moved away).
    fn install(&self, map: SlotMap) {
        let mut known = self.map();
        let successors = map.successors(&known);
        let same_masters = map.masters().len() == known.masters().len()
            && map.masters().iter().all(|m| known.masters().contains(m));
        if !same_masters {
            // Before the map: whoever saw the new map reads the new epoch
            // after it (a cache fill checks the epoch after its read).
            self.masters_epoch.fetch_add(1, Ordering::AcqRel);
        }
        *known = map;
        let members = known.members();
        drop(known);
        // A node gone from the map (a pod replaced under a new IP, a shard
        // removed) takes its connections along; one that comes back gets
        // new ones on first use.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|node, _| members.contains(node));
        self.nodes.retain(&members);
        self.per_node.retain(&members);
        // Bumped after the map is in place: a waiter woken reads the new one.
        self.generation.send_modify(|generation| *generation += 1);
        let generation = self.generation();
        for (from, to) in successors {
            tracing::info!(%from, %to, "a shard's slots moved to another master");
            self.telemetry.add(Counter::MasterChanges);
            self.telemetry.emit(Event::MasterChanged {
                from: Some(from),
                to,
                generation,
                trigger: Trigger::SlotMap,
                after_failure: None,
            });
        }
    }

    /// Waits, until `timeout`, for a map that covers every slot, and
    /// returns its first master.
    pub(crate) async fn wait_for_map(&self, timeout: Duration) -> Result<MasterInfo> {
        let policy = RetryPolicy {
            budget: timeout,
            ..self.settings.policy
        };
        wait_for(policy, || async {
            let generation = self.generation();
            if self.route(None).is_none() {
                self.refresh(generation).await;
            }
            let node = self.route(None).ok_or_else(Vec::new)?;
            Ok(MasterInfo {
                node,
                generation: self.generation(),
            })
        })
        .await
    }

    /// The map `node` describes, if it covers every slot (a partial one
    /// comes from a node that is not in the cluster yet, or a cluster that
    /// is down: better keep the map known).
    async fn load_from(&self, node: &NodeAddr) -> RedisResult<Option<SlotMap>> {
        let mut connection = self.connection(node).await?;
        let reply = connection
            .send_packed_command(redis::cmd("CLUSTER").arg("SLOTS"))
            .await?;
        let map = SlotMap::from_cluster_slots(&reply.extract_error()?, node);
        Ok(map.filter(|map| map.covered() == SLOT_COUNT))
    }
}

/// Refreshes the slot map now, then every refresh interval and whenever a
/// request asks for it, until `stop` is cancelled (the client dropped).
pub(crate) async fn refresh_loop(shared: Arc<ClusterShared>, stop: CancellationToken) {
    let interval = shared.settings.refresh_interval;
    let run = async {
        loop {
            shared.refresh(shared.generation()).await;
            tokio::time::sleep(MIN_REFRESH_GAP).await;
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shared.wake.notified() => {}
            }
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        _ = run => {}
    }
}
