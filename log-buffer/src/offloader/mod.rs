//! The offloader: reads the tenants' streams through a consumer group and
//! delivers each tenant's entries to a [`LogSink`] on its own schedule.
//!
//! It reads with `NOACK` and keeps what each read returned as one range
//! in flight, in a hash beside the stream, rather than in the group's
//! pending list: Redis then replicates one `XGROUP SETID` per read, not
//! an `XCLAIM` per entry (several microseconds of every replica's time
//! per entry). The scripts (`ranges.lua` and the one per step) say how.
//!
//! `context` holds what every part shares; `streams` finds the streams and
//! reads (or claims) their ranges; `deliver` pushes one range's entries
//! to the sink, dead-lettering what Loki cannot take, with the records'
//! labels from `labels`, and acknowledges the range.

mod context;
mod deliver;
mod labels;
mod reply;
mod sort;
mod streams;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_failover::{Backoff, ErrorKind, FailoverClient};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::producer::LOKI_MAX_AGE;
use crate::sink::LogSink;
pub use context::TenantMetrics;
use context::{Context, Known, Round, lock};
use deliver::deliver;
use streams::{discover, read};

/// Settings of an [`Offloader`].
#[must_use]
pub struct OffloaderBuilder<S> {
    client: FailoverClient,
    sink: S,
    group: String,
    consumer: String,
    sources: Vec<String>,
    job: String,
    source_jobs: BTreeMap<String, String>,
    label_fields: Vec<String>,
    batch_size: usize,
    source_batch_sizes: BTreeMap<String, usize>,
    poll_interval: Duration,
    discovery_interval: Duration,
    claim_idle: Duration,
    max_deliveries: u64,
    backoff: Backoff,
    tenant_bytes_per_second: u64,
    max_age: Duration,
    dead_letter_max_len: u64,
}

impl<S> std::fmt::Debug for OffloaderBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffloaderBuilder")
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

impl<S: LogSink> OffloaderBuilder<S> {
    /// The consumer group every offloader instance shares. Defaults to
    /// `log-offloader`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// This instance's name in the group (a pod name, say): ranges it
    /// read and did not deliver are read again under the same name after
    /// a restart, or claimed by another instance after
    /// [`claim_idle`](Self::claim_idle). Defaults to a random name.
    pub fn consumer(mut self, consumer: impl Into<String>) -> Self {
        self.consumer = consumer.into();
        self
    }

    /// The streams to offload, by the part after `tenant:{<id>}:`. Defaults
    /// to `logs` (this crate's producer) and `audit` (tenant-kv's audit
    /// records).
    pub fn sources(mut self, suffixes: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.sources = suffixes.into_iter().map(Into::into).collect();
        self
    }

    /// The `job` label of every line whose source has no job of its own
    /// ([`source_job`](Self::source_job)): the application's logs, by
    /// default. Defaults to `log-buffer`.
    pub fn job(mut self, job: impl Into<String>) -> Self {
        self.job = job.into();
        self
    }

    /// The `job` label of the lines from one source (by its suffix, as in
    /// [`sources`](Self::sources)), in place of [`job`](Self::job).
    /// Defaults to `audit_logs` for `audit`, the label audit records had
    /// before this crate shipped them, which Grafana queries select them by.
    pub fn source_job(mut self, source: impl Into<String>, job: impl Into<String>) -> Self {
        self.source_jobs.insert(source.into(), job.into());
        self
    }

    /// Entry fields that become labels when present, beside `job` and
    /// `tenant_id`; keep them few and of few values (Loki indexes every
    /// label set). Defaults to `level` and `action`.
    pub fn label_fields(mut self, fields: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.label_fields = fields.into_iter().map(Into::into).collect();
        self
    }

    /// The most entries read from a stream at once. An entry of the log
    /// buffer packs up to 64 records, so a read may hold many more lines;
    /// they are pushed 1000 at most at a time. Defaults to 100.
    pub fn batch_size(mut self, entries: usize) -> Self {
        self.batch_size = entries;
        self
    }

    /// The most entries read at once from the streams of one source (by
    /// its suffix), in place of [`batch_size`](Self::batch_size): for a
    /// source of one record per entry, which a small batch would ship
    /// slower than it fills (each read and acknowledgement is a round
    /// trip). Defaults to 1000 for `audit`: tenant-kv appends one entry
    /// per write, and at 100 per read an offloader on a busy master
    /// shipped about 7,000 a second, fewer than the writes. (With staged
    /// records an entry holds up to 64: a read after a backlog may hold
    /// up to 64,000 records, pushed 1000 at a time.)
    pub fn source_batch_size(mut self, source: impl Into<String>, entries: usize) -> Self {
        self.source_batch_sizes.insert(source.into(), entries);
        self
    }

    /// How long a stream whose read found nothing new rests before it is
    /// read again (a stream that had entries is read again as soon as
    /// they are delivered). Defaults to 100 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How often to look for new tenants' streams (`SCAN`, which costs in
    /// proportion to the whole keyspace). Defaults to 5 s.
    pub fn discovery_interval(mut self, interval: Duration) -> Self {
        self.discovery_interval = interval;
        self
    }

    /// How long a range of entries read by another consumer stays
    /// undelivered before this one claims it: the other is taken for
    /// dead. A consumer whose pushes are retried keeps its range from
    /// going idle at each retry, so keep this well above the longest push
    /// and the longest [`backoff`](Self::backoff) delay. Until it is
    /// claimed, a range holds the stream's head: entries delivered after
    /// it stay in Redis too. Defaults to 60 s.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// How many deliveries a range of entries may have before it is taken
    /// for poison and dead-lettered whole: every claim counts one, after a
    /// crash or a restart, or of a consumer stuck in one push for longer
    /// than [`claim_idle`](Self::claim_idle). Defaults to 10.
    pub fn max_deliveries(mut self, deliveries: u64) -> Self {
        self.max_deliveries = deliveries;
        self
    }

    /// The backoff of a tenant whose pushes fail and will be retried
    /// (other tenants are not held back), of a stream whose read fails
    /// (the others are read meanwhile), and of starting again a
    /// dispatcher that panicked. Defaults to 500 ms, up to 30 s.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The pace of one tenant's pushes, in bytes of lines per second, so
    /// that a backlog replayed after an outage stays below Loki's
    /// per-tenant ingestion rate (4 MB/s by default). Defaults to 3 MiB/s.
    pub fn tenant_bytes_per_second(mut self, rate: u64) -> Self {
        self.tenant_bytes_per_second = rate;
        self
    }

    /// Entries older than this are dead-lettered without being sent, as
    /// Loki would refuse them. Defaults to 7 days.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// How many entries each dead-letter stream keeps at most (about:
    /// `MAXLEN ~` on every addition); they are also trimmed to
    /// [`max_age`](Self::max_age). Defaults to 10,000.
    pub fn dead_letter_max_len(mut self, entries: u64) -> Self {
        self.dead_letter_max_len = entries;
        self
    }

    /// Validates the settings and starts the offloader on the current
    /// Tokio runtime.
    pub fn start(self) -> Result<Offloader> {
        let zero = |setting: &'static str, is_zero: bool| {
            if is_zero {
                Err(Error::InvalidConfig {
                    setting,
                    reason: "must be more than zero".to_owned(),
                })
            } else {
                Ok(())
            }
        };
        zero("batch_size", self.batch_size == 0)?;
        zero(
            "source_batch_size",
            self.source_batch_sizes.values().any(|&n| n == 0),
        )?;
        zero("poll_interval", self.poll_interval.is_zero())?;
        zero("discovery_interval", self.discovery_interval.is_zero())?;
        zero("claim_idle", self.claim_idle.is_zero())?;
        zero("max_deliveries", self.max_deliveries == 0)?;
        zero("tenant_bytes_per_second", self.tenant_bytes_per_second == 0)?;
        zero("dead_letter_max_len", self.dead_letter_max_len == 0)?;
        zero("sources", self.sources.is_empty())?;
        zero("group", self.group.is_empty())?;
        zero("consumer", self.consumer.is_empty())?;
        let stop = CancellationToken::new();
        let context = Arc::new(Context {
            client: self.client,
            sink: Box::new(self.sink),
            group: self.group,
            consumer: self.consumer,
            sources: self.sources,
            job: self.job,
            source_jobs: self.source_jobs,
            label_fields: self.label_fields,
            batch_size: self.batch_size,
            source_batch_sizes: self.source_batch_sizes,
            poll_interval: self.poll_interval,
            discovery_interval: self.discovery_interval,
            claim_idle: self.claim_idle,
            max_deliveries: self.max_deliveries,
            backoff: self.backoff,
            read_backoff: Backoff::new(self.poll_interval, self.poll_interval * 32)?,
            tenant_bytes_per_second: self.tenant_bytes_per_second,
            max_age: self.max_age,
            dead_letter_max_len: self.dead_letter_max_len,
            metrics: Mutex::new(BTreeMap::new()),
            stopped: stop.clone(),
        });
        let task = tokio::spawn(supervise(context.stopped.clone(), context.backoff, {
            let context = Arc::clone(&context);
            move || dispatch(Arc::clone(&context))
        }));
        Ok(Offloader {
            context,
            stop,
            task,
        })
    }
}

/// A running offloader (see the crate docs). Stops when dropped, leaving
/// what it had not delivered in flight for the group.
#[derive(Debug)]
pub struct Offloader {
    context: Arc<Context>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Offloader {
    /// Settings for an offloader reading through `client` and delivering
    /// to `sink`.
    pub fn builder<S: LogSink>(client: FailoverClient, sink: S) -> OffloaderBuilder<S> {
        OffloaderBuilder {
            client,
            sink,
            group: "log-offloader".to_owned(),
            consumer: format!("offloader-{:016x}", rand::random::<u64>()),
            sources: vec!["logs".to_owned(), "audit".to_owned()],
            job: "log-buffer".to_owned(),
            source_jobs: BTreeMap::from([("audit".to_owned(), "audit_logs".to_owned())]),
            label_fields: vec!["level".to_owned(), "action".to_owned()],
            batch_size: 100,
            source_batch_sizes: BTreeMap::from([("audit".to_owned(), 1000)]),
            poll_interval: Duration::from_millis(100),
            discovery_interval: Duration::from_secs(5),
            claim_idle: Duration::from_secs(60),
            max_deliveries: 10,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
                .expect("valid defaults"),
            tenant_bytes_per_second: 3 * 1024 * 1024,
            max_age: LOKI_MAX_AGE,
            dead_letter_max_len: 10_000,
        }
    }

    /// The counters of every tenant seen, by tenant.
    pub fn metrics(&self) -> BTreeMap<String, TenantMetrics> {
        lock(&self.context.metrics).clone()
    }

    /// Stops reading, lets pushes under way finish until `deadline`, and
    /// returns. Entries not delivered by then stay in flight in Redis, for
    /// this consumer after a restart or for another after `claim_idle`.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(deadline, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for Offloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the dispatcher (`run`) until it returns, starting it again after
/// `backoff` each time it panicked: a bug must not end offloading
/// silently. Its delivery tasks end with it, their ranges left in flight;
/// the new dispatcher claims them first, as this consumer's own.
async fn supervise<F>(stopped: CancellationToken, backoff: Backoff, mut run: impl FnMut() -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut panics = 0;
    loop {
        // Aborted with this task: the dispatcher stops with its owner.
        let mut dispatcher = JoinSet::new();
        dispatcher.spawn(run());
        match dispatcher.join_next().await {
            Some(Err(error)) if error.is_panic() => {
                tracing::error!(target: "log_buffer", %error, "offloader: the dispatcher panicked; starting it again");
            }
            _ => return,
        }
        let wait = backoff.delay(panics);
        panics += 1;
        tokio::select! {
            () = stopped.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Reads the streams and hands each stream's entries to a delivery task,
/// one at a time per stream, until stopped.
async fn dispatch(context: Arc<Context>) {
    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    let (done_sender, mut done) = mpsc::unbounded_channel::<String>();
    let mut last_discovery: Option<Instant> = None;
    let mut failures = 0u32;
    while !context.stopped.is_cancelled() {
        while let Ok(stream) = done.try_recv() {
            release(&mut known, &stream);
        }
        while let Some(ended) = tasks.try_join_next() {
            report_panic(ended);
        }
        let mut round = Round::default();
        if last_discovery.is_none_or(|at| at.elapsed() >= context.discovery_interval) {
            discover(&context, &mut known, &mut round).await;
            // Retried at the next interval even if it failed: a shard
            // down costs each attempt the client's whole retry budget.
            last_discovery = Some(Instant::now());
        }
        read(&context, &mut known, &mut round).await;
        let Round {
            reads: batches,
            error,
        } = round;
        match error {
            None => failures = 0,
            Some(error) => {
                if error.kind() == ErrorKind::NoGroup {
                    // A new master that missed the group's creation, or
                    // a stream deleted by hand: the streams that said so
                    // wait for their group, created again at once.
                    last_discovery = None;
                }
                failures += 1;
                tracing::warn!(target: "log_buffer", %error, "offloader: reading the streams failed");
            }
        }
        let idle = batches.is_empty();
        for read in batches {
            let Some(state) = known.get_mut(&read.stream) else {
                continue;
            };
            state.busy = true;
            let (context, done, tenant) = (
                Arc::clone(&context),
                done_sender.clone(),
                state.tenant.clone(),
            );
            tasks.spawn(async move {
                let _release = Released(Some((done, read.stream.clone())));
                deliver(&context, &tenant, read).await;
            });
        }
        if idle {
            let wait = match failures {
                0 => idle_wait(&known, context.poll_interval, Instant::now()),
                failures => context.read_backoff.delay(failures - 1),
            };
            tokio::select! {
                () = context.stopping() => break,
                () = tokio::time::sleep(wait) => {}
                Some(stream) = done.recv() => release(&mut known, &stream),
            }
        }
    }
    // Pushes under way finish (the caller's deadline bounds this); tasks
    // waiting to retry stop at once, leaving their ranges in flight.
    while let Some(ended) = tasks.join_next().await {
        report_panic(ended);
    }
}

/// How long the dispatcher waits, at `now`, after a round that read
/// nothing: until the first stream that is neither being delivered nor
/// waiting for its group may be read (at once, or once its rest or
/// backoff is over), `poll` at most.
fn idle_wait(known: &BTreeMap<String, Known>, poll: Duration, now: Instant) -> Duration {
    known
        .values()
        .filter_map(|state| state.readable_at(now))
        .map(|at| at - now)
        .fold(poll, Duration::min)
}

/// Logs a delivery task's panic: its stream is released (see
/// [`Released`]), and the bug must not go unseen.
fn report_panic(ended: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(error) = ended
        && error.is_panic()
    {
        tracing::error!(target: "log_buffer", %error, "offloader: a delivery task panicked; its entries will be claimed again");
    }
}

/// Tells the reading loop that a delivery task ended, when dropped: also
/// when it panicked, or its stream would never be read again. Its
/// range left in flight is claimed later, counted as delivered once more.
struct Released(Option<(mpsc::UnboundedSender<String>, String)>);

impl Drop for Released {
    fn drop(&mut self) {
        if let Some((done, stream)) = self.0.take() {
            let _ = done.send(stream);
        }
    }
}

/// Marks `stream` free for reading again: its delivery task ended.
fn release(known: &mut BTreeMap<String, Known>, stream: &str) {
    if let Some(state) = known.get_mut(stream) {
        state.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dispatcher_that_panics_is_started_again() {
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        let counted = Arc::clone(&runs);
        supervise(CancellationToken::new(), backoff, move || {
            let run = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { assert!(run >= 2, "a bug in run {run}") }
        })
        .await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);

        // Told to stop while waiting to start it again: it stays stopped.
        let stopped = CancellationToken::new();
        stopped.cancel();
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        supervise(stopped, backoff, move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { panic!("always") }
        })
        .await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn the_dispatcher_waits_for_the_first_stream_it_may_read() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let poll = ms(100);
        let stream = |rest: u64, retry: Option<u64>, busy: bool| {
            let mut state = Known::new("acme".to_owned());
            state.group_ready = true;
            state.rest_until = Some(now + ms(rest));
            state.retry_at = retry.map(|retry| now + ms(retry));
            state.busy = busy;
            state
        };
        let mut known = BTreeMap::from([
            ("a".to_owned(), stream(30, Some(70), false)),
            ("b".to_owned(), stream(20, None, true)),
            ("c".to_owned(), stream(50, None, false)),
        ]);
        // `b` is being delivered: `c`'s rest ends first.
        assert_eq!(idle_wait(&known, poll, now), ms(50));
        // `a` waits out its backoff, past its rest.
        known.get_mut("c").unwrap().group_ready = false;
        assert_eq!(idle_wait(&known, poll, now), ms(70));
        assert_eq!(idle_wait(&known, poll, now + ms(80)), Duration::ZERO);
        // Never longer than the poll interval.
        assert_eq!(idle_wait(&known, ms(40), now), ms(40));
        // A stream that may be read now: no wait.
        let a = known.get_mut("a").unwrap();
        a.retry_at = None;
        a.took(5, poll, now);
        assert_eq!(idle_wait(&known, poll, now), Duration::ZERO);
        // No stream to read: the poll interval.
        known.get_mut("a").unwrap().busy = true;
        assert_eq!(idle_wait(&known, poll, now), poll);
    }

    #[tokio::test]
    async fn a_delivery_task_that_panics_still_releases_its_stream() {
        let (sender, mut done) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _release = Released(Some((sender, "tenant:{acme}:logs".to_owned())));
            panic!("a bug in a delivery");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(done.recv().await.as_deref(), Some("tenant:{acme}:logs"));
    }
}
