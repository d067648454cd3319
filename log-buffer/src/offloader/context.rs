//! What the offloader's parts share: its settings, its per-tenant
//! figures and its stop signal, what the dispatcher knows of each
//! stream, and what a read hands to a delivery.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::streams::StreamId;
use redis_failover::{Backoff, FailoverClient};
use tokio_util::sync::CancellationToken;

use crate::record::tenant_of_stream;
use crate::sink::LogSink;

/// Everything the dispatcher and the delivery tasks share.
pub(super) struct Context {
    pub(super) client: FailoverClient,
    pub(super) sink: Box<dyn LogSink>,
    pub(super) group: String,
    pub(super) consumer: String,
    pub(super) sources: Vec<String>,
    pub(super) job: String,
    /// Jobs of the sources that do not use `job`, by suffix.
    pub(super) source_jobs: BTreeMap<String, String>,
    pub(super) label_fields: Vec<String>,
    pub(super) batch_size: usize,
    pub(super) source_batch_sizes: BTreeMap<String, usize>,
    pub(super) poll_interval: Duration,
    pub(super) discovery_interval: Duration,
    pub(super) claim_idle: Duration,
    pub(super) max_deliveries: u64,
    pub(super) backoff: Backoff,
    /// Between reads while Redis fails: from the poll interval, up to 32 of them.
    pub(super) read_backoff: Backoff,
    pub(super) tenant_bytes_per_second: u64,
    pub(super) max_age: Duration,
    pub(super) dead_letter_max_len: u64,
    pub(super) metrics: Mutex<BTreeMap<String, TenantMetrics>>,
    pub(super) stopped: CancellationToken,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offloader")
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Context {
    pub(super) fn tenant_metrics(&self, tenant: &str, update: impl FnOnce(&mut TenantMetrics)) {
        update(lock(&self.metrics).entry(tenant.to_owned()).or_default());
    }

    /// The hash of `stream`'s ranges in flight for this group (see
    /// `ranges.lua`): in the stream's slot, as its name starts with it.
    pub(super) fn in_flight(&self, stream: &str) -> String {
        format!("{stream}:in-flight:{}", self.group)
    }

    /// The most entries read from `stream` at once: its source's batch
    /// size, or the default.
    pub(super) fn batch_for(&self, stream: &str) -> usize {
        of_source(&self.source_batch_sizes, stream).map_or(self.batch_size, |&entries| entries)
    }

    /// The `job` label of `stream`'s lines: its source's own, or the
    /// default.
    pub(super) fn job_for(&self, stream: &str) -> &str {
        of_source(&self.source_jobs, stream).map_or(&self.job, String::as_str)
    }

    /// Resolves when the offloader is told to stop.
    pub(super) async fn stopping(&self) {
        self.stopped.cancelled().await;
    }
}

/// The setting in `by_source` (keyed by source suffix) of `stream`'s
/// source, if it has one.
fn of_source<'a, T>(by_source: &'a BTreeMap<String, T>, stream: &str) -> Option<&'a T> {
    by_source
        .iter()
        .find(|(source, _)| tenant_of_stream(stream, source).is_some())
        .map(|(_, setting)| setting)
}

/// What the dispatcher knows of one stream.
pub(super) struct Known {
    pub(super) tenant: String,
    /// Whether the consumer group is known to exist on the stream.
    pub(super) group_ready: bool,
    /// Whether this consumer's own ranges in flight were claimed (they are
    /// read first, after a restart under the same name or a failed read).
    pub(super) own_claimed: bool,
    /// Whether a delivery task owns the stream's entries now.
    pub(super) busy: bool,
    pub(super) last_claim: Instant,
    /// Reads of the stream that failed in a row, and when to try again.
    pub(super) failures: u32,
    pub(super) retry_at: Option<Instant>,
    /// Until when the stream rests: its last read found nothing new.
    pub(super) rest_until: Option<Instant>,
}

impl Known {
    pub(super) fn new(tenant: String) -> Self {
        Self {
            tenant,
            group_ready: false,
            own_claimed: false,
            busy: false,
            last_claim: Instant::now(),
            failures: 0,
            retry_at: None,
            rest_until: None,
        }
    }

    /// When the stream may be read, seen at `now`: `now` or later, once
    /// it is done waiting out a failure and resting; never (`None`) while
    /// a task owns it or its group is not known to exist.
    pub(super) fn readable_at(&self, now: Instant) -> Option<Instant> {
        (!self.busy && self.group_ready).then(|| {
            self.rest_until
                .max(self.retry_at)
                .map_or(now, |at| at.max(now))
        })
    }

    /// Whether the stream may be read now.
    pub(super) fn readable(&self, now: Instant) -> bool {
        self.readable_at(now) == Some(now)
    }

    /// A read of new entries, at `now`, took `entries`. A stream that had
    /// none rests for `poll` before it is named in a read again: every
    /// stream a read names costs the read's scripts an `XINFO GROUPS`
    /// and more, and idle streams were named in every read, each time a
    /// delivery of a busy one ended (in `harness http`'s `GET`s, four
    /// streams with one busy: the master's read transactions cost 0.7–0.8
    /// µs per `GET`, twice the `GET` itself, and 0.4–0.5 µs with the idle
    /// three resting). A stream that had entries is read again as soon as
    /// they are delivered: resting it too made each read larger but the
    /// offloading bursty, which raised the requests' p99. So a busy
    /// stream whose read happens to find nothing rests too, and a tenant
    /// that becomes active waits up to `poll` for its first read.
    pub(super) fn took(&mut self, entries: usize, poll: Duration, now: Instant) {
        self.rest_until = (entries == 0).then(|| now + poll);
    }

    /// A read or claim of the stream failed with `error` (its reply may
    /// have been lost after Redis recorded a range): it waits `backoff`,
    /// its own ranges are claimed first next time, and if its group is
    /// gone, it waits for discovery to create it again.
    pub(super) fn failed(&mut self, error: &redis_failover::Error, backoff: &Backoff) {
        self.own_claimed = false;
        if error.kind() == redis_failover::ErrorKind::NoGroup {
            self.group_ready = false;
        }
        self.retry_at = Some(Instant::now() + backoff.delay(self.failures));
        self.failures = self.failures.saturating_add(1);
    }

    /// A read or claim of the stream answered.
    pub(super) fn answered(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }
}

/// Entries read for one delivery: one in-flight range of a stream.
pub(super) struct Read {
    pub(super) stream: String,
    /// The range's first id: its field in the in-flight hash.
    pub(super) range: String,
    /// The range's last id, as its acknowledgement names it.
    pub(super) last: String,
    pub(super) entries: Vec<StreamId>,
}

/// What one round of reading got: the reads of the streams that
/// answered, and the first failure (a `NOGROUP` before any other: it
/// makes the dispatcher discover the streams at once, which creates the
/// groups the failing streams lost).
#[derive(Default)]
pub(super) struct Round {
    pub(super) reads: Vec<Read>,
    pub(super) error: Option<redis_failover::Error>,
}

impl Round {
    /// Notes a failure; the round goes on with the other streams.
    pub(super) fn failed(&mut self, error: redis_failover::Error) {
        let no_group = |e: &redis_failover::Error| e.kind() == redis_failover::ErrorKind::NoGroup;
        if self
            .error
            .as_ref()
            .is_none_or(|first| !no_group(first) && no_group(&error))
        {
            self.error = Some(error);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_whose_read_failed_waits_and_claims_its_own_first() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(4)).unwrap();
        let error = redis_failover::Error::InvalidConfig {
            setting: "any",
            reason: "a failure".to_owned(),
        };
        let mut known = Known::new("acme".to_owned());
        known.group_ready = true;
        known.own_claimed = true;
        let now = Instant::now();
        assert!(known.readable(now));
        known.failed(&error, &backoff);
        assert!(!known.own_claimed);
        assert!(!known.readable(now));
        for _ in 0..10 {
            known.failed(&error, &backoff);
        }
        assert!(
            known.readable(Instant::now() + Duration::from_secs(5)),
            "the cap bounds the wait"
        );
        known.answered();
        assert!(known.readable(Instant::now()));
        known.busy = true;
        assert!(!known.readable(Instant::now()));
    }

    #[test]
    fn a_stream_read_empty_rests_and_one_with_entries_does_not() {
        let poll = Duration::from_millis(100);
        let mut known = Known::new("acme".to_owned());
        known.group_ready = true;
        let now = Instant::now();
        known.took(0, poll, now);
        assert!(!known.readable(now));
        assert!(!known.readable(now + poll / 2));
        assert!(known.readable(now + poll));
        known.took(1, poll, now);
        assert!(known.readable(now), "read again at once");
    }
}
