//! A store on a real Redis Cluster (3 masters, 1 replica each), with
//! tenants spread over every shard: items, listings, batches,
//! compare-and-set, quotas, users, API keys, encryption, the layout check,
//! and every key of a tenant in its one slot.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use redis_failover::{ClusterClientBuilder, FailoverClient, NodeAddr};
use redis_topology::{Cluster, FailoverMode, slot_of};
use serde_json::json;
use tenant_kv::{
    Actor, Error, LayoutStatus, MigrationProgress, NewApiKey, NewItem, NewUser, Precondition,
    Quota, Scope, TenantId, TenantKv, Write,
};

mod common;

use common::{audit_through, tenant, time_until, until_cached};

/// Two tenants per shard: ids whose `{tenant}` slot each master serves.
async fn spread_tenants(cluster: &Cluster) -> Vec<TenantId> {
    let mut tenants = Vec::new();
    for shard in cluster.shards().await.unwrap() {
        let on_shard = (0..)
            .map(|n| format!("t{n}"))
            .filter(|id| {
                let slot = slot_of(format!("tenant:{{{id}}}:index"));
                shard.slots.iter().any(|range| range.contains(&slot))
            })
            .take(2)
            .map(|id| tenant(&id));
        tenants.extend(on_shard);
    }
    tenants
}

fn new_user(name: &str, tenant: &TenantId) -> NewUser {
    NewUser {
        username: name.to_owned(),
        tenant: tenant.clone(),
        email: None,
        full_name: None,
        admin: false,
    }
}

fn new_key(owner: &str) -> NewApiKey {
    NewApiKey {
        name: "ci".into(),
        scopes: vec![Scope::Read, Scope::Write],
        key_prefix: None,
        ttl: None,
        owner: Some(owner.to_owned()),
        requests_per_second: None,
    }
}

/// Every key of the cluster matching `pattern`, from each master.
async fn keys_on_masters(cluster: &Cluster, pattern: &str) -> Vec<(SocketAddr, String)> {
    let mut found = Vec::new();
    for shard in cluster.shards().await.unwrap() {
        let keys: Vec<String> = cluster
            .query(shard.master, redis::cmd("KEYS").arg(pattern))
            .await
            .unwrap();
        let master = cluster.addr(shard.master);
        found.extend(keys.into_iter().map(|key| (master, key)));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_serves_tenants_spread_over_every_shard() {
    let cluster = three_shards().await;
    let client = cluster_client(&cluster);
    let store = TenantKv::builder(client.clone())
        .encryption_key([7; 32])
        .build()
        .unwrap();
    layout_is_checked_on_every_master(&store, &client).await;
    let _cache = store.cache_auth().unwrap();

    let tenants = spread_tenants(&cluster).await;
    let masters: BTreeSet<String> = tenants
        .iter()
        .filter_map(|t| client.master_of(&format!("tenant:{{{t}}}:index")))
        .map(|master| master.to_string())
        .collect();
    assert_eq!(masters.len(), 3, "tenants on every master");
    for (n, id) in tenants.iter().enumerate() {
        items_work(&store, id).await;
        credentials_work(&store, &client, id, &format!("user{n}")).await;
    }
    // A data key's destruction (a `DEL` and a keyless `PUBLISH` in one
    // transaction) on the tenant's master.
    store.destroy_data_key(&tenants[0]).await.unwrap();
    let kv = store.tenant(tenants[0].clone(), Actor::system());
    assert!(matches!(kv.get("a").await, Err(Error::Corrupt { .. })));

    // Every key of a tenant is in its one slot, on one master.
    for id in &tenants {
        let keys = keys_on_masters(&cluster, &format!("tenant:{{{id}}}:*")).await;
        assert!(keys.len() >= 8, "{id}: {keys:?}");
        let slots: BTreeSet<u16> = keys.iter().map(|(_, key)| slot_of(key)).collect();
        let nodes: BTreeSet<SocketAddr> = keys.iter().map(|(node, _)| *node).collect();
        assert_eq!((slots.len(), nodes.len()), (1, 1), "{id}: {keys:?}");
        let (_, key) = &keys[0];
        let slot: u16 = client
            .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
            .unwrap();
        assert_eq!(slots.into_iter().next(), Some(slot));
    }
}

/// A layout 1 key on a master other than the one keyless requests reach
/// is found; without it the cluster is layout 2.
async fn layout_is_checked_on_every_master(store: &TenantKv, client: &FailoverClient) {
    let _: String = client.query(&redis::cmd("PING")).await.unwrap();
    let first = client.masters()[0].clone();
    let legacy = (0..)
        .map(|n| format!("tenant:old{n}:data:k"))
        .find(|key| client.master_of(key).is_some_and(|m| m != first))
        .unwrap();
    client.set(&legacy, "v").await.unwrap();
    assert!(matches!(
        store.check_layout().await,
        Err(Error::UnsupportedLayout { found }) if found == "1"
    ));
    assert!(matches!(
        store.migration().run(|_| {}).await,
        Err(Error::UnsupportedLayout { .. })
    ));
    client.del(&legacy).await.unwrap();
    assert_eq!(store.check_layout().await.unwrap(), LayoutStatus::Current);
    let mut steps = Vec::new();
    store
        .migration()
        .run(|step| steps.push(step.clone()))
        .await
        .unwrap();
    assert_eq!(steps, vec![MigrationProgress::AlreadyCurrent]);
}

async fn items_work(store: &TenantKv, id: &TenantId) {
    let kv = store.tenant(id.clone(), Actor::user("alice"));
    let first = kv.create("a", NewItem::new(json!({"n": 1}))).await.unwrap();
    kv.create("b", NewItem::new(json!(2))).await.unwrap();
    let updated = kv
        .put(
            "a",
            NewItem::new(json!({"n": 3})),
            Precondition::Version(first.version),
        )
        .await
        .unwrap();
    assert!(matches!(
        kv.put(
            "a",
            NewItem::new(json!(0)),
            Precondition::Version(first.version)
        )
        .await,
        Err(Error::VersionConflict { .. })
    ));
    assert_eq!(kv.get("a").await.unwrap().value, json!({"n": 3}));
    kv.batch(vec![
        Write::Create {
            key: "c".into(),
            item: NewItem::new(json!(id.as_str())),
        },
        Write::Delete {
            key: "b".into(),
            expected_version: None,
        },
    ])
    .await
    .unwrap();
    let many = kv.get_many(&["a", "b", "c"]).await.unwrap();
    assert_eq!(many[0].as_ref().unwrap().version, updated.version);
    assert!(many[1].is_none());
    assert_eq!(many[2].as_ref().unwrap().value, json!(id.as_str()));
    let page = kv.list("", 1, None).await.unwrap();
    assert_eq!(page.keys, vec!["a"]);
    let rest = kv.list("", 10, page.cursor.as_deref()).await.unwrap();
    assert_eq!(rest.keys, vec!["c"]);
    store
        .set_quota(id, Quota::MaxKeys, Some(2), &Actor::system())
        .await
        .unwrap();
    assert!(matches!(
        kv.create("d", NewItem::new(json!(4))).await,
        Err(Error::QuotaExceeded { what: "keys", .. })
    ));
    kv.delete("c", None).await.unwrap();
    kv.create("d", NewItem::new(json!(4))).await.unwrap();
    store
        .set_quota(id, Quota::RequestsPerSecond, Some(1000), &Actor::system())
        .await
        .unwrap();
    assert!(store.admit_request(id, None).await.unwrap().is_some());
}

async fn credentials_work(
    store: &TenantKv,
    client: &FailoverClient,
    id: &TenantId,
    username: &str,
) {
    let (users, keys) = (store.users(), store.api_keys());
    let admin = Actor::system();
    users
        .create(new_user(username, id), "correct horse battery", &admin)
        .await
        .unwrap();
    assert_eq!(
        users
            .authenticate(username, "correct horse battery")
            .await
            .unwrap()
            .tenant,
        *id
    );
    let listed: Vec<String> = users
        .list(id)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.username)
        .collect();
    assert_eq!(listed, vec![username.to_owned()]);

    let (key, secret) = keys.create(id, new_key(username), &admin).await.unwrap();
    assert_eq!(keys.verify(&secret).await.unwrap().id, key.id);
    assert!(store.admit_request(id, Some(&key)).await.unwrap().is_some());
    let (_, rotated) = keys
        .rotate(id, &key.id, std::time::Duration::ZERO, &admin)
        .await
        .unwrap();
    assert!(matches!(
        keys.verify(&secret).await,
        Err(Error::InvalidApiKey)
    ));
    assert_eq!(keys.verify(&rotated).await.unwrap().id, key.id);
    users.set_disabled(username, true, &admin).await.unwrap();
    assert!(matches!(
        keys.verify(&rotated).await,
        Err(Error::InvalidApiKey)
    ));
    users.set_disabled(username, false, &admin).await.unwrap();
    let listed: Vec<String> = keys
        .list(id)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(listed, vec![key.id.clone()]);
    keys.revoke(id, &key.id, &admin).await.unwrap();
    assert!(keys.list(id).await.unwrap().is_empty());
    assert!(matches!(
        keys.verify(&rotated).await,
        Err(Error::InvalidApiKey)
    ));

    assert_audited(client, id).await;
}

/// The tenant's audit stream holds a record of each credential change.
async fn assert_audited(client: &FailoverClient, id: &TenantId) {
    let records = audit_through(client, id.as_str()).await;
    let actions: Vec<&str> = records.iter().map(|f| f["action"].as_str()).collect();
    for action in [
        "create_user",
        "login_success",
        "create_api_key",
        "rotate_api_key",
        "disable_user",
        "enable_user",
        "delete_api_key",
    ] {
        assert!(actions.contains(&action), "{id}: {action} in {actions:?}");
    }
}

/// A cluster of 3 shards, a master and a replica each.
async fn three_shards() -> Cluster {
    Cluster::builder()
        .shards(3)
        .replicas_per_shard(1)
        .start()
        .await
        .unwrap()
}

/// A client of `cluster` seeded with every node, to be configured.
fn cluster_builder(cluster: &Cluster) -> ClusterClientBuilder {
    let seeds = cluster
        .nodes()
        .into_iter()
        .map(|n| NodeAddr::from(cluster.addr(n)));
    FailoverClient::cluster(seeds)
}

/// A client of `cluster` seeded with every node.
fn cluster_client(cluster: &Cluster) -> FailoverClient {
    cluster_builder(cluster).build().unwrap()
}

async fn disabled(store: &TenantKv, name: &str) -> bool {
    store.users().get(name).await.unwrap().disabled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_cache_tracks_every_master_and_follows_a_shard_failover() {
    let cluster = three_shards().await;
    let writer = TenantKv::builder(cluster_client(&cluster)).build().unwrap();
    // No reload of the map on a timer within the test: only what the
    // cache's heartbeat asks for.
    let cached_client = cluster_builder(&cluster)
        .slot_refresh_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let cached = TenantKv::builder(cached_client.clone()).build().unwrap();
    let cache = cached.cache_auth().unwrap();
    time_until("the cache to serve", || async {
        cached.auth_cache_stats().serving
    })
    .await;

    // One user whose record lies on each master.
    let shards = cluster.shards().await.unwrap();
    let names: Vec<String> = shards
        .iter()
        .map(|shard| {
            (0..)
                .map(|n| format!("user{n}"))
                .find(|name| {
                    let slot = slot_of(format!("user:{name}"));
                    shard.slots.iter().any(|range| range.contains(&slot))
                })
                .unwrap()
        })
        .collect();
    let (system, acme) = (Actor::system(), tenant("acme"));
    let mut delays = Vec::new();
    for name in &names {
        let user = new_user(name, &acme);
        writer
            .users()
            .create(user, "correct horse battery", &system)
            .await
            .unwrap();
        until_cached(&cached, name).await;
        writer
            .users()
            .set_disabled(name, true, &system)
            .await
            .unwrap();
        delays.push(time_until("the change to reach the cache", || disabled(&cached, name)).await);
    }
    println!(
        "user disabled on one instance, seen by the other's cache after {delays:?} (one per master)"
    );

    // The first user's shard fails over: the cache stops serving for the
    // old masters, serves again once every new master is tracked, and
    // believes the new master.
    let shard = &shards[0];
    let (epoch, drops) = (
        cached_client.masters_epoch(),
        cached.auth_cache_stats().drops,
    );
    cluster
        .failover(shard.replicas[0], FailoverMode::Default)
        .await
        .unwrap();
    // No request of this client meets a `MOVED`: the old master, now a
    // replica, fails the heartbeat's check that it is a master, which has
    // the map loaded again, a new epoch tracked.
    time_until("a new epoch, tracked", || async {
        cached_client.masters_epoch() != epoch && cached.auth_cache_stats().serving
    })
    .await;
    assert!(cached.auth_cache_stats().drops > drops);
    cached
        .users()
        .set_disabled(&names[0], false, &system)
        .await
        .unwrap();
    until_cached(&cached, &names[0]).await;
    assert!(!disabled(&cached, &names[0]).await);
    writer
        .users()
        .set_disabled(&names[0], true, &system)
        .await
        .unwrap();
    time_until("the new master's invalidation", || {
        disabled(&cached, &names[0])
    })
    .await;
    let stats = cached.auth_cache_stats();
    assert!(stats.hits >= 4 && stats.drops >= 1, "{stats:?}");
    cache.shutdown().await;
}
