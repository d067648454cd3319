//! The chaos run: a whole local system (a master, 2 replicas and 3
//! sentinels, two server instances, two offloaders, a Loki-compatible
//! receiver) under HTTP traffic from several tenants, one fault per round,
//! and an account of what clients saw and what was lost.
//!
//! Writes are acknowledged only once both replicas have them
//! (`Durability::Replicated { replicas: 2 }`), so whichever replica Sentinel
//! promotes has every acknowledged write. With one replica, a write that the
//! old master takes during `SENTINEL FAILOVER` (after the promotion, before
//! its demotion) is acknowledged by the replica it still feeds, then
//! dropped when both resynchronise from the new master: the audit check
//! below catches such losses, which the final values alone would hide.
//!
//! Waiting for both replicas needs the old master back as a replica. The
//! servers' clients demote it as soon as it answers
//! (`demote_stale_masters`); Sentinel alone would wait until it had
//! answered for 8 s, and writes meanwhile would use up their retry budget.
//!
//! A run whose faults are Redis Cluster faults ([`Fault::CLUSTER`]) runs on
//! a cluster of 3 shards of a master and a replica instead, writes waiting
//! for their shard's replica, so that a promoted replica has every
//! acknowledged write of its shard.
//!
//! Limits reached on the master (`maxmemory`, a disk that cannot take a
//! snapshot) make it refuse writes until an operator acts: those requests
//! are answered at once (503 `store_full`, `store_not_persisting`) and
//! counted as refusals, apart from the errors a retry budget should hide.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::Http;
use rig::{Rig, wait_until};
use traffic::Traffic;

mod checks;
mod cluster_faults;
mod fault;
mod receiver;
mod report;
mod rig;
mod traffic;

pub use fault::Fault;
pub use report::{Report, Round, print_table, print_totals};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TENANTS: [&str; 3] = ["chaos-a", "chaos-b", "chaos-c"];
const TASKS_PER_TENANT: usize = 2;
const KEYS_PER_TASK: usize = 8;
const PASSWORD: &str = "chaos password";
const RETRY_BUDGET: Duration = Duration::from_secs(8);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_secs(60);
/// How long a receiver fault, or a limit reached on the master, lasts.
const OUTAGE: Duration = Duration::from_secs(3);

/// Runs `rounds` rounds, cycling through `faults`, and checks the end state.
/// The nodes run in network namespaces when a fault needs them (see
/// [`redis_topology::check_network_namespaces`]).
pub async fn run(rounds: usize, faults: &[Fault]) -> Result<Report, BoxError> {
    let network = faults.iter().any(|f| f.needs_network());
    let mut rig = Rig::start(network, faults.iter().any(|f| f.needs_cluster())).await?;
    let traffic = Traffic::new(TENANTS.len() * TASKS_PER_TENANT);
    let (tasks, readers) = start_traffic(&rig, &traffic).await?;
    let start_counts = traffic.snapshot();
    wait_until("traffic flowing", async || {
        traffic.all_succeeded_since(&start_counts)
    })
    .await?;

    let mut report_rounds = Vec::new();
    let mut last_failover: Option<Instant> = None;
    for round in 0..rounds {
        let fault = faults[round % faults.len()];
        if fault.changes_master()
            && let Some(at) = last_failover
        {
            // Sentinel refuses a new failover of the same master sooner.
            tokio::time::sleep_until((at + FAILOVER_TIMEOUT * 2 + Duration::from_secs(1)).into())
                .await;
        }
        let injected = Instant::now();
        let round_report = one_round(&mut rig, &traffic, round + 1, fault).await?;
        if fault.changes_master() {
            last_failover = Some(injected);
        }
        println!(
            "chaos round {}/{rounds}: {:<22} errors within budget {}, past budget {}, refused {} (slowest {:.1} ms), recovered in {:.2} s",
            round + 1,
            fault.name(),
            round_report.errors_within_budget,
            round_report.errors_past_budget,
            round_report.refusals,
            round_report.slowest_refusal.as_secs_f64() * 1e3,
            round_report.recovery.as_secs_f64()
        );
        report_rounds.push(round_report);
    }
    traffic.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }

    let lost_writes = checks::lost_writes(&traffic, &readers).await;
    checks::wait_for_drained_audit(rig.client()).await?;
    let (missing_audit_records, duplicate_lines) =
        checks::audit_at_receiver(&traffic, &rig.receiver, faults);
    let dead_lettered = checks::dead_letters(rig.client()).await?;
    let acknowledged_writes = traffic.acknowledged.lock().unwrap().len() as u64;
    let server = rig.server_version();
    rig.shutdown().await;
    Ok(Report {
        server,
        rounds: report_rounds,
        acknowledged_writes,
        lost_writes,
        reads: traffic.reads.load(Ordering::Relaxed),
        stale_reads: std::mem::take(&mut *traffic.stale_reads.lock().unwrap()),
        missing_audit_records,
        duplicate_lines,
        failures: std::mem::take(&mut *traffic.failures.lock().unwrap()),
        dead_lettered,
    })
}

/// Seeds every task's keys and starts the tasks; returns them, and a
/// logged-in client per tenant for the final checks.
async fn start_traffic(
    rig: &Rig,
    traffic: &Arc<Traffic>,
) -> Result<(Vec<JoinHandle<()>>, HashMap<&'static str, Http>), BoxError> {
    let mut tasks = Vec::new();
    let mut readers = HashMap::new();
    for (t, tenant) in TENANTS.into_iter().enumerate() {
        let clients = rig.clients(tenant).await;
        readers.insert(tenant, clients[0].clone());
        // The items exist before the faults start: every write is a PUT, which
        // the server may send again after an unknown outcome.
        for task in t * TASKS_PER_TENANT..(t + 1) * TASKS_PER_TENANT {
            for k in 0..KEYS_PER_TASK {
                let reply = clients[0]
                    .json(
                        "POST",
                        &format!("/data?key=t{task}-k{k}"),
                        &json!({"value": 0}),
                    )
                    .await;
                if reply.status != StatusCode::CREATED {
                    return Err(format!("chaos: seeding failed: {reply:?}").into());
                }
            }
            let traffic = Arc::clone(traffic);
            tasks.push(tokio::spawn(traffic::task(
                traffic,
                task,
                tenant,
                clients.clone(),
            )));
        }
    }
    Ok((tasks, readers))
}

/// Injects one fault, waits until every task has written since, and
/// tells what the round saw.
async fn one_round(
    rig: &mut Rig,
    traffic: &Traffic,
    round: usize,
    fault: Fault,
) -> Result<Round, BoxError> {
    let counts = traffic.counts();
    traffic.slowest_refusal_us.store(0, Ordering::Relaxed);
    let injected = Instant::now();
    traffic.round.store(round, Ordering::Relaxed);
    fault::inject(rig, fault)
        .await
        .map_err(|error| format!("chaos: injecting {}: {error}", fault.name()))?;
    if fault == Fault::RestartMasterEmpty {
        // Nothing to recover to: the dataset, users included, is gone. What
        // clients see is watched for a while, then the run ends.
        tokio::time::sleep(OUTAGE).await;
    } else {
        // Recovered once every task has written after the fault was over; a
        // request in flight until then is counted in this round.
        let after = traffic.snapshot();
        wait_until("traffic after the fault", async || {
            traffic.all_succeeded_since(&after)
        })
        .await?;
    }
    let now = traffic.counts();
    Ok(Round {
        fault,
        errors_within_budget: now.within - counts.within,
        errors_past_budget: now.past - counts.past,
        refusals: now.refusals - counts.refusals,
        slowest_refusal: Duration::from_micros(traffic.slowest_refusal_us.load(Ordering::Relaxed)),
        recovery: injected.elapsed(),
    })
}
