//! The dev mode: the whole service on a real local Redis topology, with
//! demo tenants and users, in one call.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use log_buffer::{BufferLayer, LogSink};
use redis_failover::FailoverClient;
use redis_topology::Topology;
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
/// loopback ports, and a [`System`] on them (as `server serve` runs it)
/// whose offloader ships to a file or Loki, with demo users.
#[derive(Debug)]
pub struct DevSystem {
    /// The local topology; dropping it kills every Redis process.
    pub topology: Topology,
    /// The server's failover client (Sentinel discovery).
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
        let settings = settings(&topology, &options)?;
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

/// The settings of the dev system on `topology`, with the options' values.
fn settings(topology: &Topology, options: &DevOptions) -> Result<Settings, Error> {
    let mut settings = topology_settings(topology, [])?;
    settings.listen = options.listen;
    settings.admin_listen = options.admin_listen;
    settings.redis.retry_budget = options.retry_budget;
    settings.limits = options.limits.clone();
    settings.protection.quotas = options.quotas;
    settings.protection.login = options.login_throttle;
    settings.loki_url = None; // the offloader ships to the sink DevSystem gives
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
