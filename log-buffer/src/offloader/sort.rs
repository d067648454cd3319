//! Sorting a read's entries out: each record checked against Loki's
//! limits and labelled, ready to push or bound for the dead-letter stream,
//! with the tally that says when the read is settled.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use redis::streams::StreamId;
use redis::{FromRedisValue, Value};

use super::labels::{LabelSets, Labels};
use crate::packed::{self, Parsed, Text};
use crate::record::now_ns;
use crate::sink::Entry;

/// Loki's default `max_line_size`.
const LOKI_MAX_LINE: usize = 256 * 1024;
/// Loki's default `creation_grace_period`: newer lines are refused.
const LOKI_MAX_FUTURE: Duration = Duration::from_secs(10 * 60);
/// Loki's default longest label value.
const LOKI_MAX_LABEL_VALUE: usize = 2048;

/// How many records [`sort_out`] checks before it lets other tasks run. A
/// read of packed entries holds thousands of records (a hundred entries of
/// up to 64), about a microsecond each to check: checked in one go, they
/// held a runtime thread, and the requests waiting on it, for 4–10 ms.
const RECORDS_PER_YIELD: usize = 256;

/// A record ready to push, with the index of the entry it came from.
pub(super) struct Ready {
    pub(super) source: usize,
    pub(super) labels: Arc<Labels>,
    pub(super) entry: Entry,
}

/// A record (or a whole entry) for the dead-letter stream: its fields,
/// the id of its entry, and why.
pub(super) struct Dead {
    pub(super) id: String,
    pub(super) fields: Vec<(String, String)>,
    pub(super) reason: &'static str,
    pub(super) detail: String,
}

/// How many records of one delivery are neither delivered nor
/// dead-lettered yet: its range is acknowledged only when none is left,
/// so a delivery whose records went out in several pushes is read again
/// after a crash between them, never lost.
pub(super) struct Tally {
    /// The entries' ids, by index.
    pub(super) ids: Vec<String>,
    pub(super) unsettled: usize,
}

impl Tally {
    /// Counts `records` more records as settled; whether that settles
    /// the whole delivery.
    pub(super) fn settle(&mut self, records: usize) -> bool {
        self.unsettled -= records;
        self.unsettled == 0
    }

    /// Takes back a [`settle`](Self::settle) whose writes failed.
    pub(super) fn unsettle(&mut self, records: usize) {
        self.unsettled += records;
    }
}

/// `entries`' records ready to push, oldest first; those Loki would
/// refuse; and the tally of records per entry. It yields to the runtime
/// every [`RECORDS_PER_YIELD`] records.
pub(super) async fn sort_out(
    checks: Checks<'_>,
    tenant: &str,
    entries: Vec<StreamId>,
) -> (Vec<Ready>, Vec<Dead>, Tally) {
    let now = now_ns();
    let oldest = now.saturating_sub(u64::try_from(checks.max_age.as_nanos()).unwrap_or(u64::MAX));
    let newest = now + LOKI_MAX_FUTURE.as_nanos() as u64;
    let mut labels = LabelSets::new(checks.job, tenant, checks.label_fields);
    let mut ready = Vec::with_capacity(entries.len());
    let mut invalid = Vec::new();
    let mut tally = Tally {
        ids: Vec::with_capacity(entries.len()),
        unsettled: 0,
    };
    let mut since_yield = 0;
    for (source, entry) in entries.iter().enumerate() {
        if since_yield >= RECORDS_PER_YIELD {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
        let packed = entry.map.get(packed::RECORDS_FIELD).map(text);
        let records = unpack(entry, packed.as_deref());
        tally.ids.push(entry.id.clone());
        tally.unsettled += records.len();
        since_yield += records.len();
        for record in records {
            let prepared = record.and_then(|fields| {
                prepare(&checks, &mut labels, &fields, oldest, newest).map_err(
                    |(reason, detail)| Dead {
                        id: entry.id.clone(),
                        fields: fields.into_sorted(),
                        reason,
                        detail,
                    },
                )
            });
            match prepared {
                Ok((labels, line)) => ready.push(Ready {
                    source,
                    labels,
                    entry: line,
                }),
                Err(dead) => invalid.push(dead),
            }
        }
    }
    ready.sort_by_key(|r| r.entry.ts_ns);
    (ready, invalid, tally)
}

/// The records of an entry, borrowed from it: one for a plain entry (its
/// fields), one per line for a packed one (whose `records` field is
/// `packed`); or the fields to dead-letter and why.
fn unpack<'a>(entry: &'a StreamId, packed: Option<&'a str>) -> Vec<Result<Parsed<'a>, Dead>> {
    let Some(packed) = packed else {
        let fields = entry
            .map
            .iter()
            .map(|(name, value)| (Text(Cow::Borrowed(name.as_str())), Text(text(value))));
        return vec![Ok(Parsed::from_fields(fields))];
    };
    packed::decode(packed)
        .map(|record| {
            record.map_err(|(line, detail)| Dead {
                id: entry.id.clone(),
                fields: vec![("line".to_owned(), line)],
                reason: "bad_record",
                detail,
            })
        })
        .collect()
}

/// Why a record cannot go to Loki: the reason's name and the detail.
type Refusal = (&'static str, String);

/// The settings a stream's records are checked and labelled by.
pub(super) struct Checks<'a> {
    pub(super) job: &'a str,
    pub(super) label_fields: &'a [String],
    pub(super) max_age: Duration,
}

/// Labels and line of a record, or why it cannot go to Loki.
fn prepare(
    checks: &Checks<'_>,
    labels: &mut LabelSets<'_>,
    fields: &Parsed<'_>,
    oldest: u64,
    newest: u64,
) -> std::result::Result<(Arc<Labels>, Entry), Refusal> {
    let ts_ns = fields
        .get("ts")
        .and_then(|ts| ts.as_str().parse::<u64>().ok())
        .ok_or_else(|| ("bad_timestamp", "no `ts` field of nanoseconds".to_owned()))?;
    if ts_ns < oldest {
        return Err(("too_old", format!("older than {:?}", checks.max_age)));
    }
    if ts_ns > newest {
        return Err((
            "too_far_in_future",
            format!("more than {LOKI_MAX_FUTURE:?} ahead"),
        ));
    }
    let mut values = Vec::with_capacity(checks.label_fields.len());
    for name in checks.label_fields {
        let value = fields.get(name.as_str()).map(Text::as_str);
        if value.is_some_and(|v| v.is_empty() || v.len() > LOKI_MAX_LABEL_VALUE) {
            return Err(("bad_label", format!("label {name:?} is empty or too long")));
        }
        values.push(value);
    }
    let labels = labels.get(&values);
    let line = fields.line_without_ts();
    if line.len() > LOKI_MAX_LINE {
        return Err(("line_too_long", format!("{} bytes", line.len())));
    }
    Ok((labels, Entry { ts_ns, line }))
}

/// A stream entry's field value as text (borrowed, when it is valid UTF-8).
pub(super) fn text(value: &Value) -> Cow<'_, str> {
    match value {
        // `from_utf8` checks a word of ASCII at a time, where
        // `from_utf8_lossy` goes byte by byte: a packed field is kilobytes,
        // and is nearly always valid.
        Value::BulkString(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(bytes),
        },
        other => Cow::Owned(String::from_redis_value(other.clone()).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// `entries` entries of `records` packed records each, as the producer
    /// writes them.
    fn packed_entries(entries: usize, records: usize) -> Vec<StreamId> {
        let ts = now_ns();
        (0..entries)
            .map(|entry| {
                let lines: String = (0..records)
                    .map(|record| {
                        format!(
                            "{{\"ts\":\"{ts}\",\"level\":\"info\",\"target\":\"app\",\"n\":\"{entry}.{record}\"}}\n"
                        )
                    })
                    .collect();
                StreamId {
                    id: format!("{entry}-0"),
                    map: HashMap::from([(
                        packed::RECORDS_FIELD.to_owned(),
                        Value::BulkString(lines.into_bytes()),
                    )]),
                    ..StreamId::default()
                }
            })
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_large_read_lets_other_tasks_run_while_it_is_sorted_out() {
        // On one thread, the other task runs only when this one yields.
        let turns = Arc::new(AtomicUsize::new(0));
        let other = tokio::spawn({
            let turns = Arc::clone(&turns);
            async move {
                loop {
                    turns.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        });
        let checks = Checks {
            job: "app",
            label_fields: &["level".to_owned()],
            max_age: Duration::from_secs(3600),
        };
        let (ready, invalid, tally) = sort_out(checks, "acme", packed_entries(100, 64)).await;
        other.abort();
        assert_eq!((ready.len(), invalid.len()), (6400, 0));
        assert_eq!((tally.ids.len(), tally.unsettled), (100, 6400));
        let turns = turns.load(Ordering::Relaxed);
        // A turn per yield: 24 here. Half of them is proof enough.
        assert!(
            turns >= 6400 / RECORDS_PER_YIELD / 2,
            "the other task ran {turns} times while 6400 records were sorted out"
        );
    }

    #[test]
    fn a_delivery_is_settled_once_each_of_its_records_is() {
        let mut tally = Tally {
            ids: vec!["1-0".to_owned(), "2-0".to_owned()],
            unsettled: 4,
        };
        assert!(!tally.settle(2));
        tally.unsettle(1);
        assert!(!tally.settle(2));
        assert!(tally.settle(1));
    }

    #[test]
    fn field_values_read_as_text_borrowed_unless_they_need_mending() {
        let valid = Value::BulkString("{\"m\":\"é\"}".into());
        assert!(matches!(text(&valid), Cow::Borrowed("{\"m\":\"é\"}")));
        let invalid = Value::BulkString(b"a\xffb".to_vec());
        assert_eq!(text(&invalid), "a\u{fffd}b");
        assert_eq!(text(&Value::Int(7)), "7");
    }
}
