//! A failover-aware connection manager for Redis deployed as one master with
//! replicas, watched by Sentinel or not (typically on Kubernetes).
//!
//! # Model
//!
//! The manager keeps one answer to "which node is the master now?" and
//! routes every write to it. It learns the answer in one of two ways:
//!
//! - **Ordered candidates**: a list of stable node names (for example the
//!   pods `redis-0.redis-headless`, `redis-1...` of a StatefulSet), resolved
//!   afresh on every connect so that a pod's new IP is never missed. The
//!   master is the first candidate whose `ROLE` says master (or, optionally,
//!   which accepts a throw-away write). A last-resort service address is
//!   tried only when no candidate is a master.
//! - **Sentinel**: the sentinels are asked for the master's address, their
//!   answers must agree, and the node's `ROLE` confirms it before any switch.
//!   `+switch-master` notifications, periodic polling and a refresh after
//!   every sentinel reconnect keep the answer current.
//!
//! Data nodes and sentinels each have their own credentials and TLS
//! settings ([`Credentials`], [`Tls`]).
//!
//! Every master installed gets a new generation with connections of its
//! own; once a newer master is installed, requests no longer pick the old
//! one's connections (a request already sent on one finishes there).
//!
//! # Failures and retries
//!
//! - A request the master refused without running it (`READONLY`,
//!   `LOADING`, `MASTERDOWN`, `NOREPLICAS`, ...; a connection known to have
//!   failed) makes the client find the master again and resend it.
//! - A request whose outcome is unknown (a timeout, or the connection lost
//!   after sending) is resent only if it is read-only or the caller marked
//!   it idempotent ([`FailoverClient::idempotent_connection`],
//!   [`FailoverClient::query_idempotent`]); otherwise the caller gets
//!   [`Error::OutcomeUnknown`]: it may or may not have run.
//! - A timeout also checks the master: a hung master is left for a new one.
//!   On a master that is fine, an idempotent request is resent at most
//!   twice, since a slow request runs again each time.
//! - Retries go on, with jittered backoff cut short when a new master is
//!   installed, until the retry budget (a time, counted from the first
//!   failure) is spent; then [`Error::RetryBudgetExhausted`] names each node
//!   tried and why it failed.
//!
//! One discovery runs at a time: a burst of failed requests waits for a
//! single one. Requests share one multiplexed connection per master. bb8
//! holds each master's connections: every one is opened through its
//! manager, which checks the node's role, and a connection that failed is
//! replaced through the pool, which first checks the pooled one with a
//! unique PING token.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use redis_failover::{FailoverClient, NodeAddr};
//!
//! let sentinels = ["sentinel-0.sentinel:26379", "sentinel-1.sentinel:26379"]
//!     .iter()
//!     .map(|s| s.parse::<NodeAddr>())
//!     .collect::<Result<Vec<_>, _>>()?;
//! let client = FailoverClient::sentinel("mymaster", sentinels).build()?;
//! client.set("greeting", "hello").await?;
//! let greeting: Option<String> = client.get("greeting").await?;
//!
//! // Any redis-rs command or pipeline, through the same failover handling:
//! let mut connection = client.idempotent_connection();
//! let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut connection).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod addr;
mod builder;
mod client;
mod discovery;
mod error;
mod events;
mod node;
mod read;
mod replicas;
mod request;
mod retry;
mod session;
mod shared;
mod tasks;

pub use addr::{DnsResolver, NodeAddr, Resolve, Resolving, StaticResolver};
pub use builder::FailoverClientBuilder;
pub use client::{FailoverClient, MasterConnection, MasterInfo, ReadConnection, ReplicaStatus};
pub use error::{Error, NodeFailure, Result};
pub use events::{Event, MetricsSnapshot, Trigger};
pub use node::{Credentials, MasterCheck, Tls};
pub use read::{Durability, ReadPolicy};
pub use session::Session;
