//! Where settings come from: the file and the environment, and
//! the one table behind the struct and `--help`.

use super::table::Raw;
use super::*;

const NODES: (&str, &str) = ("SERVER_REDIS_NODES", "r:6379");

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn an_unknown_key_in_the_file_is_refused_by_its_name() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("redis_nodes = \"r:6379\"\nmax_bach = 7\n", "max_bach"),
        (
            "redis_nodes = \"r:6379\"\n[redis]\nnodes = \"r:6379\"\n",
            "redis",
        ),
    ] {
        let path = file(&dir, "server.toml", text);
        let error = Settings::load(Some(&path), env(&[])).unwrap_err();
        assert!(
            matches!(&error, SettingError::File { reason, .. } if reason.contains(&format!("`{key}`"))),
            "{error}"
        );
    }
}

#[test]
fn unknown_server_variables_are_ignored() {
    let settings = Settings::load(
        None,
        env(&[
            NODES,
            ("SERVER_PORT", "tcp://10.0.0.1:80"),
            ("SERVER_SERVICE_HOST", "10.0.0.1"),
            ("SERVER_CONFIG", "/etc/server.toml"),
            ("OTHER_MAX_BATCH", "oops"),
        ]),
    )
    .unwrap();
    assert_eq!(settings.limits.max_batch, 100);
}

#[test]
fn the_environment_overrides_the_file_and_both_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        &dir,
        "server.toml",
        "redis_sentinels = [\"s-0:26379\", \"s-1:26379\"]\nredis_tls = true\nredis_demote_stale_master = true\nredis_wait_replicas = 2\nrequest_timeout = \"3s\"\nmax_batch = 7\ntenant_max_keys = 10\ntenant_max_bytes = \"unlimited\"\nredis_password = \"\"\n",
    );
    let settings = Settings::load(
        Some(&path),
        env(&[
            ("SERVER_REDIS_TLS", "false"),
            ("SERVER_REQUEST_TIMEOUT", "500ms"),
            ("SERVER_BODY_TIMEOUT", "200ms"),
            ("SERVER_TENANT_MAX_KEYS", "20"),
            // All digits, and still the text given.
            ("SERVER_REDIS_PASSWORD", "123456"),
            ("SERVER_REDIS_RETRY_BUDGET", "400ms"),
        ]),
    )
    .unwrap();
    assert!(!settings.redis.tls);
    assert!(settings.redis.demote_stale_master);
    assert_eq!(settings.redis.wait_replicas, 2);
    assert_eq!(settings.redis.password.as_deref(), Some("123456"));
    assert_eq!(
        settings.limits.request_timeout,
        std::time::Duration::from_millis(500)
    );
    assert_eq!(settings.limits.max_batch, 7);
    assert_eq!(settings.protection.quotas.max_keys, Some(20));
    assert_eq!(settings.protection.quotas.max_bytes, None);
}

#[test]
fn the_defaults_are_the_limits_defaults() {
    let settings = Settings::load(None, env(&[NODES])).unwrap();
    assert_eq!(settings.limits, crate::limits::Limits::default());
    assert_eq!(settings.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(
        settings.admin_listen,
        Some("127.0.0.1:9090".parse().unwrap())
    );
    assert!(settings.log_buffer);
}

#[test]
fn help_lists_every_field_of_the_struct() {
    let help = settings_help();
    let dir = tempfile::tempdir().unwrap();
    for setting in SETTINGS {
        assert!(
            help.lines()
                .any(|line| line.split_whitespace().next() == Some(setting.name)),
            "{} missing from --help",
            setting.name
        );
        // The struct knows the key: whatever the value, it is not unknown.
        let path = file(&dir, "server.toml", &format!("{} = []\n", setting.name));
        let error = Raw::load(Some(&path), env(&[])).map(drop);
        assert!(
            !matches!(&error, Err(SettingError::File { .. })),
            "{}: {error:?}",
            setting.name
        );
        if let Some(default) = setting.default {
            assert!(
                help.contains(&format!("default {default}")),
                "{}",
                setting.name
            );
        }
    }
    assert_eq!(help.lines().count(), SETTINGS.len() + 1);
}
