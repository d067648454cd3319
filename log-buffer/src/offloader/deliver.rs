//! Delivering one stream's entries to the sink: checked against Loki's
//! limits, pushed with the tenant's backoff and pace, acknowledged once
//! accepted, dead-lettered when they cannot be.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis::streams::StreamId;
use redis::{FromRedisValue, Value};

use super::context::Context;
use crate::record::{dead_letter_stream, now_ns, tenant_of_stream};
use crate::sink::{Entry, Push, PushError, Stream};

/// Loki's default `max_line_size`.
const LOKI_MAX_LINE: usize = 256 * 1024;
/// Loki's default `creation_grace_period`: newer lines are refused.
const LOKI_MAX_FUTURE: Duration = Duration::from_secs(10 * 60);
/// Loki's default longest label value.
const LOKI_MAX_LABEL_VALUE: usize = 2048;

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
pub(super) async fn deliver(context: &Context, stream: &str, tenant: &str, entries: Vec<StreamId>) {
    let ready = sort_out(context, stream, tenant, entries).await;
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
                delivered(context, stream, tenant, &batch, started).await;
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

/// `entries` ready to push, oldest first; those Loki would refuse go to
/// the dead-letter stream at once.
async fn sort_out(
    context: &Context,
    stream: &str,
    tenant: &str,
    entries: Vec<StreamId>,
) -> Vec<Ready> {
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
    ready
}

/// After the sink accepted `batch` (pushed at `started`): the figures, the
/// entries acknowledged, and the tenant paced.
async fn delivered(
    context: &Context,
    stream: &str,
    tenant: &str,
    batch: &[Ready],
    started: Instant,
) {
    let bytes: u64 = batch.iter().map(|r| r.entry.line.len() as u64).sum();
    context.tenant_metrics(tenant, |m| {
        m.sent_lines += batch.len() as u64;
        m.sent_bytes += bytes;
        m.pushes += 1;
        m.push_latency += started.elapsed();
    });
    acknowledge(context, stream, batch.iter().map(|r| r.stored.id.as_str())).await;
    // Pace the tenant: a replayed backlog must not trip Loki's rate limit.
    let pace = Duration::from_secs_f64(bytes as f64 / context.tenant_bytes_per_second as f64);
    if pace > started.elapsed() {
        tokio::time::sleep(pace - started.elapsed()).await;
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
    pipeline.atomic();
    ack_and_delete(&mut pipeline, context, stream, &ids);
    if let Err(error) = context.client.query_pipeline::<()>(&pipeline).await {
        tracing::warn!(target: "log_buffer", %error, stream, "offloader: acknowledging failed; the entries will be delivered again");
    }
}

/// Adds `XACK` and `XDEL` of `ids` to `pipeline`: entries done with leave
/// the group's pending list and the stream.
fn ack_and_delete(pipeline: &mut redis::Pipeline, context: &Context, stream: &str, ids: &[&str]) {
    pipeline
        .cmd("XACK")
        .arg(stream)
        .arg(&context.group)
        .arg(ids)
        .ignore()
        .cmd("XDEL")
        .arg(stream)
        .arg(ids)
        .ignore();
}

/// Moves entries to the stream's dead-letter stream with the reason and
/// acknowledges them, in one transaction; the dead-letter stream is
/// trimmed to its length cap and to the entries' age limit on the way.
pub(super) async fn dead_letter(
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
        .ignore();
    ack_and_delete(&mut pipeline, context, stream, &ids);
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
