//! The dev mode: the whole service on a real local Redis topology, with
//! demo tenants and users, in one call.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log_buffer::{BufferLayer, LogSink};
use redis_failover::FailoverClient;
use redis_topology::{Cluster, Topology};
use tenant_kv::{Actor, LoginThrottle, NewUser, Quotas, TenantId, TenantKv};

use crate::error::Error;
use crate::{Limits, Settings, ShutdownReport, System};

/// The demo users, as (username, tenant); `admin` manages every API key
/// of its tenant.
pub const DEMO_USERS: [(&str, &str); 3] = [
    ("user1", "tenant1"),
    ("admin", "tenant1"),
    ("user2", "tenant2"),
];

/// What [`DevSystem::start`] runs.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// Where the server listens. Defaults to `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Ship logs to this Loki instead of a file. Defaults to none.
    pub loki_url: Option<String>,
    /// The file logs are shipped to without Loki. Defaults to `logs.ndjson`
    /// in the topology's directory (removed on shutdown).
    pub log_file: Option<PathBuf>,
    /// Request limits. Defaults to [`Limits::default`].
    pub limits: Limits,
    /// How long a request may wait through a failover. Defaults to 8 s.
    pub retry_budget: Duration,
    /// The HS256 secret of tokens. Defaults to 32 random bytes.
    pub jwt_secret: Option<Vec<u8>>,
    /// Where `/metrics` and the probes are served. Defaults to
    /// `127.0.0.1:0` (a free port: see [`DevSystem::admin_addr`]).
    pub admin_listen: Option<SocketAddr>,
    /// Every tenant's quotas. Defaults to [`Quotas::default`].
    pub quotas: Quotas,
    /// Login throttling. Defaults to [`LoginThrottle::default`].
    pub login_throttle: LoginThrottle,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            loki_url: None,
            log_file: None,
            limits: Limits::default(),
            retry_budget: Duration::from_secs(8),
            jwt_secret: None,
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            quotas: Quotas::default(),
            login_throttle: LoginThrottle::default(),
        }
    }
}

/// A running dev system: a master, 2 replicas and 3 sentinels on free
/// loopback ports ([`DevSystem::start`]), or a Redis Cluster
/// ([`DevSystem::start_cluster`]), and a [`System`] on them (as `server
/// serve` runs it) whose offloader ships to a file or Loki, with demo users.
#[derive(Debug)]
pub struct DevSystem<T = Topology> {
    /// The local topology ([`Topology`] or [`Cluster`]); dropping it kills
    /// every Redis process.
    pub topology: T,
    /// The server's failover client (Sentinel or cluster discovery).
    pub client: FailoverClient,
    /// The store the server uses.
    pub store: TenantKv,
    /// The password of every demo user ([`DEMO_USERS`]).
    pub password: String,
    /// Where logs are shipped: a file path or the Loki URL.
    pub logs_to: String,
    system: System,
}

impl DevSystem {
    /// Starts everything; needs `redis-server` on `PATH`.
    pub async fn start(options: DevOptions) -> Result<Self, Error> {
        let topology = Topology::builder().replicas(2).sentinels(3).start().await?;
        let settings = settings(topology_settings(&topology, [])?, &options)?;
        Self::run(topology, settings, &options).await
    }
}

impl DevSystem<Cluster> {
    /// Starts everything on a local Redis Cluster of `shards` shards of a
    /// master and one replica; needs `redis-server` 7 or later on `PATH`.
    pub async fn start_cluster(options: DevOptions, shards: usize) -> Result<Self, Error> {
        let cluster = Cluster::builder()
            .shards(shards)
            .replicas_per_shard(1)
            .start()
            .await?;
        let settings = settings(cluster_settings(&cluster, [])?, &options)?;
        Self::run(cluster, settings, &options).await
    }
}

impl<T: Dir> DevSystem<T> {
    /// Starts the system on `topology`, its client waits for Redis, and
    /// the demo users are created.
    async fn run(topology: T, settings: Settings, options: &DevOptions) -> Result<Self, Error> {
        let (sink, logs_to): (Box<dyn LogSink>, String) = match &options.loki_url {
            Some(url) => (
                Box::new(log_buffer::LokiSink::builder(url.clone()).build()?),
                url.clone(),
            ),
            None => {
                let path = options
                    .log_file
                    .clone()
                    .unwrap_or_else(|| topology.dir().join("logs.ndjson"));
                let shown = path.display().to_string();
                (Box::new(log_buffer::FileSink::new(path)), shown)
            }
        };
        let system = System::builder(settings).log_sink(sink).start().await?;
        let (client, store) = (system.client().clone(), system.store().clone());
        client.wait_for_master(Duration::from_secs(10)).await?;
        let password = random_password();
        let users = store.users();
        for (username, tenant) in DEMO_USERS {
            let user = NewUser {
                username: username.to_owned(),
                tenant: TenantId::new(tenant)?,
                email: Some(format!("{username}@{tenant}.example")),
                full_name: None,
                admin: username == "admin",
            };
            users.create(user, &password, &Actor::system()).await?;
        }
        Ok(Self {
            topology,
            client,
            store,
            password,
            logs_to,
            system,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.system.local_addr()
    }

    /// The address serving `/metrics` and the probes, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.system.admin_addr()
    }

    /// The layer feeding the log buffer, to install in the process's
    /// `tracing` subscriber (once: later calls return `None`).
    pub fn take_log_layer(&mut self) -> Option<BufferLayer> {
        self.system.take_log_layer()
    }

    /// Shuts the system down (draining requests, flushing logs), then
    /// the topology.
    pub async fn shutdown(self) -> ShutdownReport {
        let report = self.system.shutdown().await;
        drop(self.topology);
        report
    }
}

/// The settings of a server on `topology` (its sentinels, its master's
/// name) and the `SERVER_*` variables of `env`, read as `server serve`
/// reads a deployment's.
pub fn topology_settings(
    topology: &Topology,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, Error> {
    let sentinels: Vec<String> = topology
        .sentinel_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    let discovery = [
        ("SERVER_REDIS_SENTINELS".to_owned(), sentinels.join(",")),
        (
            "SERVER_REDIS_MASTER_NAME".to_owned(),
            topology.master_name().to_owned(),
        ),
    ];
    Ok(Settings::load(None, discovery.into_iter().chain(env))?)
}

/// The settings of a server on the local Redis Cluster `cluster` (its
/// nodes as seeds) and the `SERVER_*` variables of `env`.
pub fn cluster_settings(
    cluster: &Cluster,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, Error> {
    let nodes: Vec<String> = cluster
        .nodes()
        .into_iter()
        .map(|node| cluster.addr(node).to_string())
        .collect();
    let discovery = [("SERVER_REDIS_CLUSTER_NODES".to_owned(), nodes.join(","))];
    Ok(Settings::load(None, discovery.into_iter().chain(env))?)
}

/// Where a local topology keeps its files.
pub trait Dir {
    /// The topology's directory (removed when it is dropped).
    fn dir(&self) -> &Path;
}

impl Dir for Topology {
    fn dir(&self) -> &Path {
        Topology::dir(self)
    }
}

impl Dir for Cluster {
    fn dir(&self) -> &Path {
        Cluster::dir(self)
    }
}

/// `settings` (of the dev system's topology) with the options' values.
fn settings(mut settings: Settings, options: &DevOptions) -> Result<Settings, Error> {
    settings.listen = options.listen;
    settings.admin_listen = options.admin_listen;
    settings.redis.retry_budget = options.retry_budget;
    settings.limits = options.limits.clone();
    settings.protection.quotas = options.quotas;
    settings.protection.login = options.login_throttle;
    settings.loki_url = None; // the offloader ships to the sink DevSystem gives
    if options.loki_url.is_none() {
        // A file takes lines as fast as they come: no Loki limit to keep to.
        settings.loki_tenant_bytes_per_second = u64::MAX;
    }
    settings.jwt.secret = Some(
        options
            .jwt_secret
            .clone()
            .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec()),
    );
    Ok(settings)
}

fn random_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    (0..16)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect()
}
