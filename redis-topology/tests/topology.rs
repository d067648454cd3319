//! The topology against real `redis-server` processes: replication, Sentinel
//! failover after a kill and after a hang, manual promotion, several
//! topologies at once, credentials, and cleanup when a test panics.

use std::time::Duration;

use redis::Role;
use redis_topology::{Error, NodeId, Topology};

/// Long enough for a Sentinel failover (about 3 s with the 1.5 s
/// down-after) on a loaded 2-core machine.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// Sentinel turns a returning old master into a replica only after it has
/// looked sane for 8 s, and learns of it through INFO sent every 1-10 s.
const REJOIN_DEADLINE: Duration = Duration::from_secs(60);
const SYNC_DEADLINE: Duration = Duration::from_secs(15);
/// For tests that assert no failover happens: a stall of a loaded machine
/// must not look like a dead master.
const PATIENT_DOWN_AFTER: Duration = Duration::from_secs(10);

async fn set(topology: &Topology, node: NodeId, key: &str, value: &str) {
    let _: () = topology
        .query(node, redis::cmd("SET").arg(key).arg(value))
        .await
        .unwrap();
}

async fn get(topology: &Topology, node: NodeId, key: &str) -> Option<String> {
    topology
        .query(node, redis::cmd("GET").arg(key))
        .await
        .unwrap()
}

/// Writes on `master`, then checks every other running data node has the write.
async fn assert_replicates(topology: &Topology, master: NodeId, key: &str) {
    let replicas: Vec<NodeId> = topology
        .data_nodes()
        .into_iter()
        .filter(|&n| n != master && topology.is_running(n))
        .collect();
    let acked = topology
        .set_and_wait(master, key, "v", replicas.len())
        .await
        .unwrap();
    assert_eq!(acked, replicas.len(), "WAIT on {master}");
    for replica in replicas {
        assert_eq!(
            get(topology, replica, key).await.as_deref(),
            Some("v"),
            "{key} on {replica}"
        );
    }
}

#[tokio::test]
async fn writes_on_the_master_reach_every_replica() {
    let topology = Topology::builder()
        .down_after(PATIENT_DOWN_AFTER)
        .start()
        .await
        .unwrap();
    let master = topology.initial_master();
    assert_eq!(topology.data_nodes().len(), 3);
    assert_eq!(topology.sentinels().len(), 3);

    let acked = topology
        .set_and_wait(master, "greeting", "hello", 2)
        .await
        .unwrap();
    assert_eq!(acked, 2);
    for replica in &topology.data_nodes()[1..] {
        assert_eq!(
            get(&topology, *replica, "greeting").await.as_deref(),
            Some("hello")
        );
        match topology.role(*replica).await.unwrap() {
            Role::Replica { primary_port, .. } => {
                assert_eq!(primary_port, topology.addr(master).port())
            }
            role => panic!("{replica} is {role:?}"),
        }
    }
    for sentinel in topology.sentinels() {
        let addr = topology.sentinel_master_addr(sentinel).await.unwrap();
        assert_eq!(addr, Some(topology.addr(master)), "{sentinel}");
    }
    assert_eq!(topology.masters().await.unwrap(), vec![master]);
}

#[tokio::test]
async fn sentinel_promotes_a_replica_when_the_master_is_killed() {
    let topology = Topology::builder().start().await.unwrap();
    let old = topology.initial_master();

    topology.kill(old).unwrap();
    assert!(!topology.is_running(old));
    let new = topology
        .wait_for_new_master(old, FAILOVER_DEADLINE)
        .await
        .unwrap();
    assert_ne!(new, old);
    assert_eq!(topology.masters().await.unwrap(), vec![new]);

    let other = topology
        .data_nodes()
        .into_iter()
        .find(|&n| n != old && n != new)
        .unwrap();
    topology
        .wait_for_replica_of(other, new, SYNC_DEADLINE)
        .await
        .unwrap();
    assert_replicates(&topology, new, "after-kill").await;

    // The old master comes back on its old port, still thinking it is the
    // master (its config was never rewritten); Sentinel demotes it.
    let old_addr = topology.addr(old);
    topology.restart(old).await.unwrap();
    assert_eq!(topology.addr(old), old_addr);
    topology
        .wait_for_replica_of(old, new, REJOIN_DEADLINE)
        .await
        .unwrap();
    assert_eq!(topology.masters().await.unwrap(), vec![new]);
    assert_replicates(&topology, new, "after-rejoin").await;
}

#[tokio::test]
async fn a_hung_master_is_failed_over_and_rejoins_as_a_replica() {
    let topology = Topology::builder().start().await.unwrap();
    let old = topology.initial_master();

    topology.pause(old).unwrap();
    assert!(topology.is_running(old), "a paused node is still running");
    let new = topology
        .wait_for_new_master(old, FAILOVER_DEADLINE)
        .await
        .unwrap();
    assert_ne!(new, old);

    topology.resume(old).unwrap();
    topology
        .wait_for_replica_of(old, new, REJOIN_DEADLINE)
        .await
        .unwrap();
    assert_eq!(topology.masters().await.unwrap(), vec![new]);
    assert_replicates(&topology, new, "after-resume").await;
}

#[tokio::test]
async fn sentinel_failover_command_switches_the_master() {
    let topology = Topology::builder().start().await.unwrap();
    let old = topology.initial_master();

    topology.sentinel_failover().await.unwrap();
    let new = topology
        .wait_for_new_master(old, FAILOVER_DEADLINE)
        .await
        .unwrap();
    // The old master stays up; Sentinel turns it into a replica once it has
    // reported the wrong role for a while (about 8 s).
    topology
        .wait_for_replica_of(old, new, REJOIN_DEADLINE)
        .await
        .unwrap();
    assert_replicates(&topology, new, "after-manual-failover").await;
}

#[tokio::test]
async fn manual_promotion_without_sentinel() {
    let topology = Topology::builder().sentinels(0).start().await.unwrap();
    assert!(topology.sentinels().is_empty());
    assert!(matches!(
        topology.sentinel_failover().await,
        Err(Error::NoRunningSentinel)
    ));
    let old = topology.initial_master();
    let new = topology.data_nodes()[1];

    topology.promote(new).await.unwrap();
    assert_eq!(
        topology
            .wait_for_new_master(old, FAILOVER_DEADLINE)
            .await
            .unwrap(),
        new
    );
    for node in topology.data_nodes() {
        if node != new {
            topology
                .wait_for_replica_of(node, new, SYNC_DEADLINE)
                .await
                .unwrap();
        }
    }
    assert_replicates(&topology, new, "after-promotion").await;

    // The old master is a replica now: writes to it are refused.
    let refused = topology
        .query::<()>(old, redis::cmd("SET").arg("k").arg("v"))
        .await
        .unwrap_err();
    let Error::Redis { source, .. } = refused else {
        panic!("expected a Redis error, got {refused:?}")
    };
    assert_eq!(source.code(), Some("READONLY"));
}

#[tokio::test]
async fn two_topologies_run_side_by_side() {
    let (a, b) = tokio::join!(
        Topology::builder()
            .replicas(1)
            .sentinels(1)
            .down_after(PATIENT_DOWN_AFTER)
            .start(),
        Topology::builder()
            .replicas(1)
            .sentinels(1)
            .down_after(PATIENT_DOWN_AFTER)
            .start(),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let ports = |t: &Topology| {
        t.data_nodes()
            .into_iter()
            .chain(t.sentinels())
            .map(|n| t.addr(n).port())
            .collect::<Vec<_>>()
    };
    let (ports_a, ports_b) = (ports(&a), ports(&b));
    assert!(
        ports_a.iter().all(|p| !ports_b.contains(p)),
        "{ports_a:?} vs {ports_b:?}"
    );
    assert_ne!(a.dir(), b.dir());

    set(&a, a.initial_master(), "owner", "a").await;
    assert_eq!(get(&b, b.initial_master(), "owner").await, None);
    assert_replicates(&a, a.initial_master(), "only-in-a").await;
}

#[tokio::test]
async fn acl_credentials_protect_data_nodes_and_sentinels() {
    let topology = Topology::builder()
        .replicas(1)
        .sentinels(1)
        .acl_user("app", "app-secret")
        .sentinel_password("sentinel-secret")
        .down_after(PATIENT_DOWN_AFTER)
        .start()
        .await
        .unwrap();
    // Start-up proves replication and Sentinel authenticate; clients must too.
    let master = topology.initial_master();
    assert_replicates(&topology, master, "with-acl").await;
    let whoami: String = topology
        .query(master, redis::cmd("ACL").arg("WHOAMI"))
        .await
        .unwrap();
    assert_eq!(whoami, "app");

    for node in [master, topology.sentinels()[0]] {
        let client = redis::Client::open(format!("redis://{}", topology.addr(node))).unwrap();
        let mut anonymous = client.get_multiplexed_async_connection().await.unwrap();
        let error = redis::cmd("PING")
            .query_async::<String>(&mut anonymous)
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some("NOAUTH"), "{node}: {error}");
    }
}

#[tokio::test]
async fn every_process_is_killed_when_a_test_panics() {
    let (pids_tx, pids_rx) = std::sync::mpsc::channel();
    let panicked = tokio::spawn(async move {
        let topology = Topology::builder()
            .replicas(1)
            .sentinels(1)
            .keep_dir(false)
            .start()
            .await
            .unwrap();
        let nodes = topology
            .data_nodes()
            .into_iter()
            .chain(topology.sentinels());
        let pids: Vec<u32> = nodes.map(|n| topology.pid(n).unwrap()).collect();
        pids_tx.send((pids, topology.dir().to_owned())).unwrap();
        panic!("deliberate panic while the topology runs");
    })
    .await
    .unwrap_err();
    assert!(panicked.is_panic());

    let (pids, dir) = pids_rx.recv().unwrap();
    assert_eq!(pids.len(), 3);
    for pid in pids {
        assert!(
            !process_exists(pid),
            "redis-server {pid} outlived its topology"
        );
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[tokio::test]
async fn a_missing_binary_fails_start_with_a_clear_error() {
    let error = Topology::builder()
        .redis_server("/nonexistent/bin/redis-server")
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::RedisServerNotFound { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn faults_on_stopped_nodes_are_refused() {
    let topology = Topology::builder()
        .replicas(1)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let replica = topology.data_nodes()[1];
    assert!(matches!(
        topology.restart(replica).await,
        Err(Error::AlreadyRunning { .. })
    ));
    topology.kill(replica).unwrap();
    assert!(topology.pid(replica).is_none());
    assert!(matches!(
        topology.kill(replica),
        Err(Error::NotRunning { .. })
    ));
    assert!(matches!(
        topology.pause(replica),
        Err(Error::NotRunning { .. })
    ));
    // The failed query names the node and keeps the client's error as source.
    let error = topology.role(replica).await.unwrap_err();
    assert!(matches!(error, Error::Redis { node, .. } if node == replica));
    assert!(std::error::Error::source(&error).is_some());

    topology.restart(replica).await.unwrap();
    topology
        .wait_for_replica_of(replica, topology.initial_master(), SYNC_DEADLINE)
        .await
        .unwrap();

    // While it is down, another process takes its port: the restart says so.
    topology.kill(replica).unwrap();
    let _squatter = std::net::TcpListener::bind(topology.addr(replica)).unwrap();
    let error = topology.restart(replica).await.unwrap_err();
    assert!(
        matches!(error, Error::PortTaken { node, port } if node == replica && port == topology.addr(replica).port()),
        "{error:?}"
    );
    assert!(!topology.is_running(replica));
}

/// Signal 0 checks that a process exists without touching it. The topology
/// reaps what it kills, so a killed node leaves no zombie behind.
fn process_exists(pid: u32) -> bool {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, None).is_ok()
}

#[tokio::test]
async fn a_wait_that_cannot_succeed_times_out_naming_the_node_and_its_log() {
    let topology = Topology::builder()
        .replicas(0)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let master = topology.initial_master();
    let error = topology
        .wait_for_new_master(master, Duration::from_millis(300))
        .await
        .unwrap_err();
    let Error::Timeout {
        node,
        reason,
        log,
        log_tail,
        ..
    } = &error
    else {
        panic!("expected a timeout, got {error:?}")
    };
    assert_eq!(*node, master);
    assert!(reason.contains("redis-0"), "{reason}");
    assert!(log.starts_with(topology.dir()), "{}", log.display());
    assert!(
        log_tail.contains("Ready to accept connections"),
        "{log_tail}"
    );
    assert!(
        error.to_string().contains("a master other than redis-0"),
        "{error}"
    );
}

#[tokio::test]
async fn a_tls_topology_replicates_and_fails_over_over_tls_only() {
    let topology = Topology::builder().tls(true).start().await.unwrap();
    let root_cert = topology.tls_root_cert().expect("a TLS topology has a CA");
    assert!(String::from_utf8_lossy(root_cert).contains("BEGIN CERTIFICATE"));
    let old = topology.initial_master();
    // Start-up already proved replication and Sentinel work over TLS.
    assert_replicates(&topology, old, "over-tls").await;

    // Plain TCP gets no answer from a TLS port.
    let plain = redis::Client::open(format!("redis://{}", topology.addr(old))).unwrap();
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    let refused = async {
        let mut connection = plain
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    assert!(refused.await.is_err(), "a plain connection was answered");

    topology.kill(old).unwrap();
    let new = topology
        .wait_for_new_master(old, FAILOVER_DEADLINE)
        .await
        .unwrap();
    assert_replicates(&topology, new, "over-tls-after-failover").await;
}
