//! Each group of settings, parsed and checked.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::header::HeaderName;
use jsonwebtoken::Algorithm;
use redis_failover::NodeAddr;
use tenant_kv::{LoginThrottle, Quota, Quotas, Rate};

use super::parse::{Raw, parse_key_hex};
use super::{Discovery, JwtSettings, Protection, RedisSettings};
use crate::error::SettingError;
use crate::limits::Limits;

/// `admin_listen`: on by default, on loopback; never the public address.
pub(super) fn admin_listen(
    raw: &Raw,
    listen: SocketAddr,
) -> Result<Option<SocketAddr>, SettingError> {
    let admin = match raw.get("admin_listen").unwrap_or("127.0.0.1:9090") {
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

fn nodes(raw: &Raw, name: &'static str) -> Result<Option<Vec<NodeAddr>>, SettingError> {
    raw.get(name)
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
}

fn discovery(raw: &Raw) -> Result<Discovery, SettingError> {
    match (nodes(raw, "redis_sentinels")?, nodes(raw, "redis_nodes")?) {
        (Some(sentinels), None) => Ok(Discovery::Sentinel {
            master_name: raw
                .get("redis_master_name")
                .unwrap_or("mymaster")
                .to_owned(),
            sentinels,
        }),
        (None, Some(nodes)) => Ok(Discovery::Candidates(nodes)),
        (Some(_), Some(_)) => Err(SettingError::invalid(
            "redis_sentinels",
            "set either redis_sentinels or redis_nodes, not both",
        )),
        (None, None) => Err(SettingError::invalid(
            "redis_sentinels",
            "set redis_sentinels (Sentinel) or redis_nodes (ordered candidates)",
        )),
    }
}

/// The `redis_*` settings.
pub(super) fn redis(raw: &Raw) -> Result<RedisSettings, SettingError> {
    let discovery = discovery(raw)?;
    let sentinel = matches!(discovery, Discovery::Sentinel { .. });
    let last_resort = raw
        .get("redis_last_resort")
        .map(|addr| {
            addr.parse()
                .map_err(|_| SettingError::invalid("redis_last_resort", "expected host:port"))
        })
        .transpose()?;
    let tls = raw.boolean("redis_tls", false)?;
    let refuse = |setting, reason: &str| Err(SettingError::invalid(setting, reason));
    if raw.get("redis_tls_ca_file").is_some() && !tls {
        return refuse(
            "redis_tls_ca_file",
            "set redis_tls = true too, or remove it",
        );
    }
    for (user, password) in [
        ("redis_username", "redis_password"),
        ("redis_sentinel_username", "redis_sentinel_password"),
    ] {
        if raw.get(user).is_some() && raw.get(password).is_none() {
            return Err(SettingError::invalid(
                password,
                format!("{user} needs a password"),
            ));
        }
    }
    if raw.get("redis_sentinel_password").is_some() && !sentinel {
        return refuse("redis_sentinel_password", "only with redis_sentinels");
    }
    if last_resort.is_some() && sentinel {
        return refuse(
            "redis_last_resort",
            "only with redis_nodes: with Sentinel, the sentinels name the master",
        );
    }
    let wait_replicas = raw.number("redis_wait_replicas", 0)?;
    let wait_replicas_min = raw.number("redis_wait_replicas_min", wait_replicas)?;
    if wait_replicas_min > wait_replicas || (wait_replicas > 0 && wait_replicas_min == 0) {
        return refuse(
            "redis_wait_replicas_min",
            "must be 1 to redis_wait_replicas",
        );
    }
    let replica_lost_after = raw.duration("redis_replica_lost_after", Duration::from_secs(8))?;
    if replica_lost_after.is_zero() {
        return refuse("redis_replica_lost_after", "must be longer than 0");
    }
    let demote_stale_master = raw.boolean("redis_demote_stale_master", false)?;
    if demote_stale_master && !sentinel {
        return refuse(
            "redis_demote_stale_master",
            "only with redis_sentinels: the sentinels decide which master is stale",
        );
    }
    let owned = |name| raw.get(name).map(str::to_owned);
    Ok(RedisSettings {
        discovery,
        last_resort,
        username: owned("redis_username"),
        password: owned("redis_password"),
        sentinel_username: owned("redis_sentinel_username"),
        sentinel_password: owned("redis_sentinel_password"),
        tls,
        tls_ca: raw.pem("redis_tls_ca_file")?,
        retry_budget: raw.duration("redis_retry_budget", Duration::from_secs(8))?,
        wait_replicas,
        wait_replicas_min,
        replica_lost_after,
        demote_stale_master,
    })
}

/// The `jwt_*` settings.
pub(super) fn jwt(raw: &Raw) -> Result<JwtSettings, SettingError> {
    let algorithm = match raw.get("jwt_algorithm").unwrap_or("HS256") {
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
        secret: raw.get("jwt_secret").map(|s| s.as_bytes().to_vec()),
        private_key: raw.pem("jwt_private_key_file")?,
        public_key: raw.pem("jwt_public_key_file")?,
        issuer: raw.get("jwt_issuer").map(str::to_owned),
        audience: raw.get("jwt_audience").map(str::to_owned),
        ttl: raw.duration("jwt_ttl", Duration::from_secs(30 * 60))?,
        leeway: raw.duration("jwt_leeway", Duration::from_secs(5))?,
    };
    if jwt.leeway > Duration::from_secs(300) {
        return Err(SettingError::invalid("jwt_leeway", "must be at most 5m"));
    }
    Ok(jwt)
}

/// `encryption_key`: 64 hex digits.
pub(super) fn encryption_key(raw: &Raw) -> Result<Option<[u8; 32]>, SettingError> {
    raw.get("encryption_key")
        .map(|hex| {
            parse_key_hex(hex).ok_or_else(|| {
                SettingError::invalid("encryption_key", "expected 64 hex digits (32 bytes)")
            })
        })
        .transpose()
}

/// `cursor_secret`: at least 16 bytes.
pub(super) fn cursor_secret(raw: &Raw) -> Result<Option<Vec<u8>>, SettingError> {
    let secret = raw.get("cursor_secret").map(|s| s.as_bytes().to_vec());
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
    let url = raw.get("loki_url").map(str::to_owned);
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
    let job = raw.get("loki_job").unwrap_or("log-buffer");
    if job.len() > 2048 {
        return Err(SettingError::invalid(
            "loki_job",
            "at most 2048 bytes (Loki's longest label value)",
        ));
    }
    Ok(job.to_owned())
}

/// The request and connection limits.
pub(super) fn limits(raw: &Raw) -> Result<Limits, SettingError> {
    let defaults = Limits::default();
    let request_timeout = raw.duration("request_timeout", defaults.request_timeout)?;
    let limits = Limits {
        max_body_bytes: raw.number("max_body_bytes", defaults.max_body_bytes)?,
        max_header_bytes: raw.number("max_header_bytes", defaults.max_header_bytes)?,
        max_uri_bytes: raw.number("max_uri_bytes", defaults.max_uri_bytes)?,
        max_batch: raw.number("max_batch", defaults.max_batch)?,
        request_timeout,
        max_connections: raw.number("max_connections", defaults.max_connections)?,
        max_connections_per_address: raw.number(
            "max_connections_per_address",
            defaults.max_connections_per_address,
        )?,
        send_timeout: raw.duration("send_timeout", defaults.send_timeout)?,
        body_timeout: raw.duration(
            "body_timeout",
            defaults.body_timeout.min(request_timeout / 2),
        )?,
        shutdown_grace: raw.duration("shutdown_grace", defaults.shutdown_grace)?,
    };
    limits.validate()?;
    Ok(limits)
}

/// Throttles and quotas from their settings.
pub(super) fn protection(raw: &Raw) -> Result<Protection, SettingError> {
    let client_address_header = raw
        .get("client_address_header")
        .map(|name| {
            HeaderName::try_from(name)
                .map_err(|_| SettingError::invalid("client_address_header", "not a header name"))
        })
        .transpose()?;
    let per_minute = |name: &'static str, default: u32| -> Result<Option<Rate>, SettingError> {
        let count: u32 = raw.number(name, default)?;
        Ok((count > 0).then(|| Rate::per_minute(count)))
    };
    let login = LoginThrottle::default()
        .per_username(per_minute("login_attempts_per_username", 10)?)
        .per_username_total(per_minute("login_attempts_per_username_total", 100)?)
        .per_source(per_minute("login_attempts_per_address", 30)?)
        .failed_records(per_minute("login_failed_records_per_minute", 60)?);
    let half = (std::thread::available_parallelism().map_or(1, usize::from) / 2).max(1);
    let slots: usize = raw.number("password_hashing_slots", half)?;
    if slots == 0 {
        return Err(SettingError::invalid(
            "password_hashing_slots",
            "must be at least 1",
        ));
    }
    let queue = raw.number("password_hashing_queue", 4 * slots)?;
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
    for (quota, setting) in QUOTA_SETTINGS {
        let value = match raw.get(setting) {
            None => continue,
            Some("unlimited" | "none") => None,
            Some(number) => Some(number.parse::<u64>().map_err(|_| {
                SettingError::invalid(setting, "expected a whole number, or unlimited")
            })?),
        };
        quotas
            .set(quota, value)
            .map_err(|e| SettingError::invalid(setting, e.to_string()))?;
    }
    Ok(quotas)
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
