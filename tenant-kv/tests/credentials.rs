//! Users and API keys against a real master: logins with their audit
//! records, migration of bcrypt hashes, and the API key lifecycle.

use std::time::{Duration, Instant};

use redis_topology::Topology;
use tenant_kv::{Actor, Error, NewApiKey, NewUser, Scope, TenantKv};

mod common;

use common::*;

async fn start_store() -> (Topology, TenantKv) {
    let (topology, client) = start(0).await;
    (topology, TenantKv::builder(client).build().unwrap())
}

fn new_user(name: &str, tenant_id: &str) -> NewUser {
    NewUser {
        username: name.to_owned(),
        tenant: tenant(tenant_id),
        email: Some(format!("{name}@example.com")),
        full_name: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_log_in_with_argon2_or_migrated_bcrypt_hashes_and_every_attempt_is_audited() {
    let (topology, store) = start_store().await;
    let users = store.users();
    let admin = Actor::system();
    users
        .create(new_user("alice", "acme"), "correct horse", &admin)
        .await
        .unwrap();
    assert!(matches!(
        users.create(new_user("alice", "other"), "x", &admin).await,
        Err(Error::UserExists { .. })
    ));
    let bcrypt_hash = bcrypt::hash("legacy", 4).unwrap();
    users
        .import(new_user("bob", "acme"), &bcrypt_hash, &admin)
        .await
        .unwrap();

    let alice = users.authenticate("alice", "correct horse").await.unwrap();
    assert_eq!(alice.tenant, tenant("acme"));
    assert_eq!(alice.email.as_deref(), Some("alice@example.com"));
    assert_eq!(
        users.authenticate("bob", "legacy").await.unwrap().username,
        "bob"
    );
    for (name, password) in [("alice", "wrong"), ("nobody", "x"), ("bad name", "x")] {
        assert!(matches!(
            users.authenticate(name, password).await,
            Err(Error::InvalidCredentials)
        ));
    }
    users.set_disabled("alice", true, &admin).await.unwrap();
    assert!(matches!(
        users.authenticate("alice", "correct horse").await,
        Err(Error::InvalidCredentials)
    ));
    let listed: Vec<String> = users
        .list(&tenant("acme"))
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.username)
        .collect();
    assert_eq!(listed, ["alice", "bob"]);
    assert_eq!(
        actions(&audit(&topology, "acme").await),
        [
            "create_user",
            "create_user",
            "login_success",
            "login_success",
            "login_failed",
            "disable_user",
            "login_failed",
        ]
    );
}

#[tokio::test]
async fn api_keys_verify_until_revoked_expired_or_past_their_rotation_grace() {
    let (topology, store) = start_store().await;
    let keys = store.api_keys();
    let (acme, other) = (tenant("acme"), tenant("other"));
    let admin = Actor::user("alice");
    let (key, secret) = keys
        .create(
            &acme,
            NewApiKey {
                name: "ci".into(),
                scopes: vec![Scope::Read, Scope::List],
                key_prefix: Some("public/".into()),
                ttl: None,
            },
            &admin,
        )
        .await
        .unwrap();
    assert!(secret.starts_with(&format!("tkv_{}_", key.id)));
    let verified = keys.verify(&secret).await.unwrap();
    assert_eq!(verified.tenant, acme);
    assert!(verified.allows(Scope::Read, "public/x"));
    assert!(!verified.allows(Scope::Write, "public/x"));
    assert!(keys.get(&acme, &key.id).await.unwrap().last_used.is_some());

    // A wrong secret with a valid checksum, and junk, are refused alike.
    let (_, unrelated) = keys
        .create(
            &other,
            NewApiKey {
                name: "x".into(),
                scopes: vec![Scope::Read],
                key_prefix: None,
                ttl: None,
            },
            &admin,
        )
        .await
        .unwrap();
    let forged = format!("tkv_{}_{}", key.id, &unrelated[21..]);
    for bad in [forged.as_str(), "tkv_nope", ""] {
        assert!(
            matches!(keys.verify(bad).await, Err(Error::InvalidApiKey)),
            "{bad}"
        );
    }
    // Another tenant can neither see nor revoke it.
    assert!(matches!(
        keys.revoke(&other, &key.id, &admin).await,
        Err(Error::UnknownApiKey { .. })
    ));
    assert_eq!(keys.list(&other).await.unwrap().len(), 1);

    // Rotation: the old secret lives on for the grace period only.
    let (_, rotated) = keys
        .rotate(&acme, &key.id, Duration::from_millis(300), &admin)
        .await
        .unwrap();
    assert!(keys.verify(&rotated).await.is_ok());
    assert!(
        keys.verify(&secret).await.is_ok(),
        "within the grace period"
    );
    let started = Instant::now();
    while keys.verify(&secret).await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "grace never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(keys.verify(&rotated).await.is_ok());

    keys.revoke(&acme, &key.id, &admin).await.unwrap();
    assert!(matches!(
        keys.verify(&rotated).await,
        Err(Error::InvalidApiKey)
    ));
    assert!(keys.list(&acme).await.unwrap().is_empty());

    let (_, short_lived) = keys
        .create(
            &acme,
            NewApiKey {
                name: "temp".into(),
                scopes: vec![Scope::Read],
                key_prefix: None,
                ttl: Some(Duration::from_millis(200)),
            },
            &admin,
        )
        .await
        .unwrap();
    assert!(keys.verify(&short_lived).await.is_ok());
    let started = Instant::now();
    while keys.verify(&short_lived).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(10), "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        actions(&audit(&topology, "acme").await),
        [
            "create_api_key",
            "rotate_api_key",
            "delete_api_key",
            "create_api_key"
        ]
    );
}
