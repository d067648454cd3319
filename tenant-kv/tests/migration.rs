//! What the migration to storage layout 2 does with what a server of the
//! previous version left beside it: counters written under both layouts,
//! and items that never made it into their tenant's index. (The migration
//! of a live dataset through a kill is `server/tests/migrate.rs`.)

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tenant_kv::{Actor, TenantKv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_of_both_layouts_add_up_and_unindexed_items_are_booked() {
    let (_topology, client) = common::start(0).await;
    let now_ms = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let expires = now_ms + 3_600_000;
    let mut setup = redis::pipe();
    // Layout 1: item `a` in the index, item `b` (with a TTL) outside it.
    setup
        .hset_multiple(
            "tenant:acme:usage",
            &[("rev", 5), ("keys", 1), ("bytes", 10)],
        )
        .zadd("tenant:acme:index", "a", 0)
        .hset_multiple(
            "tenant:acme:data:a",
            &[("value", "\"x\""), ("version", "5"), ("created", "1")],
        )
        .hset_multiple("tenant:acme:data:a", &[("updated", "1"), ("size", "10")])
        .hset_multiple(
            "tenant:acme:data:b",
            &[("value", "\"yy\""), ("version", "4"), ("created", "1")],
        )
        .hset_multiple("tenant:acme:data:b", &[("updated", "1"), ("size", "11")])
        .hset("tenant:acme:data:b", "expires", expires)
        .pexpire_at("tenant:acme:data:b", expires as i64)
        // Counters a server of this version kept meanwhile.
        .hset_multiple(
            "tenant:{acme}:usage",
            &[("rev", 3), ("keys", 2), ("bytes", 20)],
        );
    let _: () = client.query_pipeline(&setup).await.unwrap();

    let store = TenantKv::builder(client.clone()).build().unwrap();
    store.migration().run(|_| {}).await.unwrap();

    let usage: HashMap<String, u64> = client
        .query(redis::cmd("HGETALL").arg("tenant:{acme}:usage"))
        .await
        .unwrap();
    // Both sides' items, and `b` now that it is indexed; versions go on
    // from the higher counter.
    assert_eq!(usage["keys"], 1 + 2 + 1);
    assert_eq!(usage["bytes"], 10 + 20 + 11);
    assert_eq!(usage["rev"], 5);
    let expiry: Option<u64> = client
        .query(redis::cmd("ZSCORE").arg("tenant:{acme}:expiry").arg("b"))
        .await
        .unwrap();
    assert_eq!(expiry, Some(expires), "b's expiry is indexed");
    let size: Option<u64> = client
        .query(
            redis::cmd("HGET")
                .arg("tenant:{acme}:expiring-sizes")
                .arg("b"),
        )
        .await
        .unwrap();
    assert_eq!(size, Some(11));

    let acme = store.tenant(common::tenant("acme"), Actor::system());
    let page = acme.list("", 10, None).await.unwrap();
    assert_eq!(page.keys, ["a", "b"]);
    let b = acme.get("b").await.unwrap();
    assert_eq!((b.version, b.value.clone()), (4, serde_json::json!("yy")));
    let at = b.expires_at.unwrap();
    assert_eq!(at, UNIX_EPOCH + Duration::from_millis(expires));
    let marker: String = client
        .query(redis::cmd("GET").arg("tenant-kv:layout"))
        .await
        .unwrap();
    assert_eq!(marker, "2");
}
