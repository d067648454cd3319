//! Redis Cluster mode: its builder, and what a client tells of the
//! cluster's masters.

use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, FromRedisValue};
use tokio_util::sync::CancellationToken;

use crate::addr::{NodeAddr, Resolve};
use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::builder::FailoverClientBuilder;
use crate::client::{FailoverClient, convert};
use crate::cluster_reads::ReadSettings;
use crate::cluster_state::{ClusterSettings, ClusterShared, refresh_loop};
use crate::error::{Error, Result};
use crate::events::Telemetry;
use crate::node::{Connector, Credentials, Tls};
use crate::node_metrics::NodeMetrics;
use crate::request::Request;
use crate::routing::{Durability, ReadPolicy};
use crate::slots::slot_of;

/// How often the slot map is loaded again by default, besides on `MOVED`,
/// `READONLY` and lost masters.
const DEFAULT_SLOT_REFRESH: Duration = Duration::from_secs(15);

impl FailoverClient {
    /// A client of a Redis Cluster that learns the slot map from any of
    /// `seed_nodes` (`CLUSTER SLOTS`), and sends each request to the
    /// master of its key's slot, retrying through redirects and failovers
    /// within the retry budget. See the crate docs, "Redis Cluster".
    pub fn cluster(seed_nodes: impl IntoIterator<Item = NodeAddr>) -> ClusterClientBuilder {
        let seeds: Vec<NodeAddr> = seed_nodes.into_iter().collect();
        ClusterClientBuilder {
            // The settings shared with the other modes live in their builder.
            base: FailoverClient::candidates(seeds.clone()),
            seeds,
            slot_refresh_interval: DEFAULT_SLOT_REFRESH,
        }
    }
}

/// Settings of a Redis Cluster client; start from [`FailoverClient::cluster`].
/// The settings it shares with the other modes have the same defaults.
#[derive(Clone, Debug)]
#[must_use]
pub struct ClusterClientBuilder {
    base: FailoverClientBuilder,
    seeds: Vec<NodeAddr>,
    slot_refresh_interval: Duration,
}

impl ClusterClientBuilder {
    /// Credentials for the cluster's nodes. Defaults to none.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.base = self.base.credentials(credentials);
        self
    }

    /// TLS to the cluster's nodes. Defaults to plain TCP.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.base = self.base.tls(tls);
        self
    }

    /// How node names are resolved. Defaults to the system's resolver.
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.base = self.base.resolver(resolver);
        self
    }

    /// How long a connection may take to open. Defaults to 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.base = self.base.connect_timeout(timeout);
        self
    }

    /// How long one try of a request may wait for its reply. Defaults to
    /// 500 ms.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.base = self.base.command_timeout(timeout);
        self
    }

    /// How long a request may take through redirects and failovers
    /// before it fails. Defaults to 30 s.
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.base = self.base.retry_budget(budget);
        self
    }

    /// The waits between tries. Defaults to 10 ms doubling up to 500 ms.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.base = self.base.backoff(backoff);
        self
    }

    /// How many events a subscriber may lag behind before it misses the
    /// oldest. Defaults to 1024.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.base = self.base.event_capacity(capacity);
        self
    }

    /// How writes are made durable unless a call says otherwise
    /// ([`FailoverClient::with_durability`]): after a write, a `WAIT` (or
    /// `WAITAOF`) on the master that ran it, shared by concurrent writes
    /// to that master. Unlike with one master, a write is not held back
    /// while its master has fewer replicas than asked: it runs, and the
    /// shortfall is [`Error::NotReplicated`]. Defaults to
    /// [`Durability::Master`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.base = self.base.durability(durability);
        self
    }

    /// Where reads ([`FailoverClient::read`], [`FailoverClient::get`],
    /// [`FailoverClient::read_pipeline`], [`FailoverClient::read_connection`])
    /// go unless a handle says otherwise ([`FailoverClient::with_read_policy`]):
    /// by the rules of the one-master modes, among the master of the key's
    /// slot and its replicas (as `CLUSTER SLOTS` lists them) that are within
    /// [`max_staleness`](Self::max_staleness). Keyless reads, blocking reads
    /// and reads of a [`Session`](crate::Session) go to a master. Defaults
    /// to [`ReadPolicy::Master`].
    pub fn read_policy(mut self, policy: ReadPolicy) -> Self {
        self.base = self.base.read_policy(policy);
        self
    }

    /// How stale a replica may be and still serve reads, measured as in
    /// the one-master modes against its own master
    /// ([`FailoverClientBuilder::max_staleness`]). Defaults to 5 s; must be
    /// at least two probe intervals.
    pub fn max_staleness(mut self, bound: Duration) -> Self {
        self.base = self.base.max_staleness(bound);
        self
    }

    /// How often each master and its replicas are probed (`INFO
    /// replication`) once reads use replicas. Defaults to 500 ms.
    pub fn replica_probe_interval(mut self, interval: Duration) -> Self {
        self.base = self.base.replica_probe_interval(interval);
        self
    }

    /// Replicas for which `prefer` returns true are used first; the others
    /// only when none of those qualifies. Defaults to no preference.
    pub fn prefer_replicas(
        mut self,
        prefer: impl Fn(&NodeAddr) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.base = self.base.prefer_replicas(prefer);
        self
    }

    /// How many connections of its own (blocking commands, transactions)
    /// each master may have open at once. Defaults to 16.
    pub fn dedicated_connections(mut self, connections: u32) -> Self {
        self.base = self.base.dedicated_connections(connections);
        self
    }

    /// How often the slot map is loaded again even when nothing asked for
    /// it (`MOVED`, `READONLY` and unreachable masters ask at once).
    /// Defaults to 15 s.
    pub fn slot_refresh_interval(mut self, interval: Duration) -> Self {
        self.slot_refresh_interval = interval;
        self
    }

    /// Checks the settings and starts the client (its slot map refresh
    /// runs in the background until the last clone is dropped). Must be
    /// called within a Tokio runtime. No node is contacted before the
    /// first request.
    pub fn build(self) -> Result<FailoverClient> {
        if self.seeds.is_empty() {
            return Err(invalid("seed_nodes", "at least one node is needed"));
        }
        if self.slot_refresh_interval.is_zero() {
            return Err(invalid("slot_refresh_interval", "must be more than zero"));
        }
        self.base.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| invalid("runtime", "build() must be called within a Tokio runtime"))?;
        let base = &self.base;
        let connector = Connector::new(
            Arc::clone(&base.resolver),
            base.credentials.clone(),
            base.tls.clone(),
            base.connect_timeout,
            base.command_timeout,
        );
        let settings = ClusterSettings {
            seeds: self.seeds,
            policy: base.retry_policy(),
            refresh_interval: self.slot_refresh_interval,
            dedicated_connections: base.dedicated_connections,
            reads: ReadSettings {
                max_staleness: base.max_staleness,
                probe_interval: base.replica_probe_interval,
                preference: base.replica_preference.clone(),
            },
        };
        let telemetry = Telemetry::new(base.event_capacity);
        let stopped = CancellationToken::new();
        let shared = Arc::new(ClusterShared::new(
            settings,
            connector,
            telemetry,
            stopped.clone(),
        ));
        runtime.spawn(refresh_loop(Arc::clone(&shared), stopped.clone()));
        Ok(FailoverClient::with_backend(
            Backend::Cluster(shared),
            stopped,
            base.read_policy,
            base.durability,
        ))
    }
}

fn invalid(setting: &'static str, reason: &str) -> Error {
    Error::InvalidConfig {
        setting,
        reason: reason.to_owned(),
    }
}

impl FailoverClient {
    /// Whether this is a Redis Cluster client ([`FailoverClient::cluster`]).
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend(), Backend::Cluster(_))
    }

    /// The masters requests go to now: every master of the cluster's slot
    /// map, or the one master, if known.
    pub fn masters(&self) -> Vec<NodeAddr> {
        match self.backend() {
            Backend::Cluster(cluster) => cluster.masters(),
            Backend::Replicated(_) => self.master().into_iter().map(|m| m.node).collect(),
        }
    }

    /// A number that changes whenever [`masters`](Self::masters) changes:
    /// with one master, its generation ([`MasterInfo`]); on a cluster, a
    /// count of the changes of the client's slot map that added or removed
    /// a master (a failover, a shard added or emptied, learnt from a
    /// `MOVED` or a reload of the map), not of every reload. `None` while
    /// no master is known. State kept per master (a tracking connection on
    /// each) must be set up again when it changes; what happens on the
    /// nodes before the client's map learns of it is for that state to
    /// detect (a master restarted at the same address, one cut off).
    ///
    /// [`MasterInfo`]: crate::MasterInfo
    pub fn masters_epoch(&self) -> Option<u64> {
        match self.backend() {
            Backend::Cluster(cluster) => cluster.masters_epoch(),
            Backend::Replicated(_) => self.master().map(|m| m.generation),
        }
    }

    /// Asks a cluster client to load its slot map again soon (at most one
    /// load per 100 ms, whoever asks), for a caller that saw a node change
    /// role before any request of the client met a `MOVED`. Nothing with
    /// one master, whose changes the client follows itself.
    pub fn reload_slot_map(&self) {
        if let Backend::Cluster(cluster) = self.backend() {
            cluster.refresh_soon();
        }
    }

    /// A cluster client's figures per node it sent requests to (see
    /// [`NodeMetrics`] for what counts), ordered by address: to see a hot
    /// or failing shard.
    /// Empty with one master, whose figures are [`metrics`](Self::metrics).
    pub fn node_metrics(&self) -> Vec<NodeMetrics> {
        match self.backend() {
            Backend::Cluster(cluster) => cluster.per_node.snapshot(),
            Backend::Replicated(_) => Vec::new(),
        }
    }

    /// Sends `cmd` to the master `node`, one of [`masters`](Self::masters),
    /// and converts the reply: for what each master answers for its own
    /// keys (`SCAN`, `DBSIZE`, `CONFIG SET`, `FLUSHALL`...). Retried like
    /// [`query`](Self::query) while `node` cannot be reached, within the
    /// retry budget; a node that is no master any more refuses it (a
    /// `MOVED` or `READONLY` error: load [`masters`](Self::masters) again).
    /// With one master, it goes to the master requests go to now, which
    /// has every key, whatever `node`.
    pub async fn query_on<T: FromRedisValue>(&self, node: &NodeAddr, cmd: &Cmd) -> Result<T> {
        let (node, reply) = self.send_to(node, Request::Command(cmd), false).await?;
        convert(&node, reply)
    }

    /// The master the client sends `key`'s requests to now, if it knows.
    pub fn master_of(&self, key: &str) -> Option<NodeAddr> {
        match self.backend() {
            Backend::Cluster(cluster) => cluster.route(Some(slot_of(key.as_bytes()))),
            Backend::Replicated(_) => self.master().map(|m| m.node),
        }
    }
}
