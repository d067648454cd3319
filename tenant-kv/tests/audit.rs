//! The store against a real master: what every operation promises, and
//! the audit record each change leaves.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tenant_kv::{Actor, Error, NewApiKey, NewItem, NewUser, Precondition, Scope, TenantKv};

mod common;

use common::*;

#[tokio::test]
async fn every_operation_keeps_its_promise_and_leaves_one_audit_record() {
    let (topology, client) = start(1).await;
    let store = TenantKv::builder(client).build().unwrap();
    let acme = store.tenant(tenant("acme"), Actor::user("alice"));
    let mut metadata = serde_json::Map::new();
    metadata.insert("owner".into(), json!("alice"));

    let created = acme
        .create(
            "doc",
            NewItem::new(json!({"n": 1})).metadata(metadata.clone()),
        )
        .await
        .unwrap();
    assert!(matches!(
        acme.create("doc", NewItem::new(json!(2))).await,
        Err(Error::AlreadyExists { version, .. }) if version == created.version
    ));
    let read = acme.get("doc").await.unwrap();
    assert_eq!(read.value, json!({"n": 1}));
    assert_eq!(read.metadata, Some(metadata));
    assert_eq!(read.version, created.version);
    assert_eq!(read.expires_at, None);

    let stale = Precondition::Version(created.version + 100);
    assert!(matches!(
        acme.put("doc", NewItem::new(json!(3)), stale).await,
        Err(Error::VersionConflict { current: Some(v), .. }) if v == created.version
    ));
    let updated = acme
        .put(
            "doc",
            NewItem::new(json!(3)),
            Precondition::Version(created.version),
        )
        .await
        .unwrap();
    assert!(updated.version > created.version);
    assert_eq!(updated.created_at, created.created_at);
    let read = acme.get("doc").await.unwrap();
    assert_eq!((read.value, read.metadata), (json!(3), None));

    assert!(matches!(
        acme.put("nothing", NewItem::new(json!(1)), Precondition::Exists)
            .await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        acme.get("nothing").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        acme.delete("nothing", None).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        acme.delete("doc", Some(created.version)).await,
        Err(Error::VersionConflict { .. })
    ));
    let deleted = acme.delete("doc", Some(updated.version)).await.unwrap();
    assert!(deleted > updated.version);
    // A re-created key never reuses a version.
    let again = acme.create("doc", NewItem::new(json!(4))).await.unwrap();
    assert!(again.version > deleted);
    let usage = acme.usage().await.unwrap();
    assert_eq!(usage.keys, 1);

    let records = audit(&topology, "acme").await;
    assert_eq!(
        actions(&records),
        ["create_key", "update_key", "delete_key", "create_key"],
        "one record per successful write, none for refused ones"
    );
    for record in &records {
        assert_eq!(record["tenant"], "acme");
        assert_eq!(record["actor"], "user:alice");
        assert_eq!(record["key"], "doc");
        assert!(
            !record.contains_key("value"),
            "values stay out of the audit"
        );
        assert!(record["ts"].len() >= 19, "nanoseconds: {}", record["ts"]);
    }
    assert_eq!(records[3]["version"], again.version.to_string());

    // Bad input is refused before Redis sees it.
    assert!(matches!(acme.get("").await, Err(Error::InvalidKey { .. })));
    let huge = json!("x".repeat(2 * 1024 * 1024));
    assert!(matches!(
        acme.create("huge", NewItem::new(huge)).await,
        Err(Error::InvalidItem { .. })
    ));
}

/// A record is one field holding a line of JSON as serde_json writes it,
/// whether a script or the store's own code wrote it: the line
/// log-buffer's offloader ships (as written) is then the one a record of
/// a field per name would ship as.
#[tokio::test]
async fn a_record_is_one_line_of_json_as_serde_json_writes_it() {
    let (topology, client) = start(0).await;
    let store = TenantKv::builder(client).build().unwrap();
    let actor = Actor::user("al\"ice\\\n\u{0}\u{7}\u{8}\u{c}\r\t\u{1f}\u{7f}");
    let acme = store.tenant(tenant("acme"), actor.clone());
    let key = "say \"hi\" \\ to é/ü";
    acme.create(key, NewItem::new(json!(1))).await.unwrap();
    acme.delete(key, None).await.unwrap();
    let user = NewUser {
        username: "bob".to_owned(),
        tenant: tenant("acme"),
        email: None,
        full_name: None,
        admin: false,
    };
    store
        .users()
        .create(user, "a password", &actor)
        .await
        .unwrap();
    let api_key = NewApiKey {
        name: "ci".to_owned(),
        scopes: vec![Scope::Read],
        key_prefix: None,
        ttl: None,
        owner: None,
        requests_per_second: None,
    };
    let keys = store.api_keys();
    let (created, _) = keys.create(&tenant("acme"), api_key, &actor).await.unwrap();
    keys.rotate(
        &tenant("acme"),
        &created.id,
        Duration::from_secs(60),
        &actor,
    )
    .await
    .unwrap();
    // A failed login is recorded off the caller's path.
    let _ = store.users().authenticate("bob", "wrong").await;
    until_audited(&topology, "acme", 6).await;

    let entries: Vec<(String, HashMap<String, String>)> = topology
        .query(topology.initial_master(), &acme_entries())
        .await
        .unwrap();
    assert_eq!(entries.len(), 6);
    for (_, entry) in entries {
        assert_eq!(entry.keys().collect::<Vec<_>>(), ["records"]);
        let line = &entry["records"];
        let record = tenant_kv::audit_records(entry.clone()).unwrap().remove(0);
        let mut expected = format!("{{\"ts\":{}", serde_json::to_string(&record["ts"]).unwrap());
        let mut rest: Vec<_> = record.iter().filter(|(name, _)| *name != "ts").collect();
        rest.sort();
        for (name, value) in rest {
            expected += &format!(",{}:{}", json!(name), json!(value));
        }
        assert_eq!(*line, expected + "}");
    }
    let records = audit(&topology, "acme").await;
    assert_eq!(
        actions(&records),
        [
            "create_key",
            "delete_key",
            "create_user",
            "create_api_key",
            "rotate_api_key",
            "login_failed"
        ]
    );
    for record in &records[..5] {
        assert_eq!(record["actor"], actor.as_str());
    }
    assert_eq!(records[5]["actor"], "user:bob");
    assert_eq!(records[0]["key"], key);
    assert_eq!(records[0]["size"], (key.len() + 1).to_string());
}

/// `XRANGE` of acme's whole audit stream.
fn acme_entries() -> redis::Cmd {
    redis::cmd("XRANGE")
        .arg("tenant:{acme}:audit")
        .arg("-")
        .arg("+")
        .to_owned()
}

/// How many records each entry of acme's audit stream holds.
async fn entry_sizes(client: &redis_failover::FailoverClient) -> Vec<usize> {
    let entries: Vec<(String, HashMap<String, String>)> =
        client.query(&acme_entries()).await.unwrap();
    entries
        .into_iter()
        .map(|(_, entry)| tenant_kv::audit_records(entry).unwrap().len())
        .collect()
}

/// Staged, item writes' records wait on the staging list and move into
/// the stream 64 to an entry, in order; a tenant's first record, with no
/// stream yet, makes the stream at once (log-buffer's offloader finds
/// streams); a replica holds the same.
#[tokio::test]
async fn staged_records_move_into_the_stream_sixty_four_to_an_entry() {
    let (topology, client) = start(1).await;
    let store = TenantKv::builder(client.clone())
        .stage_audit_records(true)
        .build()
        .unwrap();
    let acme = store.tenant(tenant("acme"), Actor::user("alice"));
    acme.create("k0", NewItem::new(json!(0))).await.unwrap();
    assert_eq!(entry_sizes(&client).await, [1]);
    for i in 1..70 {
        acme.create(&format!("k{i}"), NewItem::new(json!(i)))
            .await
            .unwrap();
    }
    assert_eq!(entry_sizes(&client).await, [1, 64], "5 still staged");
    let expected: Vec<String> = (0..70).map(|i| format!("k{i}")).collect();
    let records = audit_through(&client, "acme").await;
    let keys: Vec<&str> = records.iter().map(|r| r["key"].as_str()).collect();
    assert_eq!(keys, expected);
    assert!(records.iter().all(|r| r["action"] == "create_key"));

    let replicas: u64 = client
        .query(redis::cmd("WAIT").arg(1).arg(10_000))
        .await
        .unwrap();
    assert_eq!(replicas, 1);
    let replica = topology
        .data_nodes()
        .into_iter()
        .find(|node| *node != topology.initial_master())
        .unwrap();
    let replicated = audit_on(&topology, replica, "acme").await;
    assert_eq!(replicated, records);
}
