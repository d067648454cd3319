//! The store against a real master with replicas: TTL expiry, listing,
//! isolation and quotas.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;
use tenant_kv::{Actor, Error, NewItem, Precondition, Quota, Quotas, TenantKv, Write, Written};

mod common;

use common::*;

#[tokio::test]
async fn raw_reads_hand_on_the_stored_text_and_refuse_what_is_not_json() {
    let (topology, client) = start(0).await;
    let store = TenantKv::builder(client).build().unwrap();
    let acme = store.tenant(tenant("acme"), Actor::user("alice"));
    let mut metadata = serde_json::Map::new();
    metadata.insert("owner".into(), json!("alice"));
    let value = json!({"n": 1.5, "s": "é\n\"", "list": [1, null, true]});
    let created = acme
        .create(
            "doc",
            NewItem::new(value.clone()).metadata(metadata.clone()),
        )
        .await
        .unwrap();
    let raw = acme.get_raw("doc").await.unwrap();
    assert_eq!(raw.value.get(), serde_json::to_string(&value).unwrap());
    assert_eq!(
        (raw.key.as_str(), raw.metadata, raw.version, raw.created_at),
        ("doc", Some(metadata), created.version, created.created_at)
    );
    assert!(matches!(
        acme.get_raw("nothing").await,
        Err(Error::NotFound { .. })
    ));

    // A value cut short is corrupt, read either way.
    let (master, key) = (topology.initial_master(), "tenant:{acme}:data:doc");
    let mut stored: Vec<u8> = topology
        .query(master, redis::cmd("GET").arg(key))
        .await
        .unwrap();
    stored.pop();
    let _: () = topology
        .query(master, redis::cmd("SET").arg(key).arg(stored))
        .await
        .unwrap();
    assert!(matches!(
        acme.get_raw("doc").await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(acme.get("doc").await, Err(Error::Corrupt { .. })));
}

#[tokio::test]
async fn an_expired_item_is_gone_from_reads_and_listing_and_leaves_the_index_audited() {
    let (topology, client) = start(0).await;
    let store = TenantKv::builder(client).build().unwrap();
    let acme = store.tenant(tenant("acme"), Actor::api_key("k1"));
    let item = acme
        .create(
            "short",
            NewItem::new(json!(1)).ttl(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert!(item.expires_at.is_some());
    acme.create("long", NewItem::new(json!(2))).await.unwrap();
    assert_eq!(
        acme.list("", 10, None).await.unwrap().keys,
        ["long", "short"]
    );

    let started = Instant::now();
    while acme.get("short").await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(10), "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(acme.list("", 10, None).await.unwrap().keys, ["long"]);
    // A purge (the expiry watcher's) takes it out of the index and the
    // counters, audited once however often it runs.
    assert_eq!(acme.purge_expired().await.unwrap(), 1);
    assert_eq!(acme.purge_expired().await.unwrap(), 0);
    acme.create("other", NewItem::new(json!(3))).await.unwrap();
    acme.create("another", NewItem::new(json!(4)))
        .await
        .unwrap();
    let records = audit(&topology, "acme").await;
    let expirations: Vec<_> = records
        .iter()
        .filter(|r| r["action"] == "key_expiration")
        .collect();
    assert_eq!(expirations.len(), 1, "{records:?}");
    assert_eq!(expirations[0]["key"], "short");
    assert_eq!(acme.usage().await.unwrap().keys, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_returns_each_key_once_while_other_tenants_write() {
    const KEYS: usize = 10_000;
    let (_topology, client) = start(0).await;
    let store = TenantKv::builder(client).build().unwrap();
    let acme = store.tenant(tenant("acme"), Actor::system());
    let writers: Vec<_> = (0..16)
        .map(|task| {
            let acme = acme.clone();
            tokio::spawn(async move {
                for i in (task..KEYS).step_by(16) {
                    acme.create(&format!("k/{i:05}"), NewItem::new(json!(i)))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // Another tenant writes keys that sort among acme's all along.
    let other = store.tenant(tenant("other"), Actor::system());
    let noise = tokio::spawn(async move {
        for i in 0..2_000 {
            other
                .create(&format!("k/{i:05}x"), NewItem::new(json!(i)))
                .await
                .unwrap();
        }
    });
    let (mut seen, mut cursor, mut pages) = (Vec::new(), None, 0);
    loop {
        let page = acme.list("k/", 97, cursor.as_deref()).await.unwrap();
        seen.extend(page.keys);
        pages += 1;
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    noise.await.unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), KEYS, "{pages} pages");
    assert_eq!(unique.len(), KEYS);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(
        seen.iter().all(|k| !k.ends_with('x')),
        "another tenant's key listed"
    );
}

#[tokio::test]
async fn tenants_cannot_reach_each_other() {
    let (_topology, client) = start(0).await;
    let store = TenantKv::builder(client).build().unwrap();
    let alice = store.tenant(tenant("alice"), Actor::user("a"));
    let bob = store.tenant(tenant("bob"), Actor::user("b"));
    bob.create("secret", NewItem::new(json!("bob's")))
        .await
        .unwrap();
    for attack in [
        "../bob/secret",
        "x:tenant:bob:data:secret",
        "*",
        "?ecret",
        "[s]ecret",
        "\\*",
        "secret ",
        "{bob}secret",
    ] {
        alice
            .create(attack, NewItem::new(json!("alice's")))
            .await
            .unwrap();
        assert_eq!(alice.get(attack).await.unwrap().value, json!("alice's"));
    }
    assert!(matches!(
        alice.get("secret").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(bob.get("secret").await.unwrap().value, json!("bob's"));
    assert_eq!(bob.list("", 100, None).await.unwrap().keys, ["secret"]);
    let alice_keys = alice.list("", 100, None).await.unwrap().keys;
    assert_eq!(alice_keys.len(), 8);
    // A cursor is bound to the tenant that got it.
    let page = alice.list("", 2, None).await.unwrap();
    let cursor = page.cursor.unwrap();
    assert!(matches!(
        bob.list("", 2, Some(&cursor)).await,
        Err(Error::InvalidCursor)
    ));
    assert!(alice.list("", 2, Some(&cursor)).await.is_ok());
}

#[tokio::test]
async fn quotas_refuse_writes_past_them_and_a_flushed_script_cache_is_refilled() {
    let (topology, client) = start(0).await;
    let store = TenantKv::builder(client)
        .quotas(Quotas::unlimited().max_keys(2))
        .tenant_quotas(tenant("big"), Quotas::unlimited().max_bytes(100))
        .build()
        .unwrap();
    let small = store.tenant(tenant("small"), Actor::system());
    small.create("a", NewItem::new(json!(1))).await.unwrap();
    small.create("b", NewItem::new(json!(1))).await.unwrap();
    assert!(matches!(
        small.create("c", NewItem::new(json!(1))).await,
        Err(Error::QuotaExceeded {
            what: "keys",
            limit: 2,
            would_be: 3
        })
    ));
    // Replacing stays within the key count.
    small
        .put("a", NewItem::new(json!(2)), Precondition::None)
        .await
        .unwrap();
    let big = store.tenant(tenant("big"), Actor::system());
    big.create("k", NewItem::new(json!("x".repeat(50))))
        .await
        .unwrap();
    assert!(matches!(
        big.create("l", NewItem::new(json!("x".repeat(50)))).await,
        Err(Error::QuotaExceeded { what: "bytes", .. })
    ));
    assert_eq!(
        audit(&topology, "small").await.len(),
        3,
        "refusals leave no record"
    );

    // A master that lost its scripts (a restart, a new master) gets it again.
    let _: () = topology
        .query(topology.initial_master(), redis::cmd("SCRIPT").arg("FLUSH"))
        .await
        .unwrap();
    small.delete("b", None).await.unwrap();
}

#[tokio::test]
async fn a_batch_is_all_or_nothing_and_get_many_reads_in_one_go() {
    let (topology, client) = start(0).await;
    let store = TenantKv::builder(client).build().unwrap();
    let acme = store.tenant(tenant("acme"), Actor::system());
    let existing = acme.create("a", NewItem::new(json!(1))).await.unwrap();

    // The last write's precondition fails: nothing of the batch happens.
    let failing = vec![
        Write::Create {
            key: "b".into(),
            item: NewItem::new(json!(2)),
        },
        Write::Delete {
            key: "a".into(),
            expected_version: Some(existing.version + 1),
        },
    ];
    match acme.batch(failing).await {
        Err(Error::BatchFailed { index: 1, source }) => {
            assert!(matches!(*source, Error::VersionConflict { .. }), "{source}");
        }
        other => panic!("expected the second write to fail, got {other:?}"),
    }
    assert!(matches!(acme.get("b").await, Err(Error::NotFound { .. })));

    let written = acme
        .batch(vec![
            Write::Create {
                key: "b".into(),
                item: NewItem::new(json!(2)),
            },
            Write::Put {
                key: "c".into(),
                item: NewItem::new(json!(3)),
                precondition: Precondition::None,
            },
            Write::Delete {
                key: "a".into(),
                expected_version: Some(existing.version),
            },
        ])
        .await
        .unwrap();
    assert_eq!(written.len(), 3);
    assert!(matches!(&written[2], Written::Deleted { key, .. } if key == "a"));
    let items = acme.get_many(&["a", "b", "c"]).await.unwrap();
    let values: Vec<Option<serde_json::Value>> =
        items.into_iter().map(|i| i.map(|i| i.value)).collect();
    assert_eq!(values, [None, Some(json!(2)), Some(json!(3))]);
    assert_eq!(acme.usage().await.unwrap().keys, 2);
    let records = audit(&topology, "acme").await;
    assert_eq!(
        actions(&records),
        ["create_key", "create_key", "create_key", "delete_key"]
    );
    assert!(matches!(
        acme.batch(vec![
            Write::Delete {
                key: "b".into(),
                expected_version: None
            },
            Write::Delete {
                key: "b".into(),
                expected_version: None
            },
        ])
        .await,
        Err(Error::BatchFailed { index: 1, .. })
    ));
}

#[tokio::test]
async fn writes_past_the_rate_quota_are_refused_with_when_to_retry() {
    let (_topology, client) = start(0).await;
    let store = TenantKv::builder(client)
        .quotas(Quotas::unlimited().writes_per_second(2, 3))
        .build()
        .unwrap();
    let acme = store.tenant(tenant("acme"), Actor::system());
    let mut allowed = 0;
    let retry_after = loop {
        match acme
            .put("k", NewItem::new(json!(allowed)), Precondition::None)
            .await
        {
            Ok(_) => allowed += 1,
            Err(Error::RateLimited { retry_after }) => break retry_after,
            Err(other) => panic!("{other}"),
        }
        assert!(allowed < 10, "the rate quota never applied");
    };
    assert!(
        (3..=4).contains(&allowed),
        "{allowed} writes went through at once"
    );
    assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(500));
    tokio::time::sleep(retry_after).await;
    acme.put("k", NewItem::new(json!(0)), Precondition::None)
        .await
        .unwrap();
}

#[tokio::test]
async fn keys_that_could_drive_a_terminal_are_refused() {
    let (_topology, client) = start(0).await;
    let store = TenantKv::builder(client).build().unwrap();
    let acme = store.tenant(tenant("acme"), Actor::system());
    for key in ["line\nforged", "\u{1b}[2J", "bell\u{7}", "rtl\u{202E}txt"] {
        assert!(
            matches!(
                acme.create(key, NewItem::new(json!(1))).await,
                Err(Error::InvalidKey { .. })
            ),
            "{key:?}"
        );
        assert!(matches!(acme.get(key).await, Err(Error::InvalidKey { .. })));
    }
}

#[tokio::test]
async fn quota_overrides_in_redis_reach_every_instance() {
    let (topology, client) = start(0).await;
    let store = TenantKv::builder(client.clone()).build().unwrap();
    let other_instance = TenantKv::builder(common::client(&topology))
        .build()
        .unwrap();
    let acme_id = tenant("acme");
    let acme = other_instance.tenant(acme_id.clone(), Actor::system());
    acme.create("a", NewItem::new(json!(1))).await.unwrap();
    assert_eq!(
        other_instance.quotas(&acme_id).await.unwrap(),
        Quotas::default()
    );

    store
        .set_quota(&acme_id, Quota::MaxKeys, Some(1), &Actor::system())
        .await
        .unwrap();
    assert_eq!(
        store
            .quota_overrides(&acme_id)
            .await
            .unwrap()
            .get(&Quota::MaxKeys),
        Some(&Some(1))
    );
    // The other instance reads overrides again within QUOTA_REFRESH.
    let deadline = std::time::Instant::now() + tenant_kv::QUOTA_REFRESH * 20;
    while other_instance.quotas(&acme_id).await.unwrap().max_keys != Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the override never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        acme.create("b", NewItem::new(json!(1))).await,
        Err(Error::QuotaExceeded {
            what: "keys",
            limit: 1,
            would_be: 2
        })
    ));
    store
        .reset_quota(&acme_id, Quota::MaxKeys, &Actor::system())
        .await
        .unwrap();
    assert!(store.quota_overrides(&acme_id).await.unwrap().is_empty());
    assert_eq!(
        actions(&audit(&topology, "acme").await),
        ["create_key", "set_quota", "reset_quota"]
    );
}

#[tokio::test]
async fn requests_past_the_tenant_rate_are_refused_with_the_limit() {
    let (_topology, client) = start(0).await;
    let store = TenantKv::builder(client)
        .quotas(Quotas::unlimited().requests_per_second(1, 3))
        .build()
        .unwrap();
    let acme = tenant("acme");
    let first = store.admit_request(&acme, None).await.unwrap().unwrap();
    assert_eq!(
        (first.policy, first.quota, first.remaining),
        ("tenant", 3, 2)
    );
    let mut admitted = 1;
    let refused = loop {
        match store.admit_request(&acme, None).await {
            Ok(_) => admitted += 1,
            Err(Error::RequestRateLimited { status }) => break status,
            Err(other) => panic!("{other}"),
        }
        assert!(admitted < 20, "the rate never applied");
    };
    assert!(admitted >= 3, "the burst of 3 was not allowed: {admitted}");
    assert_eq!(refused.remaining, 0);
    let retry = refused.retry_after.unwrap();
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    // Other tenants and unlimited ones pay nothing.
    assert!(
        store
            .admit_request(&tenant("other"), None)
            .await
            .unwrap()
            .is_some()
    );
    let unlimited = TenantKv::builder(common::client(&_topology))
        .build()
        .unwrap();
    assert_eq!(unlimited.admit_request(&acme, None).await.unwrap(), None);
}

#[tokio::test]
async fn a_key_over_its_own_rate_uses_up_nothing_of_its_tenants() {
    let (_topology, client) = start(0).await;
    // Burst 3 at 3 a second: three at once, exactly (whole µs, no rounding).
    let store = TenantKv::builder(client)
        .quotas(
            Quotas::unlimited()
                .requests_per_second(3, 3)
                .api_key_requests_per_second(1, 1),
        )
        .build()
        .unwrap();
    let acme = tenant("acme");
    let (key, _) = store
        .api_keys()
        .create(
            &acme,
            tenant_kv::NewApiKey {
                name: "k".into(),
                scopes: vec![tenant_kv::Scope::Read],
                key_prefix: None,
                ttl: None,
                owner: None,
                requests_per_second: None,
            },
            &Actor::system(),
        )
        .await
        .unwrap();
    let first = store
        .admit_request(&acme, Some(&key))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.policy, "api_key");
    // The key is over its rate: refused, and its tenant's burst untouched.
    for _ in 0..5 {
        match store.admit_request(&acme, Some(&key)).await {
            Err(Error::RequestRateLimited { status }) => assert_eq!(status.policy, "api_key"),
            other => panic!("{other:?}"),
        }
    }
    let mut admitted = 0;
    while store.admit_request(&acme, None).await.is_ok() {
        admitted += 1;
        assert!(admitted < 20, "the tenant's rate never applied");
    }
    assert!(admitted >= 2, "the tenant had {admitted} of its 3 left");
}

#[tokio::test]
async fn a_batch_larger_than_the_write_burst_is_refused_as_such() {
    let (_topology, client) = start(0).await;
    let store = TenantKv::builder(client)
        .quotas(Quotas::unlimited().writes_per_second(3, 3))
        .build()
        .unwrap();
    let acme = store.tenant(tenant("acme"), Actor::system());
    let writes = |n: usize| {
        (0..n)
            .map(|i| Write::Put {
                key: format!("k{i}"),
                item: NewItem::new(json!(i)),
                precondition: Precondition::None,
            })
            .collect::<Vec<_>>()
    };
    assert!(matches!(
        acme.batch(writes(4)).await,
        Err(Error::QuotaExceeded {
            what: "write_burst",
            limit: 3,
            would_be: 4
        })
    ));
    // A full burst at once goes through (whole µs: no rounding refuses it).
    assert_eq!(acme.batch(writes(3)).await.unwrap().len(), 3);
}
