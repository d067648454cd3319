//! The failover client against real topologies: writes through failovers
//! with zero caller-visible errors, following a master promoted by hand,
//! the last-resort address, requests whose outcome is unknown, and the
//! demotion of a replaced master.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis_failover::{
    Durability, Error, Event, FailoverClient, MasterCheck, NodeAddr, Tls, Trigger,
};
use redis_topology::{NodeId, Topology};

mod common;

use common::*;

/// Writers that SET then `WAIT 2 100` on the master, counting every error a
/// caller would see. Idempotent writers declare their writes harmless to
/// resend; the others do not.
struct Writers {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<String>, Vec<redis::RedisError>)>>,
}

impl Writers {
    /// Each writer gets a client of its own from `client`: `WAIT` blocks
    /// the connection it runs on, and a client's requests share one.
    fn start(client: impl Fn() -> FailoverClient, tasks: usize, idempotent: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let tasks = (0..tasks)
            .map(|task| {
                let client = client();
                let mut connection = if idempotent {
                    client.idempotent_connection()
                } else {
                    client.connection()
                };
                let (stop, acknowledged) = (Arc::clone(&stop), Arc::clone(&acknowledged));
                tokio::spawn(async move {
                    let (mut on_every_replica, mut errors) = (Vec::new(), Vec::new());
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = format!("writer:{idempotent}:{task}:{i}");
                        let reply: redis::RedisResult<(usize,)> = redis::pipe()
                            .set(&key, i)
                            .ignore()
                            .cmd("WAIT")
                            .arg(2)
                            .arg(100)
                            .query_async(&mut connection)
                            .await;
                        match reply {
                            Ok((replicas,)) => {
                                acknowledged.fetch_add(1, Ordering::Relaxed);
                                if replicas == 2 {
                                    on_every_replica.push(key);
                                }
                            }
                            Err(error) => errors.push(error),
                        }
                    }
                    (on_every_replica, errors)
                })
            })
            .collect();
        Self {
            stop,
            acknowledged,
            tasks,
        }
    }

    fn acknowledged(&self) -> usize {
        self.acknowledged.load(Ordering::Relaxed)
    }

    async fn stop(self) -> (Vec<String>, Vec<redis::RedisError>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut durable, mut errors) = (Vec::new(), Vec::new());
        for task in self.tasks {
            let (task_durable, task_errors) = task.await.unwrap();
            durable.extend(task_durable);
            errors.extend(task_errors);
        }
        (durable, errors)
    }
}

/// The `MasterChanged` events that moved writes from one node to another.
fn switches(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    let mut switches = Vec::new();
    loop {
        match events.try_recv() {
            Ok(event @ Event::MasterChanged { .. }) => {
                if matches!(&event, Event::MasterChanged { from: Some(from), to, .. } if from != to)
                {
                    switches.push(event);
                }
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::TryRecvError::Empty) => return switches,
            Err(error) => panic!("events lost: {error}"),
        }
    }
}

/// The trigger of the one switch in `events`; fails unless there is exactly one.
fn single_switch(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Trigger {
    match switches(events).as_slice() {
        [Event::MasterChanged { trigger, .. }] => *trigger,
        switches => panic!("expected one switch, got {switches:?}"),
    }
}

/// Waits until the sentinels agree on a master other than `old` and the
/// client has switched to it; returns that master.
async fn client_follows(topology: &Topology, client: &FailoverClient, old: NodeId) -> NodeId {
    let new = topology.wait_for_new_master(old, DEADLINE).await.unwrap();
    let new_name = NodeAddr::from(topology.addr(new));
    eventually("the client to switch", DEADLINE, || {
        client.master().is_some_and(|m| m.node == new_name)
    })
    .await;
    new
}

/// Runs 8 idempotent and 4 plain writers, applies `fault`, and checks: the
/// idempotent writers saw no error at all; a plain writer saw at most the
/// one "outcome unknown" of the request in flight at the fault; writes went
/// on on the new master; every write both replicas had acknowledged
/// survived; the client switched exactly once.
async fn writes_survive(topology: Topology, fault: impl AsyncFnOnce(&Topology)) {
    let client = sentinel_client(&topology);
    let mut events = client.events();
    let old = topology.initial_master();
    client.wait_for_master(DEADLINE).await.unwrap();

    let idempotent = Writers::start(|| sentinel_client(&topology), 8, true);
    let plain = Writers::start(|| sentinel_client(&topology), 4, false);
    eventually("writes before the fault", DEADLINE, || {
        idempotent.acknowledged() >= 50 && plain.acknowledged() >= 20
    })
    .await;
    fault(&topology).await;
    let new = client_follows(&topology, &client, old).await;
    let (idempotent_after, plain_after) = (idempotent.acknowledged(), plain.acknowledged());
    eventually("writes on the new master", DEADLINE, || {
        idempotent.acknowledged() >= idempotent_after + 50
            && plain.acknowledged() >= plain_after + 20
    })
    .await;
    let (mut durable, errors) = idempotent.stop().await;
    let (plain_durable, plain_errors) = plain.stop().await;
    durable.extend(plain_durable);

    assert!(
        errors.is_empty(),
        "idempotent writers saw {} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        plain_errors.len() <= 4,
        "plain writers saw {} errors: {plain_errors:?}",
        plain_errors.len()
    );
    for error in &plain_errors {
        assert_eq!(error.code(), Some("OUTCOMEUNKNOWN"), "{error}");
    }
    let lost = missing_keys(&topology, new, &durable).await;
    assert!(
        lost.is_empty(),
        "acknowledged by both replicas but gone: {lost:?}"
    );
    single_switch(&mut events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_a_killed_master_with_zero_errors() {
    let topology = Topology::builder().start().await.unwrap();
    writes_survive(topology, async |t: &Topology| {
        t.kill(t.initial_master()).unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_a_sentinel_failover_command_with_zero_errors() {
    let topology = Topology::builder().start().await.unwrap();
    writes_survive(topology, async |t: &Topology| {
        t.sentinel_failover().await.unwrap()
    })
    .await;
}

#[tokio::test]
async fn candidates_follow_a_master_promoted_by_hand_within_the_recheck_interval() {
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    let (resolver, names) = pod_names(&topology);
    let client = FailoverClient::candidates(names.clone())
        .resolver(resolver)
        .recheck_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let master = client.wait_for_master(DEADLINE).await.unwrap();
    assert_eq!(master.node, names[0]);
    client.set("before", "promotion").await.unwrap();

    let promoted = topology.data_nodes()[2];
    topology.promote(promoted).await.unwrap();
    let promoted_at = Instant::now();
    eventually("the client to follow the promotion", DEADLINE, || {
        client.master().is_some_and(|m| m.node == names[2])
    })
    .await;
    let followed_after = promoted_at.elapsed();
    // One interval, plus a discovery, with room for a loaded machine.
    assert!(
        followed_after < Duration::from_secs(3),
        "followed after {followed_after:?}"
    );

    client.set("after", "promotion").await.unwrap();
    let value: Option<String> = topology
        .query(promoted, redis::cmd("GET").arg("after"))
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("promotion"));
}

#[tokio::test]
async fn a_write_refused_with_readonly_is_resent_to_the_new_master() {
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    let (resolver, names) = pod_names(&topology);
    // Re-checks so rare that only the write's READONLY can reveal the change.
    let client = FailoverClient::candidates(names.clone())
        .resolver(resolver)
        .recheck_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut events = client.events();
    client.set("k", "on the old master").await.unwrap();

    topology.promote(topology.data_nodes()[1]).await.unwrap();
    // Not idempotent: resent only because READONLY proves it never ran.
    let value: i64 = client
        .query(redis::cmd("INCR").arg("counter"))
        .await
        .unwrap();
    assert_eq!(value, 1);
    assert_eq!(client.master().unwrap().node, names[1]);
    // Valkey 8 answers the connection's `CLIENT CAPA redirect` with a
    // REDIRECT instead (tests/valkey.rs covers it).
    let metrics = client.metrics();
    let (refusals, trigger) = if topology.server().has_redirect() {
        (metrics.redirect_replies, Trigger::Redirect)
    } else {
        (metrics.readonly_replies, Trigger::ReadOnly)
    };
    assert!(refusals >= 1);
    assert_eq!(single_switch(&mut events), trigger);
}

#[tokio::test]
async fn the_last_resort_address_is_used_only_when_no_candidate_is_master() {
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    let (resolver, names) = pod_names(&topology);
    let service = NodeAddr::new("redis.default.svc", 6379).unwrap();
    resolver.insert(service.clone(), topology.addr(topology.initial_master()));
    let resolver = Arc::new(resolver);

    // Only replicas among the candidates: the service address finds the master.
    let replicas_only = FailoverClient::candidates(names[1..].to_vec())
        .resolver(Arc::clone(&resolver))
        .last_resort(service.clone())
        .build()
        .unwrap();
    assert_eq!(
        replicas_only.wait_for_master(DEADLINE).await.unwrap().node,
        service
    );
    replicas_only.set("via", "service").await.unwrap();

    // With the master among them, the candidates win.
    let with_master = FailoverClient::candidates(names.clone())
        .resolver(resolver)
        .last_resort(service)
        .build()
        .unwrap();
    assert_eq!(
        with_master.wait_for_master(DEADLINE).await.unwrap().node,
        names[0]
    );
}

#[tokio::test]
async fn a_non_idempotent_request_on_a_hung_master_fails_with_outcome_unknown_and_is_not_resent() {
    let topology = Topology::builder()
        .replicas(1)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let (resolver, names) = pod_names(&topology);
    let client = FailoverClient::candidates(names)
        .resolver(resolver)
        .command_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    client.wait_for_master(DEADLINE).await.unwrap();
    let master = topology.initial_master();

    topology.pause(master).unwrap();
    let error = client
        .query::<i64>(redis::cmd("INCR").arg("counter"))
        .await
        .unwrap_err();
    topology.resume(master).unwrap();
    assert!(matches!(error, Error::OutcomeUnknown { .. }), "{error:?}");
    assert!(error.to_string().contains("outcome unknown"), "{error}");

    // The INCR sat in the paused master's socket and ran once on resume;
    // it was not sent a second time.
    let value: Option<i64> = client
        .query(redis::cmd("GET").arg("counter"))
        .await
        .unwrap();
    assert_eq!(value, Some(1));
    assert_eq!(client.metrics().outcome_unknown, 1);
}

/// How many `SET`s a node has run (`INFO commandstats`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_master_is_left_by_timeout_and_gets_no_write_after_it_resumes() {
    let topology = Topology::builder().start().await.unwrap();
    let client = sentinel_client(&topology);
    let old = topology.initial_master();
    client.wait_for_master(DEADLINE).await.unwrap();
    let writers = Writers::start(|| sentinel_client(&topology), 8, true);
    eventually("writes before the hang", DEADLINE, || {
        writers.acknowledged() >= 50
    })
    .await;

    topology.pause(old).unwrap();
    client_follows(&topology, &client, old).await;

    topology.resume(old).unwrap();
    // Writes sent before the hang wait in the old master's sockets and run
    // as it resumes; after those (its count stable over 300 ms), no write
    // sent after the switch may reach it.
    let started = Instant::now();
    let mut settled = command_calls(&topology, old, "set").await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let calls = command_calls(&topology, old, "set").await;
        if calls == settled {
            break;
        }
        settled = calls;
        assert!(
            started.elapsed() < REJOIN_DEADLINE,
            "the old master never settled"
        );
    }
    assert_no_sets_while_master(&topology, old, settled).await;

    let (_, errors) = writers.stop().await;
    assert!(
        errors.is_empty(),
        "callers saw errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(client.metrics().master_changes >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_switch_until_the_required_sentinels_agree() {
    let topology = Topology::builder().start().await.unwrap();
    let client = sentinel_builder(&topology)
        .min_agreement(3)
        .recheck_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut events = client.events();
    let old = topology.initial_master();
    client.wait_for_master(DEADLINE).await.unwrap();

    // One sentinel hangs with its stale view; the two others fail over.
    let stale = topology.sentinels()[0];
    topology.pause(stale).unwrap();
    topology.kill(old).unwrap();
    let new = topology.wait_for_new_master(old, DEADLINE).await.unwrap();
    let new_name = NodeAddr::from(topology.addr(new));
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(2) {
        assert!(
            client.master().is_none_or(|m| m.node != new_name),
            "switched with only 2 of 3 sentinels agreeing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    topology.resume(stale).unwrap();
    eventually("the switch once all three agree", DEADLINE, || {
        client.master().is_some_and(|m| m.node == new_name)
    })
    .await;
    let mut disagreed = false;
    while let Ok(event) = events.try_recv() {
        disagreed |= matches!(event, Event::SentinelDisagreement { required: 3, .. });
    }
    assert!(disagreed, "no SentinelDisagreement event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_master_notice_alone_moves_the_client() {
    let topology = Topology::builder().start().await.unwrap();
    // No traffic either: only `+switch-master` can tell the client.
    let client = watcher_only_client(&topology);
    let mut events = client.events();
    let old = topology.initial_master();
    client.wait_for_master(DEADLINE).await.unwrap();

    topology.kill(old).unwrap();
    client_follows(&topology, &client, old).await;
    assert_eq!(single_switch(&mut events), Trigger::PubSub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_master_is_demoted_as_soon_as_it_answers_and_writes_to_every_replica_resume() {
    let topology = Topology::builder().start().await.unwrap();
    let every_replica = Durability::Replicated {
        replicas: 2,
        timeout: Duration::from_millis(500),
    };
    let client = sentinel_builder(&topology)
        .demote_stale_masters(true)
        .durability(every_replica)
        .build()
        .unwrap();
    let mut events = client.events();
    let old = topology.initial_master();
    client.wait_for_master(DEADLINE).await.unwrap();
    client.set("before", 1).await.unwrap();

    // Replaced while it cannot answer: it comes back claiming master.
    topology.pause(old).unwrap();
    let new = topology.wait_for_new_master(old, DEADLINE).await;
    topology.resume(old).unwrap();
    let new = new.unwrap();
    let (old_addr, new_addr) = (
        NodeAddr::from(topology.addr(old)),
        NodeAddr::from(topology.addr(new)),
    );
    let demoted = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.recv().await.unwrap() {
                Event::StaleMasterDemoted { node, master } => return (node, master),
                _ => continue,
            }
        }
    })
    .await
    .expect("no StaleMasterDemoted event");
    assert_eq!(demoted, (old_addr, new_addr));
    assert_eq!(client.metrics().stale_masters_demoted, 1);
    topology
        .wait_for_replica_of(old, new, DEADLINE)
        .await
        .unwrap();
    // Both replicas acknowledge again, the demoted one included, once it
    // has loaded the new master's data (a full sync, which a loaded
    // machine may take longer than one WAIT to finish).
    let started = Instant::now();
    while let Err(error) = client.set("after", 2).await {
        assert!(
            matches!(error, redis_failover::Error::NotReplicated { .. })
                && started.elapsed() < DEADLINE,
            "{error}"
        );
    }
    let value: Option<u32> = topology
        .query(old, redis::cmd("GET").arg("after"))
        .await
        .unwrap();
    assert_eq!(value, Some(2));
}

#[tokio::test]
async fn the_write_probe_skips_replicas_and_leaves_no_key_behind() {
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    let (resolver, names) = pod_names(&topology);
    // The master listed last: both replicas must fail the probe first.
    let mut ordered = names.clone();
    ordered.rotate_left(1);
    let client = FailoverClient::candidates(ordered)
        .resolver(resolver)
        .master_check(MasterCheck::WriteProbe {
            ttl: Duration::from_secs(5),
        })
        .build()
        .unwrap();
    assert_eq!(
        client.wait_for_master(DEADLINE).await.unwrap().node,
        names[0]
    );
    let master = topology.initial_master();
    let keys: usize = topology.query(master, &redis::cmd("DBSIZE")).await.unwrap();
    assert_eq!(keys, 0, "a probe key was left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_restarted_around_a_failover_still_lead_the_client_to_the_new_master() {
    let topology = Topology::builder().start().await.unwrap();
    // No traffic either, and every subscription the watchers had is lost.
    let client = watcher_only_client(&topology);
    let mut events = client.events();
    let old = topology.initial_master();
    client.wait_for_master(DEADLINE).await.unwrap();

    for sentinel in topology.sentinels() {
        topology.kill(sentinel).unwrap();
    }
    topology.kill(old).unwrap();
    for sentinel in topology.sentinels() {
        topology.restart(sentinel).await.unwrap();
    }
    client_follows(&topology, &client, old).await;
    let mut lost_and_back = Vec::new();
    let mut trigger = None;
    while let Ok(event) = events.try_recv() {
        match event {
            Event::NodeDown { node, .. } => lost_and_back.push(("down", node)),
            Event::NodeUp { node } => lost_and_back.push(("up", node)),
            Event::MasterChanged {
                from: Some(from),
                to,
                trigger: t,
                ..
            } if from != to => {
                assert!(trigger.replace(t).is_none(), "more than one switch");
            }
            _ => {}
        }
    }
    assert!(
        matches!(trigger, Some(Trigger::PubSub | Trigger::SentinelReconnect)),
        "{trigger:?}"
    );
    // Every sentinel was seen going down and coming back.
    for sentinel in topology.sentinel_addrs().into_iter().map(NodeAddr::from) {
        assert!(
            lost_and_back.contains(&("down", sentinel.clone())),
            "{lost_and_back:?}"
        );
        assert!(
            lost_and_back.contains(&("up", sentinel)),
            "{lost_and_back:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_client_finds_and_follows_the_master() {
    let topology = Topology::builder().tls(true).start().await.unwrap();
    let ca = topology.tls_root_cert().unwrap().to_vec();
    let client = sentinel_builder(&topology)
        .tls(Tls::root_cert(ca.clone()))
        .sentinel_tls(Tls::root_cert(ca))
        .build()
        .unwrap();
    let mut events = client.events();
    let old = topology.initial_master();
    client.wait_for_master(DEADLINE).await.unwrap();
    client.set("over", "tls").await.unwrap();

    topology.kill(old).unwrap();
    let new = client_follows(&topology, &client, old).await;
    let value: Option<String> = client.get("over").await.unwrap();
    assert_eq!(value.as_deref(), Some("tls"));
    client.set("after", "failover").await.unwrap();
    let stored: Option<String> = topology
        .query(new, redis::cmd("GET").arg("after"))
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some("failover"));
    single_switch(&mut events);

    // A client that does not trust the topology's CA finds no master.
    let untrusting = sentinel_builder(&topology)
        .tls(Tls::system_roots())
        .sentinel_tls(Tls::system_roots())
        .build()
        .unwrap();
    let error = untrusting
        .wait_for_master(Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::RetryBudgetExhausted { .. }),
        "{error:?}"
    );
}
