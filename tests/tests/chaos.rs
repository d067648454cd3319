//! A short chaos run: a master killed, an offloader killed and a
//! `SENTINEL FAILOVER`, under writes and reads from three tenants through
//! two servers. Nothing acknowledged may be lost or missed by a read, and
//! no client may see an error, within the retry budget or past it. `harness chaos --rounds 20`
//! runs every kind of fault.

use e2e_tests::chaos::{self, Fault};

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
    assert!(report.acknowledged_writes > 0);
    assert_eq!(report.lost_writes, Vec::<String>::new());
    assert_eq!(report.stale_reads, Vec::<String>::new());
    assert_eq!(report.missing_audit_records, Vec::<String>::new());
    assert_eq!(report.errors_within_budget(), 0, "{:?}", report.failures);
    assert_eq!(report.errors_past_budget(), 0, "{:?}", report.failures);
}
