//! Network faults against real servers, each in a network namespace of its
//! own: the client cut from the master, the master from the sentinels, a
//! replica from the master, and each cut healed.
//!
//! These tests need root (or `CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and the
//! `ip` command; where namespaces cannot be created they print why and pass,
//! so a CI runner without privileges does not fail on them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use redis::Role;
use redis_topology::{Endpoint, Error, NodeId, Topology, TopologyBuilder};

/// Long enough for a Sentinel failover on a loaded 2-core machine.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// Sentinel demotes a returning old master only after it looked sane for
/// 8 s, and learns of it through INFO sent every 1-10 s.
const REJOIN_DEADLINE: Duration = Duration::from_secs(60);
const SYNC_DEADLINE: Duration = Duration::from_secs(30);
/// For tests where no failover must happen: a stall of a loaded machine
/// must not look like a dead master.
const PATIENT_DOWN_AFTER: Duration = Duration::from_secs(10);
/// The client's timeouts when it expects no answer: short, as a cut link
/// never answers.
const SHORT: Duration = Duration::from_millis(500);
/// How often a wait for a state looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Starts the topology in network namespaces, or says why it cannot and
/// returns `None` for the test to skip.
async fn start(builder: TopologyBuilder) -> Option<Topology> {
    match builder.network_namespaces(true).start().await {
        Ok(topology) => Some(topology),
        Err(Error::NetworkUnavailable { reason }) => {
            eprintln!("skipped: network namespaces are unavailable here: {reason}");
            None
        }
        Err(error) => panic!("start failed: {error}"),
    }
}

/// PING over a new connection with short timeouts.
async fn ping(topology: &Topology, node: NodeId) -> redis::RedisResult<String> {
    let client = redis::Client::open(topology.connection_info(node))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(SHORT))
        .set_response_timeout(Some(SHORT));
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("PING").query_async(&mut connection).await
}

/// Asserts that `node` gives the client no answer at all: neither a reply
/// nor a refusal, only a timeout.
async fn assert_unreachable(topology: &Topology, node: NodeId) {
    match ping(topology, node).await {
        Err(error) => assert!(error.is_timeout(), "{node}: not a timeout: {error}"),
        Ok(reply) => panic!("{node} answered {reply} through a cut"),
    }
}

/// Polls `check` until it returns true, failing the test after `deadline`.
async fn eventually<F: Future<Output = bool>>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> F,
) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The ports of the replicas `master`'s `INFO replication` lists online.
async fn online_replica_ports(topology: &Topology, master: NodeId) -> Vec<u16> {
    let info: String = topology
        .query(master, redis::cmd("INFO").arg("replication"))
        .await
        .unwrap();
    info.lines()
        .filter(|line| line.starts_with("slave") && line.contains("state=online"))
        .filter_map(|line| {
            let fields: HashMap<&str, &str> = line
                .split_once(':')?
                .1
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .collect();
            fields.get("port")?.parse().ok()
        })
        .collect()
}

/// Checks the namespaced topology works as a plain one: own addresses,
/// replication, and every sentinel naming the master by its address.
async fn assert_healthy(topology: &Topology) {
    let master = topology.initial_master();
    let client = topology.client_ip().expect("a namespaced topology");
    assert!(!client.is_loopback());
    for node in topology
        .data_nodes()
        .into_iter()
        .chain(topology.sentinels())
    {
        let addr = topology.addr(node);
        assert!(
            !addr.ip().is_loopback() && addr.ip() != client,
            "{node} at {addr}"
        );
        assert!(topology.netns(node).is_some_and(|ns| ns.starts_with("rt-")));
    }
    let replicas = topology.data_nodes().len() - 1;
    let acked = topology
        .set_and_wait(master, "k", "v", replicas)
        .await
        .unwrap();
    assert_eq!(acked, replicas);
    for sentinel in topology.sentinels() {
        let named = topology.sentinel_master_addr(sentinel).await.unwrap();
        assert_eq!(named, Some(topology.addr(master)), "{sentinel}");
    }
}

/// Drops the topology and checks no process and no namespace of it is left.
fn drop_and_assert_clean(topology: Topology) {
    let names = topology.netns_names();
    assert!(!names.is_empty());
    let nodes = topology
        .data_nodes()
        .into_iter()
        .chain(topology.sentinels());
    let pids: Vec<u32> = nodes.filter_map(|node| topology.pid(node)).collect();
    drop(topology);
    let output = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&output.stdout);
    for name in names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&name)),
            "namespace {name} outlived its topology"
        );
    }
    for pid in pids {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        assert!(
            nix::sys::signal::kill(pid, None).is_err(),
            "{pid} outlived its topology"
        );
    }
}

#[tokio::test]
async fn a_client_cut_from_the_master_gets_no_answer_until_healed() {
    let builder = Topology::builder()
        .replicas(1)
        .sentinels(3)
        .down_after(PATIENT_DOWN_AFTER);
    let Some(topology) = start(builder).await else {
        return;
    };
    assert_healthy(&topology).await;
    let (master, replica) = (topology.initial_master(), topology.data_nodes()[1]);
    let mut open = topology.connection(master).await.unwrap();

    topology.cut(Endpoint::Client, master).unwrap();
    assert_eq!(
        topology.cuts(),
        vec![(Endpoint::Client, Endpoint::Node(master))]
    );
    assert_unreachable(&topology, master).await;
    // A connection opened before the cut hears nothing either.
    let error = redis::cmd("PING")
        .query_async::<String>(&mut open)
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    assert_eq!(ping(&topology, replica).await.unwrap(), "PONG");
    // The master still replicates: only the client's link is cut.
    let role = topology.role(replica).await.unwrap();
    assert!(
        matches!(&role, Role::Replica { replication_state, .. } if replication_state == "connected"),
        "{role:?}"
    );

    topology.heal(master, Endpoint::Client).unwrap();
    assert!(topology.cuts().is_empty());
    assert_eq!(ping(&topology, master).await.unwrap(), "PONG");

    topology.isolate(replica).unwrap();
    assert_unreachable(&topology, replica).await;
    topology.heal_all().unwrap();
    assert_eq!(ping(&topology, replica).await.unwrap(), "PONG");
    drop_and_assert_clean(topology);
}

#[tokio::test]
async fn sentinels_cut_from_the_master_fail_over_while_the_client_still_reaches_it() {
    let Some(topology) = start(Topology::builder().replicas(2).sentinels(3)).await else {
        return;
    };
    assert_healthy(&topology).await;
    let old = topology.initial_master();
    for sentinel in topology.sentinels() {
        topology.cut(old, sentinel).unwrap();
    }

    let new = topology
        .wait_for_new_master(old, FAILOVER_DEADLINE)
        .await
        .unwrap();
    assert_ne!(new, old);
    // The old master is cut from the sentinels only: the client still
    // reaches it, and nobody could tell it to step down.
    assert_eq!(ping(&topology, old).await.unwrap(), "PONG");
    assert!(matches!(
        topology.role(old).await.unwrap(),
        Role::Primary { .. }
    ));

    // Healed, the sentinels find it and turn it into a replica of the new master.
    topology.heal_all().unwrap();
    topology
        .wait_for_replica_of(old, new, REJOIN_DEADLINE)
        .await
        .unwrap();
    assert_eq!(topology.masters().await.unwrap(), vec![new]);
    drop_and_assert_clean(topology);
}

#[tokio::test]
async fn a_replica_cut_from_the_master_drops_out_and_comes_back_when_healed() {
    // The master drops a replica whose acknowledgements stop after
    // `repl-timeout` (60 s by default); the replica's own side times out
    // likewise, so it must hear from the master more often than that.
    let builder = Topology::builder()
        .replicas(2)
        .sentinels(3)
        .down_after(PATIENT_DOWN_AFTER)
        .extra_config("repl-timeout 4")
        .extra_config("repl-ping-replica-period 1");
    let Some(topology) = start(builder).await else {
        return;
    };
    assert_healthy(&topology).await;
    let master = topology.initial_master();
    let (cut_off, other) = (topology.data_nodes()[1], topology.data_nodes()[2]);
    let (cut_port, other_port) = (topology.addr(cut_off).port(), topology.addr(other).port());

    topology.cut(cut_off, master).unwrap();
    eventually(
        "the master to stop listing the cut replica online",
        SYNC_DEADLINE,
        || async {
            !online_replica_ports(&topology, master)
                .await
                .contains(&cut_port)
        },
    )
    .await;
    assert!(
        online_replica_ports(&topology, master)
            .await
            .contains(&other_port)
    );
    // The cut is between the two nodes only: the client reaches both.
    assert_eq!(ping(&topology, cut_off).await.unwrap(), "PONG");

    topology.heal(cut_off, master).unwrap();
    topology
        .wait_for_replica_of(cut_off, master, SYNC_DEADLINE)
        .await
        .unwrap();
    let acked = topology.set_and_wait(master, "k2", "v", 2).await.unwrap();
    assert_eq!(acked, 2);
    drop_and_assert_clean(topology);
}

#[tokio::test]
async fn kill_pause_and_restart_reach_the_server_inside_its_namespace() {
    let builder = Topology::builder().replicas(1).sentinels(0);
    let Some(topology) = start(builder).await else {
        return;
    };
    let (master, replica) = (topology.initial_master(), topology.data_nodes()[1]);
    // `ip netns exec` execs the server: the pid we hold is the server's own.
    let info: String = topology
        .query(replica, redis::cmd("INFO").arg("server"))
        .await
        .unwrap();
    let pid = topology.pid(replica).unwrap();
    assert!(info.contains(&format!("process_id:{pid}\r\n")), "{info}");

    topology.pause(replica).unwrap();
    assert_unreachable(&topology, replica).await;
    topology.resume(replica).unwrap();
    assert_eq!(ping(&topology, replica).await.unwrap(), "PONG");

    let addr = topology.addr(replica);
    topology.kill(replica).unwrap();
    assert!(ping(&topology, replica).await.is_err());
    topology.restart(replica).await.unwrap();
    assert_eq!(topology.addr(replica), addr);
    topology
        .wait_for_replica_of(replica, master, SYNC_DEADLINE)
        .await
        .unwrap();
    drop_and_assert_clean(topology);
}

#[tokio::test]
async fn network_faults_without_namespaces_are_refused() {
    let topology = Topology::builder()
        .replicas(0)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let master = topology.initial_master();
    assert!(topology.addr(master).ip().is_loopback());
    assert_eq!(topology.client_ip(), None);
    assert!(topology.netns_names().is_empty());
    for result in [
        topology.cut(Endpoint::Client, master),
        topology.heal(Endpoint::Client, master),
        topology.heal_all(),
    ] {
        assert!(
            matches!(result, Err(Error::NoNetworkNamespaces)),
            "{result:?}"
        );
    }
}

/// The namespaces named after `pid`.
fn namespaces_of(pid: u32) -> Vec<String> {
    let output = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("rt-{pid}-");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn namespaces_of_a_sigkilled_owner_are_removed_by_the_next_namespaced_topology() {
    if let Err(error) = redis_topology::check_network_namespaces() {
        eprintln!("skipped: {error}");
        return;
    }
    let mut owner = Command::new(env!("CARGO_BIN_EXE_redis-topology"))
        .args([
            "--replicas",
            "1",
            "--sentinels",
            "0",
            "--network-namespaces",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Read its stdout on a thread, so that waiting for "Ready." has a deadline.
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stdout = BufReader::new(owner.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + SYNC_DEADLINE;
    let ready = std::iter::from_fn(|| {
        lines_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    })
    .any(|line| line.starts_with("Ready."));
    // Listed while the owner lives: no sweep touches a live owner's, while
    // another test's topology may sweep them as soon as it is dead.
    let orphans = namespaces_of(owner.id());
    let _ = owner.kill(); // SIGKILL: no destructor runs.
    owner.wait().unwrap();
    assert!(ready, "the binary did not get ready");
    assert_eq!(orphans.len(), 3, "hub, master and replica: {orphans:?}");

    let builder = Topology::builder().replicas(0).sentinels(0);
    let Some(next) = start(builder).await else {
        return;
    };
    assert_eq!(namespaces_of(owner.id()), Vec::<String>::new());
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let link = format!(" rt{}-", owner.id());
    assert!(!String::from_utf8_lossy(&links.stdout).contains(&link));
    drop_and_assert_clean(next);
}
