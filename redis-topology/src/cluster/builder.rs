//! The cluster builder: settings, their validation, and the cluster lines
//! of each node's config.

use std::path::PathBuf;
use std::time::Duration;

use crate::builder::TopologyBuilder;
use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::server;

/// Settings for a local Redis Cluster; [`start`](Self::start) launches it.
///
/// ```no_run
/// # async fn run() -> redis_topology::Result<()> {
/// use std::time::Duration;
///
/// let cluster = redis_topology::Cluster::builder()
///     .shards(3)
///     .replicas_per_shard(1)
///     .node_timeout(Duration::from_millis(2000))
///     .start()
///     .await?;
/// println!("{} nodes", cluster.nodes().len());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct ClusterBuilder {
    pub(crate) shards: usize,
    pub(crate) replicas_per_shard: usize,
    node_timeout: Duration,
    extra_config: Vec<String>,
    pub(crate) redis_server: PathBuf,
    pub(crate) redis_cli: PathBuf,
    pub(crate) wait_timeout: Duration,
    keep_dir: Option<bool>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            shards: 3,
            replicas_per_shard: 1,
            node_timeout: Duration::from_millis(2000),
            extra_config: Vec::new(),
            redis_server: server::default_server_bin(),
            redis_cli: server::default_cli_bin(),
            wait_timeout: Duration::from_secs(30),
            keep_dir: None,
        }
    }
}

impl ClusterBuilder {
    /// How many shards (masters, each serving a share of the slots) the
    /// cluster is created with. Defaults to 3, the fewest
    /// `redis-cli --cluster create` accepts; [`Cluster::add_shard`] adds more.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// How many replicas each shard's master has. Defaults to 1.
    pub fn replicas_per_shard(mut self, replicas: usize) -> Self {
        self.replicas_per_shard = replicas;
        self
    }

    /// `cluster-node-timeout`: how long a node must be unreachable before
    /// the others flag it as failed and its replica takes over. Defaults to
    /// 2000 ms (Redis's own default is 15 s), which puts a failover about
    /// 4-5 s after a master dies. Much less makes a loaded machine's stalls
    /// look like failures, and failovers nobody asked for.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// Appends one line to every node's `redis.conf` (for example
    /// `maxmemory 64mb`). Defaults to none.
    pub fn extra_config(mut self, line: impl Into<String>) -> Self {
        self.extra_config.push(line.into());
        self
    }

    /// The server binary every node runs (`redis-server` >= 7.0, for
    /// `cluster-port`, or `valkey-server`). Defaults to the environment
    /// variable `REDIS_SERVER_BIN` if set and not empty, else `redis-server`.
    pub fn redis_server(mut self, binary: impl Into<PathBuf>) -> Self {
        self.redis_server = binary.into();
        self
    }

    /// The command-line client matching the server (`redis-cli` or
    /// `valkey-cli`), which creates the cluster. Defaults to
    /// the environment variable `REDIS_CLI_BIN` if set and not empty, else
    /// `redis-cli`.
    pub fn redis_cli(mut self, binary: impl Into<PathBuf>) -> Self {
        self.redis_cli = binary.into();
        self
    }

    /// How long each step of start-up (a node answering, `redis-cli
    /// --cluster create`, the cluster becoming stable) may take, and how long
    /// each change ([`Cluster::failover`], [`Cluster::move_slot`],
    /// [`Cluster::add_shard`], [`Cluster::rebalance`]) may take to leave the
    /// cluster stable again. Defaults to 30 s.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// Keeps the cluster's directory (every node's config, `nodes.conf` and
    /// log) when the cluster is dropped; the processes are killed all the
    /// same. Defaults as [`TopologyBuilder::keep_dir`] does: false, unless
    /// `REDIS_TOPOLOGY_KEEP_DIR` is set.
    pub fn keep_dir(mut self, keep: bool) -> Self {
        self.keep_dir = Some(keep);
        self
    }

    /// Starts every node, creates the cluster with `redis-cli --cluster
    /// create`, and returns once it is stable: see [`Cluster::wait_stable`].
    ///
    /// On error, every process started so far is killed.
    pub async fn start(self) -> Result<Cluster> {
        self.validate()?;
        Cluster::start(self).await
    }

    fn validate(&self) -> Result<()> {
        let invalid = |setting, reason: &str| {
            Err(Error::InvalidConfig {
                setting,
                reason: reason.to_owned(),
            })
        };
        if self.shards < 3 {
            return invalid(
                "shards",
                "must be at least 3 (`redis-cli --cluster create` needs 3 masters)",
            );
        }
        if self.node_timeout < Duration::from_millis(100) {
            return invalid("node_timeout", "must be at least 100 ms");
        }
        if self.wait_timeout.is_zero() {
            return invalid("wait_timeout", "must be more than zero");
        }
        if self
            .extra_config
            .iter()
            .any(|line| line.contains(['\n', '\r']))
        {
            return invalid("extra_config", "each entry must be a single line");
        }
        Ok(())
    }

    /// The settings of the node set underneath: data nodes only, started
    /// one by one by the cluster.
    pub(crate) fn topology_settings(&self) -> TopologyBuilder {
        let mut settings = TopologyBuilder::default()
            .replicas(0)
            .sentinels(0)
            .redis_server(&self.redis_server)
            .redis_cli(&self.redis_cli)
            .start_timeout(self.wait_timeout);
        if let Some(keep) = self.keep_dir {
            settings = settings.keep_dir(keep);
        }
        self.extra_config
            .iter()
            .fold(settings, |settings, line| settings.extra_config(line))
    }

    /// The lines that make a node a cluster node whose bus listens on `bus_port`.
    pub(crate) fn cluster_config(&self, bus_port: u16) -> String {
        // `cluster-port`: the default bus port (client port + 10000) could
        // be another node's client port, or in the ephemeral range.
        // `cluster-replica-validity-factor 0`: a replica whose link was down
        // for a while (a stalled test machine) may still take over, so a
        // shard is never left without a master.
        format!(
            "cluster-enabled yes\n\
             cluster-config-file nodes.conf\n\
             cluster-node-timeout {}\n\
             cluster-port {bus_port}\n\
             cluster-replica-validity-factor 0\n",
            self.node_timeout.as_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected_setting(builder: ClusterBuilder) -> &'static str {
        match builder.validate() {
            Err(Error::InvalidConfig { setting, .. }) => setting,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_three_shards_of_two_nodes() {
        let builder = ClusterBuilder::default();
        builder.validate().unwrap();
        assert_eq!((builder.shards, builder.replicas_per_shard), (3, 1));
        let conf = builder.cluster_config(20001);
        for line in [
            "cluster-enabled yes",
            "cluster-node-timeout 2000",
            "cluster-port 20001",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line:?} in\n{conf}");
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let b = ClusterBuilder::default;
        assert_eq!(rejected_setting(b().shards(2)), "shards");
        assert_eq!(
            rejected_setting(b().node_timeout(Duration::from_millis(10))),
            "node_timeout"
        );
        assert_eq!(
            rejected_setting(b().wait_timeout(Duration::ZERO)),
            "wait_timeout"
        );
        assert_eq!(rejected_setting(b().extra_config("a\nb")), "extra_config");
    }
}
