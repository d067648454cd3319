//! A local Redis Cluster: start-up, queries, and the wait for a stable cluster.
//!
//! The nodes are those of a [`Topology`] without sentinels, whose start-up
//! on free ports, faults and cleanup (on drop, and the sweep of a SIGKILLed
//! owner's nodes) the cluster reuses as they are; the cluster adds the
//! cluster lines of each node's config, `redis-cli --cluster`, and the
//! reading of `CLUSTER NODES`.

mod builder;
mod faults;
mod migration;
mod view;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::ConnectionInfo;
use redis::aio::MultiplexedConnection;

pub use builder::ClusterBuilder;
pub use faults::FailoverMode;
pub use view::{SLOT_COUNT, slot_of};

use crate::error::{Error, Result};
use crate::node::NodeId;
use crate::server::{Server, ServerKind};
use crate::topology::{Topology, info_field};
use crate::waits::{Attempt, pending, pending_on};
use view::View;

/// How many lines of `redis-cli`'s output an error carries.
const CLI_OUTPUT_LINES: usize = 30;

/// A running local Redis Cluster: shards of one master and its replicas,
/// every node a `redis-server --cluster-enabled yes` on free loopback ports
/// (client and bus), with its config, `nodes.conf` and log in a directory of
/// its own under [`dir`](Self::dir).
///
/// Nodes are named as a [`Topology`]'s data nodes are (`redis-0`, ...), in
/// start order; which node is a master comes from the cluster
/// ([`shards`](Self::shards)), as it changes with failovers. Dropping the
/// cluster SIGKILLs every process it started (paused ones included) and
/// removes the directory, also while a test unwinds from a panic; nodes of
/// an owner killed by SIGKILL are reaped by the next topology or cluster
/// started on the machine.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
///
/// use redis_topology::{Cluster, slot_of};
///
/// let cluster = Cluster::builder().shards(3).replicas_per_shard(1).start().await?;
/// let slot = slot_of("{tenant-1}:counter");
/// let master = cluster.master_of_slot(slot).await?.expect("every slot is served");
/// let _: () = cluster
///     .query(master, redis::cmd("SET").arg("{tenant-1}:counter").arg(1))
///     .await?;
/// cluster.kill(master)?;
/// let new = cluster.wait_for_failover(master, Duration::from_secs(30)).await?;
/// println!("{new} serves slot {slot} now");
/// # Ok(()) }
/// ```
///
/// Methods taking a [`NodeId`] panic if the id is not one of this cluster's
/// nodes; ids are only ever obtained from the cluster.
#[derive(Debug)]
pub struct Cluster {
    settings: ClusterBuilder,
    /// The slot map the last successful [`wait_stable`](Self::wait_stable) agreed on.
    stable: Mutex<SlotMap>,
    // Kills the nodes and removes the directory when dropped.
    topology: Topology,
}

/// One shard as a node sees it: a master and the replicas following it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Shard {
    /// The shard's master.
    pub master: NodeId,
    /// The nodes replicating from it.
    pub replicas: Vec<NodeId>,
    /// The slots it serves, in order (none for a shard just added).
    pub slots: Vec<RangeInclusive<u16>>,
}

impl Shard {
    /// How many slots the shard serves.
    pub fn slot_count(&self) -> usize {
        self.slots.iter().map(|r| r.clone().count()).sum()
    }
}

/// Slot ranges and the node serving each, in slot order.
type SlotMap = Vec<(RangeInclusive<u16>, NodeId)>;

impl Cluster {
    /// A builder with the defaults: 3 shards of a master and one replica,
    /// a 2 s node timeout.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    pub(crate) async fn start(settings: ClusterBuilder) -> Result<Self> {
        let topology = Topology::without_nodes(settings.topology_settings())?;
        let server = topology.server();
        if server.kind() == ServerKind::Redis && server.version() < (7, 0) {
            return Err(Error::InvalidConfig {
                setting: "redis_server",
                reason: format!(
                    "clusters need Redis >= 7.0 (for `cluster-port`), found {:?}",
                    server.version()
                ),
            });
        }
        let cluster = Self {
            settings,
            stable: Mutex::default(),
            topology,
        };
        // From here on, an early return drops `cluster`, which kills what it started.
        let count = cluster.settings.shards * (1 + cluster.settings.replicas_per_shard);
        let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
        for index in 0..count {
            args.push(cluster.spawn_node(NodeId::data(index)).await?.to_string());
        }
        args.extend([
            "--cluster-replicas".to_owned(),
            cluster.settings.replicas_per_shard.to_string(),
            "--cluster-yes".to_owned(),
        ]);
        cluster.run_cli(&args).await?;
        cluster.wait_stable(cluster.settings.wait_timeout).await?;
        Ok(cluster)
    }

    /// Starts one cluster node (not yet part of any cluster) on free client
    /// and bus ports; returns its address.
    async fn spawn_node(&self, id: NodeId) -> Result<SocketAddr> {
        let bus_port = self.topology.reserve_port(id)?;
        let node_settings = &self.topology.settings;
        let cluster_lines = self.settings.cluster_config(bus_port);
        self.topology
            .spawn_node(id, |addr| {
                node_settings.data_config(addr, None, None) + &cluster_lines
            })
            .await
    }

    /// Runs the cluster's `redis-cli` with `args`, bounded by the wait
    /// timeout (the process is killed if it takes longer); returns its output.
    async fn run_cli(&self, args: &[String]) -> Result<String> {
        let cli = &self.settings.redis_cli;
        let command_line = format!("{} {}", cli.display(), args.join(" "));
        let running = tokio::process::Command::new(cli)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let failed = |status: String, output: String| Error::ClusterCommand {
            command: command_line.clone(),
            status,
            output,
        };
        let output = match tokio::time::timeout(self.settings.wait_timeout, running).await {
            Err(_) => {
                let waited = self.settings.wait_timeout;
                return Err(failed(format!("killed after {waited:?}"), String::new()));
            }
            Ok(Err(source)) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::RedisServerNotFound {
                    binary: cli.clone(),
                });
            }
            Ok(Err(source)) => {
                return Err(Error::Io {
                    path: cli.clone(),
                    source,
                });
            }
            Ok(Ok(output)) => output,
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            return Ok(stdout);
        }
        let text = stdout + &String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(CLI_OUTPUT_LINES)..].join("\n");
        Err(failed(output.status.to_string(), tail))
    }

    // ----- reading the cluster -----

    /// `node`'s `CLUSTER NODES`.
    async fn view(&self, node: NodeId) -> Result<View> {
        let text: String = self.query(node, redis::cmd("CLUSTER").arg("NODES")).await?;
        View::parse(&text).map_err(|reason| Error::ClusterState { node, reason })
    }

    /// The view of the first running, unpaused node that answers.
    async fn any_view(&self) -> Result<(NodeId, View)> {
        let mut last_error = None;
        for node in self.topology.reachable(self.nodes()) {
            match self.view(node).await {
                Ok(view) => return Ok((node, view)),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or(Error::NotRunning {
            node: NodeId::data(0),
        }))
    }

    /// The node of this cluster a `CLUSTER NODES` line describes.
    fn node_of(&self, seen_by: NodeId, entry: &view::Entry) -> Result<NodeId> {
        entry
            .addr
            .and_then(|addr| self.topology.node_at(addr))
            .ok_or_else(|| Error::ClusterState {
                node: seen_by,
                reason: format!("node {} at {:?} is none of ours", entry.id, entry.addr),
            })
    }

    /// The shards as the first running, unpaused node sees them, in slot
    /// order (shards without slots last). A master that failed and serves no
    /// slots any more is no shard.
    pub async fn shards(&self) -> Result<Vec<Shard>> {
        let (seen_by, view) = self.any_view().await?;
        let mut shards = Vec::new();
        let masters = view.entries.iter().filter(|e| e.is_master());
        for master in masters.filter(|e| !e.slots.is_empty() || !e.has_flag("fail")) {
            let mut replicas = Vec::new();
            for replica in &view.entries {
                if replica.master_id.as_deref() == Some(master.id.as_str()) {
                    replicas.push(self.node_of(seen_by, replica)?);
                }
            }
            replicas.sort_unstable();
            let mut slots = master.slots.clone();
            slots.sort_unstable();
            shards.push(Shard {
                master: self.node_of(seen_by, master)?,
                replicas,
                slots: slots.into_iter().map(|(a, b)| a..=b).collect(),
            });
        }
        shards.sort_by_key(|s| (s.slots.first().map_or(SLOT_COUNT, |r| *r.start()), s.master));
        Ok(shards)
    }

    /// The master serving `slot` as the first running, unpaused node sees
    /// it, or `None` if no master does.
    ///
    /// # Panics
    ///
    /// If `slot` is not below [`SLOT_COUNT`].
    pub async fn master_of_slot(&self, slot: u16) -> Result<Option<NodeId>> {
        assert!(slot < SLOT_COUNT, "slot {slot} does not exist");
        let (seen_by, view) = self.any_view().await?;
        view.owner(slot)
            .map(|entry| self.node_of(seen_by, entry))
            .transpose()
    }

    /// Waits until the cluster is stable: every running, unpaused node
    /// answers `CLUSTER INFO` with `cluster_state:ok`, knows the same nodes
    /// in the same roles (which master each replica follows) and the same
    /// slot map (every slot served, by a running, unpaused
    /// master, none being imported or migrated), and every replica among
    /// them reports its link to its master up.
    ///
    /// One node saying `cluster_state:ok` is not enough: a write sent then
    /// can still be refused with `CLUSTERDOWN` by a node that has not caught
    /// up. Start-up and every fault method end with this wait.
    pub async fn wait_stable(&self, timeout: Duration) -> Result<()> {
        let what = "every node to report cluster_state:ok and the same slot map";
        let map = self
            .topology
            .poll(what, NodeId::data(0), timeout, || self.agreed_map())
            .await?;
        self.remember(map);
        Ok(())
    }

    /// One attempt of [`wait_stable`](Self::wait_stable): the slot map every
    /// reachable node agrees on.
    async fn agreed_map(&self) -> Result<SlotMap, Attempt> {
        let reachable = self.topology.reachable(self.nodes());
        let mut first: Option<(NodeId, View)> = None;
        for &node in &reachable {
            let view = self.checked_view(node).await?;
            let Some((first_node, first_view)) = &first else {
                first = Some((node, view));
                continue;
            };
            if view.roles() != first_view.roles() {
                return Err(pending(
                    node,
                    format!("knows other nodes or roles than {first_node} does"),
                ));
            }
            if view.slot_map() != first_view.slot_map() {
                return Err(pending(
                    node,
                    format!("sees another slot map than {first_node} does"),
                ));
            }
        }
        let (seen_by, view) =
            first.ok_or_else(|| pending(NodeId::data(0), "no node is running"))?;
        let ranges = view.slot_map();
        if let Some((a, b)) = view::first_gap(&ranges) {
            return Err(pending(seen_by, format!("no master serves slots {a}-{b}")));
        }
        let mut map = SlotMap::with_capacity(ranges.len());
        for (first, last, id) in ranges {
            let entry = view.entry(id).expect("the map's masters are entries");
            let master = self.node_of(seen_by, entry).map_err(Attempt::Fatal)?;
            if !reachable.contains(&master) {
                let reason = format!("serves slots {first}-{last} but is down or paused");
                return Err(pending(master, reason));
            }
            map.push((first..=last, master));
        }
        Ok(map)
    }

    /// `node`'s view, if it says `cluster_state:ok`, has no slot half-way
    /// through a migration, and (for a replica) has its master link up.
    async fn checked_view(&self, node: NodeId) -> Result<View, Attempt> {
        let redis_error = |source| pending_on(node)(Error::Redis { node, source });
        let mut connection = self.connection(node).await.map_err(pending_on(node))?;
        let (info, nodes): (String, String) = redis::pipe()
            .cmd("CLUSTER")
            .arg("INFO")
            .cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        let state = info_field(&info, "cluster_state").unwrap_or("missing");
        if state != "ok" {
            return Err(pending(node, format!("cluster_state is {state}")));
        }
        let view = View::parse(&nodes).map_err(|reason| pending(node, reason))?;
        if view.has_open_slots() {
            return Err(pending(node, "has a slot being imported or migrated"));
        }
        let myself = view
            .myself()
            .ok_or_else(|| pending(node, "CLUSTER NODES has no `myself` line"))?;
        if myself.is_replica() {
            let replication: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut connection)
                .await
                .map_err(redis_error)?;
            let link = info_field(&replication, "master_link_status").unwrap_or("missing");
            if link != "up" {
                return Err(pending(node, format!("master_link_status is {link}")));
            }
        }
        Ok(view)
    }

    /// What the last successful [`wait_stable`](Self::wait_stable) agreed on.
    fn stable_map(&self) -> SlotMap {
        self.stable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn remember(&self, map: SlotMap) {
        *self.stable.lock().unwrap_or_else(PoisonError::into_inner) = map;
    }

    // ----- what the cluster is made of -----

    /// The server binary every node runs: Redis or Valkey, and its version.
    pub fn server(&self) -> &Server {
        self.topology.server()
    }

    /// The command-line client that created the cluster.
    pub fn redis_cli(&self) -> &Path {
        &self.settings.redis_cli
    }

    /// The directory holding every node's config, `nodes.conf` and log.
    pub fn dir(&self) -> &Path {
        self.topology.dir()
    }

    /// Every node, in start order (those of [`add_shard`](Self::add_shard) last).
    pub fn nodes(&self) -> Vec<NodeId> {
        self.topology.data_nodes()
    }

    /// The address a node serves clients on (loopback); it keeps it across restarts.
    pub fn addr(&self, node: NodeId) -> SocketAddr {
        self.topology.addr(node)
    }

    /// The node serving clients on `addr`, if any (for `MOVED` and `ASK` replies).
    pub fn node_at(&self, addr: SocketAddr) -> Option<NodeId> {
        self.topology.node_at(addr)
    }

    /// How to connect to a node.
    pub fn connection_info(&self, node: NodeId) -> ConnectionInfo {
        self.topology.connection_info(node)
    }

    /// Opens a new multiplexed connection to a node, with a 1 s connect
    /// timeout and a 2 s response timeout (so that asking a paused node
    /// fails instead of hanging). It follows no redirection.
    pub async fn connection(&self, node: NodeId) -> Result<MultiplexedConnection> {
        self.topology.connection(node).await
    }

    /// Sends one command to a node on a new [`connection`](Self::connection)
    /// and returns the reply.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        node: NodeId,
        command: &redis::Cmd,
    ) -> Result<T> {
        self.topology.query(node, command).await
    }

    /// The OS process id of a node, or `None` while it is not running.
    pub fn pid(&self, node: NodeId) -> Option<u32> {
        self.topology.pid(node)
    }

    /// Whether a node's process is alive (a paused node is alive).
    pub fn is_running(&self, node: NodeId) -> bool {
        self.topology.is_running(node)
    }

    /// The last `lines` lines of a node's log.
    pub fn log_tail(&self, node: NodeId, lines: usize) -> String {
        self.topology.log_tail(node, lines)
    }
}
