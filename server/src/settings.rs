//! Production settings: a flat set of named settings read from an optional
//! TOML file and from `SERVER_<NAME>` environment variables (which win).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::header::HeaderName;
use jsonwebtoken::Algorithm;
use redis_failover::NodeAddr;
use tenant_kv::{LoginThrottle, Quota, Quotas, Rate};

use crate::error::SettingError;
use crate::limits::Limits;

/// Every setting: its name (the TOML key; the environment variable is
/// `SERVER_` and the name in upper case) and what it means.
pub const SETTINGS: &[(&str, &str)] = &[
    ("listen", "address to listen on; default 0.0.0.0:8080"),
    (
        "redis_sentinels",
        "comma-separated host:port of the sentinels (Sentinel discovery)",
    ),
    (
        "redis_master_name",
        "the master's name in Sentinel; default mymaster",
    ),
    (
        "redis_nodes",
        "comma-separated host:port of the data nodes, tried in order (without Sentinel)",
    ),
    (
        "redis_last_resort",
        "host:port tried when no candidate is the master (a load-balanced service)",
    ),
    ("redis_username", "Redis ACL user; default none"),
    ("redis_password", "Redis password; default none"),
    (
        "redis_sentinel_username",
        "ACL user on the sentinels; default none",
    ),
    (
        "redis_sentinel_password",
        "password of the sentinels (their requirepass); default none",
    ),
    (
        "redis_tls",
        "true to connect to Redis over TLS; default false",
    ),
    (
        "redis_tls_ca_file",
        "PEM file of the CA that signed Redis's certificates; default the system roots",
    ),
    (
        "redis_retry_budget",
        "how long a request may wait through a failover; default 8s",
    ),
    (
        "redis_wait_replicas",
        "replicas that must have each write before it is acknowledged (WAIT, 1s per try); default 0",
    ),
    (
        "redis_wait_replicas_min",
        "the fewest replicas writes wait for once one has been gone for redis_replica_lost_after; default redis_wait_replicas (always all)",
    ),
    (
        "redis_replica_lost_after",
        "how long the master must have been short of a replica before writes stop waiting for it (longer than a failover); default 8s",
    ),
    (
        "redis_demote_stale_master",
        "true to make a replaced master a replica as soon as it answers (needs REPLICAOF; Sentinel only); default false",
    ),
    (
        "jwt_algorithm",
        "HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384 or EdDSA; default HS256",
    ),
    ("jwt_secret", "HMAC secret for HS*, at least 32 bytes"),
    (
        "jwt_private_key_file",
        "PEM private key for RS*/ES*/EdDSA; without it, POST /token is off",
    ),
    ("jwt_public_key_file", "PEM public key for RS*/ES*/EdDSA"),
    ("jwt_issuer", "required `iss` of tokens, and the one issued"),
    (
        "jwt_audience",
        "required `aud` of tokens, and the one issued",
    ),
    ("jwt_ttl", "lifetime of issued tokens; default 30m"),
    (
        "jwt_leeway",
        "clock skew allowed on exp and nbf; default 5s",
    ),
    (
        "encryption_key",
        "64 hex digits: encrypt values at rest under this master key",
    ),
    (
        "cursor_secret",
        "secret signing listing cursors, shared by all instances; default random",
    ),
    (
        "loki_url",
        "Loki base URL: ship logs and audit records from this process",
    ),
    (
        "log_buffer",
        "false to keep logs out of Redis (stderr only); default true",
    ),
    ("max_body_bytes", "largest request body; default 1048576"),
    (
        "max_header_bytes",
        "largest request head (line and headers), at least 8192; default 16384",
    ),
    ("max_uri_bytes", "longest request target; default 8192"),
    ("max_batch", "most operations in one batch; default 100"),
    ("request_timeout", "time to answer a request; default 10s"),
    ("max_connections", "open connections at most; default 1024"),
    (
        "max_connections_per_address",
        "open connections at most from one client address (IPv6: its /64); 0 for no cap (behind a proxy); default 128",
    ),
    (
        "send_timeout",
        "time an answer may wait for the client to read any of it before the connection is closed; default 10s",
    ),
    (
        "body_timeout",
        "time a request body may stall once read (408 past it), shorter than request_timeout; default 5s, or half request_timeout if that is less",
    ),
    (
        "shutdown_grace",
        "time in-flight requests get to finish on shutdown; default 10s",
    ),
    (
        "admin_listen",
        "address serving /metrics and the probes (/healthz, /readyz), never the public one; `off` for none; default 127.0.0.1:9090",
    ),
    (
        "client_address_header",
        "header a trusted proxy puts the client's address in (x-forwarded-for: its last address; x-real-ip), for login throttling; default none: the peer's address",
    ),
    (
        "login_attempts_per_username",
        "login attempts a minute on one username (shared by every instance); 0 for no limit; default 10",
    ),
    (
        "login_attempts_per_address",
        "login attempts a minute from one client address; 0 for no limit; default 30",
    ),
    (
        "login_failed_records_per_minute",
        "login_failed audit records a minute per tenant, the rest counted in the next one; 0 for no limit; default 60",
    ),
    (
        "password_hashing_slots",
        "passwords checked at once (each takes 19 MiB and a core): the most of the machine logins can take; default half the cores, at least 1",
    ),
    (
        "password_hashing_queue",
        "logins waiting for a slot; past it, 503 at once; default 4 per slot",
    ),
    (
        "tenant_max_keys",
        "items a tenant may hold, unless overridden (`server tenant limits set`); default no limit",
    ),
    (
        "tenant_max_bytes",
        "bytes of keys, values and metadata a tenant may hold; default no limit",
    ),
    (
        "tenant_writes_per_second",
        "item writes per second of a tenant; default no limit",
    ),
    (
        "tenant_write_burst",
        "item writes of a tenant at once; default a second's worth",
    ),
    (
        "tenant_requests_per_second",
        "requests per second of a tenant (429 past it); default no limit",
    ),
    (
        "tenant_request_burst",
        "requests of a tenant at once; default a second's worth",
    ),
    (
        "tenant_api_key_requests_per_second",
        "requests per second of each API key without a rate of its own; default no limit",
    ),
    (
        "tenant_api_key_request_burst",
        "requests at once of each such API key; default a second's worth",
    ),
    (
        "tenant_max_api_keys",
        "API keys a tenant may hold; default 100",
    ),
];

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
    /// Whether logs are buffered in Redis.
    pub log_buffer: bool,
    /// Request limits.
    pub limits: Limits,
    /// Throttles and quotas.
    pub protection: Protection,
}

impl Settings {
    /// Reads `file` (TOML, optional) and the `SERVER_*` variables of `env`,
    /// the environment winning, and checks every setting.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingError> {
        let mut raw = match file {
            Some(path) => read_file(path)?,
            None => BTreeMap::new(),
        };
        for (name, value) in env {
            let Some(name) = name.strip_prefix("SERVER_") else {
                continue;
            };
            let name = name.to_ascii_lowercase();
            // Unknown variables are ignored: Kubernetes injects `SERVER_PORT`
            // and the like for a service named `server`.
            if let Some((known, _)) = SETTINGS.iter().find(|(known, _)| *known == name) {
                raw.insert(known, value);
            }
        }
        Self::from_map(&raw)
    }

    fn from_map(raw: &BTreeMap<&'static str, String>) -> Result<Self, SettingError> {
        let get = |name: &'static str| raw.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let listen: SocketAddr = get("listen")
            .unwrap_or("0.0.0.0:8080")
            .parse()
            .map_err(|_| SettingError::invalid("listen", "expected ip:port"))?;

        let nodes = |name: &'static str| -> Result<Option<Vec<NodeAddr>>, SettingError> {
            get(name)
                .map(|list| {
                    list.split(',')
                        .map(|addr| {
                            addr.trim().parse().map_err(|_| {
                                SettingError::invalid(name, format!("{addr:?} is not host:port"))
                            })
                        })
                        .collect()
                })
                .transpose()
        };
        let discovery = match (nodes("redis_sentinels")?, nodes("redis_nodes")?) {
            (Some(sentinels), None) => Discovery::Sentinel {
                master_name: get("redis_master_name").unwrap_or("mymaster").to_owned(),
                sentinels,
            },
            (None, Some(nodes)) => Discovery::Candidates(nodes),
            (Some(_), Some(_)) => {
                return Err(SettingError::invalid(
                    "redis_sentinels",
                    "set either redis_sentinels or redis_nodes, not both",
                ));
            }
            (None, None) => {
                return Err(SettingError::invalid(
                    "redis_sentinels",
                    "set redis_sentinels (Sentinel) or redis_nodes (ordered candidates)",
                ));
            }
        };
        let last_resort =
            match get("redis_last_resort") {
                Some(addr) => Some(addr.parse().map_err(|_| {
                    SettingError::invalid("redis_last_resort", "expected host:port")
                })?),
                None => None,
            };
        let tls = boolean(raw, "redis_tls", false)?;
        if get("redis_tls_ca_file").is_some() && !tls {
            return Err(SettingError::invalid(
                "redis_tls_ca_file",
                "set redis_tls = true too, or remove it",
            ));
        }
        for (user, password) in [
            ("redis_username", "redis_password"),
            ("redis_sentinel_username", "redis_sentinel_password"),
        ] {
            if get(user).is_some() && get(password).is_none() {
                return Err(SettingError::invalid(
                    password,
                    format!("{user} needs a password"),
                ));
            }
        }
        if get("redis_sentinel_password").is_some()
            && !matches!(discovery, Discovery::Sentinel { .. })
        {
            return Err(SettingError::invalid(
                "redis_sentinel_password",
                "only with redis_sentinels",
            ));
        }
        if last_resort.is_some() && matches!(discovery, Discovery::Sentinel { .. }) {
            return Err(SettingError::invalid(
                "redis_last_resort",
                "only with redis_nodes: with Sentinel, the sentinels name the master",
            ));
        }
        let tls_ca = get("redis_tls_ca_file")
            .map(|path| read_pem("redis_tls_ca_file", path))
            .transpose()?;
        let mut redis = RedisSettings {
            discovery,
            last_resort,
            username: get("redis_username").map(str::to_owned),
            password: get("redis_password").map(str::to_owned),
            sentinel_username: get("redis_sentinel_username").map(str::to_owned),
            sentinel_password: get("redis_sentinel_password").map(str::to_owned),
            tls,
            tls_ca,
            retry_budget: duration(raw, "redis_retry_budget", Duration::from_secs(8))?,
            wait_replicas: number(raw, "redis_wait_replicas", 0)?,
            wait_replicas_min: 0,
            replica_lost_after: duration(raw, "redis_replica_lost_after", Duration::from_secs(8))?,
            demote_stale_master: boolean(raw, "redis_demote_stale_master", false)?,
        };
        redis.wait_replicas_min = number(raw, "redis_wait_replicas_min", redis.wait_replicas)?;
        if redis.wait_replicas_min > redis.wait_replicas
            || (redis.wait_replicas > 0 && redis.wait_replicas_min == 0)
        {
            return Err(SettingError::invalid(
                "redis_wait_replicas_min",
                "must be 1 to redis_wait_replicas",
            ));
        }
        if redis.replica_lost_after.is_zero() {
            return Err(SettingError::invalid(
                "redis_replica_lost_after",
                "must be longer than 0",
            ));
        }
        if redis.demote_stale_master && !matches!(redis.discovery, Discovery::Sentinel { .. }) {
            return Err(SettingError::invalid(
                "redis_demote_stale_master",
                "only with redis_sentinels: the sentinels decide which master is stale",
            ));
        }

        let algorithm = match get("jwt_algorithm").unwrap_or("HS256") {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" => Algorithm::EdDSA,
            other => {
                return Err(SettingError::invalid(
                    "jwt_algorithm",
                    format!("{other:?} is not one of the supported algorithms"),
                ));
            }
        };
        let jwt = JwtSettings {
            algorithm,
            secret: get("jwt_secret").map(|s| s.as_bytes().to_vec()),
            private_key: get("jwt_private_key_file")
                .map(|path| read_pem("jwt_private_key_file", path))
                .transpose()?,
            public_key: get("jwt_public_key_file")
                .map(|path| read_pem("jwt_public_key_file", path))
                .transpose()?,
            issuer: get("jwt_issuer").map(str::to_owned),
            audience: get("jwt_audience").map(str::to_owned),
            ttl: duration(raw, "jwt_ttl", Duration::from_secs(30 * 60))?,
            leeway: duration(raw, "jwt_leeway", Duration::from_secs(5))?,
        };
        if jwt.leeway > Duration::from_secs(300) {
            return Err(SettingError::invalid("jwt_leeway", "must be at most 5m"));
        }

        let encryption_key = match get("encryption_key") {
            Some(hex) => Some(parse_key_hex(hex).ok_or_else(|| {
                SettingError::invalid("encryption_key", "expected 64 hex digits (32 bytes)")
            })?),
            None => None,
        };
        let loki_url = get("loki_url").map(str::to_owned);
        if let Some(url) = &loki_url
            && url
                .strip_prefix("http://")
                .is_none_or(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            return Err(SettingError::invalid(
                "loki_url",
                "expected an http:// URL (put a TLS proxy in front of Loki for https)",
            ));
        }

        let defaults = Limits::default();
        let request_timeout = duration(raw, "request_timeout", defaults.request_timeout)?;
        let limits = Limits {
            max_body_bytes: number(raw, "max_body_bytes", defaults.max_body_bytes)?,
            max_header_bytes: number(raw, "max_header_bytes", defaults.max_header_bytes)?,
            max_uri_bytes: number(raw, "max_uri_bytes", defaults.max_uri_bytes)?,
            max_batch: number(raw, "max_batch", defaults.max_batch)?,
            request_timeout,
            max_connections: number(raw, "max_connections", defaults.max_connections)?,
            max_connections_per_address: number(
                raw,
                "max_connections_per_address",
                defaults.max_connections_per_address,
            )?,
            send_timeout: duration(raw, "send_timeout", defaults.send_timeout)?,
            body_timeout: duration(
                raw,
                "body_timeout",
                defaults.body_timeout.min(request_timeout / 2),
            )?,
            shutdown_grace: duration(raw, "shutdown_grace", defaults.shutdown_grace)?,
        };
        limits.validate()?;
        if redis.retry_budget.is_zero() || redis.retry_budget >= limits.request_timeout {
            return Err(SettingError::invalid(
                "redis_retry_budget",
                "must be longer than 0 and shorter than request_timeout, so that a request can wait out a failover",
            ));
        }
        let cursor_secret = get("cursor_secret").map(|s| s.as_bytes().to_vec());
        if cursor_secret
            .as_ref()
            .is_some_and(|secret| secret.len() < 16)
        {
            return Err(SettingError::invalid(
                "cursor_secret",
                "must be at least 16 bytes",
            ));
        }

        let admin_listen =
            match get("admin_listen").unwrap_or("127.0.0.1:9090") {
                "off" => None,
                addr => Some(addr.parse().map_err(|_| {
                    SettingError::invalid("admin_listen", "expected ip:port, or off")
                })?),
            };
        // Port 0 picks a free port for each.
        if admin_listen == Some(listen) && listen.port() != 0 {
            return Err(SettingError::invalid(
                "admin_listen",
                "must differ from listen: metrics name every tenant",
            ));
        }
        Ok(Self {
            listen,
            admin_listen,
            redis,
            jwt,
            encryption_key,
            cursor_secret,
            loki_url,
            log_buffer: boolean(raw, "log_buffer", true)?,
            limits,
            protection: protection(raw)?,
        })
    }
}

/// Throttles and quotas from their settings.
fn protection(raw: &BTreeMap<&'static str, String>) -> Result<Protection, SettingError> {
    let client_address_header = raw
        .get("client_address_header")
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(|name| {
            HeaderName::try_from(name)
                .map_err(|_| SettingError::invalid("client_address_header", "not a header name"))
        })
        .transpose()?;
    let per_minute = |name: &'static str, default: u32| -> Result<Option<Rate>, SettingError> {
        let count: u32 = number(raw, name, default)?;
        Ok((count > 0).then(|| Rate::per_minute(count)))
    };
    let login = LoginThrottle::default()
        .per_username(per_minute("login_attempts_per_username", 10)?)
        .per_source(per_minute("login_attempts_per_address", 30)?)
        .failed_records(per_minute("login_failed_records_per_minute", 60)?);
    let half = (std::thread::available_parallelism().map_or(1, usize::from) / 2).max(1);
    let slots: usize = number(raw, "password_hashing_slots", half)?;
    if slots == 0 {
        return Err(SettingError::invalid(
            "password_hashing_slots",
            "must be at least 1",
        ));
    }
    let queue = number(raw, "password_hashing_queue", 4 * slots)?;
    let mut quotas = Quotas::default();
    for quota in Quota::ALL {
        let setting = QUOTA_SETTINGS
            .iter()
            .find(|(q, _)| *q == quota)
            .map(|(_, name)| *name)
            .expect("every quota has a setting");
        if let Some(text) = raw.get(setting).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            let value = match text {
                "unlimited" | "none" => None,
                number => Some(number.parse::<u64>().map_err(|_| {
                    SettingError::invalid(setting, "expected a whole number, or unlimited")
                })?),
            };
            quotas
                .set(quota, value)
                .map_err(|e| SettingError::invalid(setting, e.to_string()))?;
        }
    }
    Ok(Protection {
        client_address_header,
        login,
        password_hashing: (slots, queue),
        quotas,
    })
}

/// The setting giving each quota's default.
const QUOTA_SETTINGS: [(Quota, &str); 9] = [
    (Quota::MaxKeys, "tenant_max_keys"),
    (Quota::MaxBytes, "tenant_max_bytes"),
    (Quota::WritesPerSecond, "tenant_writes_per_second"),
    (Quota::WriteBurst, "tenant_write_burst"),
    (Quota::RequestsPerSecond, "tenant_requests_per_second"),
    (Quota::RequestBurst, "tenant_request_burst"),
    (
        Quota::ApiKeyRequestsPerSecond,
        "tenant_api_key_requests_per_second",
    ),
    (Quota::ApiKeyRequestBurst, "tenant_api_key_request_burst"),
    (Quota::MaxApiKeys, "tenant_max_api_keys"),
];

/// How long one `WAIT` for `redis_wait_replicas` lasts. A write short of
/// replicas then answers `not_replicated`; the next ones wait, without
/// running, for the replicas to come back (within the retry budget).
const WAIT_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisSettings {
    /// A failover client as these settings describe.
    pub fn client(&self) -> Result<redis_failover::FailoverClient, redis_failover::Error> {
        use redis_failover::{Credentials, FailoverClient, Tls};
        let mut builder = match &self.discovery {
            Discovery::Sentinel {
                master_name,
                sentinels,
            } => FailoverClient::sentinel(master_name.clone(), sentinels.clone()),
            Discovery::Candidates(nodes) => FailoverClient::candidates(nodes.clone()),
        };
        let credentials = |user: &Option<String>, password: &Option<String>| match (user, password)
        {
            (Some(user), Some(password)) => Some(Credentials::user(user.clone(), password.clone())),
            (None, Some(password)) => Some(Credentials::password(password.clone())),
            _ => None,
        };
        if let Some(credentials) = credentials(&self.username, &self.password) {
            builder = builder.credentials(credentials);
        }
        if let Some(credentials) = credentials(&self.sentinel_username, &self.sentinel_password) {
            builder = builder.sentinel_credentials(credentials);
        }
        if self.tls {
            let tls = match &self.tls_ca {
                Some(pem) => Tls::root_cert(pem.clone()),
                None => Tls::system_roots(),
            };
            builder = builder.tls(tls);
        }
        if let Some(addr) = &self.last_resort {
            builder = builder.last_resort(addr.clone());
        }
        if self.wait_replicas > 0 {
            builder = builder.durability(redis_failover::Durability::Replicated {
                replicas: self.wait_replicas,
                timeout: WAIT_TIMEOUT,
            });
        }
        if self.wait_replicas_min < self.wait_replicas {
            builder = builder.lost_replica_grace(self.replica_lost_after, self.wait_replicas_min);
        }
        builder
            .retry_budget(self.retry_budget)
            .demote_stale_masters(self.demote_stale_master)
            .build()
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
            .password_hashing(protection.password_hashing.0, protection.password_hashing.1);
        if let Some(key) = self.encryption_key {
            builder = builder.encryption_key(key);
        }
        if let Some(secret) = &self.cursor_secret {
            builder = builder.cursor_secret(secret.clone());
        }
        builder.build()
    }
}

fn read_file(path: &Path) -> Result<BTreeMap<&'static str, String>, SettingError> {
    let text = std::fs::read_to_string(path).map_err(|e| SettingError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| SettingError::File {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })?;
    let mut raw = BTreeMap::new();
    for (name, value) in table {
        let Some((known, _)) = SETTINGS.iter().find(|(known, _)| *known == name) else {
            return Err(SettingError::File {
                path: path.to_owned(),
                reason: format!("unknown setting `{name}`"),
            });
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Array(items) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map_or_else(|| item.to_string(), str::to_owned)
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        raw.insert(*known, text);
    }
    Ok(raw)
}

fn read_pem(setting: &'static str, path: &str) -> Result<Vec<u8>, SettingError> {
    std::fs::read(PathBuf::from(path))
        .map_err(|e| SettingError::invalid(setting, format!("cannot read {path:?}: {e}")))
}

fn boolean(
    raw: &BTreeMap<&'static str, String>,
    name: &'static str,
    default: bool,
) -> Result<bool, SettingError> {
    match raw.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(default),
        Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        Some(_) => Err(SettingError::invalid(name, "expected true or false")),
    }
}

fn number<T: std::str::FromStr>(
    raw: &BTreeMap<&'static str, String>,
    name: &'static str,
    default: T,
) -> Result<T, SettingError> {
    match raw.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| SettingError::invalid(name, "expected a whole number")),
    }
}

fn duration(
    raw: &BTreeMap<&'static str, String>,
    name: &'static str,
    default: Duration,
) -> Result<Duration, SettingError> {
    match raw.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(default),
        Some(text) => parse_duration(text).ok_or_else(|| {
            SettingError::invalid(name, "expected a duration such as 500ms, 5s, 30m or 1h")
        }),
    }
}

/// Parses `<whole number><ms|s|m|h>`.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(Duration::from_millis(number.checked_mul(millis)?))
}

fn parse_key_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const SECRET: (&str, &str) = ("SERVER_JWT_SECRET", "0123456789abcdef0123456789abcdef");

    #[test]
    fn sentinel_settings_from_the_environment() {
        let settings = Settings::load(
            None,
            env(&[
                ("SERVER_REDIS_SENTINELS", "s-0:26379, s-1:26379"),
                ("SERVER_REQUEST_TIMEOUT", "2s"),
                ("SERVER_REDIS_RETRY_BUDGET", "1500ms"),
                ("SERVER_REDIS_WAIT_REPLICAS", "2"),
                ("SERVER_REDIS_WAIT_REPLICAS_MIN", "1"),
                ("SERVER_REDIS_DEMOTE_STALE_MASTER", "true"),
                ("SERVER_PORT", "tcp://10.0.0.1:80"),
                ("SERVER_TENANT_MAX_KEYS", "1000"),
                ("SERVER_TENANT_REQUESTS_PER_SECOND", "50"),
                ("SERVER_TENANT_MAX_API_KEYS", "unlimited"),
                ("SERVER_LOGIN_ATTEMPTS_PER_USERNAME", "0"),
                ("SERVER_ADMIN_LISTEN", "off"),
                ("SERVER_CLIENT_ADDRESS_HEADER", "X-Forwarded-For"),
                SECRET,
            ]),
        )
        .unwrap();
        let quotas = settings.protection.quotas;
        assert_eq!(quotas.max_keys, Some(1000));
        assert_eq!(quotas.requests_per_second, Some(50));
        assert_eq!(quotas.max_api_keys, None);
        assert_eq!(settings.protection.login.per_username, None);
        assert_eq!(
            settings.protection.login.per_source,
            Some(tenant_kv::Rate::per_minute(30))
        );
        assert_eq!(settings.admin_listen, None);
        assert_eq!(
            settings
                .protection
                .client_address_header
                .as_ref()
                .map(|h| h.as_str()),
            Some("x-forwarded-for")
        );
        assert_eq!(settings.limits.body_timeout, Duration::from_secs(1));
        assert_eq!(
            settings.redis.discovery,
            Discovery::Sentinel {
                master_name: "mymaster".to_owned(),
                sentinels: vec!["s-0:26379".parse().unwrap(), "s-1:26379".parse().unwrap()],
            }
        );
        assert_eq!(settings.limits.request_timeout, Duration::from_secs(2));
        assert_eq!(settings.redis.retry_budget, Duration::from_millis(1500));
        assert_eq!(settings.redis.wait_replicas, 2);
        assert_eq!(settings.redis.wait_replicas_min, 1);
        assert_eq!(settings.redis.replica_lost_after, Duration::from_secs(8));
        assert!(settings.redis.demote_stale_master);
        assert_eq!(settings.listen, "0.0.0.0:8080".parse().unwrap());
    }

    #[test]
    fn errors_name_the_setting() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[SECRET], "redis_sentinels"),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    SECRET,
                    ("SERVER_REQUEST_TIMEOUT", "soon"),
                ],
                "request_timeout",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    SECRET,
                    ("SERVER_MAX_HEADER_BYTES", "100"),
                ],
                "max_header_bytes",
            ),
            (&[("SERVER_REDIS_NODES", "no-port"), SECRET], "redis_nodes"),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_REDIS_RETRY_BUDGET", "10s"),
                ],
                "redis_retry_budget",
            ),
            (
                &[
                    ("SERVER_REDIS_SENTINELS", "s:26379"),
                    ("SERVER_REDIS_LAST_RESORT", "r:6379"),
                ],
                "redis_last_resort",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_REDIS_DEMOTE_STALE_MASTER", "true"),
                ],
                "redis_demote_stale_master",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_REDIS_WAIT_REPLICAS", "-1"),
                ],
                "redis_wait_replicas",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_CURSOR_SECRET", "short"),
                ],
                "cursor_secret",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_REDIS_WAIT_REPLICAS", "2"),
                    ("SERVER_REDIS_WAIT_REPLICAS_MIN", "3"),
                ],
                "redis_wait_replicas_min",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_LOKI_URL", "http://"),
                ],
                "loki_url",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_MAX_CONNECTIONS", "18446744073709551615"),
                ],
                "max_connections",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_JWT_LEEWAY", "1000000h"),
                ],
                "jwt_leeway",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_REDIS_USERNAME", "app"),
                ],
                "redis_password",
            ),
            (
                &[
                    ("SERVER_REDIS_SENTINELS", "s:26379"),
                    ("SERVER_REDIS_SENTINEL_USERNAME", "app"),
                ],
                "redis_sentinel_password",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_REDIS_SENTINEL_PASSWORD", "secret"),
                ],
                "redis_sentinel_password",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    SECRET,
                    ("SERVER_ENCRYPTION_KEY", "abc"),
                ],
                "encryption_key",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    SECRET,
                    ("SERVER_JWT_ALGORITHM", "none"),
                ],
                "jwt_algorithm",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_TENANT_REQUESTS_PER_SECOND", "0"),
                ],
                "tenant_requests_per_second",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_TENANT_MAX_BYTES", "lots"),
                ],
                "tenant_max_bytes",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_ADMIN_LISTEN", "0.0.0.0:8080"),
                ],
                "admin_listen",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_CLIENT_ADDRESS_HEADER", "bad header"),
                ],
                "client_address_header",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_BODY_TIMEOUT", "10s"),
                ],
                "body_timeout",
            ),
            (
                &[
                    ("SERVER_REDIS_NODES", "r:6379"),
                    ("SERVER_PASSWORD_HASHING_SLOTS", "0"),
                ],
                "password_hashing_slots",
            ),
        ];
        for (vars, setting) in cases {
            let error = Settings::load(None, env(vars)).unwrap_err();
            assert!(
                matches!(&error, SettingError::Invalid { setting: s, .. } if s == setting),
                "{vars:?}: {error}"
            );
            assert!(error.to_string().contains(setting), "{error}");
        }
    }

    #[test]
    fn file_settings_are_overridden_by_the_environment_and_unknown_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            "redis_nodes = [\"r-0:6379\", \"r-1:6379\"]\nmax_batch = 7\njwt_secret = \"0123456789abcdef0123456789abcdef\"\n",
        )
        .unwrap();
        let settings = Settings::load(Some(&path), env(&[("SERVER_MAX_BATCH", "9")])).unwrap();
        assert_eq!(settings.limits.max_batch, 9);
        assert_eq!(
            settings.redis.discovery,
            Discovery::Candidates(vec![
                "r-0:6379".parse().unwrap(),
                "r-1:6379".parse().unwrap()
            ])
        );
        std::fs::write(&path, "redis_nodez = \"r:6379\"\n").unwrap();
        let error = Settings::load(Some(&path), env(&[])).unwrap_err();
        assert!(error.to_string().contains("redis_nodez"), "{error}");
    }

    #[test]
    fn a_short_hmac_secret_is_refused() {
        let settings = Settings::load(
            None,
            env(&[
                ("SERVER_REDIS_NODES", "r:6379"),
                ("SERVER_JWT_SECRET", "short"),
            ]),
        )
        .unwrap();
        let error = crate::JwtConfig::from_settings(&settings.jwt).unwrap_err();
        assert!(error.to_string().contains("jwt_secret"), "{error}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
