//! Per-tenant Redis ACL users (`tenant_acl_rules`) against a real Redis:
//! the store serves the user's own tenant and Redis itself refuses every
//! other tenant's keys and the keyspace-wide commands.

use redis_failover::{Credentials, FailoverClient, NodeAddr};
use serde_json::json;
use tenant_kv::{Actor, Error, NewItem, Precondition, TenantKv, tenant_acl_rules};

mod common;

use common::*;

fn refused<T: std::fmt::Debug>(result: Result<T, redis_failover::Error>) {
    match result {
        Err(redis_failover::Error::Command { source, .. }) => {
            assert_eq!(source.code(), Some("NOPERM"), "{source}");
        }
        other => panic!("expected NOPERM, got {other:?}"),
    }
}

#[tokio::test]
async fn a_tenant_acl_user_reaches_its_own_tenant_only() {
    let (topology, _) = start(0).await;
    let master = topology.initial_master();
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg("acme")
        .arg("on")
        .arg(">acme-secret");
    for rule in tenant_acl_rules(&tenant("acme")) {
        setuser.arg(rule);
    }
    let () = topology.query(master, &setuser).await.unwrap();

    let client = FailoverClient::candidates([NodeAddr::from(topology.addr(master))])
        .credentials(Credentials::user("acme", "acme-secret"))
        .build()
        .unwrap();
    let store = TenantKv::builder(client.clone()).build().unwrap();
    let acme = store.tenant(tenant("acme"), Actor::user("alice"));
    // Keys full of glob and separator characters stay inside the pattern.
    for key in ["plain", "a*b?[c]\\", "tenant:{globex}:data:x", "../x"] {
        let created = acme.create(key, NewItem::new(json!(key))).await.unwrap();
        acme.put(
            key,
            NewItem::new(json!(1)),
            Precondition::Version(created.version),
        )
        .await
        .unwrap();
        assert_eq!(acme.get(key).await.unwrap().value, json!(1));
    }
    assert_eq!(acme.list("", 10, None).await.unwrap().keys.len(), 4);
    acme.delete("plain", None).await.unwrap();
    assert_eq!(acme.usage().await.unwrap().keys, 3);

    // Another tenant through the store: Redis refuses the script's keys.
    let globex = store.tenant(tenant("globex"), Actor::user("mallory"));
    match globex.create("x", NewItem::new(json!(1))).await {
        Err(Error::Redis(error)) => refused::<()>(Err(error)),
        other => panic!("expected NOPERM, got {other:?}"),
    }
    assert!(matches!(globex.get("x").await, Err(Error::Redis(_))));
    // And directly: other tenants' keys, pattern and keyspace-wide commands.
    refused(
        client
            .query::<Option<String>>(redis::cmd("GET").arg("tenant:{globex}:data:x"))
            .await,
    );
    refused(
        client
            .query::<Vec<String>>(redis::cmd("KEYS").arg("*"))
            .await,
    );
    refused(
        client
            .query::<redis::Value>(redis::cmd("SCAN").arg(0))
            .await,
    );
    refused(client.query::<()>(&redis::cmd("FLUSHALL")).await);
    refused(
        client
            .query::<Option<String>>(&redis::cmd("RANDOMKEY"))
            .await,
    );
    refused(
        client
            .query::<String>(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1"))
            .await,
    );
}
