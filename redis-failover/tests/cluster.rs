//! Cluster mode against real local Redis Clusters (3 masters, 1 replica
//! each): routing by slot, `MOVED` after a slot moves, `ASK` during a
//! migration, a master killed under writes, and cross-slot refusals.

mod common;

use common::{addr_of, cluster, cluster_seeds, key_in};
use std::time::{Duration, Instant};

use redis_failover::{Error, ErrorKind, Event, FailoverClient, NodeAddr, Trigger};
use redis_topology::{Cluster, FailoverMode, NodeId, slot_of};

/// A failover after a kill takes about twice the 2 s node timeout; this
/// leaves room for a loaded 2-core machine.
const FAILOVER_BUDGET: Duration = Duration::from_secs(20);

fn client(cluster: &Cluster) -> FailoverClient {
    FailoverClient::cluster(cluster_seeds(cluster))
        .retry_budget(FAILOVER_BUDGET)
        .build()
        .unwrap()
}

async fn node_id(cluster: &Cluster, node: NodeId) -> String {
    cluster
        .query(node, redis::cmd("CLUSTER").arg("MYID"))
        .await
        .unwrap()
}

#[tokio::test]
async fn keys_of_every_shard_are_written_and_read_on_their_master() {
    let cluster = cluster().await;
    let client = client(&cluster);
    for (i, shard) in cluster.shards().await.unwrap().iter().enumerate() {
        let key = key_in(shard, &format!("route-{i}"));
        client.set(&key, i).await.unwrap();
        assert_eq!(client.get::<usize>(&key).await.unwrap(), i);
        assert_eq!(
            client.master_of(&key),
            Some(addr_of(&cluster, shard.master))
        );
        // On that master itself, not only through the client.
        let stored: usize = cluster
            .query(shard.master, redis::cmd("GET").arg(&key))
            .await
            .unwrap();
        assert_eq!(stored, i);
    }
    // EVALSHA-style routing: the first key after numkeys decides.
    let shards = cluster.shards().await.unwrap();
    let key = key_in(&shards[2], "script");
    let set: String = client
        .query(
            redis::cmd("EVAL")
                .arg("return redis.call('SET', KEYS[1], ARGV[1])")
                .arg(1)
                .arg(&key)
                .arg("v"),
        )
        .await
        .unwrap();
    assert_eq!(set, "OK");
    let pong: String = client.query(&redis::cmd("PING")).await.unwrap();
    assert_eq!(pong, "PONG");

    // Each master answers for its own keys: one per shard, and the script's.
    let mut masters = client.masters();
    masters.sort_by_key(|node| node.port());
    let mut expected: Vec<NodeAddr> = shards.iter().map(|s| addr_of(&cluster, s.master)).collect();
    expected.sort_by_key(|node| node.port());
    assert_eq!(masters, expected);
    let mut total = 0;
    for master in &masters {
        let keys: usize = client
            .query_on(master, &redis::cmd("DBSIZE"))
            .await
            .unwrap();
        total += keys;
    }
    assert_eq!(total, 4);
    // A node that is no master refuses a key it does not serve.
    let replica = addr_of(&cluster, shards[0].replicas[0]);
    let refused = client
        .query_on::<()>(
            &replica,
            redis::cmd("SET").arg(key_in(&shards[0], "r")).arg(1),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("MOVED"), "{refused}");
    // Per node: every master served its keys; the replica redirected once.
    let figures = client.node_metrics();
    for master in &masters {
        let served = figures.iter().find(|m| m.node == *master).unwrap();
        assert!(served.requests >= 3 && served.failures == 0, "{served:?}");
    }
    let redirected = figures.iter().find(|m| m.node == replica).unwrap();
    assert_eq!((redirected.requests, redirected.redirects), (1, 1));
}

#[tokio::test]
async fn a_moved_slot_is_followed_without_an_error() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let shards = cluster.shards().await.unwrap();
    let key = key_in(&shards[0], "moving");
    client.set(&key, "kept").await.unwrap();
    assert_eq!(
        client.master_of(&key),
        Some(addr_of(&cluster, shards[0].master))
    );
    let epoch = client.masters_epoch();
    assert!(epoch.is_some());
    cluster
        .move_slot(slot_of(&key), shards[1].master)
        .await
        .unwrap();
    // The client's map still names the old master: it refuses the
    // transaction's commands with MOVED, and EXEC with EXECABORT, so
    // nothing ran and the transaction is sent again to the new master.
    let mut transaction = redis::pipe();
    transaction.atomic().get(&key).set(&key, "again");
    let (kept, ()): (String, ()) = client.query_pipeline(&transaction).await.unwrap();
    assert_eq!(kept, "kept");
    assert_eq!(
        client.master_of(&key),
        Some(addr_of(&cluster, shards[1].master))
    );
    assert_eq!(client.get::<String>(&key).await.unwrap(), "again");
    assert!(client.metrics().redirect_replies >= 1);
    // A slot moved between masters leaves the set of masters as it was.
    assert_eq!(client.masters_epoch(), epoch);
}

#[tokio::test]
async fn an_ask_during_a_migration_is_followed_once_without_changing_the_map() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let shards = cluster.shards().await.unwrap();
    let (source, target) = (shards[0].master, shards[1].master);
    let tag = key_in(&shards[0], "tag");
    let (moved, staying) = (format!("{{{tag}}}moved"), format!("{{{tag}}}staying"));
    client.set(&moved, "migrated").await.unwrap();
    client.set(&staying, "home").await.unwrap();
    let slot = slot_of(&tag);
    let (source_id, target_id) = (
        node_id(&cluster, source).await,
        node_id(&cluster, target).await,
    );
    let setslot = |state: &str, id: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
        cmd
    };
    let _: () = cluster
        .query(target, &setslot("IMPORTING", &source_id))
        .await
        .unwrap();
    let _: () = cluster
        .query(source, &setslot("MIGRATING", &target_id))
        .await
        .unwrap();
    let to = cluster.addr(target);
    let mut migrate = redis::cmd("MIGRATE");
    migrate
        .arg(to.ip().to_string())
        .arg(to.port())
        .arg("")
        .arg(0)
        .arg(5000);
    migrate.arg("KEYS").arg(&moved);
    let _: () = cluster.query(source, &migrate).await.unwrap();

    // The source no longer has it: it answers ASK, the target serves it.
    assert_eq!(client.get::<String>(&moved).await.unwrap(), "migrated");
    assert_eq!(client.get::<String>(&staying).await.unwrap(), "home");
    // A new key of a migrating slot is created on the target.
    client.set(&format!("{{{tag}}}new"), "there").await.unwrap();
    // The importing target serves the slot only after ASKING.
    let mut on_target = cluster.connection(target).await.unwrap();
    let (there,): (Option<String>,) = redis::pipe()
        .cmd("ASKING")
        .ignore()
        .get(format!("{{{tag}}}new"))
        .query_async(&mut on_target)
        .await
        .unwrap();
    assert_eq!(there.as_deref(), Some("there"));
    // ASK does not move the slot in the map.
    assert_eq!(client.master_of(&moved), Some(addr_of(&cluster, source)));
}

#[tokio::test]
async fn a_killed_master_costs_no_caller_error_and_no_acknowledged_write() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let shards = cluster.shards().await.unwrap();
    let victim = shards[0].clone();
    let stem = key_in(&victim, "killed");
    let key = move |n: usize| format!("{{{stem}}}:{n}");
    let writer = {
        let (client, key) = (client.clone(), key.clone());
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let started = Instant::now();
            let mut n = 0;
            // Writes run until well after the failover.
            while started.elapsed() < Duration::from_secs(12) {
                // Each key is written once with its own value: running it
                // twice is harmless, so it is declared idempotent.
                let set = redis::cmd("SET").arg(key(n)).arg(n).clone();
                match client.query_idempotent::<()>(&set).await {
                    Ok(()) => acknowledged.push(n),
                    Err(error) => return Err((n, error)),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(acknowledged)
        })
    };
    let mut events = client.events();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let epoch = client.masters_epoch();
    cluster.kill(victim.master).unwrap();
    let new = cluster
        .wait_for_failover(victim.master, Duration::from_secs(30))
        .await
        .unwrap();
    let acknowledged = match writer.await.unwrap() {
        Ok(acknowledged) => acknowledged,
        Err((n, error)) => panic!("write {n} failed: {error}"),
    };
    assert!(acknowledged.len() > 50, "{}", acknowledged.len());
    for n in acknowledged {
        let stored: Option<usize> = client.get(&key(n)).await.unwrap();
        assert_eq!(stored, Some(n), "acknowledged write {n} lost");
    }
    assert_eq!(client.master_of(&key(0)), Some(addr_of(&cluster, new)));
    assert_ne!(client.masters_epoch(), epoch, "a new master is a new epoch");
    // The shard's change of master was told, once the map had it.
    let (old, new) = (addr_of(&cluster, victim.master), addr_of(&cluster, new));
    loop {
        match events.try_recv() {
            Ok(Event::MasterChanged {
                from: Some(from),
                to,
                trigger: Trigger::SlotMap,
                ..
            }) if from == old => {
                assert_eq!(to, new);
                break;
            }
            Ok(_) => {}
            Err(error) => panic!("no MasterChanged event for the shard: {error}"),
        }
    }
    assert!(client.metrics().master_changes >= 1);
}

#[tokio::test]
async fn a_pipeline_keeps_to_one_slot_or_is_refused_before_sending() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let mut same = redis::pipe();
    same.set("{user:1}:name", "ada")
        .set("{user:1}:age", 36)
        .get("{user:1}:name");
    let (_, _, name): ((), (), String) = client.query_pipeline(&same).await.unwrap();
    assert_eq!(name, "ada");

    let shards = cluster.shards().await.unwrap();
    let (a, b) = (key_in(&shards[0], "a"), key_in(&shards[1], "b"));
    let mut crossed = redis::pipe();
    crossed.set(&a, 1).set(&b, 2);
    let error = client.query_pipeline::<()>(&crossed).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CrossSlot, "{error}");
    assert!(matches!(&error, Error::CrossSlot { slots, .. } if slots.len() == 2));
    let mut transaction = redis::pipe();
    transaction
        .atomic()
        .set("{user:1}:name", "bob")
        .incr("{user:1}:age", 1);
    let ((), age): ((), u32) = client.query_pipeline(&transaction).await.unwrap();
    assert_eq!(age, 37, "a transaction in one slot runs on its master");
    let mut crossed_transaction = redis::pipe();
    crossed_transaction.atomic().set(&a, 1).set(&b, 2);
    let error = client
        .query_pipeline::<()>(&crossed_transaction)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CrossSlot, "{error}");
    let exists: u32 = client.query(redis::cmd("EXISTS").arg(&a)).await.unwrap();
    assert_eq!(exists, 0, "nothing of a refused pipeline ran");
}

#[tokio::test]
async fn a_script_on_a_demoted_master_is_resent_to_the_new_one() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let shards = cluster.shards().await.unwrap();
    let key = key_in(&shards[0], "script");
    client.set(&key, "before").await.unwrap();
    let promoted = shards[0].replicas[0];
    cluster
        .failover(promoted, FailoverMode::Default)
        .await
        .unwrap();
    // The map still names the demoted master, which may answer a script
    // with READONLY rather than MOVED: either way the write is resent.
    let script = redis::cmd("EVAL")
        .arg("return redis.call('SET', KEYS[1], ARGV[1])")
        .arg(1)
        .arg(&key)
        .arg("after")
        .clone();
    let _: () = client.query(&script).await.unwrap();
    assert_eq!(client.get::<String>(&key).await.unwrap(), "after");
    assert_eq!(client.master_of(&key), Some(addr_of(&cluster, promoted)));
}

#[tokio::test]
async fn a_write_to_a_master_that_stops_answering_has_an_unknown_outcome() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let shards = cluster.shards().await.unwrap();
    let key = key_in(&shards[0], "stalled");
    client.set(&key, 1).await.unwrap();
    cluster.pause(shards[0].master).unwrap();
    let started = Instant::now();
    let result = client.query::<i64>(redis::cmd("INCR").arg(&key)).await;
    cluster.resume(shards[0].master).unwrap();
    let error = result.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::OutcomeUnknown, "{error}");
    // One command timeout, not the retry budget: it must not run twice.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn unworkable_cluster_settings_are_named() {
    let setting = |builder: redis_failover::ClusterClientBuilder| match builder.build() {
        Err(Error::InvalidConfig { setting, .. }) => setting,
        other => panic!("{other:?}"),
    };
    let seed = NodeAddr::new("127.0.0.1", 7000).unwrap();
    assert_eq!(setting(FailoverClient::cluster([])), "seed_nodes");
    let one = || FailoverClient::cluster([seed.clone()]);
    assert_eq!(
        setting(one().slot_refresh_interval(Duration::ZERO)),
        "slot_refresh_interval"
    );
    assert_eq!(setting(one().retry_budget(Duration::ZERO)), "retry_budget");
}

#[tokio::test]
async fn writes_to_a_slot_that_moves_under_them_all_succeed_and_stay() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let shards = cluster.shards().await.unwrap();
    let stem = key_in(&shards[0], "busy");
    let key = move |n: usize| format!("{{{stem}}}:{n}");
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (client, key, running) = (client.clone(), key.clone(), running.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                // Not idempotent: MOVED and ASK mean it did not run.
                if let Err(error) = client.set(&key(n), n).await {
                    return Err((n, error));
                }
                n += 1;
            }
            Ok(n)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster
        .move_slot(slot_of(key(0)), shards[1].master)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let written = match writer.await.unwrap() {
        Ok(written) => written,
        Err((n, error)) => panic!("write {n} failed: {error}"),
    };
    assert!(written > 10, "{written}");
    for n in 0..written {
        let stored: Option<usize> = client.get(&key(n)).await.unwrap();
        assert_eq!(stored, Some(n), "write {n} lost");
    }
    assert_eq!(
        client.master_of(&key(0)),
        Some(addr_of(&cluster, shards[1].master))
    );
}
