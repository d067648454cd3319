//! A small closed-loop benchmark harness.
//!
//! Each [`Variant`] is an async operation (one Redis command, a write through
//! the failover client, ...). [`compare`] drives every variant with the same
//! number of concurrent tasks for the same time, repeats the whole set in
//! interleaved rounds so that drift of a shared, noisy machine hits every
//! variant alike, and reports throughput and latency percentiles with each
//! variant's throughput as a ratio to the first one, the baseline. A
//! variant whose operations leave work behind (logs still to ship, say)
//! waits for it after each round ([`Variant::settled_by`]), so that the
//! next variant does not do it.
//! Absolute numbers vary between machines and minutes; the ratios are what a
//! benchmark asserts about.
//!
//! On Linux it also counts the CPU time each variant's rounds took per
//! successful operation, of this process and with the other processes
//! named (the Redis servers, say). Where the kernel accounts stolen time
//! apart, as on a KVM guest, that time is not in it, so it is less
//! sensitive to a shared machine's steal than throughput; it still moves
//! with the host's load, so compare variants within one run.
//!
//! `BENCH_SECONDS` (default 2) sets the time of one measurement and
//! `BENCH_ROUNDS` (default 3) the number of rounds. The `harness` binary
//! runs the scenarios built on it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One operation a task repeats; errors are counted, not fatal.
pub type Operation =
    Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Waits until the work a variant's operations left behind (logs still
/// to ship, say) is done.
pub type Settle = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A named way of doing the measured operation.
#[derive(Clone)]
pub struct Variant {
    /// Shown in the report.
    pub name: String,
    /// Called with the task's number each time the task runs the operation.
    pub operation: Operation,
    /// Awaited after each of the variant's rounds, before the next
    /// variant's: see [`settled_by`](Self::settled_by).
    pub settle: Option<Settle>,
}

impl Variant {
    /// A variant from a closure returning the operation's future.
    pub fn new<F, Fut>(name: impl Into<String>, operation: F) -> Self
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Self {
            name: name.into(),
            operation: Arc::new(move |task| Box::pin(operation(task))),
            settle: None,
        }
    }

    /// After each round, waits for `settle` before the next variant runs,
    /// so that the next one does not take on what this one left behind;
    /// the wait's CPU time counts as this variant's, its duration is
    /// reported, and the throughput is the round's alone.
    #[must_use]
    pub fn settled_by<F, Fut>(mut self, settle: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.settle = Some(Arc::new(move || Box::pin(settle())));
        self
    }
}

/// What all rounds of one variant at one concurrency measured.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    /// Operations per second of each round.
    pub rounds_ops_per_sec: Vec<f64>,
    /// Failed operations, all rounds together.
    pub errors: u64,
    /// Every successful operation's latency in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// CPU time used over all rounds (`None` where `/proc` cannot tell).
    pub cpu: Option<CpuTime>,
    /// How long each round's [`settle`](Variant::settle) took.
    pub rounds_settled_in: Vec<Duration>,
}

/// CPU time used (user and system, every thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTime {
    /// This process's.
    pub own: Duration,
    /// The other processes' observed, together (`None` if there are none,
    /// or if one of them could not be read).
    pub others: Option<Duration>,
}

impl CpuTime {
    /// The CPU time used so far by this process, and by the processes
    /// `others` if every one of them can be read.
    fn now(others: &[u32]) -> Option<Self> {
        let read = others.iter().map(|&pid| process_cpu_time(pid));
        Some(Self {
            own: own_cpu_time()?,
            others: if others.is_empty() { None } else { read.sum() },
        })
    }

    /// What was used between `earlier` and `self`, added to `total`.
    fn added_since(self, earlier: Self, total: Self) -> Self {
        let since = |now: Option<Duration>, then: Option<Duration>, sum: Option<Duration>| {
            Some(sum? + now?.saturating_sub(then?))
        };
        Self {
            own: total.own + self.own.saturating_sub(earlier.own),
            others: since(self.others, earlier.others, total.others),
        }
    }
}

/// The middle of `rounds` ordered by `order` (the upper one of an even
/// count); `None` if there are none.
fn median<T: Copy>(rounds: &[T], order: impl FnMut(&T, &T) -> std::cmp::Ordering) -> Option<T> {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(order);
    sorted.get(sorted.len() / 2).copied()
}

impl Measurement {
    /// The median of the rounds' throughputs.
    pub fn ops_per_sec(&self) -> f64 {
        median(&self.rounds_ops_per_sec, f64::total_cmp).unwrap_or(0.0)
    }

    /// The median of the rounds' waits for what they left behind (`None`
    /// without a [`settle`](Variant::settle)).
    pub fn settled_in(&self) -> Option<Duration> {
        median(&self.rounds_settled_in, Duration::cmp)
    }

    /// This process's CPU time per successful operation, in µs (all of
    /// it, failed operations' included, over the successful ones; the
    /// mean over the rounds).
    pub fn own_cpu_us_per_op(&self) -> Option<f64> {
        self.per_op(self.cpu?.own)
    }

    /// As [`own_cpu_us_per_op`](Self::own_cpu_us_per_op), of this process
    /// and the others observed together.
    pub fn all_cpu_us_per_op(&self) -> Option<f64> {
        let cpu = self.cpu?;
        self.per_op(cpu.own + cpu.others?)
    }

    fn per_op(&self, time: Duration) -> Option<f64> {
        let ops = self.latencies_us.len();
        (ops > 0).then(|| time.as_secs_f64() * 1e6 / ops as f64)
    }

    /// The latency below which the fraction `q` (0..=1) of operations completed.
    pub fn percentile(&self, q: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        Duration::from_micros(u64::from(self.latencies_us[rank]))
    }
}

/// The time of one measurement and the number of interleaved rounds.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How long each variant runs per round.
    pub duration: Duration,
    /// How many times every variant is measured, in turn.
    pub rounds: usize,
}

impl Settings {
    /// From `BENCH_SECONDS` and `BENCH_ROUNDS`, defaulting to 2 s and 3 rounds.
    pub fn from_env() -> Self {
        let read = |name: &str, default: f64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| *v > 0.0)
                .unwrap_or(default)
        };
        Self {
            duration: Duration::from_secs_f64(read("BENCH_SECONDS", 2.0)),
            rounds: (read("BENCH_ROUNDS", 3.0) as usize).max(1),
        }
    }
}

/// Runs `operation` from `tasks` concurrent tasks, each in a closed loop,
/// for `duration`; returns (ops/s, errors, latencies in µs).
async fn run_once(operation: &Operation, tasks: usize, duration: Duration) -> (f64, u64, Vec<u32>) {
    let started = Instant::now();
    let deadline = started + duration;
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let operation = Arc::clone(operation);
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match operation(task).await {
                        Ok(()) => latencies
                            .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX)),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for handle in handles {
        let (task_latencies, task_errors) = handle.await.expect("benchmark task panicked");
        latencies.extend(task_latencies);
        errors += task_errors;
    }
    let ops_per_sec = latencies.len() as f64 / started.elapsed().as_secs_f64();
    (ops_per_sec, errors, latencies)
}

/// Measures every variant at `tasks` concurrency in interleaved rounds and
/// returns one [`Measurement`] per variant, in the given order.
pub async fn compare(variants: &[Variant], tasks: usize, settings: Settings) -> Vec<Measurement> {
    compare_observing(variants, tasks, settings, &[]).await
}

/// [`compare`], counting also the CPU time of the processes whose ids are
/// `others` (one that cannot be read is named on stderr, and the sum of
/// the others is then left out).
pub async fn compare_observing(
    variants: &[Variant],
    tasks: usize,
    settings: Settings,
    others: &[u32],
) -> Vec<Measurement> {
    let unreadable = others.iter().find(|&&pid| process_cpu_time(pid).is_none());
    if let Some(pid) = unreadable {
        eprintln!(
            "benches: the CPU time of process {pid} cannot be read: only this process's is counted"
        );
    }
    let first = Measurement {
        cpu: own_cpu_time().map(|_| CpuTime {
            own: Duration::ZERO,
            others: (!others.is_empty() && unreadable.is_none()).then_some(Duration::ZERO),
        }),
        ..Measurement::default()
    };
    let mut results = vec![first; variants.len()];
    for _ in 0..settings.rounds {
        for (variant, result) in variants.iter().zip(&mut results) {
            let before = CpuTime::now(others);
            let (ops_per_sec, errors, latencies) =
                run_once(&variant.operation, tasks, settings.duration).await;
            if let Some(settle) = &variant.settle {
                let started = Instant::now();
                settle().await;
                result.rounds_settled_in.push(started.elapsed());
            }
            let after = CpuTime::now(others);
            result.cpu = match (result.cpu, before, after) {
                (Some(total), Some(before), Some(after)) => Some(after.added_since(before, total)),
                _ => None,
            };
            result.rounds_ops_per_sec.push(ops_per_sec);
            result.errors += errors;
            result.latencies_us.extend(latencies);
        }
    }
    for result in &mut results {
        result.latencies_us.sort_unstable();
    }
    results
}

/// The CPU time (user and system, every thread) this process has used,
/// from `/proc/self/stat`; `None` without it, as on other systems than
/// Linux.
pub fn own_cpu_time() -> Option<Duration> {
    read_cpu_time("self")
}

/// [`own_cpu_time`] of process `pid`; `None` once it is gone.
pub fn process_cpu_time(pid: u32) -> Option<Duration> {
    read_cpu_time(&pid.to_string())
}

fn read_cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_time(&stat)
}

/// `utime` plus `stime` of a `/proc/<pid>/stat` line, fields 14 and 15,
/// counted after the command name (which may hold spaces and
/// parentheses), in the kernel's `USER_HZ` ticks: 100 a second on every
/// Linux architecture this runs on.
fn parse_cpu_time(stat: &str) -> Option<Duration> {
    const TICKS_PER_SEC: u64 = 100;
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / TICKS_PER_SEC,
    ))
}

/// A table of the measurements, ratios against the first variant.
pub fn report(variants: &[Variant], tasks: usize, measurements: &[Measurement]) -> String {
    let baseline = measurements.first().map_or(0.0, Measurement::ops_per_sec);
    let mut out = format!(
        "{tasks} tasks\n  {:<36} {:>10} {:>7} {:>9} {:>9} {:>9} {:>7} {:>17}\n",
        "variant", "ops/s", "ratio", "p50", "p99", "p999", "errors", "cpu µs/op own/all"
    );
    for (variant, m) in variants.iter().zip(measurements) {
        let ratio = if baseline > 0.0 {
            m.ops_per_sec() / baseline
        } else {
            0.0
        };
        let figure = |us: Option<f64>| us.map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"));
        let cpu = format!(
            "{} / {}",
            figure(m.own_cpu_us_per_op()),
            figure(m.all_cpu_us_per_op())
        );
        let _ = writeln!(
            out,
            "  {:<36} {:>10.0} {:>6.2}x {:>9} {:>9} {:>9} {:>7} {:>17}",
            variant.name,
            m.ops_per_sec(),
            ratio,
            format!("{:.2?}", m.percentile(0.50)),
            format!("{:.2?}", m.percentile(0.99)),
            format!("{:.2?}", m.percentile(0.999)),
            m.errors,
            cpu
        );
        if let Some(settled_in) = m.settled_in() {
            let _ = writeln!(
                out,
                "  {:<36} settled in {settled_in:.2?} a round (median; its CPU counted above)",
                ""
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_median_rounds() {
        let m = Measurement {
            rounds_ops_per_sec: vec![300.0, 100.0, 200.0],
            errors: 0,
            latencies_us: (1..=1000).collect(),
            cpu: Some(CpuTime {
                own: Duration::from_millis(30),
                others: Some(Duration::from_millis(20)),
            }),
            rounds_settled_in: Vec::new(),
        };
        assert_eq!(m.own_cpu_us_per_op(), Some(30.0));
        assert_eq!(m.all_cpu_us_per_op(), Some(50.0));
        // Nothing succeeded: no figure per operation.
        let failed = Measurement {
            latencies_us: Vec::new(),
            ..m.clone()
        };
        assert_eq!(failed.own_cpu_us_per_op(), None);
        assert_eq!(m.ops_per_sec(), 200.0);
        assert_eq!(m.percentile(0.5), Duration::from_micros(501));
        assert_eq!(m.percentile(0.999), Duration::from_micros(999));
        assert_eq!(Measurement::default().percentile(0.99), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_variant_settles_after_each_of_its_rounds_before_the_next_runs() {
        let settled = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = |name: &'static str| {
            let settled = Arc::clone(&settled);
            move |_| {
                settled.lock().unwrap().push(name);
                async { Ok(()) }
            }
        };
        let variants = [
            Variant::new("a", log("a")),
            Variant::new("b", log("b")).settled_by({
                let settled = Arc::clone(&settled);
                move || {
                    settled.lock().unwrap().push("settled");
                    async {}
                }
            }),
        ];
        let settings = Settings {
            duration: Duration::from_millis(20),
            rounds: 2,
        };
        let results = compare(&variants, 1, settings).await;
        let mut order = settled.lock().unwrap().clone();
        order.dedup();
        assert_eq!(order, ["a", "b", "settled", "a", "b", "settled"]);
        assert!(results[0].rounds_settled_in.is_empty());
        assert_eq!(results[1].rounds_settled_in.len(), 2);
        let report = report(&variants, 1, &results);
        assert_eq!(report.matches("settled in").count(), 1, "{report}");
    }

    #[tokio::test]
    async fn compare_measures_every_variant_and_counts_errors() {
        let variants = [
            Variant::new("ok", |_| async { Ok(()) }),
            Variant::new("fails", |_| async { Err("no".to_owned()) }),
        ];
        let settings = Settings {
            duration: Duration::from_millis(20),
            rounds: 2,
        };
        let results = compare(&variants, 2, settings).await;
        assert_eq!(results[0].rounds_ops_per_sec.len(), 2);
        assert!(!results[0].latencies_us.is_empty());
        assert_eq!(results[0].errors, 0);
        assert!(results[1].errors > 0);
        assert!(results[1].latencies_us.is_empty());
        let table = report(&variants, 2, &results);
        assert!(table.contains("1.00x"), "{table}");
        // This process's CPU time is counted where /proc tells it; no
        // other process was observed.
        if cfg!(target_os = "linux") {
            assert!(results[0].own_cpu_us_per_op().is_some());
        }
        assert_eq!(results[0].all_cpu_us_per_op(), None);
    }

    #[tokio::test]
    async fn observed_processes_are_added_and_a_missing_one_left_out() {
        if !cfg!(target_os = "linux") {
            return;
        }
        // This process observed as another: read just after its own
        // time, so at least as much.
        let now = CpuTime::now(&[std::process::id()]).unwrap();
        assert!(now.others.unwrap() >= now.own);
        assert_eq!(CpuTime::now(&[u32::MAX]).unwrap().others, None);

        // A variant spinning for 3 rounds: the same time counted twice,
        // but for what other threads did between two readings.
        let variants = [Variant::new("ok", |_| async { Ok(()) })];
        let settings = Settings {
            duration: Duration::from_millis(100),
            rounds: 3,
        };
        let seen = compare_observing(&variants, 1, settings, &[std::process::id()]).await;
        let cpu = seen[0].cpu.unwrap();
        let (own, other) = (cpu.own, cpu.others.unwrap());
        assert!(
            other.abs_diff(own) <= own / 4 + Duration::from_millis(40),
            "{own:?} {other:?}"
        );
        let missing = compare_observing(&variants, 1, settings, &[u32::MAX]).await;
        assert!(missing[0].own_cpu_us_per_op().is_some());
        assert_eq!(missing[0].all_cpu_us_per_op(), None);
    }

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 \
                    120 0 0 0 250 37 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu_time(stat), Some(Duration::from_millis(2870)));
        assert_eq!(parse_cpu_time("4242 (cut) S 1"), None);
        if cfg!(target_os = "linux") {
            assert!(own_cpu_time().is_some());
        }
    }
}
