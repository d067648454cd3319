//! A short chaos run: a master killed, an offloader killed and a
//! `SENTINEL FAILOVER`, under writes and reads from three tenants through
//! two servers. Nothing acknowledged may be lost or missed by a read, and
//! no client may see an error, within the retry budget or past it. `harness chaos --rounds 20`
//! runs every kind of fault.

use e2e_tests::chaos::{self, Fault, Report};

/// Nothing acknowledged lost, missed by a read or missing at the receiver,
/// and no request failed, within the retry budget or past it.
fn assert_nothing_lost_and_no_error(report: &Report) {
    assert!(report.acknowledged_writes > 0);
    assert_eq!(report.lost_writes, Vec::<String>::new());
    assert_eq!(report.stale_reads, Vec::<String>::new());
    assert_eq!(report.missing_audit_records, Vec::<String>::new());
    assert_eq!(report.errors_within_budget(), 0, "{:?}", report.failures);
    assert_eq!(report.errors_past_budget(), 0, "{:?}", report.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_faults_lose_nothing_acknowledged_and_fail_no_request() {
    let report = chaos::run(
        3,
        &[
            Fault::KillMaster,
            Fault::KillOffloader,
            Fault::SentinelFailover,
        ],
    )
    .await
    .expect("chaos run");
    chaos::print_totals(&report);
    assert_nothing_lost_and_no_error(&report);
}

/// Limits and a quick restart: the master out of memory and unable to
/// persist refuses writes at once (counted as refusals, never retried for
/// the budget); maxclients reached and a master restarted before Sentinel
/// notices (with AOF) cost no request and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_writes_at_once_and_a_persistent_restart_loses_nothing() {
    let faults = [
        Fault::OutOfMemory,
        Fault::MaxClients,
        Fault::DiskFull,
        Fault::RestartMaster,
    ];
    let report = chaos::run(faults.len(), &faults).await.expect("chaos run");
    chaos::print_totals(&report);
    assert_nothing_lost_and_no_error(&report);
    for round in &report.rounds {
        if round.fault.refuses_writes() {
            assert!(round.refusals > 0, "{round:?}");
            // Not retried for the 8 s retry budget.
            assert!(
                round.slowest_refusal < std::time::Duration::from_secs(8),
                "{round:?}"
            );
        } else {
            assert_eq!(round.refusals, 0, "{round:?}");
        }
    }
}

/// Network partitions, in namespaces the run creates (skipped without the
/// privileges): the master cut from the sentinels while the clients still
/// reach it (Sentinel replaces it; writes waiting for both replicas cannot
/// be acknowledged by it), and the clients cut from the master for 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_lose_nothing_acknowledged_and_fail_no_request() {
    if let Err(error) = redis_topology::check_network_namespaces() {
        eprintln!("skipped: {error}");
        return;
    }
    let report = chaos::run(Fault::NETWORK.len(), &Fault::NETWORK)
        .await
        .expect("chaos run");
    chaos::print_totals(&report);
    assert_nothing_lost_and_no_error(&report);
}

/// On a Redis Cluster of 3 shards: a shard master killed and one stopped,
/// a `CLUSTER FAILOVER`, and a busy tenant's slot moved to another shard,
/// each on the shard of a tenant under traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_faults_lose_nothing_acknowledged_and_fail_no_request() {
    let report = chaos::run(Fault::CLUSTER.len(), &Fault::CLUSTER)
        .await
        .expect("chaos run");
    chaos::print_totals(&report);
    assert_nothing_lost_and_no_error(&report);
}
