//! Storage layout 2 is ready for Redis Cluster: every key that tenant-kv
//! and log-buffer write for a tenant, whatever the operation, hashes to the
//! tenant's slot (CRC16 of the hash tag, as `CLUSTER KEYSLOT` computes it);
//! the only other keys are the documented global ones.

use std::time::{Duration, Instant};

use log_buffer::{LogBuffer, dead_letter_stream, log_stream};
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;
use serde_json::json;
use tenant_kv::{
    Actor, NewApiKey, NewItem, NewUser, Precondition, Quota, Quotas, Scope, TenantId, TenantKv,
    Write,
};
use tracing_subscriber::layer::SubscriberExt;

/// The slot of `key`, as `CLUSTER KEYSLOT` gives it (redis-topology's
/// CRC16, checked there against the specification's reference values).
fn keyslot(key: &[u8]) -> u16 {
    redis_topology::slot_of(key)
}

/// Keys of no tenant: looked up before the tenant is known (users, API
/// keys), shared by every tenant (login throttling), or the store's own.
fn is_global(key: &str) -> bool {
    ["user:", "api-key:", "{login-throttle}:", "tenant-kv:"]
        .iter()
        .any(|prefix| key.starts_with(prefix))
}

/// Every kind of write of the store, for `tenant`.
async fn use_everything(store: &TenantKv, client: &FailoverClient, tenant: &TenantId) {
    let actor = Actor::user("alice");
    let view = store.tenant(tenant.clone(), actor.clone());
    view.create("a", NewItem::new(json!(1))).await.unwrap();
    let short = NewItem::new(json!(2)).ttl(Duration::from_millis(20));
    view.put("b", short, Precondition::None).await.unwrap();
    let writes = vec![
        Write::Create {
            key: "c".to_owned(),
            item: NewItem::new(json!(3)).ttl(Duration::from_secs(600)),
        },
        Write::Delete {
            key: "a".to_owned(),
            expected_version: None,
        },
    ];
    view.batch(writes).await.unwrap();
    let started = Instant::now();
    while view.get("b").await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "b never expired"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(view.purge_expired().await.unwrap(), 1);
    store
        .set_quota(tenant, Quota::RequestsPerSecond, Some(1000), &actor)
        .await
        .unwrap();
    store
        .set_quota(tenant, Quota::ApiKeyRequestsPerSecond, Some(100), &actor)
        .await
        .unwrap();
    let users = store.users();
    let username = format!("user-{tenant}");
    let user = NewUser {
        username: username.clone(),
        tenant: tenant.clone(),
        email: None,
        full_name: None,
        admin: true,
    };
    users.create(user, "a long password", &actor).await.unwrap();
    users
        .authenticate_from(&username, "a long password", Some("10.0.0.1"))
        .await
        .unwrap();
    assert!(users.authenticate(&username, "wrong").await.is_err());
    users.set_disabled(&username, false, &actor).await.unwrap();
    let keys = store.api_keys();
    let new = NewApiKey {
        name: "ci".to_owned(),
        scopes: vec![Scope::Read, Scope::Write],
        key_prefix: None,
        ttl: None,
        owner: Some(username.clone()),
        requests_per_second: None,
    };
    let (kept, _) = keys.create(tenant, new.clone(), &actor).await.unwrap();
    let (key, secret) = keys.create(tenant, new, &actor).await.unwrap();
    keys.verify(&secret).await.unwrap();
    store.admit_request(tenant, Some(&key)).await.unwrap();
    keys.rotate(tenant, &key.id, Duration::from_secs(60), &actor)
        .await
        .unwrap();
    keys.revoke(tenant, &key.id, &actor).await.unwrap();
    assert_eq!(keys.list(tenant).await.unwrap(), [kept]);
    // The failed login's record is written off the caller's path.
    let audit = format!("tenant:{{{tenant}}}:audit");
    let started = Instant::now();
    loop {
        let records: Vec<(String, std::collections::HashMap<String, String>)> = client
            .query(redis::cmd("XRANGE").arg(&audit).arg("-").arg("+"))
            .await
            .unwrap();
        let mut records = records
            .into_iter()
            .flat_map(|(_, fields)| tenant_kv::audit_records(fields).unwrap());
        if records.any(|r| r["action"] == "login_failed") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no login_failed record"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_tenant_is_in_its_slot() {
    let topology = Topology::builder()
        .replicas(0)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let master = NodeAddr::from(topology.addr(topology.initial_master()));
    let client = FailoverClient::candidates([master]).build().unwrap();
    let store = TenantKv::builder(client.clone())
        .encryption_key([7; 32])
        .quotas(Quotas::default().writes_per_second(1000, 1000))
        .build()
        .unwrap();
    let buffer = LogBuffer::builder(client.clone()).start().unwrap();
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(buffer.layer()));
    let tenants = [
        TenantId::new("acme").unwrap(),
        TenantId::new("globex").unwrap(),
    ];
    for tenant in &tenants {
        use_everything(&store, &client, tenant).await;
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(tenant_id = tenant.as_str(), "a log record");
        });
    }
    buffer.shutdown(Duration::from_secs(10)).await;

    let keys: Vec<String> = client.query(redis::cmd("KEYS").arg("*")).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for key in &keys {
        if is_global(key) {
            continue;
        }
        let tenant = tenants
            .iter()
            .find(|t| key.starts_with(&format!("tenant:{{{t}}}:")))
            .unwrap_or_else(|| panic!("{key} is neither a tenant's nor a documented global key"));
        assert_eq!(
            keyslot(key.as_bytes()),
            keyslot(tenant.as_str().as_bytes()),
            "{key}"
        );
        let name = key.split_once("}:").unwrap().1;
        seen.insert(name.split(':').next().unwrap().to_owned());
    }
    // Each kind of key was written, so each was checked.
    for name in [
        "data",
        "index",
        "expiry",
        "expiring-sizes",
        "usage",
        "rate",
        "audit",
        "quotas",
        "request-rate",
        "api-key-rate",
        "login-failed-rate",
        "data-key",
        "users",
        "api-keys",
        "logs",
    ] {
        assert!(seen.contains(name), "no `{name}` key was written: {seen:?}");
    }
    // Names derived by the offloader stay in the slot too.
    for tenant in &tenants {
        let slot = keyslot(tenant.as_str().as_bytes());
        for stream in [
            log_stream(tenant.as_str()),
            format!("tenant:{{{tenant}}}:audit"),
        ] {
            assert_eq!(keyslot(dead_letter_stream(&stream).as_bytes()), slot);
        }
    }
}
