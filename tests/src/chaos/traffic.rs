//! The load of a chaos run: tasks writing and reading their own keys
//! through both servers, and the account of what they saw.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::json;

use super::{KEYS_PER_TASK, RETRY_BUDGET};
use crate::{Http, Reply};

/// The error codes of a master that refuses writes until an operator acts
/// (out of memory, cannot persist): answered at once, and counted apart.
const REFUSALS: [&str; 2] = ["store_full", "store_not_persisting"];

/// What the traffic tasks share.
#[derive(Default)]
pub(super) struct Traffic {
    pub(super) stop: AtomicBool,
    /// Successes so far, per task.
    pub(super) successes: Vec<AtomicU64>,
    pub(super) errors_within_budget: AtomicU64,
    pub(super) errors_past_budget: AtomicU64,
    /// Requests the master refused as full or not persisting, and the
    /// slowest of those answers, in µs.
    pub(super) refusals: AtomicU64,
    pub(super) slowest_refusal_us: AtomicU64,
    /// Per (tenant, key): the last acknowledged value and version, and
    /// values sent after it that may have been applied (their request failed).
    pub(super) state: Mutex<BTreeMap<(String, String), KeyState>>,
    /// (tenant, key, version, round) of every acknowledged write.
    pub(super) acknowledged: Mutex<Vec<(String, String, u64, usize)>>,
    /// The round under way (0 before the first fault).
    pub(super) round: AtomicUsize,
    /// The first failed requests, described.
    pub(super) failures: Mutex<Vec<String>>,
    /// Reads answered.
    pub(super) reads: AtomicU64,
    /// Reads that missed an acknowledged write.
    pub(super) stale_reads: Mutex<Vec<String>>,
}

#[derive(Default, Debug)]
pub(super) struct KeyState {
    pub(super) acked: Option<u64>,
    pub(super) maybe: BTreeSet<u64>,
}

/// The counters a round reports, at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Counts {
    pub(super) within: u64,
    pub(super) past: u64,
    pub(super) refusals: u64,
}

impl Traffic {
    pub(super) fn new(tasks: usize) -> Arc<Self> {
        Arc::new(Self {
            successes: (0..tasks).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        })
    }

    /// Each task's successes so far.
    pub(super) fn snapshot(&self) -> Vec<u64> {
        self.successes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Whether every task succeeded since `before` was taken.
    pub(super) fn all_succeeded_since(&self, before: &[u64]) -> bool {
        self.successes
            .iter()
            .zip(before)
            .all(|(now, before)| now.load(Ordering::Relaxed) > *before)
    }

    pub(super) fn counts(&self) -> Counts {
        Counts {
            within: self.errors_within_budget.load(Ordering::Relaxed),
            past: self.errors_past_budget.load(Ordering::Relaxed),
            refusals: self.refusals.load(Ordering::Relaxed),
        }
    }

    /// Counts a failed request: a refusal, or an error within or past the
    /// retry budget.
    fn failed(&self, tenant: &str, method: &str, key: &str, elapsed: Duration, reply: &Reply) {
        let code = reply.error_code();
        if reply.status == StatusCode::SERVICE_UNAVAILABLE && REFUSALS.contains(&code.as_str()) {
            self.refusals.fetch_add(1, Ordering::Relaxed);
            let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
            self.slowest_refusal_us.fetch_max(micros, Ordering::Relaxed);
            return;
        }
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

/// One task: PUTs of its keys in turn, and every other time a read of one
/// of them through the other server.
pub(super) async fn task(
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
        write(&traffic, task, tenant, client, key, n).await;
        // Only this task writes its keys, so a read must see the last value
        // acknowledged (or a later one that may have run).
        if n.is_multiple_of(2) {
            let key = format!("t{task}-k{}", (n / 2) % KEYS_PER_TASK as u64);
            read(
                &traffic,
                tenant,
                &clients[(n as usize + 1) % clients.len()],
                key,
            )
            .await;
        }
    }
}

async fn write(traffic: &Traffic, task: usize, tenant: &str, client: &Http, key: String, n: u64) {
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
        let mut state = traffic.state.lock().unwrap();
        state.entry(id).or_default().maybe.insert(n);
        drop(state);
        traffic.failed(tenant, "PUT", &key, started.elapsed(), &reply);
    }
}

async fn read(traffic: &Traffic, tenant: &str, client: &Http, key: String) {
    let started = Instant::now();
    let reply = client.get(&format!("/data/{key}")).await;
    if reply.status != StatusCode::OK {
        traffic.failed(tenant, "GET", &key, started.elapsed(), &reply);
        return;
    }
    traffic.reads.fetch_add(1, Ordering::Relaxed);
    let found = reply.json()["value"].as_u64();
    let state = traffic.state.lock().unwrap();
    let Some(expected) = state.get(&(tenant.to_owned(), key.clone())) else {
        return;
    };
    // A key never acknowledged since holds its seed, 0.
    let acked = expected.acked.or(Some(0));
    if found != acked && !found.is_some_and(|v| expected.maybe.contains(&v)) {
        traffic.stale_reads.lock().unwrap().push(format!(
            "{tenant}/{key}: acknowledged {acked:?}, read {found:?}"
        ));
    }
}
