//! The producer: a `tracing` layer feeding a bounded queue, and the task
//! appending the queue to Redis.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis_failover::{FailoverClient, MasterConnection};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing::span;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::error::{Error, Result};
use crate::packed;
use crate::record::{Caps, Fields, Record, check_tenant, log_stream, now_ns};

/// How often a tenant's stream is trimmed while records flow.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// Pipelines sent without waiting for the previous ones' replies: enough
/// to keep Redis busy while a reply is on its way back. They go out in
/// order on the one connection, so each stream keeps the records' order.
const PIPELINES_IN_FLIGHT: usize = 4;
/// After a batch that did not fill up, the append task waits this long
/// before taking the next: records accumulate meanwhile, and callers
/// queueing them find no parked task to wake (a wake-up costs the caller
/// microseconds).
const LINGER: Duration = Duration::from_millis(2);

/// Loki's default `reject_old_samples_max_age`: older lines are refused.
pub(crate) const LOKI_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Settings of a [`LogBuffer`].
#[derive(Debug)]
#[must_use]
pub struct LogBufferBuilder {
    client: FailoverClient,
    default_tenant: String,
    queue_capacity: usize,
    batch_size: usize,
    max_len: u64,
    max_age: Duration,
    caps: Caps,
}

impl LogBufferBuilder {
    /// The tenant of events without a valid `tenant_id` field (theirs or
    /// a span's). Defaults to `system`.
    pub fn default_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.default_tenant = tenant.into();
        self
    }

    /// How many records may wait in memory for the append task; beyond,
    /// new ones are dropped and counted (`queue_full`). Defaults to 65 536.
    pub fn queue_capacity(mut self, records: usize) -> Self {
        self.queue_capacity = records;
        self
    }

    /// The most records appended in one pipeline. Defaults to 512.
    pub fn batch_size(mut self, records: usize) -> Self {
        self.batch_size = records;
        self
    }

    /// How many entries (of up to 64 records each) a tenant's stream keeps
    /// at most (about: trimmed with `MAXLEN ~` once a second while records
    /// flow); the oldest go first, counted (`trimmed`).
    /// Defaults to 1 000 000.
    pub fn max_len(mut self, entries: u64) -> Self {
        self.max_len = entries;
        self
    }

    /// How old an entry may get in the stream before it is trimmed
    /// (`MINID ~`), delivered or not. Defaults to 7 days, the age beyond
    /// which Loki refuses lines by default.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// The largest field value of a record, in bytes; a larger one is cut
    /// when the event is emitted, ending with `…[cut <n> bytes]`. At least
    /// 64. Defaults to 2048, which also keeps any field fit to be a Loki
    /// label.
    pub fn max_field_bytes(mut self, bytes: usize) -> Self {
        self.caps.field = bytes;
        self
    }

    /// The largest record (its values together), in bytes; values past it
    /// are cut the same way. At least 64. Defaults to 32 KiB, so that a
    /// record stays under Loki's line limit (256 KiB) even once every
    /// character of it is escaped in JSON, and no record is dead-lettered
    /// for its size alone.
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.caps.record = bytes;
        self
    }

    /// Validates the settings and starts the append task (on the current
    /// Tokio runtime).
    pub fn start(self) -> Result<LogBuffer> {
        check_tenant("default_tenant", &self.default_tenant)?;
        for (setting, value) in [
            ("queue_capacity", self.queue_capacity as u64),
            ("batch_size", self.batch_size as u64),
            ("max_len", self.max_len),
            ("max_age", u64::from(!self.max_age.is_zero())),
        ] {
            if value == 0 {
                return Err(Error::InvalidConfig {
                    setting,
                    reason: "must be more than zero".to_owned(),
                });
            }
        }
        for (setting, value) in [
            ("max_field_bytes", self.caps.field),
            ("max_record_bytes", self.caps.record),
        ] {
            if value < 64 {
                return Err(Error::InvalidConfig {
                    setting,
                    reason: "must be at least 64".to_owned(),
                });
            }
        }
        let (sender, receiver) = mpsc::channel(self.queue_capacity);
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let settings = AppendSettings {
            default_tenant: self.default_tenant,
            batch_size: self.batch_size,
            max_len: self.max_len,
            max_age: self.max_age,
        };
        let task = tokio::spawn(append(
            self.client,
            receiver,
            stop.clone(),
            Arc::clone(&counters),
            settings,
        ));
        Ok(LogBuffer {
            layer: BufferLayer {
                sender,
                counters: Arc::clone(&counters),
                caps: self.caps,
            },
            counters,
            stop,
            task,
        })
    }
}

/// The producer side: a `tracing` layer ([`layer`](Self::layer)) whose
/// records a background task appends to one Redis stream per tenant.
///
/// Dropping it leaves the task running until every layer is gone; call
/// [`shutdown`](Self::shutdown) to flush before the process exits.
#[derive(Debug)]
pub struct LogBuffer {
    layer: BufferLayer,
    counters: Arc<Counters>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl LogBuffer {
    /// Settings for a buffer writing through `client`.
    pub fn builder(client: FailoverClient) -> LogBufferBuilder {
        LogBufferBuilder {
            client,
            default_tenant: "system".to_owned(),
            queue_capacity: 65_536,
            batch_size: 512,
            max_len: 1_000_000,
            max_age: LOKI_MAX_AGE,
            caps: Caps {
                field: 2048,
                record: 32 * 1024,
            },
        }
    }

    /// The layer to add to a `tracing_subscriber` registry.
    pub fn layer(&self) -> BufferLayer {
        self.layer.clone()
    }

    /// The producer's counters now.
    pub fn metrics(&self) -> ProducerMetrics {
        self.counters.snapshot()
    }

    /// Stops taking records (later ones are dropped as `closed`), appends
    /// those queued, and returns once done or after `deadline`, whichever
    /// comes first; records still queued then are dropped as `shutdown`.
    pub async fn shutdown(mut self, deadline: Duration) -> ProducerMetrics {
        self.stop.cancel();
        if tokio::time::timeout(deadline, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = (&mut self.task).await;
            let counters = &self.counters;
            let settled = counters.appended.load(Ordering::Relaxed)
                + counters.redis_failed.load(Ordering::Relaxed);
            let left = counters
                .queued
                .load(Ordering::Relaxed)
                .saturating_sub(settled);
            counters.shutdown.fetch_add(left, Ordering::Relaxed);
            tracing::warn!(
                target: "log_buffer",
                ?deadline,
                "log buffer: shutdown deadline passed with records still queued"
            );
        }
        self.counters.snapshot()
    }
}

/// A `tracing_subscriber` layer that queues every event as a record (see
/// the crate docs). Cheap to clone.
#[derive(Clone, Debug)]
pub struct BufferLayer {
    sender: mpsc::Sender<Record>,
    counters: Arc<Counters>,
    caps: Caps,
}

/// Fields recorded on a span, kept in its extensions for its events.
struct SpanFields(Fields);

impl<S> tracing_subscriber::Layer<S> for BufferLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = Fields::with_capacity(4, 64, self.caps);
        attrs.record(&mut Visitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            let mut recorded = Fields::with_capacity(2, 64, self.caps);
            values.record(&mut Visitor(&mut recorded));
            // Rare: rebuilt, so that a field recorded again has one value.
            let mut merged = Fields::with_capacity(fields.len() + recorded.len(), 64, self.caps);
            for (name, value) in fields.iter() {
                if !recorded.iter().any(|(n, _)| n == name) {
                    merged.push_str(name, value);
                }
            }
            merged.extend_from(&recorded);
            *fields = merged;
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let metadata = event.metadata();
        // This crate's own complaints would feed on themselves.
        if metadata.target().starts_with("log_buffer") {
            return;
        }
        let ts = now_ns();
        let mut fields = Fields::with_capacity(8, 128, self.caps);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(span_fields)) = span.extensions().get::<SpanFields>() {
                    fields.extend_from(span_fields);
                }
            }
        }
        // The event's own fields come last, after its spans'.
        event.record(&mut Visitor(&mut fields));
        let record = Record {
            ts,
            level: level_name(metadata.level()),
            target: metadata.target(),
            fields,
        };
        match self.sender.try_send(record) {
            Ok(()) => self.counters.queued.fetch_add(1, Ordering::Relaxed),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.queue_full.fetch_add(1, Ordering::Relaxed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.counters.closed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

fn level_name(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
    }
}

/// Collects an event's or span's fields as text.
struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push_str(field.name(), value);
    }

    // Integers and booleans are written as `Debug` would write them, but
    // without `core::fmt`'s machinery: every access-log and audit record
    // carries a few.
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0
            .push_str(field.name(), itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0
            .push_str(field.name(), itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0
            .push_str(field.name(), if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push_debug(field.name(), value);
    }
}

/// The producer's counters.
#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    appended: AtomicU64,
    queue_full: AtomicU64,
    closed: AtomicU64,
    redis_failed: AtomicU64,
    trimmed: AtomicU64,
    shutdown: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ProducerMetrics {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProducerMetrics {
            queued: get(&self.queued),
            appended: get(&self.appended),
            dropped_queue_full: get(&self.queue_full),
            dropped_closed: get(&self.closed),
            dropped_redis_failed: get(&self.redis_failed),
            trimmed: get(&self.trimmed),
            dropped_shutdown: get(&self.shutdown),
        }
    }
}

/// The producer's counters at one moment. Every record emitted is counted
/// once as queued or dropped (`queue_full`, `closed`), and every queued
/// one once as appended or dropped (`redis_failed`, `shutdown`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProducerMetrics {
    /// Records taken into the queue.
    pub queued: u64,
    /// Records appended to Redis.
    pub appended: u64,
    /// Records dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Records dropped because the buffer was shut down.
    pub dropped_closed: u64,
    /// Records dropped because Redis could not take them within the
    /// failover client's retry budget.
    pub dropped_redis_failed: u64,
    /// Stream entries (of up to 64 records each) trimmed before delivery
    /// (`max_len`, `max_age`).
    pub trimmed: u64,
    /// Records still queued when the shutdown deadline passed.
    pub dropped_shutdown: u64,
}

/// What the append task needs from the builder.
struct AppendSettings {
    default_tenant: String,
    batch_size: usize,
    max_len: u64,
    max_age: Duration,
}

/// Appends queued records in pipelined batches until stopped and drained.
async fn append(
    client: FailoverClient,
    mut receiver: mpsc::Receiver<Record>,
    stopped: CancellationToken,
    counters: Arc<Counters>,
    settings: AppendSettings,
) {
    let AppendSettings {
        default_tenant,
        batch_size,
        max_len,
        max_age,
    } = settings;
    // Appends are idempotent enough: a record appended twice after an
    // unknown outcome reaches Loki twice with the same timestamp and line,
    // which Loki drops as a duplicate.
    let connection = client.idempotent_connection();
    let mut batch = Vec::with_capacity(batch_size);
    let mut last_trim: HashMap<String, Instant> = HashMap::new();
    let mut in_flight = FuturesUnordered::new();
    let mut linger = false;
    loop {
        if std::mem::take(&mut linger) && !stopped.is_cancelled() {
            tokio::time::sleep(LINGER).await;
        }
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
            received = receiver.recv_many(&mut batch, batch_size),
                if in_flight.len() < PIPELINES_IN_FLIGHT =>
            {
                if received == 0 {
                    break;
                }
                linger = received < batch_size;
            }
            // Until shut down (a dropped handle never is), this runs
            // until every layer is gone.
            () = stopped.cancelled(), if !receiver.is_closed() => {
                receiver.close();
                continue;
            }
        }
        let pipelines = appends(
            &batch,
            &default_tenant,
            &mut last_trim,
            (max_len, max_age),
            client.is_cluster(),
        );
        batch.clear();
        for (pipeline, count) in pipelines {
            in_flight.push(send(
                pipeline,
                connection.clone(),
                Arc::clone(&counters),
                count,
            ));
        }
    }
    while in_flight.next().await.is_some() {}
}

/// The pipelines appending `batch` to its tenants' streams, packed (each
/// tenant's records in order, [`packed::MAX_RECORDS`] to an entry at
/// most), and trimming each stream (by length and by age) at most once a
/// `TRIM_INTERVAL`, as `last_trim` keeps count; each with how many
/// records it carries. One pipeline, or with `per_tenant` (a cluster, where
/// a pipeline keeps to one slot: one tenant's) one per tenant.
fn appends(
    batch: &[Record],
    default_tenant: &str,
    last_trim: &mut HashMap<String, Instant>,
    trim: (u64, Duration),
    per_tenant: bool,
) -> Vec<(redis::Pipeline, u64)> {
    let (max_len, max_age) = trim;
    let mut records: Vec<(&str, &Record)> = batch
        .iter()
        .map(|record| (record.tenant(default_tenant), record))
        .collect();
    // A stable sort: each tenant's records keep their order.
    records.sort_by_key(|(tenant, _)| *tenant);
    let max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    let min_id = (now_ns() / 1_000_000).saturating_sub(max_age_ms);
    let mut pipelines = vec![(redis::pipe(), 0)];
    for tenant_records in records.chunk_by(|a, b| a.0 == b.0) {
        let tenant = tenant_records[0].0;
        if per_tenant && pipelines[pipelines.len() - 1].1 > 0 {
            pipelines.push((redis::pipe(), 0));
        }
        let (pipeline, count) = pipelines.last_mut().expect("never empty");
        *count += tenant_records.len() as u64;
        let stream = log_stream(tenant);
        let (mut lines, mut packed) = (Vec::new(), 0);
        for (index, (_, record)) in tenant_records.iter().enumerate() {
            packed::encode(record, &mut lines);
            packed += 1;
            let tenant_ends = index + 1 == tenant_records.len();
            if tenant_ends || packed == packed::MAX_RECORDS || lines.len() >= packed::MAX_BYTES {
                pipeline
                    .cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg(packed::RECORDS_FIELD)
                    .arg(&lines)
                    .ignore();
                lines.clear();
                packed = 0;
            }
        }
        // Trimming costs Redis more than appending: once a second per tenant.
        let due = last_trim
            .get(tenant)
            .is_none_or(|at: &Instant| at.elapsed() >= TRIM_INTERVAL);
        if due {
            last_trim.insert(tenant.to_owned(), Instant::now());
            pipeline
                .cmd("XTRIM")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(max_len);
            pipeline
                .cmd("XTRIM")
                .arg(&stream)
                .arg("MINID")
                .arg("~")
                .arg(min_id);
        }
    }
    pipelines
}

/// Sends one batch's pipeline, counting its `count` records as appended
/// or dropped.
async fn send(
    pipeline: redis::Pipeline,
    mut connection: MasterConnection,
    counters: Arc<Counters>,
    count: u64,
) {
    match pipeline.query_async::<Vec<u64>>(&mut connection).await {
        Ok(trimmed) => {
            counters.appended.fetch_add(count, Ordering::Relaxed);
            counters
                .trimmed
                .fetch_add(trimmed.iter().sum(), Ordering::Relaxed);
        }
        Err(error) => {
            counters.redis_failed.fetch_add(count, Ordering::Relaxed);
            tracing::warn!(
                target: "log_buffer",
                %error,
                records = count,
                "log buffer: records dropped, Redis did not take them"
            );
        }
    }
}
