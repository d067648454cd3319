//! Production settings: a flat set of named settings, declared once with
//! their meaning and default ([`table`]), read from an optional TOML file
//! and from `SERVER_<NAME>` environment variables (which win) into one
//! typed struct ([`parse`]), then each group checked against the others
//! ([`sections`]).

mod parse;
mod sections;
mod table;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_layers;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hyper::header::HeaderName;
use jsonwebtoken::Algorithm;
use redis_failover::NodeAddr;
use tenant_kv::{LoginThrottle, Quotas};

use crate::error::SettingError;
use crate::limits::Limits;
use table::Raw;
pub use table::{SETTINGS, Setting, settings_help};

/// How to find the Redis master.
#[derive(Clone, Debug, PartialEq)]
pub enum Discovery {
    /// Ask these sentinels about the master `master_name`.
    Sentinel {
        /// The master's name in Sentinel.
        master_name: String,
        /// The sentinels.
        sentinels: Vec<NodeAddr>,
    },
    /// Try these data nodes in order.
    Candidates(Vec<NodeAddr>),
    /// Load a Redis Cluster's slot map from these nodes.
    Cluster(Vec<NodeAddr>),
}

/// How the service reaches Redis.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// Where the master is found.
    pub discovery: Discovery,
    /// Tried when no candidate is the master.
    pub last_resort: Option<NodeAddr>,
    /// ACL user.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// ACL user on the sentinels.
    pub sentinel_username: Option<String>,
    /// Password of the sentinels.
    pub sentinel_password: Option<String>,
    /// Connect over TLS.
    pub tls: bool,
    /// The CA certificate (PEM) for TLS; `None` for the system roots.
    pub tls_ca: Option<Vec<u8>>,
    /// How long a request may wait through a failover.
    pub retry_budget: Duration,
    /// Replicas that must have each write before it is acknowledged (0:
    /// the master's reply is enough).
    pub wait_replicas: u32,
    /// The fewest replicas writes wait for once one has been gone for
    /// `replica_lost_after` (no fewer than `wait_replicas` when equal).
    pub wait_replicas_min: u32,
    /// How long a replica must be gone before writes stop waiting for it.
    pub replica_lost_after: Duration,
    /// Acknowledge writes once fsynced (`WAITAOF`): on the master, and on
    /// `wait_replicas` replicas; `WAIT` alone does not wait for disks.
    pub waitaof_local: bool,
    /// Make a replaced master a replica of the new one as soon as it
    /// answers, instead of waiting for Sentinel to do it.
    pub demote_stale_master: bool,
}

/// How tokens are checked and issued.
#[derive(Clone, Debug)]
pub struct JwtSettings {
    /// The one algorithm accepted.
    pub algorithm: Algorithm,
    /// HMAC secret (HS*).
    pub secret: Option<Vec<u8>>,
    /// PEM private key (RS*, ES*, EdDSA).
    pub private_key: Option<Vec<u8>>,
    /// PEM public key (RS*, ES*, EdDSA).
    pub public_key: Option<Vec<u8>>,
    /// Required issuer.
    pub issuer: Option<String>,
    /// Required audience.
    pub audience: Option<String>,
    /// Lifetime of issued tokens.
    pub ttl: Duration,
    /// Clock skew allowed.
    pub leeway: Duration,
}

/// What keeps one client or tenant from exhausting the service.
#[derive(Clone, Debug)]
pub struct Protection {
    /// The header a trusted proxy puts the client's address in.
    pub client_address_header: Option<HeaderName>,
    /// Login throttling.
    pub login: LoginThrottle,
    /// Passwords checked at once, and logins waiting for a slot.
    pub password_hashing: (usize, usize),
    /// Every tenant's quotas, unless overridden in Redis.
    pub quotas: Quotas,
}

/// The service's settings, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address serving `/metrics` and the probes, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Redis.
    pub redis: RedisSettings,
    /// Tokens.
    pub jwt: JwtSettings,
    /// Master key encrypting values at rest.
    pub encryption_key: Option<[u8; 32]>,
    /// Secret signing listing cursors.
    pub cursor_secret: Option<Vec<u8>>,
    /// Loki base URL, to ship logs from this process.
    pub loki_url: Option<String>,
    /// The `job` label of the application's logs shipped to Loki (audit
    /// records always ship as `job="audit_logs"`).
    pub loki_job: String,
    /// The most bytes of log lines shipped per second for one tenant.
    pub loki_tenant_bytes_per_second: u64,
    /// Whether logs are buffered in Redis.
    pub log_buffer: bool,
    /// One read in this many is audited (1: every read).
    pub read_audit_sample: u32,
    /// Whether item writes stage their audit records for the offloader.
    pub stage_audit_records: bool,
    /// Request limits.
    pub limits: Limits,
    /// Throttles and quotas.
    pub protection: Protection,
    /// User and API-key records cached per instance (0: no cache).
    pub auth_cache_records: usize,
}

impl Settings {
    /// Reads `file` (TOML, optional) and the `SERVER_*` variables of `env`,
    /// the environment winning, and checks every setting.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingError> {
        Self::from_raw(&Raw::load(file, env)?)
    }

    fn from_raw(raw: &Raw) -> Result<Self, SettingError> {
        let listen = raw.listen;
        let admin_listen = sections::admin_listen(raw, listen)?;
        let redis = sections::redis(raw)?;
        let limits = sections::limits(raw)?;
        if redis.retry_budget.is_zero() || redis.retry_budget >= limits.request_timeout {
            return Err(SettingError::invalid(
                "redis_retry_budget",
                "must be longer than 0 and shorter than request_timeout, so that a request can wait out a failover",
            ));
        }
        Ok(Self {
            listen,
            admin_listen,
            redis,
            jwt: sections::jwt(raw)?,
            encryption_key: sections::encryption_key(raw)?,
            cursor_secret: sections::cursor_secret(raw)?,
            loki_url: sections::loki_url(raw)?,
            loki_job: sections::loki_job(raw)?,
            loki_tenant_bytes_per_second: sections::loki_tenant_bytes_per_second(raw)?,
            log_buffer: raw.log_buffer,
            read_audit_sample: sections::read_audit_sample(raw)?,
            stage_audit_records: raw.stage_audit_records,
            limits,
            protection: sections::protection(raw)?,
            auth_cache_records: raw.auth_cache_records,
        })
    }
}

impl Settings {
    /// The store these settings describe, over `client`.
    pub fn store(
        &self,
        client: redis_failover::FailoverClient,
    ) -> Result<tenant_kv::TenantKv, tenant_kv::Error> {
        let protection = &self.protection;
        let mut builder = tenant_kv::TenantKv::builder(client)
            .quotas(protection.quotas)
            .login_throttle(protection.login)
            .password_hashing(protection.password_hashing.0, protection.password_hashing.1)
            .read_audit_sample(self.read_audit_sample)
            .stage_audit_records(self.stage_audit_records);
        if self.auth_cache_records > 0 {
            builder = builder.auth_cache_capacity(self.auth_cache_records);
        }
        if let Some(key) = self.encryption_key {
            builder = builder.encryption_key(key);
        }
        if let Some(secret) = &self.cursor_secret {
            builder = builder.cursor_secret(secret.clone());
        }
        builder.build()
    }
}

/// How long one `WAIT` (or `WAITAOF`) for `redis_wait_replicas` lasts. A write short of
/// replicas then answers `not_replicated`; the next ones wait, without
/// running, for the replicas to come back (within the retry budget).
const WAIT_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisSettings {
    /// What a write waits for before it is acknowledged.
    pub fn durability(&self) -> redis_failover::Durability {
        use redis_failover::Durability;
        match (self.waitaof_local, self.wait_replicas) {
            (true, replicas) => Durability::Persisted {
                local: true,
                replicas,
                timeout: WAIT_TIMEOUT,
            },
            (false, 0) => Durability::Master,
            (false, replicas) => Durability::Replicated {
                replicas,
                timeout: WAIT_TIMEOUT,
            },
        }
    }

    /// A failover client as these settings describe.
    pub fn client(&self) -> Result<redis_failover::FailoverClient, redis_failover::Error> {
        use redis_failover::FailoverClient;
        let mut builder = match &self.discovery {
            Discovery::Sentinel {
                master_name,
                sentinels,
            } => FailoverClient::sentinel(master_name.clone(), sentinels.clone()),
            Discovery::Candidates(nodes) => FailoverClient::candidates(nodes.clone()),
            Discovery::Cluster(nodes) => return self.cluster_client(nodes),
        };
        if let Some(credentials) = self.credentials() {
            builder = builder.credentials(credentials);
        }
        if let Some(credentials) = credentials(&self.sentinel_username, &self.sentinel_password) {
            builder = builder.sentinel_credentials(credentials);
        }
        if let Some(tls) = self.tls() {
            builder = builder.tls(tls);
        }
        if let Some(addr) = &self.last_resort {
            builder = builder.last_resort(addr.clone());
        }
        builder = builder.durability(self.durability());
        if self.wait_replicas_min < self.wait_replicas {
            builder = builder.lost_replica_grace(self.replica_lost_after, self.wait_replicas_min);
        }
        builder
            .retry_budget(self.retry_budget)
            .demote_stale_masters(self.demote_stale_master)
            .build()
    }

    /// A Redis Cluster client on `seeds`; the settings that apply to one
    /// master only were refused with `redis_cluster_nodes` already.
    fn cluster_client(
        &self,
        seeds: &[NodeAddr],
    ) -> Result<redis_failover::FailoverClient, redis_failover::Error> {
        let mut builder = redis_failover::FailoverClient::cluster(seeds.to_vec());
        if let Some(credentials) = self.credentials() {
            builder = builder.credentials(credentials);
        }
        if let Some(tls) = self.tls() {
            builder = builder.tls(tls);
        }
        let client = builder.retry_budget(self.retry_budget).build()?;
        Ok(client.with_durability(self.durability()))
    }

    /// The data nodes' credentials, if any.
    fn credentials(&self) -> Option<redis_failover::Credentials> {
        credentials(&self.username, &self.password)
    }

    /// TLS to the data nodes, if on.
    fn tls(&self) -> Option<redis_failover::Tls> {
        use redis_failover::Tls;
        self.tls.then(|| match &self.tls_ca {
            Some(pem) => Tls::root_cert(pem.clone()),
            None => Tls::system_roots(),
        })
    }
}

/// A user and password, or a password alone, as Redis's `AUTH` takes them.
fn credentials(
    user: &Option<String>,
    password: &Option<String>,
) -> Option<redis_failover::Credentials> {
    use redis_failover::Credentials;
    match (user, password) {
        (Some(user), Some(password)) => Some(Credentials::user(user.clone(), password.clone())),
        (None, Some(password)) => Some(Credentials::password(password.clone())),
        _ => None,
    }
}
