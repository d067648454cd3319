//! What runs on connections of its own, against real topologies:
//! transactions (conflicts retried, never applied twice through a
//! failover), blocking commands waiting across a failover, and
//! subscriptions that follow the master with a gap marker.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis_failover::{Delivery, ErrorKind, FailoverClient, NodeAddr, Subscription};
use redis_topology::{NodeId, Topology};

mod common;

use common::*;

/// Waits until `node` has at least `count` clients blocked in a command.
async fn blocked_clients(topology: &Topology, node: NodeId, count: u64) {
    let started = Instant::now();
    loop {
        let info: String = topology
            .query(node, redis::cmd("INFO").arg("clients"))
            .await
            .unwrap_or_default();
        let blocked = info
            .lines()
            .find_map(|line| line.strip_prefix("blocked_clients:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if blocked >= count {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{node} never had {count} blocked clients"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the sentinels named a master other than `old` and the
/// client switched to it.
async fn follows(topology: &Topology, client: &FailoverClient, old: NodeId) -> NodeId {
    let new = topology.wait_for_new_master(old, DEADLINE).await.unwrap();
    let name = NodeAddr::from(topology.addr(new));
    eventually("the client to switch", DEADLINE, || {
        client.master().is_some_and(|m| m.node == name)
    })
    .await;
    new
}

#[tokio::test]
async fn a_watch_conflict_runs_the_body_again_and_an_abort_runs_nothing() {
    let topology = Topology::builder().start().await.unwrap();
    let client = sentinel_client(&topology);
    let other = sentinel_client(&topology);
    client.set("counter", 10).await.unwrap();

    let runs = Arc::new(AtomicU32::new(0));
    let reply: Option<(i64,)> = client
        .transaction(&["counter"], |mut watched| {
            let (runs, other) = (Arc::clone(&runs), other.clone());
            async move {
                let now: i64 = watched.get("counter").await?;
                if runs.fetch_add(1, Ordering::Relaxed) == 0 {
                    // Another client changes the watched key before EXEC.
                    other.set("counter", 100).await?;
                }
                let mut pipeline = redis::pipe();
                pipeline.set("counter", now + 1).ignore().get("counter");
                Ok(Some(pipeline))
            }
        })
        .await
        .unwrap();
    assert_eq!(
        runs.load(Ordering::Relaxed),
        2,
        "the conflict was not retried"
    );
    assert_eq!(reply, Some((101,)));

    let aborted: Option<()> = client
        .transaction(&["counter"], |_| async { Ok(None) })
        .await
        .unwrap();
    assert_eq!(aborted, None);
    // The aborted transaction left no WATCH behind on its connection: the
    // next one commits at once even though the key changed meanwhile.
    other.set("counter", 7).await.unwrap();
    let runs = AtomicU32::new(0);
    let reply: Option<(i64,)> = client
        .transaction(&["counter"], |mut watched| {
            runs.fetch_add(1, Ordering::Relaxed);
            async move {
                let now: i64 = watched.get("counter").await?;
                let mut pipeline = redis::pipe();
                pipeline.incr("counter", now);
                Ok(Some(pipeline))
            }
        })
        .await
        .unwrap();
    assert_eq!((runs.into_inner(), reply), (1, Some((14,))));

    // A command refused in the queue (not a failover) is the caller's error.
    client.set("text", "abc").await.unwrap();
    let failed = client
        .transaction::<_, (), _, _>(&["text"], |_| async {
            let mut pipeline = redis::pipe();
            pipeline.cmd("NOSUCHCOMMAND");
            Ok(Some(pipeline))
        })
        .await
        .unwrap_err();
    assert_eq!(failed.kind(), ErrorKind::Command, "{failed}");
}

/// What transactions through a fault came to.
#[derive(Default)]
struct Outcomes {
    committed: Vec<String>,
    unknown: Vec<String>,
    errors: Vec<String>,
    body_runs: u64,
    finished: u64,
}

/// Four tasks run transactions until told to stop: each increments a key
/// of its own (applied at most once, whatever happens), adds one to a
/// total, and updates a shared key from its watched value (conflicts).
fn start_transactions(
    client: &FailoverClient,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    outcomes: &Arc<Mutex<Outcomes>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|task| {
            let (client, stop, outcomes) = (client.clone(), Arc::clone(stop), Arc::clone(outcomes));
            tokio::spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let key = format!("tx:{task}:{i}");
                    let result = client
                        .transaction::<_, (i64, i64), _, _>(&["tx:shared"], |mut watched| {
                            outcomes.lock().unwrap().body_runs += 1;
                            let key = key.clone();
                            async move {
                                let shared: Option<i64> = watched.get("tx:shared").await?;
                                let mut pipeline = redis::pipe();
                                pipeline
                                    .incr(&key, 1)
                                    .incr("tx:total", 1)
                                    .set("tx:shared", shared.unwrap_or(0) + 1)
                                    .ignore();
                                Ok(Some(pipeline))
                            }
                        })
                        .await;
                    let mut outcomes = outcomes.lock().unwrap();
                    outcomes.finished += 1;
                    match result {
                        Ok(_) => outcomes.committed.push(key),
                        Err(error) if error.kind() == ErrorKind::OutcomeUnknown => {
                            outcomes.unknown.push(key);
                        }
                        Err(error) => outcomes.errors.push(error.to_string()),
                    }
                }
            })
        })
        .collect()
}

/// Runs transactions through `fault` and checks on the new master that
/// none ran twice, that conflicts were retried without a lost update, and
/// that callers saw at most the one unknown outcome in flight per task.
async fn transactions_through(fault: impl AsyncFnOnce(&Topology)) {
    let topology = Topology::builder().start().await.unwrap();
    let client = sentinel_client(&topology);
    client.wait_for_master(DEADLINE).await.unwrap();
    let old = topology.initial_master();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let tasks = start_transactions(&client, &stop, &outcomes);
    let committed = || outcomes.lock().unwrap().committed.len();
    eventually("transactions before the fault", DEADLINE, || {
        committed() >= 100
    })
    .await;
    fault(&topology).await;
    let new = follows(&topology, &client, old).await;
    let before = committed();
    eventually("transactions on the new master", DEADLINE, || {
        committed() >= before + 100
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    assert!(outcomes.errors.is_empty(), "{:?}", outcomes.errors);
    assert!(outcomes.unknown.len() <= 4, "{:?}", outcomes.unknown);
    assert!(
        outcomes.body_runs > outcomes.finished,
        "no conflict was retried ({} runs for {} transactions)",
        outcomes.body_runs,
        outcomes.finished
    );
    let keys: BTreeSet<&String> = outcomes.committed.iter().chain(&outcomes.unknown).collect();
    for key in keys {
        let applied: Option<u64> = topology
            .query(new, redis::cmd("GET").arg(key))
            .await
            .unwrap();
        assert!(applied.unwrap_or(0) <= 1, "{key} applied {applied:?} times");
    }
    let total: u64 = topology
        .query(new, redis::cmd("GET").arg("tx:total"))
        .await
        .unwrap();
    let shared: u64 = topology
        .query(new, redis::cmd("GET").arg("tx:shared"))
        .await
        .unwrap();
    assert_eq!(shared, total, "an update of the watched key was lost");
    assert!(total <= (outcomes.committed.len() + outcomes.unknown.len()) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_through_a_killed_master_run_at_most_once() {
    transactions_through(async |t: &Topology| t.kill(t.initial_master()).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_through_a_sentinel_failover_run_at_most_once() {
    transactions_through(async |t: &Topology| t.sentinel_failover().await.unwrap()).await;
}

/// A `BLPOP` (declared idempotent when `idempotent`) blocks on the master
/// without holding up the client's other requests; `fault` replaces the
/// master; the element pushed on the new one reaches it.
async fn blpop_across(idempotent: bool, fault: impl AsyncFnOnce(&Topology)) {
    let topology = Topology::builder().start().await.unwrap();
    let client = sentinel_client(&topology);
    client.wait_for_master(DEADLINE).await.unwrap();
    let old = topology.initial_master();
    let popping = tokio::spawn({
        let client = client.clone();
        async move {
            let blpop = redis::cmd("BLPOP").arg("queue").arg(0).to_owned();
            if idempotent {
                client.query_idempotent::<(String, String)>(&blpop).await
            } else {
                client.query::<(String, String)>(&blpop).await
            }
        }
    });
    blocked_clients(&topology, old, 1).await;
    // The shared connection is free while BLPOP blocks.
    client.set("meanwhile", 1).await.unwrap();

    fault(&topology).await;
    let new = follows(&topology, &client, old).await;
    blocked_clients(&topology, new, 1).await;
    let _: u64 = topology
        .query(new, redis::cmd("RPUSH").arg("queue").arg("pushed"))
        .await
        .unwrap();
    let popped = tokio::time::timeout(DEADLINE, popping)
        .await
        .expect("BLPOP never returned")
        .unwrap();
    assert_eq!(popped.unwrap(), ("queue".to_owned(), "pushed".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blpop_waiting_across_a_sentinel_failover_gets_the_element_pushed_on_the_new_master() {
    // Not idempotent: it is unblocked on the old master, which says it
    // did not run, and sent again.
    blpop_across(false, async |t: &Topology| {
        t.sentinel_failover().await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_blpop_cut_off_by_a_killed_master_waits_on_the_new_one() {
    blpop_across(true, async |t: &Topology| {
        t.kill(t.initial_master()).unwrap()
    })
    .await;
}

/// The next delivery, within the deadline.
async fn next_delivery(subscription: &mut Subscription) -> Delivery {
    tokio::time::timeout(DEADLINE, subscription.next())
        .await
        .expect("nothing delivered")
        .expect("the subscription ended")
}

/// A subscriber receives what is published before `fault`, a gap on the
/// new master, then what is published there.
async fn subscription_across(fault: impl AsyncFnOnce(&Topology)) {
    let topology = Topology::builder().start().await.unwrap();
    let client = sentinel_client(&topology);
    let old = topology.initial_master();
    let mut subscription = client
        .subscribe(["news"], Vec::<String>::new())
        .await
        .unwrap();
    assert_eq!(
        subscription.first_node(),
        &NodeAddr::from(topology.addr(old))
    );
    let _: u64 = topology
        .query(old, redis::cmd("PUBLISH").arg("news").arg("before"))
        .await
        .unwrap();
    match next_delivery(&mut subscription).await {
        Delivery::Message(message) => {
            assert_eq!(message.get_payload::<String>().unwrap(), "before")
        }
        other => panic!("{other:?}"),
    }

    fault(&topology).await;
    let new = follows(&topology, &client, old).await;
    let new_name = NodeAddr::from(topology.addr(new));
    // Gaps until the subscription is on the new master (a lost connection
    // may come first); messages from the old master in between are stale.
    loop {
        if let Delivery::Gap(gap) = next_delivery(&mut subscription).await
            && gap.node == new_name
        {
            break;
        }
    }
    let _: u64 = topology
        .query(new, redis::cmd("PUBLISH").arg("news").arg("after"))
        .await
        .unwrap();
    match next_delivery(&mut subscription).await {
        Delivery::Message(message) => assert_eq!(message.get_payload::<String>().unwrap(), "after"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_follows_a_killed_master_and_is_told_of_the_gap() {
    subscription_across(async |t: &Topology| t.kill(t.initial_master()).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_follows_a_sentinel_failover_and_is_told_of_the_gap() {
    subscription_across(async |t: &Topology| t.sentinel_failover().await.unwrap()).await;
}
