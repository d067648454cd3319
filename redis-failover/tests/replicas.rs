//! Reads over replicas, the staleness bound, read-your-writes sessions,
//! durable writes through failovers, and fencing of a replaced master,
//! against real topologies.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_failover::{Durability, Error, FailoverClient, NodeAddr, ReadPolicy, Resolve, Resolving};
use redis_topology::{NodeId, Topology};

mod common;

use common::*;

fn usable(client: &FailoverClient) -> Vec<NodeAddr> {
    client
        .replicas()
        .into_iter()
        .filter(|r| r.unusable.is_none())
        .map(|r| r.node)
        .collect()
}

fn is_usable(client: &FailoverClient, node: &NodeAddr) -> bool {
    usable(client).contains(node)
}

async fn reset_stats(topology: &Topology) {
    for node in topology.data_nodes() {
        let _: () = topology
            .query(node, &redis::cmd("CONFIG").arg("RESETSTAT").to_owned())
            .await
            .unwrap();
    }
}

fn replicas_of(topology: &Topology, master: NodeId) -> Vec<NodeId> {
    topology
        .data_nodes()
        .into_iter()
        .filter(|n| *n != master)
        .collect()
}

/// Sends 1,000 GETs by `policy` and returns how many each data node ran.
async fn spread(topology: &Topology, client: &FailoverClient, policy: ReadPolicy) -> Vec<u64> {
    reset_stats(topology).await;
    let reader = client.with_read_policy(policy);
    for _ in 0..1000 {
        let value: String = reader.get("spread").await.unwrap();
        assert_eq!(value, "v");
    }
    let mut calls = Vec::new();
    for node in topology.data_nodes() {
        calls.push(command_calls(topology, node, "get").await);
    }
    calls
}

fn assert_spread(topology: &Topology, calls: &[u64], policy: ReadPolicy, at_least: u64) {
    let master = topology.initial_master();
    for (node, calls) in topology.data_nodes().into_iter().zip(calls) {
        if node == master {
            assert_eq!(*calls, 0, "{policy:?} sent reads to the master");
        } else {
            assert!(
                *calls >= at_least,
                "{policy:?}: {node} served {calls} of 1000 reads"
            );
        }
    }
    assert_eq!(calls.iter().sum::<u64>(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_and_round_robin_reads_spread_over_the_replicas_and_never_reach_the_master() {
    let topology = Topology::builder().start().await.unwrap();
    let client = sentinel_builder(&topology)
        .read_policy(ReadPolicy::Replica)
        .build()
        .unwrap();
    topology
        .set_and_wait(topology.initial_master(), "spread", "v", 2)
        .await
        .unwrap();
    eventually("both replicas usable", DEADLINE, || {
        usable(&client).len() == 2
    })
    .await;

    let random = spread(&topology, &client, ReadPolicy::Replica).await;
    // Uniform over two replicas: 300 is more than 12 standard deviations off.
    assert_spread(&topology, &random, ReadPolicy::Replica, 300);
    let in_turn = spread(&topology, &client, ReadPolicy::RoundRobin).await;
    assert_spread(&topology, &in_turn, ReadPolicy::RoundRobin, 450);
    assert!(client.metrics().replica_reads >= 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_find_their_replicas_by_pod_name_through_the_master() {
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    let (resolver, names) = pod_names(&topology);
    let client = FailoverClient::candidates(names)
        .resolver(resolver)
        .read_policy(ReadPolicy::RoundRobin)
        .build()
        .unwrap();
    topology
        .set_and_wait(topology.initial_master(), "spread", "v", 2)
        .await
        .unwrap();
    let expected: HashSet<NodeAddr> = replicas_of(&topology, topology.initial_master())
        .into_iter()
        .map(pod_name)
        .collect();
    eventually("both replicas usable", DEADLINE, || {
        usable(&client).into_iter().collect::<HashSet<_>>() == expected
    })
    .await;
    let calls = spread(&topology, &client, ReadPolicy::RoundRobin).await;
    assert_spread(&topology, &calls, ReadPolicy::RoundRobin, 450);
    // Nearest may pick the master or a replica, but always answers.
    let value: String = client
        .with_read_policy(ReadPolicy::Nearest)
        .get("spread")
        .await
        .unwrap();
    assert_eq!(value, "v");
}

/// Values acknowledged on the master, with when.
type Acknowledged = Arc<Mutex<Vec<(Instant, i64)>>>;

/// The highest value acknowledged before `moment`.
fn acknowledged_before(acknowledged: &Acknowledged, moment: Instant) -> i64 {
    let acknowledged = acknowledged.lock().unwrap();
    acknowledged
        .iter()
        .take_while(|(at, _)| *at < moment)
        .map(|(_, value)| *value)
        .last()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_or_paused_is_left_within_the_staleness_bound_and_readmitted() {
    let max_staleness = Duration::from_secs(1);
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    let master = topology.initial_master();
    let nodes = topology
        .data_nodes()
        .into_iter()
        .map(|n| topology.addr(n).into());
    let client = FailoverClient::candidates(nodes)
        .read_policy(ReadPolicy::Replica)
        .max_staleness(max_staleness)
        .replica_probe_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let [cut, paused] = replicas_of(&topology, master)[..] else {
        panic!("two replicas expected")
    };
    let (cut_addr, paused_addr) = (topology.addr(cut).into(), topology.addr(paused).into());
    eventually("both replicas usable", DEADLINE, || {
        usable(&client).len() == 2
    })
    .await;

    // A writer counts up on the master; a reader checks that every value
    // it reads from a replica is at most `max_staleness` old.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Acknowledged = Arc::default();
    let writer = {
        let (client, stop, acknowledged) = (client.clone(), stop.clone(), acknowledged.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let value: i64 = client
                    .query(redis::cmd("INCR").arg("counter"))
                    .await
                    .unwrap();
                acknowledged.lock().unwrap().push((Instant::now(), value));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (client, stop, acknowledged, reads) = (
            client.clone(),
            stop.clone(),
            acknowledged.clone(),
            reads.clone(),
        );
        tokio::spawn(async move {
            let mut violations = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let value: Option<i64> = client.get("counter").await.unwrap();
                let floor = acknowledged_before(&acknowledged, started - max_staleness);
                if value.unwrap_or(0) < floor {
                    violations.push((value, floor));
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            violations
        })
    };
    let reads_go_on_past_the_bound = async || {
        let (from, started) = (reads.load(Ordering::Relaxed), Instant::now());
        eventually("reads to go on past the staleness bound", DEADLINE, || {
            started.elapsed() > max_staleness * 2 && reads.load(Ordering::Relaxed) > from + 50
        })
        .await;
    };

    // Cut off: its link goes down (port 1 refuses), its data freezes.
    let cut_off = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(1).to_owned();
    let _: () = topology.query(cut, &cut_off).await.unwrap();
    eventually("the cut-off replica to be left", DEADLINE, || {
        !is_usable(&client, &cut_addr)
    })
    .await;
    reads_go_on_past_the_bound().await;
    let master_addr = topology.addr(master);
    let reconnect = redis::cmd("REPLICAOF")
        .arg(master_addr.ip().to_string())
        .arg(master_addr.port())
        .to_owned();
    let _: () = topology.query(cut, &reconnect).await.unwrap();
    eventually("the reconnected replica to be readmitted", DEADLINE, || {
        is_usable(&client, &cut_addr)
    })
    .await;

    // Paused: it answers nothing, then resumes behind and catches up.
    topology.pause(paused).unwrap();
    eventually("the paused replica to be left", DEADLINE, || {
        !is_usable(&client, &paused_addr)
    })
    .await;
    reads_go_on_past_the_bound().await;
    topology.resume(paused).unwrap();
    eventually("the resumed replica to be readmitted", DEADLINE, || {
        is_usable(&client, &paused_addr)
    })
    .await;
    reads_go_on_past_the_bound().await;

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let violations = reader.await.unwrap();
    assert!(
        violations.is_empty(),
        "reads older than the bound (read, floor): {violations:?}"
    );
    assert_eq!(
        client.metrics().master_reads,
        0,
        "Replica never reads the master"
    );
}

/// Makes `replica` sync from scratch: after a full sync the master lists it
/// online but streams to it only once it acknowledges the snapshot, up to
/// a second later. Meanwhile it is recent enough to be usable, yet misses
/// every new write: the window where reading one's writes needs a session.
async fn full_resync(topology: &Topology, client: &FailoverClient, replica: NodeId) {
    let _: () = topology
        .query(replica, redis::cmd("REPLICAOF").arg("NO").arg("ONE"))
        .await
        .unwrap();
    topology
        .replicate(replica, topology.initial_master(), DEADLINE)
        .await
        .unwrap();
    let addr = topology.addr(replica).into();
    eventually("the resynced replica to be usable", DEADLINE, || {
        is_usable(client, &addr)
    })
    .await;
}

/// Writes then reads its own key until stopped, counting cycles and stale
/// reads as it goes; the task returns the stale reads.
fn write_then_read(
    client: &FailoverClient,
    in_session: bool,
    stop: &Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinHandle<u64>) {
    let (cycles, stale_reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (client, stop, counted, stale_counted) = (
        client.clone(),
        stop.clone(),
        cycles.clone(),
        stale_reads.clone(),
    );
    let task = tokio::spawn(async move {
        let key = format!("ryw:{in_session}");
        let session = client.session();
        let mut stale = 0;
        for i in 1.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let read: Option<i64> = if in_session {
                session.set(&key, i).await.unwrap();
                session.get(&key).await.unwrap()
            } else {
                client.set(&key, i).await.unwrap();
                client.get(&key).await.unwrap()
            };
            if read != Some(i) {
                stale += 1;
                stale_counted.fetch_add(1, Ordering::Relaxed);
            }
            counted.fetch_add(1, Ordering::Relaxed);
        }
        stale
    });
    (cycles, stale_reads, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_its_own_writes_from_replicas() {
    let topology = Topology::builder()
        .replicas(1)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let replica = replicas_of(&topology, topology.initial_master())[0];
    let nodes = topology
        .data_nodes()
        .into_iter()
        .map(|n| topology.addr(n).into());
    let client = FailoverClient::candidates(nodes)
        .read_policy(ReadPolicy::ReplicaPreferred)
        .replica_probe_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    eventually("the replica usable", DEADLINE, || {
        usable(&client).len() == 1
    })
    .await;

    // Both loops run through a steady phase, then three full resyncs.
    let stop = Arc::new(AtomicBool::new(false));
    let (session_cycles, _, session) = write_then_read(&client, true, &stop);
    let (plain_cycles, plain_stale, plain) = write_then_read(&client, false, &stop);
    let both_advance = async |by: u64| {
        let (s, p) = (
            session_cycles.load(Ordering::Relaxed),
            plain_cycles.load(Ordering::Relaxed),
        );
        eventually("both loops to go on", DEADLINE, || {
            session_cycles.load(Ordering::Relaxed) >= s + by
                && plain_cycles.load(Ordering::Relaxed) >= p + by
        })
        .await;
    };
    both_advance(1000).await;
    // Each resync leaves the replica behind for up to a second: plain reads
    // meet it stale, unless the probes readmit it only once it streams.
    for _ in 0..10 {
        full_resync(&topology, &client, replica).await;
        both_advance(400).await;
        if plain_stale.load(Ordering::Relaxed) > 0 {
            break;
        }
    }
    eventually("2,000 session cycles", DEADLINE, || {
        session_cycles.load(Ordering::Relaxed) >= 2000
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (stale_in_session, stale_plain) = (session.await.unwrap(), plain.await.unwrap());
    let metrics = client.metrics();
    println!(
        "session: {stale_in_session} stale reads in {} cycles; plain: {stale_plain} stale reads in {} cycles; \
         {} reads served by the replica, {} session reads sent to the master as the replica was behind",
        session_cycles.load(Ordering::Relaxed),
        plain_cycles.load(Ordering::Relaxed),
        metrics.replica_reads,
        metrics.session_fallbacks,
    );
    assert_eq!(stale_in_session, 0);
    assert!(stale_plain > 0, "plain reads never met the replica behind");
    assert!(session_cycles.load(Ordering::Relaxed) >= 2000);
    assert!(
        metrics.replica_reads > 0,
        "no read was served by the replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_writes_survive_four_killed_masters() {
    // Sentinel starts no new failover within twice the failover timeout of
    // the last one: keep it short, and space the kills by it.
    let failover_timeout = Duration::from_secs(2);
    let spacing = failover_timeout * 2 + Duration::from_secs(1);
    let topology = Topology::builder()
        .failover_timeout(failover_timeout)
        .start()
        .await
        .unwrap();
    // Sentinel promotes the replica it last saw furthest ahead, from an
    // INFO that may predate the kill: only a write every replica has is
    // sure to be on the one promoted.
    let durability = Durability::Replicated {
        replicas: 2,
        timeout: Duration::from_secs(1),
    };
    let client = sentinel_builder(&topology)
        .durability(durability)
        .build()
        .unwrap();
    client.wait_for_master(DEADLINE).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let writers: Vec<_> = (0..8)
        .map(|task| {
            let (client, stop, acknowledged) = (client.clone(), stop.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let (mut unreplicated, mut unknown, mut other) = (0, 0, Vec::new());
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("durable:{task}:{i}");
                    match client.set(&key, i).await {
                        Ok(()) => acknowledged.lock().unwrap().push(key),
                        Err(Error::NotReplicated { .. } | Error::ReplicationUnknown { .. }) => {
                            unreplicated += 1
                        }
                        Err(Error::OutcomeUnknown { .. }) => unknown += 1,
                        Err(error) => other.push(error.to_string()),
                    }
                }
                (unreplicated, unknown, other)
            })
        })
        .collect();
    let acked = || acknowledged.lock().unwrap().len();

    let mut master = topology.initial_master();
    let mut last_kill: Option<Instant> = None;
    // Four kills of three data nodes: one killed, restarted as a replica,
    // is killed again as master. (`harness failover` runs twenty.)
    for round in 1..=4 {
        let before = acked();
        eventually("durable writes before the kill", DEADLINE, || {
            acked() >= before + 20 && last_kill.is_none_or(|at| at.elapsed() >= spacing)
        })
        .await;
        topology.kill(master).unwrap();
        last_kill = Some(Instant::now());
        let new = topology
            .wait_for_new_master(master, DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        // The old master returns as a replica of the new one.
        topology.restart(master).await.unwrap();
        topology.replicate(master, new, DEADLINE).await.unwrap();
        master = new;
    }
    let before = acked();
    eventually("durable writes on the last master", DEADLINE, || {
        acked() >= before + 20
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (mut unreplicated, mut unknown) = (0, 0);
    for writer in writers {
        let (u, k, other) = writer.await.unwrap();
        assert!(other.is_empty(), "unexpected errors: {other:?}");
        unreplicated += u;
        unknown += k;
    }
    let keys = acknowledged.lock().unwrap().clone();
    let lost = missing_keys(&topology, master, &keys).await;
    println!(
        "{} durable writes acknowledged, {} lost; {unreplicated} not replicated in time, {unknown} of unknown outcome",
        keys.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged durable writes lost: {lost:?}"
    );
}

/// Resolves IP literals, except the addresses it blocks: a network
/// partition between this client and some nodes.
#[derive(Debug, Default)]
struct Partition {
    blocked: Mutex<HashSet<SocketAddr>>,
}

impl Resolve for Partition {
    fn resolve<'a>(&'a self, node: &'a NodeAddr) -> Resolving<'a> {
        let addr: SocketAddr = node.to_string().parse().expect("an IP address");
        let blocked = self.blocked.lock().unwrap().contains(&addr);
        Box::pin(async move {
            if blocked {
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "partitioned away",
                ))
            } else {
                Ok(vec![addr])
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_master_that_resumes_gets_no_write_from_a_client_that_cannot_reach_the_new_one()
{
    let topology = Topology::builder().start().await.unwrap();
    let old = topology.initial_master();
    let partition = Arc::new(Partition::default());
    // Only the sentinels' notices can tell this client of the switch.
    let client = sentinel_builder(&topology)
        .resolver(Arc::clone(&partition))
        .recheck_interval(Duration::from_secs(3600))
        .retry_budget(Duration::from_secs(150))
        .build()
        .unwrap();
    client.set("fence:before", 0).await.unwrap();
    // The client reaches the old master and the sentinels, no other node:
    // it can follow no new master.
    partition.blocked.lock().unwrap().extend(
        replicas_of(&topology, old)
            .into_iter()
            .map(|n| topology.addr(n)),
    );
    let baseline = command_calls(&topology, old, "set").await;

    let mut events = client.events();
    topology.pause(old).unwrap();
    let new = topology.wait_for_new_master(old, DEADLINE).await.unwrap();
    let started = Instant::now();
    while client.master().is_some() {
        if started.elapsed() > DEADLINE {
            let mut seen = Vec::new();
            while let Ok(event) = events.try_recv() {
                seen.push(event);
            }
            panic!("the client did not fence the old master; events: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.metrics().fenced, 1);

    // Everything the writer sends comes after the fence.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acknowledged, mut errors) = (Vec::new(), Vec::new());
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("fence:{i}");
                match client.set(&key, i).await {
                    Ok(()) => acknowledged.push(key),
                    Err(error) => errors.push(error.to_string()),
                }
            }
            (acknowledged, errors)
        })
    };

    // Resumed, the old master claims master until Sentinel demotes it:
    // meanwhile it must run no SET.
    topology.resume(old).unwrap();
    assert_no_sets_while_master(&topology, old, baseline).await;

    // The partition heals: the writes waiting within their budget go to the new master.
    partition.blocked.lock().unwrap().clear();
    let new_addr = NodeAddr::from(topology.addr(new));
    eventually("the client to follow the new master", DEADLINE, || {
        client.master().is_some_and(|m| m.node == new_addr)
    })
    .await;
    let sets_before = command_calls(&topology, new, "set").await;
    let healed = Instant::now();
    while command_calls(&topology, new, "set").await < sets_before + 20 {
        assert!(healed.elapsed() < DEADLINE, "no writes on the new master");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (acknowledged, errors) = writer.await.unwrap();
    assert!(errors.is_empty(), "the writer saw errors: {errors:?}");
    let lost = missing_keys(&topology, new, &acknowledged).await;
    assert!(
        lost.is_empty(),
        "acknowledged but not on the new master: {lost:?}"
    );
}

#[tokio::test]
async fn writes_wait_while_the_master_has_fewer_healthy_replicas_than_required() {
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    let master = topology.initial_master();
    let detached = replicas_of(&topology, master)[0];
    let nodes = topology
        .data_nodes()
        .into_iter()
        .map(|n| topology.addr(n).into());
    let client = FailoverClient::candidates(nodes)
        .min_replicas(2, Duration::from_secs(10))
        .retry_budget(Duration::from_secs(1))
        .build()
        .unwrap();
    client.set("guarded", 1).await.unwrap();

    let _: () = topology
        .query(detached, redis::cmd("REPLICAOF").arg("NO").arg("ONE"))
        .await
        .unwrap();
    let refused = loop {
        match client.set("guarded", 2).await {
            Ok(()) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(error) => break error,
        }
    };
    let Error::RetryBudgetExhausted { failures, .. } = &refused else {
        panic!("expected an exhausted budget, got {refused:?}")
    };
    assert!(
        failures.iter().any(|f| f
            .reason
            .contains("1 healthy replicas, min_replicas asks for 2")),
        "{refused}"
    );
    assert!(client.metrics().min_replicas_refusals > 0);
    // Reads are never held back.
    let value: i64 = client.get("guarded").await.unwrap();
    assert!(value >= 1);

    topology
        .replicate(detached, master, DEADLINE)
        .await
        .unwrap();
    // Once the master lists it again (and its probe says so), writes go on.
    let durable = client.with_durability(Durability::Replicated {
        replicas: 2,
        // A resynced replica gets the stream within a second.
        timeout: Duration::from_secs(3),
    });
    let reattached = Instant::now();
    while let Err(error) = durable.set("guarded", 3).await {
        assert!(
            reattached.elapsed() < DEADLINE,
            "writes still refused: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_write_waits_without_running_while_a_replica_it_needs_is_away() {
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    let master = topology.initial_master();
    let away = replicas_of(&topology, master)[0];
    let client = FailoverClient::candidates([topology.addr(master).into()])
        .durability(Durability::Replicated {
            replicas: 2,
            timeout: Duration::from_millis(300),
        })
        .build()
        .unwrap();
    client.set("before", 1).await.unwrap();

    topology.kill(away).unwrap();
    // The first write after the loss runs, and says it fell short.
    match client.set("short", 1).await {
        Err(Error::NotReplicated { acked: 1, .. }) => {}
        other => panic!("expected NotReplicated with 1 ack, got {other:?}"),
    }
    // The next one waits for the replica without running.
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.set("held", 1).await }
    });
    let started = Instant::now();
    while client.metrics().durable_writes_held < 3 {
        assert!(started.elapsed() < DEADLINE, "the write did not wait");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exists: u32 = topology
        .query(master, redis::cmd("EXISTS").arg("held"))
        .await
        .unwrap();
    assert_eq!(exists, 0, "the held write ran before the replica was back");

    topology.restart(away).await.unwrap();
    topology
        .wait_for_replica_of(away, master, DEADLINE)
        .await
        .unwrap();
    waiting.await.unwrap().unwrap();
    for node in topology.data_nodes() {
        let value: Option<u32> = topology
            .query(node, redis::cmd("GET").arg("held"))
            .await
            .unwrap();
        assert_eq!(value, Some(1), "{node}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_gone_past_the_grace_stops_being_waited_for_but_never_below_the_floor() {
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    let master = topology.initial_master();
    let [gone, last] = replicas_of(&topology, master)[..] else {
        panic!("two replicas")
    };
    let grace = Duration::from_secs(2);
    let client = FailoverClient::candidates([topology.addr(master).into()])
        .durability(Durability::Replicated {
            replicas: 2,
            timeout: Duration::from_millis(300),
        })
        .lost_replica_grace(grace, 1)
        .retry_budget(Duration::from_secs(20))
        .build()
        .unwrap();
    client.set("before", 1).await.unwrap();
    let status = client.replication_status().unwrap();
    assert_eq!(
        (status.asked, status.online, status.waits_for),
        (2, Some(2), 2)
    );

    topology.kill(gone).unwrap();
    let killed = Instant::now();
    // Writes fall short, then wait without running until the grace is over,
    // then wait for the one replica left.
    match client.set("short", 1).await {
        Err(Error::NotReplicated { acked: 1, .. }) => {}
        other => panic!("expected NotReplicated with 1 ack, got {other:?}"),
    }
    client.set("after the grace", 1).await.unwrap();
    assert!(
        killed.elapsed() >= grace,
        "acknowledged {:?} after the loss",
        killed.elapsed()
    );
    let status = client.replication_status().unwrap();
    assert!(status.degraded() && status.writable(), "{status:?}");
    assert_eq!((status.online, status.waits_for), (Some(1), 1));
    let on_last: Option<u32> = topology
        .query(last, redis::cmd("GET").arg("after the grace"))
        .await
        .unwrap();
    assert_eq!(on_last, Some(1));

    // Below the floor, writes wait again (one that ran in the meantime
    // falls short), and go through once a replica is back.
    topology.kill(last).unwrap();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            loop {
                match client.set("held at the floor", 1).await {
                    Err(Error::NotReplicated { acked: 0, .. }) => continue,
                    done => return done,
                }
            }
        }
    });
    let started = Instant::now();
    while client.replication_status().is_none_or(|s| s.writable()) {
        assert!(started.elapsed() < DEADLINE, "writes never stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!waiting.is_finished());
    topology.restart(last).await.unwrap();
    waiting.await.unwrap().unwrap();
    let on_last: Option<u32> = topology
        .query(last, redis::cmd("GET").arg("held at the floor"))
        .await
        .unwrap();
    assert_eq!(on_last, Some(1));
    // With the other replica back too, writes wait for both again.
    topology.restart(gone).await.unwrap();
    topology
        .wait_for_replica_of(gone, master, DEADLINE)
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        client.set("both again", 1).await.unwrap();
        if client.replication_status().is_some_and(|s| !s.degraded()) {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "never waited for both again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sentinel_fewer_replicas_are_waited_for_only_while_the_sentinels_confirm_the_master() {
    let topology = Topology::builder().start().await.unwrap();
    let master = topology.initial_master();
    let gone = replicas_of(&topology, master)[0];
    let sentinels: Vec<NodeAddr> = topology
        .sentinel_addrs()
        .into_iter()
        .map(NodeAddr::from)
        .collect();
    let client = FailoverClient::sentinel(topology.master_name(), sentinels)
        .durability(Durability::Replicated {
            replicas: 2,
            timeout: Duration::from_millis(300),
        })
        .lost_replica_grace(Duration::from_secs(1), 1)
        .retry_budget(Duration::from_secs(30))
        .build()
        .unwrap();
    client.set("before", 1).await.unwrap();

    // Cut off from every sentinel (they are paused), the master may have
    // been replaced for all it knows: past the grace, writes still wait.
    for sentinel in topology.sentinels() {
        topology.pause(sentinel).unwrap();
    }
    topology.kill(gone).unwrap();
    // The first write after the loss runs, and falls short; the next waits.
    match client.set("short", 1).await {
        Err(Error::NotReplicated { acked: 1, .. }) => {}
        other => panic!("expected NotReplicated with 1 ack, got {other:?}"),
    }
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.set("unconfirmed", 1).await }
    });
    let started = Instant::now();
    while client.replication_status().is_none_or(|s| !s.degraded()) {
        assert!(started.elapsed() < DEADLINE, "the grace never passed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = client.metrics().durable_writes_held;
    while client.metrics().durable_writes_held < held + 3 {
        assert!(started.elapsed() < DEADLINE, "the write did not wait");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exists: u32 = topology
        .query(master, redis::cmd("EXISTS").arg("unconfirmed"))
        .await
        .unwrap();
    assert_eq!(exists, 0, "a write went to one replica unconfirmed");
    // The sentinels back, naming the same master: the write goes through.
    for sentinel in topology.sentinels() {
        topology.resume(sentinel).unwrap();
    }
    waiting.await.unwrap().unwrap();
    let on_master: Option<u32> = topology
        .query(master, redis::cmd("GET").arg("unconfirmed"))
        .await
        .unwrap();
    assert_eq!(on_master, Some(1));
}
