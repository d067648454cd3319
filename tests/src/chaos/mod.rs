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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use log_buffer::{LokiSink, Offloader};
use redis_failover::FailoverClient;
use redis_topology::{NodeId, Topology};
use serde_json::{Value, json};
use server::System;
use tenant_kv::{Actor, NewUser, TenantId};

use crate::{Http, Reply};
use receiver::{Mode, Receiver};

mod fault;
mod receiver;
mod report;

pub use fault::Fault;
pub use report::{Report, Round, print_totals};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TENANTS: [&str; 3] = ["chaos-a", "chaos-b", "chaos-c"];
const TASKS_PER_TENANT: usize = 2;
const KEYS_PER_TASK: usize = 8;
const PASSWORD: &str = "chaos password";
const RETRY_BUDGET: Duration = Duration::from_secs(8);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_secs(60);
/// How long a receiver fault lasts.
const OUTAGE: Duration = Duration::from_secs(3);

/// One server as the manifests run it (`deploy/k8s`), with its own
/// failover client: writes wait for both replicas, down to one once a
/// replica has been gone for 8 s, and a replaced master is made a replica
/// as soon as it answers.
async fn server_instance(
    topology: &Topology,
    secret: &[u8],
    cursor_secret: &[u8],
) -> Result<System, BoxError> {
    let env = [
        ("SERVER_LISTEN", "127.0.0.1:0".to_owned()),
        ("SERVER_ADMIN_LISTEN", "off".to_owned()),
        (
            "SERVER_REDIS_RETRY_BUDGET",
            format!("{}s", RETRY_BUDGET.as_secs()),
        ),
        ("SERVER_REDIS_WAIT_REPLICAS", "2".to_owned()),
        ("SERVER_REDIS_WAIT_REPLICAS_MIN", "1".to_owned()),
        ("SERVER_REDIS_REPLICA_LOST_AFTER", "8s".to_owned()),
        ("SERVER_REDIS_DEMOTE_STALE_MASTER", "true".to_owned()),
        // Audit records go to Redis streams from the store itself; this
        // process's own logs are not what the run checks.
        ("SERVER_LOG_BUFFER", "false".to_owned()),
    ];
    let env = env.map(|(name, value)| (name.to_owned(), value));
    let mut settings = server::dev::topology_settings(topology, env)?;
    settings.jwt.secret = Some(secret.to_vec());
    settings.cursor_secret = Some(cursor_secret.to_vec());
    let system = System::builder(settings).start().await?;
    system
        .client()
        .wait_for_master(Duration::from_secs(10))
        .await?;
    Ok(system)
}

fn offloader(client: &FailoverClient, url: &str, name: &str) -> Result<Offloader, BoxError> {
    Ok(
        // As `server offload` runs it.
        Offloader::builder(server::log_client(client), LokiSink::builder(url).build()?)
            .consumer(name)
            .poll_interval(Duration::from_millis(50))
            .discovery_interval(Duration::from_millis(500))
            .claim_idle(Duration::from_secs(2))
            .backoff(redis_failover::Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(1),
            )?)
            .start()?,
    )
}

/// What the traffic tasks share.
#[derive(Default)]
struct Traffic {
    stop: AtomicBool,
    /// Successes so far, per task.
    successes: Vec<AtomicU64>,
    errors_within_budget: AtomicU64,
    errors_past_budget: AtomicU64,
    /// Per (tenant, key): the last acknowledged value and version, and
    /// values sent after it that may have been applied (their request failed).
    state: Mutex<BTreeMap<(String, String), KeyState>>,
    /// (tenant, key, version, round) of every acknowledged write.
    acknowledged: Mutex<Vec<(String, String, u64, usize)>>,
    /// The round under way (0 before the first fault).
    round: AtomicUsize,
    /// The first failed requests, described.
    failures: Mutex<Vec<String>>,
    /// Reads answered.
    reads: AtomicU64,
    /// Reads that missed an acknowledged write.
    stale_reads: Mutex<Vec<String>>,
}

#[derive(Default, Debug)]
struct KeyState {
    acked: Option<u64>,
    maybe: BTreeSet<u64>,
}

async fn traffic_task(
    traffic: Arc<Traffic>,
    task: usize,
    tenant: &'static str,
    clients: Vec<Http>,
) {
    let mut n = 0u64;
    while !traffic.stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("t{task}-k{}", n % KEYS_PER_TASK as u64);
        let client = &clients[n as usize % clients.len()];
        let id = (tenant.to_owned(), key.clone());
        let started = Instant::now();
        let reply = client
            .json("PUT", &format!("/data/{key}"), &json!({"value": n}))
            .await;
        if reply.status == StatusCode::OK {
            let version = reply.json()["version"].as_u64().unwrap_or_default();
            let mut state = traffic.state.lock().unwrap();
            let entry = state.entry(id).or_default();
            entry.acked = Some(n);
            entry.maybe.clear();
            traffic.acknowledged.lock().unwrap().push((
                tenant.to_owned(),
                key,
                version,
                traffic.round.load(Ordering::Relaxed),
            ));
            traffic.successes[task].fetch_add(1, Ordering::Relaxed);
        } else {
            traffic
                .state
                .lock()
                .unwrap()
                .entry(id)
                .or_default()
                .maybe
                .insert(n);
            traffic.failed(tenant, "PUT", &key, started.elapsed(), &reply);
        }

        // Every other iteration, a read of one of this task's keys, through the
        // other server: only this task writes them, so it must see the
        // last value acknowledged (or a later one that may have run).
        if n.is_multiple_of(2) {
            let key = format!("t{task}-k{}", (n / 2) % KEYS_PER_TASK as u64);
            let client = &clients[(n as usize + 1) % clients.len()];
            let started = Instant::now();
            let reply = client.get(&format!("/data/{key}")).await;
            if reply.status != StatusCode::OK {
                traffic.failed(tenant, "GET", &key, started.elapsed(), &reply);
                continue;
            }
            traffic.reads.fetch_add(1, Ordering::Relaxed);
            let found = reply.json()["value"].as_u64();
            let state = traffic.state.lock().unwrap();
            let Some(expected) = state.get(&(tenant.to_owned(), key.clone())) else {
                continue;
            };
            let acked = expected.acked;
            if found != acked && !found.is_some_and(|v| expected.maybe.contains(&v)) {
                traffic.stale_reads.lock().unwrap().push(format!(
                    "{tenant}/{key}: acknowledged {acked:?}, read {found:?}"
                ));
            }
        }
    }
}

impl Traffic {
    /// Counts a failed request, within or past the retry budget.
    fn failed(&self, tenant: &str, method: &str, key: &str, elapsed: Duration, reply: &Reply) {
        if elapsed >= RETRY_BUDGET {
            self.errors_past_budget.fetch_add(1, Ordering::Relaxed);
        } else {
            self.errors_within_budget.fetch_add(1, Ordering::Relaxed);
        }
        let mut failures = self.failures.lock().unwrap();
        if failures.len() < 10 {
            let body = String::from_utf8_lossy(&reply.body);
            failures.push(format!(
                "{tenant} {method} {key} after {elapsed:?}: {} {body}",
                reply.status
            ));
        }
    }
}

/// The master as the sentinels name it.
async fn current_master(topology: &Topology) -> Result<NodeId, BoxError> {
    for sentinel in topology.sentinels() {
        if let Ok(Some(addr)) = topology.sentinel_master_addr(sentinel).await
            && let Some(node) = topology.node_at(addr)
        {
            return Ok(node);
        }
    }
    Err("no sentinel names a master".into())
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) -> Result<(), BoxError> {
    let started = Instant::now();
    while !done().await {
        if started.elapsed() > DEADLINE {
            return Err(format!("chaos: {what} not within {DEADLINE:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs `rounds` rounds, cycling through `faults`, and checks the end state.
pub async fn run(rounds: usize, faults: &[Fault]) -> Result<Report, BoxError> {
    let topology = Topology::builder()
        .down_after(Duration::from_millis(1000))
        .failover_timeout(FAILOVER_TIMEOUT)
        .start()
        .await?;
    let receiver = Receiver::start().await?;
    let (secret, cursor_secret): ([u8; 32], [u8; 32]) = (rand::random(), rand::random());
    let server_a = server_instance(&topology, &secret, &cursor_secret).await?;
    let server_b = server_instance(&topology, &secret, &cursor_secret).await?;
    let (store, client) = (server_a.store().clone(), server_a.client().clone());
    for tenant in TENANTS {
        let user = NewUser {
            username: format!("{tenant}-user"),
            tenant: TenantId::new(tenant)?,
            email: None,
            full_name: None,
            admin: false,
        };
        store
            .users()
            .create(user, PASSWORD, &Actor::system())
            .await?;
    }
    let mut offloaders = vec![
        offloader(&client, &receiver.url, "offloader-1")?,
        offloader(&client, &receiver.url, "offloader-2")?,
    ];
    let mut next_offloader = 3;

    let traffic = Arc::new(Traffic {
        successes: (0..TENANTS.len() * TASKS_PER_TENANT)
            .map(|_| AtomicU64::new(0))
            .collect(),
        ..Traffic::default()
    });
    let mut tasks = Vec::new();
    // One logged-in client per tenant for the final checks.
    let mut readers = HashMap::new();
    for (t, tenant) in TENANTS.into_iter().enumerate() {
        let mut clients = Vec::new();
        for server in [&server_a, &server_b] {
            let http = Http::new(server.local_addr());
            clients.push(http.login(&format!("{tenant}-user"), PASSWORD).await);
        }
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
            tasks.push(tokio::spawn(traffic_task(
                Arc::clone(&traffic),
                task,
                tenant,
                clients.clone(),
            )));
        }
    }
    let all_succeeded_since = |counts: &[u64]| {
        traffic
            .successes
            .iter()
            .zip(counts)
            .all(|(now, before)| now.load(Ordering::Relaxed) > *before)
    };
    let snapshot = || {
        traffic
            .successes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    };
    let start_counts = snapshot();
    wait_until("traffic flowing", async || {
        all_succeeded_since(&start_counts)
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
        let (within, past) = (
            traffic.errors_within_budget.load(Ordering::Relaxed),
            traffic.errors_past_budget.load(Ordering::Relaxed),
        );
        let before = snapshot();
        let injected = Instant::now();
        traffic.round.store(round + 1, Ordering::Relaxed);
        match fault {
            Fault::KillMaster => {
                let old = current_master(&topology).await?;
                topology.kill(old)?;
                let new = topology.wait_for_new_master(old, DEADLINE).await?;
                topology.restart(old).await?;
                topology.replicate(old, new, DEADLINE).await?;
            }
            Fault::PauseMaster => {
                let old = current_master(&topology).await?;
                topology.pause(old)?;
                let new = topology.wait_for_new_master(old, DEADLINE).await;
                topology.resume(old)?;
                let new = new?;
                topology.wait_for_replica_of(old, new, DEADLINE).await?;
            }
            Fault::SentinelFailover => {
                let old = current_master(&topology).await?;
                topology.sentinel_failover().await?;
                let new = topology.wait_for_new_master(old, DEADLINE).await?;
                topology.wait_for_replica_of(old, new, DEADLINE).await?;
            }
            Fault::RestartSentinels => {
                for sentinel in topology.sentinels() {
                    topology.kill(sentinel)?;
                }
                for sentinel in topology.sentinels() {
                    topology.restart(sentinel).await?;
                }
            }
            Fault::KillOffloader => {
                // Dropped mid-work: its pending entries are claimed by the others.
                drop(offloaders.remove(0));
                offloaders.push(offloader(
                    &client,
                    &receiver.url,
                    &format!("offloader-{next_offloader}"),
                )?);
                next_offloader += 1;
            }
            Fault::Receiver500 | Fault::Receiver429 | Fault::ReceiverDown => {
                receiver.set(match fault {
                    Fault::Receiver500 => Mode::Status(500),
                    Fault::Receiver429 => Mode::Status(429),
                    _ => Mode::Down,
                });
                tokio::time::sleep(OUTAGE).await;
                receiver.set(Mode::Accept);
            }
        }
        if fault.changes_master() {
            last_failover = Some(injected);
        }
        wait_until("traffic after the fault", async || {
            all_succeeded_since(&before)
        })
        .await?;
        let recovery = injected.elapsed();
        let round_report = Round {
            fault,
            errors_within_budget: traffic.errors_within_budget.load(Ordering::Relaxed) - within,
            errors_past_budget: traffic.errors_past_budget.load(Ordering::Relaxed) - past,
            recovery,
        };
        println!(
            "chaos round {}/{rounds}: {:<18} errors within budget {}, past budget {}, recovered in {:.2} s",
            round + 1,
            fault.name(),
            round_report.errors_within_budget,
            round_report.errors_past_budget,
            recovery.as_secs_f64()
        );
        report_rounds.push(round_report);
    }
    traffic.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }

    // Every acknowledged write is there (or a later attempt that may have run).
    let mut lost_writes = Vec::new();
    let state: Vec<_> = std::mem::take(&mut *traffic.state.lock().unwrap())
        .into_iter()
        .collect();
    for ((tenant, key), key_state) in state {
        let Some(value) = key_state.acked else {
            continue;
        };
        let found = readers[tenant.as_str()]
            .get(&format!("/data/{key}"))
            .await
            .json()["value"]
            .as_u64();
        if found != Some(value) && !found.is_some_and(|v| key_state.maybe.contains(&v)) {
            lost_writes.push(format!(
                "{tenant}/{key}: acknowledged {value}, found {found:?}"
            ));
        }
    }

    // Every acknowledged mutation's audit record reached the receiver.
    let drained = wait_until("audit streams drained", async || {
        let mut left = 0u64;
        for tenant in TENANTS {
            left += client
                .query::<u64>(redis::cmd("XLEN").arg(format!("tenant:{{{tenant}}}:audit")))
                .await
                .unwrap_or(1);
        }
        left == 0
    })
    .await;
    if let Err(error) = drained {
        // What holds entries back, for the report.
        let mut state = String::new();
        for tenant in TENANTS {
            let stream = format!("tenant:{{{tenant}}}:audit");
            let groups: redis::Value = client
                .query(redis::cmd("XINFO").arg("GROUPS").arg(&stream))
                .await
                .unwrap_or(redis::Value::Nil);
            let first: redis::Value = client
                .query(
                    redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(3),
                )
                .await
                .unwrap_or(redis::Value::Nil);
            state.push_str(&format!(
                "\n{stream}: groups {groups:?}\n  first entries {first:?}"
            ));
        }
        return Err(format!("{error}; {state}").into());
    }
    let lines = receiver.lines.lock().unwrap().clone();
    let duplicate_lines = lines
        .values()
        .filter(|count| **count > 1)
        .map(|count| count - 1)
        .sum();
    let mut audited = BTreeSet::new();
    for (tenant, _, line) in lines.keys() {
        if let Ok(fields) = serde_json::from_str::<BTreeMap<String, Value>>(line)
            && let (Some(key), Some(version)) = (fields.get("key"), fields.get("version"))
        {
            let version = version.as_str().and_then(|v| v.parse::<u64>().ok());
            audited.insert((
                tenant.clone(),
                key.as_str().unwrap_or_default().to_owned(),
                version,
            ));
        }
    }
    let acknowledged = std::mem::take(&mut *traffic.acknowledged.lock().unwrap());
    let missing_audit_records = acknowledged
        .iter()
        .filter(|(tenant, key, version, _)| {
            !audited.contains(&(tenant.clone(), key.clone(), Some(*version)))
        })
        .map(|(tenant, key, version, round)| {
            let during = match round {
                0 => "before the first fault".to_owned(),
                round => format!(
                    "in round {round} ({})",
                    faults[(round - 1) % faults.len()].name()
                ),
            };
            format!("{tenant}/{key} version {version}, acknowledged {during}")
        })
        .collect();

    // Entries any offloader, killed ones included, set aside.
    let mut dead_lettered: BTreeMap<String, u64> = BTreeMap::new();
    for tenant in TENANTS {
        let stream = log_buffer::dead_letter_stream(&format!("tenant:{{{tenant}}}:audit"));
        let entries: Vec<(String, HashMap<String, String>)> = client
            .query(redis::cmd("XRANGE").arg(stream).arg("-").arg("+"))
            .await?;
        for (_, fields) in entries {
            let reason = fields
                .get("dead_letter_reason")
                .cloned()
                .unwrap_or_default();
            *dead_lettered.entry(reason).or_default() += 1;
        }
    }
    for offloader in offloaders {
        offloader.shutdown(Duration::from_secs(5)).await;
    }
    server_a.shutdown().await;
    server_b.shutdown().await;
    Ok(Report {
        rounds: report_rounds,
        acknowledged_writes: acknowledged.len() as u64,
        lost_writes,
        reads: traffic.reads.load(Ordering::Relaxed),
        stale_reads: std::mem::take(&mut *traffic.stale_reads.lock().unwrap()),
        missing_audit_records,
        duplicate_lines,
        failures: std::mem::take(&mut *traffic.failures.lock().unwrap()),
        dead_lettered,
    })
}
