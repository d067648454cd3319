//! The authentication cache against real Redis: a change made through one
//! store reaches another store's cache through the master's invalidation
//! pushes; a failover drops the cache; cached lookups cost no round trip.
//!
//! The invalidation delay is printed: `cargo test -p tenant-kv --test
//! auth_cache -- --nocapture` (with `REDIS_SERVER_BIN=valkey-server
//! REDIS_CLI_BIN=valkey-cli` for Valkey).

use std::time::Duration;

use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::{NodeId, Topology};
use tenant_kv::{Actor, Error, NewApiKey, NewUser, Scope, TenantKv, Users};

mod common;

use common::{DEADLINE, client, start, tenant, time_until, until_cached};

/// A store over `client` with its cache running (and serving).
async fn cached_store(client: FailoverClient) -> (TenantKv, tenant_kv::AuthCache) {
    let store = TenantKv::builder(client).build().unwrap();
    let cache = store.cache_auth().unwrap();
    let serving = store.clone();
    time_until("the cache to serve", || {
        let store = serving.clone();
        async move { store.auth_cache_stats().serving }
    })
    .await;
    (store, cache)
}

/// The server's kind and version, for the printed figures.
fn server(topology: &Topology) -> String {
    let server = topology.server();
    format!("{:?} {:?}", server.kind(), server.version())
}

fn new_key(name: &str, owner: Option<&str>) -> NewApiKey {
    NewApiKey {
        name: name.into(),
        scopes: vec![Scope::Read],
        key_prefix: None,
        ttl: None,
        owner: owner.map(str::to_owned),
        requests_per_second: None,
    }
}

fn new_user(name: &str) -> NewUser {
    NewUser {
        username: name.to_owned(),
        tenant: tenant("acme"),
        email: None,
        full_name: None,
        admin: false,
    }
}

fn median_and_max(mut delays: Vec<Duration>) -> (Duration, Duration) {
    delays.sort();
    (delays[delays.len() / 2], delays[delays.len() - 1])
}

async fn disabled(users: &Users, name: &str) -> bool {
    users.get(name).await.unwrap().disabled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_disabled_through_one_instance_is_refused_by_another() {
    let (topology, client_a) = start(0).await;
    let a = TenantKv::builder(client_a).build().unwrap();
    let (b, cache) = cached_store(client(&topology)).await;
    a.users()
        .create(new_user("alice"), "correct horse battery", &Actor::system())
        .await
        .unwrap();
    let (users_a, users_b) = (a.users(), b.users());
    let mut delays = Vec::new();
    for round in 0..20 {
        let disable = round % 2 == 0;
        until_cached(&b, "alice").await;
        assert_eq!(disabled(&users_b, "alice").await, !disable, "round {round}");
        users_a
            .set_disabled("alice", disable, &Actor::system())
            .await
            .unwrap();
        let delay = time_until("instance B to see the change", || async {
            disabled(&users_b, "alice").await == disable
        })
        .await;
        delays.push(delay);
    }
    let (median, max) = median_and_max(delays);
    let stats = b.auth_cache_stats();
    println!(
        "{}: user disabled/enabled on A, seen by B after: median {median:?}, max {max:?} (20 changes); {stats:?}",
        server(&topology)
    );
    assert!(stats.invalidations >= 20, "{stats:?}");
    cache.shutdown().await;
    assert!(!b.auth_cache_stats().serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_revoked_through_one_instance_is_refused_by_another() {
    let (topology, client_a) = start(0).await;
    let a = TenantKv::builder(client_a).build().unwrap();
    let (b, _cache) = cached_store(client(&topology)).await;
    let acme = tenant("acme");
    let (keys_a, keys_b) = (a.api_keys(), b.api_keys());
    let mut delays = Vec::new();
    for _ in 0..10 {
        let (key, secret) = keys_a
            .create(&acme, new_key("ci", None), &Actor::system())
            .await
            .unwrap();
        // The first check writes `last_used`, whose invalidation the
        // next one may see; then checks are answered from the cache.
        let hits = b.auth_cache_stats().hits;
        time_until("a cache hit", || async {
            keys_b.verify(&secret).await.unwrap();
            b.auth_cache_stats().hits > hits
        })
        .await;
        keys_a
            .revoke(&acme, &key.id, &Actor::system())
            .await
            .unwrap();
        delays.push(
            time_until("instance B to refuse the key", || async {
                matches!(keys_b.verify(&secret).await, Err(Error::InvalidApiKey))
            })
            .await,
        );
    }
    let (median, max) = median_and_max(delays);
    println!(
        "{}: API key revoked on A, refused by B after: median {median:?}, max {max:?} (10 keys)",
        server(&topology)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_owner_is_disabled_elsewhere_is_refused() {
    let (topology, client_a) = start(0).await;
    let a = TenantKv::builder(client_a).build().unwrap();
    let (b, _cache) = cached_store(client(&topology)).await;
    a.users()
        .create(new_user("bob"), "correct horse battery", &Actor::system())
        .await
        .unwrap();
    let (_, secret) = a
        .api_keys()
        .create(
            &tenant("acme"),
            new_key("bob's", Some("bob")),
            &Actor::system(),
        )
        .await
        .unwrap();
    let keys_b = b.api_keys();
    keys_b.verify(&secret).await.unwrap();
    keys_b.verify(&secret).await.unwrap();
    a.users()
        .set_disabled("bob", true, &Actor::system())
        .await
        .unwrap();
    time_until("the key to go with its owner", || async {
        matches!(keys_b.verify(&secret).await, Err(Error::InvalidApiKey))
    })
    .await;
}

/// `cmdstat_hgetall:calls=` on `node`.
async fn hgetall_calls(topology: &Topology, node: NodeId) -> u64 {
    let info: String = topology
        .query(node, redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_hgetall:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_lookups_cost_no_round_trip() {
    const N: u64 = 500;
    let (topology, client) = start(0).await;
    let (store, _cache) = cached_store(client).await;
    let master = topology.initial_master();
    store
        .users()
        .create(new_user("carol"), "correct horse battery", &Actor::system())
        .await
        .unwrap();
    let (_, secret) = store
        .api_keys()
        .create(&tenant("acme"), new_key("k", None), &Actor::system())
        .await
        .unwrap();
    let _: String = topology
        .query(master, redis::cmd("CONFIG").arg("RESETSTAT"))
        .await
        .unwrap();
    let (users, keys) = (store.users(), store.api_keys());
    for _ in 0..N {
        assert!(!users.get("carol").await.unwrap().disabled);
    }
    let for_users = hgetall_calls(&topology, master).await;
    for _ in 0..N {
        keys.verify(&secret).await.unwrap();
    }
    let for_keys = hgetall_calls(&topology, master).await - for_users;
    println!(
        "HGETALL on the master for {N} user lookups: {for_users}; for {N} API key checks: {for_keys}; {:?}",
        store.auth_cache_stats()
    );
    // One read each, and one more for the key after its `last_used` write
    // (which the master invalidates like any other change).
    assert!(for_users <= 2, "{for_users}");
    assert!(for_keys <= 3, "{for_keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_drops_the_cache_and_the_new_master_is_believed() {
    let topology = Topology::builder().start().await.unwrap();
    let sentinel_client = || {
        let sentinels = topology.sentinel_addrs().into_iter().map(NodeAddr::from);
        FailoverClient::sentinel(topology.master_name(), sentinels)
            .build()
            .unwrap()
    };
    let a = TenantKv::builder(sentinel_client()).build().unwrap();
    let (b, _cache) = cached_store(sentinel_client()).await;
    a.users()
        .create(new_user("dave"), "correct horse battery", &Actor::system())
        .await
        .unwrap();
    let old = topology.initial_master();
    // On every replica before the kill: whichever is promoted has it.
    let _: u64 = topology
        .query(old, redis::cmd("WAIT").arg(2).arg(5000))
        .await
        .unwrap();
    until_cached(&b, "dave").await;
    let drops = b.auth_cache_stats().drops;
    topology.kill(old).unwrap();
    let new = topology.wait_for_new_master(old, DEADLINE).await.unwrap();
    // Changed on the new master behind every client's back: no
    // invalidation can reach a cache tracking the old one.
    let _: u64 = topology
        .query(
            new,
            redis::cmd("HSET").arg("user:dave").arg("disabled").arg("1"),
        )
        .await
        .unwrap();
    // The very first lookup after the change sees it.
    assert!(disabled(&b.users(), "dave").await);
    assert!(b.auth_cache_stats().drops > drops);
    // Tracking is on again on the new master, and serves its changes.
    until_cached(&b, "dave").await;
    let _: u64 = topology
        .query(
            new,
            redis::cmd("HSET").arg("user:dave").arg("disabled").arg("0"),
        )
        .await
        .unwrap();
    let users_b = b.users();
    time_until("the new master's invalidation", || async {
        !disabled(&users_b, "dave").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_drops_the_cache() {
    let (topology, client) = start(1).await;
    let (store, _cache) = cached_store(client.clone()).await;
    store
        .users()
        .create(new_user("erin"), "correct horse battery", &Actor::system())
        .await
        .unwrap();
    until_cached(&store, "erin").await;
    let drops = store.auth_cache_stats().drops;
    let replica = topology.data_nodes()[1];
    topology.promote(replica).await.unwrap();
    // The client notices (its periodic check) and installs the new master:
    // from then on the cache serves nothing tracked on the old one.
    let node = NodeAddr::from(topology.addr(replica));
    time_until("the client to use the promoted replica", || async {
        client.master().is_some_and(|master| master.node == node)
    })
    .await;
    let users = store.users();
    let hits = store.auth_cache_stats().hits;
    assert!(!disabled(&users, "erin").await);
    assert_eq!(
        store.auth_cache_stats().hits,
        hits,
        "served what the old master said"
    );
    time_until("the cache to be dropped", || async {
        store.auth_cache_stats().drops > drops
    })
    .await;
    // Once tracking is on again there, its changes are seen.
    until_cached(&store, "erin").await;
    let _: u64 = topology
        .query(
            replica,
            redis::cmd("HSET").arg("user:erin").arg("disabled").arg("1"),
        )
        .await
        .unwrap();
    time_until("the promoted replica's invalidation", || async {
        disabled(&users, "erin").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_master_stops_the_cache_within_its_lease() {
    let (topology, client) = start(0).await;
    let (store, _cache) = cached_store(client).await;
    store
        .users()
        .create(new_user("frank"), "correct horse battery", &Actor::system())
        .await
        .unwrap();
    until_cached(&store, "frank").await;
    let master = topology.initial_master();
    // Frozen: its connections stay open, and nothing is answered, so no
    // invalidation could arrive either.
    topology.pause(master).unwrap();
    let stopped = time_until("the cache to stop serving", || async {
        !store.auth_cache_stats().serving
    })
    .await;
    topology.resume(master).unwrap();
    time_until("the cache to serve again", || async {
        store.auth_cache_stats().serving
    })
    .await;
    println!("hung master: the cache stopped serving after {stopped:?}");
    // The lease (1 s) plus a heartbeat period, with room for a slow host.
    assert!(stopped < Duration::from_secs(5), "{stopped:?}");
}
