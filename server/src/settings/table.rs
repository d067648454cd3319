//! Every setting, declared once: one row gives the field the layers are
//! deserialized into, its meaning (the doc comment) and its default, so
//! that the struct, the defaults and `--help` cannot drift apart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use redis_failover::NodeAddr;

use super::parse::{QuotaLimit, address, node, nodes};

/// One setting, as `--help` shows it.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The TOML key; the environment variable is `SERVER_` and the key in
    /// upper case.
    pub name: &'static str,
    /// What it means.
    pub help: &'static str,
    /// Its default value, spelt as a value of the setting; `None` when it
    /// has none or derives it from others (its help then says how).
    pub default: Option<&'static str>,
}

/// Declares [`Raw`] and [`SETTINGS`] from the same rows:
/// `/// help` `name: Type [serde attributes] = "default";`.
macro_rules! settings {
    (@default) => { None };
    (@default $default:literal) => { Some($default) };
    ($(
        $(#[doc = $doc:literal])+
        $name:ident: $ty:ty $([$($attr:meta),+])? $(= $default:literal)?;
    )+) => {
        /// Every setting as given, typed but not yet checked against the
        /// others. The defaults are a layer of their own under the file and
        /// the environment, so a field without `Option` always has a value.
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct Raw {
            $(
                $(#[doc = $doc])+
                $($(#[$attr])+)?
                pub(super) $name: $ty,
            )+
        }

        /// Every setting, in the order `--help` lists them.
        pub const SETTINGS: &[Setting] = &[$(
            Setting {
                name: stringify!($name),
                help: concat!($($doc),+),
                default: settings!(@default $($default)?),
            },
        )+];
    };
}

settings! {
    /// Address to listen on.
    listen: SocketAddr [serde(deserialize_with = "address")] = "0.0.0.0:8080";
    /// Address serving /metrics and the probes (/healthz, /readyz), never
    /// the public one; `off` for none.
    admin_listen: String = "127.0.0.1:9090";
    /// host:port of the sentinels, comma-separated (or a TOML array), for
    /// Sentinel discovery.
    redis_sentinels: Option<Vec<NodeAddr>> [serde(default, deserialize_with = "nodes")];
    /// The master's name in Sentinel.
    redis_master_name: String = "mymaster";
    /// host:port of the data nodes, comma-separated (or a TOML array),
    /// tried in order (without Sentinel).
    redis_nodes: Option<Vec<NodeAddr>> [serde(default, deserialize_with = "nodes")];
    /// host:port of some nodes of a Redis Cluster, comma-separated (or a
    /// TOML array), whose slot map the client loads (instead of Sentinel
    /// or candidates).
    redis_cluster_nodes: Option<Vec<NodeAddr>> [serde(default, deserialize_with = "nodes")];
    /// host:port tried when no candidate is the master (a load-balanced
    /// service).
    redis_last_resort: Option<NodeAddr> [serde(default, deserialize_with = "node")];
    /// Redis ACL user; default none.
    redis_username: Option<String>;
    /// Redis password; default none.
    redis_password: Option<String>;
    /// File holding redis_password (a trailing newline is dropped).
    redis_password_file: Option<PathBuf>;
    /// ACL user on the sentinels; default none.
    redis_sentinel_username: Option<String>;
    /// Password of the sentinels (their requirepass); default none.
    redis_sentinel_password: Option<String>;
    /// File holding redis_sentinel_password (a trailing newline is dropped).
    redis_sentinel_password_file: Option<PathBuf>;
    /// true to connect to Redis over TLS.
    redis_tls: bool = "false";
    /// PEM file of the CA that signed Redis's certificates; default the
    /// system roots.
    redis_tls_ca_file: Option<PathBuf>;
    /// How long a request may wait through a failover.
    redis_retry_budget: Duration [serde(with = "humantime_serde")] = "8s";
    /// Replicas that must have each write before it is acknowledged (WAIT,
    /// 1s per try).
    redis_wait_replicas: u32 = "0";
    /// The fewest replicas writes wait for once one has been gone for
    /// redis_replica_lost_after; default redis_wait_replicas (always all).
    redis_wait_replicas_min: Option<u32>;
    /// true to acknowledge writes only once fsynced to the master's
    /// append-only file and, with redis_wait_replicas, the replicas'
    /// (WAITAOF instead of WAIT; needs Redis 7.2 or Valkey, appendonly yes).
    redis_waitaof_local: bool = "false";
    /// How long the master must have been short of a replica before writes
    /// stop waiting for it (longer than a failover).
    redis_replica_lost_after: Duration [serde(with = "humantime_serde")] = "8s";
    /// true to make a replaced master a replica as soon as it answers
    /// (needs REPLICAOF; Sentinel only).
    redis_demote_stale_master: bool = "false";
    /// HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384 or EdDSA.
    jwt_algorithm: String = "HS256";
    /// HMAC secret for HS*, at least 32 bytes.
    jwt_secret: Option<String>;
    /// File holding jwt_secret (a trailing newline is dropped).
    jwt_secret_file: Option<PathBuf>;
    /// PEM private key for RS*/ES*/EdDSA; without it, POST /token is off.
    jwt_private_key_file: Option<PathBuf>;
    /// PEM public key for RS*/ES*/EdDSA.
    jwt_public_key_file: Option<PathBuf>;
    /// Required `iss` of tokens, and the one issued.
    jwt_issuer: Option<String>;
    /// Required `aud` of tokens, and the one issued.
    jwt_audience: Option<String>;
    /// Lifetime of issued tokens.
    jwt_ttl: Duration [serde(with = "humantime_serde")] = "30m";
    /// Clock skew allowed on exp and nbf, at most 5m.
    jwt_leeway: Duration [serde(with = "humantime_serde")] = "5s";
    /// 64 hex digits: encrypt values at rest under this master key.
    encryption_key: Option<String>;
    /// File holding encryption_key (a trailing newline is dropped).
    encryption_key_file: Option<PathBuf>;
    /// Secret signing listing cursors, shared by all instances, at least 16
    /// bytes; default random.
    cursor_secret: Option<String>;
    /// File holding cursor_secret (a trailing newline is dropped).
    cursor_secret_file: Option<PathBuf>;
    /// Loki base URL (http://): ship logs and audit records from this
    /// process.
    loki_url: Option<String>;
    /// job label of the application's logs in Loki (audit records are
    /// job=audit_logs).
    loki_job: String = "log-buffer";
    /// Most bytes of log lines shipped per second for one tenant (Loki
    /// refuses a tenant past its ingestion limit, 4 MB/s by default); a
    /// tenant logging more falls behind, and a backlog drains at this pace.
    loki_tenant_bytes_per_second: u64 = "3145728";
    /// false to keep logs out of Redis (stderr only).
    log_buffer: bool = "true";
    /// Audit one read in this many (the records say sampled=N); writes are
    /// always audited; 1 audits every read.
    read_audit_sample: u32 = "1";
    /// Item writes stage their audit records for the log offloader to pack,
    /// 64 to a stream entry; a record reaches its audit stream when an
    /// offloader (server offload, or serve with loki_url) next reads it.
    /// false when none runs and the audit streams are read otherwise.
    stage_audit_records: bool = "true";
    /// Largest request body, in bytes.
    max_body_bytes: usize = "1048576";
    /// Largest request head (line and headers), in bytes, at least 8192.
    max_header_bytes: usize = "16384";
    /// Longest request target, in bytes.
    max_uri_bytes: usize = "8192";
    /// Most operations in one batch.
    max_batch: usize = "100";
    /// Time to answer a request.
    request_timeout: Duration [serde(with = "humantime_serde")] = "10s";
    /// Open connections at most.
    max_connections: usize = "1024";
    /// Open connections at most from one client address (IPv6: its /64); 0
    /// for no cap (behind a proxy).
    max_connections_per_address: usize = "128";
    /// Time an answer may wait for the client to read any of it before the
    /// connection is closed.
    send_timeout: Duration [serde(with = "humantime_serde")] = "10s";
    /// Time a request body may stall once read (408 past it), shorter than
    /// request_timeout; default 5s, or half request_timeout if that is less.
    body_timeout: Option<Duration> [serde(default, with = "humantime_serde")];
    /// Time in-flight requests get to finish on shutdown.
    shutdown_grace: Duration [serde(with = "humantime_serde")] = "10s";
    /// Header a trusted proxy puts the client's address in (x-forwarded-for:
    /// its last address; x-real-ip), for login throttling; default none:
    /// the peer's address.
    client_address_header: Option<String>;
    /// Login attempts a minute on one username from one client address
    /// (shared by every instance); 0 for no limit.
    login_attempts_per_username: u32 = "10";
    /// Login attempts a minute on one username from every address: what it
    /// takes to lock a user out; 0 for no limit.
    login_attempts_per_username_total: u32 = "100";
    /// Login attempts a minute from one client address; 0 for no limit.
    login_attempts_per_address: u32 = "30";
    /// login_failed audit records a minute per tenant, the rest counted in
    /// the next one; 0 for no limit.
    login_failed_records_per_minute: u32 = "60";
    /// Passwords checked at once (each takes 19 MiB and a core): the most of
    /// the machine logins can take; default half the cores, at least 1.
    password_hashing_slots: Option<usize>;
    /// Logins waiting for a slot; past it, 503 at once; default 4 per slot.
    password_hashing_queue: Option<usize>;
    /// User and API-key records each instance caches, so that a request
    /// authenticates without a Redis round trip; invalidated by the master
    /// (RESP3 client tracking: Redis 6 or later, CLIENT allowed) within
    /// about a millisecond, dropped on failover; 0 turns the cache off.
    auth_cache_records: usize = "10000";
    /// Items a tenant may hold, unless overridden (`server tenant limits
    /// set`); a number or unlimited; default no limit.
    tenant_max_keys: Option<QuotaLimit>;
    /// Bytes of keys, values and metadata a tenant may hold; default no
    /// limit.
    tenant_max_bytes: Option<QuotaLimit>;
    /// Item writes per second of a tenant; default no limit.
    tenant_writes_per_second: Option<QuotaLimit>;
    /// Item writes of a tenant at once; default a second's worth.
    tenant_write_burst: Option<QuotaLimit>;
    /// Requests per second of a tenant (429 past it); default no limit.
    tenant_requests_per_second: Option<QuotaLimit>;
    /// Requests of a tenant at once; default a second's worth.
    tenant_request_burst: Option<QuotaLimit>;
    /// Requests per second of each API key without a rate of its own;
    /// default no limit.
    tenant_api_key_requests_per_second: Option<QuotaLimit>;
    /// Requests at once of each such API key; default a second's worth.
    tenant_api_key_request_burst: Option<QuotaLimit>;
    /// API keys a tenant may hold; default 100.
    tenant_max_api_keys: Option<QuotaLimit>;
}

/// `--help`'s list of settings: each name, meaning and default.
pub fn settings_help() -> String {
    let mut help =
        String::from("Settings (TOML key; environment variable SERVER_<KEY in upper case>):\n");
    for setting in SETTINGS {
        // Doc comments arrive one source line at a time, each with its
        // leading space; a setting's help is one line.
        let meaning = setting
            .help
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let meaning = meaning.trim_end_matches('.');
        help.push_str(&format!("  {:<35} {meaning}", setting.name));
        if let Some(default) = setting.default {
            help.push_str(&format!("; default {default}"));
        }
        help.push('\n');
    }
    help
}
