//! The offloader: reads the tenants' streams through a consumer group and
//! delivers each tenant's entries to a [`LogSink`] on its own schedule.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::{FromRedisValue, Value};
use redis_failover::{Backoff, ErrorKind, FailoverClient};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::producer::LOKI_MAX_AGE;
use crate::record::{dead_letter_stream, now_ns, streams_pattern, tenant_of_stream};
use crate::sink::{Entry, LogSink, Push, PushError, Stream};

/// Loki's default `max_line_size`.
const LOKI_MAX_LINE: usize = 256 * 1024;
/// Loki's default `creation_grace_period`: newer lines are refused.
const LOKI_MAX_FUTURE: Duration = Duration::from_secs(10 * 60);
/// Loki's default longest label value.
const LOKI_MAX_LABEL_VALUE: usize = 2048;

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

    /// This instance's name in the group (a pod name, say): entries it
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

    /// The most entries read from a stream, and pushed, at once.
    /// Defaults to 1000.
    pub fn batch_size(mut self, entries: usize) -> Self {
        self.batch_size = entries;
        self
    }

    /// How long to wait before reading again when every stream was empty.
    /// Defaults to 100 ms.
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

    /// How long an entry read by another consumer stays undelivered before
    /// this one claims it (`XAUTOCLAIM`): the other is taken for dead.
    /// Keep it well above the longest push. Defaults to 60 s.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// How many deliveries an entry may have (reads by crashed consumers
    /// count) before it is taken for poison and dead-lettered. Defaults to 10.
    pub fn max_deliveries(mut self, deliveries: u64) -> Self {
        self.max_deliveries = deliveries;
        self
    }

    /// The backoff of a tenant whose pushes fail and will be retried
    /// (other tenants are not held back), and of reading the streams while
    /// Redis fails. Defaults to 500 ms, up to 30 s.
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
        let task = tokio::spawn(dispatch(Arc::clone(&context)));
        Ok(Offloader {
            context,
            stop,
            task,
        })
    }
}

/// A running offloader (see the crate docs). Stops when dropped, leaving
/// what it had not delivered pending for the group.
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
            batch_size: 1000,
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
    /// returns. Entries not delivered by then stay pending in Redis, for
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

/// One tenant's counters and gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantMetrics {
    /// Lines the sink accepted.
    pub sent_lines: u64,
    /// Bytes of those lines.
    pub sent_bytes: u64,
    /// Pushes that failed and were retried.
    pub retried_pushes: u64,
    /// Entries moved to the dead-letter stream, by reason (`too_old`,
    /// `too_far_in_future`, `line_too_long`, `bad_timestamp`, `bad_label`,
    /// `rejected`, `too_large`, `poison`).
    pub dead_lettered: BTreeMap<&'static str, u64>,
    /// Accepted pushes, and their total latency.
    pub pushes: u64,
    /// Total time of the accepted pushes.
    pub push_latency: Duration,
    /// Entries in the tenant's streams (not yet delivered), at the last
    /// discovery.
    pub depth: u64,
    /// Age of the oldest of them, at the last discovery.
    pub oldest_age: Option<Duration>,
    /// Entries in the tenant's dead-letter streams, at the last discovery.
    pub dead_letter_depth: u64,
}

struct Context {
    client: FailoverClient,
    sink: Box<dyn LogSink>,
    group: String,
    consumer: String,
    sources: Vec<String>,
    job: String,
    /// Jobs of the sources that do not use `job`, by suffix.
    source_jobs: BTreeMap<String, String>,
    label_fields: Vec<String>,
    batch_size: usize,
    poll_interval: Duration,
    discovery_interval: Duration,
    claim_idle: Duration,
    max_deliveries: u64,
    backoff: Backoff,
    /// Between reads while Redis fails: from the poll interval, up to 32 of them.
    read_backoff: Backoff,
    tenant_bytes_per_second: u64,
    max_age: Duration,
    dead_letter_max_len: u64,
    metrics: Mutex<BTreeMap<String, TenantMetrics>>,
    stopped: CancellationToken,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offloader")
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Context {
    fn tenant_metrics(&self, tenant: &str, update: impl FnOnce(&mut TenantMetrics)) {
        update(lock(&self.metrics).entry(tenant.to_owned()).or_default());
    }

    /// Resolves when the offloader is told to stop.
    async fn stopping(&self) {
        self.stopped.cancelled().await;
    }
}

/// What the dispatcher knows of one stream.
struct Known {
    tenant: String,
    /// Whether the consumer group is known to exist on the stream.
    group_ready: bool,
    /// Whether this consumer's own pending entries were read (they are
    /// read first, from id 0, after a restart under the same name).
    own_pending_read: bool,
    /// Whether a delivery task owns the stream's entries now.
    busy: bool,
    last_claim: Instant,
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
        while tasks.try_join_next().is_some() {}
        let round = async {
            if last_discovery.is_none_or(|at| at.elapsed() >= context.discovery_interval) {
                discover(&context, &mut known).await?;
                last_discovery = Some(Instant::now());
            }
            read(&context, &mut known).await
        };
        let batches = match round.await {
            Ok(batches) => {
                failures = 0;
                batches
            }
            Err(error) => {
                if error.kind() == ErrorKind::NoGroup {
                    // A new master that missed the group's creation, or
                    // a stream deleted by hand: create the groups again.
                    last_discovery = None;
                    for state in known.values_mut() {
                        state.group_ready = false;
                    }
                }
                failures += 1;
                tracing::warn!(target: "log_buffer", %error, "offloader: reading the streams failed");
                Vec::new()
            }
        };
        let idle = batches.is_empty();
        for (stream, entries) in batches {
            let Some(state) = known.get_mut(&stream) else {
                continue;
            };
            state.busy = true;
            let (context, done, tenant) = (
                Arc::clone(&context),
                done_sender.clone(),
                state.tenant.clone(),
            );
            tasks.spawn(async move {
                deliver(&context, &stream, &tenant, entries).await;
                let _ = done.send(stream);
            });
        }
        if idle {
            let wait = match failures {
                0 => context.poll_interval,
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
    // waiting to retry stop at once, leaving their entries pending.
    while tasks.join_next().await.is_some() {}
}

/// Marks `stream` free for reading again: its delivery task ended.
fn release(known: &mut BTreeMap<String, Known>, stream: &str) {
    if let Some(state) = known.get_mut(stream) {
        state.busy = false;
    }
}

/// One tenant's gauges, summed over its streams.
#[derive(Default)]
struct Gauges {
    depth: u64,
    oldest: Option<Duration>,
    dead_letters: u64,
}

/// Finds the tenants' streams, creates the group on new ones, and
/// refreshes the depth, age and dead-letter gauges.
async fn discover(
    context: &Context,
    known: &mut BTreeMap<String, Known>,
) -> std::result::Result<(), redis_failover::Error> {
    let mut found = Vec::new();
    for suffix in &context.sources {
        let pattern = streams_pattern(suffix);
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = context
                .client
                .query_idempotent(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .arg("TYPE")
                        .arg("stream"),
                )
                .await?;
            for key in keys {
                if let Some(tenant) = tenant_of_stream(&key, suffix) {
                    found.push((key, tenant));
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    for (stream, tenant) in &found {
        let state = known.entry(stream.clone()).or_insert_with(|| Known {
            tenant: tenant.clone(),
            group_ready: false,
            own_pending_read: false,
            busy: false,
            last_claim: Instant::now(),
        });
        if !state.group_ready {
            let created: std::result::Result<(), _> = context
                .client
                .query_idempotent(
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(stream)
                        .arg(&context.group)
                        .arg("0"),
                )
                .await;
            match created {
                Err(error) if error.kind() == ErrorKind::GroupExists => {}
                other => other?,
            }
            state.group_ready = true;
        }
    }
    let mut gauges = redis::pipe();
    for (stream, _) in &found {
        gauges.cmd("XLEN").arg(stream);
        gauges
            .cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        gauges.cmd("XLEN").arg(dead_letter_stream(stream));
    }
    let replies: Vec<Value> = context.client.read_pipeline(&gauges).await?;
    let mut depths: HashMap<&str, Gauges> = HashMap::new();
    for ((_, tenant), replies) in found.iter().zip(replies.chunks(3)) {
        let count = |reply: &Value| u64::from_redis_value(reply.clone()).unwrap_or(0);
        let oldest = StreamRangeReply::from_redis_value(replies[1].clone())
            .ok()
            .and_then(|first| first.ids.into_iter().next())
            .and_then(|entry| entry.id.split('-').next()?.parse::<u64>().ok())
            .map(|ms| Duration::from_millis((now_ns() / 1_000_000).saturating_sub(ms)));
        let gauges = depths.entry(tenant).or_default();
        gauges.depth += count(&replies[0]);
        gauges.oldest = gauges.oldest.max(oldest);
        gauges.dead_letters += count(&replies[2]);
    }
    for (tenant, gauges) in depths {
        context.tenant_metrics(tenant, |m| {
            m.depth = gauges.depth;
            m.oldest_age = gauges.oldest;
            m.dead_letter_depth = gauges.dead_letters;
        });
    }
    Ok(())
}

/// Reads the next entries of every stream no task owns: this consumer's
/// own pending entries first, entries idle too long under another
/// consumer from time to time, new ones otherwise.
async fn read(
    context: &Context,
    known: &mut BTreeMap<String, Known>,
) -> std::result::Result<Vec<(String, Vec<StreamId>)>, redis_failover::Error> {
    let mut batches = Vec::new();
    let mut fresh = Vec::new();
    for (stream, state) in known.iter_mut().filter(|(_, s)| !s.busy) {
        if !state.own_pending_read {
            let reply: Option<StreamReadReply> = context
                .client
                .query(
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(&context.group)
                        .arg(&context.consumer)
                        .arg("COUNT")
                        .arg(context.batch_size)
                        .arg("STREAMS")
                        .arg(stream)
                        .arg("0"),
                )
                .await?;
            let entries = entries_of(reply);
            if entries.is_empty() {
                state.own_pending_read = true;
            } else {
                batches.push((stream.clone(), entries));
            }
        } else if state.last_claim.elapsed() >= context.claim_idle / 2 {
            state.last_claim = Instant::now();
            let claimed = claim(context, stream, &state.tenant).await?;
            if claimed.is_empty() {
                fresh.push(stream.clone());
            } else {
                batches.push((stream.clone(), claimed));
            }
        } else {
            fresh.push(stream.clone());
        }
    }
    if !fresh.is_empty() {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&context.group)
            .arg(&context.consumer)
            .arg("COUNT")
            .arg(context.batch_size)
            .arg("STREAMS")
            .arg(&fresh);
        for _ in &fresh {
            command.arg(">");
        }
        // Not idempotent: a lost reply leaves entries pending under this
        // consumer, read again after a restart or claimed by another.
        let reply: Option<StreamReadReply> = context.client.query(&command).await?;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            if !key.ids.is_empty() {
                batches.push((key.key, key.ids));
            }
        }
    }
    Ok(batches)
}

fn entries_of(reply: Option<StreamReadReply>) -> Vec<StreamId> {
    reply
        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
        .unwrap_or_default()
}

/// Claims entries another consumer left undelivered for `claim_idle`, and
/// dead-letters those delivered too often (poison).
async fn claim(
    context: &Context,
    stream: &str,
    tenant: &str,
) -> std::result::Result<Vec<StreamId>, redis_failover::Error> {
    let idle_ms = u64::try_from(context.claim_idle.as_millis()).unwrap_or(u64::MAX);
    let reply: StreamAutoClaimReply = context
        .client
        .query(
            redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(&context.group)
                .arg(&context.consumer)
                .arg(idle_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(context.batch_size),
        )
        .await?;
    let claimed = reply.claimed;
    let (Some(first), Some(last)) = (claimed.first(), claimed.last()) else {
        return Ok(claimed);
    };
    // [id, consumer, idle ms, deliveries] for each claimed entry.
    let pending: Vec<(String, String, u64, u64)> = context
        .client
        .query_idempotent(
            redis::cmd("XPENDING")
                .arg(stream)
                .arg(&context.group)
                .arg(&first.id)
                .arg(&last.id)
                .arg(claimed.len())
                .arg(&context.consumer),
        )
        .await?;
    let deliveries: HashMap<String, u64> = pending
        .into_iter()
        .map(|(id, _, _, count)| (id, count))
        .collect();
    tracing::info!(
        target: "log_buffer",
        stream,
        entries = claimed.len(),
        "offloader: claimed entries another consumer left undelivered"
    );
    let (poison, claimed): (Vec<_>, Vec<_>) = claimed.into_iter().partition(|entry| {
        deliveries.get(&entry.id).copied().unwrap_or(0) > context.max_deliveries
    });
    if !poison.is_empty() {
        let rejected: Vec<_> = poison
            .into_iter()
            .map(|entry| (entry, "poison", "delivered too many times".to_owned()))
            .collect();
        dead_letter(context, stream, tenant, rejected).await;
    }
    Ok(claimed)
}

/// An entry ready to push, with its id.
struct Ready {
    /// The entry as stored, for the dead-letter stream if the sink refuses it.
    stored: StreamId,
    labels: BTreeMap<String, String>,
    entry: Entry,
}

/// Delivers one stream's entries: invalid ones to the dead-letter stream
/// at once, the rest to the sink, retried with the tenant's backoff until
/// accepted or the offloader stops.
async fn deliver(context: &Context, stream: &str, tenant: &str, entries: Vec<StreamId>) {
    let now = now_ns();
    let oldest = now.saturating_sub(u64::try_from(context.max_age.as_nanos()).unwrap_or(u64::MAX));
    let newest = now + LOKI_MAX_FUTURE.as_nanos() as u64;
    let job = job_of(context, stream);
    let mut ready = Vec::with_capacity(entries.len());
    let mut invalid = Vec::new();
    for entry in entries {
        match prepare(context, job, tenant, &entry, oldest, newest) {
            Ok((labels, line)) => ready.push(Ready {
                stored: entry,
                labels,
                entry: line,
            }),
            Err((reason, detail)) => invalid.push((entry, reason, detail)),
        }
    }
    if !invalid.is_empty() {
        dead_letter(context, stream, tenant, invalid).await;
    }
    ready.sort_by_key(|r| r.entry.ts_ns);
    let mut queue = vec![ready];
    let mut attempt = 0u32;
    while let Some(batch) = queue.pop() {
        if batch.is_empty() {
            continue;
        }
        let push = to_push(tenant, &batch);
        let started = Instant::now();
        match context.sink.push(&push).await {
            Ok(()) => {
                attempt = 0;
                let bytes: u64 = batch.iter().map(|r| r.entry.line.len() as u64).sum();
                context.tenant_metrics(tenant, |m| {
                    m.sent_lines += batch.len() as u64;
                    m.sent_bytes += bytes;
                    m.pushes += 1;
                    m.push_latency += started.elapsed();
                });
                acknowledge(context, stream, batch.iter().map(|r| r.stored.id.as_str())).await;
                // Pace the tenant: a replayed backlog must not trip Loki's rate limit.
                let pace =
                    Duration::from_secs_f64(bytes as f64 / context.tenant_bytes_per_second as f64);
                if pace > started.elapsed() {
                    tokio::time::sleep(pace - started.elapsed()).await;
                }
            }
            Err(PushError::Retry { reason }) => {
                context.tenant_metrics(tenant, |m| m.retried_pushes += 1);
                let wait = context.backoff.delay(attempt);
                attempt += 1;
                tracing::warn!(
                    target: "log_buffer",
                    tenant,
                    %reason,
                    retry_in = ?wait,
                    "offloader: push failed, retrying"
                );
                queue.push(batch);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    // Entries stay pending, for a restart or another consumer.
                    () = context.stopping() => return,
                }
            }
            // 413: too large. 400: Loki stored the valid entries and refused
            // the others; halves narrow the refusal down to the entries at
            // fault, and the valid ones sent again are duplicates Loki drops.
            Err(PushError::TooLarge | PushError::Rejected { status: 400, .. })
                if batch.len() > 1 =>
            {
                let mut first = batch;
                let second = first.split_off(first.len() / 2);
                queue.push(second);
                queue.push(first);
            }
            Err(error) => {
                let (reason, detail) = match &error {
                    PushError::TooLarge => ("too_large", error.to_string()),
                    _ => ("rejected", error.to_string()),
                };
                let rejected = batch
                    .into_iter()
                    .map(|r| (r.stored, reason, detail.clone()))
                    .collect();
                dead_letter(context, stream, tenant, rejected).await;
            }
        }
        if context.stopped.is_cancelled() && !queue.is_empty() {
            return;
        }
    }
}

type Labels = BTreeMap<String, String>;
/// Why an entry cannot go to Loki: the reason's name and the detail.
type Invalid = (&'static str, String);

/// The `job` label of a stream's lines: its source's own, or the default.
fn job_of<'a>(context: &'a Context, stream: &str) -> &'a str {
    context
        .source_jobs
        .iter()
        .find(|(source, _)| tenant_of_stream(stream, source).is_some())
        .map_or(&context.job, |(_, job)| job)
}

/// Labels and line of an entry, or why it cannot go to Loki.
fn prepare(
    context: &Context,
    job: &str,
    tenant: &str,
    entry: &StreamId,
    oldest: u64,
    newest: u64,
) -> std::result::Result<(Labels, Entry), Invalid> {
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &entry.map {
        let text = String::from_redis_value(value.clone()).unwrap_or_default();
        fields.insert(name.clone(), text);
    }
    let ts_ns = fields
        .remove("ts")
        .and_then(|ts| ts.parse::<u64>().ok())
        .ok_or(("bad_timestamp", "no `ts` field of nanoseconds".to_owned()))?;
    if ts_ns < oldest {
        return Err(("too_old", format!("older than {:?}", context.max_age)));
    }
    if ts_ns > newest {
        return Err((
            "too_far_in_future",
            format!("more than {LOKI_MAX_FUTURE:?} ahead"),
        ));
    }
    let mut labels = BTreeMap::new();
    labels.insert("job".to_owned(), job.to_owned());
    labels.insert("tenant_id".to_owned(), tenant.to_owned());
    for name in &context.label_fields {
        if let Some(value) = fields.get(name) {
            if value.is_empty() || value.len() > LOKI_MAX_LABEL_VALUE {
                return Err(("bad_label", format!("label {name:?} is empty or too long")));
            }
            labels.insert(name.clone(), value.clone());
        }
    }
    let line = serde_json::to_string(&fields).expect("strings serialize");
    if line.len() > LOKI_MAX_LINE {
        return Err(("line_too_long", format!("{} bytes", line.len())));
    }
    Ok((labels, Entry { ts_ns, line }))
}

fn to_push(tenant: &str, batch: &[Ready]) -> Push {
    let mut streams: BTreeMap<&BTreeMap<String, String>, Vec<Entry>> = BTreeMap::new();
    for ready in batch {
        streams
            .entry(&ready.labels)
            .or_default()
            .push(ready.entry.clone());
    }
    Push {
        tenant: tenant.to_owned(),
        streams: streams
            .into_iter()
            .map(|(labels, entries)| Stream {
                labels: labels.clone(),
                entries,
            })
            .collect(),
    }
}

/// `XACK` and `XDEL` in one transaction: delivered entries leave the
/// stream. If this fails, they are delivered again later, which Loki
/// deduplicates. Apart, a replica promoted between the two would keep
/// entries acknowledged but not deleted, which no consumer reads again.
async fn acknowledge<'a>(context: &Context, stream: &str, ids: impl Iterator<Item = &'a str>) {
    let ids: Vec<&str> = ids.collect();
    let mut pipeline = redis::pipe();
    pipeline
        .atomic()
        .cmd("XACK")
        .arg(stream)
        .arg(&context.group)
        .arg(&ids)
        .ignore()
        .cmd("XDEL")
        .arg(stream)
        .arg(&ids)
        .ignore();
    if let Err(error) = context.client.query_pipeline::<()>(&pipeline).await {
        tracing::warn!(target: "log_buffer", %error, stream, "offloader: acknowledging failed; the entries will be delivered again");
    }
}

/// Moves entries to the stream's dead-letter stream with the reason and
/// acknowledges them, in one transaction; the dead-letter stream is
/// trimmed to its length cap and to the entries' age limit on the way.
async fn dead_letter(
    context: &Context,
    stream: &str,
    tenant: &str,
    entries: Vec<(StreamId, &'static str, String)>,
) {
    let target = dead_letter_stream(stream);
    let mut pipeline = redis::pipe();
    pipeline.atomic();
    let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut ids = Vec::with_capacity(entries.len());
    for (entry, reason, detail) in &entries {
        pipeline
            .cmd("XADD")
            .arg(&target)
            .arg("MAXLEN")
            .arg("~")
            .arg(context.dead_letter_max_len)
            .arg("*");
        let mut fields: Vec<(&String, &Value)> = entry.map.iter().collect();
        fields.sort_by_key(|(name, _)| *name);
        for (name, value) in fields {
            pipeline
                .arg(name)
                .arg(String::from_redis_value(value.clone()).unwrap_or_default());
        }
        pipeline
            .arg("dead_letter_reason")
            .arg(*reason)
            .arg("dead_letter_detail")
            .arg(detail)
            .arg("dead_letter_id")
            .arg(&entry.id)
            .ignore();
        *reasons.entry(*reason).or_default() += 1;
        ids.push(entry.id.as_str());
    }
    let max_age_ms = u64::try_from(context.max_age.as_millis()).unwrap_or(u64::MAX);
    pipeline
        .cmd("XTRIM")
        .arg(&target)
        .arg("MINID")
        .arg("~")
        .arg((now_ns() / 1_000_000).saturating_sub(max_age_ms))
        .ignore()
        .cmd("XACK")
        .arg(stream)
        .arg(&context.group)
        .arg(&ids)
        .ignore()
        .cmd("XDEL")
        .arg(stream)
        .arg(&ids)
        .ignore();
    match context.client.query_pipeline::<()>(&pipeline).await {
        Ok(()) => {
            tracing::warn!(target: "log_buffer", tenant, stream, entries = ids.len(), ?reasons, "offloader: entries dead-lettered");
            context.tenant_metrics(tenant, |m| {
                for (reason, count) in reasons {
                    *m.dead_lettered.entry(reason).or_default() += count;
                }
            });
        }
        Err(error) => {
            tracing::warn!(target: "log_buffer", %error, stream, "offloader: dead-lettering failed; the entries stay pending");
        }
    }
}
