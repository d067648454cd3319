//! The settings' parsing and checks.

use std::time::Duration;

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
    assert_eq!(settings.loki_job, "log-buffer", "the default");
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
    assert!(!settings.redis.waitaof_local, "the default");
    assert_eq!(
        settings.redis.durability(),
        redis_failover::Durability::Replicated {
            replicas: 2,
            timeout: Duration::from_secs(1)
        }
    );
    assert_eq!(settings.listen, "0.0.0.0:8080".parse().unwrap());
}

#[test]
fn errors_name_the_setting() {
    let long_job = "j".repeat(2049);
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
            &[("SERVER_REDIS_NODES", "r:6379"), ("SERVER_LISTEN", "r:80")],
            "listen",
        ),
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
                ("SERVER_REDIS_CLUSTER_NODES", "c:6379"),
                ("SERVER_REDIS_LAST_RESORT", "r:6379"),
            ],
            "redis_last_resort",
        ),
        (
            &[
                ("SERVER_REDIS_CLUSTER_NODES", "c:6379"),
                ("SERVER_REDIS_NODES", "r:6379"),
            ],
            "redis_sentinels",
        ),
        (
            &[
                ("SERVER_REDIS_CLUSTER_NODES", "c:6379"),
                ("SERVER_REDIS_WAIT_REPLICAS", "2"),
                ("SERVER_REDIS_WAIT_REPLICAS_MIN", "1"),
            ],
            "redis_wait_replicas_min",
        ),
        (
            &[("SERVER_REDIS_CLUSTER_NODES", "no-port"), SECRET],
            "redis_cluster_nodes",
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
                ("SERVER_LOKI_JOB", long_job.as_str()),
            ],
            "loki_job",
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
        "redis_nodes = [\"r-0:6379\", \"r-1:6379\"]\nmax_batch = 7\nloki_job = \"kv-server\"\njwt_secret = \"0123456789abcdef0123456789abcdef\"\n",
    )
    .unwrap();
    let settings = Settings::load(Some(&path), env(&[("SERVER_MAX_BATCH", "9")])).unwrap();
    assert_eq!(settings.limits.max_batch, 9);
    assert_eq!(settings.loki_job, "kv-server");
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
fn durations_take_a_unit() {
    let load = |value: &str| {
        Settings::load(
            None,
            env(&[
                ("SERVER_REDIS_NODES", "r:6379"),
                ("SERVER_REDIS_RETRY_BUDGET", value),
            ]),
        )
        .map(|settings| settings.redis.retry_budget)
    };
    assert_eq!(load("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(load("2s").unwrap(), Duration::from_secs(2));
    for wrong in ["5", "s", "-1s"] {
        let error = load(wrong).unwrap_err();
        assert!(error.to_string().contains("redis_retry_budget"), "{error}");
    }
}

#[test]
fn every_quota_has_a_setting() {
    for quota in tenant_kv::Quota::ALL {
        let name = format!("SERVER_TENANT_{}", quota.as_str().to_ascii_uppercase());
        let settings = Settings::load(
            None,
            env(&[
                ("SERVER_REDIS_NODES", "r:6379"),
                (name.as_str(), "7"),
                SECRET,
            ]),
        )
        .unwrap();
        assert_eq!(settings.protection.quotas.get(quota), Some(7), "{quota}");
    }
}

#[test]
fn waitaof_local_asks_for_persisted_writes() {
    let load = |pairs: &[(&str, &str)]| {
        let mut all = vec![SECRET, ("SERVER_REDIS_NODES", "r:6379")];
        all.extend_from_slice(pairs);
        Settings::load(None, env(&all)).unwrap().redis.durability()
    };
    assert_eq!(load(&[]), redis_failover::Durability::Master);
    let persisted = |replicas| redis_failover::Durability::Persisted {
        local: true,
        replicas,
        timeout: Duration::from_secs(1),
    };
    assert_eq!(
        load(&[("SERVER_REDIS_WAITAOF_LOCAL", "true")]),
        persisted(0)
    );
    assert_eq!(
        load(&[
            ("SERVER_REDIS_WAITAOF_LOCAL", "true"),
            ("SERVER_REDIS_WAIT_REPLICAS", "2"),
        ]),
        persisted(2)
    );
}

#[test]
fn read_audit_sample_and_the_loki_pace_have_defaults_and_refuse_zero() {
    let load = |pairs: &[(&str, &str)]| {
        let mut all = vec![SECRET, ("SERVER_REDIS_NODES", "r:6379")];
        all.extend_from_slice(pairs);
        Settings::load(None, env(&all))
    };
    assert_eq!(load(&[]).unwrap().read_audit_sample, 1);
    assert!(load(&[]).unwrap().stage_audit_records);
    let appended = load(&[("SERVER_STAGE_AUDIT_RECORDS", "false")]).unwrap();
    assert!(!appended.stage_audit_records);
    let sampled = load(&[("SERVER_READ_AUDIT_SAMPLE", "10")]).unwrap();
    assert_eq!(sampled.read_audit_sample, 10);
    let error = load(&[("SERVER_READ_AUDIT_SAMPLE", "0")]).unwrap_err();
    assert!(error.to_string().contains("read_audit_sample"), "{error}");

    assert_eq!(load(&[]).unwrap().loki_tenant_bytes_per_second, 3 << 20);
    let paced = load(&[("SERVER_LOKI_TENANT_BYTES_PER_SECOND", "8000000")]).unwrap();
    assert_eq!(paced.loki_tenant_bytes_per_second, 8_000_000);
    let error = load(&[("SERVER_LOKI_TENANT_BYTES_PER_SECOND", "0")]).unwrap_err();
    assert!(
        error.to_string().contains("loki_tenant_bytes_per_second"),
        "{error}"
    );
}

#[test]
fn cluster_nodes_give_a_cluster_discovery() {
    let settings = Settings::load(
        None,
        env(&[("SERVER_REDIS_CLUSTER_NODES", "c-0:6379, c-1:6379"), SECRET]),
    )
    .unwrap();
    let Discovery::Cluster(nodes) = &settings.redis.discovery else {
        panic!("{:?}", settings.redis.discovery);
    };
    let names: Vec<String> = nodes.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["c-0:6379", "c-1:6379"]);
}
