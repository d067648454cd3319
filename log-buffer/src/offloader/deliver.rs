//! Delivering one stream's entries to the sink: sorted out against
//! Loki's limits ([`super::sort`]), pushed with the tenant's backoff and
//! pace, acknowledged once accepted, dead-lettered when they cannot be.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis::streams::StreamId;

use super::context::{Context, Read};
use super::labels::Labels;
use super::sort::{Checks, Dead, Ready, Tally, sort_out, text};
use crate::record::{dead_letter_stream, now_ns};
use crate::sink::{Entry, Push, PushError, Stream};

/// The most lines in one push: an entry may pack many records.
const MAX_PUSH_LINES: usize = 1000;

/// Delivers one range of a stream's entries: invalid records to the
/// dead-letter stream at once, the rest to the sink, retried with the
/// tenant's backoff until accepted or the offloader stops; then
/// acknowledges the range.
pub(super) async fn deliver(context: &Context, tenant: &str, read: Read) {
    let Read {
        stream,
        range,
        last,
        entries,
    } = read;
    let stream = stream.as_str();
    let at = Acknowledge {
        stream,
        range: &range,
        last: &last,
    };
    let checks = Checks {
        job: context.job_for(stream),
        label_fields: &context.label_fields,
        max_age: context.max_age,
    };
    let (ready, invalid, mut tally) = sort_out(checks, tenant, entries).await;
    if !invalid.is_empty() {
        dead_letter_records(context, at, tenant, invalid, &mut tally).await;
    } else if tally.unsettled == 0 {
        acknowledge(context, at).await;
    }
    let mut queue = in_pushes(ready);
    let mut attempt = 0u32;
    while let Some(mut batch) = queue.pop() {
        if batch.is_empty() {
            continue;
        }
        let (lines, bytes) = (
            batch.len(),
            batch.iter().map(|r| r.entry.line.len() as u64).sum(),
        );
        let push = to_push(tenant, &mut batch);
        let started = Instant::now();
        let pushed = context.sink.push(&push).await;
        if pushed.is_err() {
            give_back(&mut batch, push);
        }
        match pushed {
            Ok(()) => {
                attempt = 0;
                delivered(context, at, tenant, (lines, bytes), started, &mut tally).await;
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
                touch(context, at).await;
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    // The range stays in flight, for a restart or another consumer.
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
                    .map(|ready| Dead {
                        id: tally.ids[ready.source].clone(),
                        fields: fields_of(&ready.entry),
                        reason,
                        detail: detail.clone(),
                    })
                    .collect();
                dead_letter_records(context, at, tenant, rejected, &mut tally).await;
            }
        }
        if context.stopped.is_cancelled() && !queue.is_empty() {
            return;
        }
    }
}

/// `ready` cut into pushes of at most [`MAX_PUSH_LINES`], the oldest last
/// (the queue is popped from its end).
fn in_pushes<T>(mut ready: Vec<T>) -> Vec<Vec<T>> {
    let mut pushes = Vec::new();
    while !ready.is_empty() {
        let at = (ready.len() - 1) / MAX_PUSH_LINES * MAX_PUSH_LINES;
        pushes.push(ready.split_off(at));
    }
    pushes
}

/// The fields of a prepared record: its line's, and `ts`.
fn fields_of(entry: &Entry) -> Vec<(String, String)> {
    let mut fields: BTreeMap<String, String> =
        serde_json::from_str(&entry.line).unwrap_or_default();
    fields.insert("ts".to_owned(), entry.ts_ns.to_string());
    fields.into_iter().collect()
}

/// After the sink accepted a push of `lines` lines of `bytes` bytes in
/// all (pushed at `started`): the figures, the range acknowledged once
/// every record is settled, and the tenant paced.
async fn delivered(
    context: &Context,
    at: Acknowledge<'_>,
    tenant: &str,
    (lines, bytes): (usize, u64),
    started: Instant,
    tally: &mut Tally,
) {
    context.tenant_metrics(tenant, |m| {
        m.sent_lines += lines as u64;
        m.sent_bytes += bytes;
        m.pushes += 1;
        m.push_latency += started.elapsed();
    });
    if tally.settle(lines) {
        acknowledge(context, at).await;
    }
    // Pace the tenant: a replayed backlog must not trip Loki's rate limit.
    let pace = Duration::from_secs_f64(bytes as f64 / context.tenant_bytes_per_second as f64);
    // One reading of the clock: read twice, the second could pass `pace`.
    if let Some(rest) = pace.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
}

/// Dead-letters records of this delivery, acknowledging the range in the
/// same transaction if this settles it; if that fails, the records count
/// as unsettled again, so the range stays in flight.
async fn dead_letter_records(
    context: &Context,
    at: Acknowledge<'_>,
    tenant: &str,
    dead: Vec<Dead>,
    tally: &mut Tally,
) {
    let records = dead.len();
    let settled = tally.settle(records);
    if !dead_letter(context, at, tenant, dead, settled).await {
        tally.unsettle(records);
    }
}

/// The push of `batch`'s records, grouped by label set, each stream's in
/// the batch's order, the streams in the order of their labels. The lines
/// move into the push (no copy of each); [`give_back`] returns them if it
/// fails.
fn to_push(tenant: &str, batch: &mut [Ready]) -> Push {
    // A delivery's records of one label set share its `Arc` (past
    // `MAX_SETS` sets, equal labels may not): found by address, a record
    // costs no string comparison; only a record whose `Arc` is new looks
    // its labels up by value.
    let mut entries: Vec<(&Labels, Vec<Entry>)> = Vec::new();
    let mut by_labels: BTreeMap<&Labels, usize> = BTreeMap::new();
    for Ready { labels, entry, .. } in batch {
        let labels: &Labels = labels;
        let at = entries
            .iter()
            .position(|(known, _)| std::ptr::eq(*known, labels))
            .unwrap_or_else(|| {
                *by_labels.entry(labels).or_insert_with(|| {
                    entries.push((labels, Vec::new()));
                    entries.len() - 1
                })
            });
        entries[at].1.push(Entry {
            ts_ns: entry.ts_ns,
            line: std::mem::take(&mut entry.line),
        });
    }
    Push {
        tenant: tenant.to_owned(),
        streams: by_labels
            .into_iter()
            .map(|(labels, at)| Stream {
                labels: labels.clone(),
                entries: std::mem::take(&mut entries[at].1),
            })
            .collect(),
    }
}

/// Puts the lines of `push`, which failed, back into its `batch`, for a
/// retry or the dead-letter stream: each label set's in the batch's order,
/// as [`to_push`] took them.
fn give_back(batch: &mut [Ready], push: Push) {
    let mut streams: BTreeMap<Labels, std::vec::IntoIter<Entry>> = push
        .streams
        .into_iter()
        .map(|stream| (stream.labels, stream.entries.into_iter()))
        .collect();
    for ready in batch {
        if let Some(entry) = streams.get_mut(&*ready.labels).and_then(Iterator::next) {
            ready.entry.line = entry.line;
        }
    }
}

/// A delivery's stream and range (first and last id), to acknowledge.
#[derive(Clone, Copy)]
pub(super) struct Acknowledge<'a> {
    pub(super) stream: &'a str,
    pub(super) range: &'a str,
    pub(super) last: &'a str,
}

/// Acknowledges a delivered range (`ack.lua`). If this fails, it is
/// delivered again later, which Loki deduplicates.
async fn acknowledge(context: &Context, at: Acknowledge<'_>) {
    let mut pipeline = redis::pipe();
    ack_range(&mut pipeline, context, at);
    if let Err(error) = context.client.query_pipeline::<()>(&pipeline).await {
        tracing::warn!(target: "log_buffer", %error, stream = at.stream, "offloader: acknowledging failed; the entries will be delivered again");
    }
}

/// Adds the acknowledgement of a range to `pipeline`: it leaves the
/// in-flight hash, and the stream's head is trimmed of what every group
/// is done with. `EVAL` rather than `EVALSHA`: it runs once per delivery,
/// and inside a transaction a `NOSCRIPT` would not undo the rest.
fn ack_range(pipeline: &mut redis::Pipeline, context: &Context, at: Acknowledge<'_>) {
    pipeline
        .cmd("EVAL")
        .arg(ACK)
        .arg(2)
        .arg(at.stream)
        .arg(context.in_flight(at.stream))
        .arg(&context.group)
        .arg(at.range)
        .arg(at.last)
        .arg(&context.consumer)
        .ignore();
}

/// Keeps a range being retried from going idle (`touch.lua`): without
/// it, another consumer would claim the range while the sink is down and
/// count deliveries that never failed, up to poison. If this fails, a
/// claim delivers the range twice, which Loki deduplicates.
async fn touch(context: &Context, at: Acknowledge<'_>) {
    let touched = context
        .client
        .query::<u64>(
            redis::cmd("EVAL")
                .arg(TOUCH)
                .arg(1)
                .arg(context.in_flight(at.stream))
                .arg(at.range)
                .arg(at.last)
                .arg(&context.consumer),
        )
        .await;
    if let Err(error) = touched {
        tracing::warn!(target: "log_buffer", %error, stream = at.stream, "offloader: keeping a range in flight failed; another consumer may claim it");
    }
}

/// The acknowledgement script, and the one that keeps a range in flight.
const ACK: &str = concat!(include_str!("ranges.lua"), include_str!("ack.lua"));
const TOUCH: &str = concat!(include_str!("ranges.lua"), include_str!("touch.lua"));

/// Moves records (or whole entries) to the stream's dead-letter stream
/// with the reason, and acknowledges the range if `settled`, in one
/// transaction; the dead-letter stream is trimmed to its length cap and
/// to the entries' age limit on the way. Whether it worked: if not, the
/// range stays in flight.
pub(super) async fn dead_letter(
    context: &Context,
    at: Acknowledge<'_>,
    tenant: &str,
    dead: Vec<Dead>,
    settled: bool,
) -> bool {
    let stream = at.stream;
    let target = dead_letter_stream(stream);
    let mut pipeline = redis::pipe();
    pipeline.atomic();
    let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
    for record in &dead {
        pipeline
            .cmd("XADD")
            .arg(&target)
            .arg("MAXLEN")
            .arg("~")
            .arg(context.dead_letter_max_len)
            .arg("*");
        for (name, value) in &record.fields {
            pipeline.arg(name).arg(value);
        }
        pipeline
            .arg("dead_letter_reason")
            .arg(record.reason)
            .arg("dead_letter_detail")
            .arg(&record.detail)
            .arg("dead_letter_id")
            .arg(&record.id)
            .ignore();
        *reasons.entry(record.reason).or_default() += 1;
    }
    let max_age_ms = u64::try_from(context.max_age.as_millis()).unwrap_or(u64::MAX);
    pipeline
        .cmd("XTRIM")
        .arg(&target)
        .arg("MINID")
        .arg("~")
        .arg((now_ns() / 1_000_000).saturating_sub(max_age_ms))
        .ignore();
    if settled {
        ack_range(&mut pipeline, context, at);
    }
    match context.client.query_pipeline::<()>(&pipeline).await {
        Ok(()) => {
            tracing::warn!(target: "log_buffer", tenant, stream, records = dead.len(), ?reasons, "offloader: records dead-lettered");
            context.tenant_metrics(tenant, |m| {
                for (reason, count) in reasons {
                    *m.dead_lettered.entry(reason).or_default() += count;
                }
            });
            true
        }
        Err(error) => {
            tracing::warn!(target: "log_buffer", %error, stream, "offloader: dead-lettering failed; the entries stay in flight");
            false
        }
    }
}

/// A whole entry as stored, for the dead-letter stream: its fields,
/// sorted by name.
pub(super) fn stored(entry: &StreamId) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = entry
        .map
        .iter()
        .map(|(name, value)| (name.clone(), text(value).into_owned()))
        .collect();
    fields.sort();
    fields
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_failed_push_gives_every_line_back_to_its_record() {
        let labels = |level: &str| Arc::new(Labels::from([("level".to_owned(), level.to_owned())]));
        // Equal labels in another `Arc` (past the sets a delivery shares)
        // still make one stream.
        let (info, error, info_too) = (labels("info"), labels("error"), labels("info"));
        let ready = |n: u64, labels: &Arc<Labels>| Ready {
            source: 0,
            labels: Arc::clone(labels),
            entry: Entry {
                ts_ns: n,
                line: format!("line {n}"),
            },
        };
        let mut batch: Vec<Ready> = (0..6)
            .map(|n| match n % 3 {
                0 => ready(n, &error),
                1 => ready(n, &info),
                _ => ready(n, &info_too),
            })
            .collect();
        let before: Vec<Entry> = batch.iter().map(|r| r.entry.clone()).collect();
        let push = to_push("acme", &mut batch);
        assert_eq!(push.len(), 6);
        let streams: Vec<(&str, Vec<u64>)> = push
            .streams
            .iter()
            .map(|s| {
                (
                    s.labels["level"].as_str(),
                    s.entries.iter().map(|e| e.ts_ns).collect(),
                )
            })
            .collect();
        assert_eq!(
            streams,
            [("error", vec![0, 3]), ("info", vec![1, 2, 4, 5])],
            "one stream per label set, in label order, each in the batch's order"
        );
        assert!(
            batch.iter().all(|r| r.entry.line.is_empty()),
            "moved, not copied"
        );
        give_back(&mut batch, push);
        let after: Vec<Entry> = batch.iter().map(|r| r.entry.clone()).collect();
        assert_eq!(after, before);
    }

    #[test]
    fn records_go_out_oldest_first_in_pushes_of_at_most_the_limit() {
        for len in [
            0,
            1,
            MAX_PUSH_LINES,
            MAX_PUSH_LINES + 1,
            3 * MAX_PUSH_LINES - 1,
        ] {
            let mut pushes = in_pushes((0..len).collect::<Vec<usize>>());
            let mut sent = Vec::new();
            while let Some(push) = pushes.pop() {
                assert!(!push.is_empty() && push.len() <= MAX_PUSH_LINES);
                sent.extend(push);
            }
            assert_eq!(sent, (0..len).collect::<Vec<_>>(), "{len}");
        }
    }
}
