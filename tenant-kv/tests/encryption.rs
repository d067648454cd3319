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

    let raw = |key: &str| {
        let key = key.to_owned();
        let topology = &topology;
        async move {
            let value: String = topology
                .query(master, redis::cmd("HGET").arg(key).arg("value"))
                .await
                .unwrap();
            value
        }
    };
    let stored = raw("tenant:acme:data:card").await;
    assert!(stored.starts_with("enc:v1:"), "{stored}");
    assert!(!stored.contains("4111"), "the value is in clear");

    // The same ciphertext copied under another key, or another tenant.
    for target in ["tenant:acme:data:other", "tenant:bob:data:card"] {
        let _: () = topology
            .query(
                master,
                redis::cmd("HSET").arg(target).arg("value").arg(&stored),
            )
            .await
            .unwrap();
    }
    assert!(matches!(
        acme.get("other").await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(bob.get("card").await, Err(Error::Corrupt { .. })));

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
