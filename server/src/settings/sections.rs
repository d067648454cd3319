//! Each group of settings, checked against the others and turned into the
//! types the service uses.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hyper::header::HeaderName;
use jsonwebtoken::Algorithm;
use tenant_kv::{LoginThrottle, Quota, Quotas, Rate};

use super::parse::QuotaLimit;
use super::table::Raw;
use super::{Discovery, JwtSettings, Protection, RedisSettings};
use crate::error::SettingError;
use crate::limits::Limits;

/// `admin_listen`: on by default, on loopback; never the public address.
pub(super) fn admin_listen(
    raw: &Raw,
    listen: SocketAddr,
) -> Result<Option<SocketAddr>, SettingError> {
    let admin = match raw.admin_listen.trim() {
        "off" => None,
        addr => Some(
            addr.parse()
                .map_err(|_| SettingError::invalid("admin_listen", "expected ip:port, or off"))?,
        ),
    };
    // Port 0 picks a free port for each.
    if admin == Some(listen) && listen.port() != 0 {
        return Err(SettingError::invalid(
            "admin_listen",
            "must differ from listen: metrics name every tenant",
        ));
    }
    Ok(admin)
}

fn discovery(raw: &Raw) -> Result<Discovery, SettingError> {
    match (
        &raw.redis_sentinels,
        &raw.redis_nodes,
        &raw.redis_cluster_nodes,
    ) {
        (Some(sentinels), None, None) => Ok(Discovery::Sentinel {
            master_name: raw.redis_master_name.clone(),
            sentinels: sentinels.clone(),
        }),
        (None, Some(nodes), None) => Ok(Discovery::Candidates(nodes.clone())),
        (None, None, Some(nodes)) => Ok(Discovery::Cluster(nodes.clone())),
        (None, None, None) => Err(SettingError::invalid(
            "redis_sentinels",
            "set redis_sentinels (Sentinel), redis_nodes (ordered candidates) \
             or redis_cluster_nodes (Redis Cluster)",
        )),
        _ => Err(SettingError::invalid(
            "redis_sentinels",
            "set only one of redis_sentinels, redis_nodes and redis_cluster_nodes",
        )),
    }
}

/// Refuses the settings of one way of finding Redis given with another.
fn only_where_they_apply(raw: &Raw, discovery: &Discovery) -> Result<(), SettingError> {
    let sentinel = matches!(discovery, Discovery::Sentinel { .. });
    let refuse = |setting, reason: &str| Err(SettingError::invalid(setting, reason));
    if raw.redis_sentinel_password.is_some() && !sentinel {
        return refuse("redis_sentinel_password", "only with redis_sentinels");
    }
    if raw.redis_last_resort.is_some() && !matches!(discovery, Discovery::Candidates(_)) {
        return refuse(
            "redis_last_resort",
            "only with redis_nodes: Sentinel names the master, a cluster its slot map",
        );
    }
    if raw.redis_demote_stale_master && !sentinel {
        return refuse(
            "redis_demote_stale_master",
            "only with redis_sentinels: the sentinels decide which master is stale",
        );
    }
    Ok(())
}

/// The `redis_*` settings.
pub(super) fn redis(raw: &Raw) -> Result<RedisSettings, SettingError> {
    let discovery = discovery(raw)?;
    let tls = raw.redis_tls;
    let refuse = |setting, reason: &str| Err(SettingError::invalid(setting, reason));
    if raw.redis_tls_ca_file.is_some() && !tls {
        return refuse(
            "redis_tls_ca_file",
            "set redis_tls = true too, or remove it",
        );
    }
    for (user, password, given_user, given_password) in [
        (
            "redis_username",
            "redis_password",
            &raw.redis_username,
            &raw.redis_password,
        ),
        (
            "redis_sentinel_username",
            "redis_sentinel_password",
            &raw.redis_sentinel_username,
            &raw.redis_sentinel_password,
        ),
    ] {
        if given_user.is_some() && given_password.is_none() {
            return Err(SettingError::invalid(
                password,
                format!("{user} needs a password"),
            ));
        }
    }
    only_where_they_apply(raw, &discovery)?;
    let wait_replicas = raw.redis_wait_replicas;
    let wait_replicas_min = raw.redis_wait_replicas_min.unwrap_or(wait_replicas);
    if wait_replicas_min > wait_replicas || (wait_replicas > 0 && wait_replicas_min == 0) {
        return refuse(
            "redis_wait_replicas_min",
            "must be 1 to redis_wait_replicas",
        );
    }
    if matches!(discovery, Discovery::Cluster(_)) && wait_replicas_min < wait_replicas {
        return refuse(
            "redis_wait_replicas_min",
            "not with redis_cluster_nodes yet: a cluster's writes wait for redis_wait_replicas",
        );
    }
    let replica_lost_after = raw.redis_replica_lost_after;
    if replica_lost_after.is_zero() {
        return refuse("redis_replica_lost_after", "must be longer than 0");
    }
    Ok(RedisSettings {
        discovery,
        last_resort: raw.redis_last_resort.clone(),
        username: raw.redis_username.clone(),
        password: raw.redis_password.clone(),
        sentinel_username: raw.redis_sentinel_username.clone(),
        sentinel_password: raw.redis_sentinel_password.clone(),
        tls,
        tls_ca: pem("redis_tls_ca_file", raw.redis_tls_ca_file.as_deref())?,
        retry_budget: raw.redis_retry_budget,
        wait_replicas,
        wait_replicas_min,
        replica_lost_after,
        demote_stale_master: raw.redis_demote_stale_master,
        waitaof_local: raw.redis_waitaof_local,
    })
}

/// The `jwt_*` settings.
pub(super) fn jwt(raw: &Raw) -> Result<JwtSettings, SettingError> {
    let algorithm = match raw.jwt_algorithm.trim() {
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
        secret: raw.jwt_secret.as_ref().map(|s| s.as_bytes().to_vec()),
        private_key: pem("jwt_private_key_file", raw.jwt_private_key_file.as_deref())?,
        public_key: pem("jwt_public_key_file", raw.jwt_public_key_file.as_deref())?,
        issuer: raw.jwt_issuer.clone(),
        audience: raw.jwt_audience.clone(),
        ttl: raw.jwt_ttl,
        leeway: raw.jwt_leeway,
    };
    if jwt.leeway > Duration::from_secs(300) {
        return Err(SettingError::invalid("jwt_leeway", "must be at most 5m"));
    }
    Ok(jwt)
}

/// `encryption_key`: 64 hex digits.
pub(super) fn encryption_key(raw: &Raw) -> Result<Option<[u8; 32]>, SettingError> {
    raw.encryption_key
        .as_deref()
        .map(|key| {
            hex::FromHex::from_hex(key.trim()).map_err(|e| {
                SettingError::invalid(
                    "encryption_key",
                    format!("expected 64 hex digits (32 bytes): {e}"),
                )
            })
        })
        .transpose()
}

/// `loki_tenant_bytes_per_second`: more than zero.
pub(super) fn loki_tenant_bytes_per_second(raw: &Raw) -> Result<u64, SettingError> {
    if raw.loki_tenant_bytes_per_second == 0 {
        return Err(SettingError::invalid(
            "loki_tenant_bytes_per_second",
            "must be more than zero",
        ));
    }
    Ok(raw.loki_tenant_bytes_per_second)
}

/// `read_audit_sample`: at least 1.
pub(super) fn read_audit_sample(raw: &Raw) -> Result<u32, SettingError> {
    if raw.read_audit_sample == 0 {
        return Err(SettingError::invalid(
            "read_audit_sample",
            "must be at least 1 (1 audits every read)",
        ));
    }
    Ok(raw.read_audit_sample)
}

/// `cursor_secret`: at least 16 bytes.
pub(super) fn cursor_secret(raw: &Raw) -> Result<Option<Vec<u8>>, SettingError> {
    let secret = raw.cursor_secret.as_ref().map(|s| s.as_bytes().to_vec());
    if secret.as_ref().is_some_and(|secret| secret.len() < 16) {
        return Err(SettingError::invalid(
            "cursor_secret",
            "must be at least 16 bytes",
        ));
    }
    Ok(secret)
}

/// `loki_url`: an `http://` URL.
pub(super) fn loki_url(raw: &Raw) -> Result<Option<String>, SettingError> {
    let url = raw.loki_url.clone();
    if url.as_ref().is_some_and(|url| {
        url.strip_prefix("http://")
            .is_none_or(|rest| rest.is_empty() || rest.starts_with('/'))
    }) {
        return Err(SettingError::invalid(
            "loki_url",
            "expected an http:// URL (put a TLS proxy in front of Loki for https)",
        ));
    }
    Ok(url)
}

/// `loki_job`: a label value Loki takes (at most 2048 bytes).
pub(super) fn loki_job(raw: &Raw) -> Result<String, SettingError> {
    let job = &raw.loki_job;
    if job.len() > 2048 {
        return Err(SettingError::invalid(
            "loki_job",
            "at most 2048 bytes (Loki's longest label value)",
        ));
    }
    Ok(job.clone())
}

/// The request and connection limits.
pub(super) fn limits(raw: &Raw) -> Result<Limits, SettingError> {
    let request_timeout = raw.request_timeout;
    let limits = Limits {
        max_body_bytes: raw.max_body_bytes,
        max_header_bytes: raw.max_header_bytes,
        max_uri_bytes: raw.max_uri_bytes,
        max_batch: raw.max_batch,
        request_timeout,
        max_connections: raw.max_connections,
        max_connections_per_address: raw.max_connections_per_address,
        send_timeout: raw.send_timeout,
        body_timeout: raw
            .body_timeout
            .unwrap_or_else(|| Limits::default().body_timeout.min(request_timeout / 2)),
        shutdown_grace: raw.shutdown_grace,
    };
    limits.validate()?;
    Ok(limits)
}

/// Throttles and quotas from their settings.
pub(super) fn protection(raw: &Raw) -> Result<Protection, SettingError> {
    let client_address_header = raw
        .client_address_header
        .as_deref()
        .map(|name| {
            HeaderName::try_from(name.trim())
                .map_err(|_| SettingError::invalid("client_address_header", "not a header name"))
        })
        .transpose()?;
    let per_minute = |count: u32| (count > 0).then(|| Rate::per_minute(count));
    let login = LoginThrottle::default()
        .per_username(per_minute(raw.login_attempts_per_username))
        .per_username_total(per_minute(raw.login_attempts_per_username_total))
        .per_source(per_minute(raw.login_attempts_per_address))
        .failed_records(per_minute(raw.login_failed_records_per_minute));
    let half = (std::thread::available_parallelism().map_or(1, usize::from) / 2).max(1);
    let slots = raw.password_hashing_slots.unwrap_or(half);
    if slots == 0 {
        return Err(SettingError::invalid(
            "password_hashing_slots",
            "must be at least 1",
        ));
    }
    let queue = raw.password_hashing_queue.unwrap_or(4 * slots);
    Ok(Protection {
        client_address_header,
        login,
        password_hashing: (slots, queue),
        quotas: quotas(raw)?,
    })
}

/// Every tenant's quotas, from the `tenant_<quota>` settings.
fn quotas(raw: &Raw) -> Result<Quotas, SettingError> {
    let mut quotas = Quotas::default();
    macro_rules! quota {
        ($quota:ident, $setting:ident) => {
            (Quota::$quota, stringify!($setting), raw.$setting)
        };
    }
    let given = [
        quota!(MaxKeys, tenant_max_keys),
        quota!(MaxBytes, tenant_max_bytes),
        quota!(WritesPerSecond, tenant_writes_per_second),
        quota!(WriteBurst, tenant_write_burst),
        quota!(RequestsPerSecond, tenant_requests_per_second),
        quota!(RequestBurst, tenant_request_burst),
        quota!(ApiKeyRequestsPerSecond, tenant_api_key_requests_per_second),
        quota!(ApiKeyRequestBurst, tenant_api_key_request_burst),
        quota!(MaxApiKeys, tenant_max_api_keys),
    ];
    for (quota, setting, value) in given {
        if let Some(QuotaLimit(value)) = value {
            quotas
                .set(quota, value)
                .map_err(|e| SettingError::invalid(setting, e.to_string()))?;
        }
    }
    Ok(quotas)
}

/// The contents of the PEM file a `*_file` setting names.
fn pem(setting: &'static str, path: Option<&Path>) -> Result<Option<Vec<u8>>, SettingError> {
    path.map(|path| {
        std::fs::read(path)
            .map_err(|e| SettingError::invalid(setting, format!("cannot read {path:?}: {e}")))
    })
    .transpose()
}
