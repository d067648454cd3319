//! A running topology: start-up and queries (faults are in `faults.rs`, every wait in `waits.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo, Role};
use tempfile::TempDir;

use crate::builder::TopologyBuilder;
use crate::error::{Error, Result};
use crate::network::{self, Network};
use crate::node::{NodeId, NodeKind, NodeProcess};
use crate::server::{self, Server};
use crate::tls::{self, TlsFiles};
use crate::{orphans, ports};

/// How many ports a new node tries when it loses the race for one.
const PORT_ATTEMPTS: usize = 5;
/// How many log lines an error carries.
const LOG_TAIL_LINES: usize = 20;
/// Bounds every command the topology sends, so a paused node cannot hang a wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A running set of local `redis-server` processes: one master, its
/// replicas, and optionally sentinels watching them.
///
/// Every process runs on a loopback port chosen at start (or in a network
/// namespace of its own: [`cut`](Self::cut)), with its config and
/// log in a directory of its own under [`dir`](Self::dir). Dropping the
/// topology SIGKILLs every process it started (paused ones included) and
/// removes the directory, also when the drop happens while a test panics.
///
/// Methods taking a [`NodeId`] panic if the id comes from a topology with
/// more nodes of that kind; ids are only ever obtained from the topology.
#[derive(Debug)]
pub struct Topology {
    pub(crate) settings: TopologyBuilder,
    binary: PathBuf,
    server: Server,
    tls: Option<TlsFiles>,
    nodes: Mutex<Nodes>,
    /// With `network_namespaces`; dropped after the processes are killed.
    pub(crate) network: Option<Network>,
    /// Held while the topology lives; see `orphans`.
    _owner_lock: std::fs::File,
    // Declared last: the directory goes only after Drop has killed the processes.
    dir: TempDir,
}

#[derive(Debug, Default)]
pub(crate) struct Nodes {
    data: Vec<NodeProcess>,
    sentinels: Vec<NodeProcess>,
    /// The ports handed out to the nodes, kept from other processes while
    /// the topology lives (see `ports`).
    reserved: Vec<ports::Reservation>,
}

impl Nodes {
    pub(crate) fn get(&mut self, id: NodeId) -> &mut NodeProcess {
        let list = match id.kind() {
            NodeKind::Data => &mut self.data,
            NodeKind::Sentinel => &mut self.sentinels,
        };
        list.get_mut(id.index())
            .unwrap_or_else(|| panic!("{id} does not belong to this topology"))
    }

    fn all(&mut self) -> impl Iterator<Item = &mut NodeProcess> {
        self.data.iter_mut().chain(self.sentinels.iter_mut())
    }
}

impl Topology {
    /// A builder with the defaults: 2 replicas, 3 sentinels, fast failover.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// The topology's directory, server and (if set) TLS files and network,
    /// with no node started yet. A [`Cluster`](crate::Cluster) starts its
    /// own nodes in it.
    pub(crate) fn without_nodes(settings: TopologyBuilder) -> Result<Self> {
        let (binary, server) = server::resolve(&settings.redis_server)?;
        let temp_dir = std::env::temp_dir();
        orphans::sweep(&temp_dir);
        let mut dir = tempfile::Builder::new()
            .prefix(orphans::DIR_PREFIX)
            .tempdir_in(&temp_dir)
            .map_err(|source| Error::Io {
                path: temp_dir,
                source,
            })?;
        dir.disable_cleanup(settings.keep_dir);
        let io_error = |path: PathBuf| move |source| Error::Io { path, source };
        let owner_lock =
            orphans::hold_owner_lock(dir.path()).map_err(io_error(dir.path().into()))?;
        if settings.keep_dir {
            let keep = dir.path().join(orphans::KEEP_FILE);
            std::fs::write(&keep, "").map_err(io_error(keep))?;
        }
        let tls = if settings.tls {
            Some(tls::generate(dir.path())?)
        } else {
            None
        };
        Ok(Self {
            network: Network::for_settings(&settings)?,
            settings,
            binary,
            server,
            tls,
            nodes: Mutex::default(),
            _owner_lock: owner_lock,
            dir,
        })
    }

    pub(crate) async fn start(settings: TopologyBuilder) -> Result<Self> {
        let topology = Self::without_nodes(settings)?;
        // From here on, an early return drops `topology`, which kills what it started.
        let settings = &topology.settings;
        let tls = topology.tls.as_ref();
        let master = NodeId::data(0);
        let master_addr = topology
            .spawn_node(master, |addr| settings.data_config(addr, None, tls))
            .await?;
        for index in 1..=settings.replicas {
            topology
                .spawn_node(NodeId::data(index), |addr| {
                    settings.data_config(addr, Some(master_addr), tls)
                })
                .await?;
        }
        // Sentinels start only once replication is up, so their first INFO of
        // the master already lists every replica (the next one is 10 s later).
        for replica in topology.data_nodes().into_iter().skip(1) {
            topology
                .wait_for_replica_of(replica, master, settings.start_timeout)
                .await?;
        }
        topology.wait_for_replication_stream(master).await?;
        for index in 0..settings.sentinels {
            topology
                .spawn_node(NodeId::sentinel(index), |addr| {
                    settings.sentinel_config(addr, master_addr, tls)
                })
                .await?;
        }
        for sentinel in topology.sentinels() {
            topology.wait_for_sentinel_view(sentinel, master).await?;
        }
        Ok(topology)
    }

    /// Starts a new node on a free port, trying another port when a
    /// concurrent process takes the chosen one first. Returns its address.
    pub(crate) async fn spawn_node(
        &self,
        id: NodeId,
        config: impl Fn(SocketAddr) -> String,
    ) -> Result<SocketAddr> {
        let (ip, launcher) = network::placement(self.network.as_ref(), id);
        let mut port = 0;
        for _ in 0..PORT_ATTEMPTS {
            port = self.reserve_port(id)?;
            let addr = SocketAddr::new(ip, port);
            let place = (addr, launcher.clone());
            let process =
                NodeProcess::spawn(id, self.dir.path(), &self.binary, place, &config(addr))?;
            {
                let mut nodes = self.lock();
                let list = match id.kind() {
                    NodeKind::Data => &mut nodes.data,
                    NodeKind::Sentinel => &mut nodes.sentinels,
                };
                // A retry replaces the entry of the attempt that lost its port.
                list.truncate(id.index());
                list.push(process);
            }
            if self.wait_until_answering(id).await? {
                return Ok(addr);
            }
        }
        Err(Error::PortTaken { node: id, port })
    }

    /// A free port for `id`, reserved while the topology lives.
    pub(crate) fn reserve_port(&self, id: NodeId) -> Result<u16> {
        let (port, reservation) = ports::pick_free_port().ok_or(Error::NoFreePort { node: id })?;
        self.lock().reserved.push(reservation);
        Ok(port)
    }

    /// The log file of a node and its last lines, for an error.
    pub(crate) fn log_of(&self, node: NodeId) -> (PathBuf, String) {
        let mut nodes = self.lock();
        let process = nodes.get(node);
        (
            process.log_path().to_owned(),
            process.log_tail(LOG_TAIL_LINES),
        )
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Nodes> {
        // A panic elsewhere cannot leave `Nodes` inconsistent: keep going.
        self.nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn require_kind(node: NodeId, kind: NodeKind, reason: &'static str) -> Result<()> {
        if node.kind() == kind {
            Ok(())
        } else {
            Err(Error::WrongKind { node, reason })
        }
    }

    // ----- what the topology is made of -----

    /// The server binary every node runs: Redis or Valkey, and its version.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The command-line client that goes with the server, as set by
    /// [`TopologyBuilder::redis_cli`].
    pub fn redis_cli(&self) -> &Path {
        &self.settings.redis_cli
    }

    /// The directory holding every node's config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The name the sentinels know the master by.
    pub fn master_name(&self) -> &str {
        &self.settings.master_name
    }

    /// The data node started as master (`redis-0`). After a failover it may
    /// be a replica or down; ask [`masters`](Self::masters) for the current one.
    pub fn initial_master(&self) -> NodeId {
        NodeId::data(0)
    }

    /// Every data node, the initial master first.
    pub fn data_nodes(&self) -> Vec<NodeId> {
        (0..self.lock().data.len()).map(NodeId::data).collect()
    }

    /// Every sentinel.
    pub fn sentinels(&self) -> Vec<NodeId> {
        (0..self.settings.sentinels).map(NodeId::sentinel).collect()
    }

    /// The address of every sentinel, for clients that discover the master through Sentinel.
    pub fn sentinel_addrs(&self) -> Vec<SocketAddr> {
        self.sentinels().into_iter().map(|s| self.addr(s)).collect()
    }

    /// The address a node listens on: loopback, or with network namespaces
    /// its own. It keeps it across restarts.
    pub fn addr(&self, node: NodeId) -> SocketAddr {
        self.lock().get(node).addr()
    }

    /// The node listening on `addr`, if any.
    pub fn node_at(&self, addr: SocketAddr) -> Option<NodeId> {
        let mut nodes = self.lock();
        nodes.all().find(|n| n.addr() == addr).map(|n| n.id)
    }

    /// How to connect to a node, with the credentials its kind requires
    /// (the data nodes' user and password, or the sentinels' password), over
    /// TLS when the topology uses it (then also trust [`tls_root_cert`](Self::tls_root_cert)).
    pub fn connection_info(&self, node: NodeId) -> ConnectionInfo {
        let (user, password) = match node.kind() {
            NodeKind::Data => self.settings.data_credentials(),
            NodeKind::Sentinel => (None, self.settings.sentinel_password.as_deref()),
        };
        let mut redis = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(user) = user {
            redis = redis.set_username(user);
        }
        if let Some(password) = password {
            redis = redis.set_password(password);
        }
        let (host, port) = (self.addr(node).ip().to_string(), self.addr(node).port());
        let addr = match self.tls {
            Some(_) => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            },
            None => ConnectionAddr::Tcp(host, port),
        };
        addr.into_connection_info()
            .expect("a TCP address is always valid connection info")
            .set_redis_settings(redis)
    }

    /// With [`TopologyBuilder::tls`], the CA certificate (PEM) that signed
    /// every node's certificate: clients trust it
    /// (`redis::Client::build_with_tls` with it as `root_cert`).
    pub fn tls_root_cert(&self) -> Option<&[u8]> {
        self.tls.as_ref().map(|tls| tls.ca_pem.as_slice())
    }

    /// The OS process id of a node, or `None` while it is not running.
    pub fn pid(&self, node: NodeId) -> Option<u32> {
        let mut nodes = self.lock();
        let process = nodes.get(node);
        if process.is_running() {
            process.pid()
        } else {
            None
        }
    }

    /// Whether a node's process is alive (a paused node is alive).
    pub fn is_running(&self, node: NodeId) -> bool {
        self.lock().get(node).is_running()
    }

    /// The last `lines` lines of a node's log.
    pub fn log_tail(&self, node: NodeId, lines: usize) -> String {
        self.lock().get(node).log_tail(lines)
    }

    // ----- talking to nodes -----

    /// Opens a new multiplexed connection to a node, with the credentials
    /// its kind requires, a 1 s connect timeout and a 2 s response timeout
    /// (so that asking a paused node fails instead of hanging).
    pub async fn connection(&self, node: NodeId) -> Result<MultiplexedConnection> {
        self.connection_waiting(node, RESPONSE_TIMEOUT).await
    }

    /// A [`connection`](Self::connection) whose replies may take up to
    /// `response_timeout`: for commands that wait on purpose.
    pub(crate) async fn connection_waiting(
        &self,
        node: NodeId,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection> {
        let redis_error = |source| Error::Redis { node, source };
        let client = match self.tls_root_cert() {
            Some(root_cert) => redis::Client::build_with_tls(
                self.connection_info(node),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert.to_vec()),
                },
            ),
            None => redis::Client::open(self.connection_info(node)),
        }
        .map_err(redis_error)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(redis_error)
    }

    /// Sends one command to a node on a new [`connection`](Self::connection)
    /// and returns the reply.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        node: NodeId,
        command: &redis::Cmd,
    ) -> Result<T> {
        let mut connection = self.connection(node).await?;
        command
            .query_async(&mut connection)
            .await
            .map_err(|source| Error::Redis { node, source })
    }

    /// `SET key value` on `node`, then `WAIT replicas 1500` on the same
    /// connection (`WAIT` counts the acknowledgements of its own
    /// connection's writes); returns how many replicas acknowledged. The
    /// 1.5 s stays under the connection's 2 s response timeout.
    pub async fn set_and_wait(
        &self,
        node: NodeId,
        key: &str,
        value: &str,
        replicas: usize,
    ) -> Result<usize> {
        let mut connection = self.connection(node).await?;
        let (acked,): (usize,) = redis::pipe()
            .set(key, value)
            .ignore()
            .cmd("WAIT")
            .arg(replicas)
            .arg(1500)
            .query_async(&mut connection)
            .await
            .map_err(|source| Error::Redis { node, source })?;
        Ok(acked)
    }

    /// The node's answer to `ROLE`.
    pub async fn role(&self, node: NodeId) -> Result<Role> {
        self.query(node, &redis::cmd("ROLE")).await
    }

    /// The running, unpaused data nodes whose `ROLE` says master.
    ///
    /// Normally one; none while a failover is under way, and two when an old
    /// master came back and has not been turned into a replica yet.
    pub async fn masters(&self) -> Result<Vec<NodeId>> {
        let mut masters = Vec::new();
        for node in self.reachable(self.data_nodes()) {
            if matches!(self.role(node).await?, Role::Primary { .. }) {
                masters.push(node);
            }
        }
        Ok(masters)
    }

    /// The master address a sentinel currently reports
    /// (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    pub async fn sentinel_master_addr(&self, sentinel: NodeId) -> Result<Option<SocketAddr>> {
        Self::require_kind(
            sentinel,
            NodeKind::Sentinel,
            "only a sentinel knows the master's address",
        )?;
        let reply: Option<(String, u16)> = self
            .query(
                sentinel,
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(self.master_name()),
            )
            .await?;
        Ok(reply.and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port))))
    }

    /// Of `nodes`, those running and not paused.
    pub(crate) fn reachable(&self, nodes: Vec<NodeId>) -> Vec<NodeId> {
        let mut all = self.lock();
        nodes
            .into_iter()
            .filter(|&id| {
                let process = all.get(id);
                process.is_running() && !process.is_paused()
            })
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for process in self.lock().all() {
            process.kill();
        }
    }
}

/// The value of `field` in an `INFO` reply.
pub(crate) fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}
