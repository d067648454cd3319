//! Logs and audit records buffered in Redis and shipped to Grafana Loki per tenant.
//!
//! # Model
//!
//! A `tracing` layer ([`BufferLayer`], from [`LogBuffer::layer`]) turns
//! events into records and hands them to a bounded in-memory queue, so
//! emitting an event never waits on the network; a background task appends
//! the queue to one Redis stream per tenant (`tenant:{<id>}:logs`, through
//! [`redis_failover`], so it follows failovers) in pipelined batches. When
//! the queue is full, records are dropped and counted by reason
//! ([`ProducerMetrics`]), never silently. The tenant is an event's
//! `tenant_id` field, or its span's, or a default. Streams are trimmed to
//! a length cap and to Loki's 7-day window (`MAXLEN ~`, `MINID ~`).
//! A record's size is bounded when the event is emitted: a field over
//! [`LogBufferBuilder::max_field_bytes`], or past
//! [`LogBufferBuilder::max_record_bytes`] for the whole record, is cut and
//! ends with `…[cut <n> bytes]`, so no caller can make a record Loki
//! would refuse, or fill Redis, by logging what it was sent.
//!
//! An entry is flat string fields: `ts` (nanoseconds when the event
//! happened), `level`, `target`, `message` and the event's and its spans'
//! fields. tenant-kv's audit records (`tenant:{<id>}:audit`) have the same
//! shape, so the offloader ships them too. A tenant's streams and their
//! dead-letter streams carry its Redis Cluster hash tag `{<id>}`, as every
//! key of the tenant does in tenant-kv's storage layout 2.
//!
//! [`Offloader`]s read the streams through a consumer group (`XREADGROUP`),
//! push each tenant's entries to a [`LogSink`] — Loki's
//! `/loki/api/v1/push` with `X-Scope-OrgID: <tenant>` ([`LokiSink`],
//! protobuf + snappy or JSON), or a file ([`FileSink`]) — and acknowledge
//! and delete them only once the sink accepted them: delivery is
//! at-least-once. A crashed offloader's entries are claimed by another
//! after an idle time (`XAUTOCLAIM`); entries delivered too often are
//! poison and dead-lettered. Each tenant has its own delivery task,
//! backoff and pace, so one tenant's throttling (429) or outage never
//! holds back another. Entries Loki would refuse (too old, too far in the
//! future, lines too long) go to the stream's dead-letter stream
//! (`<stream>:dead-letter`) with the reason, unsent; dead-letter streams
//! are capped ([`OffloaderBuilder::dead_letter_max_len`]) and trimmed to
//! the same age, and their depth is a gauge ([`TenantMetrics`]). A batch Loki answers
//! 400 (it stored the valid entries and refused the others) is halved and
//! the halves pushed again, down to the single entries it refuses, which
//! are dead-lettered with Loki's reason and never resent. A resent entry
//! keeps its timestamp and line bytes, so Loki drops the duplicates.
//!
//! ```no_run
//! # async fn run(client: redis_failover::FailoverClient) -> log_buffer::Result<()> {
//! use std::time::Duration;
//! use log_buffer::{LogBuffer, LokiSink, Offloader};
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! let buffer = LogBuffer::builder(client.clone()).start()?;
//! let subscriber = tracing_subscriber::registry().with(buffer.layer());
//! tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
//! tracing::info!(tenant_id = "acme", user = "alice", "logged in");
//!
//! // Anywhere, in as many instances as needed:
//! let offloader = Offloader::builder(client, LokiSink::builder("http://loki:3100").build()?)
//!     .start()?;
//! // On shutdown: flush the queue to Redis, let pushes under way finish.
//! buffer.shutdown(Duration::from_secs(5)).await;
//! offloader.shutdown(Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod loki;
mod offloader;
mod producer;
mod record;
mod sink;

pub use error::{Error, Result};
pub use loki::{Encoding, LokiSink, LokiSinkBuilder};
pub use offloader::{Offloader, OffloaderBuilder, TenantMetrics};
pub use producer::{BufferLayer, LogBuffer, LogBufferBuilder, ProducerMetrics};
pub use record::{MAX_TENANT_LEN, dead_letter_stream, is_valid_tenant, log_stream};
pub use sink::{Entry, FileSink, LogSink, Push, PushError, Stream};
