//! Logs and audit records buffered in Redis and shipped to Grafana Loki per tenant.
//!
//! # Model
//!
//! A `tracing` layer turns events into records and hands them to a bounded
//! in-memory queue, so emitting an event never waits on the network; a
//! background task appends the queue to one Redis Stream per tenant in
//! pipelined batches. When the queue is full, records are dropped and
//! counted by reason, never silently.
//!
//! Offloaders read the streams through a consumer group, push each tenant's
//! batch to Loki's `/loki/api/v1/push` with `X-Scope-OrgID: <tenant>`, and
//! acknowledge entries only after Loki accepted them: delivery is
//! at-least-once, a crashed offloader's entries are claimed by another, and
//! one tenant's throttling does not hold back the others.
//!
//! Status: this crate's API is not published yet.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
