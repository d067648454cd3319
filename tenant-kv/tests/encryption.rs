//! Values encrypted at rest: they read back, but not once copied to
//! another key or tenant, not with another master key, and not after the
//! tenant's data key is destroyed.

use serde_json::json;
use tenant_kv::{Actor, Error, NewItem, TenantId, TenantKv};

mod common;

use common::*;

#[tokio::test]
async fn encrypted_values_read_back_only_where_they_were_written() {
    let (topology, first_client) = start(0).await;
    let master = topology.initial_master();
    let store = TenantKv::builder(first_client)
        .encryption_key([42; 32])
        .build()
        .unwrap();
    let (acme_id, bob_id) = (
        TenantId::new("acme").unwrap(),
        TenantId::new("bob").unwrap(),
    );
    let acme = store.tenant(acme_id.clone(), Actor::system());
    let bob = store.tenant(bob_id.clone(), Actor::system());
    acme.create("card", NewItem::new(json!({"pan": "4111111111111111"})))
        .await
        .unwrap();
    acme.create("other", NewItem::new(json!("x")))
        .await
        .unwrap();
    bob.create("card", NewItem::new(json!("bob's")))
        .await
        .unwrap();
    assert_eq!(
        acme.get("card").await.unwrap().value,
        json!({"pan": "4111111111111111"})
    );
    let raw = acme.get_raw("card").await.unwrap();
    assert_eq!(raw.value.get(), r#"{"pan":"4111111111111111"}"#);

    let raw = |key: &str| {
        let key = key.to_owned();
        let topology = &topology;
        async move {
            let value: Vec<u8> = topology
                .query(master, redis::cmd("GET").arg(key))
                .await
                .unwrap();
            value
        }
    };
    let stored = raw("tenant:{acme}:data:card").await;
    let text = String::from_utf8_lossy(&stored);
    assert!(text.contains("enc:v1:"), "{text}");
    assert!(!text.contains("4111"), "the value is in clear");

    // The same ciphertext copied under another key, or another tenant.
    for target in ["tenant:{acme}:data:other", "tenant:{bob}:data:card"] {
        let _: () = topology
            .query(master, redis::cmd("SET").arg(target).arg(&stored))
            .await
            .unwrap();
    }
    assert!(matches!(
        acme.get("other").await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(bob.get("card").await, Err(Error::Corrupt { .. })));
    assert!(matches!(
        bob.get_raw("card").await,
        Err(Error::Corrupt { .. })
    ));

    // Another master key, or none, cannot read it.
    let wrong = TenantKv::builder(client(&topology))
        .encryption_key([7; 32])
        .build()
        .unwrap();
    let none = TenantKv::builder(client(&topology)).build().unwrap();
    for other_store in [wrong, none] {
        let view = other_store.tenant(acme_id.clone(), Actor::system());
        assert!(matches!(view.get("card").await, Err(Error::Corrupt { .. })));
    }

    // Crypto-shredding: without the data key nothing decrypts; new writes
    // get a new one.
    store.destroy_data_key(&acme_id).await.unwrap();
    assert!(matches!(acme.get("card").await, Err(Error::Corrupt { .. })));
    acme.create("fresh", NewItem::new(json!(1))).await.unwrap();
    assert_eq!(acme.get("fresh").await.unwrap().value, json!(1));
}

/// Polls `store`'s reads of `key` until they fail as unreadable.
async fn until_unreadable(tenant: &tenant_kv::Tenant, key: &str) -> std::time::Duration {
    let started = std::time::Instant::now();
    loop {
        match tenant.get(key).await {
            Ok(_) => {}
            Err(Error::Corrupt { .. }) => return started.elapsed(),
            Err(other) => panic!("{other}"),
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the destroyed data key is still used"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_data_key_stops_being_used_by_every_instance() {
    let (topology, client) = start(0).await;
    let acme_id = TenantId::new("acme").unwrap();
    let store = |lifetime| {
        TenantKv::builder(common::client(&topology))
            .encryption_key([7; 32])
            .data_key_lifetime(lifetime)
            .build()
            .unwrap()
    };
    let destroyer = TenantKv::builder(client)
        .encryption_key([7; 32])
        .build()
        .unwrap();
    // One instance hears of the destruction through its watcher, and would
    // otherwise keep the key for an hour; the other has no watcher and
    // reads the key again every 200 ms.
    let (listening, polling) = (
        store(std::time::Duration::from_secs(3600)),
        store(std::time::Duration::from_millis(200)),
    );
    let watcher = listening.watch_expirations();
    let (a, b) = (
        listening.tenant(acme_id.clone(), Actor::system()),
        polling.tenant(acme_id.clone(), Actor::system()),
    );
    a.create("k", NewItem::new(json!("secret"))).await.unwrap();
    // Both have the key in memory now.
    assert_eq!(b.get("k").await.unwrap().value, json!("secret"));
    assert_eq!(a.get("k").await.unwrap().value, json!("secret"));
    // The watcher subscribes in the background: wait until it listens.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, subscribers): (String, u64) = topology
            .query(
                topology.initial_master(),
                redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg("tenant-kv:data-key-destroyed"),
            )
            .await
            .unwrap();
        if subscribers > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the watcher never subscribed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    destroyer.destroy_data_key(&acme_id).await.unwrap();
    let heard = until_unreadable(&a, "k").await;
    let polled = until_unreadable(&b, "k").await;
    println!(
        "stopped using the destroyed key after {heard:?} (watcher) and {polled:?} (lifetime 200 ms)"
    );
    watcher.shutdown().await;
}
