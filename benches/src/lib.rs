//! A small closed-loop benchmark harness.
//!
//! Each [`Variant`] is an async operation (one Redis command, a write through
//! the failover client, ...). [`compare`] drives every variant with the same
//! number of concurrent tasks for the same time, repeats the whole set in
//! interleaved rounds so that drift of a shared, noisy machine hits every
//! variant alike, and reports throughput and latency percentiles with each
//! variant's throughput as a ratio to the first one, the baseline.
//! Absolute numbers vary between machines and minutes; the ratios are what a
//! benchmark asserts about.
//!
//! On Linux it also counts the CPU time each variant's rounds took, of
//! this process and of the others named (the Redis servers, say), per
//! operation: unlike throughput, CPU time does not grow when a shared
//! machine's hypervisor takes the cores away (steal), so it compares
//! variants across runs and minutes where throughput cannot.
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

/// A named way of doing the measured operation.
#[derive(Clone)]
pub struct Variant {
    /// Shown in the report.
    pub name: String,
    /// Called with the task's number each time the task runs the operation.
    pub operation: Operation,
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
        }
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
}

/// CPU time used (user and system, every thread), of this process and of
/// the other processes observed together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTime {
    /// This process's.
    pub own: Duration,
    /// The others'.
    pub others: Duration,
}

impl CpuTime {
    /// The CPU time used so far, if `/proc` tells it for every process.
    fn now(others: &[u32]) -> Option<Self> {
        let others = others.iter().map(|pid| cpu_time(&pid.to_string()));
        Some(Self {
            own: cpu_time("self")?,
            others: others.sum::<Option<Duration>>()?,
        })
    }

    /// What was used between `earlier` and `self`, added to `total`.
    fn added_since(self, earlier: Self, total: Self) -> Self {
        Self {
            own: total.own + self.own.saturating_sub(earlier.own),
            others: total.others + self.others.saturating_sub(earlier.others),
        }
    }
}

impl Measurement {
    /// The median of the rounds' throughputs.
    pub fn ops_per_sec(&self) -> f64 {
        let mut rounds = self.rounds_ops_per_sec.clone();
        rounds.sort_by(f64::total_cmp);
        rounds.get(rounds.len() / 2).copied().unwrap_or(0.0)
    }

    /// CPU time per successful operation, in µs: this process's, and
    /// that of this process and the others observed together.
    pub fn cpu_us_per_op(&self) -> Option<(f64, f64)> {
        let (cpu, ops) = (self.cpu?, self.latencies_us.len().max(1) as f64);
        let per_op = |time: Duration| time.as_secs_f64() * 1e6 / ops;
        Some((per_op(cpu.own), per_op(cpu.own + cpu.others)))
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

/// [`compare`], counting also the CPU time of the processes `others`.
pub async fn compare_observing(
    variants: &[Variant],
    tasks: usize,
    settings: Settings,
    others: &[u32],
) -> Vec<Measurement> {
    let first = Measurement {
        cpu: Some(CpuTime::default()),
        ..Measurement::default()
    };
    let mut results = vec![first; variants.len()];
    for _ in 0..settings.rounds {
        for (variant, result) in variants.iter().zip(&mut results) {
            let before = CpuTime::now(others);
            let (ops_per_sec, errors, latencies) =
                run_once(&variant.operation, tasks, settings.duration).await;
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

/// The CPU time (user and system, every thread) process `pid` (or
/// `self`) has used, from `/proc/<pid>/stat`; `None` without one, as on
/// other systems than Linux or once the process is gone.
fn cpu_time(pid: &str) -> Option<Duration> {
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
        "{tasks} tasks\n  {:<36} {:>10} {:>7} {:>9} {:>9} {:>9} {:>7} {:>15}\n",
        "variant", "ops/s", "ratio", "p50", "p99", "p999", "errors", "cpu µs/op"
    );
    for (variant, m) in variants.iter().zip(measurements) {
        let ratio = if baseline > 0.0 {
            m.ops_per_sec() / baseline
        } else {
            0.0
        };
        let cpu = m.cpu_us_per_op().map_or_else(
            || "-".to_owned(),
            |(own, all)| format!("{own:.1} / {all:.1}"),
        );
        let _ = writeln!(
            out,
            "  {:<36} {:>10.0} {:>6.2}x {:>9} {:>9} {:>9} {:>7} {:>15}",
            variant.name,
            m.ops_per_sec(),
            ratio,
            format!("{:.2?}", m.percentile(0.50)),
            format!("{:.2?}", m.percentile(0.99)),
            format!("{:.2?}", m.percentile(0.999)),
            m.errors,
            cpu
        );
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
                others: Duration::from_millis(20),
            }),
        };
        assert_eq!(m.cpu_us_per_op(), Some((30.0, 50.0)));
        assert_eq!(m.ops_per_sec(), 200.0);
        assert_eq!(m.percentile(0.5), Duration::from_micros(501));
        assert_eq!(m.percentile(0.999), Duration::from_micros(999));
        assert_eq!(Measurement::default().percentile(0.99), Duration::ZERO);
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
        // This process's CPU time is counted where /proc tells it.
        if cfg!(target_os = "linux") {
            assert!(results[0].cpu_us_per_op().is_some());
        }
    }

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 \
                    120 0 0 0 250 37 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu_time(stat), Some(Duration::from_millis(2870)));
        assert_eq!(parse_cpu_time("4242 (cut) S 1"), None);
        if cfg!(target_os = "linux") {
            assert!(cpu_time("self").is_some());
        }
    }
}
