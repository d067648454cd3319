//! Where settings come from: the file, the environment, secret files, and
//! the one table behind the struct and `--help`.

use super::table::Raw;
use super::*;

const NODES: (&str, &str) = ("SERVER_REDIS_NODES", "r:6379");
const TEXT: &str = "0123456789abcdef0123456789abcdef";

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
    assert_eq!(
        settings.auth_cache_records,
        tenant_kv::DEFAULT_AUTH_CACHE_CAPACITY
    );
}

#[test]
fn the_auth_cache_is_sized_or_turned_off() {
    for (given, records) in [("0", 0), ("250", 250)] {
        let settings =
            Settings::load(None, env(&[NODES, ("SERVER_AUTH_CACHE_RECORDS", given)])).unwrap();
        assert_eq!(settings.auth_cache_records, records);
    }
    let error =
        Settings::load(None, env(&[NODES, ("SERVER_AUTH_CACHE_RECORDS", "-1")])).unwrap_err();
    assert!(error.to_string().contains("auth_cache_records"), "{error}");
}

/// Every `<secret>_file` beside a `<secret>` setting.
fn secret_files() -> Vec<(&'static str, &'static str)> {
    SETTINGS
        .iter()
        .filter_map(|setting| {
            let secret = setting.name.strip_suffix("_file")?;
            let secret = SETTINGS.iter().find(|s| s.name == secret)?;
            Some((secret.name, setting.name))
        })
        .collect()
}

#[test]
fn every_secret_can_be_read_from_a_file() {
    let secrets = secret_files();
    let names: Vec<_> = secrets.iter().map(|(secret, _)| *secret).collect();
    assert_eq!(
        names,
        [
            "redis_password",
            "redis_sentinel_password",
            "jwt_secret",
            "encryption_key",
            "cursor_secret"
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let path = file(&dir, "secret", &format!("{TEXT}\n"));
    let path = path.to_str().unwrap();
    for (secret, secret_file) in secrets {
        let var = |name: &str| format!("SERVER_{}", name.to_ascii_uppercase());
        let given = Raw::load(None, vec![(var(secret), TEXT.to_owned())]).unwrap();
        let read = Raw::load(None, vec![(var(secret_file), path.to_owned())]).unwrap();
        assert_eq!(format!("{given:?}"), format!("{read:?}"), "{secret_file}");

        let both = Raw::load(
            None,
            vec![
                (var(secret), TEXT.to_owned()),
                (var(secret_file), path.to_owned()),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            both.contains(&format!("`{secret}`")) && both.contains(secret_file),
            "{both}"
        );
    }
}

#[test]
fn secret_files_reach_the_settings_and_a_missing_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = file(&dir, "jwt", &format!("{TEXT}\r\n"));
    let key = file(&dir, "key", &format!("{}\n", "ab".repeat(32)));
    let toml = file(
        &dir,
        "server.toml",
        &format!("redis_nodes = \"r:6379\"\njwt_secret_file = {jwt:?}\n"),
    );
    let settings = Settings::load(
        Some(&toml),
        env(&[("SERVER_ENCRYPTION_KEY_FILE", key.to_str().unwrap())]),
    )
    .unwrap();
    assert_eq!(settings.jwt.secret.as_deref(), Some(TEXT.as_bytes()));
    assert_eq!(settings.encryption_key, Some([0xab; 32]));

    let missing = dir.path().join("missing");
    let error = Settings::load(
        None,
        env(&[
            NODES,
            ("SERVER_CURSOR_SECRET_FILE", missing.to_str().unwrap()),
        ]),
    )
    .unwrap_err();
    assert!(
        matches!(
            &error,
            SettingError::Invalid {
                setting: "cursor_secret_file",
                ..
            }
        ),
        "{error}"
    );
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
