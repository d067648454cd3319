//! Users and API keys against a real master: logins with their audit
//! records, migration of bcrypt hashes, and the API key lifecycle.

use std::time::{Duration, Instant};

use redis_topology::Topology;
use tenant_kv::{Actor, Error, LoginThrottle, NewApiKey, NewUser, Quotas, Rate, Scope, TenantKv};

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
        admin: false,
    }
}

fn new_key(name: &str, scopes: Vec<Scope>) -> NewApiKey {
    NewApiKey {
        name: name.into(),
        scopes,
        key_prefix: None,
        ttl: None,
        owner: None,
        requests_per_second: None,
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
    for (name, password) in [("alice", "wrong"), ("nobody", "x")] {
        assert!(matches!(
            users.authenticate(name, password).await,
            Err(Error::InvalidCredentials)
        ));
    }
    // A failure is recorded off the answer's path; an unknown user's only in logs.
    until_audited(&topology, "acme", 5).await;
    // Malformed names and overlong passwords are refused before any work.
    let long_name = "n".repeat(300_000);
    let long_password = "p".repeat(tenant_kv::MAX_PASSWORD_LEN + 1);
    for (name, password) in [
        ("bad name", "x"),
        (long_name.as_str(), "x"),
        ("alice", long_password.as_str()),
    ] {
        match users.authenticate(name, password).await {
            Err(Error::InvalidUser { reason }) => assert!(reason.len() < 200, "{reason}"),
            other => panic!("{other:?}"),
        }
    }
    users.set_disabled("alice", true, &admin).await.unwrap();
    assert!(matches!(
        users.authenticate("alice", "correct horse").await,
        Err(Error::InvalidCredentials)
    ));
    until_audited(&topology, "acme", 7).await;
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
                key_prefix: Some("public/".into()),
                ..new_key("ci", vec![Scope::Read, Scope::List])
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
        .create(&other, new_key("x", vec![Scope::Read]), &admin)
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
    let (_, first) = keys
        .rotate(&acme, &key.id, Duration::from_secs(3600), &admin)
        .await
        .unwrap();
    assert!(keys.verify(&first).await.is_ok());
    assert!(
        keys.verify(&secret).await.is_ok(),
        "within the grace period"
    );
    assert!(matches!(
        keys.rotate(
            &acme,
            &key.id,
            tenant_kv::MAX_ROTATION_GRACE + Duration::from_secs(1),
            &admin
        )
        .await,
        Err(Error::InvalidApiKeySettings { .. })
    ));
    let (_, rotated) = keys
        .rotate(&acme, &key.id, Duration::from_millis(200), &admin)
        .await
        .unwrap();
    assert!(
        matches!(keys.verify(&secret).await, Err(Error::InvalidApiKey)),
        "only the last secret replaced has a grace period"
    );
    let started = Instant::now();
    while keys.verify(&first).await.is_ok() {
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

    // Keys with a TTL work until it runs out.
    let (long_lived, long_secret) = keys
        .create(
            &acme,
            NewApiKey {
                ttl: Some(Duration::from_secs(3600)),
                ..new_key("hour", vec![Scope::Read])
            },
            &admin,
        )
        .await
        .unwrap();
    assert!(long_lived.expires_at.is_some());
    assert!(keys.verify(&long_secret).await.is_ok());
    let (_, short_lived) = keys
        .create(
            &acme,
            NewApiKey {
                ttl: Some(Duration::from_millis(1)),
                ..new_key("temp", vec![Scope::Read])
            },
            &admin,
        )
        .await
        .unwrap();
    let started = Instant::now();
    while keys.verify(&short_lived).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(10), "never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        actions(&audit(&topology, "acme").await),
        [
            "create_api_key",
            "rotate_api_key",
            "rotate_api_key",
            "delete_api_key",
            "create_api_key",
            "create_api_key"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_throttled_per_username_and_per_address() {
    let (_topology, client) = start(0).await;
    let store = TenantKv::builder(client)
        .login_throttle(
            LoginThrottle::off()
                .per_username(Some(Rate::per_minute(3)))
                .per_username_total(Some(Rate::per_minute(5)))
                .per_source(Some(Rate::per_minute(6))),
        )
        .build()
        .unwrap();
    let users = store.users();
    users
        .create(new_user("alice", "acme"), "right", &Actor::system())
        .await
        .unwrap();
    let attempt = |name: &'static str, password: &'static str, from: &'static str| {
        let users = users.clone();
        async move { users.authenticate_from(name, password, Some(from)).await }
    };
    // Three attempts on alice from one address, whatever their outcome;
    // then none from there.
    for password in ["wrong", "wrong", "right"] {
        let _ = attempt("alice", password, "10.0.0.1").await;
    }
    match attempt("alice", "right", "10.0.0.1").await {
        Err(Error::LoginThrottled { retry_after }) => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(60));
        }
        other => panic!("{other:?}"),
    }
    // The guesser does not lock alice out elsewhere, up to the total for
    // her name: two more (the refused attempt above counted for nothing).
    for from in ["10.0.0.2", "10.0.0.3"] {
        assert!(attempt("alice", "right", from).await.is_ok(), "from {from}");
    }
    assert!(matches!(
        attempt("alice", "right", "10.0.0.4").await,
        Err(Error::LoginThrottled { .. })
    ));
    // One address guessing many usernames: its six are spent after three more.
    for name in ["bob", "carol", "dave"] {
        assert!(matches!(
            attempt(name, "x", "10.0.0.1").await,
            Err(Error::InvalidCredentials)
        ));
    }
    assert!(matches!(
        attempt("erin", "x", "10.0.0.1").await,
        Err(Error::LoginThrottled { .. })
    ));
    // Another address is not held back by it.
    assert!(matches!(
        attempt("erin", "x", "10.0.0.5").await,
        Err(Error::InvalidCredentials)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_cannot_flood_the_audit_stream() {
    let (topology, client) = start(0).await;
    let store = TenantKv::builder(client)
        .login_throttle(LoginThrottle::off().failed_records(Some(Rate::per_minute(2))))
        .build()
        .unwrap();
    let users = store.users();
    users
        .create(new_user("alice", "acme"), "right", &Actor::system())
        .await
        .unwrap();
    for _ in 0..5 {
        assert!(matches!(
            users.authenticate("alice", "wrong").await,
            Err(Error::InvalidCredentials)
        ));
    }
    let failed = |records: &[std::collections::HashMap<String, String>]| {
        records
            .iter()
            .filter(|r| r["action"] == "login_failed")
            .cloned()
            .collect::<Vec<_>>()
    };
    // Two records (after create_user) and three failures counted.
    until_audited(&topology, "acme", 3).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let suppressed: Option<u64> = topology
            .query(
                topology.initial_master(),
                redis::cmd("GET").arg("tenant:{acme}:login-failed-suppressed"),
            )
            .await
            .unwrap();
        if suppressed == Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "the failures were never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let records = failed(&audit(&topology, "acme").await);
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|r| !r.contains_key("suppressed")));
    // Once the rate allows records again (here: its state cleared), the
    // next one says how many were left out.
    let _: () = topology
        .query(
            topology.initial_master(),
            redis::cmd("DEL").arg("tenant:{acme}:login-failed-rate"),
        )
        .await
        .unwrap();
    let _ = users.authenticate("alice", "wrong").await;
    until_audited(&topology, "acme", 4).await;
    let records = failed(&audit(&topology, "acme").await);
    assert_eq!(records.len(), 3);
    assert_eq!(records[2]["suppressed"], "3");
    // A success is always recorded.
    users.authenticate("alice", "right").await.unwrap();
    assert_eq!(
        actions(&audit(&topology, "acme").await).last().copied(),
        Some("login_success")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_have_an_owner_a_maximum_and_pages() {
    let (_topology, client) = start(0).await;
    let store = TenantKv::builder(client)
        .quotas(Quotas::default().max_api_keys(3))
        .build()
        .unwrap();
    let (users, keys, acme) = (store.users(), store.api_keys(), tenant("acme"));
    let system = Actor::system();
    users
        .create(new_user("alice", "acme"), "pw", &system)
        .await
        .unwrap();
    let owned = NewApiKey {
        owner: Some("alice".into()),
        ..new_key("alice's", vec![Scope::Read])
    };
    let (key, secret) = keys.create(&acme, owned, &system).await.unwrap();
    assert_eq!(key.owner.as_deref(), Some("alice"));
    let (verified, owner) = keys.verify_with_owner(&secret).await.unwrap();
    assert_eq!(
        (verified.id.as_str(), owner.unwrap().username.as_str()),
        (key.id.as_str(), "alice")
    );
    // Disabling the owner disables its keys at once; enabling brings them back.
    users.set_disabled("alice", true, &system).await.unwrap();
    assert!(matches!(
        keys.verify(&secret).await,
        Err(Error::InvalidApiKey)
    ));
    users.set_disabled("alice", false, &system).await.unwrap();
    assert!(keys.verify(&secret).await.is_ok());

    for name in ["b", "c"] {
        keys.create(&acme, new_key(name, vec![Scope::Read]), &system)
            .await
            .unwrap();
    }
    match keys
        .create(&acme, new_key("d", vec![Scope::Read]), &system)
        .await
    {
        Err(Error::QuotaExceeded {
            what: "api_keys",
            limit: 3,
            would_be: 4,
        }) => {}
        other => panic!("{other:?}"),
    }
    // Pages, oldest first, and by owner.
    let first = keys.list_page(&acme, None, 2, None).await.unwrap();
    let second = keys
        .list_page(&acme, None, 2, first.cursor.as_deref())
        .await
        .unwrap();
    let mut names: Vec<String> = first
        .keys
        .iter()
        .chain(&second.keys)
        .map(|k| k.name.clone())
        .collect();
    // Oldest first (keys made in the same millisecond in id order).
    names.sort();
    assert_eq!(names, ["alice's", "b", "c"], "each key once");
    assert_eq!((first.keys.len(), second.cursor), (2, None));
    let mine = keys
        .list_page(&acme, Some(Some("alice")), 10, None)
        .await
        .unwrap();
    assert_eq!(mine.keys.len(), 1);
    let of_no_user = keys.list_page(&acme, Some(None), 10, None).await.unwrap();
    assert_eq!(of_no_user.keys.len(), 2);
    assert!(matches!(
        keys.list_page(&acme, None, 2, Some("junk")).await,
        Err(Error::InvalidCursor)
    ));
}

#[tokio::test]
async fn rotations_never_race_and_expired_keys_free_their_place() {
    let (topology, client) = start(0).await;
    let store = TenantKv::builder(client)
        .quotas(Quotas::default().max_api_keys(1))
        .build()
        .unwrap();
    let (keys, acme, system) = (store.api_keys(), tenant("acme"), Actor::system());
    // An id that is no key id names nothing, whatever Redis holds there.
    assert!(matches!(
        keys.get(&acme, "../request-rate").await,
        Err(Error::UnknownApiKey { .. })
    ));
    let (key, _) = keys
        .create(
            &acme,
            NewApiKey {
                ttl: Some(Duration::from_millis(1)),
                ..new_key("short", vec![Scope::Read])
            },
            &system,
        )
        .await
        .unwrap();
    // The expired key is revoked to make room for a new one.
    let started = Instant::now();
    let (fresh, _) = loop {
        match keys
            .create(&acme, new_key("fresh", vec![Scope::Read]), &system)
            .await
        {
            Ok(created) => break created,
            Err(Error::QuotaExceeded { .. }) => {
                assert!(started.elapsed() < Duration::from_secs(10), "never expired");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(other) => panic!("{other}"),
        }
    };
    assert!(matches!(
        keys.get(&acme, &key.id).await,
        Err(Error::UnknownApiKey { .. })
    ));
    assert!(actions(&audit(&topology, "acme").await).contains(&"expire_api_key"));
    // A rotation of a key revoked meanwhile brings nothing back.
    keys.revoke(&acme, &fresh.id, &system).await.unwrap();
    assert!(matches!(
        keys.rotate(&acme, &fresh.id, Duration::ZERO, &system).await,
        Err(Error::UnknownApiKey { .. })
    ));
}
